"""timm blocks run on packed tokens: the live tokens of a gathered batch whose rows keep different counts.

timm's ``Block`` is ``x + attn(norm1(x))`` and then ``x + mlp(norm2(x))``. All of it but the attention works on each
token alone, so here it runs on the live tokens only, one after another (S, C), with no padding; the attention, the
one part that mixes the tokens of a row, runs on the rows padded to the longest as before, padding masked as keys.
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


def packs(blocks: Sequence[nn.Module]) -> bool:
    """Whether ``run_packed`` runs these blocks as their own forward would: timm's ``Block`` exactly, whose
    stochastic depth (``DropPath``) is off or inactive, as it drops whole rows, which packed tokens no longer are."""
    return all(
        type(blk) is Block
        and (not blk.training or (isinstance(blk.drop_path1, nn.Identity) and isinstance(blk.drop_path2, nn.Identity)))
        for blk in blocks
    )


def run_packed(
    blocks: Sequence[nn.Module], x: torch.Tensor, live: torch.Tensor, attn_mask: torch.Tensor
) -> torch.Tensor:
    """Run ``blocks`` on the live tokens of ``x``; slots not live come back as they went in (any finite value).

    Args:
        blocks: timm ``Block`` modules (``packs(blocks)``).
        x: a padded batch. # (B, T, C)
        live: the tokens that count, prefix included. # (B, T) bool
        attn_mask: ``live`` as an additive key mask. # (B, 1, 1, T)
    """
    b, t, c = x.shape
    slots = live.reshape(-1).nonzero().squeeze(1)  # positions of the live tokens in the flat (B * T) batch
    h = x.reshape(b * t, c).index_select(0, slots)  # (S, C)
    for blk in blocks:
        # The attention's input padded again: slots not live are zeros, masked as keys; their outputs are dropped.
        n = blk.norm1(h)
        padded = n.new_zeros(b * t, c).index_copy_(0, slots, n).view(b, t, c)
        a = blk.attn(padded, attn_mask=attn_mask).reshape(b * t, -1).index_select(0, slots)
        h = h + blk.drop_path1(blk.ls1(a))
        h = h + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(h))))
    return x.reshape(b * t, c).to(h.dtype).index_copy(0, slots, h).view(b, t, c)  # in the blocks' dtype (autocast)
