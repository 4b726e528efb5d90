"""Run a bundle on the device: verify it, load one variant, classify images. No torch anywhere.

A bundle holds one trunk (image -> pooled features) and one or more heads (features -> logits) per
variant (format + precision). :class:`Predictor` runs the trunk once per batch and every selected
head on the same features, which is what makes several tasks on one device cheap.

Back-ends are looked up by runtime name in ``_BACKENDS`` and import their library lazily, so a
device with only ONNX Runtime never needs OpenVINO (and nothing here ever needs torch). ONNX
Runtime runs ``onnx/`` files, OpenVINO runs ``openvino/`` IR with the variant's inference precision
pinned (see :func:`_load_openvino`).

Accelerators: ONNX Runtime's execution provider (``provider``: ``cpu``, ``cuda``, ``tensorrt``,
``openvino``, ``coreml``, ``xnnpack`` ... whichever the installed build has) and OpenVINO's device
(``device``: ``CPU``, ``GPU``, ``NPU``, ``AUTO``). Asking for one this machine lacks is a
:class:`BackendError` that lists what it has; a provider that is installed but fails to start (a
CUDA build without a GPU) is refused too, rather than silently running on the CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgetl.core.bundle import read_manifest, verify_files
from edgetl.core.errors import BackendError, BundleError, ConfigError, DataError
from edgetl.core.formats import PRECISIONS, variant_name
from edgetl.core.imagefolder import IMAGE_EXTENSIONS
from edgetl.core.preprocess import Preprocessing, load_image, preprocess_batch

DEFAULT_RUNTIME = "onnxruntime"
ALL_HEADS = "all"

# A loaded model file: float32 array in, float32 array out (one input, one output).
Model = Callable[[np.ndarray], np.ndarray]

# ONNX Runtime execution providers by short name (the full names are accepted too), and how to
# get a build that has each.
PROVIDERS: dict[str, tuple[str, str]] = {
    "cpu": ("CPUExecutionProvider", "always present"),
    "cuda": ("CUDAExecutionProvider", "pip install onnxruntime-gpu (Jetson: the JetPack wheel)"),
    "tensorrt": ("TensorrtExecutionProvider", "pip install onnxruntime-gpu plus TensorRT (Jetson: the JetPack wheel)"),
    "openvino": ("OpenVINOExecutionProvider", "pip install onnxruntime-openvino"),
    "coreml": ("CoreMLExecutionProvider", "the macOS onnxruntime wheel"),
    "xnnpack": ("XnnpackExecutionProvider", "an onnxruntime build with --use_xnnpack (Android/iOS packages have it)"),
    "dnnl": ("DnnlExecutionProvider", "an onnxruntime build with --use_dnnl"),
    "directml": ("DmlExecutionProvider", "pip install onnxruntime-directml (Windows)"),
    "qnn": ("QNNExecutionProvider", "pip install onnxruntime-qnn (Windows on Snapdragon)"),
    "rocm": ("ROCMExecutionProvider", "pip install onnxruntime-rocm"),
    "migraphx": ("MIGraphXExecutionProvider", "pip install onnxruntime-migraphx"),
    "acl": ("ACLExecutionProvider", "an onnxruntime build with --use_acl"),
    "nnapi": ("NnapiExecutionProvider", "the Android onnxruntime package"),
}
# Providers that hand what they cannot run to another accelerator before the CPU.
_PROVIDER_CHAIN = {"TensorrtExecutionProvider": ("CUDAExecutionProvider",)}
# In get_available_providers() but no local device: ORT's Azure provider calls remote endpoints.
_NOT_LOCAL = frozenset({"AzureExecutionProvider"})
# Which load options each runtime understands (``threads`` is common to all).
_RUNTIME_OPTIONS = {"onnxruntime": ("provider", "provider_options", "device"), "openvino": ("device", "streams")}
_OPTION_FLAGS = {
    "provider": "--provider",
    "provider_options": "provider_options",
    "device": "--ov-device",
    "streams": "--streams",
}


def provider_short_name(full_name: str) -> str:
    return next((short for short, (full, _) in PROVIDERS.items() if full == full_name), full_name)


def onnxruntime_providers() -> list[str]:
    """Short names of the providers this onnxruntime build offers, in its order of preference."""
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    import onnxruntime as ort

    return [provider_short_name(p) for p in ort.get_available_providers() if p not in _NOT_LOCAL]


def resolve_provider(name: str | None) -> str:
    """A provider's full ONNX Runtime name; BackendError listing the available ones if it is missing."""
    import onnxruntime as ort

    if name is None:
        return "CPUExecutionProvider"
    known = {short: full for short, (full, _) in PROVIDERS.items()}
    full = known.get(name.lower()) or next((p for p in ort.get_all_providers() if p.lower() == name.lower()), None)
    if full is None:
        raise ConfigError(f"unknown ONNX Runtime provider {name!r}; choose one of {', '.join(PROVIDERS)}")
    if full not in ort.get_available_providers():
        short = provider_short_name(full)
        hint = PROVIDERS[short][1] if short in PROVIDERS else "an onnxruntime build that includes it"
        raise BackendError(
            f"ONNX Runtime provider {short!r} is not in this build (onnxruntime {ort.__version__} "
            f"has: {', '.join(onnxruntime_providers())}); for {short}: {hint}"
        )
    return full


