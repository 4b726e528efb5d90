"""The trunk/head seam in torch: a pretrained trunk that pools features, and a small task head."""

from __future__ import annotations

import torch
import torch.nn as nn

from edgetl.workstation.backbones import BackboneSpec


class Trunk(nn.Module):
    """Image batch (N, 3, H, W) -> pooled feature vectors (N, feature_dim)."""

    def __init__(self, body: nn.Module, blocks: list[nn.Module], feature_dim: int, pool: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.pool = pool if pool is not None else nn.AdaptiveAvgPool2d(1)
        self.feature_dim = feature_dim
        # Plain list: the blocks are registered once, through ``body``.
        self._blocks = list(blocks)

    @property
    def blocks(self) -> list[nn.Module]:
        return self._blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.body(x)), 1)


class Head(nn.Module):
    """Features (N, feature_dim) -> logits (N, num_classes): dropout then one linear layer."""

    def __init__(self, feature_dim: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))


class TransferModel(nn.Module):
    def __init__(self, trunk: Trunk, head: Head):
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def build_trunk(spec: BackboneSpec, state_dict: dict | None = None) -> Trunk:
    """Build ``spec``'s trunk; ``state_dict`` is an ImageNet checkpoint of the full model (torchvision's
    or timm's), whose classifier is not used."""
    from edgetl.core.errors import WeightsError

    try:
        body, blocks, *pool = spec.builder(state_dict)
    except RuntimeError as exc:  # load_state_dict key/shape mismatch
        first = str(exc).splitlines()[0]
        raise WeightsError(f"weights do not fit backbone {spec.name}: {first}") from None
    return Trunk(body, blocks, spec.feature_dim, pool[0] if pool else None)


def set_trainable(trunk: Trunk, unfreeze_blocks: int | None) -> None:
    """Freeze the trunk except its last ``unfreeze_blocks`` blocks (None = everything trainable).

    Frozen blocks also keep their batch-norm statistics: see :func:`freeze_batchnorm_stats`.
    """
    n = len(trunk.blocks)
    first_trainable = 0 if unfreeze_blocks is None else max(0, n - unfreeze_blocks)
    for p in trunk.parameters():
        p.requires_grad_(unfreeze_blocks is None)
    for block in trunk.blocks[first_trainable:]:
        for p in block.parameters():
            p.requires_grad_(True)


def freeze_batchnorm_stats(trunk: Trunk) -> None:
    """Put batch-norm layers whose parameters are frozen in eval mode (call after ``model.train()``).

    A frozen block must not drift: its running mean/var stay the pretrained ones.
    """
    for m in trunk.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in m.parameters(recurse=False)
        ):
            m.eval()
