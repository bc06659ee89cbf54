"""The environment's arguments checked before anything is built: each error says what was wrong and what is valid."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from apt_env.envs.episodes import REWARDS
from apt_env.envs.observe import BUDGET_KEYS, CHANNELS, LEGACY_LIVE, OBS_KEYS
from apt_env.models.backbone import LAYOUTS

_logger = logging.getLogger(__name__)

__all__ = ["EnvArguments", "budget_range", "check_choice", "check_device", "check_env_arguments", "check_finite"]


def check_choice(name: str, value: Any, valid: Sequence[Any]) -> None:
    """A ValueError listing ``valid`` unless ``value`` is one of them."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(str, valid))}")


def check_names(name: str, values: Any) -> tuple:
    """A sequence argument of names (``channels``, ``obs_keys``) as a tuple; a lone string is an error."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of names, got {values!r}")
    return tuple(values)


def check_finite(name: str, value: Any) -> float:
    """``value`` as a float; a bool, a non-number, NaN or an infinity is a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {name}={value!r}")
    return float(value)


def budget_range(budget: float | tuple[float, float] | None) -> tuple[float, float] | None:
    """``(low, high)`` from the env's ``budget`` argument (a fraction, or a range of them), checked."""
    if budget is None:
        return None
    what = "a fraction of the dense backbone's GFLOPs in (0, 1], or a range (low, high) of them"
    if isinstance(budget, (int, float, np.floating, np.integer)) and not isinstance(budget, bool):
        low = high = float(budget)
    elif isinstance(budget, (str, bytes, Mapping)):  # iterable, but not a range
        raise ValueError(f"budget must be {what}, got budget={budget!r}")
    else:
        try:
            low, high = (float(v) for v in budget)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(f"budget must be {what}, got budget={budget!r}") from None
    if not (0.0 < low <= 1.0 and 0.0 < high <= 1.0):
        raise ValueError(f"budget must be {what}, got budget={budget!r}")
    if low > high:
        raise ValueError(f"a budget range (low, high) needs low <= high, got budget={budget!r}")
    return low, high


def check_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` that holds data; an unknown or absent one fails here, not inside the model."""
    try:
        out = torch.device(device)
        torch.empty(0, device=out)
    except (RuntimeError, TypeError, AssertionError) as err:
        raise ValueError(f"device {device!r} cannot be used: {err}") from None
    if out.type == "meta":
        raise ValueError("device 'meta' holds no data: pass a device that computes, such as 'cpu' or 'cuda'")
    return out


@dataclass(frozen=True)
class EnvArguments:
    """The env's arguments that need no model, checked and normalized by ``check_env_arguments``."""

    num_envs: int
    channels: tuple[str, ...]
    obs_keys: tuple[str, ...]
    """The keys asked for, with the budget keys added when there is a budget."""
    budget_range: tuple[float, float] | None
    flops_weight: float
    budget_weight: float
    """0 without a budget: there is nothing to be over."""
    device: torch.device


def check_env_arguments(
    *,
    num_envs: Any,
    dataset: Any,
    reward: Any,
    layout: Any,
    fuse: Any,
    channels: Any,
    obs_keys: Any,
    budget: Any,
    flops_weight: Any,
    budget_weight: Any,
    device: Any,
    render_mode: Any,
    render_modes: Sequence[str],
) -> EnvArguments:
    """Check ``APTPruneVectorEnv``'s arguments that need no model (see its docstring for their meaning)."""
    check_choice("reward", reward, REWARDS)
    check_choice("layout", layout, LAYOUTS)
    check_choice("render_mode", render_mode, (None, *render_modes))
    if not isinstance(fuse, bool):
        raise ValueError(f"fuse must be True or False, got {fuse!r}")
    channels, obs_keys = check_names("channels", channels), check_names("obs_keys", obs_keys)
    if LEGACY_LIVE in obs_keys:
        _logger.warning("obs_keys: %r is now 'live' (the tokens still alive; a keep mask is the action)", LEGACY_LIVE)
        obs_keys = tuple("live" if key == LEGACY_LIVE else key for key in obs_keys)
    for c in channels:
        check_choice("channel", c, CHANNELS)
    budgets = budget_range(budget)
    for key in obs_keys:
        if key in BUDGET_KEYS and budgets is None:
            raise ValueError(f"observation key {key!r} needs a budget: pass budget= to the env")
        check_choice("observation key", key, OBS_KEYS + BUDGET_KEYS)
    flops_weight = check_finite("flops_weight", flops_weight)
    if check_finite("budget_weight", budget_weight) < 0.0:
        raise ValueError(f"budget_weight must be a non-negative weight, got budget_weight={budget_weight!r}")
    if budgets is not None:
        obs_keys = (*obs_keys, *(key for key in BUDGET_KEYS if key not in obs_keys))
    if isinstance(num_envs, bool) or not isinstance(num_envs, numbers.Integral) or num_envs < 1:
        raise ValueError(f"num_envs must be an integer of at least 1, got {num_envs!r}")
    if not isinstance(dataset, str):
        raise ValueError(f"dataset must be a dataset name such as 'fashion-mnist', got {dataset!r}")
    return EnvArguments(
        num_envs=int(num_envs),
        channels=channels,
        obs_keys=obs_keys,
        budget_range=budgets,
        flops_weight=flops_weight,
        budget_weight=float(budget_weight) if budgets is not None else 0.0,
        device=check_device(device),
    )
