"""A persistent, memory-mapped cache of frozen-trunk features.

Feature extraction trains only a head, so the trunk's output for an image never changes as long as
the trunk (backbone + weights), the preprocessing and the image bytes do not. The cache is keyed by
exactly those: one folder per (backbone, weights sha256, preprocessing), and inside it one row per
image, found by the sha256 of the image file's content (renaming or moving files keeps the hits).

Layout (under ``$EDGETL_CACHE``, default ``~/.cache/edgetl/features``)::

    <model key>/meta.json                 what the key stands for
    <model key>/index.json                {image sha256: [shard name, row]}
    <model key>/shards/<name>.npy         float32 (rows, feature_dim), opened with mmap_mode="r"

Shards are written to a temporary name and renamed, then the index is replaced atomically, so an
interrupted extraction leaves a consistent cache (at worst an unreferenced shard file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.core.atomic import write_json_atomic
from edgetl.core.bundle import sha256_file

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    env = os.environ.get("EDGETL_CACHE")
    if env:
        return Path(env) / "features"
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "edgetl" / "features"


def model_key(
    backbone: str, weights_sha256: str | None, preprocessing: dict[str, Any], trunk_digest: str | None = None
) -> str:
    """Folder name for one trunk + preprocessing. Random-init trunks are keyed by their tensors' digest."""
    blob = json.dumps(
        {
            "v": CACHE_VERSION,
            "backbone": backbone,
            "weights": weights_sha256,
            "trunk": trunk_digest,
            "pp": preprocessing,
        },
        sort_keys=True,
    )
    return f"{backbone.replace(':', '-')}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"  # timm:x -> timm-x


@dataclasses.dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int

    @property
    def status(self) -> str:
        if self.misses == 0:
            return "hit"
        return "miss" if self.hits == 0 else "partial"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "hits": self.hits, "misses": self.misses}


class FeatureCache:
    def __init__(self, root: str | os.PathLike, key: str, meta: dict[str, Any] | None = None):
        self.dir = Path(root) / key
        (self.dir / "shards").mkdir(parents=True, exist_ok=True)
        if meta is not None and not (self.dir / "meta.json").exists():
            write_json_atomic(self.dir / "meta.json", meta)
        self._index: dict[str, list] = self._read_index()
        self._shards: dict[str, np.ndarray] = {}

    def _read_index(self) -> dict[str, list]:
        path = self.dir / "index.json"
        if not path.is_file():
            return {}
        try:
            index = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}  # a damaged index only costs a recomputation
        return {k: v for k, v in index.items() if (self.dir / "shards" / f"{v[0]}.npy").is_file()}

    def _shard(self, name: str) -> np.ndarray:
        if name not in self._shards:
            self._shards[name] = np.load(self.dir / "shards" / f"{name}.npy", mmap_mode="r")
        return self._shards[name]

    def lookup(self, digests: list[str]) -> list[bool]:
        return [d in self._index for d in digests]

    def add(self, digests: list[str], features: np.ndarray) -> None:
        """Store ``features`` (rows in the order of ``digests``) as one new shard."""
        if not digests:
            return
        name = uuid.uuid4().hex[:12]
        tmp = self.dir / "shards" / f".{name}.tmp.npy"
        np.save(tmp, np.ascontiguousarray(features, dtype=np.float32))
        os.replace(tmp, self.dir / "shards" / f"{name}.npy")
        # Re-read so that concurrent writers (two runs on one machine) do not drop each other's rows.
        index = self._read_index()
        index.update({d: [name, i] for i, d in enumerate(digests)})
        write_json_atomic(self.dir / "index.json", index)
        self._index = index

    def gather(self, digests: list[str], out: np.ndarray) -> np.ndarray:
        """Copy the cached rows for ``digests`` into ``out`` (RAM or a np.memmap), in order."""
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for i, d in enumerate(digests):
            shard, row = self._index[d]
            by_shard.setdefault(shard, []).append((i, row))
        for shard, pairs in by_shard.items():
            dst = np.fromiter((p[0] for p in pairs), dtype=np.int64, count=len(pairs))
            src = np.fromiter((p[1] for p in pairs), dtype=np.int64, count=len(pairs))
            order = np.argsort(src)  # sequential reads from the memory map
            out[dst[order]] = self._shard(shard)[src[order]]
        return out


def cached_features(
    cache: FeatureCache,
    paths: list[str],
    compute: Callable[[list[int]], np.ndarray],
    feature_dim: int,
) -> tuple[np.ndarray, CacheStats]:
    """Features for ``paths``: cached rows are reused, ``compute(indices)`` fills the rest and is stored."""
    digests = [sha256_file(p) for p in paths]
    present = cache.lookup(digests)
    missing = [i for i, hit in enumerate(present) if not hit]
    if missing:
        # Duplicate files (same bytes) are computed once.
        first: dict[str, int] = {}
        for i in missing:
            first.setdefault(digests[i], i)
        todo = sorted(first.values())
        cache.add([digests[i] for i in todo], compute(todo))
    out = np.empty((len(paths), feature_dim), dtype=np.float32)
    cache.gather(digests, out)
    return out, CacheStats(hits=sum(present), misses=len(missing))
