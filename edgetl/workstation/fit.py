"""The default training paths: a searched head on cached features, preprocessing chosen for the data,
augmented views, the cached-prefix fine-tune, and ``--strategy auto`` deciding between them.

Everything that is *chosen* here is chosen on the training split only, by cross-validation
(:mod:`edgetl.workstation.head_search`) or on a held-out part of the training split; the validation
split is computed once at the end and reported, never used to choose.

* **Features** (``--features``, :func:`edgetl.workstation.train.use_features`): the head sees every
  trunk block's output, pooled and concatenated (``blocks``, multi-layer features), not only the last
  feature map. Early blocks carry strokes, edges and textures that ImageNet's last layer has pooled
  away; on small images unlike ImageNet's the searched head gains 2-3 pp from them (docs/training.md).
  The trunk pass costs the same; the head is wider (2,816 features for MobileNetV2, not 1,280).
* **Crop** (``--crop``): ``center`` is the backbone's ImageNet-style resize then centre crop, ``none``
  resizes the shorter side to the input size (a square image keeps all of its picture). ``compare``
  cross-validates a head on the features of each, on up to :data:`CROP_SAMPLE` training images (the
  second crop's trunk pass covers only those), and keeps the better; ``auto`` compares when the
  training images are no larger than the resize (the crop then cuts picture, not margin) and keeps
  ``center`` for larger photographs.
* **Views** (``--views K``): each training image is cached as K views, the plain one and K-1 random
  crops with mild colour jitter (flips only with ``--hflip``); the head is searched and trained on all
  of them, folds keeping an image's views together and scoring only plain views.
* **Fine-tune** (:mod:`edgetl.workstation.prefix`): the frozen blocks run once per view (through ONNX
  Runtime on the CPU) and every epoch trains only the unfrozen blocks + head on their cached output,
  from a fresh head (a start from the searched linear head, linear probe then fine-tune, ended 0.5-4 pp
  lower on the digits and the patches). Then the head is searched again, like feature extraction's,
  on the fine-tuned trunk's features (taps included) of the plain training views
  (:func:`refit_head`), and replaces the one trained with the blocks.
* **auto**: a budgeted comparison on up to :data:`AUTO_SAMPLE` training images: the searched
  feature-extraction head and a cached-prefix fine-tune (one view, half the epochs, its head searched
  again after) are both trained on 80% of them and scored on the other 20%; fine-tune is chosen only
  when it wins by at least :data:`AUTO_MARGIN` and a sign test on the images only one of them got
  right gives p < :data:`AUTO_ALPHA` (a fine-tuned trunk serves one task; a frozen one can carry many
  heads). When feature extraction got so few held-out images wrong that no fine-tune could win that
  way, none runs.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import statistics
import time
from typing import Any

import numpy as np

from edgetl.core.imagefolder import Sample
from edgetl.core.preprocess import Preprocessing

log = logging.getLogger(__name__)

AUTO_MARGIN = 0.01  # fine-tune must beat feature extraction by 1 pp on the held-out part of the training split
AUTO_ALPHA = 0.05  # ... and significantly: a one-sided exact sign test on the images the two disagree on
AUTO_HOLDOUT = 0.2
AUTO_SAMPLE = 600  # training images auto compares the two strategies on (its budget)
AUTO_MIN_PER_CLASS = 5  # images per class below which auto does not compare (the hold-out would be 1 image)
SIZE_SAMPLE = 200  # training images whose size decides --crop auto
CROP_MARGIN = 0.01  # resize-only must beat the centre crop by 1 pp cross-validated top-1
CROP_SAMPLE = 600  # training images the crops are compared on (the second crop's trunk pass covers only these)
ACTIVATION_MEMORY_ENV = "EDGETL_ACTIVATION_MEMORY"  # MiB for the cached fine-tune's activations
DEFAULT_ACTIVATION_MEMORY = 4 << 30


def activation_memory_budget() -> int:
    """Bytes the cached fine-tune may keep in memory: ``EDGETL_ACTIVATION_MEMORY`` (MiB) or 4 GiB."""
    from edgetl.workstation.prefix import memory_budget

    return memory_budget(ACTIVATION_MEMORY_ENV, DEFAULT_ACTIVATION_MEMORY)


def crop_variant(pp: Preprocessing, crop: str) -> Preprocessing:
    """``pp`` with crop ``center`` (as given) or ``none`` (resize the shorter side to the input size)."""
    return pp if crop == "center" else dataclasses.replace(pp, resize_size=pp.input_size)


def stratified_sample(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted positions of about ``size`` rows drawn per class in proportion (at least 2 of a class
    that has them); every position when there are no more than ``size`` rows."""
    n = len(labels)
    if n <= size:
        return np.arange(n)
    rng = np.random.default_rng(seed + 31)
    pick = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        take = min(len(idx), max(2, round(size * len(idx) / n)))
        pick.extend(rng.choice(idx, take, replace=False))
    return np.sort(np.array(pick, dtype=np.int64))


