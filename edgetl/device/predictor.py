"""A loaded variant: the trunk once per batch, then every selected head on the same features.

Running several heads on one trunk pass is what makes several tasks on one device cheap. Inputs
are preprocessed (N, 3, S, S) float32 arrays; :meth:`Predictor.predict` takes files or PIL images.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from edgetl.core.errors import BundleError, ConfigError, DataError
from edgetl.core.preprocess import load_image, preprocess_batch
from edgetl.device import limits

if TYPE_CHECKING:
    from edgetl.device.backends import Model
    from edgetl.device.bundle_loading import Bundle


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable: shifted by the row max)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """One loaded variant: trunk + selected heads. Inputs are preprocessed (N, 3, S, S) float32."""

    def __init__(
        self,
        *,
        bundle: Bundle,
        runtime: str,
        precision: str,
        variant: str,
        trunk: Model | None,
        heads: dict[str, Model],
        runtime_info: dict[str, Any] | None = None,
    ) -> None:
        self.bundle = bundle
        self.runtime = runtime
        self.precision = precision
        self.variant = variant
        # What the runtime reports it runs (OpenVINO: device, inference_precision); {} for ONNX Runtime.
        self.runtime_info: dict[str, Any] = dict(runtime_info or {})
        self.merged = trunk is None  # heads are whole graphs (image -> logits), see Bundle.load(merged=True)
        self.preprocessing = bundle.preprocessing
        self.head_names: tuple[str, ...] = tuple(heads)
        self.labels: dict[str, tuple[str, ...]] = {h: bundle.heads[h] for h in heads}
        self._trunk = trunk
        self._heads = heads
        # Per head with stored statistics: its familiarity model and threshold (edgetl.device.head_stats);
        # records then say whether each image is unfamiliar. Not for merged graphs (no features).
        self.familiarity: dict[str, tuple[Any, float]] = {} if trunk is None else _familiarity(bundle, heads, variant)
        # Label unfamiliar images "unknown" (predict --reject-unfamiliar).
        self.reject_unfamiliar = False

    def __repr__(self) -> str:
        return f"Predictor({self.variant!r}, runtime={self.runtime!r}, heads={list(self.head_names)})"

    def preprocess(self, images: Iterable[Image.Image]) -> np.ndarray:
        """PIL images -> (N, 3, S, S) float32, exactly as in training (see :mod:`edgetl.core.preprocess`)."""
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
        if self._trunk is None:
            raise ConfigError("a merged predictor has no separate trunk; load without merged=True for features")
        return self._finite(self._trunk(self._check_input(x)), "features", None)

    def _finite(self, out: np.ndarray, what: str, head: str | None) -> np.ndarray:
        """``out``, refused when it holds NaN or infinity: a broken model (exploded training, a bad
        quantization, a std of zeros baked in) otherwise labels every image with class 0 and a NaN
        score. One check per batch: ~1 us on (32, 1000) logits, against milliseconds of inference."""
        if not np.isfinite(out).all():
            kind = "NaN" if np.isnan(out).any() else "infinity"
            where = f" for head {head}" if head is not None else ""
            raise BundleError(
                f"variant {self.variant} produced non-finite {what}{where} ({kind}); "
                "the model is broken: re-train or re-export it"
            )
        return out

    def logits(self, x: np.ndarray, heads: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Trunk once, then every selected head (or the loaded ones named) on the same features."""
        if self._trunk is None:  # merged graphs: image -> logits each
            x = self._check_input(x)
            return {name: self._finite(self._heads[name](x), "logits", name) for name in (heads or self._heads)}
        feats = self.features(x)
        return self.head_logits(feats, heads)

    def outputs(
        self, x: np.ndarray, heads: Sequence[str] | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Trunk once, then the heads: ``(logits, features)``; features are None for merged graphs.
        Pass both to :meth:`records` to get the unfamiliar flags."""
        if self._trunk is None:
            return self.logits(x, heads), None
        feats = self.features(x)
        return self.head_logits(feats, heads), feats

    def head_logits(self, features: np.ndarray, heads: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Heads only, on trunk features: {head: (N, C) logits} (bench times each head this way)."""
        if heads is None:
            heads = self.head_names
        unknown = [h for h in heads if h not in self._heads]
        if unknown:
            raise ConfigError(f"head {unknown[0]!r} is not loaded (loaded: {', '.join(self._heads)})")
        return {name: self._finite(self._heads[name](features), "logits", name) for name in heads}

    def predict(
        self, images: Sequence[str | os.PathLike | Image.Image], *, top_k: int = 5, batch_size: int = 32
    ) -> list[dict[str, Any]]:
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
            # Reduced to the model's resize size as soon as decoded: a batch holds small images.
            loaded = [
                im if isinstance(im, Image.Image) else load_image(im, self.preprocessing, gray_ok=True) for im in chunk
            ]
            records.extend(self._predict_loaded(names[start : start + batch_size], loaded, top_k))
        return records

    def _predict_loaded(self, names: list[str], images: list[Image.Image], top_k: int) -> list[dict[str, Any]]:
        logits, feats = self.outputs(self.preprocess(images))
        return self.records(names, logits, top_k, features=feats)

    def records(
        self, names: list[str], logits: dict[str, np.ndarray], top_k: int, *, features: np.ndarray | None = None
    ) -> list[dict[str, Any]]:
        """One record per image (``names``, one per row) and head of ``logits``, image-major, heads in
        the loaded order: ``{image, head, label, score, top_k: [{label, score}]}`` with softmax scores.
        With the trunk ``features`` of the same rows, a head with stored statistics adds
        ``unfamiliar`` (its familiarity score is above the threshold calibrated at export or learn)
        and ``unfamiliar_score`` (the score over the threshold: above 1 is unfamiliar); with
        :attr:`reject_unfamiliar` an unfamiliar image's label is ``unknown``.
        A head that returns the wrong number of classes is a :class:`BundleError`."""
        probs = {h: softmax(v) for h, v in logits.items()}
        ratios = {}
        if features is not None:
            for h in probs:
                if h in self.familiarity:
                    model, threshold = self.familiarity[h]
                    ratios[h] = model.score(features) / threshold
        records = []
        for head, p in probs.items():
            if p.ndim != 2 or p.shape[1] != len(self.labels[head]):
                raise BundleError(
                    f"bundle {self.bundle.path}: head {head!r} returns shape {p.shape} "
                    f"but has {len(self.labels[head])} labels; re-export the bundle"
                )
        heads = [h for h in self.head_names if h in probs]
        for i, name in enumerate(names):
            for head in heads:
                p, labels = probs[head][i], self.labels[head]
                order = np.argsort(-p, kind="stable")[: min(top_k, len(labels))]
                top = [{"label": labels[j], "score": float(p[j])} for j in order]
                record = {"image": name, "head": head, "label": top[0]["label"], "score": top[0]["score"], "top_k": top}
                if head in ratios:
                    ratio = float(ratios[head][i])
                    record["unfamiliar"] = unfamiliar = not ratio <= 1.0  # a NaN score is unfamiliar
                    record["unfamiliar_score"] = ratio if np.isfinite(ratio) else None
                    if unfamiliar and self.reject_unfamiliar:
                        record["label"] = UNKNOWN
                records.append(record)
        return records


UNKNOWN = "unknown"  # the label of an unfamiliar image with reject_unfamiliar


def _familiarity(bundle: Bundle, heads: Iterable[str], variant: str) -> dict[str, tuple[Any, float]]:
    """The familiarity model and threshold of each head that has them (read from its statistics file)."""
    from edgetl.device.head_stats import load_familiarity

    out = {}
    for h in heads:
        rec = bundle.manifest["heads"][h].get("familiarity")
        if rec is not None:
            # The variant's own threshold when export measured one (an int8 trunk scores higher).
            threshold = (rec.get("by_variant") or {}).get(variant, rec["threshold"])
            out[h] = (load_familiarity(bundle, h), float(threshold))
    return out


def _image_name(image: Any, index: int) -> str:
    return f"<image {index}>" if isinstance(image, Image.Image) else str(image)


def _check_positive(**values: int) -> None:
    """Bounded options (see :mod:`edgetl.device.limits`): one ConfigError line naming the flag."""
    for name, value in values.items():
        limits.check(name, value)


__all__ = ["UNKNOWN", "Predictor", "softmax"]
