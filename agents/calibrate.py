"""Thresholds that make a ``"threshold"`` agent meet mean budgets, calibrated on held-out images.

A ``"threshold"`` agent keeps the tokens whose logit exceeds ``s(b)``: a rule for one image at a time, so
batch 1 decides as a batch does. The mean GFLOPs it spends at budget ``b`` fall as ``s`` rises, so for each
budget of a grid a bisection finds the ``s`` at which the backbone's mean GFLOPs over the calibration
images are ``b`` times the dense model's; between budgets ``s`` is interpolated linearly. The result is
stored with the agent (``APTPolicy.calibration``) with the backbone's digest and the calibration split, so
that it is not used on another backbone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from agents.policy import APTPolicy
from apt_env.backbone import PrunableViT
from apt_env.data import dataset_for
from apt_env.distributed import state_digest
from apt_env.evaluate import forward_policy
from apt_env.flops import FlopCounter
from apt_env.observe import BUDGET_KEYS, OBS_KEYS

__all__ = ["calibrate_on_val", "calibrate_thresholds", "check_calibrated_for", "mean_gflops_fraction"]

_logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _fixed_threshold(policy: APTPolicy, budget: float, shift: float) -> Iterator[None]:
    """The policy with one threshold ``shift`` at ``budget``, its own calibration restored after."""
    saved = policy.calibration
    policy.calibration = {"budgets": [budget], "shifts": [shift]}
    try:
        yield
    finally:
        policy.calibration = saved


@torch.inference_mode()
def mean_gflops_fraction(
    policy: APTPolicy, pv: PrunableViT, images: Tensor, budget: float, *, batch_size: int = 1000
) -> float:
    """The backbone's mean GFLOPs over ``images`` under ``policy``'s deterministic decisions at ``budget``,
    as a fraction of the dense model's."""
    counter = FlopCounter(pv.model)
    keys = (*OBS_KEYS, *BUDGET_KEYS)
    total = 0.0
    for chunk in images.split(batch_size):
        _, kept, _ = forward_policy(pv, chunk, lambda obs: policy.act(obs), obs_keys=keys, budget=budget)
        total += float(counter(kept + pv.num_prefix_tokens).sum())
    return total / len(images) / counter.dense()


def calibrate_thresholds(
    policy: APTPolicy,
    pv: PrunableViT,
    images: Tensor,
    budgets: Sequence[float],
    *,
    iters: int = 18,
    bound: float = 16.0,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The calibration ``{"budgets", "shifts", "achieved", **meta}`` of a ``"threshold"`` policy on ``images``.

    Args:
        policy: an agent with ``sampling="threshold"`` and budgets.
        pv: the backbone it decides for, in eval mode on the images' device.
        images: the calibration images (a held-out split, never the test split), preprocessed.
        budgets: the grid of budgets, increasing, in (0, 1].
        iters: bisection steps per budget over shifts in ``[-bound, bound]``.
        meta: facts stored beside, e.g. the backbone's digest and the split.
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
        low, high = -bound, bound  # a higher threshold keeps fewer tokens: the fraction falls
        for _ in range(iters):
            mid = (low + high) / 2
            with _fixed_threshold(policy, budget, mid):
                used = mean_gflops_fraction(policy, pv, images, budget)
            low, high = (mid, high) if used > budget else (low, mid)
        shift = (low + high) / 2
        with _fixed_threshold(policy, budget, shift):
            achieved.append(mean_gflops_fraction(policy, pv, images, budget))
        shifts.append(shift)
        if abs(achieved[-1] - budget) > 0.02 * budget:  # e.g. below what the dense blocks before the first stage cost
            _logger.warning("budget %.3f is not reachable by a threshold: %.4f of dense at best", budget, achieved[-1])
        _logger.info("budget %.3f: threshold %.4f, mean GFLOPs %.4f of dense", budget, shift, achieved[-1])
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
