"""Device profiles (``devices/*.yaml``): how to run a bundle on one kind of board, and how to recognise it.

A profile is data: the runtime, ONNX Runtime provider or OpenVINO device, threads, streams,
precision and batch size that suit a device, the notes a user needs to read the numbers, and a
``match`` block that lets ``edgetl doctor`` say which profile fits the machine it runs on.
``--device-profile NAME|PATH`` applies one to ``bench`` and ``predict``; options given on the
command line win over the profile's values (and the JSON says which came from where).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import TYPE_CHECKING, Any

from edgetl.core.errors import ConfigError
from edgetl.core.formats import DEFAULT_RUNTIME, PRECISIONS, RUNTIMES
from edgetl.core.shipped import check_keys, list_shipped, load
from edgetl.device import limits

if TYPE_CHECKING:
    from edgetl.device.bundle_loading import LoadOptions

KIND = "device-profile"
# The options a profile sets, in the order they are shown; each is also a bench/predict option.
SETTINGS = ("runtime", "provider", "provider_options", "ov_device", "threads", "streams", "precision", "batch_size")


@dataclasses.dataclass(frozen=True)
class DeviceMatch:
    """How doctor recognises the device. Patterns are case-insensitive regular expressions.

    ``arch`` and ``isa`` are requirements (a machine without them does not fit); ``board`` and
    ``cpu`` identify the device (one of them must match when given); ``ov_devices`` and
    ``providers`` are what the profile's settings need: missing ones are reported, not fatal.
    ``fallback``: fits any machine of the right ``arch`` when no profile identifies it.
    """

    arch: tuple[str, ...] = ()
    isa: tuple[str, ...] = ()
    board: tuple[str, ...] = ()
    cpu: tuple[str, ...] = ()
    ov_devices: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    fallback: bool = False


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    name: str
    path: str
    description: str
    hardware: str = ""
    # One runtime, or several in order of preference (YAML list): the first that is installed and
    # whose format the bundle holds is used (see Bundle.pick_runtime).
    runtime: str | tuple[str, ...] = DEFAULT_RUNTIME
    provider: str | None = None  # ONNX Runtime execution provider (short name or full name)
    provider_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    ov_device: str | None = None  # OpenVINO device: CPU, GPU, NPU, AUTO ...
    threads: int | None = None  # None: the runtime's default
    streams: int | None = None  # OpenVINO only
    precision: str | None = None  # None: every precision the bundle has (bench) / fp32 (predict)
    batch_size: int = 1
    match: DeviceMatch = DeviceMatch()
    notes: str = ""

    @property
    def runtimes(self) -> tuple[str, ...]:
        """The runtime, or the runtimes in order of preference."""
        return (self.runtime,) if isinstance(self.runtime, str) else tuple(self.runtime)

    def settings(self) -> dict[str, Any]:
        """What this profile sets, only the values it gives (``None`` means "runtime default")."""
        values = {k: getattr(self, k) for k in SETTINGS}
        return {k: v for k, v in values.items() if v not in (None, {})}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["match"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["match"].items()}
        return d


def load_profile(name_or_path: str | os.PathLike) -> DeviceProfile:
    """A shipped profile by name (``rpi5``) or a YAML file by path; unknown keys are errors."""
    data, path = load(KIND, name_or_path, DeviceProfile)
    return profile_from_dict(data, name=path.stem, path=str(path))


def list_profiles() -> list[DeviceProfile]:
    return [load_profile(name) for name in list_shipped(KIND)]


def profile_from_dict(data: dict[str, Any], *, name: str, path: str = "<dict>") -> DeviceProfile:
    where = f"{KIND} {path}"
    data = dict(data)
    for key in ("name", "path"):  # a profile is named by its file
        if key in data:
            raise ConfigError(f"{where}: {key!r} is not a profile key (the file name is the profile's name)")
    if "description" not in data:
        raise ConfigError(f"{where}: 'description' is required (one line: which device this is)")
    match = data.pop("match", None) or {}
    if not isinstance(match, dict):
        raise ConfigError(f"{where}: 'match' must be a mapping")
    check_keys(match, DeviceMatch, f"{where}: match")
    match_obj = DeviceMatch(
        **{k: (bool(v) if k == "fallback" else _str_tuple(v, f"match.{k}", where)) for k, v in match.items()}
    )
    for k in ("board", "cpu"):
        for pattern in getattr(match_obj, k):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(
                    f"{where}: match.{k} pattern {pattern!r} is not a regular expression: {exc}"
                ) from None
    if isinstance(data.get("runtime"), list):
        data["runtime"] = _str_tuple(data["runtime"], "runtime", where)
        if not data["runtime"]:
            raise ConfigError(f"{where}: runtime must name at least one runtime")
    profile = DeviceProfile(name=name, path=path, match=match_obj, **data)
    _validate(profile, where)
    return profile


def _str_tuple(value: Any, key: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key} must be a string or a list of strings")
    return tuple(value)


def _validate(p: DeviceProfile, where: str) -> None:
    if not isinstance(p.description, str) or not p.description.strip():
        raise ConfigError(f"{where}: 'description' must be a non-empty string")
    if not isinstance(p.runtime, (str, tuple)):
        raise ConfigError(f"{where}: runtime must be a runtime name or a list of them in order of preference")
    for runtime in p.runtimes:
        if runtime not in RUNTIMES:
            raise ConfigError(f"{where}: runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if p.precision is not None and p.precision not in PRECISIONS:
        raise ConfigError(f"{where}: precision {p.precision!r} is not one of {', '.join(PRECISIONS)}")
    for key in ("threads", "streams"):
        value = getattr(p, key)
        if value is not None and limits.problem(key, value):
            raise ConfigError(f"{where}: {limits.problem(key, value)} (or null)")
    if limits.problem("batch_size", p.batch_size):
        raise ConfigError(f"{where}: {limits.problem('batch_size', p.batch_size)}")
    if not isinstance(p.provider_options, dict):
        raise ConfigError(f"{where}: provider_options must be a mapping")
    for key, value in p.provider_options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: provider_options {key!r} must be a finite number, not {value!r}")
    if "openvino" not in p.runtimes and (p.ov_device is not None or p.streams is not None):
        raise ConfigError(f"{where}: ov_device and streams apply to runtime openvino, not {'/'.join(p.runtimes)}")
    if "onnxruntime" not in p.runtimes and (p.provider is not None or p.provider_options):
        raise ConfigError(
            f"{where}: provider and provider_options apply to runtime onnxruntime, not {'/'.join(p.runtimes)}"
        )
    if not isinstance(p.notes, str) or not isinstance(p.hardware, str):
        raise ConfigError(f"{where}: notes and hardware must be strings")


def merge_settings(profile: DeviceProfile | None, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Command-line values (``None``: not given) over the profile's; returns the merged values and,
    per setting, where it came from (``option``, ``profile``)."""
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    from_profile = profile.settings() if profile is not None else {}
    for key in SETTINGS:
        if given.get(key) is not None:
            merged[key], source[key] = given[key], "option"
        elif key in from_profile:
            merged[key], source[key] = from_profile[key], "profile"
        else:
            merged[key] = None
    # An explicit runtime on the command line drops the profile's settings for the other runtimes.
    runtime = merged["runtime"] or DEFAULT_RUNTIME
    if isinstance(runtime, str):
        other = []
        if runtime != "onnxruntime":
            other += ["provider", "provider_options"]
        if runtime != "openvino":
            other += ["ov_device", "streams"]
        for key in other:
            if source.get(key) == "profile":
                merged[key] = None
                del source[key]
    return merged, source


