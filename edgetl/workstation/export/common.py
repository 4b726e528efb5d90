"""Helpers every export step shares: validation arrays, batching, reference logits, versions, progress."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetl import __version__
from edgetl.core.imagefolder import Sample
from edgetl.core.preprocess import Preprocessing, load_image, preprocess_batch

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


def ort_model(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """An ONNX Runtime session as the device runtime builds it (CPU, all graph optimizations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda x: session.run(None, {input_name: x})[0]


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


def progress_bar(enabled: bool):
    """The one progress bar of the workstation side (training, feature passes, probes, exports), on stderr.

    It lives here, in the lowest workstation layer, so that export and training both import it.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        disable=not enabled,
    )
