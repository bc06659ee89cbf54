"""From keep scores to keep masks: the highest-scoring live tokens (a ratio or a count of them), and Gumbel-top-k,
the Plackett-Luce sampling of a count of tokens without replacement (Kool et al., "Stochastic Beams and Where to
Find Them", 2019), with the surrogates of its log-probability and entropy that PPO trains on.

The functions work on (B, N) tensors: ``scores``/``logits`` float, ``live`` bool (the tokens that may be kept),
``count`` (B,); every mask returned is a subset of ``live``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from apt_env.models.tokens import top_count

_ABSENT = 1e4
"""How far below a row's lowest logit the Plackett-Luce terms put tokens that cannot be picked:
``exp(-1e4)`` is 0 in float32, and finite values keep the gradients of ``logcumsumexp`` finite."""


def check_keep_ratio(keep_ratio: Any) -> float:
    """``keep_ratio`` as a float in (0, 1], else a ValueError."""
    try:
        ratio = math.nan if isinstance(keep_ratio, (str, bytes)) else float(keep_ratio)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
        ratio = math.nan
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep_ratio must be a fraction in (0, 1], got {keep_ratio!r}")
    return ratio


def top_k_live(scores: Tensor, live: Tensor, keep_ratio: float) -> Tensor:
    """Keep the highest-scoring ``keep_ratio`` of each row's live tokens (at least one).

    Args:
        scores: (B, N) float, higher is kept first.
        live: (B, N) bool, the tokens that may be kept.
        keep_ratio: fraction in (0, 1] of the live count, rounded half up.

    Returns:
        (B, N) bool keep mask, a subset of ``live``.
    """
    return top_count(scores, live, ratio_count(live, keep_ratio))


def ratio_count(live: Tensor, keep_ratio: float) -> Tensor:
    """Tokens kept per row at ``keep_ratio`` (in (0, 1]) of its live ones: rounded half up, at least one.
    # live: (B, N) bool -> (B,) float"""
    ratio = check_keep_ratio(keep_ratio)
    return torch.floor(live.sum(1, dtype=torch.float32) * ratio + 0.5).clamp(min=1)


def top_count_live(scores: Tensor, live: Tensor, count: Tensor) -> Tensor:
    """Keep each row's ``count`` (B,) highest-scoring live tokens, rounded half up, at least one."""
    return top_count(scores, live, torch.floor(count + 0.5).clamp(min=1))


def gumbel_noise(shape: Sequence[int], generator: torch.Generator | None = None, device: Any = None) -> Tensor:
    """Standard Gumbel noise of ``shape`` (float32)."""
    u = torch.rand(tuple(shape), generator=generator, device=device).clamp_(min=1e-20)
    return -torch.log(-torch.log(u))


def gumbel_top_count(
    logits: Tensor,
    live: Tensor,
    count: Tensor,
    generator: torch.Generator | None = None,
    *,
    gumbel: Tensor | None = None,
) -> Tensor:
    """Sample ``count`` (B,) live tokens per row without replacement, with probabilities ``softmax(logits)``
    at each pick (Plackett-Luce), by perturbing the logits with Gumbel noise and keeping the top ones.

    ``gumbel`` (broadcastable to (B, N)): this noise instead of a fresh draw. One fixed draw per patch position
    makes the sample a deterministic rule of the image alone (the same at batch 1 as in any batch) whose every
    mask is still, position by position, a sample of the distribution.

    Returns:
        (B, N) bool keep mask, a subset of ``live`` with ``min(count, live)`` tokens per row.
    """
    gumbel = gumbel_noise(logits.shape, generator, logits.device) if gumbel is None else gumbel.to(logits.device)
    return top_count_live(logits.detach().float() + gumbel, live, count.float()) & (count > 0).unsqueeze(1)


