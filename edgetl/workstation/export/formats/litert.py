"""The LiteRT format (formerly TensorFlow Lite): ``.tflite`` graphs converted from PyTorch, fp32 and int8.

LiteRT converts from PyTorch, not ONNX: ``litert_torch.convert(module, (sample,))`` traces the
run's own trunk and head (``session.model``) with ``torch.export`` and lowers them to a
``.tflite`` flatbuffer. Variants and what the device runs (``ai-edge-litert``'s Interpreter with
its XNNPACK CPU delegate, :mod:`edgetl.device.backends.litert`):

* ``litert-fp32``: ``litert/trunk.fp32.tflite`` and ``litert/head.<head>.tflite``, float32.
* ``litert-int8``: ``litert/trunk.int8.tflite``, full integer (int8 weights and activations) from
  litert-torch's PT2E quantizer, searched (``litert_quantize.py``); its input and output are int8
  with a scale and zero point, which the device back-end applies, so the variant still takes
  float32 images and returns float32 features.
* merged graphs (``--merged``): the trunk's and head's ``.tflite`` flatbuffers joined into one
  graph (:func:`merge_tflite`; int8: a DEQUANTIZE op between the int8 features and the float head,
  what the device back-end does between the two files), so ``export --add-to`` merges new heads too.

**Batch.** litert-torch 0.10 cannot export a dynamic batch dimension (``dynamic_shapes`` fails in
its JAX lowering with "Shapes must be 1D sequences of concrete values"), so every graph is
converted at batch 1 and the device back-end resizes the input tensor to the batch it is given
(looping over the images where a graph refuses the resize).

``export --add-to``: the head arrives as its fp32 ONNX graph; edgetl heads are a linear layer, so
:func:`head_from_onnx` rebuilds the torch head from the graph's nodes and initializers (Gemm,
MatMul, Add, ... ; anything else is refused naming the op), checks it against ONNX Runtime, and
converts it like the export's head.

litert-torch prints progress on stdout and its converter logs on stderr; both go to the debug log
(:func:`quiet_litert`). torch and litert-torch are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.core.errors import ExportError
from edgetl.workstation.export.common import HEAD, first_line

if TYPE_CHECKING:
    from edgetl.workstation.export.session import ExportSession

log = logging.getLogger(__name__)

# A head rebuilt from ONNX must compute what ONNX Runtime computes on its graph (float rounding only).
HEAD_REBUILD_MAX_ABS_DIFF = 1e-4


@contextlib.contextmanager
def quiet_litert() -> Iterator[None]:
    """litert-torch's progress (rich, on ``sys.stdout``) and the converter's C++ logs (absl, on file
    descriptors 1 and 2) go to the debug log: stdout must stay clean for ``--json``."""
    captured = io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    saved: list[tuple[int, int]] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                    os.dup2(sink.fileno(), fd)
                except OSError:  # no such descriptor (embedded interpreters): nothing to redirect
                    pass
            with contextlib.redirect_stdout(captured):
                yield
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            for fd, copy in reversed(saved):
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            text = captured.getvalue() + sink.read().decode("utf-8", "replace")
            lines = [line for line in text.splitlines() if line.strip()]
            if lines:
                log.debug("litert-torch output:\n%s", "\n".join(lines))


_OP = re.compile(r"\b(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?|torch\.ops\.[A-Za-z0-9_.]+|tfl\.[A-Za-z0-9_]+)")


def conversion_error(what: str, exc: BaseException) -> ExportError:
    """One line naming the op litert-torch could not convert, when its message names one."""
    text = str(exc)
    op = _OP.search(text)
    where = f" (op {op.group(1)})" if op else ""
    return ExportError(f"litert-torch could not convert the {what}{where}: {first_line(exc)}")


def _eval(module):
    """``module`` in inference mode (a PT2E graph has been made to accept ``.eval()``: litert_quantize)."""
    module.eval()  # a PT2E graph's eval() returns None
    return module


def convert_to_bytes(module, sample, *, what: str, quant_config: Any = None) -> bytes:
    """``module`` at ``sample``'s shape (batch 1) as a ``.tflite`` flatbuffer."""
    try:
        with quiet_litert():
            import litert_torch  # its first import logs torch warnings on stderr

            edge = litert_torch.convert(_eval(module), (sample,), quant_config=quant_config)
            with tempfile.TemporaryDirectory(prefix="edgetl-litert-") as tmp:
                path = Path(tmp) / "model.tflite"
                edge.export(str(path))
                return path.read_bytes()
    except ExportError:
        raise
    except Exception as exc:  # torch.export, the lowering and the MLIR converter raise many types
        raise conversion_error(what, exc) from None


