"""Training and study options with their defaults, importable without numpy or torch.

The command line builds its options (defaults, choices) from these, so ``edgetl --help`` stays
fast: it imports neither torch nor numpy (tests/test_cli_imports.py). Training, the
study, the recipes and the CLI import them from here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from edgetl.core.errors import ConfigError

STRATEGIES = ("auto", "feature-extraction", "fine-tune", "full")
# How images are fitted to the input: centre = the backbone's resize then centre crop (ImageNet's
# convention), none = resize the shorter side to the input size (nothing of a square image is cut),
# compare = cross-validate both on the training split, auto = compare when the images are no larger
# than the resize (cropping them cuts picture, not margin), else centre.
CROP_MODES = ("auto", "center", "none", "compare")
AMP_MODES = ("auto", "off", "bf16", "fp16")
# What the head sees: last = the last feature map, pooled; blocks = every block's output, pooled and
# concatenated (multi-layer features: the searched feature-extraction head, and the head a cached
# fine-tune searches again after training its blocks); auto = blocks on the searched paths, else last.
FEATURE_MODES = ("auto", "last", "blocks")

# The input-size bounds of edgetl.core.preprocess (MIN/MAX_INPUT_SIZE), repeated because that module
# needs numpy and this one must not; tests/test_reliability_workstation.py checks that they agree.
MIN_IMG_SIZE, MAX_IMG_SIZE = 8, 2048

# Integer options: (lowest, highest). The upper bounds are far above any real use; they turn a typo
# (an extra zero or three) into one line instead of hours of training or an allocation failure.
MAX_EPOCHS = 10_000
_INT_RANGES: dict[str, tuple[int, int]] = {
    "epochs": (1, MAX_EPOCHS),
    "batch_size": (1, 4096),
    "unfreeze": (1, 1000),
    "patience": (1, 10_000),
    "seed": (0, 2**32 - 1),  # numpy's generators take no negative seed
    "img_size": (MIN_IMG_SIZE, MAX_IMG_SIZE),
    "workers": (0, 256),
    "views": (1, 64),
    "folds": (2, 20),
}
# None: the backbone's size; 4 on CUDA, 0 on the CPU; views_for(); the backbone's fine_tune_blocks
_OPTIONAL = ("img_size", "workers", "views", "unfreeze")
# Views of each training image when --views is not given (measured, docs/training.md): augmented views
# cost the feature-extraction head accuracy (the digits: 0.941 with 4 against 0.961 with 1) and give
# the fine-tune some (the digits: 0.978 against 0.970).
DEFAULT_VIEWS = {"feature-extraction": 1, "fine-tune": 4}
# Float options: (low, high, low excluded, high excluded, the rule in words). All must be finite; the
# upper bounds are far above any useful value and keep lr x scale x decay within float32 (torch's
# optimizer raises an overflow error, not a NaN, past ~1e38).
_FLOAT_RANGES: dict[str, tuple[float, float, bool, bool, str]] = {
    "lr": (0.0, 100.0, True, False, "in (0, 100]"),
    "trunk_lr_scale": (0.0, 1000.0, False, False, "in [0, 1000] (0: the trunk does not move)"),
    "weight_decay": (0.0, 1000.0, False, False, "in [0, 1000]"),
    "dropout": (0.0, 1.0, False, True, "in [0, 1)"),
    "label_smoothing": (0.0, 1.0, False, True, "in [0, 1)"),
    "val_split": (0.0, 1.0, True, True, "between 0 and 1 (a fraction of each class)"),
    "mixup": (0.0, 1000.0, False, False, "in [0, 1000] (a Beta alpha; 0 = off)"),
    "cutmix": (0.0, 1000.0, False, False, "in [0, 1000] (a Beta alpha; 0 = off)"),
}


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    backbone: str = "mobilenet_v2"
    strategy: str = "auto"
    unfreeze: int | None = None  # None: the backbone's own (BackboneSpec.fine_tune_blocks)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-2  # head; the trunk gets lr * trunk_lr_scale
    trunk_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    dropout: float = 0.2
    label_smoothing: float = 0.1
    img_size: int | None = None
    val_split: float = 0.2
    seed: int = 0
    device: str = "auto"
    weights: str = "imagenet"
    patience: int = 5
    augment: bool = True
    hflip: bool = False
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off (fine-tune, full)
    cutmix: float = 0.0
    balance: bool = False
    feature_cache: bool = True
    amp: str = "auto"
    workers: int | None = None  # None: 4 on CUDA, 0 on the CPU
    on_bad_image: str = "skip"
    crop: str = "auto"
    features: str = "auto"
    views: int | None = None  # views of each training image: the plain one + views-1 augmented (None: see below)
    head_search: bool = True  # cross-validate the head's settings on the training split (no val early stopping)
    folds: int = 5

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise ConfigError(problem)

    def problem(self) -> str | None:
        """What is wrong with these values, as one line naming the option (None: nothing).

        Every value is checked for type, range and finiteness here, whichever way it came (the
        command line, a recipe, a run's config.json): a ``--lr inf`` or ``nan`` would otherwise
        train to a NaN model and exit 0, and an ``--img-size 100000`` fail deep in the trunk.
        """
        for name in ("backbone", "weights", "device"):
            if not isinstance(getattr(self, name), str):
                return f"{_opt(name)} must be a name, not {getattr(self, name)!r}"
        if self.strategy not in STRATEGIES:
            return f"--strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}"
        for name, (low, high) in _INT_RANGES.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                return f"{_opt(name)} must be an integer in {low}..{high}, not {value!r}"
        for name, (low, high, low_open, high_open, what) in _FLOAT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"{_opt(name)} must be a finite number {what}, not {value!r}"
            if value < low or (low_open and value == low) or value > high or (high_open and value == high):
                return f"{_opt(name)} must be {what}, not {value!r}"
        for name in ("augment", "hflip", "balance", "feature_cache", "head_search"):
            if not isinstance(getattr(self, name), bool):
                return f"{_opt(name)} must be true or false, not {getattr(self, name)!r}"
        if (self.mixup or self.cutmix) and self.strategy in ("feature-extraction", "auto"):
            return "--mixup/--cutmix mix images: use them with --strategy fine-tune or full"
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            return f"--device must be auto, cpu or cuda, not {self.device!r}"
        if self.amp not in AMP_MODES:
            return f"--amp must be one of {', '.join(AMP_MODES)}, not {self.amp!r}"
        if self.crop not in CROP_MODES:
            return f"--crop must be one of {', '.join(CROP_MODES)}, not {self.crop!r}"
        if self.features not in FEATURE_MODES:
            return f"--features must be one of {', '.join(FEATURE_MODES)}, not {self.features!r}"
        if self.features == "blocks" and self.strategy == "full":
            return (
                "--features blocks is for heads searched on a trunk's features; --strategy full trains every "
                "block end to end (drop --features, or use --strategy fine-tune, feature-extraction or auto)"
            )
        if self.features == "blocks" and self.strategy == "fine-tune":
            off = [
                flag
                for flag, on in (
                    ("--no-head-search", not self.head_search),
                    ("--no-feature-cache", not self.feature_cache),
                    ("--mixup", bool(self.mixup)),
                    ("--cutmix", bool(self.cutmix)),
                )
                if on
            ]
            if off:
                return (
                    f"--features blocks with a fine-tune needs the cached fine-tune, whose head is searched again "
                    f"on every block's output; {', '.join(off)} fine-tunes end to end (drop --features or {off[0]})"
                )
        if self.on_bad_image not in ("skip", "fail"):
            return f"--on-bad-image must be skip or fail, not {self.on_bad_image!r}"
        return None

    def views_for(self, strategy: str) -> int:
        """Views of each training image for ``strategy`` (feature-extraction or fine-tune)."""
        return self.views if self.views is not None else DEFAULT_VIEWS[strategy]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- study ------------------------------------------------------------------------------------------

STUDY_STRATEGIES = ("feature-extraction", "fine-tune", "full", "scratch")
# Head training on cached features is cheap, end-to-end epochs are not. Scratch gets three times the
# epochs of full: random weights learn slowly, and a baseline stopped before it learns proves nothing.
DEFAULT_EPOCHS: dict[str, int] = {"feature-extraction": 30, "fine-tune": 5, "full": 5, "scratch": 15}
DEFAULT_BUDGETS: tuple[int | None, ...] = (5, 10, 25, 50, None)  # None: all training images


def budget_label(n: int | None) -> str | int:
    return "all" if n is None else n
