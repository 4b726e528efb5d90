"""``edgetl export``: a run directory -> a checked bundle (see docs/bundle.md and docs/export.md).

The trunk and each head become separate graphs with a dynamic batch axis, one folder per format
(``formats/``: ONNX for ONNX Runtime, OpenVINO IR), in fp32, fp16 (weights), bf16 (OpenVINO
inference precision) and int8 (trunk only; searched by ``int8.py`` with each format's quantizer).
Everything is written into a temporary folder beside the target, and before that folder is
renamed into place every variant is loaded **through the device runtime**
(:func:`edgetl.device.runtime.open_bundle`) from the temporary bundle and compared with PyTorch on
the run's validation images. A variant that misses its bar (docs/design.md: fp32 max abs logit diff
<= 1e-3 with 100% top-1 agreement; fp16, bf16 and int8 top-1 drop <= ``max_drop`` pp against the
same format's fp32; ``checks.py``) raises :class:`ExportError` and no bundle appears.

What to export comes from an export profile (``export/*.yaml``, :class:`ExportProfile`), with
command-line options on top.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.core.atomic import atomic_directory, check_output
from edgetl.core.errors import ExportError
from edgetl.workstation.export.common import HEAD, load_arrays, progress_bar, torch_logits
from edgetl.workstation.export.formats import registry
from edgetl.workstation.export.options import ExportProfile, resolve_options
from edgetl.workstation.export.session import ExportSession
from edgetl.workstation.run import load_run

log = logging.getLogger(__name__)


def export_bundle(
    run_dir: str | Path,
    out: str | Path,
    options: ExportProfile | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Export run ``run_dir`` to bundle ``out``; every variant is checked before the bundle exists.

    ``options`` says what to export: an :class:`ExportProfile` from :func:`resolve_options` (a
    profile with command-line options on top, checked before any work); None: the ``default``
    profile. Returns the ``--json`` document: ``{"bundle": path, "profile": {...},
    "variants": {name: {val_top1, max_abs_diff, top1_agreement, bytes, ...}}}``.
    """
    if options is None:
        options = resolve_options()
    out = Path(out)
    run = load_run(run_dir)
    if run.trunk_from is not None:
        raise ExportError(
            f"run {run.path} holds a head trained on the trunk of bundle {run.trunk_from['bundle']}; "
            f"add it to that bundle with `edgetl export {run.path} --add-to BUNDLE --head NAME`"
        )
    # atomic_directory checks again (under the output's lock); this only saves loading the data first.
    # --force replaces a bundle, never the run being exported or a folder holding it.
    check_output(out, force=force, kind="bundle", inputs=[run.path])
    if not run.val_samples:
        raise ExportError(f"run {run.path} has no validation images: exported variants cannot be checked")
    t0 = time.perf_counter()
    model = run.build_model()
    x_val, y_val = load_arrays(run.val_samples, run.preprocessing)
    ref = torch_logits(model, x_val).astype(np.float64)
    ref_features = torch_logits(model.trunk, x_val)
    log.info(
        "run %s: %s, %d validation images; exporting %s x %s",
        run.path,
        run.spec.name,
        len(y_val),
        ",".join(options.formats),
        ",".join(options.precisions),
    )

    with (
        progress_bar(progress) as bar,
        atomic_directory(out, force=force, kind="bundle", inputs=[run.path]) as tmp,
        tempfile.TemporaryDirectory(prefix="edgetl-export-") as work,
    ):
        session = ExportSession(run, model, tmp, Path(work), options, x_val, y_val, ref, ref_features, bar)
        plugins = registry()
        for fmt in options.formats:
            plugins[fmt].write(session)
        session.drop_unrequested()
        session.write_manifest()
        _store_stats(tmp, run, x_val, y_val, bar)
        variants = {name: dict(v["metrics"]) for name, v in session.variants.items()}
    log.info("bundle written to %s in %.1fs", out, time.perf_counter() - t0)
    return {"bundle": str(out), "profile": options.to_dict(), "variants": variants}


def _store_stats(tmp: Path, run, x_val: np.ndarray, y_val: np.ndarray, bar, head: str = HEAD) -> None:
    """The head's feature statistics and familiarity threshold (edgetl.device.head_stats), through the
    bundle's own reference trunk: what `edgetl learn --extend` and `predict`'s unfamiliar flag use."""
    from edgetl.core.bundle import read_manifest, write_manifest
    from edgetl.device.head_stats import add_stats

    m = read_manifest(tmp)
    paths, labels = [s.path for s in run.train_samples], np.array([s.label for s in run.train_samples])
    add_stats(tmp, m, head, paths, labels, x_val, y_val, progress=bar)
    write_manifest(tmp, m)