def openvino_devices() -> list[str]:
    """OpenVINO's devices on this machine (``CPU``, ``GPU.0``, ``NPU`` ...); [] without OpenVINO."""
    if importlib.util.find_spec("openvino") is None:
        return []
    return list(openvino_core().available_devices)


def openvino_core():
    """One ``openvino.Core`` per process (creating it scans for plugins and devices)."""
    global _OV_CORE
    if _OV_CORE is None:
        import openvino

        _OV_CORE = openvino.Core()
    return _OV_CORE


_OV_CORE = None
# Virtual devices that pick or combine real ones; "AUTO:GPU,CPU" lists candidates after the colon.
_OV_VIRTUAL = ("AUTO", "MULTI", "HETERO", "BATCH")


def check_openvino_device(device: str) -> str:
    """``device`` as OpenVINO spells it; BackendError listing the devices present if one is missing."""
    available = openvino_devices()
    base = {d.split(".")[0] for d in available}
    name, _, candidates = device.upper().partition(":")
    wanted = [c.strip() for c in candidates.split(",") if c.strip()] if name in _OV_VIRTUAL else [device.upper()]
    for d in wanted:
        if d not in available and d not in base:
            raise BackendError(
                f"OpenVINO device {d!r} is not available here (OpenVINO has: {', '.join(available) or 'no devices'}"
                f"{', AUTO' if available else ''}); GPU needs the Intel GPU compute runtime, NPU the NPU driver"
            )
    return device.upper()


@dataclasses.dataclass(frozen=True)
class _Backend:
    """How a runtime name maps to bundle files and to a loader (``None``: not implemented yet)."""

    format: str
    module: str
    install_hint: str
    loader: Callable[..., Model] | None


def _load_onnxruntime(
    path: Path,
    *,
    threads: int | None,
    provider: str | None = None,
    provider_options: dict[str, Any] | None = None,
    device: str | None = None,
) -> Model:
    """One ``InferenceSession``, fully optimised, wrapped as a plain callable.

    ``provider`` (default CPU) comes first, then what it hands work to (TensorRT -> CUDA), then the
    CPU provider for the operators an accelerator does not support. ``device`` is the OpenVINO
    provider's ``device_type``.
    """
    import onnxruntime as ort

    full = resolve_provider(provider)
    options_for_provider = dict(provider_options or {})
    if device is not None:
        if full != "OpenVINOExecutionProvider":
            raise ConfigError(
                "--ov-device with --runtime onnxruntime needs --provider openvino; or use --runtime openvino"
            )
        options_for_provider.setdefault("device_type", device.upper())
    if threads is not None and full == "XnnpackExecutionProvider":
        options_for_provider.setdefault("intra_op_num_threads", threads)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    chain = [full, *(p for p in _PROVIDER_CHAIN.get(full, ()) if p in ort.get_available_providers())]
    providers: list[Any] = [(full, options_for_provider), *chain[1:]]
    if "CPUExecutionProvider" not in chain:
        providers.append("CPUExecutionProvider")
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own pybind exception types (Fail, InvalidGraph, ...)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if full != "CPUExecutionProvider":
            raise BackendError(
                f"ONNX Runtime cannot load {path} with {provider_short_name(full)}: {first_line}"
            ) from None
        raise BundleError(f"ONNX Runtime cannot load {path}: {first_line}") from None
    if session.get_providers()[0] != full:
        # ORT falls back to the CPU (with a warning on stderr) when a provider's libraries or device are missing.
        raise BackendError(
            f"ONNX Runtime provider {provider_short_name(full)!r} is installed but did not start "
            f"(the session fell back to {', '.join(provider_short_name(p) for p in session.get_providers())}); "
            "check its libraries and device (ONNX Runtime's warning above says which)"
        )
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise BundleError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; edgetl models have one of each")
    input_name, output_name = inputs[0].name, outputs[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: x})[0]

    return run