def median_short_side(samples: list[Sample], seed: int = 0) -> int | None:
    """Median shorter side of (up to :data:`SIZE_SAMPLE` of) the images, read from their headers."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pick = samples if len(samples) <= SIZE_SAMPLE else [samples[i] for i in rng.choice(len(samples), SIZE_SAMPLE)]
    sides = []
    for s in pick:
        try:
            with Image.open(s.path) as img:
                sides.append(min(img.size))
        except OSError:
            continue
    return int(statistics.median(sides)) if sides else None


def crop_candidates(mode: str, pp: Preprocessing, samples: list[Sample], seed: int) -> tuple[list[str], str]:
    """The crops to try for ``--crop mode`` and why, in one line."""
    if mode in ("center", "none"):
        return [mode], f"--crop {mode}"
    if mode == "compare":
        return ["center", "none"], "--crop compare"
    side = median_short_side(samples, seed)
    if side is not None and side <= pp.resize_size:
        return ["center", "none"], (
            f"the images' median shorter side ({side} px) is no larger than the resize ({pp.resize_size} px): "
            "cropping would cut picture, so both are compared"
        )
    return ["center"], (
        f"the images' median shorter side ({side} px) is larger than the resize ({pp.resize_size} px): "
        "the backbone's centre crop"
    )


@dataclasses.dataclass
class FeatureFit:
    """What the searched feature-extraction path produced (the head is loaded into the caller's)."""

    pp: Preprocessing
    search: Any  # HeadSearchResult (None: fit_features(head=False) without a crop comparison)
    crop: dict[str, Any]
    ftr: np.ndarray  # plain training features (n, dim) under pp
    cache: dict[str, Any]
    seconds: dict[str, float]
    # The validation images' trunk pass, run only when the run ends as feature extraction (a
    # fine-tune scores its validation images through the cached prefix instead): val_features().
    val_pass: Any = dataclasses.field(default=None, repr=False)
    fval: np.ndarray | None = None
    # auto: the frozen prefix's output of (some of) the comparison's sample under pp, by training
    # position, kept by the feature pass (images that were cache hits are missing)
    prefix_acts: dict[int, np.ndarray] | None = dataclasses.field(default=None, repr=False)

    def val_features(self) -> np.ndarray:
        """The validation images' features under ``pp`` (computed on the first call); the feature
        cache's record counts them from then on."""
        if self.fval is None:
            self.fval, stats = self.val_pass()
            self.cache = _cache_record(self.cache["hits"] + stats.hits, self.cache["misses"] + stats.misses)
        return self.fval


def _cache_record(hits: int, misses: int) -> dict[str, Any]:
    return {"status": "hit" if not misses else ("miss" if not hits else "partial"), "hits": hits, "misses": misses}


def _features(trunk, samples, pp, ctx, *, description, view=None, prefix=None):
    from edgetl.workstation.features import cached_trunk_features

    return cached_trunk_features(
        trunk,
        samples,
        backbone=ctx["backbone"],
        weights_sha256=ctx["weights_sha256"],
        pp=pp,
        settings=ctx["settings"],
        progress=ctx["progress"],
        description=description,
        view=view,
        prefix=prefix,
    )


def _capture_module(trunk, cfg, pp: Preprocessing):
    """The trunk with its frozen prefix's output appended (:class:`~edgetl.workstation.model.TrunkWithPrefix`),
    for ``--strategy auto``'s comparison to read from the feature pass; None when it cannot be cut."""
    from edgetl.workstation.model import TrunkWithPrefix
    from edgetl.workstation.prefix import split_trunk

    split = split_trunk(trunk, cfg.unfreeze)
    if split is None or len(split.prefix) == 0:
        return None
    try:
        return TrunkWithPrefix(trunk, len(split.prefix), pp.input_size)
    except ValueError:
        return None


def fit_features(trunk, prepared, cfg, pp: Preprocessing, ctx: dict[str, Any], *, head: bool = True) -> FeatureFit:
    """Searched feature extraction: choose the crop, cache the views, search the head (training split
    only). ``head=False`` (a fine-tune): only the crop is chosen; ``search`` is the crop comparison's
    search of the chosen crop, or None when there was no comparison."""
    from edgetl.workstation.features import PrefixCapture
    from edgetl.workstation.head_search import search_head
    from edgetl.workstation.prefix import Views

    t0 = time.perf_counter()
    ytr = np.array([s.label for s in prepared.train], dtype=np.int64)
    n_classes = len(prepared.labels)
    crops, why = crop_candidates(cfg.crop, pp, prepared.train, cfg.seed)
    hits = misses = 0
    per_crop: dict[str, tuple[Preprocessing, np.ndarray]] = {}
    searches: dict[str, Any] = {}  # crop -> its head search on the plain views (reused with one view)
    table = []
    # auto's comparison fine-tunes on its sample's prefix activations: the feature passes keep them.
    module = _capture_module(trunk, cfg, pp) if cfg.strategy == "auto" else None
    auto_sample = set(stratified_sample(ytr, AUTO_SAMPLE, cfg.seed).tolist())
    prefix_acts: dict[str, dict[int, np.ndarray]] = {}
    # The crops are compared on (up to) CROP_SAMPLE training images; only the first crop's features
    # cover every image from the start.
    sample = stratified_sample(ytr, CROP_SAMPLE, cfg.seed) if len(crops) > 1 else np.arange(len(ytr))
    for crop in crops:
        cpp = crop_variant(pp, crop)
        positions = np.arange(len(ytr)) if crop == crops[0] else sample
        rows = [prepared.train[i] for i in positions]
        capture = None
        if module is not None:
            capture = PrefixCapture(module, {j for j, i in enumerate(positions.tolist()) if i in auto_sample})
        feats, stats = _features(
            trunk, rows, cpp, ctx, description=f"trunk features (train, crop {crop})", prefix=capture
        )
        if capture is not None:
            prefix_acts[crop] = {int(positions[j]): act for j, act in capture.acts.items()}
        hits, misses = hits + stats.hits, misses + stats.misses
        per_crop[crop] = (cpp, feats)
        if len(crops) > 1:
            compared = feats[sample] if crop == crops[0] else feats
            result = search_head(compared, ytr[sample], n_classes, folds=cfg.folds, seed=cfg.seed)
            searches[crop] = result
            if result.folds == 0:  # a class of one image: nothing to cross-validate
                crops, why = ["center"], f"no crop comparison ({result.fallback}); the backbone's centre crop"
                table = []
                break
            table.append(
                {
                    "crop": crop,
                    "resize_size": cpp.resize_size,
                    "cv_top1": result.table[0]["cv_top1"],
                    "cv_loss": result.table[0].get("cv_loss"),
                    "images": len(sample),
                }
            )
    if table:
        # The backbone's convention (centre) stays unless resize-only wins clearly: on the digits a
        # 0.35 pp cross-validated lead of resize-only was noise that cost 1.4 pp on validation.
        scores = {r["crop"]: r["cv_top1"] for r in table}
        chosen = "none" if scores["none"] >= scores["center"] + CROP_MARGIN else "center"
        log.info(
            "crop: %s (cross-validated top-1 %s)",
            chosen,
            ", ".join(f"{r['crop']} {r['cv_top1']:.4f}" for r in table),
        )
    else:
        chosen = crops[0]
    pp_chosen, ftr = per_crop[chosen]
    if len(ftr) < len(ytr):  # a crop compared on the sample wins: its features of every image
        ftr, stats = _features(
            trunk, prepared.train, pp_chosen, ctx, description=f"trunk features (train, crop {chosen})"
        )
        hits, misses = hits + stats.hits, misses + stats.misses

    def val_pass():  # through the same runner as the training passes (one export), nothing kept
        keep = PrefixCapture(module, set()) if module is not None else None
        return _features(trunk, prepared.val, pp_chosen, ctx, description="trunk features (val)", prefix=keep)

    compared = searches.get(chosen)  # the crop comparison's search of the chosen crop, if any
    if len(sample) < len(ytr):
        searches.clear()  # searched on the sample: the head is searched again on every image
    t_crop = time.perf_counter() - t0
    if not head:  # a fine-tune trains a fresh head: the features only chose the crop
        return FeatureFit(
            pp=pp_chosen,
            search=compared,
            crop={"mode": cfg.crop, "chosen": chosen, "why": why, "table": table},
            ftr=ftr,
            cache=_cache_record(hits, misses),
            seconds={"crop": round(t_crop, 3)},
            val_pass=val_pass,
        )

    n_views = cfg.views_for("feature-extraction")
    views = Views(n_views, hflip=cfg.hflip, seed=cfg.seed)
    rows, groups = [ftr], [np.arange(len(ftr))]
    for v in range(1, n_views):
        fv, stats = _features(
            trunk,
            prepared.train,
            pp_chosen,
            ctx,
            description=f"trunk features (view {v + 1}/{n_views})",
            view=(views, v),
        )
        hits, misses = hits + stats.hits, misses + stats.misses
        rows.append(fv)
        groups.append(np.arange(len(ftr)))
    x = np.concatenate(rows)
    t_views = time.perf_counter() - t0 - t_crop
    if n_views == 1 and chosen in searches:
        search = searches[chosen]  # the comparison's search is this one
    elif n_views == 1:
        search = search_head(ftr, ytr, n_classes, folds=cfg.folds, seed=cfg.seed, progress=ctx["progress"])
    else:
        search = search_head(
            x,
            np.tile(ytr, n_views),
            n_classes,
            groups=np.concatenate(groups),
            scored=np.arange(len(x)) < len(ftr),
            folds=cfg.folds,
            seed=cfg.seed,
            progress=ctx["progress"],
        )
    if search.fallback:
        log.warning("head search: %s", search.fallback)
    return FeatureFit(
        pp=pp_chosen,
        search=search,
        crop={"mode": cfg.crop, "chosen": chosen, "why": why, "table": table},
        ftr=ftr,
        cache=_cache_record(hits, misses),
        seconds={"crop": round(t_crop, 3), "views": round(t_views, 3), "search": round(search.seconds, 3)},
        val_pass=val_pass,
        prefix_acts=prefix_acts.get(chosen),
    )


def linear_logits(weight: np.ndarray, bias: np.ndarray, x: np.ndarray) -> np.ndarray:
    return x @ weight.T + bias


def head_history(search, ftr: np.ndarray, ytr: np.ndarray, fval: np.ndarray, yval: np.ndarray, label_smoothing: float):
    """The one history record of a searched head (training and validation loss and top-1) and the
    validation logits (a torch tensor)."""
    import torch

    train_logits = torch.from_numpy(linear_logits(search.weight, search.bias, ftr))
    val_logits = torch.from_numpy(linear_logits(search.weight, search.bias, fval))
    yt, yv = torch.from_numpy(ytr), torch.from_numpy(yval)

    def loss(logits, y):
        return round(float(torch.nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing)), 6)

    train_top1 = float((train_logits.argmax(1) == yt).float().mean())
    val_top1 = float((val_logits.argmax(1) == yv).float().mean()) if len(yv) else 0.0
    record = {
        "epoch": 1,
        "train_loss": loss(train_logits, yt),
        "train_top1": round(train_top1, 6),
        "val_loss": loss(val_logits, yv),
        "val_top1": round(val_top1, 6),
        "gap_top1": round(train_top1 - val_top1, 6),
        "lr": [],
        "seconds": round(search.seconds, 3),
    }
    return record, val_logits


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A stratified (train, held-out) split of positions; None when a class has too few images."""
    rng = np.random.default_rng(seed + 17)
    fit, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < AUTO_MIN_PER_CLASS:
            return None
        idx = rng.permutation(idx)
        n_held = max(1, round(len(idx) * fraction))
        held.extend(idx[:n_held])
        fit.extend(idx[n_held:])
    return np.sort(np.array(fit)), np.sort(np.array(held))


@dataclasses.dataclass
class CachedPrefix:
    """The frozen prefix's activations of every training view and of the validation images, and the
    pooled output of the trunk's taps inside the prefix for their plain view (multi-layer features:
    they do not change as the suffix trains; (n, 0) when the trunk has no taps there)."""

    split: Any  # SplitTrunk
    train: np.ndarray  # (n, K, C, H, W) float16
    val: np.ndarray  # (m, 1, C, H, W)
    seconds: float
    train_taps: np.ndarray | None = None  # (n, F) float32
    val_taps: np.ndarray | None = None  # (m, F) float32


def prefix_module(trunk, split, input_size: int):
    """The module a prefix pass runs: :class:`~edgetl.workstation.model.PrefixWithTaps` of ``split``'s
    prefix and ``trunk``'s taps (their pooled output follows the activation)."""
    from edgetl.workstation.model import PrefixWithTaps

    return PrefixWithTaps(split.prefix, trunk.taps, input_size)


