"""The trunk/head seam in torch: a pretrained trunk that pools features, and a small task head."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from edgetl.workstation.backbones import BackboneSpec


class Trunk(nn.Module):
    """Image batch (N, 3, H, W) -> pooled feature vectors (N, feature_dim).

    By default the features are the last feature map, pooled. With taps (:meth:`set_taps`) they are
    the pooled output of every block, last one included, concatenated (multi-layer features: what a
    linear head needs on images unlike ImageNet's, see docs/training.md).
    """

    def __init__(self, body: nn.Module, blocks: list[nn.Module], feature_dim: int, pool: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.pool = pool if pool is not None else nn.AdaptiveAvgPool2d(1)
        self.feature_dim = feature_dim
        self.last_dim = feature_dim  # the last feature map's pooled size, with or without taps
        # Plain list: the blocks are registered once, through ``body``.
        self._blocks = list(blocks)
        self.taps: tuple[int, ...] = ()  # positions in body_atoms(self)[0] whose pooled output is tapped
        self._chain: tuple[list, list] | None = None

    @property
    def blocks(self) -> list[nn.Module]:
        return self._blocks

    def set_taps(self, taps: list[int] | tuple[int, ...]) -> None:
        """Tap the body's modules at ``taps`` (positions from :func:`tap_positions`; empty: the last
        feature map only); ``feature_dim`` becomes the concatenated size."""
        taps = tuple(int(t) for t in taps)
        if not taps:
            self.taps, self._chain, self.feature_dim = (), None, self.last_dim
            return
        chain = body_atoms(self)
        if chain is None:
            raise ValueError(f"a {type(self.body).__name__} body is not a chain of modules: it cannot be tapped")
        if sorted(set(taps)) != list(taps) or taps[0] < 0 or taps[-1] >= len(chain[0]) - 1:
            raise ValueError(f"taps {list(taps)} are not increasing positions below {len(chain[0]) - 1}")
        self.taps, self._chain = taps, chain
        with _evaluating(self):  # not through forward: counting its calls counts images
            self.feature_dim = int(self._tapped(torch.zeros(1, 3, 64, 64)).shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.taps:
            return torch.flatten(self.pool(self.body(x)), 1)
        return self._tapped(x)

    def _tapped(self, x: torch.Tensor) -> torch.Tensor:
        return _walk(self, self._chain, x)[0]


@contextlib.contextmanager
def _evaluating(module: nn.Module):
    """``module`` in eval mode without gradients (a dry run to learn output shapes), then as it was."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _pooled(x: torch.Tensor) -> torch.Tensor:
    """A feature map (N, C, H, W) -> its global average (N, C): what a tap contributes."""
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def _walk(trunk: Trunk, chain: tuple[list, list], x: torch.Tensor, keep: int | None = None, start: int = 0):
    """``trunk``'s features computed module by module along ``chain`` (its :func:`body_atoms`) from
    module ``start`` on (``x``: the output of the modules before it; taps before it are left out),
    and the output of module ``keep`` (None: not kept)."""
    atoms, tail = chain
    tapped, kept = [], None
    for i in range(start, len(atoms)):
        x = atoms[i](x)
        if i in trunk.taps:
            tapped.append(_pooled(x))
        if i == keep:
            kept = x
    for module in tail:  # a timm body's forward_head; its dropout is registered nowhere else
        x = nn.functional.dropout(x, module.p, trunk.training) if isinstance(module, nn.Dropout) else module(x)
    tapped.append(torch.flatten(trunk.pool(x), 1))
    return torch.cat(tapped, 1), kept


def features_after(trunk: Trunk, cut: int, act: torch.Tensor) -> torch.Tensor:
    """The part of ``trunk``'s features computed after its body's first ``cut`` modules, from their
    output ``act``: the pooled output of the taps at or after ``cut``, then the last feature map's.
    With :class:`PrefixWithTaps`'s taps before it: ``trunk(x)``."""
    chain = body_atoms(trunk)
    if chain is None:
        raise ValueError(f"a {type(trunk.body).__name__} body is not a chain of modules")
    return _walk(trunk, chain, act, start=cut)[0]