def convert_module(module, sample, out: Path, *, what: str, quant_config: Any = None) -> None:
    out.write_bytes(convert_to_bytes(module, sample, what=what, quant_config=quant_config))


# --- the head from its ONNX graph (export --add-to) ---------------------------------------------


def head_from_onnx(source: Path):
    """A torch module computing what the ONNX head graph ``source`` computes (the ops edgetl heads
    export to); ExportError naming an op it does not know."""
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    names = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in names]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ExportError(f"{source.name}: a head graph has one input and one output")
    supported = {"Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Flatten", "Identity", "Dropout", "Constant"}
    for node in graph.node:
        if node.op_type not in supported:
            raise ExportError(
                f"litert: cannot rebuild the head from {source.name}: op {node.op_type} ({node.name or 'unnamed'}) "
                "is not supported (edgetl heads are linear layers)"
            )

    class OnnxHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.keys: dict[str, str] = {}
            for i, init in enumerate(graph.initializer):
                self.register_buffer(f"c{i}", torch.from_numpy(numpy_helper.to_array(init).copy()))
                self.keys[init.name] = f"c{i}"
            self.nodes = []
            for node in graph.node:
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                if node.op_type == "Constant":
                    key = f"c{len(self.keys)}"
                    self.register_buffer(key, torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy()))
                    self.keys[node.output[0]] = key
                    continue
                self.nodes.append((node.op_type, list(node.input), list(node.output), attrs))
            self.input_name, self.output_name = inputs[0].name, graph.output[0].name

        def forward(self, x):
            env = {name: getattr(self, key) for name, key in self.keys.items()}
            env[self.input_name] = x
            for op, ins, outs, attrs in self.nodes:
                args = [env[n] if n else None for n in ins]
                if op == "Gemm":
                    a, b = args[0], args[1]
                    a = a.t() if attrs.get("transA", 0) else a
                    b = b.t() if attrs.get("transB", 0) else b
                    y = attrs.get("alpha", 1.0) * (a @ b)
                    if len(args) > 2 and args[2] is not None:
                        y = y + attrs.get("beta", 1.0) * args[2]
                elif op == "MatMul":
                    y = torch.matmul(args[0], args[1])
                elif op == "Add":
                    y = args[0] + args[1]
                elif op == "Sub":
                    y = args[0] - args[1]
                elif op == "Mul":
                    y = args[0] * args[1]
                elif op == "Div":
                    y = args[0] / args[1]
                elif op == "Relu":
                    y = torch.relu(args[0])
                elif op == "Flatten":
                    y = torch.flatten(args[0], int(attrs.get("axis", 1)))
                else:  # Identity, Dropout (inference: identity)
                    y = args[0]
                env[outs[0]] = y
            return env[self.output_name]

    return OnnxHead().eval()


def _onnx_input_width(source: Path) -> int:
    import onnx

    graph = onnx.load(str(source)).graph
    names = {i.name for i in graph.initializer}
    (inp,) = [i for i in graph.input if i.name not in names]
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].dim_value:
        raise ExportError(f"{source.name}: a head takes (N, features); its input has {len(dims)} dimensions")
    return int(dims[1].dim_value)


