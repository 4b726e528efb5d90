"""A head's feature statistics: what lets the device add classes without the original images and
flag inputs unlike anything the head was trained on.

Stored per head in ``stats/<head>.npz`` (numpy arrays only, read with ``allow_pickle=False`` after
the bundle's checksums are verified; every shape and value is checked against the manifest):

- ``means`` (C, D) float32 and ``counts`` (C,): class means of the trunk features of every training
  image, and how many images each mean is over;
- ``exemplars`` (<= E per class, D) float16 and ``exemplar_labels``: a seeded, stratified sample of
  training features, what ``edgetl learn --extend`` retrains the old classes on (docs/on-device.md
  has the measured trade-off between E, the bundle's size and old-class accuracy);
- ``val`` (<= V per class, D) float16 and ``val_labels``: held-out validation features, on which
  ``learn --extend`` reports the old classes' accuracy before and after;
- the familiarity model's arrays (``fam_*``: shared within-class covariance in low rank, see
  :mod:`edgetl.device.familiarity`), whose threshold is in the manifest's ``familiarity`` record.

The manifest records the file (role ``stats``, format ``npz``) and per head ``stats`` (the file and
the trunk variant the features came from), ``familiarity`` (method, threshold, acceptance rate) and
``origin`` (where the head was trained).
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.core.bundle import file_record
from edgetl.core.errors import BundleError
from edgetl.core.formats import FORMATS, STATS_FORMAT, variant_name
from edgetl.device import familiarity as fam

EXEMPLARS_PER_CLASS = 50  # docs/on-device.md: old-class accuracy against size, measured
VAL_PER_CLASS = 30
ACCEPTANCE = 0.95
RANK = 64
SHRINKAGE = 0.1
MAX_CLASSES = 10_000
MAX_ROWS = 1_000_000
_KEYS = ("means", "counts", "exemplars", "exemplar_labels", "val", "val_labels")


@dataclasses.dataclass(frozen=True)
class HeadStats:
    """One head's feature statistics (see the module docstring); ``familiarity`` scores features."""

    means: np.ndarray
    counts: np.ndarray
    exemplars: np.ndarray
    exemplar_labels: np.ndarray
    val: np.ndarray
    val_labels: np.ndarray
    familiarity: fam.Familiarity

    def arrays(self) -> dict[str, np.ndarray]:
        out = {k: getattr(self, k) for k in _KEYS}
        out.update({f"fam_{k}": v for k, v in self.familiarity.to_arrays().items()})
        return out

    @property
    def nbytes(self) -> int:
        return sum(int(v.nbytes) for v in self.arrays().values())


def stratified_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``per_class`` rows of each class, seeded, in class order."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picks.append(np.sort(rng.permutation(idx)[:per_class]))
    return np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)


def build_stats(
    train: np.ndarray,
    train_labels: np.ndarray,
    val: np.ndarray | None,
    val_labels: np.ndarray | None,
    n_classes: int,
    *,
    exemplars: int = EXEMPLARS_PER_CLASS,
    val_per_class: int = VAL_PER_CLASS,
    acceptance: float = ACCEPTANCE,
    seed: int = 0,
) -> tuple[HeadStats, dict[str, Any]]:
    """The statistics of one head from its training (and validation) features, and its manifest
    ``familiarity`` record: the threshold that accepts ``acceptance`` of the validation images (of
    the training images when there are none; then it is optimistic, and the record says so)."""
    train = np.asarray(train, dtype=np.float32)
    train_labels = np.asarray(train_labels, dtype=np.int64)
    model = fam.fit(train, train_labels, n_classes, rank=RANK, shrinkage=SHRINKAGE)
    counts = np.bincount(train_labels, minlength=n_classes).astype(np.int64)
    held_out = val is not None and len(val) > 0
    if held_out:
        val = np.asarray(val, dtype=np.float32)
        val_labels = np.asarray(val_labels, dtype=np.int64)
    else:
        val, val_labels = train, train_labels
    scores = model.score(val)
    threshold = fam.threshold_for(scores, acceptance)
    ex = stratified_subset(train_labels, exemplars, seed)
    vs = stratified_subset(val_labels, val_per_class, seed)
    stats = HeadStats(
        means=model.means.astype(np.float32),
        counts=counts,
        exemplars=train[ex].astype(np.float16),
        exemplar_labels=train_labels[ex].astype(np.int32),
        val=val[vs].astype(np.float16),
        val_labels=val_labels[vs].astype(np.int32),
        familiarity=model,
    )
    record = {
        "method": "mahalanobis",
        "detail": f"squared Mahalanobis distance to the nearest class mean over D, shared within-class "
        f"covariance of rank {model.basis.shape[1]} plus isotropic rest, {SHRINKAGE:g} shrinkage to scaled identity",
        "threshold": float(threshold),
        "acceptance": float(acceptance),
        "calibrated_on": "validation" if held_out else "training",
        "images": len(scores),
    }
    return stats, record


