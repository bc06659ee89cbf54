"""The backbone's training loss over the original method's three channels, as one module.

* ``plain``: the unpruned forward pass;
* ``single``: one stage's pruning action alone, applied to the unpruned tokens at that stage;
* ``multi``: every stage's action, each decided on the tokens the earlier ones left.

The pruning decisions come from ``keep_fn(obs)`` (the agent, frozen in this phase, sampling its
actions); its observations are those of ``APTPrune-v0``. One module so that DDP can wrap it: its
``forward`` is the whole backbone phase's loss.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from apt_env.envs.observe import BUDGET_KEYS, CHANNELS, OBS_KEYS, BudgetKeepRatio, KeepFn, observe, walk
from apt_env.models.backbone import Layout, PrunableViT
from apt_env.models.tokens import TokenState


class ChannelLosses(nn.Module):
    """Cross-entropy of the three channels on one batch.

    Args:
        pv: the backbone being trained.
        layout: ``gathered`` (pruned tokens removed: faster) or ``masked``; same gradients.
        label_smoothing: of the cross-entropy.
    """

    def __init__(self, pv: PrunableViT, *, layout: Layout = "gathered", label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.pv = pv
        self.layout = layout
        self.label_smoothing = label_smoothing
        self._budget_ratio: BudgetKeepRatio | None = None  # tabulated on the first budget

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        keep_fn: KeepFn | None = None,
        weights: Mapping[str, float] | None = None,
        single_stage: int = 0,
        budget: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The losses by channel (only those with a non-zero weight, each already weighted) and the plain logits.

        Args:
            images: a batch. # (B, C, H, W)
            labels: its labels. # (B,)
            keep_fn: pruning decisions; None trains the plain channel only.
            weights: per-channel weights; default 1 for every channel (only ``plain`` without ``keep_fn``).
            single_stage: the stage whose action alone makes the ``single`` channel.
            budget: each image's budget (B,), observed as the env observes it (``budget``, ``keep_count``), for
                a budget-conditioned ``keep_fn``: the backbone then trains on the masks it sees at test time.
        """
        pv, b = self.pv, self.pv.stage_bounds
        weights = _channel_weights(weights, pruned=keep_fn is not None)
        pruning = keep_fn is not None and (weights.get("single", 0) or weights.get("multi", 0))
        keys, seen = OBS_KEYS, {}
        if budget is not None:
            if self._budget_ratio is None:
                self._budget_ratio = BudgetKeepRatio(pv)
            keys, seen = (*OBS_KEYS, *BUDGET_KEYS), dict(budget=budget, keep_ratio=self._budget_ratio(budget))

        # The plain pass, keeping the tokens (and class attention) entering every stage.
        states: list[TokenState] = []
        attns: list[torch.Tensor | None] = []
        state = pv.embed(images)
        for k in range(pv.num_stages):
            state, attn = pv.advance_to_stage(state, k, take_attn=bool(pruning))
            states.append(state)
            attns.append(attn)
        logits_plain = pv.finish(state, b[-2])
        losses = {"plain": weights.get("plain", 0.0) * self._ce(logits_plain, labels)}

        single, multi = pruning and weights.get("single", 0), pruning and weights.get("multi", 0)
        keep, j = _as_bool(keep_fn), single_stage
        walk_from = (states[0], attns[0], 0)  # where the multi channel starts deciding
        if single:
            with torch.no_grad():
                mask = keep(observe(pv, states[j], attns[j], j, keys, **seen))
            state, start = pv.prune(states[j], mask, self.layout), b[j + 1]
            if j == 0 and multi and pv.num_stages > 1:
                # The first action alone is also the multi channel's first action: they share it and the blocks up
                # to the next stage, from which the multi channel goes on pruning.
                state, attn = pv.advance_to_stage(state, 1, take_attn="cls_attn" in keys)
                start, walk_from = b[2], (state, attn, 1)
            losses["single"] = weights["single"] * self._ce(pv.finish(state, start), labels)
        if multi:
            state, attn, first = walk_from
            *_, last = walk(pv, state, attn, keep, keys=keys, layout=self.layout, start=first, **seen)
            losses["multi"] = weights["multi"] * self._ce(pv.finish(last, b[-2]), labels)
        return {c: v for c, v in losses.items() if weights.get(c, 0)}, logits_plain

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


def _as_bool(keep_fn: KeepFn) -> KeepFn:
    """``keep_fn`` with its masks cast to bool, so that a 0/1 mask of any dtype trains too."""
    return lambda obs: keep_fn(obs).bool()


def draw_budgets(
    budget: tuple[float, float] | None, size: int, device: torch.device, groups: int | None = None
) -> torch.Tensor | None:
    """Budgets for a training batch (float64; torch's RNG), None without a range.

    ``groups`` distinct budgets (default one per row), stratified: group ``g`` draws uniformly from the ``g``-th of
    ``groups`` equal parts of the range, and its rows are consecutive. A training batch comes shuffled, so every
    image's budget is still uniform over the range, as the env draws one per episode; rows come in order of budget,
    hence of kept count, so the pruned channels run in groups of rows without an index (``PrunableViT``), and a
    group's rows all keep the same counts: no padding inside it.
    """
    if budget is None:
        return None
    groups = size if groups is None else groups
    if not isinstance(groups, int) or isinstance(groups, bool) or not 1 <= groups <= size:
        raise ValueError(f"groups must be an integer in [1, {size}] (distinct budgets per batch), got {groups!r}")
    low, high = budget
    draws = (torch.arange(groups, dtype=torch.float64) + torch.rand(groups, dtype=torch.float64)) / groups
    sizes = torch.tensor([len(part) for part in torch.arange(size).tensor_split(groups)])
    return (low + (high - low) * draws).repeat_interleave(sizes).to(device)


def _channel_weights(weights: Mapping[str, float] | None, *, pruned: bool) -> dict[str, float]:
    """Every channel's weight (default 1); the plain channel alone without pruning decisions."""
    weights = dict(weights or {c: 1.0 for c in CHANNELS})
    if not pruned:
        weights = {"plain": weights.get("plain", 1.0)}
    unknown = set(weights) - set(CHANNELS)
    if unknown:
        raise ValueError(f"unknown channels {sorted(unknown)}; valid: {', '.join(CHANNELS)}")
    return weights