def cache_prefix(
    trunk, train: list[Sample], val: list[Sample], cfg, pp: Preprocessing, ctx: dict[str, Any], *, views: int
) -> CachedPrefix | None:
    """Split the trunk before its last ``cfg.unfreeze`` blocks and run the frozen part once per view
    of ``train`` (``views`` views) and once over ``val`` (with the pooled taps inside it, when the trunk
    has taps); None when this trunk cannot be cut there (the caller falls back to the streaming
    fine-tune)."""
    from edgetl.workstation.fast_trunk import frozen_runner
    from edgetl.workstation.prefix import ImageStore, Views, prefix_activations, split_trunk

    t0 = time.perf_counter()
    split = split_trunk(trunk, cfg.unfreeze)
    if split is None:
        log.info(
            "%s cannot be cut before its last %d blocks (its body is not a chain of blocks)", cfg.backbone, cfg.unfreeze
        )
        return None
    device = ctx["settings"].device
    import torch

    module = prefix_module(trunk, split, pp.input_size).eval()
    per_view = int(np.prod(module.act_shape)) * 2  # float16
    need = per_view * (len(train) * views + len(val))
    budget = activation_memory_budget()
    if need > budget:
        log.info(
            "the frozen blocks' output would take %.1f GiB (over %s=%.1f GiB): fine-tuning end to end instead",
            need / 2**30,
            ACTIVATION_MEMORY_ENV,
            budget / 2**30,
        )
        return None
    example = torch.zeros((2, 3, pp.input_size, pp.input_size))
    runner = frozen_runner(module, example, device, autocast=ctx["settings"].autocast)
    progress = ctx["progress"]
    parts, taps = [], []
    for samples, k, what in ((train, views, "train"), (val, 1, "val")):
        store = ImageStore(samples, pp, progress=progress)
        taps.append(np.zeros((len(samples), module.taps_dim), dtype=np.float32))
        parts.append(
            prefix_activations(
                runner,
                store,
                Views(k, hflip=cfg.hflip, seed=cfg.seed),
                pp,
                batch_size=cfg.batch_size,
                progress=progress,
                description=f"frozen blocks ({what}, {k} view{'s' if k > 1 else ''})",
                act_shape=module.act_shape,
                taps=taps[-1],
            )
        )
        del store
    return CachedPrefix(split, parts[0], parts[1], time.perf_counter() - t0, train_taps=taps[0], val_taps=taps[1])


