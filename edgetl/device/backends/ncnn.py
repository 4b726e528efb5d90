"""NCNN back-end: runs a bundle's ``ncnn/`` ``.param`` + ``.bin`` files (protocol: :mod:`edgetl.device.backends`).

NCNN runs one image at a time (a CHW ``ncnn.Mat``, no batch axis): :func:`load` loops over the
batch. Its precision options are always pinned: by default NCNN stores weights and activations in
fp16 (and computes in fp16 on ARMv8.2), which is ~0.03 off in logits on MobileNetV2, not fp32. The
callable's ``runtime_info`` reports the precision its options give and the options themselves.

The ``.param`` names its input and output blobs (pnnx: ``in0``, ``out0``) and, as edgetl writes it,
the input's shape in the ``Input`` layer (``0=w 1=h 2=c``). The output shape is found by running
zeros through the graph once at load, so a file that does not match the manifest is refused before
the first image. ``ncnn`` is imported inside :func:`load`; nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.core.errors import BundleError

if TYPE_CHECKING:
    from edgetl.device.backends import Model

OPTIONS: tuple[str, ...] = ()

MAGIC = "7767517"
# The ncnn.Option flags that decide the numeric precision, per pinned inference precision.
_FP16 = ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic")
_BF16 = ("use_bf16_storage", "use_bf16_packed")
_INT8 = ("use_int8_inference", "use_int8_storage", "use_int8_packed", "use_int8_arithmetic")
PINNED: dict[str, dict[str, bool]] = {
    "f32": {**dict.fromkeys(_FP16, False), **dict.fromkeys(_BF16, False), **dict.fromkeys(_INT8, False)},
}
_REPORTED = (*_FP16, *_BF16, *_INT8, "use_packing_layout", "use_winograd_convolution", "use_sgemm_convolution")


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or ["?"])[0]


def read_param(path: Path) -> tuple[str, list[int], str]:
    """The input blob name, its declared shape (C, H, W or W, no batch) and the output blob name."""
    try:
        lines = [ln.split() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"NCNN cannot read {path}: {_first_line(str(exc)) or type(exc).__name__}") from None
    if len(lines) < 3 or lines[0] != [MAGIC]:
        raise BundleError(f"{path} is not an NCNN .param text file (its first line is not {MAGIC})")
    inputs, produced, consumed = [], [], set()
    try:
        for parts in lines[2:]:
            nb, nt = int(parts[2]), int(parts[3])
            bottoms, tops = parts[4 : 4 + nb], parts[4 + nb : 4 + nb + nt]
            consumed.update(bottoms)
            produced.extend(tops)
            if parts[0] == "Input":
                params = dict(p.split("=", 1) for p in parts[4 + nb + nt :])
                inputs.append((tops[0], [int(params[k]) for k in ("2", "1", "0") if k in params]))
    except (IndexError, ValueError):
        raise BundleError(f"{path} is not a valid NCNN .param file (a layer line does not parse)") from None
    outputs = [t for t in produced if t not in consumed]
    if len(inputs) != 1 or len(outputs) != 1:
        raise BundleError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; edgetl models have one of each")
    (name, dims), (output,) = inputs[0], outputs
    if not dims or any(d <= 0 for d in dims):
        raise BundleError(f"{path}: its Input layer declares no shape (0=w 1=h 2=c); re-export the bundle")
    return name, dims, output


def _options(net: Any, inference_precision: str | None, threads: int | None) -> dict[str, Any]:
    """Pin the precision flags (f32 unless told otherwise) and threads on ``net.opt``; what they are now."""
    precision = inference_precision or "f32"
    if precision not in PINNED:
        raise BundleError(
            f"the bundle pins NCNN inference precision {precision!r}; this edgetl runs {', '.join(PINNED)}"
        )
    opt = net.opt
    for flag, value in PINNED[precision].items():
        setattr(opt, flag, value)
    opt.use_vulkan_compute = False
    if threads is not None:
        opt.num_threads = threads
    return {flag: bool(getattr(opt, flag)) for flag in _REPORTED} | {"num_threads": int(opt.num_threads)}


def ran_precision(options: dict[str, Any]) -> str:
    """The precision NCNN's options give: f16 if any fp16 flag is on, bf16 if bf16 storage is, else f32."""
    if any(options.get(f) for f in _FP16):
        return "f16"
    if any(options.get(f) for f in _BF16):
        return "bf16"
    return "f32"


