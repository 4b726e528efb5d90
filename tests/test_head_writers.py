"""The device's linear-head writers: one per runtime, numpy and the runtime's own library only.

Each writer's file must load with its back-end and compute ``x @ W.T + b``, at batch 1 and above,
exactly as the head the workstation writes from the same weights (torch -> ONNX -> the format's
plug-in); bad weights are refused before anything is written; and none of it imports torch or onnx.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgetl.core.errors import ConfigError
from edgetl.core.formats import FORMATS
from edgetl.device.backends import BACKENDS, head_writer, staged_output

FORMAT_NAMES = list(FORMATS)
CLASSES, FEATURES = 7, 48
MAX_ABS_DIFF = 1e-4


def weights(classes: int = CLASSES, features: int = FEATURES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.normal(0.0, 0.2, (classes, features)).astype(np.float32),
        rng.normal(0.0, 0.5, classes).astype(np.float32),
    )


def head_path(root: Path, fmt: str) -> Path:
    """``root/<fmt>/head.<ext>``: a folder per format, as in a bundle (OpenVINO's and NCNN's sidecars
    are both ``head.bin``)."""
    folder = root / fmt
    folder.mkdir(exist_ok=True)
    return folder / f"head{FORMATS[fmt].extension}"


def load(fmt: str, path: Path):
    """The back-end's model for ``path``, with the f32 inference precision pinned where the runtime
    has one (OpenVINO otherwise picks bf16 by itself on CPUs that have it)."""
    row = FORMATS[fmt]
    options = {"inference_precision": "f32"} if "f32" in row.inference_precisions else {}
    return BACKENDS[row.runtime].loader(path, threads=1, **options)


def write(fmt: str, weight: np.ndarray, bias: np.ndarray, out: Path) -> None:
    writer = head_writer(FORMATS[fmt].runtime)
    assert writer is not None, f"runtime {FORMATS[fmt].runtime} has no write_linear_head"
    writer(weight, bias, out)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_written_head_computes_the_linear_layer(fmt, tmp_path):
    weight, bias = weights()
    out = head_path(tmp_path, fmt)
    write(fmt, weight, bias, out)
    for sidecar in FORMATS[fmt].sidecar_paths(str(out)):
        assert Path(sidecar).is_file(), f"{fmt}: the sidecar {sidecar} is missing"
    # Only the graph and its sidecars: the scratch folder the writer stages them in is gone.
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        Path(p).name for p in (str(out), *FORMATS[fmt].sidecar_paths(str(out)))
    )
    model = load(fmt, out)
    assert model.signature == {
        "inputs": [([None, FEATURES], "float32")],
        "outputs": [([None, CLASSES], "float32")],
    }
    rng = np.random.default_rng(1)
    for batch in (1, 5, 1):  # back to 1: LiteRT resized its input to 5 in between
        x = rng.normal(0.0, 1.0, (batch, FEATURES)).astype(np.float32)
        logits = model(x)
        assert logits.shape == (batch, CLASSES) and logits.dtype == np.float32
        assert float(np.abs(logits - (x @ weight.T + bias)).max()) <= MAX_ABS_DIFF


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_one_feature_two_classes_is_the_smallest_head(fmt, tmp_path):
    weight, bias = weights(classes=2, features=1)
    out = head_path(tmp_path, fmt)
    write(fmt, weight, bias, out)
    x = np.array([[0.5], [-2.0], [3.0]], dtype=np.float32)
    assert float(np.abs(load(fmt, out)(x) - (x @ weight.T + bias)).max()) <= MAX_ABS_DIFF


def test_float64_weights_are_written_as_float32(tmp_path):
    weight, bias = weights()
    out = head_path(tmp_path, "onnx")
    write("onnx", weight.astype(np.float64), bias.astype(np.float64), out)
    x = np.random.default_rng(2).normal(0.0, 1.0, (3, FEATURES)).astype(np.float32)
    assert float(np.abs(load("onnx", out)(x) - (x @ weight.T + bias)).max()) <= MAX_ABS_DIFF


BAD_HEADS = {
    "one class": (np.ones((1, 4), np.float32), np.zeros(1, np.float32)),
    "no features": (np.ones((3, 0), np.float32), np.zeros(3, np.float32)),
    "bias length": (np.ones((3, 4), np.float32), np.zeros(2, np.float32)),
    "1-D weight": (np.ones(4, np.float32), np.zeros(4, np.float32)),
    "NaN weight": (np.array([[1.0, np.nan], [0.0, 1.0]], np.float32), np.zeros(2, np.float32)),
    "inf bias": (np.eye(2, dtype=np.float32), np.array([0.0, np.inf], np.float32)),
    "beyond float32": (np.array([[1e39, 0.0], [0.0, 1.0]]), np.zeros(2)),
}


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("case", list(BAD_HEADS))
def test_bad_heads_are_refused_before_writing(fmt, case, tmp_path):
    weight, bias = BAD_HEADS[case]
    out = head_path(tmp_path, fmt)
    with pytest.raises(ValueError, match="linear head"):
        write(fmt, weight, bias, out)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("fmt", ["openvino", "ncnn"])
def test_formats_with_a_weights_sidecar_refuse_another_extension(fmt, tmp_path):
    with pytest.raises(ValueError, match=FORMATS[fmt].extension):
        write(fmt, *weights(), tmp_path / "head.bin")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "head.param"
    out.write_text("old")
    with pytest.raises(RuntimeError), staged_output(out, sidecars=(".bin",)) as staged:
        staged.write_text("new")
        staged.with_suffix(".bin").write_bytes(b"new")
        raise RuntimeError("the writer failed half-way")
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.param"]


def test_head_writer_is_each_runtime_modules_writer():
    for fmt in FORMAT_NAMES:
        runtime = FORMATS[fmt].runtime
        module = importlib.import_module(f"edgetl.device.backends.{runtime}")
        assert head_writer(runtime) is module.write_linear_head
    with pytest.raises(ConfigError, match="unknown runtime"):
        head_writer("tensorflow")


def test_onnx_head_is_a_valid_model(tmp_path):
    import onnx

    from edgetl.workstation.export.formats.onnx import ONNX_OPSET

    weight, bias = weights()
    out = head_path(tmp_path, "onnx")
    write("onnx", weight, bias, out)
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out))
    assert model.ir_version == 8
    # The workstation's opset (the device cannot import it: the constant is written twice).
    assert [(o.domain, o.version) for o in model.opset_import] == [("", ONNX_OPSET)] == [("", 17)]
    (node,) = model.graph.node
    assert node.op_type == "Gemm" and [(a.name, a.i) for a in node.attribute] == [("transB", 1)]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(inits[node.input[1]], weight)
    np.testing.assert_array_equal(inits[node.input[2]], bias)

    def dims(value_info):
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    (inp,), (outp,) = model.graph.input, model.graph.output
    assert (inp.name, dims(inp), inp.type.tensor_type.elem_type) == ("features", ["batch", FEATURES], 1)
    assert (outp.name, dims(outp), outp.type.tensor_type.elem_type) == ("logits", ["batch", CLASSES], 1)


def test_litert_head_follows_the_tflite_schema(tmp_path):
    from ai_edge_litert import schema_py_generated as schema

    weight, bias = weights()
    out = head_path(tmp_path, "litert")
    write("litert", weight, bias, out)
    data = out.read_bytes()
    assert schema.Model.ModelBufferHasIdentifier(data, 0)
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    assert model.version == 3
    assert model.buffers[0].data is None  # the empty sentinel
    (code,) = model.operatorCodes
    fc = schema.BuiltinOperator.FULLY_CONNECTED
    assert (code.builtinCode, code.deprecatedBuiltinCode, code.version) == (fc, fc, 1)
    (graph,) = model.subgraphs
    (op,) = graph.operators
    assert op.builtinOptionsType == schema.BuiltinOptions.FullyConnectedOptions
    assert op.builtinOptions.fusedActivationFunction == schema.ActivationFunctionType.NONE
    tensors = graph.tensors
    assert [tensors[i].name for i in graph.inputs] == [b"features"]
    assert [tensors[i].name for i in graph.outputs] == [b"logits"]
    assert all(t.type == schema.TensorType.FLOAT32 for t in tensors)
    assert list(tensors[graph.inputs[0]].shapeSignature) == [-1, FEATURES]
    w, b = (tensors[i] for i in op.inputs[1:])
    np.testing.assert_array_equal(np.frombuffer(bytes(model.buffers[w.buffer].data), "<f4").reshape(w.shape), weight)
    np.testing.assert_array_equal(np.frombuffer(bytes(model.buffers[b.buffer].data), "<f4"), bias)
    assert data.find(weight.tobytes()) % 16 == 0  # weights start 16-byte aligned
    (sig,) = model.signatureDefs
    assert sig.signatureKey == b"serving_default"
    assert [(m.name, m.tensorIndex) for m in sig.inputs] == [(b"features", graph.inputs[0])]


@pytest.fixture(scope="module")
def workstation_heads(tmp_path_factory):
    """The workstation's head in every format from one torch Linear layer, and its weights."""
    import torch

    from edgetl.workstation.export.formats import registry
    from edgetl.workstation.export.formats.onnx import export_onnx

    root = tmp_path_factory.mktemp("workstation")
    weight, bias = weights(seed=3)
    linear = torch.nn.Linear(FEATURES, CLASSES).eval()
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
        linear.bias.copy_(torch.from_numpy(bias))
    source = root / "source.onnx"
    export_onnx(linear, torch.zeros(2, FEATURES), source, input_name="features", output_name="logits")
    plugins = registry()
    paths = {}
    for fmt in FORMAT_NAMES:
        paths[fmt] = head_path(root, fmt)
        plugins[fmt].write_head(source, paths[fmt])
    return paths, weight, bias


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_same_logits_as_the_workstation_head(fmt, workstation_heads, tmp_path):
    paths, weight, bias = workstation_heads
    mine = head_path(tmp_path, fmt)
    write(fmt, weight, bias, mine)
    x = np.random.default_rng(4).normal(0.0, 1.0, (5, FEATURES)).astype(np.float32)
    theirs_model, mine_model = load(fmt, paths[fmt]), load(fmt, mine)
    assert mine_model.signature == theirs_model.signature
    assert float(np.abs(mine_model(x) - theirs_model(x)).max()) <= MAX_ABS_DIFF


