import os

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
