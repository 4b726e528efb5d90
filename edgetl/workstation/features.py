"""Frozen-trunk features: computed once (and cached on disk), or on the fly every epoch.

Feature extraction's promise is speed: the trunk is frozen, so its output per image is a constant
that need not be recomputed each epoch, nor for each new head setting on the same data. The
persistent cache (:mod:`edgetl.workstation.featcache`) makes a second run on the same images cost no trunk pass
at all. :class:`OnTheFlyFeatures` is the ``--no-feature-cache`` path, which runs the trunk on every
batch (needed when augmenting, and the baseline of the speed-up benchmark).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.core.imagefolder import Sample
from edgetl.core.preprocess import Preprocessing, load_image, preprocess
from edgetl.workstation.featcache import CacheStats, FeatureCache, cached_features, default_cache_dir, model_key
from edgetl.workstation.prefix import FP16_MAX  # the prefix's activations are kept in float16

if TYPE_CHECKING:
    from edgetl.workstation.weights import WeightsSource

log = logging.getLogger(__name__)

# Bump when the augmented views' transform changes: cached views of the old one are then not reused.
AUGMENTATION_VERSION = 1
# Above this many bytes the gathered training features live in a memory-mapped file, not in RAM.
IN_MEMORY_LIMIT = 2 << 30


def trunk_digest(trunk) -> str:
    """Digest of a trunk's tensors: the cache key of random-init trunks (seeded, so reproducible)."""
    h = hashlib.sha256()
    for name, t in sorted(trunk.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_trunk(
    trunk,
    samples: list[Sample],
    transform,
    *,
    device,
    batch_size: int,
    progress=None,
    description="trunk features",
    autocast=None,
    transforms: Callable[[int], Any] | None = None,
    per_batch: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """One inference pass of the frozen ``trunk`` over ``samples`` -> float32 (N, D).

    ``per_batch(start, output)``, when given, maps each batch's output (its first sample at
    ``start``) to the rows kept (a :class:`PrefixCapture` takes the prefix's part out of each batch,
    so the pass never holds every image's activations).

    On the CPU the trunk runs through ONNX Runtime (:func:`edgetl.workstation.fast_trunk.frozen_runner`,
    checked against torch, ~5x faster than eager torch for MobileNetV2 on 2 cores). ``transforms``,
    when given, maps a sample's position to its own transform (augmented views); else ``transform``.
    """
    import torch

    from edgetl.workstation.fast_trunk import frozen_runner

    def batch(start: int):
        chunk = samples[start : start + batch_size]
        pick = (lambda j: transforms(start + j)) if transforms else (lambda j: transform)
        return torch.stack([pick(j)(load_image(s.path)) for j, s in enumerate(chunk)])

    trunk.eval()
    out = []
    runner = None
    task = progress.add_task(description, total=len(samples), status="") if progress is not None else None
    starts = range(0, len(samples), batch_size)
    # The next batch is decoded and transformed in a thread while the trunk runs on this one: both
    # take about as long (~2 ms an image each for MobileNetV2 at 96 px on 2 cores).
    with torch.inference_mode(), ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(batch, starts[0]) if len(starts) else None
        for k in range(len(starts)):
            x = pending.result()
            pending = pool.submit(batch, starts[k + 1]) if k + 1 < len(starts) else None
            if runner is None:
                runner = frozen_runner(trunk, x[:8], device, autocast=autocast)
            y = runner(x).float().cpu().numpy()
            out.append(per_batch(starts[k], y) if per_batch is not None else y)
            if task is not None:
                progress.advance(task, len(x))
    return np.concatenate(out) if out else np.zeros((0, trunk.feature_dim), dtype=np.float32)


@dataclasses.dataclass
class PrefixCapture:
    """Keep, while features are computed, the frozen prefix's output for some images: ``module`` is
    an :class:`edgetl.workstation.model.TrunkWithPrefix` of the trunk; ``wanted`` are positions in the
    samples of the pass; ``acts`` (filled) maps each wanted position the pass computed (not a cache
    hit) to its activation, float16 (C, H, W)."""

    module: Any
    wanted: set[int]
    acts: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    """How a frozen trunk runs over images: where, in what batches and precision, and which cache it fills.

    None of these change the features' cache key (the trunk and its preprocessing do).
    """

    device: Any
    batch_size: int
    cache_dir: str | Path | None = None  # None: default_cache_dir()
    autocast: Callable[[], Any] | None = None  # a context factory (torch.autocast) or None for fp32


def cached_trunk_features(
    trunk,
    samples: list[Sample],
    *,
    backbone: str,
    weights_sha256: str | None,
    pp: Preprocessing,
    settings: FeatureSettings,
    progress=None,
    description: str = "trunk features",
    view: tuple[Any, int] | None = None,
    prefix: PrefixCapture | None = None,
) -> tuple[np.ndarray, CacheStats]:
    """Features of ``samples`` under ``pp``, reusing every row already in the persistent cache.

    ``prefix``: the images computed (cache misses) also give their frozen prefix's output (one pass
    for both; ``--strategy auto``'s comparison reads it).

    Without ``view`` the transform is ``pp``'s eval transform. ``view=(views, v)`` (a
    :class:`edgetl.workstation.prefix.Views` and a view number >= 1) gives augmented view ``v`` of
    every image instead, cached under its own key (the augmentation's settings and ``v``), so the
    plain features are never mixed with augmented ones and a second run reuses both.
    """
    digest = weights_sha256 or trunk_digest(trunk)
    keyed_pp = pp.to_dict()
    transforms = None
    if view is not None and view[1] > 0:
        views, number = view
        # The augmentation's settings (not the view count: view 3 of 4 is view 3 of 8) and the view's number.
        spec = {k: v for k, v in dataclasses.asdict(views).items() if k != "count"}
        keyed_pp = {**keyed_pp, "view": {**spec, "augmentation": AUGMENTATION_VERSION, "number": number}}

        def transforms(i: int, _views=views, _number=number):
            return _views.transform(pp, _number, i)

    if getattr(trunk, "taps", ()):  # multi-layer features: keyed apart (the last-map key is as before)
        keyed_pp = {**keyed_pp, "taps": list(trunk.taps)}
    key = model_key(backbone, digest if weights_sha256 else None, keyed_pp, None if weights_sha256 else digest)
    cache = FeatureCache(
        settings.cache_dir or default_cache_dir(),
        key,
        meta={
            "backbone": backbone,
            "weights_sha256": weights_sha256,
            "trunk_digest": None if weights_sha256 else digest,
            "preprocessing": keyed_pp,
        },
    )

    def transform(img):  # the eval transform in numpy (tests/test_preprocess.py: equal to torchvision's)
        import torch

        return torch.from_numpy(preprocess(img, pp))

    def keep_prefix(indices: list[int], start: int, out: np.ndarray) -> np.ndarray:
        shape = prefix.module.prefix_shape
        for j in range(len(out)):
            i = indices[start + j]
            if i in prefix.wanted:
                act = np.clip(out[j, trunk.feature_dim :], -FP16_MAX, FP16_MAX)
                prefix.acts[i] = act.astype(np.float16).reshape(shape)
        return out[:, : trunk.feature_dim]

    def compute(indices: list[int]) -> np.ndarray:
        return run_trunk(
            trunk if prefix is None else prefix.module,
            [samples[i] for i in indices],
            transform,
            device=settings.device,
            batch_size=settings.batch_size,
            progress=progress,
            description=description,
            autocast=settings.autocast,
            transforms=(lambda j: transforms(indices[j])) if transforms else None,
            per_batch=(lambda start, out: keep_prefix(indices, start, out)) if prefix is not None else None,
        )

    feats, stats = cached_features(cache, [s.path for s in samples], compute, trunk.feature_dim)
    log.info(
        "%s: feature cache %s (%d cached, %d computed) in %s",
        description,
        stats.status,
        stats.hits,
        stats.misses,
        cache.dir,
    )
    return feats, stats


def backbone_features(
    spec,
    weights: str,
    samples: list[Sample],
    pp: Preprocessing,
    settings: FeatureSettings,
    *,
    progress,
    description,
    blocks: bool = False,
) -> tuple[np.ndarray, CacheStats, WeightsSource]:
    """Build ``spec``'s trunk with ``weights`` (imagenet, none or a file) and return its cached features
    (``blocks``: every block's, as ``--features blocks``, where the trunk can be tapped).

    The trunk is dropped before returning; the probe and the study's shared trunk pass use this.
    """
    from edgetl.workstation.model import build_trunk, tap_positions
    from edgetl.workstation.weights import resolve_weights

    state_dict, source = resolve_weights(spec, weights)
    trunk = build_trunk(spec, state_dict).to(settings.device)
    del state_dict
    if blocks:
        trunk.set_taps(tap_positions(trunk) or ())
    feats, stats = cached_trunk_features(
        trunk,
        samples,
        backbone=spec.name,
        weights_sha256=source.sha256,
        pp=pp,
        settings=settings,
        progress=progress,
        description=description,
    )
    return feats, stats, source


class OnTheFlyFeatures:
    """Indexable like a feature tensor, but runs the frozen trunk on the images each time."""

    def __init__(self, trunk, samples: list[Sample], transform, device):
        self.trunk, self.samples, self.transform, self.device = trunk, samples, transform, device

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx):
        import torch

        x = torch.stack([self.transform(load_image(self.samples[int(i)].path)) for i in idx]).to(self.device)
        self.trunk.eval()
        with torch.inference_mode():
            return self.trunk(x).float().cpu()
