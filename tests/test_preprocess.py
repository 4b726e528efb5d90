"""The torch-free preprocessing must equal the torchvision transform used in training."""

import numpy as np
import pytest
import torch
from PIL import Image

from edgetl.core.preprocess import Preprocessing, preprocess, preprocess_batch, to_rgb
from edgetl.workstation.backbones import get_backbone
from edgetl.workstation.data import write_digits
from edgetl.workstation.prepare import eval_transform


def _photo(w, h, seed):
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: interpolation differences would show.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(300, 200), (200, 300), (64, 64), (8, 8), (500, 137)])
def test_matches_torchvision(size, interp):
    pp = Preprocessing(input_size=96, resize_size=110, interpolation=interp)
    img = _photo(*size, seed=sum(size))
    ours = preprocess(img, pp)
    theirs = eval_transform(pp)(img).numpy()
    assert ours.shape == theirs.shape == (3, 96, 96) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)


def test_matches_torchvision_on_real_digits(tmp_path):
    write_digits(tmp_path / "d")
    pp = get_backbone("mobilenet_v2").preprocessing(96)
    transform = eval_transform(pp)
    for path in sorted((tmp_path / "d").rglob("*.png"))[:40]:
        img = to_rgb(Image.open(path))
        np.testing.assert_allclose(preprocess(img, pp), transform(img).numpy(), atol=1e-6, rtol=0)


def test_backbone_default_keeps_crop_ratio():
    pp = get_backbone("mobilenet_v2").preprocessing()
    assert (pp.input_size, pp.resize_size) == (224, 256)
    assert get_backbone("mobilenet_v2").preprocessing(96).resize_size == 110


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "I;16"])
def test_modes_become_rgb(mode):
    img = _photo(20, 10, 0)
    if mode == "I;16":
        conv = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    else:
        conv = img.convert(mode)
    out = to_rgb(conv)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_transparent_palette_composited_on_black():
    img = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    assert np.asarray(to_rgb(img)).max() == 0


def test_torch_and_numpy_normalise_identically():
    pp = Preprocessing(input_size=8, resize_size=8)
    img = _photo(8, 8, 3)
    t = eval_transform(pp)(img)
    assert torch.equal(t, torch.from_numpy(preprocess(img, pp)))


@pytest.mark.parametrize(
    "mean, std",
    [
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ((0.0, 0.1, 0.9), (1.0, 0.3, 2.5)),
    ],
)
def test_every_byte_of_every_channel_normalises_as_torchvision_does(mean, std):
    # The numpy side normalises through a 256-entry table per channel: every entry must equal
    # torchvision's ToTensor + Normalize to the bit. A 16x16 image holds all 256 values in each
    # channel (a different order per channel, so a channel mix-up shows).
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = Image.fromarray(np.stack([values, values.T, values[::-1]], axis=-1))
    pp = Preprocessing(input_size=16, resize_size=16, mean=mean, std=std)
    ours = preprocess(img, pp)
    assert torch.equal(eval_transform(pp)(img), torch.from_numpy(ours))
    assert torch.equal(torch.from_numpy(preprocess_batch([img, img], pp)), torch.stack([torch.from_numpy(ours)] * 2))


@pytest.mark.parametrize("interp", ["nearest", "bilinear", "bicubic", "lanczos"])
def test_grayscale_is_resized_as_l_to_the_same_bytes_as_rgb(tmp_path, interp):
    """Grayscale images are resized before they are made RGB (a third of the resampling); the bytes
    must be those of converting first: load_image, preprocess and torchvision's transform agree to
    the bit, for images smaller and larger than the model's input; kept gray (``gray_ok``, one plane
    for the three channels), they give the same numbers too."""
    from edgetl.core.preprocess import load_image, resize_shorter

    pp = Preprocessing(input_size=96, resize_size=110, interpolation=interp)
    transform = eval_transform(pp)
    for i, (w, h) in enumerate([(8, 8), (13, 40), (96, 96), (111, 300), (640, 97)]):
        gray = _photo(w, h, seed=i).convert("L")
        path = tmp_path / f"g{i}.png"
        if i % 2:  # a 16-bit grayscale file too
            Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257).save(path)
        else:
            gray.save(path)
        expected = resize_shorter(gray.convert("RGB"), pp.resize_size, interp)
        loaded = load_image(path, pp)
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(expected))
        np.testing.assert_array_equal(preprocess(gray, pp), transform(gray.convert("RGB")).numpy())
        np.testing.assert_array_equal(preprocess(loaded, pp), preprocess(gray.convert("RGB"), pp))
        kept = load_image(path, pp, gray_ok=True)  # what the device's predict and serve load
        assert kept.mode == "L"
        np.testing.assert_array_equal(preprocess_batch([kept, loaded], pp), preprocess_batch([loaded, loaded], pp))
    assert load_image(tmp_path / "g0.png", gray_ok=True).mode == "L"
    _photo(20, 20, 0).save(tmp_path / "rgb.png")
    assert load_image(tmp_path / "rgb.png", pp, gray_ok=True).mode == "RGB"
