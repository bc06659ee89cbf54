"""Thresholds that make a ``"threshold"`` agent meet mean budgets, calibrated on held-out images.

A ``"threshold"`` agent keeps the tokens whose logit exceeds ``s_k(b)`` at stage ``k``: a rule for one image at a
time, so batch 1 decides as a batch does. For each budget of a grid the thresholds are read, stage after stage, off
the sorted logits of the calibration images so that each stage keeps the fixed-count schedule's mean count; then
one common offset, found by bisection, makes the backbone's mean GFLOPs ``b`` times the dense model's. Between
budgets the thresholds are interpolated linearly. The result is
stored with the agent (``APTPolicy.calibration``) with the backbone's digest and the calibration split, so
that it is not used on another backbone.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from agents.fused import static_counts
from agents.observation import live_mask
from agents.policy import APTPolicy
from apt_env.data.datasets import dataset_for
from apt_env.envs.observe import BUDGET_KEYS, OBS_KEYS
from apt_env.eval.evaluate import forward_policy
from apt_env.models.backbone import PrunableViT
from apt_env.models.flops import FlopCounter
from apt_env.train.distributed import state_digest

__all__ = ["calibrate_on_val", "calibrate_thresholds", "check_calibrated_for", "mean_gflops_fraction", "spend"]

_logger = logging.getLogger(__name__)

_KEYS = (*OBS_KEYS, *BUDGET_KEYS)
"""What a budget agent observes."""


@contextlib.contextmanager
def _fixed_threshold(policy: APTPolicy, budget: float, shift: float | list[float]) -> Iterator[None]:
    """The policy with one threshold ``shift`` (or one per stage) at ``budget``, its own calibration restored after."""
    saved = policy.calibration
    policy.calibration = {"budgets": [budget], "shifts": [shift]}
    try:
        yield
    finally:
        policy.calibration = saved


@torch.inference_mode()
def spend(
    policy: APTPolicy, pv: PrunableViT, images: Tensor, budget: float, *, batch_size: int = 256
) -> tuple[Tensor, float]:
    """What ``policy``'s deterministic decisions at ``budget`` spend over ``images``: the mean patch tokens kept at
    each stage (K,) float64, and the backbone's mean GFLOPs as a fraction of the dense model's."""
    counter = FlopCounter(pv.model)
    flops, counts = 0.0, torch.zeros(pv.num_stages, dtype=torch.float64)
    for chunk in images.split(batch_size):
        _, kept, masks = forward_policy(pv, chunk, policy.act, obs_keys=_KEYS, budget=budget)
        flops += float(counter(kept + pv.num_prefix_tokens).sum())
        counts += masks.sum(2).sum(0).double().cpu()
    return counts / len(images), flops / len(images) / counter.dense()


def mean_gflops_fraction(
    policy: APTPolicy, pv: PrunableViT, images: Tensor, budget: float, *, batch_size: int = 256
) -> float:
    """The backbone's mean GFLOPs over ``images`` under ``policy``'s deterministic decisions at ``budget``,
    as a fraction of the dense model's."""
    return spend(policy, pv, images, budget, batch_size=batch_size)[1]


@torch.inference_mode()
def stage_logits(
    policy: APTPolicy, pv: PrunableViT, images: Tensor, budget: float, stage: int, *, batch_size: int = 256
) -> Tensor:
    """The live tokens' keep logits at ``stage`` (B, N), ``-inf`` at the tokens pruned before it, under ``policy``'s
    deterministic decisions at ``budget``."""
    out = []

    def keep(obs: dict[str, Tensor]) -> Tensor:
        logits = policy.keep_logits(obs)
        live = live_mask(obs, logits.device)
        if int(obs["stage"][0]) == stage:
            out.append(logits.masked_fill(~live, -math.inf).float().cpu())
        return policy.mode(logits, live, obs)

    for chunk in images.split(batch_size):
        forward_policy(pv, chunk, keep, obs_keys=_KEYS, budget=budget)
    return torch.cat(out)


def _count_threshold(logits: Tensor, count: float) -> float:
    """The threshold that keeps ``count`` tokens per image on average of ``logits`` (B, N): halfway between the
    ``B * count``-th highest logit and the next."""
    ranked = logits.flatten().sort(descending=True).values
    ranked = ranked[torch.isfinite(ranked)]
    k = round(count * len(logits))
    if k >= len(ranked):
        return float(ranked[-1]) - 1.0
    if k <= 0:
        return float(ranked[0]) + 1.0
    return float(ranked[k - 1] + ranked[k]) / 2


def _bisect(
    measure: Callable[[float], float], target: float, *, bound: float, iters: int, tolerance: float
) -> tuple[float, float]:
    """The shift in ``[-bound, bound]`` whose ``measure`` (falling as the shift rises) comes closest to ``target``, and
    that measure: bisection, stopped once within ``tolerance * target``."""
    low, high = -bound, bound
    best = (math.inf, 0.0, math.nan)  # (distance to the target, shift, measure): the closest tried
    for _ in range(iters):
        mid = (low + high) / 2
        got = measure(mid)
        best = min(best, (abs(got - target), mid, got))
        if best[0] <= tolerance * target:
            break
        low, high = (mid, high) if got > target else (low, mid)
    return best[1], best[2]


