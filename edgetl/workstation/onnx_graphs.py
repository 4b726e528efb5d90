"""ONNX graphs of a bundle: export from PyTorch, fp16 weights, and trunk + head merged into one graph.

Every function writes one file and checks it with ``onnx.checker``; none of them changes what a
graph computes beyond what its name says (fp16 rounds the weights, nothing else).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from edgetl.core.errors import ExportError

log = logging.getLogger(__name__)

ONNX_OPSET = 17
FP16_MAX = 65504.0
# Tensors smaller than this stay fp32 in fp16 variants: a Cast per bias saves nothing worth a node.
FP16_MIN_ELEMENTS = 64


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported {path.name} is not a valid ONNX model: {_first_line(exc)}") from None


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
