"""The OpenVINO format: IR converted from the bundle's ONNX graphs, fp16 and bf16, and int8 with NNCF.

IR is converted from the same fp32 ONNX graphs that ONNX Runtime runs (``ov.convert_model``), so
both runtimes start from one graph. Variants and what the device runs:

* ``openvino-fp32``: fp32 IR, ``INFERENCE_PRECISION_HINT`` pinned to f32. Without the pin the CPU
  plugin runs bf16 by itself on CPUs with bf16 support, ~0.1 off in features: not fp32.
* ``openvino-fp16``: IR with fp16 weights (``save_model(compress_to_fp16=True)``), run in f32.
* ``openvino-bf16``: the fp32 IR run with the hint bf16; its own accuracy check.
* ``openvino-int8``: NNCF post-training quantization of the trunk, searched
  (``openvino_quantize.py``).

OpenVINO is imported inside the functions: the rest of edgetl never needs it. The plug-in
protocol: ``formats/__init__.py``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.core.formats import FORMATS
from edgetl.workstation.export.common import HEAD

if TYPE_CHECKING:
    from edgetl.workstation.export.session import ExportSession

log = logging.getLogger(__name__)

# OpenVINO INFERENCE_PRECISION_HINT per bundle precision: what the export measures and the runtime pins.
INFERENCE_PRECISION = {"fp32": "f32", "fp16": "f32", "bf16": "bf16", "int8": "f32"}


def bin_path(xml: str) -> str:
    """The weights file beside IR ``xml`` (the format's sidecar in ``core/formats.py``)."""
    return FORMATS["openvino"].sidecar_paths(xml)[0]


def convert_onnx(onnx_path: Path, xml_path: Path, *, compress_to_fp16: bool = False) -> None:
    """ONNX -> IR (``.xml`` + ``.bin``); fp16 compresses the weights only."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    # save_model compresses to fp16 unless told not to: fp32 must stay fp32.
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)


def merge_ir(trunk_xml: Path, head_xml: Path, out_xml: Path) -> None:
    """One IR graph, image -> logits: the head's input replaced by the trunk's output."""
    import openvino as ov

    from edgetl.device.runtime import openvino_core

    core = openvino_core()
    trunk, head = core.read_model(str(trunk_xml)), core.read_model(str(head_xml))
    (param,), (features,) = head.get_parameters(), trunk.get_results()
    param.output(0).replace(features.input_value(0))
    merged = ov.Model(head.get_results(), trunk.get_parameters(), "merged")
    ov.save_model(merged, str(out_xml), compress_to_fp16=False)


def compile_f32(model, *, precision: str = "f32", threads: int | None = None):
    """Compile an IR path or ``ov.Model`` on the CPU with the inference precision pinned (and
    ``threads`` inference threads; None: OpenVINO's default)."""
    from edgetl.device.runtime import openvino_core

    core = openvino_core()
    model = core.read_model(str(model)) if isinstance(model, (str, Path)) else model
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    return core.compile_model(model, "CPU", config)


class OpenVinoFormat:
    """OpenVINO: fp32 IR trunk + head, checked; then fp16, bf16 and the int8 trunk, each checked."""

    name = "openvino"

    def write(self, session: ExportSession) -> None:
        trunk_src, head_src = session.sources()
        (session.tmp / "openvino").mkdir()
        t0 = time.perf_counter()
        trunk_rel, head_rel = "openvino/trunk.fp32.xml", f"openvino/head.{HEAD}.xml"
        convert_onnx(trunk_src, session.tmp / trunk_rel)
        convert_onnx(head_src, session.tmp / head_rel)
        log.info("converted trunk and head to OpenVINO IR in %.1fs", time.perf_counter() - t0)
        onnx_derived = "onnx/trunk.fp32.onnx" if session.shipped("onnx", "fp32") else session.origin
        head_derived = f"onnx/head.{HEAD}.onnx" if "onnx" in session.options.formats else session.origin
        session.add_file(trunk_rel, fmt="openvino", precision="fp32", role="trunk", derived_from=onnx_derived)
        session.add_file(head_rel, fmt="openvino", precision="fp32", role="head", derived_from=head_derived)
        derived = trunk_rel if session.shipped("openvino", "fp32") else onnx_derived
        merged_fp32: str | None = None
        for precision in session.precisions("openvino"):
            hint = INFERENCE_PRECISION[precision]
            if precision in ("fp32", "bf16"):
                name = session.add_variant("openvino", precision, trunk_rel, head_rel, inference_precision=hint)
            elif precision == "fp16":
                rel = "openvino/trunk.fp16.xml"
                convert_onnx(trunk_src, session.tmp / rel, compress_to_fp16=True)
                session.add_file(rel, fmt="openvino", precision="fp16", role="trunk", derived_from=derived)
                name = session.add_variant("openvino", "fp16", rel, head_rel, inference_precision=hint)
            else:  # int8
                rel = "openvino/trunk.int8.xml"
                record = self.quantize(session, session.tmp / trunk_rel, session.tmp / head_rel, session.tmp / rel)
                session.add_file(rel, fmt="openvino", precision="int8", role="trunk", derived_from=derived)
                name = session.add_variant(
                    "openvino", "int8", rel, head_rel, inference_precision=hint, quantization=record
                )
            if session.options.merged and (session.shipped("openvino", precision) or precision == "fp32"):
                # bf16 runs the fp32 graph: it shares the fp32 merged file.
                session.add_merged(name, self.merge, source=merged_fp32 if precision == "bf16" else None)
                if precision == "fp32":
                    merged_fp32 = session.variants[name]["merged"][HEAD]
            session.check(name)

    def quantize(self, session: ExportSession, fp32_trunk: Path, head: Path, out: Path) -> dict[str, Any]:
        """Search NNCF settings for the IR trunk (scored with the fp32 IR head), write the chosen one to ``out``."""
        from edgetl.workstation.export.formats.openvino_quantize import OVQuantizer

        _, x_calib = session.calibration()
        head_model = compile_f32(head)

        def head_logits(features: np.ndarray) -> np.ndarray:
            return head_model(features)[0]

        baseline = session.fp32_top1("openvino")
        return session.search_int8(
            "openvino",
            lambda: OVQuantizer(
                fp32_trunk,
                x_calib,
                (session.x_val, session.y_val, head_logits),
                qat=session.qat_hook(),
                workdir=session.work / "openvino-int8",
            ),
            out,
            baseline,
        )

    def write_head(self, source: Path, out: Path) -> None:
        convert_onnx(source, out)

    def merge(self, trunk: Path, head: Path, out: Path) -> None:
        merge_ir(trunk, head, out)


FORMAT = OpenVinoFormat()