def tuned_features(trunk, cached: CachedPrefix, acts: np.ndarray, taps: np.ndarray, batch_size: int, device):
    """The (fine-tuned) trunk's features of the plain view 0 of cached activations: the prefix's
    pooled taps, then what the suffix computes (its taps and the last feature map), in eval mode."""
    import torch

    from edgetl.workstation.model import features_after
    from edgetl.workstation.prefix import view0_batches

    cut = len(cached.split.prefix)
    trunk.eval()
    rows = []
    with torch.inference_mode():
        for x in view0_batches(acts, batch_size, device):
            rows.append(features_after(trunk, cut, x).float().cpu().numpy())
    after = np.concatenate(rows) if rows else np.zeros((0, trunk.feature_dim - taps.shape[1]), dtype=np.float32)
    return np.concatenate([taps, after], 1)


def refit_head(trunk, cached: CachedPrefix, ytr: np.ndarray, n_classes: int, cfg, ctx: dict[str, Any]):
    """After a cached fine-tune: the head searched again (k-fold on the training split only) on the
    fine-tuned trunk's features of the training images (their plain view; the trunk's taps included)
    -> (the search, training features, validation features). On the digits, patches, faces and
    mnist5k it scored 0.4-1.6 pp above the head trained along with the blocks (docs/training.md)."""
    from edgetl.workstation.head_search import search_head

    device = ctx["settings"].device
    ftr = tuned_features(trunk, cached, cached.train, cached.train_taps, cfg.batch_size, device)
    fval = tuned_features(trunk, cached, cached.val, cached.val_taps, cfg.batch_size, device)
    search = search_head(ftr, ytr, n_classes, folds=cfg.folds, seed=cfg.seed, progress=ctx["progress"])
    if search.fallback:
        log.warning("head search after the fine-tune: %s", search.fallback)
    return search, ftr, fval