def load(path: Path, *, threads: int | None, inference_precision: str | None = None) -> Model:
    """One ``ncnn.Net`` with its precision options pinned, wrapped as a plain callable over a batch.

    ``inference_precision`` is the variant's (manifest); None pins f32 too. A ``.param`` or ``.bin``
    NCNN cannot load, or one whose graph does not run on its declared input shape, is one
    :class:`BundleError` line.
    """
    import ncnn

    path = Path(path)
    input_name, dims, output_name = read_param(path)
    weights = path.with_suffix(".bin")
    net = ncnn.Net()
    options = _options(net, inference_precision, threads)
    if net.load_param(str(path)) != 0:
        raise BundleError(f"NCNN cannot load {path}: the .param does not parse or names an unknown layer")
    if not weights.is_file():
        raise BundleError(f"NCNN cannot load {path}: its weights file {weights.name} is missing")
    if net.load_model(str(weights)) != 0:
        raise BundleError(
            f"NCNN cannot load {weights}: the weights do not match the .param (truncated or another model's)"
        )

    def one(image: np.ndarray) -> np.ndarray:
        # Kept in a local until extract returns: the Mat may read the array's memory without a copy.
        data = np.ascontiguousarray(image, dtype=np.float32)
        ex = net.create_extractor()
        ex.input(input_name, ncnn.Mat(data))
        rc, mat = ex.extract(output_name)
        if rc != 0:
            raise BundleError(f"NCNN failed to run {path} (extract returned {rc})")
        return np.array(mat, dtype=np.float32)

    try:
        probe = one(np.zeros(dims, dtype=np.float32))
    except BundleError:
        raise
    except Exception as exc:  # the binding raises plain RuntimeError/ValueError
        raise BundleError(f"NCNN cannot run {path} on its declared input {dims}: {_first_line(str(exc))}") from None
    out_dims = list(probe.shape)

    def run(x: np.ndarray) -> np.ndarray:
        if list(x.shape[1:]) != dims:
            raise ValueError(f"NCNN model {path.name} takes (N, {', '.join(map(str, dims))}), not {tuple(x.shape)}")
        out = np.empty((len(x), *out_dims), dtype=np.float32)
        for i in range(len(x)):
            out[i] = one(x[i])
        return out

    run.runtime_info = {"inference_precision": ran_precision(options), "options": options}  # type: ignore[attr-defined]
    run.signature = {  # type: ignore[attr-defined]
        "inputs": [([None, *dims], "float32")],
        "outputs": [([None, *out_dims], "float32")],
    }
    return run


def write_linear_head(weight: np.ndarray, bias: np.ndarray, out: Path) -> None:
    """features (batch, D) float32 -> logits (batch, C): features @ weight.T + bias; weight (C, D), bias (C,).

    What pnnx writes for the workstation's head, plus the input shape edgetl adds: an ``Input``
    layer ``in0`` declaring ``0=D`` and an ``InnerProduct`` (``0=C 1=1 2=C*D``: outputs, bias,
    weight count) into ``out0``. The ``.bin`` beside ``out`` holds the weight as NCNN's ModelBin
    reads it (a 4-byte tag of zeros: raw float32, then C x D row-major) followed by the raw float32
    bias. NCNN has no batch axis; :func:`load` loops over it. ValueError for a weight or bias that
    is not a head (:func:`edgetl.device.backends.linear_head_arrays`).
    """
    from edgetl.device.backends import linear_head_arrays, staged_output

    weight, bias = linear_head_arrays(weight, bias)
    out = Path(out)
    if out.suffix != ".param":
        raise ValueError(f"an NCNN head is a .param file (its weights go in the .bin beside it), not {out.name}")
    classes, features = weight.shape
    layers = [
        ("Input", "in0", "0 1 in0", f"0={features}"),
        ("InnerProduct", "linear_0", "1 1 in0 out0", f"0={classes} 1=1 2={classes * features}"),
    ]
    lines = [
        MAGIC,
        f"{len(layers)} 2",
        *(f"{kind:<24} {name:<24} {blobs} {params}" for kind, name, blobs, params in layers),
    ]
    with staged_output(out, sidecars=(".bin",)) as staged:
        staged.with_suffix(".bin").write_bytes(
            np.zeros(1, "<u4").tobytes() + weight.astype("<f4").tobytes() + bias.astype("<f4").tobytes()
        )
        staged.write_text("\n".join(lines) + "\n", encoding="utf-8")
