"""The ONNX format (ONNX Runtime): graphs exported from PyTorch, fp16 weights, merged graphs, int8.

Every graph function writes one file and checks it with ``onnx.checker``; none of them changes what a
graph computes beyond what its name says (fp16 rounds the weights, nothing else). int8:
``onnx_quantize.py`` (ONNX Runtime static QDQ, searched). The plug-in protocol: ``formats/__init__.py``.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.core.errors import ExportError
from edgetl.workstation.export.common import HEAD, batches, first_line, ort_model

if TYPE_CHECKING:
    from edgetl.workstation.export.session import ExportSession

log = logging.getLogger(__name__)

ONNX_OPSET = 17
FP16_MAX = 65504.0
# Tensors smaller than this stay fp32 in fp16 variants: a Cast per bias saves nothing worth a node.
FP16_MIN_ELEMENTS = 64


def check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported {path.name} is not a valid ONNX model: {first_line(exc)}") from None


def export_onnx(module, example, path: Path, *, input_name: str, output_name: str) -> None:
    """Export ``module`` (eval mode) to ONNX with a dynamic batch axis and check the graph.

    The TorchScript exporter (``dynamo=False``), deliberately. Our graphs are plain static CNN
    trunks and a linear head: tracing captures them exactly, folds batch norm into the
    convolutions, and names nodes after their modules (``/body/body.1/conv/conv.0/conv.0.0/Conv``),
    which is what makes the int8 excluded-node list readable. The dynamo exporter yields the same
    graph but took ~19 s for MobileNetV2 on 2 CPU cores (13 s in decompositions) against ~1.5 s,
    and names nodes ``node_Conv_811``. torch is pinned in the [train] extra; tests assert the opset,
    the dynamic batch axis and the parity, so a torch that drops this exporter fails loudly.
    """
    import torch

    with warnings.catch_warnings():
        # Only around this call: torch announces the exporter's deprecation on every use.
        warnings.filterwarnings("ignore", message=r".*TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=r".*feature will be removed.*")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            do_constant_folding=True,
        )
    check_onnx(path)


def fp16_weights(src: Path, dst: Path) -> int:
    """Store the float weights of ``src`` as fp16, each followed by a Cast back to fp32; returns how
    many tensors were converted.

    Compute stays fp32: ONNX Runtime's CPU provider has no fp16 convolutions on most x86 CPUs, and
    its constant folding turns each Cast back into an fp32 weight at load. What fp16 buys is half
    the file size, at the cost of rounding every weight to 11 significant bits (which the export
    measures). OpenVINO's ``compress_to_fp16`` does the same for IR.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    casts, converted = [], 0
    initializers = list(graph.initializer)
    del graph.initializer[:]
    for init in initializers:
        arr = numpy_helper.to_array(init) if init.data_type == TensorProto.FLOAT else None
        if arr is None or arr.size < FP16_MIN_ELEMENTS or not np.all(np.abs(arr) <= FP16_MAX):
            graph.initializer.append(init)
            continue
        half = numpy_helper.from_array(arr.astype(np.float16), f"{init.name}__fp16")
        graph.initializer.append(half)
        casts.append(
            helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT, name=f"{init.name}__to_fp32")
        )
        converted += 1
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(dst))
    check_onnx(dst)
    return converted


def merge_trunk_head(trunk_path: Path, head_path: Path, out_path: Path) -> None:
    """One graph: image -> logits, the trunk's nodes then the head's, exactly as the two files compute.

    Head names get a ``head/`` prefix so they cannot collide with the trunk's; the graph keeps
    the bundle's input and output names (``image``, ``logits``).
    """
    import onnx
    from onnx import compose

    trunk, head = onnx.load(str(trunk_path)), onnx.load(str(head_path))
    (t_in,), (t_out,) = trunk.graph.input, trunk.graph.output
    (h_in,), (h_out,) = head.graph.input, head.graph.output
    output_name = h_out.name
    head = compose.add_prefix(head, "head/")
    # merge_models wants the same IR version and opsets; the head is a plain Gemm, valid in both.
    head.ir_version = trunk.ir_version
    trunk_opsets = {o.domain: o.version for o in trunk.opset_import}
    del head.opset_import[:]
    head.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in trunk_opsets.items())
    merged = compose.merge_models(
        trunk,
        head,
        io_map=[(t_out.name, f"head/{h_in.name}")],
        inputs=[t_in.name],
        outputs=[f"head/{output_name}"],
        name="merged",
    )
    # Give the output its bundle name back.
    for node in merged.graph.node:
        node.output[:] = [output_name if o == f"head/{output_name}" else o for o in node.output]
    merged.graph.output[0].name = output_name
    onnx.save(merged, str(out_path))
    check_onnx(out_path)


