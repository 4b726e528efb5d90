"""The cached-prefix fine-tune: trunk split, frozen runner, in-memory images, views, the loop."""

from __future__ import annotations

import copy
import dataclasses
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from edgetl.core.errors import ConfigError  # noqa: E402
from edgetl.core.imagefolder import Sample  # noqa: E402
from edgetl.core.preprocess import Preprocessing, load_image  # noqa: E402
from edgetl.workstation import fast_trunk  # noqa: E402
from edgetl.workstation.export.common import progress_bar  # noqa: E402
from edgetl.workstation.fast_trunk import frozen_runner  # noqa: E402
from edgetl.workstation.loops import LoopIO, TrainingDiverged  # noqa: E402
from edgetl.workstation.model import Head, Trunk, build_trunk, set_trainable  # noqa: E402
from edgetl.workstation.options import TrainConfig  # noqa: E402
from edgetl.workstation.prefix import (  # noqa: E402
    ImageStore,
    SplitTrunk,
    Views,
    finetune_cached,
    prefix_activations,
    split_trunk,
)
from edgetl.workstation.prepare import eval_transform  # noqa: E402
from tests.helpers import branchy_trunk  # noqa: E402

PP = Preprocessing(input_size=32, resize_size=36, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)


_TRUNKS: dict[str, Trunk] = {}


def random_trunk(name: str) -> Trunk:
    """A random-init trunk per backbone (built once per session; tests that train build their own)."""
    from edgetl.workstation.backbones import get_backbone

    if name not in _TRUNKS:
        torch.manual_seed(0)
        _TRUNKS[name] = build_trunk(get_backbone(name)).eval()
    return _TRUNKS[name]


