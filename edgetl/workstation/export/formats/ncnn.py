"""The NCNN format: ``.param`` + ``.bin`` converted from the bundle's fp32 ONNX graphs with ``pnnx``.

pnnx reads the same fp32 ONNX trunk and head that ONNX Runtime runs (``session.sources()``), so the
formats start from one graph. What the bundle holds and what the device runs:

* ``ncnn-fp32``: fp32 weights (pnnx's ``fp16=0``: by default it stores fp16 weights) run with the
  NCNN options that keep fp32 honest pinned (no fp16 or bf16 storage or arithmetic; NCNN turns fp16
  on by itself on ARM and, for storage, on x86 with F16C); the variant's ``inference_precision`` is
  ``f32`` and the device back-end reports what its options really are (``runtime_info``).
* No int8: NCNN's int8 tools (``ncnn2table``, ``ncnn2int8``) are C++ programs that neither the
  ``ncnn`` wheel nor its sdist ship (the sdist prunes ``tools/``), and there is no Debian package.

NCNN runs one image at a time (a CHW ``ncnn.Mat``, no batch axis): the graphs are converted at batch
1 and the back-end loops over the batch. pnnx writes no input shape into the ``.param``; this module
writes it into the ``Input`` layer (``0=w 1=h 2=c``, NCNN's own syntax) so that the device can check
a file against the manifest before running it.

The merged graph is the trunk's and the head's ``.param`` text joined (the head's input replaced by
the trunk's output, its names prefixed) with the two ``.bin`` files concatenated: NCNN reads weights
layer by layer in order, so the result computes exactly what the two files compute.

pnnx writes many side files next to its input (``*.pnnx.param``, ``*_pnnx.py``, ``*.pnnxsim.onnx``
...): it runs on a copy of its input in a scratch folder and only ``.param``/``.bin`` are shipped;
its output goes to the debug log, never stdout. The plug-in protocol: ``formats/__init__.py``.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetl.core.errors import ExportError
from edgetl.core.formats import FORMATS
from edgetl.device.backends.ncnn import MAGIC  # the first line of every NCNN .param text file
from edgetl.workstation.export.common import HEAD

if TYPE_CHECKING:
    from edgetl.workstation.export.session import ExportSession

log = logging.getLogger(__name__)

# What NCNN runs for each bundle precision (the device back-end pins the options that give it).
INFERENCE_PRECISION = {"fp32": "f32"}
PNNX_TIMEOUT_S = 600


def bin_path(param: str | Path) -> Path:
    """The weights file beside ``param`` (the format's sidecar in ``core/formats.py``)."""
    return Path(FORMATS["ncnn"].sidecar_paths(str(param))[0])


def _onnx_input_shape(onnx_path: Path) -> list[int]:
    """The ONNX graph's one input shape with the batch (and any dynamic dimension) set to 1."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ExportError(f"pnnx cannot convert {onnx_path.name}: not a readable ONNX graph ({exc})") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ExportError(f"{onnx_path.name} has {len(inputs)} inputs; edgetl graphs have one")
    dims = inputs[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims]


def _pnnx_executable() -> str:
    try:
        import pnnx
    except ImportError:
        raise ExportError("pnnx is not installed: pip install 'edgetl[ncnn-export]'") from None
    return pnnx.EXEC_PATH


def _pnnx_complaint(output: str) -> str:
    """The line of pnnx's output that says what went wrong (it prints ``todo OP`` for an op it
    cannot convert, and the ONNX Runtime or parser error that stopped it)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("todo "):
            return f"pnnx cannot convert op {ln[5:].strip()}"
    for ln in reversed(lines):
        if re.search(r"fail|error|unsupported|not supported|expect", ln, re.IGNORECASE):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def parse_param(text: str) -> tuple[list[dict[str, Any]], int]:
    """The layers of an NCNN ``.param`` text (type, name, bottoms, tops, params) and its blob count."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or lines[0].strip() != MAGIC:
        raise ValueError("not an NCNN .param text file")
    n_layers, n_blobs = (int(v) for v in lines[1].split())
    layers = []
    for ln in lines[2:]:
        parts = ln.split()
        kind, name, nb, nt = parts[0], parts[1], int(parts[2]), int(parts[3])
        bottoms, tops = parts[4 : 4 + nb], parts[4 + nb : 4 + nb + nt]
        layers.append({"type": kind, "name": name, "bottoms": bottoms, "tops": tops, "params": parts[4 + nb + nt :]})
    if len(layers) != n_layers:
        raise ValueError(f"the header says {n_layers} layers but the file has {len(layers)}")
    return layers, n_blobs


def format_param(layers: list[dict[str, Any]], n_blobs: int) -> str:
    out = [MAGIC, f"{len(layers)} {n_blobs}"]
    for la in layers:
        fields = [
            f"{la['type']:<24}",
            f"{la['name']:<24}",
            str(len(la["bottoms"])),
            str(len(la["tops"])),
            *la["bottoms"],
            *la["tops"],
            *la["params"],
        ]
        out.append(" ".join(fields).rstrip())
    return "\n".join(out) + "\n"


def _check_layers(layers: list[dict[str, Any]], source: str) -> None:
    """Every layer type must be one NCNN has (pnnx leaves an op it cannot convert as its ONNX name)."""
    import ncnn

    unknown = [la for la in layers if ncnn.layer_to_index(la["type"]) < 0]
    if unknown:
        la = unknown[0]
        raise ExportError(
            f"pnnx could not convert {source} to NCNN: op {la['type']} (layer {la['name']}) has no NCNN "
            f"layer{f' ({len(unknown) - 1} more)' if len(unknown) > 1 else ''}; use another format for this backbone"
        )


def _set_input_shape(layers: list[dict[str, Any]], shape: list[int]) -> None:
    """Write the input's shape (without the batch) into the ``Input`` layer: ``0=w 1=h 2=c``."""
    inputs = [la for la in layers if la["type"] == "Input"]
    if len(inputs) != 1:
        raise ExportError(f"pnnx wrote {len(inputs)} Input layers; edgetl graphs have one input")
    dims = shape[1:]  # NCNN has no batch axis
    if not 1 <= len(dims) <= 3:
        raise ExportError(f"NCNN takes inputs of rank 1 to 3 without the batch, not {shape}")
    inputs[0]["params"] = [f"{i}={d}" for i, d in enumerate(reversed(dims))]