@dataclasses.dataclass(frozen=True)
class Settings:
    """What predict and bench run with: the options given over the device profile's values."""

    values: dict[str, Any]  # every key of SETTINGS (None: not set)
    source: dict[str, str]  # setting -> "option" or "profile"
    profile: DeviceProfile | None = None

    @property
    def runtime(self) -> str | tuple[str, ...]:
        """The runtime, or (from a profile) the runtimes in order of preference: see :meth:`runtime_for`."""
        return self.values["runtime"] or DEFAULT_RUNTIME

    def runtime_for(self, bundle: Any) -> str:
        """The runtime to run ``bundle`` with: the one asked for, or the profile's first preference
        that is installed here and whose format the bundle holds."""
        runtime = self.runtime
        return runtime if isinstance(runtime, str) else bundle.pick_runtime(runtime, self.values["precision"])

    def load_options(self, runtime: str | None = None, *, strict: bool = True) -> dict[str, Any]:
        """Accelerator options for ``Bundle.load`` (provider, provider_options, device, streams).

        ``strict`` (one runtime asked for): every option set goes to the load, which refuses, by
        name, one that does not apply to the runtime. Otherwise (bench --all) each runtime takes
        only its own: the ONNX Runtime OpenVINO provider takes the device too.
        """
        from edgetl.device.backends import LOAD_OPTIONS, backend

        runtime = runtime or self.runtime
        if not isinstance(runtime, str):
            raise TypeError("load_options needs the runtime chosen for the bundle (Settings.runtime_for)")
        options = {k: self.values[s] for k, (s, _) in LOAD_OPTIONS.items() if self.values[s] is not None}
        if strict and isinstance(self.runtime, str):
            return options
        accepted = set(backend(runtime).options)
        if runtime == "onnxruntime" and str(self.values["provider"] or "").lower() not in (
            "openvino",
            "openvinoexecutionprovider",
        ):
            accepted.discard("device")  # device_type of the OpenVINO provider only
        return {k: v for k, v in options.items() if k in accepted}

    def profile_doc(self) -> dict[str, Any] | None:
        """``{name, path, applied, overridden}`` for the JSON: which settings came from the profile."""
        if self.profile is None:
            return None
        return {
            "name": self.profile.name,
            "path": self.profile.path,
            "applied": {k: self.values[k] for k, s in self.source.items() if s == "profile"},
            "overridden": sorted(k for k, s in self.source.items() if s == "option" and k in self.profile.settings()),
        }


