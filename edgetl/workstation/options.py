"""Training and study options with their defaults, importable without numpy or torch.

The command line builds its options (defaults, choices) from these, so ``edgetl --help`` stays
fast: it imports neither torch nor numpy (tests/test_cli_imports.py). Training, the
study, the recipes and the CLI import them from here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edgetl.core.errors import ConfigError

STRATEGIES = ("feature-extraction", "fine-tune", "full")
AMP_MODES = ("auto", "off", "bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    backbone: str = "mobilenet_v2"
    strategy: str = "feature-extraction"
    unfreeze: int = 3
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

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        for name in ("epochs", "batch_size", "unfreeze", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be an integer >= 1, not {value!r}")
        for name in (
            "lr",
            "trunk_lr_scale",
            "weight_decay",
            "dropout",
            "label_smoothing",
            "val_split",
            "mixup",
            "cutmix",
        ):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise ConfigError(f"{name.replace('_', '-')} must be a number, not {getattr(self, name)!r}")
        if self.lr <= 0 or self.trunk_lr_scale <= 0:
            raise ConfigError("--lr and the trunk learning-rate scale must be > 0")
        if self.weight_decay < 0 or not 0 <= self.dropout < 1 or not 0 <= self.label_smoothing < 1:
            raise ConfigError("weight decay must be >= 0, dropout and label smoothing in [0, 1)")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError("--mixup and --cutmix are Beta alphas: >= 0 (0 = off)")
        if (self.mixup or self.cutmix) and self.strategy == "feature-extraction":
            raise ConfigError("--mixup/--cutmix mix images: use them with --strategy fine-tune or full")
        if self.img_size is not None and (not isinstance(self.img_size, int) or self.img_size < 16):
            raise ConfigError(f"--img-size must be an integer >= 16, not {self.img_size!r}")
        if not isinstance(self.device, str) or (
            self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:")
        ):
            raise ConfigError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"--amp must be one of {', '.join(AMP_MODES)}, not {self.amp!r}")
        if self.on_bad_image not in ("skip", "fail"):
            raise ConfigError(f"--on-bad-image must be skip or fail, not {self.on_bad_image!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise ConfigError("--workers must be an integer >= 0")

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
