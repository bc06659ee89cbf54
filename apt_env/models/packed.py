"""timm blocks run on packed tokens: the live tokens of a gathered batch whose rows keep different counts.

timm's ``Block`` is ``x + attn(norm1(x))`` and then ``x + mlp(norm2(x))``. All of it but the attention works on each
token alone, so here it runs on the live tokens only, one after another (S, C), with no padding; the attention, the
one part that mixes the tokens of a row, runs on padded rows, padding masked as keys: the batch padded to its longest
row, or a large batch in groups of rows of similar count, each padded to its own longest (``attention_groups``); on
CPU sometimes a few slots further (``attention_length``).
Padding the whole block instead costs every linear layer and the MLP the padded slots too: on the default backbone
with counts varying +-15% about the keep ratio, a fifth to a third of its tokens. timm's own modules do all the work
(``norm1``, ``attn``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``), in the order of
``Block.forward``; only that sequence is restated, for ``Block`` itself and no subclass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Block
from torch import nn

from apt_env.models.tokens import additive_mask, length_buckets

CPU_ATTENTION_TILE = 16
"""torch's CPU ``scaled_dot_product_attention`` is fastest at lengths that are multiples of this (see
``attention_length``)."""

ATTENTION_GROUP_ROWS = 16
"""Rows per group of similar count in the attention (``attention_groups``)."""

ATTENTION_GROUP_MIN_ELEMENTS = 2**18
"""The least padded-batch elements (rows x slots x width) per group. Timed side by side at batch 64 with counts +-15%
about the keep ratio: groups made ``vit_tiny_patch16_224`` at 224 px (0.2M to 2M elements a stage) faster, most where
rows are long, and the default backbone (at most 0.4M) no faster or slower: it runs as one group."""


def attention_length(blocks: Sequence[nn.Module], length: int, device: torch.device) -> int:
    """The length the padded rows take into the attention: ``length``, or on CPU with timm's fused attention the next
    multiple of ``CPU_ATTENTION_TILE`` when at most 4 slots away.

    torch's CPU flash attention runs a length just short of a multiple of 16 at up to about three times that
    multiple's cost (``benchmarks/bench_attention.py``), so a few more padding slots, masked as keys, cost less than
    they save; further away, ``qkv`` and ``proj`` on the extra slots cost more."""
    fused = all(getattr(blk.attn, "fused_attn", False) for blk in blocks)
    rem = length % CPU_ATTENTION_TILE
    if device.type != "cpu" or not fused or rem == 0 or CPU_ATTENTION_TILE - rem > 4:
        return length
    return length + CPU_ATTENTION_TILE - rem


def packs(blocks: Sequence[nn.Module]) -> bool:
    """Whether ``run_packed`` runs these blocks as their own forward would: timm's ``Block`` exactly, whose
    stochastic depth (``DropPath``) is off or inactive, as it drops whole rows, which packed tokens no longer are."""
    return all(
        type(blk) is Block
        and (not blk.training or (isinstance(blk.drop_path1, nn.Identity) and isinstance(blk.drop_path2, nn.Identity)))
        for blk in blocks
    )


def attention_groups(blocks: Sequence[nn.Module], live: torch.Tensor) -> list[tuple[torch.Tensor, int]] | None:
    """Rows grouped by count for the attention, each group padded to its own longest row (``length_buckets`` of
    ``ATTENTION_GROUP_ROWS`` rows), or None for one group: the whole batch padded to its longest row.

    Only a large padded batch is split: each group costs its own copies and attention call, which on a small one
    (the default backbone) cost more than the padding they save."""
    b, t = live.shape
    width = blocks[0].norm1.normalized_shape[0]
    num_groups = min(b // ATTENTION_GROUP_ROWS, b * t * width // ATTENTION_GROUP_MIN_ELEMENTS)
    if num_groups < 2:  # decided by shapes alone: no count taken on the common path of one group
        return None
    return length_buckets(live.sum(1), num_groups)


def run_packed(
    blocks: Sequence[nn.Module], x: torch.Tensor, live: torch.Tensor, *, grouped: bool = True
) -> torch.Tensor:
    """Run ``blocks`` on the live tokens of ``x``; slots not live come back as they went in (any finite value).

    Args:
        blocks: timm ``Block`` modules (``packs(blocks)``).
        x: a padded batch. # (B, T, C)
        live: the tokens that count, prefix included, first in each row (a gathered batch). # (B, T) bool
        grouped: whether a large batch may run its attention in groups of rows (``attention_groups``); without, the
            attention sees the rows of ``x`` in their order, each slot where it is in ``x`` (and padding after them,
            ``attention_length``), for a hook that reads its input row by row.
    """
    if not len(blocks):
        return x
    b, t, c = x.shape
    groups = attention_groups(blocks, live) if grouped else None
    if groups is None:
        order, sizes, lengths = None, [b], [t]
    else:
        order = torch.cat([rows for rows, _ in groups])  # rows in order of count, group after group
        sizes, lengths = [len(rows) for rows, _ in groups], [length for _, length in groups]
        live = live.index_select(0, order)
    pos = live.reshape(-1).nonzero().squeeze(1)  # the live tokens in the flat (B * T) batch, rows in that order
    padded_lengths = [attention_length(blocks, length, x.device) for length in lengths]
    if order is None and padded_lengths[0] == t:  # the batch as it is: the tokens' places are their slots in x
        slots, counts = pos, [len(pos)]
        plan = [(b, t, pos, additive_mask(live[:, None, None, :], x.dtype))]
    else:
        row = torch.div(pos, t, rounding_mode="floor")
        col = pos - row * t
        slots = pos if order is None else order.index_select(0, row) * t + col
        counts = [len(pos)] if order is None else [int(n.sum()) for n in live.sum(1).split(sizes)]
        # Each group: its run of the packed tokens, their places in its own padded rows, its key mask.
        plan, first_row, first = [], 0, 0
        for rows, length, padded, count in zip(sizes, lengths, padded_lengths, counts):
            places = (row.narrow(0, first, count) - first_row) * padded + col.narrow(0, first, count)
            keys = nn.functional.pad(live[first_row : first_row + rows, :length], (0, padded - length))
            plan.append((rows, padded, places, additive_mask(keys[:, None, None, :], x.dtype)))
            first_row, first = first_row + rows, first + count
    h = x.reshape(b * t, c).index_select(0, slots)  # (S, C)
    for blk in blocks:
        # The attention's input padded again: slots not live are zeros, masked as keys; their outputs are dropped.
        normed = blk.norm1(h)
        pieces = normed.split(counts) if len(plan) > 1 else (normed,)
        outs = [
            blk.attn(
                piece.new_zeros(rows * length, c).index_copy_(0, places, piece).view(rows, length, c), attn_mask=mask
            )
            .reshape(rows * length, -1)
            .index_select(0, places)
            for piece, (rows, length, places, mask) in zip(pieces, plan)
        ]
        h = h + blk.drop_path1(blk.ls1(outs[0] if len(outs) == 1 else torch.cat(outs)))
        h = h + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(h))))
    return x.reshape(b * t, c).to(h.dtype).index_copy(0, slots, h).view(b, t, c)  # in the blocks' dtype (autocast)
