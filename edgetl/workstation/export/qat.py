"""Quantization-aware fine-tuning (QAT) of the trunk: the last int8 remedy, for every format.

A short fine-tune of the **trunk only**, with fake quantization in its forward pass, that makes its
weights robust to the int8 quantization the formats' post-training quantizers (ONNX Runtime,
NNCF/OpenVINO) then apply. The head stays the run's fp32 head, frozen: every variant shares that one
head file, so the trunk must keep serving it. The result is an **fp32 ONNX trunk** with the
QAT-trained weights (no fake-quant nodes), with the fp32 trunk's input and output names and shapes,
which each quantizer quantizes and checks like any other trunk.

The fake quantization mimics what those quantizers do, so the ranges re-calibrated on the QAT trunk
land close to the ones it was trained with:

- batch norm folded into the convolutions first (``torch.fx.experimental.optimization.fuse``), as
  the ONNX export and ORT's ``quant_pre_process`` fold it: the weights quantized are the folded ones;
- every Conv2d/Linear weight: symmetric int8 per output channel, scale = max|w| / 127, recomputed
  from the current weights at every step (``torch.fake_quantize_per_channel_affine``);
- every Conv2d/Linear input: asymmetric int8 per tensor, range from min/max over the calibration
  images (``torch.ao.quantization.MinMaxObserver``, ORT's MinMax calibration), then frozen
  (``torch.fake_quantize_per_tensor_affine``). Both ops pass straight-through gradients.

The loss distils the fp32 model on the same images (the fp32 trunk and head are the teacher):
mean squared feature error normalised by the fp32 features' variance, plus the KL divergence of the
logits through the frozen head from the fp32 logits, plus a small cross-entropy on the labels.
Images: the run's training split, streamed in batches with eval preprocessing (no augmentation).
What is written here rather than taken from a library is the glue: PyTorch's own QAT flows
(``prepare_qat``/PT2E) insert quantizers whose placement and schemes follow torch's backends, not
ONNX Runtime's and OpenVINO's, and export fake-quant nodes; here the quantizers sit exactly where
those runtimes quantize, and the exported graph is a plain fp32 trunk.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.ao.quantization.observer import MinMaxObserver
from torch.fx.experimental.optimization import fuse
from torch.nn.utils import parametrize

from edgetl.core.bundle import sha256_file
from edgetl.core.errors import ExportError
from edgetl.core.imagefolder import Sample
from edgetl.core.preprocess import Preprocessing
from edgetl.workstation.export.common import load_arrays, ort_model, sqnr_db

log = logging.getLogger(__name__)

BATCH_SIZE = 32
DEFAULT_LR = 1e-5  # Adam; docs/export.md has the measurement behind it
# Loss weights: features (normalised MSE), logits (KL against the fp32 logits), labels (cross-entropy).
FEATURES_WEIGHT = 1.0
KD_WEIGHT = 1.0
CE_WEIGHT = 0.1
CHECK_IMAGES = 64  # validation images the features SQNR figures are measured on
# The folded trunk must compute what the fp32 trunk computes (float rounding only) before QAT starts.
FOLD_MIN_SQNR_DB = 60.0
EXPORT_MIN_SQNR_DB = 60.0  # and so must its ONNX graph after QAT (the fp32 export bar is ~1e-5 abs)


@dataclasses.dataclass(frozen=True)
class QatResult:
    """The QAT trunk written to ``path`` and what its manifest record says about how it was made."""

    path: Path
    epochs: int
    lr: float
    images: int
    seconds: float
    loss: tuple[float, ...]  # mean training loss per epoch
    sqnr_before: float | None  # fake-quant trunk vs fp32 trunk features, dB, before QAT
    sqnr_after: float | None  # the same after QAT (ranges re-calibrated, as the quantizers will)
    trunk_sha256: str
    folded_batchnorm: bool

    def record(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "lr": float(self.lr),
            "images": self.images,
            "seconds": round(self.seconds, 1),
            "loss": [round(v, 5) for v in self.loss],
            "features_sqnr_db": {
                "before": None if self.sqnr_before is None else float(self.sqnr_before),
                "after": None if self.sqnr_after is None else float(self.sqnr_after),
            },
            "trunk_sha256": self.trunk_sha256,
            "folded_batchnorm": self.folded_batchnorm,
        }


def check_images(x_val: np.ndarray) -> np.ndarray:
    """:data:`CHECK_IMAGES` validation images spread over the set (it is often sorted by class)."""
    return x_val[:: max(1, len(x_val) // CHECK_IMAGES)][:CHECK_IMAGES]


# --- fake quantization --------------------------------------------------------------------------


class _WeightFakeQuant(torch.nn.Module):
    """Parametrization of a weight: symmetric int8 per output channel, scale from the current weights."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = False

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        scale = (w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / 127.0).clamp_min(1e-12).float()
        zero = torch.zeros(w.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -127, 127)


