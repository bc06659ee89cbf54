"""A budget agent and its backbone as one forward pass of static shapes, for running at one budget; and a
mean-budget agent's fast path for one image at a time (``FusedAdaptiveAgent``).

At a fixed budget every image keeps the same number of patch tokens at each stage, known before any image is seen
(``apt_env.envs.observe.BudgetKeepRatio``'s counting), so the whole decision path has fixed shapes: the agent scores the
live tokens as one (B, M, C) batch (no scatter back to the N patch positions, no mask, no ``nonzero``), a ``topk``
of the known count picks the tokens, one gather removes the others, and nothing waits on the host. The blocks are
timm's own; the block before each stage also hands out its class attention, from the ``qkv`` it computes anyway
(``PrunableViT.block_with_cls_attention``: the engine runs it).
The result can be compiled whole (``torch.compile``).

    fused = FusedBudgetAgent(pv, policy, budget=0.5).eval()
    logits = fused(images)                       # = forward_policy(pv, images, policy's mode at 0.5)
    logits, positions = fused(images, return_positions=True)  # kept patch positions after each stage

Its logits are those of the generic walk (``apt_env.eval.evaluate.forward_policy`` with the agent's mode) up to float
rounding, ties between equal logits aside. It is built for the weights it is given: rebuild it after training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from agents.policy import APTPolicy
from apt_env.eval.evaluate import budget_keep_ratio
from apt_env.models.backbone import PrunableViT
from apt_env.models.tokens import keep_count


def static_counts(pv: PrunableViT, budget: float) -> tuple[int, ...]:
    """Patch tokens every image keeps after each stage at ``budget``: the counts the budget's observation gives a
    ``"topk"`` agent (``keep_count`` at the budget's keep ratio, stage after stage)."""
    ratio = torch.tensor([budget_keep_ratio(pv, budget)], dtype=torch.float64)
    live, counts = torch.tensor([float(pv.num_patches)], dtype=torch.float64), []
    for _ in range(pv.num_stages):
        live = keep_count(live, ratio, pv.min_keep)
        counts.append(int(live))
    return tuple(counts)


class _FusedWalk(nn.Module, ABC):
    """The walk both fused paths share: timm's blocks stage by stage, the agent's logits of the live tokens as one
    (B, M) batch (``APTPolicy.equal_count_logits``), the kept tokens gathered. A subclass says which tokens a row
    keeps (``select``)."""

    def __init__(self, pv: PrunableViT, policy: APTPolicy, budget: float) -> None:
        super().__init__()
        if policy.mixer != "none":
            raise ValueError(f"a fused path needs an agent with mixer='none'; got mixer={policy.mixer!r}")
        if (policy.num_patches, policy.embed_dim, policy.num_stages) != (pv.num_patches, pv.embed_dim, pv.num_stages):
            raise ValueError(
                f"the agent is sized for {policy.num_patches} patches of width {policy.embed_dim} over "
                f"{policy.num_stages} stages; the backbone has {pv.num_patches} of width {pv.embed_dim} over "
                f"{pv.num_stages}"
            )
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        if policy.use_cls_attn:
            for stage in range(pv.num_stages):
                block, _ = pv.attention_source(stage)
                if not pv.runs_block_with_cls_attention(block):
                    raise ValueError(
                        f"block {block} is not timm's Block with its Attention: the fused path reads the class "
                        "attention of those only"
                    )
        self.pv, self.policy, self.budget = pv, policy, float(budget)
        with torch.no_grad():  # what does not depend on the image, computed once: no weight checks in the graph
            terms = torch.stack([policy.row_term(s, budget) for s in range(pv.num_stages)])
            weight, bias = policy.keys_and_values()
        self.register_buffer("row_terms", terms, persistent=False)  # (K, H): the same for every image
        self.register_buffer("kv_weight", weight, persistent=False)
        self.register_buffer("kv_bias", bias, persistent=False)
        self.register_buffer("positions", torch.arange(pv.num_patches), persistent=False)

    @abstractmethod
    def select(self, stage: int, scores: Tensor) -> Tensor:
        """The slots (B, M') of the live tokens each row keeps, in raster order, from their logits (B, M)."""

    def forward(self, images: Tensor, return_positions: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits (B, classes); with ``return_positions`` also the patch positions kept after each stage, a list of
        (B, M_k) long in raster order (``kept_masks`` turns them into masks)."""
        pv = self.pv
        p, bounds, has_cls = pv.num_prefix_tokens, pv.stage_bounds, pv.has_cls_token
        x = pv.embed(images).x  # (B, P + N, C)
        b, c = x.shape[0], x.shape[-1]
        pos = self.positions.expand(b, -1)
        kept = []
        for stage in range(pv.num_stages):
            cls_attn = None
            if self.policy.use_cls_attn and bounds[stage + 1] == 0:  # before block 0: what block 0 will attend to
                cls_attn = pv.cls_attention_before(0, x)
            elif self.policy.use_cls_attn:
                x = pv.dense_blocks(x, bounds[stage], bounds[stage + 1] - 1)
                x, cls_attn = pv.block_with_cls_attention(bounds[stage + 1] - 1, x)
            else:
                x = pv.dense_blocks(x, bounds[stage], bounds[stage + 1])
            patches = x[:, p:]
            cls = x[:, 0] if has_cls else patches.mean(1)
            scores = self.policy.equal_count_logits(
                patches, cls, cls_attn, self.row_terms[stage], pos, (self.kv_weight, self.kv_bias)
            )
            top = self.select(stage, scores)
            pos = pos.gather(1, top)
            x = torch.cat([x[:, :p], patches.gather(1, top.unsqueeze(-1).expand(-1, -1, c))], dim=1)
            kept.append(pos)
        logits = pv.dense_head(pv.dense_blocks(x, bounds[-2], pv.depth))
        return (logits, kept) if return_positions else logits


class FusedBudgetAgent(_FusedWalk):
    """``pv`` pruned by ``policy``'s mode at one ``budget``, as one static-shape forward pass.

    Args:
        pv: the backbone; blocks before the pruning layers must be timm's ``Block`` with its ``Attention`` (no gate)
            when the policy reads the class attention.
        policy: a budget-conditioned ``"topk"`` agent without a mixer, sized for ``pv``.
        budget: the fraction of the dense backbone's GFLOPs.

    Raises:
        ValueError: the policy or the backbone is not of that kind, or they do not fit each other.
    """

    def __init__(self, pv: PrunableViT, policy: APTPolicy, budget: float) -> None:
        if policy.sampling != "topk" or not policy.use_budget:
            raise ValueError(
                "a fused path needs a budget agent that keeps the budget's count (sampling='topk', use_budget=True); "
                f"got sampling={policy.sampling!r}, use_budget={policy.use_budget}"
            )
        super().__init__(pv, policy, budget)
        self.counts = static_counts(pv, budget)

    def select(self, stage: int, scores: Tensor) -> Tensor:
        top = scores.topk(self.counts[stage], dim=1, sorted=False).indices
        return top.sort(dim=1).values  # raster order, as the walk


class FusedAdaptiveAgent(_FusedWalk):
    """``pv`` pruned by a mean-budget agent's mode (its calibrated threshold of ``budget``) on one image at a time:
    the fast path at batch 1, where an image has no other row to pad to.

    Each stage keeps the live tokens whose logit is above the stage's threshold (at least ``pv.min_keep``, topped up
    in raster order as the engine does), the stage's count read once (one host sync a stage); the rest is
    ``FusedBudgetAgent``'s walk: the fold of the agent's weights, no scatter to the N positions, one gather.

    Args:
        pv: the backbone (as for ``FusedBudgetAgent``).
        policy: a calibrated ``"threshold"`` agent without a mixer, sized for ``pv``.
        budget: the mean budget, a fraction of the dense backbone's GFLOPs.

    Raises:
        ValueError: the policy or the backbone is not of that kind, or they do not fit each other; at call time, a
            batch of more than one image.
    """

    def __init__(self, pv: PrunableViT, policy: APTPolicy, budget: float) -> None:
        if policy.sampling != "threshold" or policy.calibration is None:
            raise ValueError(
                "the adaptive fused path needs a mean-budget agent with calibrated thresholds (sampling='threshold'); "
                f"got sampling={policy.sampling!r}, calibrated={policy.calibration is not None}"
            )
        super().__init__(pv, policy, budget)
        self.register_buffer("thresholds", policy.thresholds_at(budget), persistent=False)  # (K,)
        self.min_keep = pv.min_keep

    def select(self, stage: int, scores: Tensor) -> Tensor:
        keep = scores[0] > self.thresholds[stage].to(scores.dtype)
        short = self.min_keep - int(keep.sum())  # the stage's one read of a count
        if short > 0:  # as ``enforce_min_keep``: the first dropped tokens in raster order
            keep |= ~keep & (torch.cumsum(~keep, 0) <= short)
        return keep.nonzero().view(1, -1)

    def forward(self, images: Tensor, return_positions: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        if images.shape[0] != 1:
            raise ValueError(f"FusedAdaptiveAgent runs one image at a time, got a batch of {images.shape[0]}")
        return super().forward(images, return_positions)


def kept_masks(kept: list[Tensor], num_patches: int) -> Tensor:
    """Keep masks over the ``num_patches`` positions after each stage (B, K, N) bool from ``FusedBudgetAgent``'s
    kept positions (a list of (B, M_k))."""
    masks = torch.zeros(kept[0].shape[0], len(kept), num_patches, dtype=torch.bool, device=kept[0].device)
    for stage, pos in enumerate(kept):
        masks[:, stage].scatter_(1, pos, True)
    return masks
