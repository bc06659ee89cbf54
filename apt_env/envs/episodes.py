"""The episode engine on the device: a batch of images walked through the pruning stages, and the rewards.

One row per image, all in torch; the Gymnasium classes (``apt_env.envs.env``) only add spaces, seeding and numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from apt_env.envs.mean_budget import BudgetPrice
from apt_env.envs.observe import BUDGET_KEYS, BudgetKeepRatio, observe
from apt_env.models.backbone import Layout, PrunableViT
from apt_env.models.flops import FlopCounter
from apt_env.models.tokens import TokenState, random_count

__all__ = ["DEFAULT_CHANNELS", "REWARDS", "PruningEpisodes"]

REWARDS: tuple[str, ...] = ("loss_delta", "prob_delta", "vs_random")
DEFAULT_CHANNELS: tuple[str, ...] = ("plain", "multi")
"""The channels the reward needs; ``single`` (``CHANNELS``) costs a pass more and is reported when asked."""


class PruningEpisodes:
    """The batched episode state machine on the device, shared by the single and the vector env.

    One row per image. Stage ``k`` observes the tokens entering block ``prune_layers[k]``; its action
    is applied there, and one pass to the end of the network gives the loss under the new mask and,
    on the way, the next stage's observation.
    """

    def __init__(
        self,
        pv: PrunableViT,
        *,
        reward: str,
        flops_weight: float,
        channels: Sequence[str],
        obs_keys: Sequence[str],
        layout: Layout,
        budget_weight: float = 0.0,
        price: BudgetPrice | None = None,
        fuse: bool = False,
    ) -> None:
        self.pv = pv
        self.fuse = fuse  # EViT's fused token at every stage, weighted by the class attention
        self.price = price  # a mean budget's price of compute; None: the budget holds in each image
        self.reward = reward
        self.flops_weight = float(flops_weight)
        self.budget_weight = float(budget_weight)
        self.channels = tuple(channels)
        self.obs_keys = tuple(obs_keys)
        self.take_attn = "cls_attn" in self.obs_keys or fuse  # its class attention costs a partial block
        self.layout = layout
        self.flops = FlopCounter(pv.model)
        self.flops_all = self.flops.dense()
        self.bounds = pv.stage_bounds
        self.budget_ratio: BudgetKeepRatio | None = None  # built at the first episode with a budget
        self.stage = -1  # no episode yet

    @property
    def num_stages(self) -> int:
        return self.pv.num_stages

    @torch.no_grad()
    def start(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        budget: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Begin episodes on a batch of images; returns the first observation.

        Args:
            images, labels: the batch, one episode per row.
            budget: each row's budget (B,), a fraction of the dense backbone GFLOPs; needed when the
                ``budget`` or ``keep_count`` observation is asked for, or ``budget_weight`` is set.
            generator: the random source of the ``vs_random`` reward's masks (the env seeds it from its
                ``np_random``).
        """
        pv, b = self.pv, self.bounds
        if budget is None and (self.budget_weight or any(key in self.obs_keys for key in BUDGET_KEYS)):
            raise ValueError("these episodes observe or reward a budget: pass budget=")
        if generator is None and self.reward == "vs_random":
            raise ValueError("the vs_random reward draws random masks: pass generator=")
        self.budget, self.generator = budget, generator
        self.keep_ratio = None
        if budget is not None:
            if self.budget_ratio is None:
                self.budget_ratio = BudgetKeepRatio(pv, self.flops)
            self.keep_ratio = self.budget_ratio(budget)
        self.labels = labels
        self.state, self.cls_attn = pv.advance_to_stage(pv.embed(images), 0, take_attn=self.take_attn)
        logits_plain = pv.finish(self.state, b[1])
        if "single" in self.channels:  # the unpruned state entering every stage (and its attention, to fuse by)
            self.plain_states, self.plain_attn = [self.state], [self.cls_attn]
            for k in range(1, self.num_stages):
                state, attn = pv.advance_to_stage(self.plain_states[-1], k, take_attn=self.fuse)
                self.plain_states.append(state)
                self.plain_attn.append(attn)
        self.loss_plain = F.cross_entropy(logits_plain, labels, reduction="none")
        self.score = self._score(logits_plain)
        rows = images.shape[0]
        self.block_tokens = torch.full((rows, pv.depth), pv.num_prefix_tokens + pv.num_patches, device=images.device)
        self.flops_now = torch.full((rows,), self.flops_all, dtype=torch.float64, device=images.device)
        self.stage = 0
        return self.observe(self.state, self.cls_attn)

    @torch.no_grad()
    def step(self, keep: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        """Apply stage ``k``'s keep mask (B, N) bool; returns (observation, reward, info).

        After the last stage the observation is the final state: the last stage's tokens under the
        final mask. Nothing returned shares memory with the episode state.
        """
        if self.stage < 0:
            raise RuntimeError("step() called before reset()")
        if self.stage >= self.num_stages:
            raise RuntimeError("the episode is over: call reset()")
        pv, k = self.pv, self.stage
        start, last = self.bounds[k + 1], k + 1 == self.num_stages
        pruned = self._prune(self.state, keep, self.cls_attn)
        logits, next_state, next_attn = self._finish_stage(pruned)
        counts = pruned.num_kept()
        self.block_tokens[:, start:] = (pv.num_prefix_tokens + pruned.num_entering()).unsqueeze(1)
        flops_now = self.flops(self.block_tokens)
        score = self._score(logits)
        baseline = self.score if self.reward != "vs_random" else self._chance_score(counts, start)
        reward = baseline - score + self.flops_weight * (self.flops_now - flops_now).float() / self.flops_all
        info = self._info(logits, score, keep, pruned, flops_now)
        if self.reward == "vs_random":
            info["loss_random"] = baseline
        if self.budget is not None:  # charged once, on the final FLOPs
            info["budget_penalty"] = self._budget_penalty(flops_now) if last else torch.zeros_like(reward)
            reward = reward - info["budget_penalty"]

        self.state, self.cls_attn, self.score, self.flops_now = next_state, next_attn, score, flops_now
        obs = self.observe(next_state, next_attn, stage=k if last else k + 1)
        self.stage = k + 1
        return obs, reward.float(), info

    def _prune(self, state: TokenState, keep: torch.Tensor, cls_attn: torch.Tensor | None) -> TokenState:
        """``state`` under ``keep``, its pruned tokens fused into one by ``cls_attn`` when the env fuses."""
        return self.pv.prune(state, keep, self.layout, fuse_attn=cls_attn if self.fuse else None)

    def _budget_penalty(self, flops: torch.Tensor) -> torch.Tensor:
        """The last step's budget term of each image: its over-budget penalty, or with a mean budget the price of its
        compute against the budget (negative under it), after which the price takes its dual step."""
        over = flops / self.flops_all - self.budget.double()
        if self.price is None:
            return (self.budget_weight * over.clamp(min=0)).float()
        penalty = (self.price(self.budget) * over).float()
        self.price.update(self.budget, flops / self.flops_all)
        return penalty

    def _finish_stage(self, pruned: TokenState) -> tuple[torch.Tensor, TokenState, torch.Tensor | None]:
        """The logits under this stage's mask and the next stage's state and class attention, in one pass."""
        pv, b, k = self.pv, self.bounds, self.stage
        if k + 1 < self.num_stages:
            next_state, next_attn = pv.advance_to_stage(pruned, k + 1, take_attn=self.take_attn)
            return pv.finish(next_state, b[k + 2]), next_state, next_attn
        next_attn = self.cls_attn
        if next_attn is not None:
            next_attn = next_attn * pruned.mask(pv.num_patches)
        return pv.finish(pruned, b[k + 1]), pruned, next_attn

    def _chance_score(self, counts: torch.Tensor, start: int) -> torch.Tensor:
        """The score of as many tokens as each row keeps, drawn at random from the same state (``vs_random``)."""
        chance = random_count(self.state.mask(self.pv.num_patches), counts, self.generator)
        return self._score(self.pv.finish(self._prune(self.state, chance, self.cls_attn), start))

    def _info(
        self, logits: torch.Tensor, score: torch.Tensor, keep: torch.Tensor, pruned: TokenState, flops_now: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The step's channels and costs (the rewards' terms are added by ``step``)."""
        pv, k = self.pv, self.stage
        loss_multi = score if self.reward != "prob_delta" else F.cross_entropy(logits, self.labels, reduction="none")
        # Copies: the caller may edit info in place, and self.score is the next step's baseline.
        info = {"loss_plain": self.loss_plain.clone(), "loss_multi": loss_multi.clone()}
        if "single" in self.channels:
            single = loss_multi.clone()
            if k > 0:  # only this stage's action, applied to the unpruned tokens
                alone = self._prune(self.plain_states[k], keep, self.plain_attn[k])
                single = F.cross_entropy(pv.finish(alone, self.bounds[k + 1]), self.labels, reduction="none")
            info["loss_single"] = single
        info["keep_ratio"] = pruned.num_kept().float() / pv.num_patches
        info["gflops"] = (flops_now / 1e9).float()
        # What was done, which differs from ``keep`` where the action asks to keep pruned tokens
        # or a row was topped up to min_keep.
        info["executed_action"] = pruned.mask(pv.num_patches).to(torch.int8)
        return info

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        """What the reward's first term improves: the loss, or minus the true-class probability."""
        if self.reward != "prob_delta":
            return F.cross_entropy(logits, self.labels, reduction="none")
        return -logits.softmax(-1).gather(1, self.labels.unsqueeze(1)).squeeze(1)

    def observe(self, state: TokenState, cls_attn: torch.Tensor | None, stage: int | None = None) -> dict:
        """The observation of ``state`` at ``stage`` (default: the current one), only the keys asked for."""
        stage = self.stage if stage is None else stage
        return observe(self.pv, state, cls_attn, stage, self.obs_keys, budget=self.budget, keep_ratio=self.keep_ratio)
