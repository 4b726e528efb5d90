"""Run a frozen module (a trunk, or the frozen prefix of one) as fast as this machine allows.

A frozen module in eval mode is a constant function: on the CPU it runs several times faster through
ONNX Runtime than through eager PyTorch (measured on a 2-core CPU, MobileNetV2 at 96 px, 512 images:
eager 4.6 s, ONNX Runtime 0.8 s plus 0.8 s to export). :func:`frozen_runner` exports the module with
the project's exporter (:func:`edgetl.workstation.export.formats.onnx.export_onnx`, TorchScript,
dynamic batch), checks the graph against eager on an example batch, and falls back to eager with one
INFO line when anything goes wrong. The last two runners made are reused while the module, its tensors
and the input shape are unchanged. On CUDA eager is used (under autocast when given).

``EDGETL_FROZEN_ENGINE=eager`` forces eager (benchmarks, debugging).
"""

from __future__ import annotations

import logging
import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENGINES = ("auto", "onnxruntime", "eager")
ENGINE_ENV = "EDGETL_FROZEN_ENGINE"
# The ONNX graph must agree with eager to this fraction of the output's magnitude (at least 1).
RTOL = 1e-3


def _eager(module, device, autocast) -> Callable[[Any], Any]:
    import torch

    def run(x):
        module.eval()
        with torch.inference_mode():
            x = x.to(device, non_blocking=True)
            if autocast is not None:
                with autocast():
                    y = module(x)
            else:
                y = module(x)
            return y.float().cpu()

    return run


def _is_identity(module) -> bool:
    """A module that returns its input (an empty Sequential: a prefix cut before the first layer)."""
    import torch.nn as nn

    return isinstance(module, nn.Identity) or (isinstance(module, nn.Sequential) and len(module) == 0)


def _onnx_runner(module, example) -> Callable[[Any], Any]:
    """Export ``module`` to a temporary ONNX file and open it with ONNX Runtime (the file is then removed)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from edgetl.workstation.export.formats.onnx import export_onnx

    with tempfile.TemporaryDirectory(prefix="edgetl-frozen-") as tmp:
        path = Path(tmp) / "frozen.onnx"
        export_onnx(module, example, path, input_name="input", output_name="output")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        # Idle ONNX Runtime threads must not spin: torch trains on the same cores right after the pass.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Built from the file's bytes: the session needs nothing on disk once made.
        session = ort.InferenceSession(path.read_bytes(), sess_options=options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x):
        arr = np.ascontiguousarray(x.detach().cpu().float().numpy())
        return torch.from_numpy(session.run(None, {input_name: arr})[0])

    return run


# The last ONNX Runtime runners made, with what each was made from: the passes of one run over the same
# frozen trunk (train, the crops compared, validation; a prefix between them) reuse theirs instead of
# exporting again (~0.5 s each).
_RECENT = 2
_recent_runners: list[tuple[Any, tuple, Callable[[Any], Any]]] = []


def _signature(module, example, device, autocast) -> tuple:
    """What a runner depends on: the module's identity, its tensors' in-place versions (an optimizer
    step bumps them), its taps, the example's shape past the batch, the device and autocast."""
    tensors = [*module.parameters(), *module.buffers()]
    return (
        id(module),
        tuple(id(t) for t in tensors),
        tuple(t._version for t in tensors),
        tuple(getattr(module, "taps", ())),
        tuple(example.shape[1:]),
        str(device),
        autocast is None,
    )


def frozen_runner(module, example, device, *, autocast=None, engine: str = "auto") -> Callable[[Any], Any]:
    """A function computing module(x) for a frozen module in eval mode, as fast as this machine allows.

    CPU + engine auto/onnxruntime: export with ``export_onnx`` (dynamic batch) into a temporary
    folder, run with ONNX Runtime (intra-op threads = ``torch.get_num_threads()``), and check it
    against eager on ``example`` (max abs diff <= 1e-3 * max(1, max |eager|)); on any failure
    (export error, mismatch) log one INFO line and fall back to eager. engine "eager": eager always.
    CUDA: eager (under ``autocast``, a context factory, when given). Output: float32 torch tensor on the CPU.
    """
    import torch

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    forced = os.environ.get(ENGINE_ENV, "").strip().lower()
    if forced == "eager":
        engine = "eager"
    device = torch.device(device)
    module.eval()
    if _is_identity(module):
        return lambda x: x.detach().float().cpu()
    eager = _eager(module, device, autocast)
    if engine == "eager" or device.type != "cpu":
        return eager
    example = example.detach().cpu().float()
    signature = _signature(module, example, device, autocast)
    for ref, made_from, runner in _recent_runners:
        if ref() is module and made_from == signature:
            return runner
    try:
        fast = _onnx_runner(module, example)
        want = eager(example)
        got = fast(example)
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"shape {tuple(got.shape)} against eager {tuple(want.shape)}")
        diff = float((got - want).abs().max()) if want.numel() else 0.0
        bound = RTOL * max(1.0, float(want.abs().max()) if want.numel() else 0.0)
        if not diff <= bound:  # NaN fails too
            raise ValueError(f"max abs difference {diff:.3g} against eager exceeds {bound:.3g}")
    except Exception as exc:  # export and runtime fail in many ways; eager is always right
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.info(
            "frozen blocks run in eager PyTorch: ONNX Runtime is not usable here (%s: %s)", type(exc).__name__, first
        )
        return eager
    log.debug("frozen blocks run in ONNX Runtime (%d threads)", torch.get_num_threads())
    _recent_runners.insert(0, (weakref.ref(module), signature, fast))
    del _recent_runners[_RECENT:]
    return fast