def calibrate_thresholds(
    policy: APTPolicy,
    pv: PrunableViT,
    images: Tensor,
    budgets: Sequence[float],
    *,
    iters: int = 18,
    bound: float = 16.0,
    tolerance: float = 0.002,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The calibration ``{"budgets", "shifts", "achieved", **meta}`` of a ``"threshold"`` policy on ``images``.

    Args:
        policy: an agent with ``sampling="threshold"`` and budgets.
        pv: the backbone it decides for, in eval mode on the images' device.
        images: the calibration images (a held-out split, never the test split), preprocessed.
        budgets: the grid of budgets, increasing, in (0, 1].
        iters: the most bisection steps per threshold over shifts in ``[-bound, bound]``.
        tolerance: stop a bisection once within this fraction of its target.
        meta: facts stored beside, e.g. the backbone's digest and the split.

    One threshold per stage, stage after stage, so that the mean count kept at each stage is the fixed-count
    schedule's at that budget (``agents.fused.static_counts``): the images share the budget's compute unevenly, its
    stages as a fixed-count agent does. Then one common offset meets the GFLOPs (the attention's cost grows faster
    than the count). The only calibration: both training scripts and the benchmarks call it.
    """
    if policy.sampling != "threshold" or not policy.use_budget:
        raise ValueError(
            f"thresholds are calibrated for an agent with sampling='threshold' and budgets, not "
            f"sampling={policy.sampling!r}, use_budget={policy.use_budget}"
        )
    budgets = [float(b) for b in budgets]
    if not budgets or any(not 0.0 < b <= 1.0 for b in budgets) or budgets != sorted(set(budgets)):
        raise ValueError(f"calibration budgets must be increasing fractions in (0, 1], got {budgets}")
    shifts, achieved = [], []
    for budget in budgets:

        def gflops(shift: float | list[float]) -> float:
            with _fixed_threshold(policy, budget, shift):
                return spend(policy, pv, images, budget)[1]

        if budget >= 1.0:  # the dense model's compute: every token kept, at every stage
            shift = [-bound] * pv.num_stages
            used = gflops(shift)
        else:
            stage_shifts = [-bound] * pv.num_stages  # stages not yet calibrated keep every live token
            for stage, count in enumerate(static_counts(pv, budget)):
                stage_shifts[stage] = 0.0  # the raw logits at this stage, the earlier ones calibrated
                with _fixed_threshold(policy, budget, stage_shifts):
                    logits = stage_logits(policy, pv, images, budget, stage)
                stage_shifts[stage] = _count_threshold(logits, count)
            offset, used = _bisect(
                lambda d: gflops([s + d for s in stage_shifts]), budget, bound=1.0, iters=iters, tolerance=tolerance
            )
            shift = [s + offset for s in stage_shifts]
        shifts.append(shift)
        achieved.append(used)
        if abs(achieved[-1] - budget) > 0.02 * budget:  # e.g. below what the dense blocks before the first stage cost
            _logger.warning("budget %.3f is not reachable by a threshold: %.4f of dense at best", budget, achieved[-1])
        _logger.info("budget %.3f: threshold %s, mean GFLOPs %.4f of dense", budget, shift, achieved[-1])
    return {"budgets": budgets, "shifts": shifts, "achieved": achieved, "images": len(images), **(meta or {})}


def calibrate_on_val(
    policy: APTPolicy,
    pv: PrunableViT,
    *,
    dataset: str,
    budget_range: tuple[float, float],
    root: str = "data",
    images: int = 1000,
    knots: int = 7,
) -> dict[str, Any]:
    """``calibrate_thresholds`` on the first ``images`` of ``dataset``'s val split, at ``knots`` budgets evenly over
    ``budget_range``, recording the backbone's digest (``check_calibrated_for`` compares it)."""
    val = dataset_for(pv, dataset, "val", root=root)
    device = next(pv.parameters()).device
    x = torch.stack([val[i][0] for i in range(min(images, len(val)))]).to(device)
    low, high = budget_range
    budgets = sorted({round(low + (high - low) * i / max(1, knots - 1), 4) for i in range(knots)})
    meta = {"backbone": state_digest(pv.model), "split": "val", "dataset": dataset}
    return calibrate_thresholds(policy.eval(), pv, x, budgets, iters=12, meta=meta)


def check_calibrated_for(policy: APTPolicy, *, backbone: str, budgets: Sequence[float]) -> None:
    """A ``"threshold"`` agent's calibration must be for this backbone (its digest) and cover ``budgets``."""
    cal = policy.calibration
    if policy.sampling != "threshold":
        return
    if cal is None:
        raise ValueError("this agent keeps tokens above a threshold but was never calibrated: run calibration first")
    if cal.get("backbone") is not None and cal["backbone"] != backbone:
        raise ValueError(
            f"the agent's thresholds were calibrated on backbone {cal['backbone']}, this one is {backbone}"
        )
    outside = [b for b in budgets if not cal["budgets"][0] - 1e-9 <= b <= cal["budgets"][-1] + 1e-9]
    if outside:
        raise ValueError(
            f"budgets {outside} lie outside the calibrated range [{cal['budgets'][0]}, {cal['budgets'][-1]}]"
        )
