"""A run folder's JSON files as ``finetune`` writes them, checked as untrusted data.

The workstation loads runs (:mod:`edgetl.workstation.run`) and the device describes them
(``edgetl info``, :mod:`edgetl.device.info`); both refuse an edited or damaged config.json,
labels.json or split.json with the same one line.
"""

from __future__ import annotations

from typing import Any

from edgetl.core.errors import EdgetlError
from edgetl.core.preprocess import Preprocessing


def run_files_problem(config: Any, labels: Any, split: Any) -> str | None:
    """What is wrong with a run's config.json, labels.json and split.json as read (None: nothing):
    the shapes and types everything downstream relies on, every label index in 0..n-1 (a label of
    -1 would be scored as the last class, 1.5 as class 1), and the preprocessing record. One line,
    naming the file."""
    if not isinstance(config, dict):
        return f"config.json must hold an object, not {type(config).__name__}"
    for key, kind in (("train", dict), ("preprocessing", dict), ("backbone", str)):
        if not isinstance(config.get(key), kind):
            what = "an object" if kind is dict else "a name"
            return f"config.json: {key!r} must be {what}, not {config.get(key)!r:.60}"
    dropout = config["train"].get("dropout")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        return f"config.json: train.dropout must be a number in [0, 1), not {dropout!r:.60}"
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        return "labels.json must be a list of class names (strings)"
    if not isinstance(split, dict):
        return f"split.json must hold an object with train and val lists, not {type(split).__name__}"
    for part in ("train", "val"):
        items = split.get(part)
        if not isinstance(items, list):
            return f"split.json: {part!r} must be a list of [path, label] pairs"
        for item in items:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                return f"split.json: {part!r} holds {item!r:.80}, not a [path, label] pair"
            label = item[1]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(labels):
                return (
                    f"split.json: {part!r} labels {item[0]!r:.80} as {label!r:.20}; a label is a class index "
                    f"in 0..{len(labels) - 1}"
                )
    try:
        Preprocessing.from_dict(config["preprocessing"])
    except EdgetlError as exc:  # its advice is for bundles; the callers say what to do with a run
        return f"config.json: {str(exc).removesuffix('; re-export the bundle')}"
    return features_problem(config.get("features"))


MAX_TAPS = 1000  # far above any backbone's blocks
MAX_FEATURE_DIM = 1 << 20


def features_problem(features: Any) -> str | None:
    """What is wrong with config.json's ``features`` record (None: nothing, or no record: the last
    feature map): ``{"mode": "last"}`` or ``{"mode": "blocks", "taps": [increasing positions], "dim": n}``."""
    if features is None:
        return None
    if not isinstance(features, dict) or features.get("mode") not in ("last", "blocks"):
        return f"config.json: 'features' must be an object with mode last or blocks, not {features!r:.60}"
    if features["mode"] == "last":
        return None
    taps, dim = features.get("taps"), features.get("dim")
    if (
        not isinstance(taps, list)
        or not 0 < len(taps) <= MAX_TAPS
        or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < MAX_TAPS for t in taps)
        or taps != sorted(set(taps))
    ):
        return f"config.json: features.taps must be increasing block positions in 0..{MAX_TAPS - 1}, not {taps!r:.60}"
    if isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= MAX_FEATURE_DIM:
        return f"config.json: features.dim must be an integer in 1..{MAX_FEATURE_DIM}, not {dim!r:.60}"
    return None


def data_record_problem(data: Any) -> str | None:
    """What is wrong with config.json's ``data`` record, which --resume reads back (None: nothing)."""
    if not isinstance(data, dict) or not isinstance(data.get("root"), str):
        return "config.json: 'data' must be an object with the data folder's root"
    if data.get("val_dir") is not None and not isinstance(data["val_dir"], str):
        return "config.json: data.val_dir must be a folder or null"
    skipped = data.get("skipped", [])
    if not isinstance(skipped, list) or not all(
        isinstance(d, dict) and isinstance(d.get("path"), str) and isinstance(d.get("reason"), str) for d in skipped
    ):
        return "config.json: data.skipped must be a list of {path, reason}"
    return None