class _InputFakeQuant:
    """Forward pre-hook on a Conv2d/Linear: records its input's range, or fake-quantizes the input
    with the frozen range (asymmetric int8 per tensor)."""

    def __init__(self) -> None:
        self.mode = "float"  # float | observe | quantize
        self.observer: MinMaxObserver | None = None
        self.qparams: tuple[float, int] | None = None

    def reset(self) -> None:
        self.observer = MinMaxObserver(
            dtype=torch.qint8, qscheme=torch.per_tensor_affine, quant_min=-128, quant_max=127
        )
        self.qparams = None

    def freeze(self) -> None:
        scale, zero = self.observer.calculate_qparams()
        self.qparams = (float(scale), int(zero))

    def __call__(self, module, args):
        if self.mode == "observe":
            self.observer(args[0].detach())
        elif self.mode == "quantize":
            scale, zero = self.qparams
            return (torch.fake_quantize_per_tensor_affine(args[0], scale, zero, -128, 127), *args[1:])
        return None


@dataclasses.dataclass
class _Site:
    name: str
    module: Any
    weight: _WeightFakeQuant
    inputs: _InputFakeQuant
    handle: Any


class _FakeQuantized:
    """The fake quantizers attached to every Conv2d/Linear of a trunk, switched together."""

    def __init__(self, trunk) -> None:
        self.sites: list[_Site] = []
        for name, m in trunk.named_modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                w, a = _WeightFakeQuant(), _InputFakeQuant()
                parametrize.register_parametrization(m, "weight", w)
                self.sites.append(_Site(name, m, w, a, m.register_forward_pre_hook(a)))

    def set(self, mode: str) -> None:
        """``float`` (the trunk as it is), ``observe`` (float, recording input ranges) or ``quantize``."""
        for s in self.sites:
            s.weight.enabled = mode == "quantize"
            s.inputs.mode = mode

    def calibrate(self, trunk, x: np.ndarray) -> None:
        """Input ranges from min/max over ``x`` with float weights (what ORT's MinMax calibration sees)."""
        for s in self.sites:
            s.inputs.reset()
        self.set("observe")
        with torch.no_grad():
            for i in range(0, len(x), BATCH_SIZE):
                trunk(torch.from_numpy(x[i : i + BATCH_SIZE]))
        for s in self.sites:
            s.inputs.freeze()
        self.set("quantize")

    def remove(self) -> None:
        """Back to a plain float trunk holding the trained weights (no parametrization, no hook)."""
        for s in self.sites:
            s.handle.remove()
            parametrize.remove_parametrizations(s.module, "weight", leave_parametrized=False)
        self.sites = []


# --- batch norm folding -------------------------------------------------------------------------


