"""A data-budget study's result: its rows, the transfer gain over scratch, the JSON and the plot.

:mod:`edgetl.workstation.study` trains the rows; this module holds what they add up to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from edgetl.core.imagefolder import Sample
from edgetl.workstation.options import budget_label


@dataclasses.dataclass(frozen=True)
class StudyRow:
    strategy: str
    pretrained: bool
    samples_per_class: int | None  # None: all
    train_images: int
    batch_size: int
    trunk_lr_scale: float
    epochs: int
    epochs_run: int
    best_epoch: int
    best_at_last_epoch: bool  # still improving when training ended: more epochs may help this row
    val_top1: float
    train_seconds: float
    feature_cache: dict | None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["samples_per_class"] = budget_label(self.samples_per_class)
        return d


@dataclasses.dataclass(frozen=True)
class StudyResult:
    rows: list[StudyRow]
    data: str
    backbone: str
    weights: dict | None  # where the pretrained rows' trunk came from (WeightsSource.to_dict()); None: scratch only
    img_size: int
    seed: int
    val_split: float | None  # None with a separate validation folder
    labels: list[str]
    train_images: int  # the whole training part, before subsampling
    val_images: int
    val_digest: str  # sha256 of the validation (path, label) list: the same for every row
    trunk_pass: dict | None  # {"images", "seconds", "cache"} of the shared feature-extraction pass
    epochs: dict  # per strategy
    config: dict  # the base TrainConfig, less what each row sets (strategy, epochs; scratch: weights, trunk_lr_scale)
    json_path: str | None = None
    plot_path: str | None = None

    def row(self, strategy: str, samples_per_class: int | None) -> StudyRow:
        for r in self.rows:
            if r.strategy == strategy and r.samples_per_class == samples_per_class:
                return r
        raise KeyError((strategy, samples_per_class))

    def budgets(self) -> list[int | None]:
        seen: list[int | None] = []
        for r in self.rows:
            if r.samples_per_class not in seen:
                seen.append(r.samples_per_class)
        return sorted(seen, key=budget_sort_key)

    def strategies(self) -> list[str]:
        return list(dict.fromkeys(r.strategy for r in self.rows))

    def transfer_gain_pp(self) -> dict[str, dict[str, float]]:
        """Per budget: each strategy's val top-1 minus scratch's, in percentage points."""
        if "scratch" not in self.strategies():
            return {}
        gains: dict[str, dict[str, float]] = {}
        for b in self.budgets():
            base = self.row("scratch", b).val_top1
            gains[str(budget_label(b))] = {
                s: round(100 * (self.row(s, b).val_top1 - base), 2) for s in self.strategies() if s != "scratch"
            }
        return gains

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rows"}
        d["rows"] = [r.to_dict() for r in self.rows]
        d["chance_top1"] = round(1 / len(self.labels), 4)
        d["transfer_gain_pp"] = self.transfer_gain_pp()
        return {"rows": d.pop("rows"), **d}


def budget_text(n: int | None) -> str:
    return "all images" if n is None else f"{n} per class"


def budget_sort_key(n: int | None) -> float:
    return float("inf") if n is None else float(n)


def samples_digest(samples: list[Sample]) -> str:
    """sha256 of a (path, label) list: the same validation set gives the same digest."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.path}\t{s.label}\n".encode())
    return h.hexdigest()


PLOT_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg")


def plot_format(path: str | Path) -> str:
    """The image format of a plot path, from its suffix (none: png); another suffix is a ConfigError."""
    from edgetl.core.errors import ConfigError

    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix and suffix not in PLOT_FORMATS:
        raise ConfigError(
            f"--plot {path}: .{suffix} is not an image format edgetl writes; use {', '.join(PLOT_FORMATS)}"
        )
    return suffix or "png"


PLOT_MARK = "edgetl study"  # written into every study plot, so that --force replaces only one of them


def _plot_mark_options(fmt: str) -> dict:
    if fmt in ("jpg", "jpeg"):
        return {"pil_kwargs": {"comment": PLOT_MARK.encode()}}
    return {"metadata": {"Software" if fmt == "png" else "Creator": PLOT_MARK}}


def is_study_plot(path: str | Path) -> bool:
    """Whether ``path`` is a plot ``study`` wrote (it carries :data:`PLOT_MARK`): PNG text, JPEG
    comment, or the SVG's or PDF's creator (found in the file's first 64 kB)."""
    path = Path(path)
    if not path.is_file() or path.is_symlink():
        return False
    fmt = plot_format(path)
    try:
        if fmt in ("png", "jpg", "jpeg"):
            from PIL import Image

            with Image.open(path) as img:
                found = img.text.get("Software") if fmt == "png" else img.info.get("comment")
            return found in (PLOT_MARK, PLOT_MARK.encode())
        with open(path, "rb") as f:
            return PLOT_MARK.encode() in f.read(1 << 16)
    except Exception:  # not an image at all, unreadable: not ours
        return False


def plot_study(result: StudyResult, path: str | Path) -> Path:
    """Validation top-1 against images per class (log scale), one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    all_x = result.train_images / len(result.labels)  # "all": the mean per class of the whole training part

    def x_of(n: int | None) -> float:
        return all_x if n is None else float(n)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for strategy in result.strategies():
        points = sorted((x_of(r.samples_per_class), r.val_top1) for r in result.rows if r.strategy == strategy)
        label = strategy + ("" if strategy != "scratch" else " (random init)")
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            linestyle="--" if strategy == "scratch" else "-",
            label=label,
        )
    ax.axhline(1 / len(result.labels), color="grey", linewidth=0.8, linestyle=":", label="chance")
    ax.set_xscale("log")
    budgets = result.budgets()
    ax.set_xticks([x_of(b) for b in budgets])
    ax.set_xticklabels([f"all\n({all_x:.0f})" if b is None else str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("training images per class")
    ax.set_ylabel("validation top-1")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(
        f"{result.backbone} at {result.img_size}px: {result.val_images} validation images (same for every point)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    # Written beside the target and renamed: an interrupted study leaves the old plot or none, never half a PNG.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plot is read by others
        with os.fdopen(fd, "wb") as f:
            fmt = plot_format(path)
            fig.savefig(f, dpi=100, format=fmt, **_plot_mark_options(fmt))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