# --- split_trunk ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "efficientnet_lite0"])
def test_split_composes_to_the_trunk(name):
    trunk = random_trunk(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        want = trunk(x)
        for unfreeze in (1, 2, 3):
            split = split_trunk(trunk, unfreeze)
            assert split is not None and split.depth == unfreeze
            act = split.prefix(x)
            assert act.ndim == 4
            got = split.suffix(act)
            assert got.shape == want.shape == (2, trunk.feature_dim)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        # unfreeze past the number of blocks: the prefix is empty, the suffix is the whole trunk
        split = split_trunk(trunk, len(trunk.blocks) + 3)
        assert split.depth == len(trunk.blocks) and len(split.prefix) == 0
        torch.testing.assert_close(split.suffix(split.prefix(x)), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_training_the_suffix_trains_the_trunk(name):
    from edgetl.workstation.backbones import get_backbone

    torch.manual_seed(1)
    trunk = build_trunk(get_backbone(name))
    set_trainable(trunk, 2)
    split = split_trunk(trunk, 2)
    trunk_ids = {id(p) for p in trunk.parameters()}
    assert {id(p) for p in split.suffix.parameters()} <= trunk_ids
    assert {id(p) for p in split.prefix.parameters()} <= trunk_ids
    # no trainable parameter in the prefix; every trainable one in the suffix
    assert not any(p.requires_grad for p in split.prefix.parameters())
    trainable = {id(p) for p in trunk.parameters() if p.requires_grad}
    assert trainable and trainable <= {id(p) for p in split.suffix.parameters()}
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    opt = torch.optim.SGD([p for p in split.suffix.parameters() if p.requires_grad], lr=0.1)
    with torch.no_grad():
        act = split.prefix.eval()(torch.randn(4, 3, 48, 48))
    split.suffix.train()
    split.suffix(act).pow(2).mean().backward()
    opt.step()
    after = trunk.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    last = {f"body.{k}" for k in [n for n, _ in trunk.body.named_parameters()]} & changed
    assert last, "training the suffix left the trunk unchanged"
    frozen = {f"body.{n}" for n, p in trunk.body.named_parameters() if not p.requires_grad}
    assert not (frozen & changed), "a frozen parameter moved"


def test_unsplittable_body_is_none(caplog):
    trunk = branchy_trunk()
    with caplog.at_level(logging.DEBUG, logger="edgetl.workstation.prefix"):
        assert split_trunk(trunk, 1) is None
    assert "no prefix cache" in caplog.text
    # a Sequential whose blocks are not its modules cannot be cut either
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert split_trunk(Trunk(seq, [nn.Conv2d(3, 4, 3)], 4), 1) is None


# --- frozen_runner --------------------------------------------------------------------------------


def tiny_prefix() -> nn.Module:
    trunk = random_trunk("resnet18")
    return split_trunk(trunk, 2).prefix


def test_frozen_runner_matches_eager(caplog, monkeypatch):
    monkeypatch.delenv(fast_trunk.ENGINE_ENV, raising=False)
    prefix = tiny_prefix()
    example = torch.randn(2, 3, 40, 40)
    calls = []
    real = fast_trunk._onnx_runner
    monkeypatch.setattr(fast_trunk, "_onnx_runner", lambda m, e: calls.append(1) or real(m, e))
    with caplog.at_level(logging.INFO, logger="edgetl.workstation.fast_trunk"):
        run = frozen_runner(prefix, example, "cpu")
    assert calls == [1] and "eager" not in caplog.text  # the ONNX Runtime path was taken
    x = torch.randn(5, 3, 40, 40)  # another batch size: the batch axis is dynamic
    got = run(x)
    with torch.inference_mode():
        want = prefix(x)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * max(1.0, float(want.abs().max())))


class Unexportable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.special.i0e(self.conv(x))  # no ONNX export for aten::special_i0e at opset 17


def test_frozen_runner_falls_back_when_export_fails(caplog, monkeypatch):
    monkeypatch.delenv(fast_trunk.ENGINE_ENV, raising=False)
    module = Unexportable().eval()
    x = torch.randn(3, 3, 16, 16)
    with caplog.at_level(logging.INFO, logger="edgetl.workstation.fast_trunk"):
        run = frozen_runner(module, x, "cpu")
    lines = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 1 and "eager" in lines[0].getMessage()
    with torch.inference_mode():
        torch.testing.assert_close(run(x), module(x))


def test_frozen_runner_falls_back_on_mismatch(caplog, monkeypatch):
    monkeypatch.delenv(fast_trunk.ENGINE_ENV, raising=False)
    prefix = tiny_prefix()
    monkeypatch.setattr(fast_trunk, "_onnx_runner", lambda m, e: lambda x: prefix(x).detach() + 1.0)
    x = torch.randn(2, 3, 40, 40)
    with caplog.at_level(logging.INFO, logger="edgetl.workstation.fast_trunk"):
        run = frozen_runner(prefix, x, "cpu")
    assert "difference" in caplog.text
    with torch.inference_mode():
        torch.testing.assert_close(run(x), prefix(x))


@pytest.mark.parametrize("how", ["argument", "env"])
def test_frozen_runner_eager_engine_never_exports(how, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("exported although eager was asked for")

    monkeypatch.setattr(fast_trunk, "_onnx_runner", boom)
    if how == "env":
        monkeypatch.setenv(fast_trunk.ENGINE_ENV, "eager")
    prefix = tiny_prefix()
    x = torch.randn(2, 3, 40, 40)
    run = frozen_runner(prefix, x, "cpu", engine="eager" if how == "argument" else "auto")
    with torch.inference_mode():
        torch.testing.assert_close(run(x), prefix(x))
    with pytest.raises(ValueError):
        frozen_runner(prefix, x, "cpu", engine="fast")


# --- images and views -----------------------------------------------------------------------------


def write_images(root, sizes=((50, 40), (40, 64), (36, 36), (80, 30), (33, 90))) -> list[Sample]:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, (w, h) in enumerate(sizes):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(str(path), i % 2))
    return samples


def test_image_store_keeps_resized_pixels(tmp_path, caplog):
    samples = write_images(tmp_path / "imgs")
    store = ImageStore(samples, PP)
    assert len(store) == len(samples) and store.in_memory == len(samples)
    for i, s in enumerate(samples):
        img = store.get(i)
        assert img.mode == "RGB" and min(img.size) == PP.resize_size
        np.testing.assert_array_equal(np.asarray(img), np.asarray(load_image(s.path, PP)))
    with caplog.at_level(logging.INFO, logger="edgetl.workstation.prefix"):
        streaming = ImageStore(samples, PP, budget_bytes=1)
    assert streaming.in_memory == 0 and streaming.bytes == 0
    assert len([r for r in caplog.records if "memory" in r.getMessage()]) == 1
    for i in range(len(samples)):
        np.testing.assert_array_equal(np.asarray(streaming.get(i)), np.asarray(store.get(i)))


def test_image_store_budget_from_env(tmp_path, monkeypatch):
    samples = write_images(tmp_path / "imgs")
    monkeypatch.setenv("EDGETL_IMAGE_MEMORY", "0")
    assert ImageStore(samples, PP).in_memory == 0
    monkeypatch.setenv("EDGETL_IMAGE_MEMORY", "lots")
    with pytest.raises(ConfigError, match="EDGETL_IMAGE_MEMORY"):
        ImageStore(samples, PP)


def test_views(tmp_path, monkeypatch):
    from torchvision.transforms import functional as F

    samples = write_images(tmp_path / "imgs")
    store = ImageStore(samples, PP)
    views = Views(4, seed=3)
    for i, s in enumerate(samples):
        # view 0 of the stored image is the eval transform of the file
        torch.testing.assert_close(views.transform(PP, 0, i)(store.get(i)), eval_transform(PP)(load_image(s.path)))
    img = store.get(0)
    a = views.transform(PP, 1, 0)(img)
    assert a.shape == (3, PP.input_size, PP.input_size)
    torch.testing.assert_close(a, views.transform(PP, 1, 0)(img))  # same callable twice
    torch.testing.assert_close(a, Views(4, seed=3).transform(PP, 1, 0)(img))  # another instance
    for other in (Views(4, seed=4).transform(PP, 1, 0), views.transform(PP, 2, 0), views.transform(PP, 1, 1)):
        assert not torch.equal(a, other(img))
    assert not torch.equal(a, views.transform(PP, 0, 0)(img))
    flips = []
    real = F.hflip
    monkeypatch.setattr(F, "hflip", lambda im: flips.append(1) or real(im))
    for i in range(40):
        Views(4, seed=0).transform(PP, 1 + i % 3, i)(img)
    assert not flips
    for i in range(40):
        Views(4, hflip=True, seed=0).transform(PP, 1 + i % 3, i)(img)
    assert 5 < len(flips) < 35
    with pytest.raises(ConfigError):
        Views(0)
    with pytest.raises(ValueError):
        views.transform(PP, 4, 0)


def test_prefix_activations_shape_and_view0(tmp_path):
    samples = write_images(tmp_path / "imgs")
    store = ImageStore(samples, PP)
    prefix = split_trunk(random_trunk("resnet18"), 2).prefix
    run = frozen_runner(prefix, torch.zeros(2, 3, 32, 32), "cpu", engine="eager")
    acts = prefix_activations(run, store, Views(3, seed=1), PP, batch_size=2)
    assert acts.dtype == np.float16 and acts.shape[:2] == (len(samples), 3) and acts.ndim == 5
    x0 = torch.stack([eval_transform(PP)(load_image(s.path)) for s in samples])
    with torch.inference_mode():
        want = prefix(x0).numpy()
    np.testing.assert_allclose(acts[:, 0].astype(np.float32), want, rtol=2e-3, atol=2e-3)
    assert not np.array_equal(acts[:, 0], acts[:, 1])


# --- finetune_cached ------------------------------------------------------------------------------


class ViewSpy(nn.Module):
    """Records channel 3 (the view index in the toy activations) of what the suffix sees in training."""

    def __init__(self):
        super().__init__()
        self.seen: list[float] = []

    def forward(self, x):
        if self.training:
            self.seen.extend(x[:, 3, 0, 0].tolist())
        return x


def toy(k: int = 1, n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    acts = rng.normal(0, 1, (n, k, 4, 2, 2)).astype(np.float32)
    acts[:, :, 0] += np.where(y == 1, 1.5, -1.5)[:, None, None, None]
    acts[:, :, 3] = np.arange(k)[None, :, None, None]  # the view index, for ViewSpy
    return acts.astype(np.float16), torch.tensor(y)


def toy_model(seed: int = 0):
    torch.manual_seed(seed)
    frozen_bn = nn.BatchNorm2d(4)
    for p in frozen_bn.parameters():
        p.requires_grad_(False)
    suffix = nn.Sequential(
        ViewSpy(), frozen_bn, nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1)
    )
    return SplitTrunk(prefix=nn.Sequential(), suffix=suffix, depth=1), Head(8, 2, dropout=0.2)


CFG = TrainConfig(strategy="fine-tune", epochs=4, batch_size=16, lr=1e-2, trunk_lr_scale=1.0, seed=0, device="cpu")


def run_toy(cfg=CFG, k=1, *, resume=None, hook=None, model=None):
    split, head = model or toy_model()
    acts, y = toy(k)
    val, yv = toy(1, n=32, seed=1)
    io = LoopIO(progress=progress_bar(False), history=[], resume=resume, on_epoch_end=hook)
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    epochs = finetune_cached(split, head, acts, y, val, yv, cfg, criterion=crit, io=io, device=torch.device("cpu"))
    return split, head, io.history, epochs


def test_finetune_cached_learns_and_records():
    split, head, history, epochs = run_toy(dataclasses.replace(CFG, epochs=6))
    assert epochs == 6 and [h["epoch"] for h in history] == list(range(1, 7))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_top1"] >= 0.9
    assert {"val_loss", "train_top1", "lr", "seconds", "gap_top1"} <= set(history[0])
    assert len(history[0]["lr"]) == 2  # head and trunk groups
    frozen_bn = split.suffix[1]
    assert torch.equal(frozen_bn.running_mean, torch.zeros(4))  # frozen batch norm kept its statistics
    assert not split.suffix.training and not head.training


def test_finetune_cached_draws_views():
    split, _, _, _ = run_toy(k=4)
    seen = split.suffix[0].seen
    assert len(seen) == 4 * 64  # one view per image per epoch
    assert set(seen) == {0.0, 1.0, 2.0, 3.0}
    split1, _, _, _ = run_toy(k=1)
    assert set(split1.suffix[0].seen) == {0.0}


def test_finetune_cached_resume_matches_uninterrupted():
    saved = {}
    split_a, head_a, hist_a, _ = run_toy(k=2, hook=lambda e, s: saved.__setitem__(e, copy.deepcopy(s)))
    assert sorted(saved) == [1, 2, 3, 4] and saved[2]["epoch"] == 2
    # a fresh process: the same init, continued from epoch 2's checkpoint
    split_b, head_b, hist_b, _ = run_toy(k=2, resume=copy.deepcopy(saved[2]), model=toy_model(seed=5))
    for a, b in ((split_a.suffix, split_b.suffix), (head_a, head_b)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in hist_a]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in hist_b]