def _set_submodule(root, path: str, module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _fold_in_execution_order(trunk, x_check: np.ndarray):
    """A copy of ``trunk`` with every batch norm that reads a convolution's output directly folded into
    it, found by running the trunk once (for trunks fx cannot trace, such as timm's with TensorFlow
    padding); None when there is none. A batch norm with a fused activation (timm's
    ``BatchNormAct2d``) leaves its activation in its place; other batch-norm subclasses stay."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    folded = copy.deepcopy(trunk).eval()
    paths = {m: n for n, m in folded.named_modules()}
    produced: dict[int, tuple[torch.Tensor, Any]] = {}
    pairs: list[tuple[Any, Any]] = []

    def after_conv(module, inputs, output):
        produced[id(output)] = (output, module)

    def before_bn(module, inputs):
        source = produced.get(id(inputs[0]))
        if source is not None and source[0] is inputs[0]:
            pairs.append((source[1], module))

    hooks = [
        m.register_forward_hook(after_conv)
        if isinstance(m, torch.nn.Conv2d)
        else m.register_forward_pre_hook(before_bn)
        for m in folded.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.modules.batchnorm._BatchNorm))
    ]
    try:
        with torch.no_grad():
            folded(torch.from_numpy(x_check[:1]))
    finally:
        for h in hooks:
            h.remove()
    convs = [c for c, _ in pairs]
    count = 0
    for conv, bn in pairs:
        if convs.count(conv) != 1 or not bn.track_running_stats:
            continue
        if type(bn) is torch.nn.BatchNorm2d:
            replacement = torch.nn.Identity()
        elif hasattr(bn, "act") and hasattr(bn, "drop"):  # timm's BatchNormAct2d: norm, then drop, then act
            replacement = torch.nn.Sequential(bn.drop, bn.act)
        else:
            continue
        with torch.no_grad():
            w, b = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
        conv.weight, conv.bias = w, b
        _set_submodule(folded, paths[bn], replacement)
        count += 1
    return folded if count else None


def fold_batchnorm(trunk, x_check: np.ndarray) -> tuple[Any, bool]:
    """``trunk`` (a copy) with batch norm folded into the preceding convolutions, and whether it was.

    ``torch.fx.experimental.optimization.fuse`` folds them in a traced copy; its folded modules are
    then put back at their paths in a copy of the trunk's own module tree (the folded batch norms
    replaced by ``Identity``), so the exported graph keeps the fp32 trunk's node names
    (``/body/body.1/conv/conv.0/conv.0.0/Conv``), which the int8 search reports and excludes by
    name; the traced module's are flattened (``/conv.0.0/Conv`` in every block). A trunk that fx
    does not trace is folded by running it once (:func:`_fold_in_execution_order`). A trunk with
    nothing to fold that way, or whose folded copy does not compute what it computed, is returned
    unfolded (its batch norm then stays in eval mode: frozen statistics).
    """
    try:
        fused = fuse(trunk.eval())
    except Exception as exc:  # fx raises many kinds of errors on code it cannot trace
        folded = _fold_in_execution_order(trunk, x_check)
        if folded is None:
            log.warning("QAT: the trunk does not trace (%s): fine-tuning with batch norm frozen, not folded", exc)
            return copy.deepcopy(trunk), False
    else:
        folded = copy.deepcopy(trunk)
        kept = {name for name, _ in fused.named_modules()}
        for name, m in fused.named_modules():
            if name and not any(True for _ in m.children()):
                _set_submodule(folded, name, copy.deepcopy(m))
        for name, m in list(folded.named_modules()):
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and name not in kept:
                _set_submodule(folded, name, torch.nn.Identity())
    with torch.no_grad():
        x = torch.from_numpy(x_check[:8])
        fidelity = sqnr_db(folded(x).numpy(), trunk(x).numpy())
    if fidelity is not None and not fidelity >= FOLD_MIN_SQNR_DB:
        log.warning("QAT: folding batch norm changed the trunk (%s dB): fine-tuning with it frozen instead", fidelity)
        return copy.deepcopy(trunk), False
    return folded, True


# --- the fine-tune ------------------------------------------------------------------------------


def _features(trunk, x: np.ndarray):
    with torch.no_grad():
        return np.concatenate(
            [trunk(torch.from_numpy(x[i : i + BATCH_SIZE])).numpy() for i in range(0, len(x), BATCH_SIZE)]
        )


def _write_onnx(trunk, x_check: np.ndarray, out: Path) -> str:
    """Export ``trunk`` as session.sources() does, atomically at ``out``; returns its sha256.

    The graph must compute what the torch trunk computes (ONNX Runtime on ``x_check``): the
    quantizers start from this file, and the export checks int8 against fp32, not this step."""
    from edgetl.workstation.export.formats.onnx import export_onnx

    size = x_check.shape[-1]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".onnx", dir=out.parent)
    os.close(fd)
    try:
        export_onnx(trunk, torch.zeros(2, 3, size, size), Path(tmp), input_name="image", output_name="features")
        parity = sqnr_db(ort_model(Path(tmp))(x_check), _features(trunk, x_check))
        if parity is not None and not parity >= EXPORT_MIN_SQNR_DB:
            raise ExportError(
                f"the QAT trunk exported to ONNX does not compute what it computes in PyTorch (features SQNR "
                f"{parity} dB); this is a bug, please report it (or pass --qat-epochs 0)"
            )
        digest = sha256_file(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def qat_trunk(
    model,
    train_samples: Sequence[Sample],
    pp: Preprocessing,
    *,
    epochs: int,
    x_calib: np.ndarray,
    x_check: np.ndarray,
    out: Path,
    seed: int = 0,
    lr: float = DEFAULT_LR,
    progress: Any = None,
) -> QatResult:
    """Fine-tune a copy of ``model.trunk`` with fake int8 quantization against the fp32 model, and
    write it as an fp32 ONNX trunk at ``out``.

    ``model`` (``.trunk``, ``.head``) is not modified. ``x_calib``: the calibration images (the
    activation ranges); ``x_check``: a few validation images (the features SQNR figures). Batches of
    :data:`BATCH_SIZE` from ``train_samples`` in a seeded order, Adam at ``lr``; deterministic for a
    seed on CPU. A non-finite loss stops with :class:`ExportError`.
    """
    if not train_samples:
        raise ExportError("QAT needs the run's training images, and the run has none")
    t0 = time.perf_counter()
    teacher, head = copy.deepcopy(model.trunk).eval(), copy.deepcopy(model.head).eval()
    for p in [*teacher.parameters(), *head.parameters()]:
        p.requires_grad_(False)
    student, folded = fold_batchnorm(teacher, x_check)
    student.eval()  # always: no batch-norm statistics move, no dropout or stochastic depth
    for p in student.parameters():
        p.requires_grad_(True)
    fq = _FakeQuantized(student)
    reference = _features(teacher, x_check)
    fq.calibrate(student, x_calib)
    before = sqnr_db(_features(student, x_check), reference)

    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    n_batches = math.ceil(len(train_samples) / BATCH_SIZE)
    task = None
    if progress is not None:
        task = progress.add_task("QAT fine-tune", total=epochs * n_batches, status="")
    losses: list[float] = []
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(train_samples))
        total, seen = 0.0, 0
        for b in range(n_batches):
            batch = [train_samples[i] for i in order[b * BATCH_SIZE : (b + 1) * BATCH_SIZE]]
            x_np, y_np = load_arrays(batch, pp)
            x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
            with torch.no_grad():
                f_ref = teacher(x)
                logits_ref = head(f_ref)
            f = student(x)
            logits = head(f)
            loss = (
                FEATURES_WEIGHT * F.mse_loss(f, f_ref) / f_ref.var().clamp_min(1e-12)
                + KD_WEIGHT
                * F.kl_div(
                    F.log_softmax(logits, 1), F.log_softmax(logits_ref, 1), reduction="batchmean", log_target=True
                )
                + CE_WEIGHT * F.cross_entropy(logits, y)
            )
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ExportError(
                    f"QAT diverged at epoch {epoch}/{epochs}, batch {b + 1}/{n_batches} (loss {value}); "
                    "lower --qat-epochs or report it"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += value * len(batch)
            seen += len(batch)
            if task is not None:
                progress.update(task, advance=1, status=f"epoch {epoch}/{epochs}: loss {total / seen:.4f}")
        losses.append(total / seen)
        sqnr = sqnr_db(_features(student, x_check), reference)
        log.info(
            "QAT epoch %d/%d: loss %.4f, features SQNR %s dB (fake-quant trunk vs fp32, %d validation images)",
            epoch,
            epochs,
            losses[-1],
            sqnr,
            len(x_check),
        )
    fq.calibrate(student, x_calib)  # what the post-training quantizers will do with these weights
    after = sqnr_db(_features(student, x_check), reference)
    fq.remove()
    finite = all(v is None or math.isfinite(v) for v in (before, after))
    if not finite or not all(torch.isfinite(p).all() for p in student.parameters()):
        raise ExportError(
            f"QAT diverged (non-finite weights or features, SQNR {before} -> {after} dB); "
            "lower --qat-epochs or report it"
        )
    digest = _write_onnx(student, x_check, out)
    seconds = time.perf_counter() - t0
    log.info(
        "QAT: %d epoch(s) on %d images in %.1fs; features SQNR of the fake-quant trunk %s -> %s dB%s",
        epochs,
        len(train_samples),
        seconds,
        before,
        after,
        "" if folded else " (batch norm not folded)",
    )
    return QatResult(
        path=out,
        epochs=epochs,
        lr=lr,
        images=len(train_samples),
        seconds=seconds,
        loss=tuple(losses),
        sqnr_before=before,
        sqnr_after=after,
        trunk_sha256=digest,
        folded_batchnorm=folded,
    )