def write_stats(
    bundle_dir: Path,
    manifest: dict[str, Any],
    head: str,
    stats: HeadStats,
    familiarity: dict[str, Any],
    *,
    trunk_variant: str,
) -> str:
    """Write ``stats/<head>.npz`` into ``bundle_dir`` (a bundle being written) and record it and the
    head's ``stats`` and ``familiarity`` in ``manifest`` (the caller writes the manifest)."""
    rel = f"stats/{head}.npz"
    path = bundle_dir / rel
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **stats.arrays())
    tmp.replace(path)
    manifest["files"][rel] = file_record(
        bundle_dir,
        rel,
        fmt=STATS_FORMAT,
        precision="fp16",
        role="stats",
        head=head,
        inputs=[],
        outputs=[],
        derived_from=manifest["variants"][trunk_variant]["trunk"],
    )
    manifest["heads"][head]["stats"] = {
        "file": rel,
        "trunk_variant": trunk_variant,
        "classes": len(stats.means),
        "exemplars": len(stats.exemplars),
        "val": len(stats.val),
        "bytes": manifest["files"][rel]["bytes"],
    }
    manifest["heads"][head]["familiarity"] = familiarity
    return rel


def reference_variant(manifest: dict[str, Any]) -> str:
    """The variant whose trunk the statistics are computed with: onnx-fp32 when the bundle has it, else
    the first fp32 variant, else the first variant (features of other variants are close: their trunk's
    feature SQNR is in the manifest)."""
    names = list(manifest["variants"])
    preferred = [variant_name("onnx", "fp32"), *(n for n in names if manifest["variants"][n]["precision"] == "fp32")]
    return next((n for n in preferred if n in manifest["variants"]), names[0])


def load_stats(bundle, head: str) -> HeadStats:
    """The verified statistics of ``head``; a bundle without them gets one line saying to re-export."""
    arrays, where = _read_arrays(bundle, head)
    return stats_from_arrays(arrays, len(bundle.heads[head]), int(bundle.manifest["backbone"]["feature_dim"]), where)


def load_familiarity(bundle, head: str) -> fam.Familiarity:
    """Only the familiarity model of ``head`` (what every predictor loads: the exemplar and validation
    features stay on disk), checked against the head's classes and the trunk's features."""
    arrays, where = _read_arrays(bundle, head, prefix="fam_")
    return _familiarity_of(arrays, len(bundle.heads[head]), int(bundle.manifest["backbone"]["feature_dim"]), where)


def _read_arrays(bundle, head: str, prefix: str = "") -> tuple[dict[str, np.ndarray], str]:
    """The arrays of ``head``'s statistics file whose names start with ``prefix``, and how to name the file."""
    rec = bundle.manifest["heads"].get(head, {}).get("stats")
    if rec is None:
        raise BundleError(
            f"bundle {bundle.path}: head {head!r} has no stored feature statistics (bundles exported before "
            "edgetl learn, or heads added without them); re-export the bundle with `edgetl export`"
        )
    where = f"bundle {bundle.path}: {rec['file']}"
    try:
        with np.load(bundle.path / rec["file"], allow_pickle=False) as z:
            return {k: z[k] for k in z.files if k.startswith(prefix)}, where
    except (OSError, ValueError) as exc:
        raise BundleError(f"{where} cannot be read ({exc}); copy or export the bundle again") from None


def _familiarity_of(arrays: dict[str, np.ndarray], n_classes: int, dim: int, where: str) -> fam.Familiarity:
    model = fam.Familiarity.from_arrays({k[4:]: v for k, v in arrays.items() if k.startswith("fam_")})
    if model.means.shape != (n_classes, dim):
        raise BundleError(
            f"{where}: the familiarity model does not match the head's classes and features; re-export the bundle"
        )
    return model


def stats_from_arrays(arrays: dict[str, np.ndarray], n_classes: int, dim: int, where: str) -> HeadStats:
    """Check every array (kind, shape, finite, labels in range, bounded sizes) and build HeadStats."""

    def bad(what: str) -> BundleError:
        return BundleError(f"{where}: {what}; re-export the bundle")

    missing = [k for k in _KEYS if k not in arrays]
    if missing:
        raise bad(f"no {missing[0]!r} array")
    for k in ("means", "exemplars", "val"):
        a = arrays[k]
        if a.dtype.kind != "f" or a.ndim != 2 or a.shape[1] != dim or len(a) > MAX_ROWS:
            raise bad(f"{k} must be a float array of shape (rows, {dim})")
        if not np.isfinite(a).all():
            raise bad(f"{k} holds NaN or infinity")
    if len(arrays["means"]) != n_classes:
        raise bad(f"means has {len(arrays['means'])} rows for {n_classes} labels")
    for k, rows in (
        ("counts", n_classes),
        ("exemplar_labels", len(arrays["exemplars"])),
        ("val_labels", len(arrays["val"])),
    ):
        a = arrays[k]
        if a.dtype.kind not in "iu" or a.shape != (rows,):
            raise bad(f"{k} must be {rows} integers")
    for k in ("exemplar_labels", "val_labels"):
        if len(arrays[k]) and (arrays[k].min() < 0 or arrays[k].max() >= n_classes):
            raise bad(f"{k} holds a class outside 0..{n_classes - 1}")
    if (arrays["counts"] < 0).any() or arrays["counts"].max(initial=0) > MAX_ROWS * 1000:
        raise bad("counts must be image counts")
    model = _familiarity_of(arrays, n_classes, dim, where)
    return HeadStats(
        means=arrays["means"].astype(np.float32),
        counts=arrays["counts"].astype(np.int64),
        exemplars=arrays["exemplars"],
        exemplar_labels=arrays["exemplar_labels"].astype(np.int64),
        val=arrays["val"],
        val_labels=arrays["val_labels"].astype(np.int64),
        familiarity=model,
    )