def _ov_type_name(value: Any) -> str:
    """OpenVINO element type (``<Type: 'float32'>``) as its short name: f32, bf16, f16."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


def _load_openvino(
    path: Path,
    *,
    threads: int | None,
    device: str | None = None,
    streams: int | None = None,
    inference_precision: str | None = None,
) -> Model:
    """One compiled IR model with its own infer request, wrapped as a plain callable.

    ``inference_precision`` is the variant's ``INFERENCE_PRECISION_HINT`` from the manifest. It is
    always pinned because the CPU plugin otherwise picks bf16 by itself on CPUs with bf16 support
    (AMX, AVX512-BF16), and an "fp32" variant then differs from what the export measured by ~0.1
    in features. The callable's ``runtime_info`` says what the plugin actually runs.
    """
    core = openvino_core()
    device = device or "CPU"
    config: dict[str, Any] = {}
    if inference_precision is not None:
        config["INFERENCE_PRECISION_HINT"] = inference_precision
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    if streams is not None:
        config["NUM_STREAMS"] = streams
    try:
        compiled = core.compile_model(core.read_model(str(path)), device, config)
    except Exception as exc:  # OpenVINO raises RuntimeError with multi-line C++ context
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"OpenVINO cannot load {path} on {device}: {first_line}") from None
    if len(compiled.inputs) != 1 or len(compiled.outputs) != 1:
        raise BundleError(
            f"{path} has {len(compiled.inputs)} inputs and {len(compiled.outputs)} outputs; "
            "edgetl models have one of each"
        )
    request = compiled.create_infer_request()
    from openvino import Tensor

    def run(x: np.ndarray) -> np.ndarray:
        # A tensor over x's memory (callers pass C-contiguous float32), not infer({0: x}): that
        # copies the input and every output per call, ~0.1 ms more on a 2-core Xeon (a 2.5 ms model).
        request.set_input_tensor(Tensor(np.ascontiguousarray(x), shared_memory=True))
        request.infer()
        # The request reuses its output buffer: copy before the next call overwrites it.
        return request.get_output_tensor(0).data.copy()

    info: dict[str, Any] = {"device": device}
    try:
        info["inference_precision"] = _ov_type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
    except Exception:  # virtual devices (AUTO, MULTI) do not all report it
        info["inference_precision"] = None
    run.runtime_info = info  # type: ignore[attr-defined]
    return run


_BACKENDS: dict[str, _Backend] = {
    "onnxruntime": _Backend("onnx", "onnxruntime", "pip install onnxruntime", _load_onnxruntime),
    "openvino": _Backend("openvino", "openvino", "pip install 'edgetl[openvino]'", _load_openvino),
}
RUNTIMES: tuple[str, ...] = tuple(_BACKENDS)


def _backend(runtime: str) -> _Backend:
    try:
        return _BACKENDS[runtime]
    except KeyError:
        raise ConfigError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}") from None


def import_backend(runtime: str) -> None:
    """Import the runtime's library now (bench calls this so import time is not counted as model load)."""
    spec = _backend(runtime)
    if importlib.util.find_spec(spec.module) is None:
        raise BackendError(f"runtime {runtime!r} is not installed: {spec.install_hint}")
    if spec.loader is None:
        raise BackendError(f"runtime {runtime!r} is not supported by edgetl yet; use --runtime onnxruntime")
    importlib.import_module(spec.module)


