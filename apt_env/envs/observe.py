"""What a pruning policy sees and how its decisions are applied, shared by the env, joint training and evaluation.

A policy is a ``KeepFn``: ``keep_fn(obs) -> (B, N) bool`` on a batched observation of ``APTPrune-v0``
(``observe``). ``walk`` is the one stage walk: observe, decide, prune, run to the next stage. Budgets are
observed through ``BudgetKeepRatio``, the per-stage keep ratio whose GFLOPs are nearest a budget. None of
this needs the Gymnasium env, so training and evaluation build observations without importing it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from apt_env.models.backbone import Layout, PrunableViT
from apt_env.models.flops import FlopCounter
from apt_env.models.tokens import TokenState, keep_count, live_mean

OBS_KEYS: tuple[str, ...] = ("tokens", "cls", "cls_attn", "live", "stage")
LEGACY_LIVE = "keep"
"""The live mask's old name (docs/environment.md, Version History): a keep mask is the action."""
BUDGET_KEYS: tuple[str, ...] = ("budget", "keep_count")
"""Observed exactly when the env has a budget (``budget=``), in addition to ``obs_keys``."""
BUDGET_RESOLUTION = 4096
"""Keep ratios tried per budget, as in ``apt_env.eval.evaluate.budget_keep_ratio``."""
CHANNELS: tuple[str, ...] = ("plain", "single", "multi")
"""The original method's three channels: no pruning, one stage's action alone, every action so far."""

KeepFn = Callable[[dict[str, Tensor]], Tensor]
"""``keep_fn(obs)``: the keep mask (B, N) bool for a batched observation (tensors); pruned tokens are never
kept. The agent and the baselines are one through their ``act`` method (``agents.policy.TokenPolicy``)."""


def as_tensor(value: Any, what: str, device: torch.device | str | None = None) -> Tensor:
    """``value`` as a dense tensor on ``device`` (None: where it is): a tensor, or a numpy array or nested lists of
    numbers in any dtype, byte order and strides. Anything else is a ValueError that names ``what``."""
    if isinstance(value, Tensor):
        if value.layout != torch.strided or value.is_meta:
            raise ValueError(f"{what} must be a dense tensor with data, got layout {value.layout} on {value.device}")
        if value.is_complex():
            raise ValueError(f"{what} must be real numbers, got dtype {value.dtype}")
        return value.to(device)
    try:
        arr = np.asarray(value)
    except ValueError:  # nested sequences of different lengths
        raise ValueError(f"{what} must be an array of numbers, got a ragged {type(value).__name__}") from None
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{what} must be real numbers, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 8:
        arr = arr.astype(np.float64)  # torch has no long double
    if not arr.dtype.isnative or not arr.flags.writeable or any(s < 0 for s in arr.strides):
        arr = np.array(arr, dtype=arr.dtype.newbyteorder("="))  # a copy torch can share: native, C order
    return torch.from_numpy(arr).to(device)


class BudgetKeepRatio:
    """The uniform per-stage keep ratio whose backbone GFLOPs are closest to a budget, for many budgets at once.

    The counting of ``apt_env.eval.evaluate.budget_keep_ratio``, tabulated once: at every stage a row keeps
    ``floor(live * ratio + 0.5)`` of its live patch tokens, at least ``max(1, min_keep)`` and at most all
    of them (``keep_count``), and the ratio whose dense-relative FLOPs are nearest the budget wins.

    Args:
        pv: the backbone (its geometry, pruning points and ``min_keep``).
        flops: its ``FlopCounter``; built here when ``None``.
        resolution: keep ratios tried, ``1/resolution`` to 1.
    """

    def __init__(self, pv: PrunableViT, flops: FlopCounter | None = None, resolution: int = BUDGET_RESOLUTION):
        counter = FlopCounter(pv.model) if flops is None else flops
        self.ratios = torch.arange(1, resolution + 1, dtype=torch.float64) / resolution  # (R,)
        live = torch.full_like(self.ratios, pv.num_patches)
        bounds = pv.stage_bounds
        kept = [live.unsqueeze(1).expand(-1, bounds[1])]
        for stage in range(pv.num_stages):
            live = keep_count(live, self.ratios, pv.min_keep)
            kept.append(live.unsqueeze(1).expand(-1, bounds[stage + 2] - bounds[stage + 1]))
        self.fractions = counter(torch.cat(kept, 1).long() + pv.num_prefix_tokens) / counter.dense()  # (R,)

    def __call__(self, budget: torch.Tensor) -> torch.Tensor:
        """Keep ratios (B,) float64 for budgets (B,), on the budgets' device."""
        gap = (self.fractions.unsqueeze(0) - budget.detach().cpu().double().unsqueeze(1)).abs()  # (B, R)
        return self.ratios[gap.argmin(1)].to(budget.device)