def merge_tflite(trunk: Path, head: Path, out: Path) -> None:
    """One ``.tflite`` graph, image -> logits: the head's operators appended after the trunk's, its
    input replaced by the trunk's output (through a DEQUANTIZE op when the trunk's output is int8,
    exactly what the device back-end does between the two files). Works on the flatbuffers, so it
    merges any trunk and head files (``export --add-to`` has no torch trunk)."""
    import copy

    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fb

    t = fb.read_model_from_bytearray(bytearray(Path(trunk).read_bytes()))
    h = fb.read_model_from_bytearray(bytearray(Path(head).read_bytes()))
    if len(t.subgraphs) != 1 or len(h.subgraphs) != 1:
        raise ExportError(
            f"litert: cannot merge {Path(trunk).name} and {Path(head).name}: a graph has several subgraphs"
        )
    tg, hg = t.subgraphs[0], h.subgraphs[0]
    if len(tg.outputs) != 1 or len(hg.inputs) != 1 or len(hg.outputs) != 1:
        raise ExportError(f"litert: cannot merge {Path(trunk).name} and {Path(head).name}: one input and output each")
    (features,), (head_in,) = tg.outputs, hg.inputs

    def code_key(c) -> tuple:
        return (c.builtinCode, c.deprecatedBuiltinCode, c.customCode, c.version)

    codes = {code_key(c): i for i, c in enumerate(t.operatorCodes)}

    def opcode(c) -> int:
        key = code_key(c)
        if key not in codes:
            codes[key] = len(t.operatorCodes)
            t.operatorCodes.append(copy.deepcopy(c))
        return codes[key]

    buffers: dict[int, int] = {}
    tensors: dict[int, int] = {-1: -1}
    for i, tensor in enumerate(hg.tensors):
        if i == head_in:
            continue
        tensor = copy.deepcopy(tensor)
        if tensor.buffer:  # buffer 0 is the empty sentinel every model has
            if tensor.buffer not in buffers:
                buffers[tensor.buffer] = len(t.buffers)
                t.buffers.append(copy.deepcopy(h.buffers[tensor.buffer]))
            tensor.buffer = buffers[tensor.buffer]
        name = tensor.name.decode() if isinstance(tensor.name, bytes) else (tensor.name or "")
        tensor.name = f"head/{name}"
        tensors[i] = len(tg.tensors)
        tg.tensors.append(tensor)
    trunk_type, head_type = tg.tensors[features].type, hg.tensors[head_in].type
    if trunk_type == head_type:
        tensors[head_in] = features
    else:  # int8 features: dequantize them into the head's float input
        if head_type != schema.TensorType.FLOAT32:
            raise ExportError(f"litert: cannot merge: the head takes {fb.type_to_name(head_type)} features")
        tensor = copy.deepcopy(hg.tensors[head_in])
        tensor.name = "head/features"
        tensors[head_in] = len(tg.tensors)
        tg.tensors.append(tensor)
        code = schema.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.DEQUANTIZE
        code.version = 1
        op = schema.OperatorT()
        op.opcodeIndex = opcode(code)
        op.inputs, op.outputs = [features], [tensors[head_in]]
        tg.operators.append(op)
    for op in hg.operators:
        op = copy.deepcopy(op)
        op.opcodeIndex = opcode(h.operatorCodes[op.opcodeIndex])
        op.inputs = [tensors[int(i)] for i in op.inputs]
        op.outputs = [tensors[int(i)] for i in op.outputs]
        if op.intermediates is not None and len(op.intermediates):
            op.intermediates = [tensors[int(i)] for i in op.intermediates]
        tg.operators.append(op)
    logits = tensors[hg.outputs[0]]
    tg.outputs = [logits]
    for sig in t.signatureDefs or []:
        if sig.outputs:
            sig.outputs = sig.outputs[:1]
            sig.outputs[0].tensorIndex = logits
    Path(out).write_bytes(bytes(fb.convert_object_to_bytearray(t)))