class OnnxFormat:
    """ONNX: fp32 trunk + fp32 head, checked; then fp16 weights and the int8 trunk, each checked."""

    name = "onnx"

    def write(self, session: ExportSession) -> None:
        trunk_src, head_src = session.sources()
        (session.tmp / "onnx").mkdir()
        trunk_rel, head_rel = "onnx/trunk.fp32.onnx", f"onnx/head.{HEAD}.onnx"
        shutil.copyfile(trunk_src, session.tmp / trunk_rel)
        shutil.copyfile(head_src, session.tmp / head_rel)
        session.add_file(trunk_rel, fmt="onnx", precision="fp32", role="trunk", derived_from=session.origin)
        session.add_file(head_rel, fmt="onnx", precision="fp32", role="head", derived_from=session.origin)
        derived = trunk_rel if session.shipped("onnx", "fp32") else session.origin
        for precision in session.precisions("onnx"):
            if precision == "fp32":
                name = session.add_variant("onnx", "fp32", trunk_rel, head_rel)
            elif precision == "fp16":
                rel = "onnx/trunk.fp16.onnx"
                n = fp16_weights(session.tmp / trunk_rel, session.tmp / rel)
                log.info("onnx-fp16: %d weight tensors stored as fp16", n)
                session.add_file(rel, fmt="onnx", precision="fp16", role="trunk", derived_from=derived)
                name = session.add_variant("onnx", "fp16", rel, head_rel)
            else:  # int8
                rel = "onnx/trunk.int8.onnx"
                record = self.quantize(session, trunk_src, head_src, session.tmp / rel)
                session.add_file(rel, fmt="onnx", precision="int8", role="trunk", derived_from=derived)
                name = session.add_variant("onnx", "int8", rel, head_rel, quantization=record)
            if session.options.merged:
                session.add_merged(name, self.merge)
            session.check(name)

    def quantize(self, session: ExportSession, fp32_trunk: Path, head: Path, out: Path) -> dict[str, Any]:
        """Search int8 settings for the trunk (scored with the fp32 head), write the chosen one to ``out``."""
        from edgetl.workstation.export.formats.onnx_quantize import OrtQuantizer

        _, x_calib = session.calibration()
        head_model = ort_model(head)
        # On a CPU whose int8 kernels saturate (x86 without VNNI), attempts are held to the bar as
        # written (what the Pi and VNNI CPUs compute) and also scored as run here.
        as_written = session.int8_as_written("onnx")

        def evaluate(trunk_path: Path, written: bool = as_written) -> float:
            trunk = ort_model(trunk_path, as_written=written)
            pred = np.concatenate([head_model(trunk(b)).argmax(1) for b in batches(session.x_val)])
            return float((pred == session.y_val).mean())

        baseline = evaluate(fp32_trunk)
        return session.search_int8(
            "onnx",
            lambda: OrtQuantizer(
                fp32_trunk,
                x_calib,
                evaluate,
                workdir=session.work / "onnx-int8",
                evaluate_here=(lambda path: evaluate(path, False)) if as_written else None,
                qat=session.qat_hook(),
            ),
            out,
            baseline,
        )

    def write_head(self, source: Path, out: Path) -> None:
        shutil.copyfile(source, out)

    def merge(self, trunk: Path, head: Path, out: Path) -> None:
        merge_trunk_head(trunk, head, out)


FORMAT = OnnxFormat()