@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_finetune_cached_diverges_in_one_line(lr):
    cfg = copy.copy(CFG)
    object.__setattr__(cfg, "lr", lr)  # TrainConfig refuses it; the loop must too
    with pytest.raises(TrainingDiverged) as err:
        run_toy(cfg)
    assert "\n" not in str(err.value) and "lr" in str(err.value)


def test_finetune_cached_stops_at_a_non_finite_loss():
    split, head = toy_model()
    acts, y = toy(1)
    acts[5, 0, 0, 0, 0] = np.nan
    io = LoopIO(progress=progress_bar(False), history=[])
    crit = nn.CrossEntropyLoss()
    with pytest.raises(TrainingDiverged, match="training loss is nan in epoch 1"):
        finetune_cached(split, head, acts, y, acts[:8], y[:8], CFG, criterion=crit, io=io, device="cpu")
    assert io.history == []


def test_finetune_cached_refuses_another_loops_checkpoint():
    from edgetl.core.errors import RunError

    with pytest.raises(RunError, match="cached-prefix"):
        run_toy(resume={"epoch": 1, "model": {}, "history": []})


def test_finetune_cached_on_a_real_split_trains_the_trunk(tmp_path):
    """The whole path on the tiny test backbone: images -> store -> prefix pass -> loop -> the trunk."""
    from edgetl.workstation.backbones import get_backbone
    from tests.helpers import TINY

    spec = get_backbone(TINY)
    pp = spec.preprocessing()
    torch.manual_seed(0)
    trunk = build_trunk(spec)
    set_trainable(trunk, 1)
    split = split_trunk(trunk, 1)
    samples = write_images(tmp_path / "imgs") * 2
    store = ImageStore(samples, pp)
    run = frozen_runner(split.prefix, torch.zeros(2, 3, pp.input_size, pp.input_size), "cpu")
    acts = prefix_activations(run, store, Views(2, seed=0), pp, batch_size=4)
    y = torch.tensor([s.label for s in samples])
    frozen = {k: v.clone() for k, v in trunk.state_dict().items() if not k.startswith("body.2.")}
    last = {k: v.clone() for k, v in trunk.state_dict().items() if k.startswith("body.2.")}
    io = LoopIO(progress=progress_bar(False), history=[])
    cfg = dataclasses.replace(CFG, epochs=2, batch_size=4)
    finetune_cached(
        split, Head(spec.feature_dim, 2), acts, y, acts, y, cfg, criterion=nn.CrossEntropyLoss(), io=io, device="cpu"
    )
    state = trunk.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # the prefix did not move
    assert any(not torch.equal(state[k], v) for k, v in last.items())  # the unfrozen block did
    assert all(p.is_contiguous() for p in trunk.parameters())  # layout restored after training
    x = torch.stack([eval_transform(pp)(load_image(s.path)) for s in samples[:3]])
    with torch.inference_mode():
        torch.testing.assert_close(split.suffix(split.prefix(x)), trunk.eval()(x))