class LiteRTFormat:
    """LiteRT: fp32 trunk + head converted from PyTorch, checked; then the int8 trunk, checked."""

    name = "litert"

    def write(self, session: ExportSession) -> None:
        import torch

        trunk, head = session.model.trunk.eval(), session.model.head.eval()
        s, d = session.pp.input_size, session.run.spec.feature_dim
        (session.tmp / "litert").mkdir()
        trunk_rel, head_rel = "litert/trunk.fp32.tflite", f"litert/head.{HEAD}.tflite"
        t0 = time.perf_counter()
        convert_module(trunk, torch.zeros(1, 3, s, s), session.tmp / trunk_rel, what="trunk")
        convert_module(head, torch.zeros(1, d), session.tmp / head_rel, what="head")
        log.info("converted trunk and head to LiteRT in %.1fs", time.perf_counter() - t0)
        # Converted from the run's PyTorch modules, not from the ONNX graphs.
        session.add_file(trunk_rel, fmt="litert", precision="fp32", role="trunk", derived_from=session.origin)
        session.add_file(head_rel, fmt="litert", precision="fp32", role="head", derived_from=session.origin)
        derived = trunk_rel if session.shipped("litert", "fp32") else session.origin
        for precision in session.precisions("litert"):
            if precision == "fp32":
                name = session.add_variant("litert", "fp32", trunk_rel, head_rel)
            else:  # int8
                rel = "litert/trunk.int8.tflite"
                record = self.quantize(session, session.tmp / trunk_rel, session.tmp / head_rel, session.tmp / rel)
                session.add_file(rel, fmt="litert", precision="int8", role="trunk", derived_from=derived)
                name = session.add_variant("litert", "int8", rel, head_rel, quantization=record)
            if session.options.merged and (session.shipped("litert", precision) or precision == "fp32"):
                session.add_merged(name, self.merge)
            session.check(name)

    def quantize(self, session: ExportSession, fp32_trunk: Path, head: Path, out: Path) -> dict[str, Any]:
        """Search PT2E settings for the trunk (scored with the fp32 LiteRT head), write the chosen one to ``out``."""
        from edgetl.device.backends.litert import load
        from edgetl.workstation.export.formats.litert_quantize import LiteRTQuantizer

        _, x_calib = session.calibration()
        head_model = load(head, threads=None)
        return session.search_int8(
            "litert",
            lambda: LiteRTQuantizer(
                session.model.trunk.eval(),
                fp32_trunk,
                x_calib,
                (session.x_val, session.y_val, head_model),
                qat=session.qat_hook(),
                workdir=session.work / "litert-int8",
            ),
            out,
            session.fp32_top1("litert"),
        )

    def write_head(self, source: Path, out: Path) -> None:
        """The head rebuilt in torch from its ONNX graph (checked against ONNX Runtime), converted."""
        import torch

        from edgetl.workstation.export.common import ort_model

        head = head_from_onnx(source)
        width = _onnx_input_width(source)
        x = np.random.default_rng(0).normal(0.0, 1.0, (8, width)).astype(np.float32)
        with torch.no_grad():
            mine = head(torch.from_numpy(x)).numpy()
        theirs = ort_model(source)(x)
        diff = float(np.abs(mine - theirs).max())
        if not diff <= HEAD_REBUILD_MAX_ABS_DIFF:
            raise ExportError(
                f"litert: the head rebuilt from {source.name} differs from ONNX Runtime by {diff:.2e}; "
                "this is a bug, please report it"
            )
        convert_module(head, torch.zeros(1, width), out, what="head")

    def merge(self, trunk: Path, head: Path, out: Path) -> None:
        merge_tflite(trunk, head, out)


FORMAT = LiteRTFormat()
