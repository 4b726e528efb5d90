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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.core.imagefolder import Sample
from edgetl.core.preprocess import Preprocessing, load_image
from edgetl.workstation.featcache import CacheStats, FeatureCache, cached_features, default_cache_dir, model_key

if TYPE_CHECKING:
    from edgetl.workstation.weights import WeightsSource

log = logging.getLogger(__name__)

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
) -> np.ndarray:
    """One inference pass of ``trunk`` over ``samples`` -> float32 (N, D)."""
    import torch

    trunk.eval()
    out = []
    task = progress.add_task(description, total=len(samples), status="") if progress is not None else None
    with torch.inference_mode():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            x = torch.stack([transform(load_image(s.path)) for s in chunk]).to(device, non_blocking=True)
            if autocast is not None:
                with autocast():
                    f = trunk(x)
            else:
                f = trunk(x)
            out.append(f.float().cpu().numpy())
            if task is not None:
                progress.advance(task, len(chunk))
    return np.concatenate(out) if out else np.zeros((0, trunk.feature_dim), dtype=np.float32)


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
) -> tuple[np.ndarray, CacheStats]:
    """Features of ``samples`` under ``pp``'s eval transform, reusing every row already in the persistent cache.

    The transform is always ``pp``'s eval transform: the cache is keyed by ``pp``, so features of
    augmented images must never be stored in it.
    """
    from edgetl.workstation.prepare import eval_transform

    digest = weights_sha256 or trunk_digest(trunk)
    key = model_key(backbone, digest if weights_sha256 else None, pp.to_dict(), None if weights_sha256 else digest)
    cache = FeatureCache(
        settings.cache_dir or default_cache_dir(),
        key,
        meta={
            "backbone": backbone,
            "weights_sha256": weights_sha256,
            "trunk_digest": None if weights_sha256 else digest,
            "preprocessing": pp.to_dict(),
        },
    )
    transform = eval_transform(pp)

    def compute(indices: list[int]) -> np.ndarray:
        return run_trunk(
            trunk,
            [samples[i] for i in indices],
            transform,
            device=settings.device,
            batch_size=settings.batch_size,
            progress=progress,
            description=description,
            autocast=settings.autocast,
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
    spec, weights: str, samples: list[Sample], pp: Preprocessing, settings: FeatureSettings, *, progress, description
) -> tuple[np.ndarray, CacheStats, WeightsSource]:
    """Build ``spec``'s trunk with ``weights`` (imagenet, none or a file) and return its cached features.

    The trunk is dropped before returning; the probe and the study's shared trunk pass use this.
    """
    from edgetl.workstation.model import build_trunk
    from edgetl.workstation.weights import resolve_weights

    state_dict, source = resolve_weights(spec, weights)
    trunk = build_trunk(spec, state_dict).to(settings.device)
    del state_dict
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
