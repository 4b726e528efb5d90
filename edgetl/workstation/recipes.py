"""Training recipes: YAML files in ``models/`` (one per backbone x strategy we recommend), or a run.

A recipe holds :class:`~edgetl.workstation.options.TrainConfig` values (plus an optional ``description``).
Precedence: TrainConfig defaults < recipe < options given on the command line. ``--recipe RUN``
takes the exact configuration of an earlier run, which with the same seed on the same machine
reproduces its numbers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from edgetl.core import shipped as profiles
from edgetl.core.errors import ConfigError
from edgetl.workstation.options import TrainConfig

log = logging.getLogger(__name__)


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Recipe values (not yet validated as a whole: command-line overrides are merged first)."""
    path = Path(name_or_path)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ConfigError(f"--recipe {path}: a folder must be a run directory (with config.json)")
        try:
            values = json.loads(config.read_text())["train"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"--recipe {path}: cannot read its training config ({exc})") from None
        profiles.check_keys(values, TrainConfig, f"run config {config}")
        return dict(values)
    values, _ = profiles.load("recipe", name_or_path, TrainConfig, allowed_extra=("description",))
    values.pop("description", None)
    return values


# Settings of the head's own training: a feature-extraction run given any of them (on the command
# line or in a recipe) trains the head with them, as asked, instead of searching them.
HEAD_SETTINGS = ("lr", "weight_decay", "label_smoothing", "epochs", "patience", "dropout")


def make_config(recipe: str | None, overrides: dict[str, Any]) -> TrainConfig:
    values = load_recipe(recipe) if recipe else {}
    values.update(overrides)
    given = sorted(k for k in HEAD_SETTINGS if k in values)
    if given and "head_search" not in values and values.get("strategy") == "feature-extraction":
        log.info(
            "feature extraction with --%s given: the head trains with the settings given (no head search)",
            given[0].replace("_", "-"),
        )
        values["head_search"] = False
    try:
        return TrainConfig(**values)
    except TypeError as exc:  # wrong value types from YAML reach the dataclass as-is
        raise ConfigError(f"invalid recipe values: {exc}") from None
