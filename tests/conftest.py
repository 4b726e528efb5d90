import os

import numpy as np
import pytest

from tests.helpers import make_image_folder, register_tiny_backbone

# Tests never touch the network: weights come from the hub cache or an installed package, or not at all.
os.environ.setdefault("EDGETL_OFFLINE", "1")

register_tiny_backbone()


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")


@pytest.fixture(autouse=True)
def _isolated_feature_cache(tmp_path, monkeypatch):
    """Each test gets its own feature cache: hits must come from the test itself."""
    monkeypatch.setenv("EDGETL_CACHE", str(tmp_path / "edgetl-cache"))


@pytest.fixture(scope="module")
def tiny_trunk(tmp_path_factory):
    """The tiny test backbone's trunk as ONNX (32 px, seeded weights) and 24 random images for it."""
    import torch

    from edgetl.workstation.backbones import get_backbone
    from edgetl.workstation.export import export_onnx
    from edgetl.workstation.model import build_trunk
    from tests.helpers import TINY

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("trunk") / "trunk.onnx"
    trunk = build_trunk(get_backbone(TINY)).eval()
    export_onnx(trunk, torch.zeros(2, 3, 32, 32), path, input_name="image", output_name="features")
    return path, np.random.default_rng(0).normal(0, 1, (24, 3, 32, 32)).astype(np.float32)
