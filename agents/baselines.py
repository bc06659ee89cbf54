"""Heuristic token policies to compare the agent with: keep all, random, top-k by class attention, an evenly
spread grid.

Each has the ``TokenPolicy`` interface of ``APTPolicy.act``, so evaluation treats them alike. A token
pruned at an earlier stage is never kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from agents.distributions import check_keep_ratio, ratio_count, top_k_live
from agents.observation import live_mask, obs_tensor
from agents.policy import TokenPolicy
from apt_env.models.tokens import dither_rank, random_count

__all__ = ["ClsAttentionTopK", "DitherGrid", "KeepAll", "RandomKeep", "TokenPolicy"]


class KeepAll:
    """No pruning: every live token is kept (the plain model)."""

    def act(self, obs: Mapping[str, Any], *, deterministic: bool = True, keep_ratio: float | None = None) -> Tensor:
        """The live mask (B, N) bool; ``deterministic`` and ``keep_ratio`` are ignored."""
        return live_mask(obs)


class RandomKeep:
    """Keep a uniformly random ``keep_ratio`` of the live tokens at every stage.

    Args:
        keep_ratio: fraction in (0, 1] of the live tokens kept (rounded half up, at least one).
        seed: seeds this policy's own generator; ``None`` draws a fresh seed.
    """

    def __init__(self, keep_ratio: float, seed: int | None = None) -> None:
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def act(self, obs: Mapping[str, Any], *, deterministic: bool = True, keep_ratio: float | None = None) -> Tensor:
        """A random keep mask (B, N) bool; ``keep_ratio`` overrides the constructor's."""
        live = live_mask(obs)
        count = ratio_count(live, self.keep_ratio if keep_ratio is None else keep_ratio)
        return random_count(live, count, self.generator)


class ClsAttentionTopK:
    """EViT's rule: keep the live tokens the class token attends to most.

    Args:
        keep_ratio: fraction in (0, 1] of the live tokens kept (rounded half up, at least one).
    """

    def __init__(self, keep_ratio: float) -> None:
        self.keep_ratio = check_keep_ratio(keep_ratio)

    def act(self, obs: Mapping[str, Any], *, deterministic: bool = True, keep_ratio: float | None = None) -> Tensor:
        """The top tokens by ``obs["cls_attn"]`` (B, N) bool; ``keep_ratio`` overrides the constructor's."""
        live = live_mask(obs)
        if "cls_attn" not in obs:
            raise ValueError("ClsAttentionTopK reads obs['cls_attn']: add 'cls_attn' to the env's obs_keys")
        attn = obs_tensor(obs, "cls_attn", live.device)
        if attn.shape != live.shape:
            raise ValueError(f"obs['cls_attn'] must be {tuple(live.shape)} as obs['live'], got {tuple(attn.shape)}")
        return top_k_live(attn, live, self.keep_ratio if keep_ratio is None else keep_ratio)


class DitherGrid:
    """Keep the live tokens of the lowest ordered-dither rank (``apt_env.models.tokens.dither_rank``) at every stage: an
    evenly spread subset of the image, the same in every image (a stride grid at any count). On small patches
    neighbouring tokens carry much the same pixels, and spreading the kept ones over the image is what random
    pruning does by chance and a score's top-k does not.

    Args:
        keep_ratio: fraction in (0, 1] of the live tokens kept (rounded half up, at least one).
        grid: the (H, W) patch grid, e.g. ``pv.grid_size``.
    """

    def __init__(self, keep_ratio: float, grid: tuple[int, int]) -> None:
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.score = -dither_rank(tuple(grid))

    def act(self, obs: Mapping[str, Any], *, deterministic: bool = True, keep_ratio: float | None = None) -> Tensor:
        """The grid's live tokens (B, N) bool; ``keep_ratio`` overrides the constructor's."""
        live = live_mask(obs)
        if live.shape[1] != len(self.score):
            have = live.shape[1]
            raise ValueError(f"DitherGrid is for a grid of {len(self.score)} patches, the observation has {have}")
        if self.score.device != live.device:  # moved once, where the policy runs
            self.score = self.score.to(live.device)
        return top_k_live(self.score.expand(live.shape), live, self.keep_ratio if keep_ratio is None else keep_ratio)
