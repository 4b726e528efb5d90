"""Write a run directory without the training code, for export tests (and measurements).

``make_run`` writes its run through :func:`edgetl.workstation.run.write_run`, the writer training
uses, so the fixture cannot drift from what :func:`edgetl.workstation.run.load_run` reads. The head
is fitted on trunk features (a few hundred steps of full-batch logistic regression), so validation
accuracy is meaningful and int8 drops are real numbers. When ``edgetl.workstation.train.finetune``
is available it can replace this helper one for one.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from edgetl.core.imagefolder import scan_image_folder
from edgetl.core.preprocess import load_image, preprocess_batch
from edgetl.workstation.backbones import get_backbone
from edgetl.workstation.data import stratified_split
from edgetl.workstation.run import write_run


def _features(trunk, samples, pp, batch_size: int = 128) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            x = preprocess_batch([load_image(s.path) for s in samples[i : i + batch_size]], pp)
            out.append(trunk(torch.from_numpy(x)).numpy())
    return np.concatenate(out)


def make_run(
    run_dir: str | Path,
    data_dir: str | Path,
    *,
    backbone: str = "tiny_test",
    img_size: int | None = None,
    trunk_state: dict | None = None,
    weights: dict | None = None,
    val_fraction: float = 0.25,
    seed: int = 0,
    steps: int = 300,
) -> Path:
    """Write a run for ``data_dir`` (an image folder): trunk from ``trunk_state`` (ImageNet
    checkpoint of the full torchvision model) or seeded random init, head fitted on its features."""
    import torch

    from edgetl.workstation.model import Head, build_trunk

    run_dir = Path(run_dir)
    spec = get_backbone(backbone)
    pp = spec.preprocessing(img_size)
    folder = scan_image_folder(data_dir)
    train, val = stratified_split(folder, val_fraction, seed)

    torch.manual_seed(seed)
    trunk = build_trunk(spec, trunk_state).eval()
    head = Head(spec.feature_dim, len(folder.classes), dropout=0.2)
    f_train = torch.from_numpy(_features(trunk, train, pp))
    y_train = torch.tensor([s.label for s in train])
    # Standardise through the linear layer's own parameters so the head stays a plain Linear.
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    lin = torch.nn.Linear(spec.feature_dim, len(folder.classes))
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin((f_train - mu) / sd), y_train) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        head.fc.weight.copy_(lin.weight / sd)
        head.fc.bias.copy_(lin.bias - (lin.weight * (mu / sd)).sum(1))
    head.eval()

    f_val = torch.from_numpy(_features(trunk, val, pp))
    with torch.no_grad():
        pred = head(f_val).argmax(1).numpy()
    val_top1 = float((pred == np.array([s.label for s in val])).mean())

    config = {
        "backbone": backbone,
        "preprocessing": pp.to_dict(),
        "train": {"dropout": 0.2, "strategy": "feature-extraction", "seed": seed},
        "weights": weights or {"kind": "none", "path": None, "sha256": None, "origin": None},
        "data": {"root": str(data_dir), "classes": list(folder.classes)},
    }
    return write_run(
        run_dir,
        config=config,
        labels=list(folder.classes),
        train=train,
        val=val,
        model_state={"trunk": trunk.state_dict(), "head": head.state_dict()},
        history=[],  # no epochs: the head is fitted in closed-ish form above
        metrics={"val_top1": val_top1, "n": len(val)},
        plot=False,
    )


# --- shared across test modules -----------------------------------------------------------------
# Exports take seconds each; modules that only read a bundle share one per pytest session. Tests
# that modify a bundle copy it first.
_SHARED: dict[tuple, object] = {}


def shared_run(tmp_path_factory) -> Path:
    """The tiny colour run (tiny_test backbone, 36 train / 12 validation images), made once per session."""
    from tests.helpers import make_image_folder

    key = ("run",)
    if key not in _SHARED:
        root = tmp_path_factory.mktemp("shared-run")
        _SHARED[key] = make_run(root / "run", make_image_folder(root / "images"))
    return _SHARED[key]


def shared_export(tmp_path_factory, profile: str, **options) -> tuple[Path, dict]:
    """``export_bundle(shared_run, ..., resolve_options(profile, **options))`` once per session: (bundle, doc)."""
    from edgetl.workstation.export import export_bundle, resolve_options

    key = ("export", profile, tuple(sorted(options.items())))
    if key not in _SHARED:
        out = tmp_path_factory.mktemp(f"shared-{profile}") / "b"
        _SHARED[key] = (
            out,
            export_bundle(shared_run(tmp_path_factory), out, resolve_options(profile, **options), progress=False),
        )
    return _SHARED[key]


@functools.cache
def cpu_runs_bf16() -> bool:
    """OpenVINO runs bf16 natively on AMX/AVX512-BF16 CPUs and emulates it on other AVX-512 ones;
    older CPUs answer f32 to a bf16 hint."""
    import openvino as ov
    import openvino.opset13 as ops

    param = ops.parameter([1, 4], ov.Type.f32)
    compiled = ov.Core().compile_model(
        ov.Model([ops.relu(param)], [param]), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"}
    )
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"


def all_profile_export(tmp_path_factory) -> tuple[Path, dict]:
    """The ``all`` profile: every format and precision with merged graphs (bf16 left out where the
    CPU cannot run it)."""
    return shared_export(
        tmp_path_factory, "all", **({} if cpu_runs_bf16() else {"precisions": ("fp32", "fp16", "int8")})
    )
