"""Run a bundle on the device: verify it, load one variant, classify images. No torch anywhere.

A bundle holds one trunk (image -> pooled features) and one or more heads (features -> logits) per
variant (format + precision). :class:`Predictor` runs the trunk once per batch and every selected
head on the same features, which is what makes several tasks on one device cheap.

Back-ends are looked up by runtime name in ``_BACKENDS`` and import their library lazily, so a
device with only ONNX Runtime never needs OpenVINO (and nothing here ever needs torch). Only ONNX
Runtime is implemented; the ``openvino`` seam answers with a clear :class:`BackendError`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgetl.bundle import PRECISIONS, read_manifest, variant_name, verify_files
from edgetl.data import IMAGE_EXTENSIONS
from edgetl.errors import BackendError, BundleError, ConfigError, DataError
from edgetl.preprocess import Preprocessing, load_image, preprocess_batch

DEFAULT_RUNTIME = "onnxruntime"
ALL_HEADS = "all"

# A loaded model file: float32 array in, float32 array out (one input, one output).
Model = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Backend:
    """How a runtime name maps to bundle files and to a loader (``None``: not implemented yet)."""

    format: str
    module: str
    install_hint: str
    loader: Callable[..., Model] | None


def _load_onnxruntime(path: Path, *, threads: int | None) -> Model:
    """One ``InferenceSession`` on the CPU provider, fully optimised, wrapped as a plain callable."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own pybind exception types (Fail, InvalidGraph, ...)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"ONNX Runtime cannot load {path}: {first_line}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise BundleError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; edgetl models have one of each")
    input_name, output_name = inputs[0].name, outputs[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: x})[0]

    return run


_BACKENDS: dict[str, _Backend] = {
    "onnxruntime": _Backend("onnx", "onnxruntime", "pip install onnxruntime", _load_onnxruntime),
    "openvino": _Backend("openvino", "openvino", "pip install 'edgetl[openvino]'", None),
}
RUNTIMES: tuple[str, ...] = tuple(_BACKENDS)


def _backend(runtime: str) -> _Backend:
    try:
        return _BACKENDS[runtime]
    except KeyError:
        raise ConfigError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}") from None


def import_backend(runtime: str) -> None:
    """Import the runtime's library now (bench calls this so import time is not counted as model load)."""
    spec = _backend(runtime)
    if importlib.util.find_spec(spec.module) is None:
        raise BackendError(f"runtime {runtime!r} is not installed: {spec.install_hint}")
    if spec.loader is None:
        raise BackendError(f"runtime {runtime!r} is not supported by edgetl yet; use --runtime onnxruntime")
    importlib.import_module(spec.module)