def resolve_settings(device_profile: str | os.PathLike | DeviceProfile | None, given: dict[str, Any]) -> Settings:
    """The one place a device profile meets the command line (predict and bench): ``given`` maps
    keys of :data:`SETTINGS` to values, ``None`` meaning not given."""
    profile = load_profile(device_profile) if isinstance(device_profile, (str, os.PathLike)) else device_profile
    values, source = merge_settings(profile, given)
    return Settings(values, source, profile)


def apply_profile(device_profile: str | os.PathLike | DeviceProfile | None, options: LoadOptions) -> LoadOptions:
    """``options`` (predict's: ``None`` fields are not given) over the device profile's settings:
    what :meth:`~edgetl.device.bundle_loading.Bundle.load` runs with."""
    from edgetl.device.backends import LOAD_OPTIONS

    given = {setting: getattr(options, option) for option, (setting, _) in LOAD_OPTIONS.items()}
    given.update(runtime=options.runtime, precision=options.precision, threads=options.threads)
    s = resolve_settings(device_profile, given)
    return dataclasses.replace(
        options,
        runtime=s.runtime,
        precision=s.values["precision"],
        threads=s.values["threads"],
        **{option: s.values[setting] for option, (setting, _) in LOAD_OPTIONS.items()},
    )


# --- which profile fits this machine ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fit:
    profile: str
    score: int
    reasons: tuple[str, ...]
    missing: tuple[str, ...]  # what the profile's settings need and this machine lacks

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "score": self.score,
            "reasons": list(self.reasons),
            "missing": list(self.missing),
        }


def _search(patterns: tuple[str, ...], texts: list[str]) -> str | None:
    for pattern in patterns:
        for text in texts:
            if text and re.search(pattern, text, flags=re.IGNORECASE):
                return f"{pattern!r} in {text!r}"
    return None


def fit(profile: DeviceProfile, facts: dict[str, Any]) -> Fit | None:
    """How well ``profile`` fits a machine described by ``facts`` (doctor's ``machine`` and
    ``runtimes`` facts: arch, cpu, board, cpu_cores, isa, providers, ov_devices); None: it does not."""
    m = profile.match
    reasons: list[str] = []
    arch = facts.get("arch") or ""
    if m.arch:
        if arch not in m.arch:
            return None
        reasons.append(f"architecture {arch}")
    isa = facts.get("isa")
    if m.isa:
        if isa is None or not set(m.isa) <= set(isa):
            return None
        reasons.append("CPU features " + ", ".join(m.isa))
    score = 1
    identified = False
    board_hit = _search(m.board, [facts.get("board") or ""])
    if board_hit:
        score += 4
        identified = True
        reasons.append(f"board {board_hit}")
    cpu_hit = _search(m.cpu, [facts.get("cpu") or "", *(facts.get("cpu_cores") or [])])
    if cpu_hit:
        score += 2
        identified = True
        reasons.append(f"CPU {cpu_hit}")
    if (m.board or m.cpu) and not identified:
        if not m.fallback:
            return None
        reasons.append("fallback for this architecture")
        score = 0
    missing = []
    have_ov = {d.split(".")[0] for d in facts.get("ov_devices") or []}
    for dev in m.ov_devices:
        if dev in have_ov:
            score += 1
            reasons.append(f"OpenVINO device {dev}")
        else:
            missing.append(f"OpenVINO device {dev}")
    for prov in m.providers:
        if prov in (facts.get("providers") or []):
            score += 1
            reasons.append(f"ONNX Runtime provider {prov}")
        else:
            missing.append(f"ONNX Runtime provider {prov}")
    return Fit(profile.name, score, tuple(reasons), tuple(missing))


def best_fit(facts: dict[str, Any], profiles: list[DeviceProfile] | None = None) -> list[Fit]:
    """Profiles that fit, best first (ties: fewer missing requirements, then name)."""
    profiles = list_profiles() if profiles is None else profiles
    fits = [f for f in (fit(p, facts) for p in profiles) if f is not None]
    return sorted(fits, key=lambda f: (-f.score, len(f.missing), f.profile))


def profile_label(profile: DeviceProfile) -> str:
    """``onnxruntime/cpu, 4 threads, int8, batch 1``: a profile's settings in one line."""
    targets = {"onnxruntime": profile.provider or "cpu", "openvino": profile.ov_device or "CPU"}
    parts = [" or ".join(f"{r}/{targets.get(r, 'cpu')}" for r in profile.runtimes)]
    parts.append(f"{profile.threads} threads" if profile.threads else "default threads")
    if profile.streams:
        parts.append(f"{profile.streams} streams")
    parts.append(profile.precision or "every precision")
    parts.append(f"batch {profile.batch_size}")
    return ", ".join(parts)
