"""Helpers every export step shares: validation arrays, batching, reference logits, versions, progress."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl import __version__
from edgetl.core.imagefolder import Sample, hash_prefixes, image_sha256
from edgetl.core.preprocess import Preprocessing, load_image, preprocess_batch
from edgetl.core.progress import progress_bar  # noqa: F401  (the workstation's callers import it here)

if TYPE_CHECKING:
    from edgetl.workstation.run import Run

log = logging.getLogger(__name__)

HEAD = "default"  # the head an export writes (more are added with ``export --add-to``)
BATCH = 64


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_arrays(samples: Sequence[Sample], pp: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess ``samples`` exactly as the device does: (N, 3, S, S) float32 and labels."""
    x = np.empty((len(samples), 3, pp.input_size, pp.input_size), dtype=np.float32)
    for i in range(0, len(samples), BATCH):
        chunk = samples[i : i + BATCH]
        x[i : i + len(chunk)] = preprocess_batch([load_image(s.path) for s in chunk], pp)
    return x, np.array([s.label for s in samples], dtype=np.int64)


def batches(x: np.ndarray) -> Iterator[np.ndarray]:
    for i in range(0, len(x), BATCH):
        yield x[i : i + BATCH]


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(b)).numpy() for b in batches(x)])


def sqnr_db(signal: np.ndarray, reference: np.ndarray) -> float | None:
    """Signal-to-quantization-noise ratio of ``signal`` against ``reference`` in dB (None: identical)."""
    ref = reference.astype(np.float64)
    noise = float(((signal.astype(np.float64) - ref) ** 2).sum())
    return None if noise == 0.0 else round(10.0 * np.log10(max(float((ref**2).sum()), 1e-30) / noise), 2)


def tensor_spec(name: str, shape: list, dtype: str = "float32") -> dict[str, Any]:
    return {"name": name, "shape": shape, "dtype": dtype}


def ort_model(path: Path, *, as_written: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """An ONNX Runtime session as the device runtime builds it (CPU, all graph optimizations); with
    ``as_written``, none: a QDQ graph then runs each DequantizeLinear and the float operator after
    it, computing exactly what the graph says (what a CPU with exact int8 sums computes, up to
    rounding), not what this CPU's fused int8 kernels compute."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL if as_written else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda x: session.run(None, {input_name: x})[0]


def onnx_as_written(bundle_dir: Path, trunk_rel: str, head_rel: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and features of an ONNX trunk + head on ``x`` with the trunk run as written
    (:func:`ort_model` ``as_written``): how an int8 variant is scored on a CPU whose int8 kernels
    saturate (:func:`edgetl.core.envinfo.int8_saturates`)."""
    trunk = ort_model(bundle_dir / trunk_rel, as_written=True)
    head = ort_model(bundle_dir / head_rel)
    features = np.concatenate([trunk(x[i : i + 32]) for i in range(0, len(x), 32)])
    features = features.reshape(len(features), -1)
    logits = np.concatenate([head(features[i : i + 64]) for i in range(0, len(features), 64)])
    return logits, features


def int8_as_written(fmt: str) -> bool:
    """Whether ``fmt``'s int8 is held to the bar as its graph is written rather than as this CPU
    runs it: ONNX Runtime's int8 kernels saturate on x86 without VNNI or AMX
    (:func:`edgetl.core.envinfo.int8_saturates`), where a QDQ graph can lose tens of points that it
    does not lose on a Raspberry Pi or a VNNI CPU."""
    from edgetl.core import envinfo
    from edgetl.core.formats import FORMATS

    return FORMATS[fmt].runtime == "onnxruntime" and bool(envinfo.int8_saturates())


def versions(formats: Sequence[str] = ("onnx",)) -> dict[str, str | None]:
    import importlib.metadata

    from edgetl.core.formats import FORMATS

    # Every format starts from the ONNX graphs, so ONNX's libraries are always recorded.
    modules = [m for f in ("onnx", *formats) for m in FORMATS[f].export_modules + FORMATS[f].int8_modules]
    dists = ["torch", "torchvision", *dict.fromkeys(modules)]
    out: dict[str, str | None] = {"edgetl": __version__}
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


# --- lineage: what a bundle says about where it came from, without the workstation's paths ---------
# A bundle goes to every device: it names the run, the data folder and the weights file (names, not
# paths), counts images and records sha256 hashes, so lineage can be checked without revealing where
# things live on the workstation.


def run_origin(run: Run) -> str:
    """``derived_from`` of the graphs exported from a run's checkpoint: ``run:<run name>/model.pt``."""
    return f"run:{run.path.resolve().name}/model.pt"


def run_lineage(run: Run, strategy: str | None) -> dict[str, Any]:
    """A head's ``run`` record: the run's name (not its path), strategy and validation top-1."""
    return {"name": run.path.resolve().name, "strategy": strategy, "val_top1": run.metrics.get("val_top1")}


def weights_lineage(weights: dict[str, Any] | None) -> dict[str, Any] | None:
    """The trunk's initial weights for the manifest: ``kind``, the weights ``file`` name (not its path
    on the workstation), ``sha256`` and ``origin``."""
    if not isinstance(weights, dict):
        return weights
    out = {k: v for k, v in weights.items() if k != "path"}
    path = weights.get("path")
    return {
        "kind": out.pop("kind", None),
        "file": Path(path).name if isinstance(path, str) and path else out.pop("file", None),
        **out,
    }


def training_data_record(run: Run) -> dict[str, Any]:
    """A head's ``training_data``: the data folder's name, image and class counts, and the sha256
    prefixes of the training images' bytes (sorted), so that ``edgetl evaluate BUNDLE DATA`` leaves
    those images out wherever they are. When some training image is gone no prefixes are recorded
    (evaluate then warns that it cannot check) rather than an incomplete list."""
    root = (run.config.get("data") or {}).get("root")
    record: dict[str, Any] = {
        "folder": Path(root).name if isinstance(root, str) and root else None,
        "classes": len(run.labels),
        "train_images": len(run.train_samples),
        "val_images": len(run.val_samples),
    }
    hashes, gone = [], 0
    for s in run.train_samples:
        try:
            hashes.append(image_sha256(s.path))
        except OSError:
            gone += 1
    if gone:
        log.warning(
            "%d of the %d training images of run %s are gone: the bundle records no training-image hashes, "
            "so `edgetl evaluate BUNDLE DATA` cannot leave them out",
            gone,
            len(run.train_samples),
            run.path,
        )
    else:
        record["train_sha256_prefixes"] = hash_prefixes(hashes)
    return record


def images_sha256(samples: Sequence[Sample]) -> str:
    """One sha256 for an ordered list of images: of their content hashes, one per line."""
    return hashlib.sha256("\n".join(image_sha256(s.path) for s in samples).encode()).hexdigest()
