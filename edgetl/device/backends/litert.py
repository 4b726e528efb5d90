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