def open_bundle(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Read the manifest and (by default) check every file's sha256 before anything is loaded.

    A bundle travels by USB stick and scp; a truncated or edited model file must fail here with the
    file named, not later as a puzzling ONNX Runtime error or, worse, as wrong predictions.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    return Bundle(path, manifest)


class Bundle:
    """A verified bundle: its input contract, heads with their labels, and the variants it holds."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.preprocessing: Preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
        self.heads: dict[str, tuple[str, ...]] = {name: tuple(h["labels"]) for name, h in manifest["heads"].items()}
        default = manifest.get("default_head")
        if default is None and len(self.heads) == 1:
            default = next(iter(self.heads))
        if default is not None and default not in self.heads:
            raise BundleError(
                f"bundle {self.path}: default_head {default!r} is not one of its heads ({', '.join(self.heads)})"
            )
        self.default_head: str | None = default
        self.variants: tuple[str, ...] = tuple(manifest["variants"])

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, variants={list(self.variants)}, heads={list(self.heads)})"

    def precisions(self, fmt: str) -> list[str]:
        """Precisions available for one format, in the canonical order (fp32 first)."""
        have = {v["precision"] for v in self.manifest["variants"].values() if v["format"] == fmt}
        return [p for p in PRECISIONS if p in have]

    def variant(self, fmt: str, precision: str) -> dict[str, Any]:
        """The manifest record of one variant; a BundleError lists what the bundle has instead."""
        name = variant_name(fmt, precision)
        try:
            return self.manifest["variants"][name]
        except KeyError:
            raise BundleError(
                f"bundle {self.path} has no {name} variant (it has: {', '.join(self.variants)}); "
                "choose another --precision/--runtime or re-export"
            ) from None

    def runtime_precisions(self, runtime: str) -> list[str]:
        """Precisions this bundle holds for a runtime; BackendError when it holds none."""
        fmt = _backend(runtime).format
        have = self.precisions(fmt)
        if not have:
            raise BackendError(
                f"bundle {self.path} has no {fmt} files for runtime {runtime!r} (it has: {', '.join(self.variants)}); "
                f"use another --runtime or re-export with --format {fmt}"
            )
        return have

    def resolve_precision(self, runtime: str, precision: str | None) -> str:
        """``None`` means fp32 when the bundle has it, else its only precision for this runtime."""
        have = self.runtime_precisions(runtime)
        if precision is None:
            if "fp32" in have or len(have) == 1:
                return "fp32" if "fp32" in have else have[0]
            raise BundleError(f"bundle {self.path} has {', '.join(have)} for {runtime}; choose one with --precision")
        if precision not in have:
            raise BundleError(
                f"bundle {self.path} has no {precision} variant for {runtime} (it has: {', '.join(have)})"
            )
        return precision

    def resolve_heads(self, variant: dict[str, Any], heads: str | Sequence[str] | None) -> tuple[str, ...]:
        """``None``: the default head; ``"all"``: every head of the variant; else the names given."""
        available = [h for h in self.heads if h in variant["heads"]]
        if heads is None:
            if self.default_head is None:
                raise BundleError(
                    f"bundle {self.path} has several heads ({', '.join(self.heads)}) and no default; "
                    "choose one with --head NAME or --head all"
                )
            heads = [self.default_head]
        elif heads == ALL_HEADS:
            heads = available
        elif isinstance(heads, str):
            heads = [heads]
        for h in heads:
            if h not in available:
                raise BundleError(
                    f"bundle {self.path} has no head {h!r} in this variant (it has: {', '.join(available)})"
                )
        if not heads:
            raise ConfigError("no head selected")
        return tuple(dict.fromkeys(heads))

    def files_of(self, variant: dict[str, Any], heads: Sequence[str]) -> list[str]:
        """Relative paths of the trunk and the given heads of a variant."""
        return [variant["trunk"], *(variant["heads"][h] for h in heads)]

    def model_bytes(self, variant: dict[str, Any], heads: Sequence[str]) -> int:
        """What the device stores for this variant: trunk + heads, companion files (.bin) included."""
        total = 0
        for rel in dict.fromkeys(self.files_of(variant, heads)):
            rec = self.manifest["files"][rel]
            companions = (rec.get("extra_files") or {}).values()
            total += int(rec.get("bytes", 0)) + sum(int(r.get("bytes", 0)) for r in companions)
        return total

    def load(
        self,
        *,
        runtime: str = DEFAULT_RUNTIME,
        precision: str | None = None,
        heads: str | Sequence[str] | None = None,
        threads: int | None = None,
        provider: str | None = None,
        provider_options: dict[str, Any] | None = None,
        device: str | None = None,
        streams: int | None = None,
        merged: bool = False,
    ) -> Predictor:
        """Create the sessions of one variant: its trunk and the selected heads (default head if None).

        ``provider``/``provider_options``: ONNX Runtime execution provider (default CPU);
        ``device``: OpenVINO device (default CPU; with ONNX Runtime, the OpenVINO provider's device);
        ``streams``: OpenVINO CPU/GPU streams. ``None`` leaves each to the runtime.
        ``merged``: load each head's single-graph file (trunk + head in one graph, ``export --merged``)
        instead of the shared trunk; each head then runs its own copy of the trunk.
        """
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1, not {threads}")
        if streams is not None and streams < 1:
            raise ConfigError(f"streams must be >= 1, not {streams}")
        backend = _backend(runtime)
        options = {
            k: v
            for k, v in (
                ("provider", provider),
                ("provider_options", provider_options),
                ("device", device),
                ("streams", streams),
            )
            if v is not None
        }
        for key in options:
            if key not in _RUNTIME_OPTIONS.get(runtime, ()):
                users = [r for r, keys in _RUNTIME_OPTIONS.items() if key in keys]
                raise ConfigError(f"{_OPTION_FLAGS[key]} applies to --runtime {' or '.join(users)}, not {runtime}")
        precision = self.resolve_precision(runtime, precision)
        variant = self.variant(backend.format, precision)
        head_names = self.resolve_heads(variant, heads)
        import_backend(runtime)
        assert backend.loader is not None  # import_backend refuses unimplemented back-ends
        if runtime == "openvino" and device is not None:
            options["device"] = check_openvino_device(device)
        if variant.get("inference_precision") is not None:  # OpenVINO: what the export measured
            options["inference_precision"] = variant["inference_precision"]
        if merged:
            missing = [h for h in head_names if h not in (variant.get("merged") or {})]
            if missing:
                raise BundleError(
                    f"bundle {self.path}: variant {variant_name(backend.format, precision)} has no merged graph for "
                    f"head {missing[0]!r}; export with --merged"
                )
            trunk = None
            head_models = {
                h: backend.loader(self.path / variant["merged"][h], threads=threads, **options) for h in head_names
            }
        else:
            trunk = backend.loader(self.path / variant["trunk"], threads=threads, **options)
            head_models = {
                h: backend.loader(self.path / variant["heads"][h], threads=threads, **options) for h in head_names
            }
        first = trunk if trunk is not None else next(iter(head_models.values()))
        return Predictor(
            bundle=self,
            runtime=runtime,
            precision=precision,
            variant=variant_name(backend.format, precision),
            trunk=trunk,
            heads=head_models,
            runtime_info=getattr(first, "runtime_info", None),
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable: shifted by the row max)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """One loaded variant: trunk + selected heads. Inputs are preprocessed (N, 3, S, S) float32."""

    def __init__(
        self,
        *,
        bundle: Bundle,
        runtime: str,
        precision: str,
        variant: str,
        trunk: Model | None,
        heads: dict[str, Model],
        runtime_info: dict[str, Any] | None = None,
    ) -> None:
        self.bundle = bundle
        self.runtime = runtime
        self.precision = precision
        self.variant = variant
        # What the runtime reports it runs (OpenVINO: device, inference_precision); {} for ONNX Runtime.
        self.runtime_info: dict[str, Any] = dict(runtime_info or {})
        self.merged = trunk is None  # heads are whole graphs (image -> logits), see Bundle.load(merged=True)
        self.preprocessing = bundle.preprocessing
        self.head_names: tuple[str, ...] = tuple(heads)
        self.labels: dict[str, tuple[str, ...]] = {h: bundle.heads[h] for h in heads}
        self._trunk = trunk
        self._heads = heads

    def __repr__(self) -> str:
        return f"Predictor({self.variant!r}, runtime={self.runtime!r}, heads={list(self.head_names)})"

    def preprocess(self, images: Iterable[Image.Image]) -> np.ndarray:
        """PIL images -> (N, 3, S, S) float32, exactly as in training (see :mod:`edgetl.core.preprocess`)."""
        images = list(images)
        if not images:
            raise DataError("no images to preprocess")
        return preprocess_batch(images, self.preprocessing)

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        s = self.preprocessing.input_size
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1:] != (3, s, s) or x.shape[0] < 1:
            got = getattr(x, "shape", type(x).__name__)
            raise DataError(f"model input must be an array of shape (N, 3, {s}, {s}), got {got}; use .preprocess()")
        return np.ascontiguousarray(x, dtype=np.float32)  # a float64 array from numpy maths is fine too

    def features(self, x: np.ndarray) -> np.ndarray:
        """Trunk only: (N, 3, S, S) -> (N, D) pooled features."""
        if self._trunk is None:
            raise ConfigError("a merged predictor has no separate trunk; load without merged=True for features")
        return self._trunk(self._check_input(x))

    def logits(self, x: np.ndarray, heads: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Trunk once, then every selected head (or the loaded ones named) on the same features."""
        if self._trunk is None:  # merged graphs: image -> logits each
            x = self._check_input(x)
            return {name: self._heads[name](x) for name in (heads or self._heads)}
        feats = self.features(x)
        return self.head_logits(feats, heads)

    def head_logits(self, features: np.ndarray, heads: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Heads only, on trunk features: {head: (N, C) logits} (bench times each head this way)."""
        if heads is None:
            return {name: head(features) for name, head in self._heads.items()}
        unknown = [h for h in heads if h not in self._heads]
        if unknown:
            raise ConfigError(f"head {unknown[0]!r} is not loaded (loaded: {', '.join(self._heads)})")
        return {name: self._heads[name](features) for name in heads}

    def predict(
        self, images: Sequence[str | os.PathLike | Image.Image], *, top_k: int = 5, batch_size: int = 32
    ) -> list[dict[str, Any]]:
        """Classify image files or PIL images; an unreadable file raises :class:`DataError`.

        Returns one record per image and selected head, image-major:
        ``{image, head, label, score, top_k: [{label, score}]}`` with softmax scores.
        """
        _check_positive(top_k=top_k, batch_size=batch_size)
        images = list(images)
        names = [_image_name(im, i) for i, im in enumerate(images)]
        records: list[dict[str, Any]] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            loaded = [im if isinstance(im, Image.Image) else load_image(im) for im in chunk]
            records.extend(self._predict_loaded(names[start : start + batch_size], loaded, top_k))
        return records

    def _predict_loaded(self, names: list[str], images: list[Image.Image], top_k: int) -> list[dict[str, Any]]:
        return self._records(names, self.logits(self.preprocess(images)), top_k)

    def _records(self, names: list[str], logits: dict[str, np.ndarray], top_k: int) -> list[dict[str, Any]]:
        probs = {h: softmax(v) for h, v in logits.items()}
        records = []
        for head, p in probs.items():
            if p.ndim != 2 or p.shape[1] != len(self.labels[head]):
                raise BundleError(
                    f"bundle {self.bundle.path}: head {head!r} returns shape {p.shape} "
                    f"but has {len(self.labels[head])} labels; re-export the bundle"
                )
        for i, name in enumerate(names):
            for head in self.head_names:
                p, labels = probs[head][i], self.labels[head]
                order = np.argsort(-p, kind="stable")[: min(top_k, len(labels))]
                top = [{"label": labels[j], "score": float(p[j])} for j in order]
                records.append(
                    {"image": name, "head": head, "label": top[0]["label"], "score": top[0]["score"], "top_k": top}
                )
        return records


@dataclasses.dataclass(frozen=True)
class PredictReport:
    """Predictions for the readable images, and ``(path, reason)`` for the files that were skipped."""

    predictions: list[dict[str, Any]]
    skipped: list[tuple[str, str]]


def find_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given (any extension: the user named them), folders recursively by image extension."""
    return list(iter_images(inputs))


def iter_images(inputs: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """:func:`find_images` as a stream: folders are walked lazily, each in ``sorted(rglob)`` order,
    so memory does not grow with the folder. Every input is checked now, before the first path is
    yielded (missing paths, folders without images). A file named twice, or inside a folder also
    named, is yielded once."""
    inputs = [Path(item) for item in inputs]
    explicit: set[str] = set()
    folders: list[Path] = []
    for p in inputs:
        if p.is_dir():
            if next(_walk_images(p), None) is None:
                raise DataError(f"folder {p} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            folders.append(p)
        elif p.is_file():
            explicit.add(os.path.abspath(p))
        else:
            raise DataError(f"image {p} does not exist")
    return _iter_checked(inputs, explicit, [os.path.abspath(f) for f in folders])


def _iter_checked(inputs: list[Path], explicit: set[str], roots: list[str]) -> Iterator[Path]:
    walked: set[str] = set()
    yielded: set[str] = set()  # explicit files only: bounded by the command line
    for p in inputs:
        key = os.path.abspath(p)
        if p.is_dir():
            nested = any(key != r and key.startswith(r + os.sep) for r in roots)
            if key in walked or nested:
                continue
            walked.add(key)
            for f in _walk_images(p):
                if os.path.abspath(f) not in explicit:
                    yield f
        elif key not in yielded:
            yielded.add(key)
            yield p


def _walk_images(folder: Path) -> Iterator[Path]:
    """Image files under ``folder``, depth first, each directory's entries by name: the order of
    ``sorted(folder.rglob("*"))`` (paths compare part by part), one directory listing in memory."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list folder {folder}: {exc.strerror or exc}") from None
    for entry in entries:
        if entry.is_dir():
            yield from _walk_images(Path(entry.path))
        elif entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
            yield Path(entry.path)


@dataclasses.dataclass
class PredictSummary:
    """What a prediction run did: counts, time split, and how many images each label got."""

    images: int = 0
    skipped: int = 0
    seconds: float = 0.0  # wall time from the first file opened to the last record
    decode_s: float = 0.0  # reading and decoding image files
    preprocess_s: float = 0.0  # resize, crop, normalise (numpy/pillow)
    inference_s: float = 0.0  # trunk + heads
    per_class: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # head -> label -> images

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["images_per_s"] = self.images_per_s
        return d


class PredictionStream:
    """Classify files and folders of any size with bounded memory: iterate to get one record per
    image and head (image-major), in batches of ``batch_size``. Unreadable images are skipped (one
    bad file on a camera share should not stop the other thousand) and reported to ``on_skip``;
    :attr:`summary` holds counts and times, complete once iteration ends."""

    def __init__(
        self,
        predictor: Predictor,
        inputs: Iterable[str | os.PathLike],
        *,
        top_k: int = 5,
        batch_size: int = 32,
        on_skip: Callable[[str, str], None] | None = None,
    ) -> None:
        _check_positive(top_k=top_k, batch_size=batch_size)
        self.predictor = predictor
        self.top_k = top_k
        self.batch_size = batch_size
        self.on_skip = on_skip
        self.summary = PredictSummary(
            per_class={h: dict.fromkeys(predictor.labels[h], 0) for h in predictor.head_names}
        )
        self._paths = iter_images(inputs)  # checks the inputs now, walks the folders lazily

    def __iter__(self) -> Iterator[dict[str, Any]]:
        s = self.summary
        start = time.perf_counter()
        for names, images in self._batches():
            t0 = time.perf_counter()
            x = self.predictor.preprocess(images)
            t1 = time.perf_counter()
            logits = self.predictor.logits(x)
            t2 = time.perf_counter()
            s.preprocess_s += t1 - t0
            s.inference_s += t2 - t1
            s.images += len(names)
            for record in self.predictor._records(names, logits, self.top_k):
                s.per_class[record["head"]][record["label"]] += 1
                yield record
            s.seconds = time.perf_counter() - start
        s.seconds = time.perf_counter() - start
        if s.images == 0:
            raise DataError(f"none of the {s.skipped} image(s) could be read" if s.skipped else "no images given")

    def _batches(self) -> Iterator[tuple[list[str], list[Image.Image]]]:
        names: list[str] = []
        images: list[Image.Image] = []
        for path in self._paths:
            t0 = time.perf_counter()
            try:
                image = load_image(path)
            except DataError as exc:
                self.summary.skipped += 1
                if self.on_skip is not None:
                    self.on_skip(str(path), str(exc))
                continue
            finally:
                self.summary.decode_s += time.perf_counter() - t0
            names.append(str(path))
            images.append(image)
            if len(names) == self.batch_size:
                yield names, images
                names, images = [], []
        if names:
            yield names, images


def predict_files(
    predictor: Predictor, inputs: Iterable[str | os.PathLike], *, top_k: int = 5, batch_size: int = 32
) -> PredictReport:
    """Classify files and folders into one list, skipping (not failing on) unreadable images; for
    folders of any size iterate a :class:`PredictionStream` instead."""
    skipped: list[tuple[str, str]] = []
    stream = PredictionStream(
        predictor,
        inputs,
        top_k=top_k,
        batch_size=batch_size,
        on_skip=lambda path, reason: skipped.append((path, reason)),
    )
    try:
        predictions = list(stream)
    except DataError:
        if skipped and not stream.summary.images:
            raise DataError(f"none of the {len(skipped)} image(s) could be read (first: {skipped[0][1]})") from None
        raise
    return PredictReport(predictions, skipped)


def _image_name(image: Any, index: int) -> str:
    return f"<image {index}>" if isinstance(image, Image.Image) else str(image)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be an integer >= 1, not {value!r}")