def convert_onnx(onnx_path: Path, param_path: Path, workdir: Path) -> None:
    """ONNX (fp32, one input) -> NCNN ``param_path`` + its ``.bin``, fp32 weights, batch 1.

    pnnx runs on a copy of ``onnx_path`` in ``workdir`` (it writes side files beside its input);
    its output goes to the debug log. A failure is one :class:`ExportError` naming the op pnnx
    could not convert when it says which.
    """
    exe = _pnnx_executable()
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "model.onnx"
    shutil.copyfile(onnx_path, src)
    shape = _onnx_input_shape(onnx_path)
    out_param, out_bin = workdir / "model.ncnn.param", workdir / "model.ncnn.bin"
    command = [
        exe,
        src.name,
        f"inputshape=[{','.join(str(d) for d in shape)}]",
        "fp16=0",  # pnnx stores fp16 weights by default: fp32 must stay fp32
        "device=cpu",
        f"ncnnparam={out_param.name}",
        f"ncnnbin={out_bin.name}",
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            command, cwd=workdir, capture_output=True, text=True, errors="replace", timeout=PNNX_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise ExportError(f"pnnx did not convert {onnx_path.name} within {PNNX_TIMEOUT_S} s") from None
    output = proc.stdout + proc.stderr
    log.debug("pnnx %s (exit %d, %.1fs):\n%s", onnx_path.name, proc.returncode, time.perf_counter() - t0, output)
    if proc.returncode != 0 or not out_param.is_file() or not out_bin.is_file():
        how = f"exit status {proc.returncode}" if proc.returncode >= 0 else f"signal {-proc.returncode}"
        raise ExportError(f"pnnx could not convert {onnx_path.name} to NCNN ({how}): {_pnnx_complaint(output)}")
    try:
        layers, n_blobs = parse_param(out_param.read_text())
    except (ValueError, IndexError) as exc:
        raise ExportError(f"pnnx wrote an unreadable NCNN .param for {onnx_path.name}: {exc}") from None
    _check_layers(layers, onnx_path.name)
    _set_input_shape(layers, shape)
    param_path.write_text(format_param(layers, n_blobs))
    shutil.copyfile(out_bin, bin_path(param_path))


def _output_blob(layers: list[dict[str, Any]]) -> str:
    produced = [t for la in layers for t in la["tops"]]
    consumed = {b for la in layers for b in la["bottoms"]}
    outputs = [t for t in produced if t not in consumed]
    if len(outputs) != 1:
        raise ExportError(f"an NCNN graph with {len(outputs)} outputs cannot be merged; edgetl graphs have one")
    return outputs[0]


def merge_param(trunk: Path, head: Path, out: Path) -> None:
    """One NCNN graph, image -> logits: the head's layers after the trunk's, reading the trunk's output.

    The head's layer and blob names get a ``head_`` prefix (the trunk's output blob is renamed
    ``features``) so that nothing collides; the output keeps the head's output name. The ``.bin``
    is the trunk's then the head's: NCNN reads weights in layer order.
    """
    t_layers, t_blobs = parse_param(trunk.read_text())
    h_layers, h_blobs = parse_param(head.read_text())
    t_out, h_out = _output_blob(t_layers), _output_blob(h_layers)
    (h_input,) = [la for la in h_layers if la["type"] == "Input"]
    h_in = h_input["tops"][0]
    trunk_blobs = {b for la in t_layers for b in (*la["bottoms"], *la["tops"])}
    features = next(
        n for n in ("features", *(f"features_{i}" for i in range(len(trunk_blobs) + 1))) if n not in trunk_blobs
    )

    def trunk_blob(b: str) -> str:
        return features if b == t_out else b

    def head_blob(b: str) -> str:
        return features if b == h_in else (b if b == h_out else f"head_{b}")

    layers = [
        {**la, "bottoms": [trunk_blob(b) for b in la["bottoms"]], "tops": [trunk_blob(t) for t in la["tops"]]}
        for la in t_layers
    ]
    for la in h_layers:
        if la is h_input:
            continue
        layers.append(
            {
                **la,
                "name": f"head_{la['name']}",
                "bottoms": [head_blob(b) for b in la["bottoms"]],
                "tops": [head_blob(t) for t in la["tops"]],
            }
        )
    out.write_text(format_param(layers, t_blobs + h_blobs - 1))
    with bin_path(out).open("wb") as dst:
        for part in (trunk, head):
            with bin_path(part).open("rb") as src:
                shutil.copyfileobj(src, dst)


class NcnnFormat:
    """NCNN: fp32 trunk + head converted with pnnx, pinned to f32 and checked; no int8."""

    name = "ncnn"

    def write(self, session: ExportSession) -> None:
        trunk_src, head_src = session.sources()
        (session.tmp / "ncnn").mkdir()
        t0 = time.perf_counter()
        trunk_rel, head_rel = "ncnn/trunk.fp32.param", f"ncnn/head.{HEAD}.param"
        convert_onnx(trunk_src, session.tmp / trunk_rel, session.work / "ncnn-trunk")
        convert_onnx(head_src, session.tmp / head_rel, session.work / "ncnn-head")
        log.info("converted trunk and head to NCNN with pnnx in %.1fs", time.perf_counter() - t0)
        onnx_derived = "onnx/trunk.fp32.onnx" if session.shipped("onnx", "fp32") else session.origin
        head_derived = f"onnx/head.{HEAD}.onnx" if "onnx" in session.options.formats else session.origin
        session.add_file(trunk_rel, fmt="ncnn", precision="fp32", role="trunk", derived_from=onnx_derived)
        session.add_file(head_rel, fmt="ncnn", precision="fp32", role="head", derived_from=head_derived)
        for precision in session.precisions("ncnn"):
            if precision != "fp32":  # the table row holds fp32 only; session.precisions never asks more
                raise ExportError(f"ncnn has no {precision} variant")
            name = session.add_variant(
                "ncnn", "fp32", trunk_rel, head_rel, inference_precision=INFERENCE_PRECISION["fp32"]
            )
            if session.options.merged:
                session.add_merged(name, self.merge)
            session.check(name)

    def quantize(self, session: ExportSession, fp32_trunk: Path, head: Path, out: Path) -> dict[str, Any]:
        raise ExportError(
            "ncnn has no int8 variant: NCNN's int8 tools (ncnn2table, ncnn2int8) are not in the ncnn wheel"
        )

    def write_head(self, source: Path, out: Path) -> None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="edgetl-pnnx-") as work:
            convert_onnx(source, out, Path(work))

    def merge(self, trunk: Path, head: Path, out: Path) -> None:
        merge_param(trunk, head, out)


FORMAT = NcnnFormat()
