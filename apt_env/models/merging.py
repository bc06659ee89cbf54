"""Token merging: pure operations on tensors for ToMe (Bolya et al., 2023) and EViT's fused token (Liang et al., 2022).

ToMe merges tokens instead of dropping them. In a block, between its attention and its MLP, the patch tokens are
split in two alternating sets, A (even positions) and B (odd positions); each token of A is matched to its most
similar token of B (cosine similarity of the attention keys, averaged over heads), and the ``r`` best-matched A
tokens are merged into their B partners by a mean weighted by *size*, the number of original tokens each one stands
for. Sizes are tracked, and *proportional attention* adds ``log(size)`` to the attention logits of each key, so that
a merged token is attended to as the tokens it replaced would have been. Prefix tokens (class, distillation,
registers) are never merged. ``PrunableViT.forward_merged`` runs it in timm's blocks.

EViT keeps the tokens the class token attends to most and fuses the others into one token, their sum weighted by the
class attention (``fuse_pruned``); ``PrunableViT.prune(..., fuse_attn=...)`` appends it.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Matching",
    "MergeState",
    "bipartite_soft_matching",
    "check_schedule",
    "fuse_pruned",
    "is_int",
    "merge_tokens",
    "merged_counts",
    "weighted_mean",
]


@dataclass(frozen=True)
class MergeState:
    """Tokens between two blocks of a merged pass, with the size of each.

    Attributes:
        x: tokens, prefix first. # (B, P + L, C)
        num_prefix_tokens: P, the tokens that are never merged.
        size: how many original tokens each token stands for, prefix included (float32); ``None`` while no token
            has been merged (every size 1): then no attention bias is added and pooling is timm's own, so a pass
            that merges nothing is the dense model exactly. # (B, P + L)
    """

    x: Tensor
    num_prefix_tokens: int
    size: Tensor | None = None

    def sizes(self) -> Tensor:
        """``size``, ones where it is None. # (B, P + L) float32"""
        if self.size is not None:
            return self.size
        return torch.ones(self.x.shape[:2], dtype=torch.float32, device=self.x.device)

    def attn_bias(self) -> Tensor | None:
        """Proportional attention: ``log(size)`` of each key as an additive attention mask, or None while every
        size is 1. # (B, 1, 1, P + L) in the tokens' dtype"""
        if self.size is None:
            return None
        return self.size.log().to(self.x.dtype)[:, None, None, :]


@dataclass(frozen=True)
class Matching:
    """Which patch tokens ToMe merges, within the patch tokens (prefix excluded) of each row.

    Attributes:
        unmerged: positions in set A (``patches[:, 0::2]``) of the A tokens kept as they are, ascending. # (B, La - r)
        src: positions in set A of the A tokens merged away. # (B, r)
        dst: positions in set B (``patches[:, 1::2]``) each of them merges into. # (B, r)
    """

    unmerged: Tensor
    src: Tensor
    dst: Tensor


def bipartite_soft_matching(metric: Tensor, r: int) -> Matching:
    """ToMe's bipartite soft matching: the ``r`` A tokens most similar to a B token, and their partners.

    Set A is the even positions, set B the odd ones. Each A token's best partner is the B token of highest cosine
    similarity; the ``r`` A tokens with the highest such similarity (ties to the lower position) are merged.

    Args:
        metric: the patch tokens' matching features, prefix excluded, e.g. their keys averaged over heads. # (B, L, D)
        r: A tokens to merge, in ``[0, L // 2]``.
    """
    length = metric.shape[1]
    if not 0 <= r <= length // 2:
        raise ValueError(f"r={r} merges more than half of the {length} tokens (at most {length // 2})")
    with torch.no_grad():
        metric = F.normalize(metric.to(_at_least_float32(metric.dtype)), dim=-1)
        a, b = metric[:, 0::2], metric[:, 1::2]
        scores = a @ b.transpose(1, 2)  # (B, La, Lb)
        best, partner = scores.max(dim=-1)  # (B, La)
        order = best.argsort(dim=-1, descending=True, stable=True)
        src = order[:, :r]
        return Matching(unmerged=order[:, r:].sort(dim=-1).values, src=src, dst=partner.gather(1, src))