BATCH = 32


def image_features(predictor, paths: list[str], advance=None) -> np.ndarray:
    """Trunk features (N, D) float32 of image files through ``predictor`` (decoded and preprocessed as
    the bundle says), in batches; ``advance(n)`` is called after each batch (progress)."""
    from edgetl.core.preprocess import load_image

    out = []
    for i in range(0, len(paths), BATCH):
        chunk = paths[i : i + BATCH]
        x = predictor.preprocess([load_image(p, predictor.preprocessing) for p in chunk])
        out.append(predictor.features(x))
        if advance is not None:
            advance(len(chunk))
    dim = int(predictor.bundle.manifest["backbone"]["feature_dim"])
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, dim), np.float32)


def add_stats(
    bundle_dir: Path,
    manifest: dict[str, Any],
    head: str,
    train_paths: list[str],
    train_labels: np.ndarray,
    val_x: np.ndarray,
    val_labels: np.ndarray,
    *,
    progress=None,
) -> dict[str, Any]:
    """Compute and store the statistics of ``head`` in the bundle being written at ``bundle_dir``
    (export and ``export --add-to``; ``manifest`` is its manifest, updated here and written by the
    caller): training images (paths) and preprocessed validation images through the reference
    variant's trunk (:func:`reference_variant`), loaded through the device runtime. Returns the head's
    ``stats`` record."""
    from edgetl.device.bundle_loading import Bundle

    bundle = Bundle(bundle_dir, manifest)
    ref = reference_variant(manifest)
    var = manifest["variants"][ref]
    predictor = bundle.load(runtime=FORMATS[var["format"]].runtime, precision=var["precision"], heads=[head])
    advance = None
    if progress is not None:
        task = progress.add_task(f"feature statistics of head {head} ({ref})", total=len(train_paths), status="")
        advance = lambda n: progress.advance(task, n)  # noqa: E731
    train = image_features(predictor, list(train_paths), advance)
    val = [predictor.features(val_x[i : i + BATCH]) for i in range(0, len(val_x), BATCH)]
    stats, record = build_stats(
        train, train_labels, np.concatenate(val) if val else None, val_labels, len(bundle.heads[head])
    )
    if len(val_x):
        known = {var["trunk"]: record["threshold"]}  # the reference trunk's, from the features above
        record["by_variant"] = _variant_thresholds(bundle, head, stats, val_x, record["acceptance"], known)
    write_stats(bundle_dir, manifest, head, stats, record, trunk_variant=ref)
    return manifest["heads"][head]["stats"]


def _variant_thresholds(
    bundle, head: str, stats: HeadStats, val_x: np.ndarray, acceptance: float, known: dict[str, float]
) -> dict[str, float]:
    """The threshold for each variant that holds ``head``, on the validation images through that
    variant's own trunk: an int8 trunk's features score a little higher (measured on digits: 88-91%
    of images accepted at the fp32 threshold instead of 95%), so each variant gets its own. ``known``:
    trunk file -> threshold already measured (each trunk runs over the images once)."""
    out: dict[str, float] = {}
    by_trunk = dict(known)
    for name, var in bundle.manifest["variants"].items():
        if head not in var["heads"]:
            continue
        if var["trunk"] not in by_trunk:
            predictor = bundle.load(runtime=FORMATS[var["format"]].runtime, precision=var["precision"], heads=[head])
            feats = np.concatenate([predictor.features(val_x[i : i + BATCH]) for i in range(0, len(val_x), BATCH)])
            by_trunk[var["trunk"]] = float(fam.threshold_for(stats.familiarity.score(feats), acceptance))
        out[name] = by_trunk[var["trunk"]]
    return out


def origin_record(where: str, *, images: int, trunk_variant: str | None, run: str | None = None) -> dict[str, Any]:
    """A head's ``origin``: where it was trained (``workstation`` or ``device``), on how many images,
    through which trunk variant, when."""
    return {
        "where": where,
        "run": run,
        "trunk_variant": trunk_variant,
        "images": int(images),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