def open_bundle(path: str | os.PathLike, *, verify: bool = True) -> "Bundle":
    """Read the manifest and (by default) check every file's sha256 before anything is loaded.

    A bundle travels by USB stick and scp; a truncated or edited model file must fail here with the
    file named, not later as a puzzling ONNX Runtime error or, worse, as wrong predictions.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    return Bundle(path, manifest)


class Bundle:
    """A verified bundle: its input contract, heads with their labels, and the variants it holds."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.preprocessing: Preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
        self.heads: dict[str, tuple[str, ...]] = {name: tuple(h["labels"]) for name, h in manifest["heads"].items()}
        default = manifest.get("default_head")
        if default is None and len(self.heads) == 1:
            default = next(iter(self.heads))
        if default is not None and default not in self.heads:
            raise BundleError(
                f"bundle {self.path}: default_head {default!r} is not one of its heads ({', '.join(self.heads)})"
            )
        self.default_head: str | None = default
        self.variants: tuple[str, ...] = tuple(manifest["variants"])

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, variants={list(self.variants)}, heads={list(self.heads)})"

    def precisions(self, fmt: str) -> list[str]:
        """Precisions available for one format, in the canonical order (fp32 first)."""
        have = {v["precision"] for v in self.manifest["variants"].values() if v["format"] == fmt}
        return [p for p in PRECISIONS if p in have]

    def variant(self, fmt: str, precision: str) -> dict[str, Any]:
        """The manifest record of one variant; a BundleError lists what the bundle has instead."""
        name = variant_name(fmt, precision)
        try:
            return self.manifest["variants"][name]
        except KeyError:
            raise BundleError(
                f"bundle {self.path} has no {name} variant (it has: {', '.join(self.variants)}); "
                "choose another --precision/--runtime or re-export"
            ) from None

    def runtime_precisions(self, runtime: str) -> list[str]:
        """Precisions this bundle holds for a runtime; BackendError when it holds none."""
        fmt = _backend(runtime).format
        have = self.precisions(fmt)
        if not have:
            raise BackendError(
                f"bundle {self.path} has no {fmt} files for runtime {runtime!r} (it has: {', '.join(self.variants)}); "
                f"use another --runtime or re-export with --format {fmt}"
            )
        return have

    def resolve_precision(self, runtime: str, precision: str | None) -> str:
        """``None`` means fp32 when the bundle has it, else its only precision for this runtime."""
        have = self.runtime_precisions(runtime)
        if precision is None:
            if "fp32" in have or len(have) == 1:
                return "fp32" if "fp32" in have else have[0]
            raise BundleError(f"bundle {self.path} has {', '.join(have)} for {runtime}; choose one with --precision")
        if precision not in have:
            raise BundleError(
                f"bundle {self.path} has no {precision} variant for {runtime} (it has: {', '.join(have)})"
            )
        return precision

    def resolve_heads(self, variant: dict[str, Any], heads: str | Sequence[str] | None) -> tuple[str, ...]:
        """``None``: the default head; ``"all"``: every head of the variant; else the names given."""
        available = [h for h in self.heads if h in variant["heads"]]
        if heads is None:
            if self.default_head is None:
                raise BundleError(
                    f"bundle {self.path} has several heads ({', '.join(self.heads)}) and no default; "
                    "choose one with --head NAME or --head all"
                )
            heads = [self.default_head]
        elif heads == ALL_HEADS:
            heads = available
        elif isinstance(heads, str):
            heads = [heads]
        for h in heads:
            if h not in available:
                raise BundleError(
                    f"bundle {self.path} has no head {h!r} in this variant (it has: {', '.join(available)})"
                )
        if not heads:
            raise ConfigError("no head selected")
        return tuple(dict.fromkeys(heads))

    def files_of(self, variant: dict[str, Any], heads: Sequence[str]) -> list[str]:
        """Relative paths of the trunk and the given heads of a variant."""
        return [variant["trunk"], *(variant["heads"][h] for h in heads)]

    def model_bytes(self, variant: dict[str, Any], heads: Sequence[str]) -> int:
        """What the device stores for this variant: trunk + heads, companion files (.bin) included."""
        total = 0
        for rel in dict.fromkeys(self.files_of(variant, heads)):
            rec = self.manifest["files"][rel]
            companions = (rec.get("extra_files") or {}).values()
            total += int(rec.get("bytes", 0)) + sum(int(r.get("bytes", 0)) for r in companions)
        return total

    def load(
        self,
        *,
        runtime: str = DEFAULT_RUNTIME,
        precision: str | None = None,
        heads: str | Sequence[str] | None = None,
        threads: int | None = None,
    ) -> "Predictor":
        """Create the sessions of one variant: its trunk and the selected heads (default head if None)."""
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1, not {threads}")
        backend = _backend(runtime)
        precision = self.resolve_precision(runtime, precision)
        variant = self.variant(backend.format, precision)
        head_names = self.resolve_heads(variant, heads)
        import_backend(runtime)
        assert backend.loader is not None  # import_backend refuses unimplemented back-ends
        trunk = backend.loader(self.path / variant["trunk"], threads=threads)
        head_models = {h: backend.loader(self.path / variant["heads"][h], threads=threads) for h in head_names}
        return Predictor(
            bundle=self,
            runtime=runtime,
            precision=precision,
            variant=variant_name(backend.format, precision),
            trunk=trunk,
            heads=head_models,
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable: shifted by the row max)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """One loaded variant: trunk + selected heads. Inputs are preprocessed (N, 3, S, S) float32."""

    def __init__(self, *, bundle: Bundle, runtime: str, precision: str, variant: str,
                 trunk: Model, heads: dict[str, Model]) -> None:
        self.bundle = bundle
        self.runtime = runtime
        self.precision = precision
        self.variant = variant
        self.preprocessing = bundle.preprocessing
        self.head_names: tuple[str, ...] = tuple(heads)
        self.labels: dict[str, tuple[str, ...]] = {h: bundle.heads[h] for h in heads}
        self._trunk = trunk
        self._heads = heads

    def __repr__(self) -> str:
        return f"Predictor({self.variant!r}, runtime={self.runtime!r}, heads={list(self.head_names)})"

    def preprocess(self, images: Iterable[Image.Image]) -> np.ndarray:
        """PIL images -> (N, 3, S, S) float32, exactly as in training (see :mod:`edgetl.preprocess`)."""
        images = list(images)
        if not images:
            raise DataError("no images to preprocess")
        return preprocess_batch(images, self.preprocessing)

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        s = self.preprocessing.input_size
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1:] != (3, s, s) or x.shape[0] < 1:
            got = getattr(x, "shape", type(x).__name__)
            raise DataError(f"model input must be an array of shape (N, 3, {s}, {s}), got {got}; use .preprocess()")
        return np.ascontiguousarray(x, dtype=np.float32)  # a float64 array from numpy maths is fine too

    def features(self, x: np.ndarray) -> np.ndarray:
        """Trunk only: (N, 3, S, S) -> (N, D) pooled features."""
        return self._trunk(self._check_input(x))

    def logits(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Trunk once, then every selected head on the same features: {head: (N, C) logits}."""
        feats = self.features(x)
        return {name: head(feats) for name, head in self._heads.items()}

    def predict(self, images: Sequence[str | os.PathLike | Image.Image], *, top_k: int = 5,
                batch_size: int = 32) -> list[dict[str, Any]]:
        """Classify image files or PIL images; an unreadable file raises :class:`DataError`.

        Returns one record per image and selected head, image-major:
        ``{image, head, label, score, top_k: [{label, score}]}`` with softmax scores.
        """
        _check_positive(top_k=top_k, batch_size=batch_size)
        images = list(images)
        names = [_image_name(im, i) for i, im in enumerate(images)]
        records: list[dict[str, Any]] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            loaded = [im if isinstance(im, Image.Image) else load_image(im) for im in chunk]
            records.extend(self._predict_loaded(names[start : start + batch_size], loaded, top_k))
        return records

    def _predict_loaded(self, names: list[str], images: list[Image.Image], top_k: int) -> list[dict[str, Any]]:
        logits = self.logits(self.preprocess(images))
        probs = {h: softmax(v) for h, v in logits.items()}
        records = []
        for head, p in probs.items():
            if p.ndim != 2 or p.shape[1] != len(self.labels[head]):
                raise BundleError(
                    f"bundle {self.bundle.path}: head {head!r} returns shape {p.shape} "
                    f"but has {len(self.labels[head])} labels; re-export the bundle"
                )
        for i, name in enumerate(names):
            for head in self.head_names:
                p, labels = probs[head][i], self.labels[head]
                order = np.argsort(-p, kind="stable")[: min(top_k, len(labels))]
                top = [{"label": labels[j], "score": float(p[j])} for j in order]
                records.append({"image": name, "head": head, "label": top[0]["label"], "score": top[0]["score"],
                                "top_k": top})
        return records


@dataclasses.dataclass(frozen=True)
class PredictReport:
    """Predictions for the readable images, and ``(path, reason)`` for the files that were skipped."""

    predictions: list[dict[str, Any]]
    skipped: list[tuple[str, str]]


def find_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given (any extension: the user named them), folders recursively by image extension."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise DataError(f"folder {p} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"image {p} does not exist")
    return list(dict.fromkeys(found))


def predict_files(predictor: Predictor, inputs: Iterable[str | os.PathLike], *, top_k: int = 5,
                  batch_size: int = 32) -> PredictReport:
    """Classify files and folders, skipping (not failing on) unreadable images: one bad file on a
    device's camera share should not stop the other thousand from being classified."""
    _check_positive(top_k=top_k, batch_size=batch_size)
    paths = find_images(inputs)
    if not paths:
        raise DataError("no images given")
    predictions: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for batch in _readable_batches(paths, batch_size, skipped):
        names, images = zip(*batch)
        predictions.extend(predictor._predict_loaded(list(names), list(images), top_k))
    if not predictions:
        raise DataError(f"none of the {len(paths)} image(s) could be read (first: {skipped[0][1]})")
    return PredictReport(predictions, skipped)


def _readable_batches(paths: list[Path], batch_size: int, skipped: list[tuple[str, str]]
                      ) -> Iterator[list[tuple[str, Image.Image]]]:
    batch: list[tuple[str, Image.Image]] = []
    for path in paths:
        try:
            batch.append((str(path), load_image(path)))
        except DataError as exc:
            skipped.append((str(path), str(exc)))
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _image_name(image: Any, index: int) -> str:
    return f"<image {index}>" if isinstance(image, Image.Image) else str(image)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be an integer >= 1, not {value!r}")