def merge_tokens(x: Tensor, size: Tensor, matching: Matching, num_prefix_tokens: int) -> tuple[Tensor, Tensor]:
    """Merge the matched A tokens into their B partners by a mean weighted by size.

    Args:
        x: tokens, prefix first. # (B, P + L, C)
        size: their sizes. # (B, P + L) float32
        matching: from ``bipartite_soft_matching`` on the patch tokens.
        num_prefix_tokens: P, the tokens left as they are.

    Returns:
        the tokens: the prefix, the unmerged A tokens in their order, then set B with the merged tokens
        ``(B, P + L - r, C)``; and their sizes ``(B, P + L - r)`` float32, a merged token's the sum of its parts'.
    """
    p = num_prefix_tokens
    c = x.shape[-1]
    # (B, L, C) in float32 at least: merged as sums, divided by the summed size
    weighted = x[:, p:].to(_at_least_float32(x.dtype)) * size[:, p:, None]
    a, b = weighted[:, 0::2], weighted[:, 1::2]
    size_a, size_b = size[:, p:][:, 0::2], size[:, p:][:, 1::2]
    keep_a = a.gather(1, matching.unmerged[..., None].expand(-1, -1, c))
    b = b.index_put((_rows(matching.dst), matching.dst), a.gather(1, matching.src[..., None].expand(-1, -1, c)),
                    accumulate=True)  # fmt: skip
    size_b = size_b.index_put((_rows(matching.dst), matching.dst), size_a.gather(1, matching.src), accumulate=True)
    new_size = torch.cat([size[:, :p], size_a.gather(1, matching.unmerged), size_b], dim=1)
    patches = torch.cat([keep_a, b], dim=1) / new_size[:, p:, None]
    return torch.cat([x[:, :p], patches.to(x.dtype)], dim=1), new_size


def _rows(index: Tensor) -> Tensor:
    """The row of every entry of a (B, K) index, for ``index_put``. # (B, 1)"""
    return torch.arange(index.shape[0], device=index.device)[:, None]


def weighted_mean(x: Tensor, weight: Tensor) -> Tensor:
    """Mean of the tokens of each row weighted by ``weight`` (e.g. sizes). # x: (B, T, C), weight: (B, T) -> (B, C)"""
    w = weight.to(torch.float32)[..., None]
    return ((x.to(_at_least_float32(x.dtype)) * w).sum(1) / w.sum(1)).to(x.dtype)


def check_schedule(schedule: int | Sequence[int], depth: int, num_patches: int) -> tuple[int, ...]:
    """The tokens merged in each block: a checked ToMe schedule.

    Args:
        schedule: ``r`` for every block (an int), or one ``r`` per block (a sequence of ``depth`` ints).
        depth: blocks of the model.
        num_patches: patch tokens entering the first block.

    Raises:
        ValueError: a schedule of the wrong length, an ``r`` that is not a non-negative integer, or one that merges
            more than half of the patch tokens its block has (each named with the limit).
    """
    if is_int(schedule):
        rs: tuple = (int(schedule),) * depth
    else:
        try:
            rs = tuple(schedule)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                f"a merge schedule is an int r or a sequence of one r per block, got {type(schedule).__name__}"
            ) from None
        if len(rs) != depth:
            raise ValueError(f"a merge schedule has one r per block: {depth} for this model, got {len(rs)}: {rs}")
    length = num_patches
    for block, r in enumerate(rs):
        if not is_int(r) or r < 0:
            raise ValueError(f"r of block {block} must be a non-negative integer, got {r!r}")
        if r > length // 2:
            raise ValueError(
                f"r={r} at block {block} merges more than half of the {length} patch tokens the block has: "
                f"at most {length // 2} there"
            )
        length -= r
    return tuple(int(r) for r in rs)


def merged_counts(num_patches: int, schedule: Sequence[int]) -> tuple[int, ...]:
    """Patch tokens entering each block under a checked schedule, then those leaving the last. # (depth + 1,)"""
    counts = [num_patches]
    for r in schedule:
        counts.append(counts[-1] - r)
    return tuple(counts)


def fuse_pruned(patches: Tensor, weight: Tensor) -> Tensor:
    """EViT's fused token: the patch tokens' sum weighted by ``weight`` (the class attention of the pruned tokens,
    0 elsewhere), as one batched product. # patches: (B, L, C), weight: (B, L) -> (B, C)"""
    return torch.bmm(weight.to(patches.dtype)[:, None, :], patches)[:, 0]


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer (numpy's too), not a bool: a count or an index an argument may be."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