def observe(
    pv: PrunableViT,
    state: TokenState,
    cls_attn: torch.Tensor | None,
    stage: int,
    keys: Sequence[str] = OBS_KEYS,
    *,
    budget: torch.Tensor | None = None,
    keep_ratio: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The observation of ``state`` (the tokens entering stage ``stage``), only the requested keys.

    Every tensor is new: editing it leaves ``state`` and ``cls_attn`` as they are.

    Args:
        pv: the backbone.
        state: tokens entering block ``pv.prune_layers[stage]``.
        cls_attn: class attention in the block before, at the original positions (B, N); needed
            only for the ``cls_attn`` key.
        stage: the stage index.
        keys: which keys to compute, from ``OBS_KEYS`` and ``BUDGET_KEYS``.
        budget: each row's budget (B,); needed only for the ``budget`` key.
        keep_ratio: each row's per-stage keep ratio for its budget (B,), ``BudgetKeepRatio(pv)(budget)``;
            needed only for the ``keep_count`` key.
    """
    n = pv.num_patches
    obs: dict[str, torch.Tensor] = {}
    if "tokens" in keys:
        obs["tokens"] = state.patch_features(n).float()
    if "cls" in keys:
        if pv.has_cls_token:
            obs["cls"] = state.x[:, 0].to(torch.float32, copy=True)  # not a view of the episode state
        else:
            obs["cls"] = live_mean(state.patches, state.live).float()
    if "cls_attn" in keys:
        if cls_attn is None:
            raise ValueError("the cls_attn observation needs the class attention of the block before the stage")
        obs["cls_attn"] = cls_attn.to(torch.float32, copy=True)
    if "live" in keys:
        obs["live"] = state.mask(n).to(torch.int8)
    if "stage" in keys:
        obs["stage"] = torch.full((state.x.shape[0],), stage, dtype=torch.int64, device=state.x.device)
    if "budget" in keys:
        if budget is None:
            raise ValueError("the budget observation needs each row's budget")
        obs["budget"] = budget.to(torch.float32, copy=True).reshape(-1, 1)
    if "keep_count" in keys:
        if keep_ratio is None:
            raise ValueError("the keep_count observation needs each row's keep ratio for its budget")
        count = keep_count(state.num_kept(), keep_ratio.to(state.x.device), pv.min_keep)
        obs["keep_count"] = count.to(torch.int64).reshape(-1, 1)
    return obs


def walk(
    pv: PrunableViT,
    state: TokenState,
    cls_attn: torch.Tensor | None,
    keep_fn: KeepFn,
    *,
    keys: Sequence[str],
    layout: Layout,
    budget: torch.Tensor | None = None,
    keep_ratio: torch.Tensor | None = None,
    start: int = 0,
    fuse: bool = False,
) -> Iterator[TokenState]:
    """Prune at every stage from ``start`` on with ``keep_fn``'s decisions, from the tokens entering stage ``start``.

    At each stage: observe (``keys``; ``budget`` and ``keep_ratio`` as in ``observe``), ask ``keep_fn`` (no
    gradient: a decision is not differentiated), prune, yield; then run to the next stage with
    ``pv.advance_to_stage``, taking the class attention on the way when ``keys`` has ``cls_attn``.

    Args:
        state, cls_attn: the tokens entering stage ``start`` and their class attention, e.g. from
            ``pv.advance_to_stage(pv.embed(images), 0, ...)``.
        fuse: EViT's fused token: the tokens pruned at each stage fused into one, weighted by the class attention
            (``PrunableViT.prune``'s ``fuse_attn``), which is then taken at every stage whatever ``keys`` ask.

    Yields:
        the tokens after each stage's pruning; the last one finishes with
        ``pv.finish(state, pv.prune_layers[-1])``.
    """
    take_attn = "cls_attn" in keys or fuse
    for stage in range(start, pv.num_stages):
        with torch.no_grad():
            keep = keep_fn(observe(pv, state, cls_attn, stage, keys, budget=budget, keep_ratio=keep_ratio))
        state = pv.prune(state, keep, layout, fuse_attn=cls_attn if fuse else None)
        yield state
        if stage + 1 < pv.num_stages:
            state, cls_attn = pv.advance_to_stage(state, stage + 1, take_attn=take_attn)