def test_io_names_match_the_workstation_heads(workstation_heads, tmp_path):
    import onnxruntime as ort
    import openvino

    from edgetl.device.backends.ncnn import read_param

    paths, weight, bias = workstation_heads
    mine = {fmt: head_path(tmp_path, fmt) for fmt in FORMAT_NAMES}
    for fmt, path in mine.items():
        write(fmt, weight, bias, path)

    def onnx_names(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]

    def ir_names(path):
        model = openvino.Core().read_model(str(path))
        return [set(p.names) for p in model.inputs], [set(p.names) for p in model.outputs]

    assert onnx_names(mine["onnx"]) == onnx_names(paths["onnx"]) == (["features"], ["logits"])
    assert ir_names(mine["openvino"]) == ir_names(paths["openvino"]) == ([{"features"}], [{"logits"}])
    assert read_param(mine["ncnn"]) == read_param(paths["ncnn"]) == ("in0", [FEATURES], "out0")
    # pnnx's Linear head, byte for byte: the same layers, and the same weight blob (tag + weight + bias).
    assert mine["ncnn"].read_text().split() == paths["ncnn"].read_text().split()
    for fmt in ("ncnn", "openvino"):  # OpenVINO's: the same folded constants, weight then bias
        assert mine[fmt].with_suffix(".bin").read_bytes() == paths[fmt].with_suffix(".bin").read_bytes(), fmt


def test_writers_run_without_torch_or_onnx(tmp_path):
    """What a device has: the runtimes and numpy; torch, onnx and the converters are refused outright."""
    code = textwrap.dedent(
        f"""
        import sys

        BLOCKED = ("torch", "torchvision", "onnx", "pnnx", "litert_torch")

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is blocked: a device does not have it")
                return None

        sys.meta_path.insert(0, Block())
        from pathlib import Path
        import numpy as np
        from edgetl.core.formats import FORMATS
        from edgetl.device.backends import head_writer

        rng = np.random.default_rng(0)
        weight, bias = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=3).astype(np.float32)
        for fmt, row in FORMATS.items():
            (Path({str(tmp_path)!r}) / fmt).mkdir()
            head_writer(row.runtime)(weight, bias, Path({str(tmp_path)!r}) / fmt / f"head{{row.extension}}")
        assert not any(m.partition(".")[0] in BLOCKED for m in sys.modules), "a blocked module was imported"
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(
        p
        for fmt, row in FORMATS.items()
        for p in (f"{fmt}/head{row.extension}", *row.sidecar_paths(f"{fmt}/head{row.extension}"))
    )