class PrefixWithTaps(nn.Module):
    """A cached fine-tune's frozen prefix (``prefix``: the body's first modules) -> its output,
    flattened, followed by the pooled output of the trunk's ``taps`` inside it: one pass gives the
    activation the fine-tune trains from and the frozen part of the multi-layer features."""

    def __init__(self, prefix: nn.Sequential, taps: tuple[int, ...], input_size: int):
        super().__init__()
        self.prefix = prefix
        self.taps = tuple(t for t in taps if t < len(prefix))
        with _evaluating(prefix):
            act, pooled = self._run(torch.zeros(1, 3, input_size, input_size))
        self.act_shape = tuple(act.shape[1:])
        self.taps_dim = sum(int(p.shape[1]) for p in pooled)

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pooled = []
        for i, module in enumerate(self.prefix):
            x = module(x)
            if i in self.taps:
                pooled.append(_pooled(x))
        return x, pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act, pooled = self._run(x)
        return torch.cat([torch.flatten(act, 1), *pooled], 1)


class TrunkWithPrefix(nn.Module):
    """``trunk``'s features with, appended, the flattened output of its body's first ``cut`` modules
    (the frozen prefix a cached fine-tune starts from): one pass, one output, gives both."""

    def __init__(self, trunk: Trunk, cut: int, input_size: int):
        super().__init__()
        chain = body_atoms(trunk)
        if chain is None or not 0 < cut < len(chain[0]):
            raise ValueError(f"cannot keep the output of the first {cut} modules of this trunk")
        self.trunk, self.cut, self._chain = trunk, cut, chain
        with _evaluating(trunk):
            prefix = _walk(trunk, chain, torch.zeros(1, 3, input_size, input_size), cut - 1)[1]
        self.prefix_shape = tuple(prefix.shape[1:])
        self.feature_dim = trunk.feature_dim + int(prefix[0].numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, prefix = _walk(self.trunk, self._chain, x, self.cut - 1)
        return torch.cat([features, torch.flatten(prefix, 1)], 1)


def body_atoms(trunk: Trunk) -> tuple[list[nn.Module], list[nn.Module]] | None:
    """The trunk body as a sequence of modules applied one after the other, and the modules that map
    the last one's output to the body's output (empty for a plain Sequential); None when the body is
    not such a sequence."""
    body = trunk.body
    if type(body) is nn.Sequential:
        return list(body), []
    if _timm_efficientnet(body) and type(body.blocks) is nn.Sequential:
        # forward_features: conv_stem, bn1, blocks (stages of blocks), conv_head, bn2; forward_head:
        # global_pool, dropout (drop_rate, train mode only), classifier (Identity once reset).
        stages = [list(stage) if type(stage) is nn.Sequential else [stage] for stage in body.blocks]
        atoms = [body.conv_stem, body.bn1, *(b for stage in stages for b in stage), body.conv_head, body.bn2]
        tail = [body.global_pool, nn.Dropout(float(body.drop_rate)), body.classifier]
        return atoms, tail
    return None


def _timm_efficientnet(body) -> bool:
    try:
        from timm.models.efficientnet import EfficientNet
    except ImportError:
        return False
    kind = type(body)
    # A subclass that computes its features or head otherwise cannot be cut by the same rule.
    return (
        isinstance(body, EfficientNet)
        and kind.forward is EfficientNet.forward
        and kind.forward_features is EfficientNet.forward_features
        and kind.forward_head is EfficientNet.forward_head
    )


def tap_positions(trunk: Trunk) -> list[int] | None:
    """Where multi-layer features tap ``trunk``: after every module of the body that holds
    parameters, except the last (its output is the last feature map, always in the features) and
    those a batch norm follows (the normalised output is tapped instead). None: the body is not a
    chain of modules (it cannot be tapped)."""
    chain = body_atoms(trunk)
    if chain is None:
        return None
    atoms = chain[0]
    return [
        i
        for i in range(len(atoms) - 1)
        if any(True for _ in atoms[i].parameters()) and not isinstance(atoms[i + 1], nn.modules.batchnorm._BatchNorm)
    ]


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


def build_trunk(spec: BackboneSpec, state_dict: dict | None = None, taps: list[int] | None = None) -> Trunk:
    """Build ``spec``'s trunk; ``state_dict`` is an ImageNet checkpoint of the full model (torchvision's
    or timm's), whose classifier is not used; ``taps``: see :meth:`Trunk.set_taps`."""
    from edgetl.core.errors import WeightsError

    try:
        body, blocks, *pool = spec.builder(state_dict)
    except RuntimeError as exc:  # load_state_dict key/shape mismatch
        first = str(exc).splitlines()[0]
        raise WeightsError(f"weights do not fit backbone {spec.name}: {first}") from None
    trunk = Trunk(body, blocks, spec.feature_dim, pool[0] if pool else None)
    if taps:
        trunk.set_taps(taps)
    return trunk


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
