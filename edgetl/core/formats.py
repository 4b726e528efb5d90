"""The one table of model formats, precisions and runtimes. Everything else reads it.

A *format* is how a model file is stored in a bundle (``onnx/``, ``openvino/``); a *runtime* is the
library that runs that format on the device; a *precision* is the numeric type a variant's trunk
runs in. Each format has exactly one runtime here, so a variant (format + precision) says what the
device loads. Adding a runtime is one row in :data:`FORMATS` plus one back-end module in
``edgetl/device/backends/`` (and, to produce the files, one format module in
``edgetl/workstation/export/``): see docs/design.md.

Torch-free and import-free: this module names libraries, it never imports them.
"""

from __future__ import annotations

import dataclasses
import importlib.util

# Every precision a bundle variant may have, in the order they are built and shown. fp32 is always
# first: the other precisions of a format are measured against that format's fp32.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")


@dataclasses.dataclass(frozen=True)
class Format:
    """One row of the table."""

    name: str  # folder in the bundle and the manifest's ``format`` value
    runtime: str  # the device library that runs it (``--runtime``)
    extension: str  # of the graph file a manifest record points at
    precisions: tuple[str, ...]  # what a variant of this format may hold
    runtime_module: str  # what the device imports to run it
    extra: str | None  # pip extra that installs the runtime on the device (None: core dependency)
    export_modules: tuple[str, ...]  # what the workstation imports to write it
    int8_modules: tuple[str, ...] = ()  # what int8 export needs on top
    export_extra: str = "train"  # pip extra for the export libraries
    sidecars: tuple[str, ...] = ()  # files next to the graph that belong to it (hashed with it)
    # Values of a variant's ``inference_precision`` this runtime may pin (OpenVINO's
    # INFERENCE_PRECISION_HINT); empty: the runtime has no such setting.
    inference_precisions: tuple[str, ...] = ()

    @property
    def install_hint(self) -> str:
        return f"pip install 'edgetl[{self.extra}]'" if self.extra else "pip install edgetl"

    def sidecar_paths(self, rel: str) -> tuple[str, ...]:
        """The sidecar files of graph ``rel`` (``openvino/trunk.fp32.xml`` -> ``openvino/trunk.fp32.bin``)."""
        stem = rel[: -len(self.extension)] if rel.endswith(self.extension) else rel
        return tuple(stem + s for s in self.sidecars)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            name="onnx",
            runtime="onnxruntime",
            extension=".onnx",
            precisions=("fp32", "fp16", "int8"),  # ONNX Runtime's CPU provider has no bf16 kernels
            runtime_module="onnxruntime",
            extra=None,
            export_modules=("onnx", "onnxruntime"),
        ),
        Format(
            name="openvino",
            runtime="openvino",
            extension=".xml",
            precisions=("fp32", "fp16", "bf16", "int8"),  # bf16: the fp32 IR run in bf16
            runtime_module="openvino",
            extra="openvino",
            export_modules=("openvino",),
            int8_modules=("nncf",),
            export_extra="openvino",
            sidecars=(".bin",),
            inference_precisions=("f32", "bf16", "f16"),
        ),
        Format(
            name="litert",
            runtime="litert",
            extension=".tflite",
            precisions=("fp32", "int8"),
            runtime_module="ai_edge_litert",
            extra="litert",
            export_modules=("litert_torch", "ai_edge_litert"),
            int8_modules=("torchao",),
            export_extra="litert-export",
        ),
        Format(
            name="ncnn",
            runtime="ncnn",
            extension=".param",
            precisions=("fp32",),
            runtime_module="ncnn",
            extra="ncnn",
            export_modules=("pnnx", "ncnn"),
            export_extra="ncnn-export",
            sidecars=(".bin",),
            inference_precisions=("f32",),
        ),
    )
}

# Runtime name -> its format (one format per runtime).
RUNTIMES: dict[str, Format] = {f.runtime: f for f in FORMATS.values()}
DEFAULT_RUNTIME = "onnxruntime"
ROLES: tuple[str, ...] = ("trunk", "head", "merged", "stats")
# A head's feature statistics (role ``stats``: class means, exemplar and validation features, the
# familiarity model; edgetl.device.head_stats) are numpy arrays in an ``.npz``, loaded without pickle.
STATS_FORMAT = "npz"
INFERENCE_PRECISIONS: tuple[str, ...] = tuple(
    dict.fromkeys(p for f in FORMATS.values() for p in f.inference_precisions)
)


def variant_name(fmt: str, precision: str) -> str:
    return f"{fmt}-{precision}"


def runtime_of(fmt: str) -> str | None:
    """The runtime that runs format ``fmt`` (None for a format this edgetl does not know)."""
    f = FORMATS.get(fmt)
    return f.runtime if f else None


def format_of(runtime: str) -> str | None:
    f = RUNTIMES.get(runtime)
    return f.name if f else None


def missing_export_modules(fmt: str, precisions: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Libraries the workstation lacks to write ``fmt`` in ``precisions`` (empty: it can)."""
    f = FORMATS[fmt]
    needed = f.export_modules + (f.int8_modules if "int8" in precisions else ())
    return [m for m in needed if importlib.util.find_spec(m) is None]


def runtime_installed(runtime: str) -> bool:
    return importlib.util.find_spec(RUNTIMES[runtime].runtime_module) is not None
