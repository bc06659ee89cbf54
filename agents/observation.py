"""Observations in the agents' terms: the env's dict of batched arrays read as checked tensors.

``obs_tensor`` reads one key, ``live_mask`` the tokens still alive, ``keep_counts`` a budget's token count, and
``read_batch`` a whole observation as the APT policy sees it (``Batch``). Numpy arrays, tensors and SB3's
preprocessed observations are all accepted; anything else is an error that names the key and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from apt_env.envs.observe import LEGACY_LIVE, as_tensor

TOPK_NEEDS_BUDGET = (
    "sampling='topk' keeps obs['keep_count'] tokens, which only an env with a budget observes: pass budget= "
    "to the env, or use sampling='bernoulli'"
)


@dataclass
class Batch:
    """An observation in the policy's own terms (see ``read_batch``)."""

    tokens: Tensor  # (B, N, C) float
    cls: Tensor  # (B, C) float
    cls_attn: Tensor | None  # (B, N) float
    live: Tensor  # (B, N) bool
    stage: Tensor  # (B,) long
    budget: Tensor | None = None  # (B, 1) float


def obs_tensor(obs: Mapping[str, Any], key: str, device: torch.device | str | None = None) -> Tensor:
    """``obs[key]`` as a tensor on ``device``; an observation that is not a dict, lacks ``key`` or holds something
    other than numbers there is a clear error."""
    if not isinstance(obs, Mapping):
        raise TypeError(f"an observation is a dict of batched arrays, as the env returns, got {type(obs).__name__}")
    if key not in obs:
        raise ValueError(f"the observation has no {key!r} (it has {list(obs)}): add {key!r} to the env's obs_keys")
    return as_tensor(obs[key], f"obs[{key!r}]", device)


def live_mask(obs: Mapping[str, Any], device: torch.device | str | None = None) -> Tensor:
    """The tokens still alive, (B, N) bool, from ``obs["live"]`` (int8, float or bool); ``obs["keep"]``, its old
    name, is read alike (observations recorded before the rename).

    Without either key every token of ``obs["tokens"]`` or ``obs["cls_attn"]`` is alive.
    """
    keys = ("live", LEGACY_LIVE, "tokens", "cls_attn")
    key = next((k for k in keys if isinstance(obs, Mapping) and k in obs), "live")
    ref = obs_tensor(obs, key, device)
    if ref.dim() != (3 if key == "tokens" else 2):
        shape = "(B, N, C)" if key == "tokens" else "(B, N)"
        raise ValueError(f"obs[{key!r}] must be batched {shape}, got shape {tuple(ref.shape)}")
    if key in ("live", LEGACY_LIVE):
        return ref > 0.5
    return torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device)


def keep_counts(obs: Mapping[str, Any], device: torch.device | str | None = None) -> Tensor:
    """The tokens to keep at this stage, (B,) long, from ``obs["keep_count"]`` ((B,) or (B, 1), any dtype)."""
    if isinstance(obs, Mapping) and "keep_count" not in obs:
        raise ValueError(TOPK_NEEDS_BUDGET)
    count = obs_tensor(obs, "keep_count", device)
    if count.dim() not in (1, 2) or count.shape[1:] not in ((), (1,)):
        raise ValueError(f"obs['keep_count'] must be (B,) or (B, 1), got shape {tuple(count.shape)}")
    return count.reshape(count.shape[0]).round().long()


def check_budget_observed(use_budget: bool, observed: bool, where: str) -> None:
    """A policy reads a budget exactly when the env observes one (``where``: "space" or "observation")."""
    if use_budget and not observed:
        raise ValueError(
            f"the policy was built with use_budget=True but the {where} has no 'budget': build the env with "
            "budget=... or the policy with use_budget=False"
        )
    if observed and not use_budget:
        raise ValueError(
            f"the {where} has a 'budget' (an env built with budget=...) but the policy was built with "
            "use_budget=False, so it would ignore it: build it with use_budget=True (APTPolicy.for_env does)"
        )


def read_batch(
    obs: Mapping[str, Any],
    *,
    num_patches: int,
    embed_dim: int,
    num_stages: int,
    use_cls_attn: bool,
    use_budget: bool,
    topk: bool,
    device: torch.device,
) -> Batch:
    """Tensors on ``device`` from an env observation or an SB3-preprocessed one, checked against a policy's sizes.

    Accepts ``stage`` as indices (B,) or (B, 1), or one-hot (B, K) or (B, 1, K) float, and ``live`` as int8, bool
    or float; numpy arrays too. ``cls_attn`` is read when ``use_cls_attn``, ``budget`` when ``use_budget``, and
    ``keep_count``, when there, is checked to hold one count per row when ``topk``.
    """
    tokens = obs_tensor(obs, "tokens", device).float()  # (B, N, C)
    if tokens.dim() != 3:
        raise ValueError(f"obs['tokens'] must be batched (B, N, C), got shape {tuple(tokens.shape)}")
    if tuple(tokens.shape[1:]) != (num_patches, embed_dim):
        raise ValueError(
            f"policy expects {num_patches} tokens of width {embed_dim}, observation has "
            f"{tokens.shape[1]} tokens of width {tokens.shape[2]}: build the policy for this env"
        )
    b = tokens.shape[0]
    stage = obs_tensor(obs, "stage", device)
    if stage.is_floating_point() and stage.dim() >= 2 and stage.shape[-1] == num_stages:
        stage = stage.argmax(-1)  # SB3's one-hot
    stage = _per_row(stage, b, "stage").long()
    if bool(((stage < 0) | (stage >= num_stages)).any()):  # an IndexError inside the embedding else
        raise ValueError(f"obs['stage'] must be in [0, {num_stages}), got {stage.tolist()}")
    cls_attn = None
    if use_cls_attn:
        if "cls_attn" not in obs:
            raise ValueError(
                "the policy reads obs['cls_attn'], which this env does not observe: add 'cls_attn' to "
                "obs_keys or build the policy with use_cls_attn=False"
            )
        cls_attn = _batched(obs, "cls_attn", (b, num_patches), device).float()
    cls_token = _batched(obs, "cls", (b, embed_dim), device).float()
    check_budget_observed(use_budget, "budget" in obs, "observation")
    budget = _per_row(obs_tensor(obs, "budget", device), b, "budget").float()[:, None] if use_budget else None
    if topk and "keep_count" in obs:
        _per_row(keep_counts(obs, device), b, "keep_count")
    live = live_mask(obs, device)
    if tuple(live.shape) != (b, num_patches):
        raise ValueError(f"obs['live'] must be ({b}, {num_patches}), got {tuple(live.shape)}")
    return Batch(tokens, cls_token, cls_attn, live, stage, budget)


def _per_row(value: Tensor, rows: int, key: str) -> Tensor:
    """``value`` as (B,), from (B,) or (B, 1): checked to hold one value per row."""
    if value.numel() != rows:
        raise ValueError(f"obs[{key!r}] must hold one value for each of {rows} rows, got shape {tuple(value.shape)}")
    return value.reshape(rows)


def _batched(obs: Mapping[str, Any], key: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """``obs[key]``, checked to have ``shape``."""
    value = obs_tensor(obs, key, device)
    if tuple(value.shape) != shape:
        raise ValueError(f"obs[{key!r}] must have shape {shape} (batch, ...), got {tuple(value.shape)}")
    return value
