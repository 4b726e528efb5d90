"""LiteRT back-end: runs a bundle's ``litert/`` ``.tflite`` files (protocol: :mod:`edgetl.device.backends`).

``ai_edge_litert.interpreter.Interpreter`` with ``num_threads``; its default op resolver applies
the XNNPACK CPU delegate (recorded in ``runtime_info``).

**Batch.** litert-torch 0.10 cannot export a dynamic batch dimension (``dynamic_shapes`` fails in
its lowering), so the export writes every graph at batch 1. Here a call with N images resizes the
input tensor to N (``resize_tensor_input`` + ``allocate_tensors``, only when N changes); edgetl's
graphs (convolutions, a spatial mean, a fully connected head) propagate the new batch. A graph that
refuses the resize, or whose output then does not have N rows, is run one image at a time instead
(``runtime_info["batch"]``: ``"resize"`` or ``"loop"``).

**int8 I/O.** A full-integer graph (litert-torch's PT2E quantizer) takes and returns int8 with a
scale and zero point. The callable still takes float32 and returns float32: it quantizes the input
and dequantizes the output with the scale and zero point the interpreter reports
(``runtime_info["input_type"]``: ``"int8"``), so a bundle's variants are interchangeable.
``signature`` is what the callable takes and returns (float32, batch dimension None), compared with
the manifest by :func:`edgetl.device.bundle_loading.check_graph`.

LiteRT is imported inside :func:`open_model`, never at module level; nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.core.errors import BundleError

if TYPE_CHECKING:
    from edgetl.device.backends import Model

OPTIONS: tuple[str, ...] = ()

# Quantized I/O types the callable converts from and to float32.
_QUANTIZED = {"int8": (-128, 127), "uint8": (0, 255)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


class _TfliteModel:
    """One interpreter wrapped as a callable: float32 (N, ...) in, float32 (N, ...) out."""

    def __init__(self, make_interpreter, where: str, threads: int | None) -> None:
        self._make = make_interpreter
        self._where = where
        self.interpreter = make_interpreter()
        try:
            self.interpreter.allocate_tensors()
        except Exception as exc:  # LiteRT raises RuntimeError/ValueError with the C++ message
            raise BundleError(f"LiteRT cannot load {where}: {_first_line(exc)}") from None
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise BundleError(
                f"{where} has {len(inputs)} inputs and {len(outputs)} outputs; edgetl models have one of each"
            )
        self._in, self._out = inputs[0], outputs[0]
        self.input_type, self.output_type = _dtype_name(self._in["dtype"]), _dtype_name(self._out["dtype"])
        for what, dtype in (("input", self.input_type), ("output", self.output_type)):
            if dtype != "float32" and dtype not in _QUANTIZED:
                raise BundleError(f"{where}: the graph's {what} is {dtype}; edgetl models take float32 (or int8)")
        self._in_q = self._qparams(self._in, "input")
        self._out_q = self._qparams(self._out, "output")
        self._in_shape = [int(d) for d in self._in["shape"]]
        self._out_shape = [int(d) for d in self._out["shape"]]
        self._batch = self._in_shape[0] if self._in_shape else 1
        self._loop = False
        self.runtime_info: dict[str, Any] = {
            "delegate": "xnnpack",
            "input_type": self.input_type,
            "batch": "resize",
        }
        # What the callable takes and returns: float32, any batch.
        self.signature = {
            "inputs": [([None, *self._in_shape[1:]], "float32")],
            "outputs": [([None, *self._out_shape[1:]], "float32")],
        }

    def _qparams(self, detail: dict[str, Any], what: str) -> tuple[float, int] | None:
        if _dtype_name(detail["dtype"]) == "float32":
            return None
        scale, zero = detail.get("quantization", (0.0, 0))
        if not (float(scale) > 0.0):
            raise BundleError(f"{self._where}: the graph's {what} is {_dtype_name(detail['dtype'])} without a scale")
        return float(scale), int(zero)

    def _resize(self, n: int) -> bool:
        """Resize the input to ``n`` rows; False when the graph cannot (then the model loops)."""
        it = self.interpreter
        try:
            it.resize_tensor_input(self._in["index"], [n, *self._in_shape[1:]], strict=False)
            it.allocate_tensors()
            out = it.get_output_details()[0]["shape"]
            ok = len(out) == len(self._out_shape) and int(out[0]) == n
        except Exception:  # the graph's ops reject the new shape
            ok = False
        if not ok:
            # Back to a fresh batch-1 interpreter: a failed resize can leave this one unusable.
            self.interpreter = self._make()
            self.interpreter.allocate_tensors()
            self._batch = self._in_shape[0]
            self._loop = True
            self.runtime_info["batch"] = "loop"
            return False
        self._batch = n
        return True

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        it = self.interpreter
        if self._in_q is not None:
            scale, zero = self._in_q
            lo, hi = _QUANTIZED[self.input_type]
            x = np.clip(np.round(x / scale) + zero, lo, hi).astype(self._in["dtype"])
        it.set_tensor(self._in["index"], np.ascontiguousarray(x))
        it.invoke()
        y = it.get_tensor(self._out["index"])
        if self._out_q is not None:
            scale, zero = self._out_q
            return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
        return np.array(y, dtype=np.float32, copy=True)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        n = len(x)
        if n == 0:
            return np.zeros((0, *self._out_shape[1:]), dtype=np.float32)
        if not self._loop and n != self._batch:
            self._resize(n)
        if self._loop and n != self._batch:
            return np.concatenate([self._invoke(x[i : i + self._batch]) for i in range(0, n, self._batch)])
        return self._invoke(x)


def open_model(
    *, model_path: Path | None = None, model_content: bytes | None = None, threads: int | None, where: str
) -> _TfliteModel:
    """A ``.tflite`` from a file or from memory as an edgetl model callable (what :func:`load`
    returns; the export times and scores its int8 attempts through this same function)."""
    from ai_edge_litert.interpreter import Interpreter

    def make():
        try:
            if model_content is not None:
                return Interpreter(model_content=model_content, num_threads=threads)
            return Interpreter(model_path=str(model_path), num_threads=threads)
        except Exception as exc:  # ValueError for a file that is not a flatbuffer model
            raise BundleError(f"LiteRT cannot load {where}: {_first_line(exc)}") from None

    return _TfliteModel(make, where, threads)


def load(path: Path, *, threads: int | None) -> Model:
    """One ``.tflite`` file as a callable (float32 in and out, any batch; see the module docstring)."""
    if not Path(path).is_file():
        raise BundleError(f"LiteRT cannot load {path}: no such file")
    return open_model(model_path=Path(path), threads=threads, where=str(path))


# The TFLite schema (tensorflow/lite/schema/schema.fbs) values a linear head uses.
_TFLITE_FILE_IDENTIFIER = b"TFL3"
_TFLITE_SCHEMA_VERSION = 3
_FULLY_CONNECTED = 9  # BuiltinOperator.FULLY_CONNECTED
_FULLY_CONNECTED_OPTIONS = 8  # BuiltinOptions.FullyConnectedOptions
_BUFFER_ALIGNMENT = 16  # weights start 16-byte aligned, as the TFLite converter writes them


def linear_head_tflite(weight: np.ndarray, bias: np.ndarray) -> bytes:
    """A ``.tflite`` flatbuffer of one FULLY_CONNECTED op: input ``features`` [1, D] (signature
    [-1, D], so the interpreter resizes it to any batch), weight [C, D], bias [C], output ``logits``
    [1, C], all float32, with a ``serving_default`` signature. Written with ``flatbuffers``' Builder
    slot by slot (schema.fbs field order), since the device has no TFLite converter."""
    import flatbuffers

    classes, features = weight.shape
    b = flatbuffers.Builder(weight.nbytes + bias.nbytes + 1024)

    def int32_vector(values: list[int]) -> int:
        b.StartVector(4, len(values), 4)
        for v in reversed(values):
            b.PrependInt32(v)
        return b.EndVector()

    def offset_vector(offsets: list[int]) -> int:
        b.StartVector(4, len(offsets), 4)
        for o in reversed(offsets):
            b.PrependUOffsetTRelative(o)
        return b.EndVector()

    def buffer(data: bytes) -> int:
        """Buffer {data (0): [ubyte]}; no data for the empty buffer 0 every model starts with."""
        vector = None
        if data:
            b.StartVector(1, len(data), _BUFFER_ALIGNMENT)
            b.head = b.Head() - len(data)
            b.Bytes[b.Head() : b.Head() + len(data)] = data
            vector = b.EndVector()
        b.StartObject(3)
        if vector is not None:
            b.PrependUOffsetTRelativeSlot(0, vector, 0)
        return b.EndObject()

    def tensor(name: str, shape: list[int], buffer_index: int, signature: list[int] | None = None) -> int:
        """Tensor {shape (0), type (1): FLOAT32 = 0, the default, buffer (2), name (3), shape_signature (7)}."""
        name_offset, shape_offset = b.CreateString(name), int32_vector(shape)
        signature_offset = int32_vector(signature) if signature is not None else None
        b.StartObject(8)
        b.PrependUOffsetTRelativeSlot(0, shape_offset, 0)
        b.PrependUint32Slot(2, buffer_index, 0)
        b.PrependUOffsetTRelativeSlot(3, name_offset, 0)
        if signature_offset is not None:
            b.PrependUOffsetTRelativeSlot(7, signature_offset, 0)
        return b.EndObject()

    def tensor_map(name: str, index: int) -> int:
        """TensorMap {name (0), tensor_index (1)}."""
        name_offset = b.CreateString(name)
        b.StartObject(2)
        b.PrependUOffsetTRelativeSlot(0, name_offset, 0)
        b.PrependUint32Slot(1, index, 0)
        return b.EndObject()

    buffers = [buffer(b""), buffer(weight.astype("<f4").tobytes()), buffer(bias.astype("<f4").tobytes())]
    tensors = [
        tensor("features", [1, features], 0, [-1, features]),
        tensor("weight", [classes, features], 1),
        tensor("bias", [classes], 2),
        tensor("logits", [1, classes], 0, [-1, classes]),
    ]
    # FullyConnectedOptions: every field at its default (no fused activation, default weight format,
    # keep_num_dims false: the 2-D output FULLY_CONNECTED version 1 gives).
    b.StartObject(5)
    options = b.EndObject()
    op_inputs, op_outputs = int32_vector([0, 1, 2]), int32_vector([3])
    # Operator {opcode_index (0), inputs (1), outputs (2), builtin_options_type (3), builtin_options (4)}.
    b.StartObject(5)
    b.PrependUint32Slot(0, 0, 0)
    b.PrependUOffsetTRelativeSlot(1, op_inputs, 0)
    b.PrependUOffsetTRelativeSlot(2, op_outputs, 0)
    b.PrependUint8Slot(3, _FULLY_CONNECTED_OPTIONS, 0)
    b.PrependUOffsetTRelativeSlot(4, options, 0)
    operator = b.EndObject()
    # SubGraph {tensors (0), inputs (1), outputs (2), operators (3), name (4)}.
    sg_tensors, sg_inputs, sg_outputs = offset_vector(tensors), int32_vector([0]), int32_vector([3])
    sg_operators, sg_name = offset_vector([operator]), b.CreateString("main")
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(0, sg_tensors, 0)
    b.PrependUOffsetTRelativeSlot(1, sg_inputs, 0)
    b.PrependUOffsetTRelativeSlot(2, sg_outputs, 0)
    b.PrependUOffsetTRelativeSlot(3, sg_operators, 0)
    b.PrependUOffsetTRelativeSlot(4, sg_name, 0)
    subgraph = b.EndObject()
    # OperatorCode {deprecated_builtin_code (0): int8, version (2), builtin_code (3): int32}; a reader
    # takes the larger of the two codes, so both say FULLY_CONNECTED.
    b.StartObject(4)
    b.PrependInt8Slot(0, min(_FULLY_CONNECTED, 127), 0)
    b.PrependInt32Slot(2, 1, 0)
    b.PrependInt32Slot(3, _FULLY_CONNECTED, 0)
    opcode = b.EndObject()
    # SignatureDef {inputs (0), outputs (1), signature_key (2), subgraph_index (4)}.
    sig_inputs, sig_outputs = offset_vector([tensor_map("features", 0)]), offset_vector([tensor_map("logits", 3)])
    sig_key = b.CreateString("serving_default")
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(0, sig_inputs, 0)
    b.PrependUOffsetTRelativeSlot(1, sig_outputs, 0)
    b.PrependUOffsetTRelativeSlot(2, sig_key, 0)
    b.PrependUint32Slot(4, 0, 0)
    signature = b.EndObject()
    # Model {version (0), operator_codes (1), subgraphs (2), description (3), buffers (4), signature_defs (7)}.
    m_codes, m_subgraphs, m_buffers = offset_vector([opcode]), offset_vector([subgraph]), offset_vector(buffers)
    m_signatures, m_description = offset_vector([signature]), b.CreateString("edgetl linear head")
    b.StartObject(8)
    b.PrependUint32Slot(0, _TFLITE_SCHEMA_VERSION, 0)
    b.PrependUOffsetTRelativeSlot(1, m_codes, 0)
    b.PrependUOffsetTRelativeSlot(2, m_subgraphs, 0)
    b.PrependUOffsetTRelativeSlot(3, m_description, 0)
    b.PrependUOffsetTRelativeSlot(4, m_buffers, 0)
    b.PrependUOffsetTRelativeSlot(7, m_signatures, 0)
    b.Finish(b.EndObject(), file_identifier=_TFLITE_FILE_IDENTIFIER)
    return bytes(b.Output())


def write_linear_head(weight: np.ndarray, bias: np.ndarray, out: Path) -> None:
    """features (batch, D) float32 -> logits (batch, C): features @ weight.T + bias; weight (C, D), bias (C,).

    A float32 FULLY_CONNECTED ``.tflite`` (:func:`linear_head_tflite`) at batch 1 with a dynamic
    batch signature, which :func:`load` resizes to each call's batch. ValueError for a weight or
    bias that is not a head (:func:`edgetl.device.backends.linear_head_arrays`).
    """
    from edgetl.device.backends import linear_head_arrays, staged_output

    weight, bias = linear_head_arrays(weight, bias)
    data = linear_head_tflite(weight, bias)
    with staged_output(Path(out)) as staged:
        staged.write_bytes(data)
