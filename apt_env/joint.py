"""The backbone's training loss over the original method's three channels, as one module.

* ``plain``: the unpruned forward pass;
* ``single``: one stage's pruning action alone, applied to the unpruned tokens at that stage;
* ``multi``: every stage's action, each decided on the tokens the earlier ones left.

The pruning decisions come from ``keep_fn(obs)`` (the agent, frozen in this phase, sampling its
actions); its observations are those of ``APTPrune-v0``. One module so that DDP can wrap it: its
``forward`` is the whole backbone phase's loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from apt_env.backbone import Mode, PrunableViT
from apt_env.env import OBS_KEYS, observe
from apt_env.tokens import TokenState

CHANNELS = ("plain", "single", "multi")
KeepFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


class ChannelLosses(nn.Module):
    """Cross-entropy of the three channels on one batch.

    Args:
        pv: the backbone being trained.
        mode: ``gathered`` (pruned tokens removed: faster) or ``masked``; same gradients.
        label_smoothing: of the cross-entropy.
    """

    def __init__(self, pv: PrunableViT, *, mode: Mode = "gathered", label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.pv = pv
        self.mode = mode
        self.label_smoothing = label_smoothing

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        keep_fn: KeepFn | None = None,
        weights: Mapping[str, float] | None = None,
        single_stage: int = 0,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The losses by channel (only those with a non-zero weight, each already weighted) and the plain logits.

        Args:
            images: a batch. # (B, C, H, W)
            labels: its labels. # (B,)
            keep_fn: pruning decisions; None trains the plain channel only.
            weights: per-channel weights; default 1 for every channel (only ``plain`` without ``keep_fn``).
            single_stage: the stage whose action alone makes the ``single`` channel.
        """
        pv, b = self.pv, self.pv.stage_bounds
        weights = dict(weights or {c: 1.0 for c in CHANNELS})
        if keep_fn is None:
            weights = {"plain": weights.get("plain", 1.0)}
        unknown = set(weights) - set(CHANNELS)
        if unknown:
            raise ValueError(f"unknown channels {sorted(unknown)}; valid: {', '.join(CHANNELS)}")
        pruning = keep_fn is not None and (weights.get("single", 0) or weights.get("multi", 0))

        # The plain pass, keeping the tokens (and class attention) entering every stage.
        states: list[TokenState] = []
        attns: list[torch.Tensor | None] = []
        state = pv.embed(images)
        for k in range(pv.num_stages):
            state, attn = self._advance(state, b[k], b[k + 1], observe_attn=bool(pruning))
            states.append(state)
            attns.append(attn)
        logits_plain = pv.finish(state, b[-2])
        losses = {"plain": weights.get("plain", 0.0) * self._ce(logits_plain, labels)}

        if pruning and weights.get("single", 0):
            j = single_stage
            mask = self._decide(keep_fn, states[j], attns[j], j)
            single = pv.finish(pv.prune(states[j], mask, self.mode), b[j + 1])
            losses["single"] = weights["single"] * self._ce(single, labels)
        if pruning and weights.get("multi", 0):
            state, attn = states[0], attns[0]
            for k in range(pv.num_stages):
                state = pv.prune(state, self._decide(keep_fn, state, attn, k), self.mode)
                if k + 1 < pv.num_stages:
                    state, attn = self._advance(state, b[k + 1], b[k + 2], observe_attn=True)
            losses["multi"] = weights["multi"] * self._ce(pv.finish(state, b[-2]), labels)
        return {c: v for c, v in losses.items() if weights.get(c, 0)}, logits_plain

    def _advance(
        self, state: TokenState, start: int, end: int, *, observe_attn: bool
    ) -> tuple[TokenState, torch.Tensor | None]:
        if not observe_attn:
            return self.pv.run_blocks(state, start, end), None
        state = self.pv.run_blocks(state, start, end - 1)
        with torch.no_grad():  # an observation: no gradient flows through the agent's inputs
            attn = self.pv.cls_attention(state, end - 1)
        return self.pv.run_blocks(state, end - 1, end), attn

    @torch.no_grad()
    def _decide(self, keep_fn: KeepFn, state: TokenState, attn: torch.Tensor | None, stage: int) -> torch.Tensor:
        return keep_fn(observe(self.pv, state, attn, stage, OBS_KEYS)).bool()

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