def _sequential_logsumexp(logits: Tensor, live: Tensor, first: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sort each row for sequential picks: the ``first`` tokens by descending logit, then the other live
    ones, then the rest pushed ``_ABSENT`` below the row's lowest logit.

    Returns:
        the sorted logits (B, N), ``lse[:, j]`` = logsumexp of sorted positions ``>= j`` (what is left
        to pick from after ``j`` picks), and whether each sorted position is live (B, N) bool.
    """
    z = logits.float()
    low = z.detach().amin(1, keepdim=True) - _ABSENT
    key = torch.where(first, z.detach(), torch.where(live, low, 2 * low))  # picks, then live, then absent
    order = key.argsort(dim=1, descending=True, stable=True)
    zs = z.masked_fill(~live, 0.0).gather(1, order)
    live_sorted = live.gather(1, order)
    zs = torch.where(live_sorted, zs, low)
    lse = torch.logcumsumexp(zs.flip(1), dim=1).flip(1)
    return zs, lse, live_sorted


def plackett_luce_log_prob(logits: Tensor, live: Tensor, keep: Tensor) -> Tensor:
    """A consistent surrogate for the log-probability of the *set* ``keep`` under Gumbel-top-k sampling.

    The exact probability of a set of ``m`` tokens sums the Plackett-Luce probabilities of its ``m!``
    orders. The surrogate is the log-probability of one of them, the most likely: the set in
    descending logit order, ``sum_j [l_(j) - logsumexp(l over the live tokens not yet picked)]``.
    It is a lower bound of the exact value, equal when ``m <= 1``, and a function of the set alone,
    so sampling time and PPO's re-evaluation of a stored action agree exactly.

    Args:
        logits: (B, N) float.
        live: (B, N) bool, the tokens that can be picked.
        keep: (B, N) bool or 0/1, the set (only its live tokens count).

    Returns:
        (B,) float log-probability surrogate.
    """
    picks = keep.bool() & live
    zs, lse, _ = _sequential_logsumexp(logits, live, picks)
    taken = torch.arange(zs.shape[1], device=zs.device) < picks.sum(1, keepdim=True)  # (B, N)
    return torch.where(taken, zs - lse, torch.zeros_like(zs)).sum(1)


def plackett_luce_entropy(logits: Tensor, live: Tensor, count: Tensor) -> Tensor:
    """A surrogate of the entropy of Gumbel-top-k with ``count`` (B,) picks: the sum over the picks of
    the entropy of the pick distribution (softmax over the live tokens not yet picked), along the most
    likely order (descending logits). It is 0 for a deterministic policy and grows with the spread of
    the logits; it depends on the distribution only, not on an action.

    Returns:
        (B,) float.
    """
    mode = top_count_live(logits.detach(), live, count.float()) & (count > 0).unsqueeze(1)
    zs, lse, live_sorted = _sequential_logsumexp(logits, live, mode)
    # Entropy of pick j: lse_j - E_j[z], with E_j[z] from a second logcumsumexp of z + log(z - c + 1),
    # c the lowest live logit, so that every term is well defined and nothing cancels badly.
    c = zs.detach().masked_fill(~live_sorted, math.inf).amin(1, keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    shifted = (zs - c).clamp(min=0) + 1
    weighted = torch.where(live_sorted, zs + shifted.log(), zs)
    lse_weighted = torch.logcumsumexp(weighted.flip(1), dim=1).flip(1)
    mean_z = (lse_weighted - lse).exp() + c - 1
    taken = torch.arange(zs.shape[1], device=zs.device) < mode.sum(1, keepdim=True)
    return torch.where(taken, lse - mean_z, torch.zeros_like(zs)).sum(1)


def interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """``numpy.interp`` in torch: piecewise-linear through ``(xp, fp)`` (``xp`` increasing), constant beyond. ``fp``
    may have rows, (J, ...): each ``x`` then gets the interpolated row, ``x.shape + fp.shape[1:]``."""
    if len(xp) == 1:
        return fp[0].expand(*x.shape, *fp.shape[1:]).clone()
    x = x.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    w = ((x - xp[i - 1]) / (xp[i] - xp[i - 1])).reshape(*x.shape, *[1] * (fp.dim() - 1))
    return fp[i - 1] + w * (fp[i] - fp[i - 1])
