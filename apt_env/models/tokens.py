"""Token-level operations for pruning: pure functions on tensors.

A pruning state is a sequence ``x`` of ``P`` prefix tokens followed by ``L`` patch *slots*. Each slot
holds the token of an original patch position (``index``) and is either live or not (``live``).
In the *masked* layout ``L == N`` and ``index`` is the identity; in the *gathered* layout the live tokens are
packed to the front of each row and ``L`` is the largest live count in the batch (as timm's
``PatchDropout`` gathers patch tokens by index while keeping the prefix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class TokenState:
    """Tokens between two blocks, with the patch positions they came from.

    Attributes:
        x: tokens, prefix first. # (B, P + L, C)
        live: live patch slots. # (B, L) bool
        index: original patch position of each slot. # (B, L) long
        num_prefix_tokens: P, the tokens before the patch slots, never pruned: the model's prefix tokens, then
            any fused tokens (``num_fused``).
        packed: live slots come first in every row (true after ``gather_kept``), so a row whose
            live count is ``n`` can be cut to its first ``P + n`` tokens.
        num_fused: F, the last of the prefix tokens that are fused tokens (EViT's, ``append_fused``), one per
            stage that fused.
        fused_live: which fused tokens of each row hold tokens (a row that pruned nothing at a stage has an empty
            one, masked as a key); None when all of them do. # (B, F) bool
    """

    x: torch.Tensor
    live: torch.Tensor
    index: torch.Tensor
    num_prefix_tokens: int
    packed: bool = True
    num_fused: int = 0
    fused_live: torch.Tensor | None = None

    @property
    def patches(self) -> torch.Tensor:
        """Patch slots of ``x``. # (B, L, C)"""
        return self.x[:, self.num_prefix_tokens :]

    def key_mask(self) -> torch.Tensor | None:
        """Boolean attention mask over keys (True = attend), or None when every slot is live.

        Returns None on the dense path so that timm's fused attention runs without a mask.
        """
        if self.fused_live is None and bool(self.live.all()):
            return None
        prefix = self.live.new_ones(self.live.shape[0], self.num_prefix_tokens)
        if self.fused_live is not None:
            prefix[:, self.num_prefix_tokens - self.num_fused :] = self.fused_live
        return torch.cat([prefix, self.live], dim=1)[:, None, None, :]  # (B, 1, 1, P + L)

    def with_x(self, x: torch.Tensor) -> TokenState:
        p, packed, fused, live = self.num_prefix_tokens, self.packed, self.num_fused, self.fused_live
        return TokenState(x, self.live, self.index, p, packed, fused, live)  # not replace(): on every block run

    def without_fused(self) -> TokenState:
        """The state without its fused tokens: the model's own prefix tokens and the patch slots."""
        if not self.num_fused:
            return self
        p = self.num_prefix_tokens - self.num_fused
        x = torch.cat([self.x[:, :p], self.x[:, self.num_prefix_tokens :]], dim=1)
        return replace(self, x=x, num_prefix_tokens=p, num_fused=0, fused_live=None)

    def rows(self, rows: torch.Tensor, length: int, x: torch.Tensor | None = None) -> TokenState:
        """The given rows cut to their first ``length`` slots (only for packed states); ``x``: those rows of
        ``self.x`` when the caller has them already (e.g. a split of consecutive rows)."""
        p = self.num_prefix_tokens
        x = (self.x[rows] if x is None else x)[:, : p + length]
        fused_live = None if self.fused_live is None else self.fused_live[rows]
        return replace(self, x=x, live=self.live[rows, :length], index=self.index[rows, :length], packed=True,
                       fused_live=fused_live)  # fmt: skip

    def num_kept(self) -> torch.Tensor:
        """Live patch tokens per sample. # (B,) long"""
        return self.live.sum(dim=1)

    def num_entering(self) -> torch.Tensor:
        """Tokens per sample that the next blocks run on beyond the model's own prefix tokens: the live patch tokens
        and the fused tokens that hold tokens (an empty one is masked). # (B,) long"""
        if self.fused_live is not None:
            return self.num_kept() + self.fused_live.sum(1)
        return self.num_kept() + self.num_fused

    def mask(self, num_patches: int) -> torch.Tensor:
        """The keep mask over original patch positions. # (B, N) bool"""
        out = self.live.new_zeros(self.live.shape[0], num_patches)
        return out.scatter(1, self.index, self.live)

    def patch_features(self, num_patches: int) -> torch.Tensor:
        """Patch tokens at their original positions, pruned ones zeroed. # (B, N, C)"""
        b, _, c = self.patches.shape
        live = self.patches if bool(self.live.all()) else self.patches * self.live.unsqueeze(-1).to(self.x.dtype)
        # Slots hold distinct positions of their row: an index_put by (row, position), far faster than a scatter
        # along dim 1, that reads the patches in place (no copy of the strided view).
        out = self.x.new_zeros(b, num_patches, c)
        out[torch.arange(b, device=self.x.device).unsqueeze(1), self.index] = live
        return out


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True = attend) as an additive one: 0 where True, -inf where False.

    timm's non-fused attention (``fused_attn=False``, e.g. under ``TIMM_FUSED_ATTN=0``) adds the
    mask to the scores, where a bool mask would add 0/1 and remove nothing.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def live_mean(x: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Mean over the live tokens of each row. # x: (B, L, C), live: (B, L) bool -> (B, C)"""
    w = live.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(1) / w.sum(1)


def initial_state(x: torch.Tensor, num_prefix_tokens: int) -> TokenState:
    """The state right after embedding: every patch live, slots in raster order."""
    b, n = x.shape[0], x.shape[1] - num_prefix_tokens
    index = torch.arange(n, device=x.device).expand(b, n)
    live = torch.ones(b, n, dtype=torch.bool, device=x.device)
    return TokenState(x, live, index, num_prefix_tokens)


def enforce_min_keep(prev: torch.Tensor, new: torch.Tensor, min_keep: int) -> torch.Tensor:
    """Top up rows of ``new`` that keep fewer than ``min_keep`` tokens.

    The tokens added back are those that were live in ``prev`` and dropped by ``new``, first in
    slot (raster) order, until ``min_keep`` are live (or all of ``prev`` when it had fewer).

    Args:
        prev: live slots before the action. # (B, L) bool
        new: live slots after the action, a subset of ``prev``. # (B, L) bool
        min_keep: the least number of patch tokens a row keeps.
    """
    count = new.sum(dim=1, keepdim=True)  # (B, 1)
    # Rows left short are rare. On CPU, where each small op costs tens of microseconds between the blocks' large ones,
    # they are looked for first; on an accelerator the top-up runs anyway, rather than wait for the device to answer.
    if new.device.type == "cpu" and not bool((count < min_keep).any()):
        return new
    deficit = (min_keep - count).clamp(min=0)
    dropped = prev & ~new
    rank = dropped.cumsum(dim=1)  # 1-based rank among the dropped slots
    return new | (dropped & (rank <= deficit))


def apply_keep_mask(state: TokenState, mask: torch.Tensor, min_keep: int) -> TokenState:
    """Prune with a keep mask over original patch positions; pruned tokens stay pruned.

    Args:
        state: the current state.
        mask: True for patch positions to keep. # (B, N) bool
        min_keep: the least number of patch tokens a row keeps (see ``enforce_min_keep``).
    """
    live = enforce_min_keep(state.live, state.live & mask.gather(1, state.index), min_keep)
    return replace(state, live=live, packed=False)


def append_fused(state: TokenState, token: torch.Tensor, live: torch.Tensor) -> TokenState:
    """``state`` with one more fused token after its prefix tokens (and fused tokens before it).

    The place in the sequence changes no logit: attention does not depend on the order of its tokens, position
    embeddings are added before the first block, and pooling leaves fused tokens out (``TokenState.without_fused``).

    Args:
        token: the fused token of each row. # (B, C)
        live: rows whose fused token holds tokens; the others' is masked as a key. # (B,) bool
    """
    p = state.num_prefix_tokens
    x = torch.cat([state.x[:, :p], token.to(state.x.dtype)[:, None], state.x[:, p:]], dim=1)
    fused_live = state.fused_live
    if fused_live is not None or not bool(live.all()):
        before = live.new_ones(live.shape[0], state.num_fused) if fused_live is None else fused_live
        fused_live = torch.cat([before, live[:, None]], dim=1)
    return replace(state, x=x, num_prefix_tokens=p + 1, num_fused=state.num_fused + 1, fused_live=fused_live)


def gather_kept(state: TokenState) -> TokenState:
    """Really remove pruned tokens: pack live slots to the front, pad rows to the batch maximum.

    Rows keep their live tokens in their current (raster) order. Padding slots hold pruned tokens,
    marked not live, so attention must mask them as keys (``key_mask``) unless every row keeps the
    same number of tokens, in which case there is no padding and no mask.
    """
    counts = state.live.sum(dim=1)
    length = int(counts.max())
    if length == state.live.shape[1] and bool(state.live.all()):
        return replace(state, packed=True)
    # A stable sort puts live slots first and keeps their order.
    order = torch.argsort((~state.live).to(torch.uint8), dim=1, stable=True)[:, :length]  # (B, L')
    b, t, c = state.x.shape
    p = state.num_prefix_tokens
    slots = torch.cat([torch.arange(p, device=order.device).expand(b, p), order + p], dim=1)  # prefix, then live
    # Whole rows of x by one index_select on its flat view: several times faster than a gather along dim 1.
    flat = (slots + torch.arange(0, b * t, t, device=order.device).unsqueeze(1)).reshape(-1)
    x = state.x.reshape(b * t, c).index_select(0, flat).view(b, p + length, c)
    live = torch.arange(length, device=counts.device) < counts.unsqueeze(1)
    return replace(state, x=x, live=live, index=state.index.gather(1, order), packed=True)


BUCKET_MIN_SAVING = 0.1
"""Groups run only when they remove at least this fraction of the tokens the padded batch would run: each group
costs a copy in and out and launches every block once more."""


def length_buckets(
    counts: torch.Tensor, num_buckets: int, num_prefix_tokens: int = 0, min_saving: float = BUCKET_MIN_SAVING
) -> list[tuple[torch.Tensor, int]] | None:
    """Rows grouped by similar live count: rows sorted by count (stably), split into ``num_buckets`` equal parts,
    each with its longest count, neighbours of the same longest count joined. None when one group is as good: fewer
    than two parts, or the parts would run less than ``min_saving`` fewer tokens (prefix included) than the whole
    batch padded to its longest row.

    Running each group cut to its own longest row wastes far less on padding than padding the
    whole batch to its longest row when counts vary (e.g. a budget per image).
    """
    if num_buckets < 2:
        return None
    order = counts.argsort(stable=True)  # rows already in order of count keep it: a split, not an index
    parts = order.tensor_split(num_buckets)
    longest = counts[order][torch.tensor([len(p) for p in parts]).cumsum(0) - 1].tolist()  # each part's last
    padded = (longest[-1] + num_prefix_tokens) * len(counts)
    grouped = sum(len(p) * (n + num_prefix_tokens) for p, n in zip(parts, longest))
    if grouped > (1.0 - min_saving) * padded:
        return None
    buckets: list[tuple[torch.Tensor, int]] = []
    for part, n in zip(parts, longest):
        if buckets and buckets[-1][1] == n:  # as long as the group before: one group runs it at no more padding
            part = torch.cat([buckets.pop()[0], part])
        buckets.append((part, int(n)))
    return buckets


def top_count(scores: torch.Tensor, live: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``count`` (B,) highest-scoring live tokens (all of them where it has fewer); ties go
    to the lower position. # scores: (B, N) float, live: (B, N) bool -> (B, N) bool, a subset of ``live``"""
    order = scores.double().masked_fill(~live, -math.inf).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < count.unsqueeze(1)) & live


def keep_count(live: torch.Tensor, ratio: torch.Tensor, min_keep: int) -> torch.Tensor:
    """Patch tokens a row keeps at a stage under a uniform keep ratio: ``floor(live * ratio + 0.5)``,
    at least ``max(1, min_keep)``, at most ``live``. # live, ratio: (B,) -> (B,) float64"""
    live = live.double()
    return torch.floor(live * ratio.double() + 0.5).clamp(min=max(1, min_keep)).clamp(max=live)


def random_count(live: torch.Tensor, count: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each row's ``count`` (B,) live tokens drawn uniformly without replacement (all of them where it has
    fewer): one uniform score per position from ``generator`` (torch's default one when None), the top ``count``
    kept. The scores are drawn on the generator's device, so a CPU generator gives the same masks on any device.
    # live: (B, N) bool -> (B, N) bool, a subset of ``live``"""
    device = live.device if generator is None else generator.device
    scores = torch.rand(live.shape, generator=generator, device=device)
    return top_count(scores.to(live.device), live, count)


def dither_rank(grid: tuple[int, int]) -> torch.Tensor:
    """The ordered-dither (Bayer) rank of each patch position of an (H, W) grid, in raster order, scaled to
    [0, 1). For every ``k`` the ``k`` lowest-ranked positions spread evenly over the grid, and they are nested, so
    keeping the lowest-ranked live tokens stage after stage covers the image at every count (halftoning's ordered
    dither: Bayer, 1973). # -> (H * W,) float"""
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"a patch grid has positive sides, got {grid}")
    side = 1 << (max(h, w) - 1).bit_length()  # the smallest power of two that covers the grid
    bayer = torch.zeros(1, 1, dtype=torch.long)
    while bayer.shape[0] < side:  # Bayer's recursion: M_2n = [[4M, 4M + 2], [4M + 3, 4M + 1]]
        bayer = torch.cat([torch.cat([4 * bayer, 4 * bayer + 2], 1), torch.cat([4 * bayer + 3, 4 * bayer + 1], 1)])
    rank = bayer[:h, :w].flatten().argsort().argsort()  # the crop's values, renumbered 0 .. H * W - 1
    return rank.float() / (h * w)