def sign_test(wins: int, losses: int) -> float:
    """One-sided exact sign test (McNemar's exact test) on paired predictions: the probability that,
    of the ``wins + losses`` images two classifiers disagree on, at least ``wins`` go to one of them
    when both are equally good (1.0 when they never disagree). Written here (three lines) rather than
    importing scipy.stats for it: scipy costs every run about a second of imports."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def auto_choice(fe_right: np.ndarray, ft_right: np.ndarray) -> tuple[str, dict[str, Any]]:
    """Fine-tune or feature extraction from which held-out images each got right: fine-tune only when
    it scores :data:`AUTO_MARGIN` higher and the sign test on their disagreements gives p < :data:`AUTO_ALPHA`
    (a fine-tuned trunk serves one task and costs more to train: noise must not choose it)."""
    wins, losses = int((ft_right & ~fe_right).sum()), int((fe_right & ~ft_right).sum())
    p = sign_test(wins, losses)
    better = ft_right.mean() >= fe_right.mean() + AUTO_MARGIN
    chosen = "fine-tune" if better and p < AUTO_ALPHA else "feature-extraction"
    return chosen, {"fine_tune_only_right": wins, "feature_extraction_only_right": losses, "p_value": round(p, 6)}


def decide_auto(trunk, prepared, cfg, fit: FeatureFit, ctx: dict[str, Any]) -> dict[str, Any]:
    """``--strategy auto``: feature extraction or fine-tune, from a budgeted comparison on the training
    split only: up to :data:`AUTO_SAMPLE` training images, one view each, half the epochs."""
    import torch

    from edgetl.workstation.head_search import search_head
    from edgetl.workstation.loops import LoopIO
    from edgetl.workstation.model import Head, set_trainable
    from edgetl.workstation.prefix import finetune_cached, split_trunk

    t0 = time.perf_counter()
    record: dict[str, Any] = {
        "requested": "auto",
        "margin_pp": 100 * AUTO_MARGIN,
        "alpha": AUTO_ALPHA,
        "holdout_fraction": AUTO_HOLDOUT,
        "comparison_epochs": max(1, cfg.epochs // 2),
        "comparison_views": 1,
    }
    ytr_all = np.array([s.label for s in prepared.train], dtype=np.int64)
    sample = stratified_sample(ytr_all, AUTO_SAMPLE, cfg.seed)
    ytr = ytr_all[sample]
    parts = holdout_split(ytr, AUTO_HOLDOUT, cfg.seed)
    if parts is None:
        return {
            **record,
            "chosen": "feature-extraction",
            "why": f"a class has fewer than {AUTO_MIN_PER_CLASS} training images: too few to compare; "
            "the frozen trunk is the safer choice",
        }
    fit_idx, held_idx = parts
    n_classes = len(prepared.labels)
    # Feature extraction, trained on the fit part (its own search) and scored on the held-out part.
    ftr = fit.ftr[sample]
    fe = search_head(ftr[fit_idx], ytr[fit_idx], n_classes, folds=cfg.folds, seed=cfg.seed)
    fe_right = linear_logits(fe.weight, fe.bias, ftr[held_idx]).argmax(1) == ytr[held_idx]
    fe_top1 = float(fe_right.mean())
    if auto_choice(fe_right, np.ones_like(fe_right))[0] != "fine-tune":
        # Even a fine-tune right on every held-out image would not win: no fine-tune to run.
        why = (
            f"on {len(held_idx)} held-out training images feature extraction got {int((~fe_right).sum())} wrong: "
            f"a fine-tune right on all of them would not win by {100 * AUTO_MARGIN:g} pp with p < {AUTO_ALPHA:g} "
            "(sign test), so the frozen trunk (shareable by heads) stays"
        )
        log.info("strategy auto: feature-extraction (%s)", why)
        return {
            **record,
            "chosen": "feature-extraction",
            "why": why,
            "compared_images": len(sample),
            "holdout_images": len(held_idx),
            "holdout_top1": {"feature-extraction": round(fe_top1, 6), "fine-tune": None},
            "seconds": round(time.perf_counter() - t0, 3),
        }
    # Fine-tune of a copy of the trunk (the prefix is frozen, so its activations are the trunk's too),
    # then its head searched again on its features, as the final fine-tune does (refit_head).
    trunk_copy = copy.deepcopy(trunk)
    acts = fit.prefix_acts or {}
    split = split_trunk(trunk_copy, cfg.unfreeze)
    if split is not None and all(int(i) in acts for i in sample):  # kept by the feature pass: no second pass
        both = np.stack([acts[int(i)] for i in sample])[:, None]  # (n, 1 view, C, H, W)
        # The trunk's taps inside the prefix are the first columns of its features (computed with them).
        width = prefix_module(trunk_copy, split, fit.pp.input_size).taps_dim
        taps = np.ascontiguousarray(ftr[:, :width])
        cached = CachedPrefix(
            split, both[fit_idx], both[held_idx], 0.0, train_taps=taps[fit_idx], val_taps=taps[held_idx]
        )
    else:
        train = [prepared.train[i] for i in sample[fit_idx]]
        held = [prepared.train[i] for i in sample[held_idx]]
        cached = cache_prefix(trunk_copy, train, held, cfg, fit.pp, ctx, views=1)
    if cached is None:
        return {
            **record,
            "chosen": "feature-extraction",
            "why": f"{cfg.backbone} cannot be cut for the cached fine-tune",
        }
    split = cached.split
    set_trainable(trunk_copy, cfg.unfreeze)
    torch.manual_seed(cfg.seed)
    head = Head(trunk_copy.last_dim, n_classes, dropout=cfg.dropout)  # fresh, as the final fine-tune's
    budget = dataclasses.replace(cfg, epochs=max(1, cfg.epochs // 2))  # the comparison: half the epochs
    device = ctx["settings"].device
    split.suffix.to(device)
    head.to(device)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    io = LoopIO(progress=ctx["progress"], history=[])
    finetune_cached(
        split,
        head,
        cached.train,
        torch.from_numpy(ytr[fit_idx]),
        cached.val,
        torch.from_numpy(ytr[held_idx]),
        budget,
        criterion=criterion,
        io=io,
        device=device,
    )
    refit, _, fheld = refit_head(trunk_copy, cached, ytr[fit_idx], n_classes, cfg, ctx)
    ft_right = linear_logits(refit.weight, refit.bias, fheld).argmax(1) == ytr[held_idx]
    ft_top1 = float(ft_right.mean())
    del trunk_copy, split, head, cached
    chosen, test = auto_choice(fe_right, ft_right)
    why = (
        f"on {len(held_idx)} held-out training images fine-tune scored {ft_top1:.3f} against feature extraction's "
        f"{fe_top1:.3f} (right on {test['fine_tune_only_right']} it got wrong, wrong on "
        f"{test['feature_extraction_only_right']} it got right; sign test p = {test['p_value']:.3g}): "
        + (
            f"fine-tune wins by >= {100 * AUTO_MARGIN:g} pp with p < {AUTO_ALPHA:g}"
            if chosen == "fine-tune"
            else f"fine-tune does not win by {100 * AUTO_MARGIN:g} pp with p < {AUTO_ALPHA:g}, so the frozen trunk "
            "(shareable by heads) stays"
        )
    )
    log.info("strategy auto: %s (%s)", chosen, why)
    return {
        **record,
        "chosen": chosen,
        "why": why,
        "compared_images": len(sample),
        "holdout_images": len(held_idx),
        "holdout_top1": {"feature-extraction": round(fe_top1, 6), "fine-tune": round(ft_top1, 6)},
        "sign_test": test,
        "seconds": round(time.perf_counter() - t0, 3),
    }
