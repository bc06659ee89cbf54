"""The ViT as a Gymnasium environment: one image per sub-environment, one step per pruning stage."""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space, iterate
from torch import nn

from apt_env.backbone import DEFAULT_MODEL_KWARGS, DEFAULT_MODEL_NAME, MODES, Mode, PrunableViT
from apt_env.checkpoint import load_backbone, read_backbone_config
from apt_env.data import dataset_data_config, dataset_for
from apt_env.defaults import DEFAULT_CHECKPOINT
from apt_env.flops import FlopCounter
from apt_env.observe import BUDGET_KEYS, CHANNELS, OBS_KEYS, BudgetKeepRatio, as_tensor, observe
from apt_env.tokens import TokenState, top_count

_logger = logging.getLogger(__name__)

REWARDS: tuple[str, ...] = ("loss_delta", "prob_delta", "vs_random")
DEFAULT_CHANNELS: tuple[str, ...] = ("plain", "multi")
"""The channels the reward needs; ``single`` (``CHANNELS``) costs a pass more and is reported when asked."""

ModelSpec = str | Path | nn.Module | tuple[str, dict] | None

# A process forked after this import (gymnasium's AsyncVectorEnv with Linux's default start method)
# inherits torch's thread pool without its threads: see ``_one_thread_if_forked``.
_IMPORT_PID = os.getpid()


def build_backbone(
    model: ModelSpec, *, prune_layers: Sequence[int] | None = None, min_keep: int | None = None
) -> PrunableViT:
    """A ``PrunableViT`` from a checkpoint folder, a timm name, ``(name, kwargs)``, a timm module or a
    ``PrunableViT``.

    ``None`` is the default model: the checkpoint that ships with the package when there is one, else
    an untrained small ViT for 28x28 gray images. ``prune_layers`` and ``min_keep`` pass the
    ``PrunableViT`` constructor's checks whatever the model; ``None`` keeps a checkpoint's or a
    ``PrunableViT``'s own value, else the default (three evenly spaced blocks, 1). A ``PrunableViT`` is
    used as it is, not copied (its weights may be training elsewhere), so values other than its own
    are an error.
    """
    pruning = {k: v for k, v in dict(prune_layers=prune_layers, min_keep=min_keep).items() if v is not None}
    if isinstance(model, PrunableViT):
        wanted = model.with_pruning(**pruning)  # the constructor's checks
        if (wanted.prune_layers, wanted.min_keep) != (model.prune_layers, model.min_keep):
            given = ", ".join(f"{k}={v!r}" for k, v in pruning.items())
            raise ValueError(
                f"the PrunableViT given as model has prune_layers={model.prune_layers}, min_keep={model.min_keep}, "
                f"but {given} was asked: leave them unset to use the model's, or pass "
                f"model=pv.with_pruning({given}) (same weights)"
            )
        return model
    if isinstance(model, nn.Module):
        return PrunableViT(model, **pruning)
    if model is None:
        model = default_model()
    if isinstance(model, tuple):
        if len(model) != 2 or not isinstance(model[1], Mapping):
            raise ValueError(f"a model given as a tuple is (timm_name, timm_kwargs dict), got {model!r}")
        name, kwargs = model
        return PrunableViT.from_timm(name, **pruning, **kwargs)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            "model must be a checkpoint folder, a timm name, (name, timm_kwargs), a timm module or a PrunableViT, "
            f"got {type(model).__name__}"
        )
    if Path(model).exists():
        return load_backbone(model).with_pruning(**pruning)
    return PrunableViT.from_timm(str(model), **pruning)


def default_model() -> ModelSpec:
    """The checkpoint that ships with the package, else (with a warning) an untrained small ViT."""
    if (DEFAULT_CHECKPOINT / "config.json").is_file():
        return DEFAULT_CHECKPOINT
    _logger.warning("no trained default checkpoint ships with this install: using an untrained ViT")
    return (DEFAULT_MODEL_NAME, DEFAULT_MODEL_KWARGS)


def check_model_fits_data(model: ModelSpec, pv: PrunableViT, dataset: str, num_classes: int) -> None:
    """Refuse a model whose class count is not the dataset's; warn when a checkpoint runs on data other than
    it was trained on, and when a bare timm name gives an untrained model (rewards from a model that does not
    classify)."""
    if pv.num_classes != num_classes:
        raise ValueError(
            f"the model has {pv.num_classes} classes, dataset {dataset!r} has {num_classes}: pass a model trained "
            "on this dataset, or timm kwargs with num_classes matching it"
        )
    if _is_checkpoint(model):
        trained_on = read_backbone_config(model).get("dataset")
        if trained_on is not None and trained_on != dataset:
            _logger.warning("the checkpoint %s was trained on %s, the env runs it on %s", model, trained_on, dataset)
    elif isinstance(model, (str, tuple)):
        name = model if isinstance(model, str) else model[0]
        _logger.warning("%s is built untrained: rewards come from a model that does not classify yet", name)


def _is_checkpoint(model: ModelSpec) -> bool:
    """A model given as a path that exists: a checkpoint folder (``build_backbone`` loads it)."""
    return isinstance(model, (str, os.PathLike)) and Path(model).exists()


def _one_thread_if_forked() -> None:
    """Run single-threaded in a process forked after this module was imported, as DataLoader workers do.

    The fork copies torch's intra-op thread pool but not its threads, so the first parallel op in the
    child waits for them forever (``gym.make_vec(..., vectorization_mode="async")`` on Linux builds a
    first env in the parent, then forks the workers).
    """
    if os.getpid() != _IMPORT_PID:
        torch.set_num_threads(1)


def _choice(name: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _names(name: str, values: Any) -> tuple:
    """A sequence argument of names (``channels``, ``obs_keys``) as a tuple; a lone string is an error."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of names, got {values!r}")
    return tuple(values)


def _finite(name: str, value: Any) -> float:
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


def random_subset(live: torch.Tensor, count: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """``count`` (B,) tokens drawn uniformly without replacement from each row's ``live`` (B, N) bool,
    with ``rng`` (one uniform draw per position). # (B, N) bool"""
    return top_count(torch.from_numpy(rng.random(live.shape)).to(live.device), live, count)


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
        mode: Mode,
        budget_weight: float = 0.0,
    ) -> None:
        self.pv = pv
        self.reward = reward
        self.flops_weight = float(flops_weight)
        self.budget_weight = float(budget_weight)
        self.channels = tuple(channels)
        self.obs_keys = tuple(obs_keys)
        self.take_attn = "cls_attn" in self.obs_keys  # its class attention costs a partial block
        self.mode = mode
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
        rng: np.random.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Begin episodes on a batch of images; returns the first observation.

        Args:
            images, labels: the batch, one episode per row.
            budget: each row's budget (B,), a fraction of the dense backbone GFLOPs; needed when the
                ``budget`` or ``keep_count`` observation is asked for, or ``budget_weight`` is set.
            rng: the random source of the ``vs_random`` reward's masks (the env's ``np_random``).
        """
        pv, b = self.pv, self.bounds
        if budget is None and (self.budget_weight or any(key in self.obs_keys for key in BUDGET_KEYS)):
            raise ValueError("these episodes observe or reward a budget: pass budget=")
        if rng is None and self.reward == "vs_random":
            raise ValueError("the vs_random reward draws random masks: pass rng=")
        self.budget, self.rng = budget, rng
        self.keep_ratio = None
        if budget is not None:
            if self.budget_ratio is None:
                self.budget_ratio = BudgetKeepRatio(pv, self.flops)
            self.keep_ratio = self.budget_ratio(budget)
        self.labels = labels
        self.state, self.cls_attn = pv.advance_to_stage(pv.embed(images), 0, take_attn=self.take_attn)
        logits_plain = pv.finish(self.state, b[1])
        if "single" in self.channels:  # the unpruned state entering every stage
            self.plain_states = [self.state]
            for k in range(1, self.num_stages):
                self.plain_states.append(pv.run_blocks(self.plain_states[-1], b[k], b[k + 1]))
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
        pv, b, k = self.pv, self.bounds, self.stage
        start = b[k + 1]
        pruned = pv.prune(self.state, keep, self.mode)
        last = k + 1 == self.num_stages
        if last:
            logits = pv.finish(pruned, start)
            next_state, next_attn = pruned, self.cls_attn
            if next_attn is not None:
                next_attn = next_attn * pruned.mask(pv.num_patches)
        else:
            next_state, next_attn = pv.advance_to_stage(pruned, k + 1, take_attn=self.take_attn)
            logits = pv.finish(next_state, b[k + 2])

        counts = pruned.num_kept()
        self.block_tokens[:, start:] = (pv.num_prefix_tokens + counts).unsqueeze(1)
        flops_now = self.flops(self.block_tokens)
        score = self._score(logits)
        baseline = self.score
        if self.reward == "vs_random":  # as many tokens, drawn at random, from the same state
            chance = random_subset(self.state.mask(pv.num_patches), counts, self.rng)
            baseline = self._score(pv.finish(pv.prune(self.state, chance, self.mode), start))
        reward = baseline - score + self.flops_weight * (self.flops_now - flops_now).float() / self.flops_all
        if self.budget is not None:  # charged once, on the final FLOPs
            over = (flops_now / self.flops_all - self.budget.double()).clamp(min=0)
            penalty = (self.budget_weight * over).float() if last else torch.zeros_like(reward)
            reward = reward - penalty
        loss_multi = score if self.reward != "prob_delta" else F.cross_entropy(logits, self.labels, reduction="none")
        # Copies: the caller may edit info in place, and self.score is the next step's baseline.
        info = {"loss_plain": self.loss_plain.clone(), "loss_multi": loss_multi.clone()}
        if self.reward == "vs_random":
            info["loss_random"] = baseline
        if self.budget is not None:
            info["budget_penalty"] = penalty
        if "single" in self.channels:
            single = loss_multi.clone()
            if k > 0:  # only this stage's action, applied to the unpruned tokens
                alone = pv.prune(self.plain_states[k], keep, self.mode)
                single = F.cross_entropy(pv.finish(alone, start), self.labels, reduction="none")
            info["loss_single"] = single
        info["keep_ratio"] = counts.float() / pv.num_patches
        info["gflops"] = (flops_now / 1e9).float()
        # What was done, which differs from ``keep`` where the action asks to keep pruned tokens
        # or a row was topped up to min_keep.
        info["executed_action"] = pruned.mask(pv.num_patches).to(torch.int8)

        self.state, self.cls_attn, self.score, self.flops_now = next_state, next_attn, score, flops_now
        obs = self.observe(next_state, next_attn, stage=k if last else k + 1)
        self.stage = k + 1
        return obs, reward.float(), info

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        """What the reward's first term improves: the loss, or minus the true-class probability."""
        if self.reward != "prob_delta":
            return F.cross_entropy(logits, self.labels, reduction="none")
        return -logits.softmax(-1).gather(1, self.labels.unsqueeze(1)).squeeze(1)

    def observe(self, state: TokenState, cls_attn: torch.Tensor | None, stage: int | None = None) -> dict:
        stage = self.stage if stage is None else stage
        return observe(self.pv, state, cls_attn, stage, self.obs_keys, budget=self.budget, keep_ratio=self.keep_ratio)


class APTPruneVectorEnv(VectorEnv):
    """## Description

    A Vision Transformer is the environment: each sub-environment is one image of the ViT's batch
    (the batch *is* the vector of environments), and an agent living between the blocks decides,
    at each of K pruning stages, which patch tokens to keep.

    ## Observation Space

    A ``Dict`` per sub-environment (only the keys in ``obs_keys`` are computed and present):

    | key | space | meaning |
    |---|---|---|
    | ``tokens`` | ``Box(-inf, inf, (N, C), float32)`` | patch features entering the stage, pruned ones zeroed |
    | ``cls`` | ``Box(-inf, inf, (C,), float32)`` | class-token feature (mean live patch without one) |
    | ``cls_attn`` | ``Box(0, 1, (N,), float32)`` | attention of the class token to each patch in the previous block |
    | ``keep`` | ``MultiBinary(N)`` (int8) | the current keep mask |
    | ``stage`` | ``Discrete(K)`` | the stage index |
    | ``budget`` | ``Box(0, 1, (1,), float32)`` | the episode's budget, a fraction of dense GFLOPs (1) |
    | ``keep_count`` | ``Box(0, N, (1,), int64)`` | patch tokens to keep at this stage to meet it (1) |

    (1) Only in an env built with ``budget=``, and then always.

    ``keep_count`` is the budget's schedule, set by the env so that a policy need not know the
    backbone: the per-stage keep ratio ``rho`` whose FLOPs, keeping the same share of the live tokens
    at every stage, are closest to the budget (``BudgetKeepRatio``, the counting of
    ``apt_env.evaluate.budget_keep_ratio``), applied to this row's live count:
    ``floor(live * rho + 0.5)``, at least ``max(1, min_keep)``, at most ``live``. A policy that keeps
    exactly ``keep_count`` tokens at every stage ends at that ratio's FLOPs, the reachable fraction
    nearest the budget.

    ## Action Space

    ``MultiBinary(N)``: 1 keeps a patch token. Prefix tokens are always kept and a token pruned earlier
    stays pruned. A row that the action leaves with fewer than ``min_keep`` patch tokens keeps the
    ones the action kept plus those it dropped that were live before the step, lowest patch index
    first, until it has ``min_keep``. ``info["executed_action"]`` is the keep mask that was applied.

    ## Rewards

    With ``L(m)`` the loss of finishing the forward pass under mask ``m`` with no further pruning and
    ``F(m)`` its FLOPs, ``loss_delta`` gives
    ``r_k = L(m_{k-1}) - L(m_k) + flops_weight * (F(m_{k-1}) - F(m_k)) / F(all)``, so an episode's
    return is ``L(plain) - L(final) + flops_weight * fraction_saved``. ``prob_delta`` uses the
    true-class probability's gain instead of the loss's drop (the original APT signal).

    ``vs_random`` asks "better than chance?": ``r_k = L(c_k) - L(m_k) + flops_weight * (F(m_{k-1}) -
    F(m_k)) / F(all)``, where ``c_k`` prunes the same state ``m_{k-1}`` to a uniformly random subset of
    its live tokens with as many tokens in each image as the executed mask ``m_k`` keeps (common
    random numbers: the draw comes from the env's ``np_random``, so a seed reproduces it). A policy
    that picks tokens at random gets 0 in expectation at every stage, whatever it keeps; the return
    does not telescope. ``info["loss_random"]`` is ``L(c_k)``.

    The default stays ``loss_delta`` (the method's own reward), on the evidence of
    ``benchmarks/agent_evidence.py``: over 24,576 transitions of native PPO, SB3 PPO and SB3 A2C on a budget
    range, on the shipped default backbone, the mode's gain over random on a fixed val set rose by +0.107 on
    average with ``loss_delta`` and +0.030 with ``vs_random``. In joint training (``train_backbone.py``) the
    shipped agent was trained on ``vs_random``.

    With a budget ``b`` (see ``budget``), the last step also subtracts
    ``budget_weight * max(0, F(final) / F(all) - b)``: going over the budget costs, staying under it
    earns nothing beyond the compute term. With ``loss_delta`` the return is then
    ``L(plain) - L(final) + flops_weight * fraction_saved - budget_weight * max(0, F(final) / F(all) - b)``.
    ``info["budget_penalty"]`` is that term (0 before the last step).

    ``info`` reports the three channels of the original method, as arrays: ``loss_plain`` (no
    pruning), ``loss_single`` (only this stage's action), ``loss_multi`` (all actions so far), and
    ``keep_ratio``, ``gflops`` and ``executed_action`` (int8, N per sub-environment), each with its
    ``_key`` mask as in Gymnasium's vector envs. Observations and info never share memory with the
    environment's state.

    ## Starting State

    An image drawn uniformly from the dataset split with ``self.np_random``, every token kept,
    observed before block ``prune_layers[0]``. With a budget range, each sub-environment's episode
    then draws its budget uniformly from it with ``self.np_random``.

    ## Episode End

    Terminated after K steps (one per pruning stage); never truncated. Sub-environments reset in the
    same step (``AutoresetMode.SAME_STEP``): the last step returns the next episode's first
    observation and puts the last one in ``info["final_obs"]``; its info is at the top level, as on
    every step, and also in ``info["final_info"]``.

    ## Arguments

    * ``num_envs``: images per batch.
    * ``model``: a checkpoint folder, a timm name, ``(name, timm_kwargs)``, a timm module, a
      ``PrunableViT`` (used as is, weights shared), or ``None`` for the default (the shipped
      checkpoint, else an untrained ViT for 28x28 gray images).
    * ``dataset``, ``split``, ``data_root``: a dataset from ``apt_env.data`` and where it lives, preprocessed as
      the backbone says (``PrunableViT.data_config``: a checkpoint's recorded one, a ``PrunableViT``'s own); a model
      built here untrained (a timm name, ``(name, kwargs)``, a module) takes the dataset's statistics.
    * ``prune_layers``: blocks before which the stages prune, strictly increasing in ``[1, depth - 1]``.
    * ``reward``: ``"loss_delta"``, ``"prob_delta"`` or ``"vs_random"``; ``flops_weight``: weight of
      the compute term.
    * ``budget``: ``None`` (no budget, the default), a fraction in ``(0, 1]`` of the dense backbone's
      GFLOPs (``FlopCounter``), or a range ``(low, high)`` of them from which every episode draws its
      own; observed as ``budget`` and ``keep_count``. ``budget_weight``: weight of the over-budget
      penalty (non-negative).
    * ``min_keep``: the least number of patch tokens kept (see Action Space), in ``[1, N]``, or
      ``[0, N]`` for a class-token classifier.
    * ``prune_layers`` and ``min_keep`` are checked alike for every kind of ``model`` (a ValueError
      names the valid range). Unset, they are the model's own (a checkpoint's or a ``PrunableViT``'s),
      else three evenly spaced blocks and 1. A ``PrunableViT`` with other values is a ValueError:
      pass ``pv.with_pruning(...)`` instead.
    * ``channels``: which of ``plain``, ``single``, ``multi`` to report; ``plain`` and ``multi`` are
      always computed (the reward needs them) and are the default; ``single`` costs one more pass of the
      remaining blocks per step. ``obs_keys``: which observation keys to compute.
    * ``mode``: ``"gathered"`` (pruned tokens removed, fast) or ``"masked"``; same results.
    * ``device``: where the model and every tensor live.

    ## Version History

    * v0: initial version; budgets and the ``vs_random`` reward added as options (the defaults are unchanged);
      ``loss_single`` reported only when ``channels`` asks for it (rewards and observations unchanged); the
      ``data_config`` argument removed: the backbone carries its preprocessing (``PrunableViT.data_config``), the
      same a checkpoint's reader got before.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(
        self,
        num_envs: int = 64,
        *,
        model: ModelSpec = None,
        dataset: str = "fashion-mnist",
        split: str = "train",
        data_root: str | Path = "data",
        prune_layers: Sequence[int] | None = None,
        reward: str = "loss_delta",
        flops_weight: float = 0.0,
        budget: float | tuple[float, float] | None = None,
        budget_weight: float = 2.0,
        min_keep: int | None = None,
        channels: Sequence[str] = DEFAULT_CHANNELS,
        obs_keys: Sequence[str] = OBS_KEYS,
        mode: str = "gathered",
        device: str | torch.device = "cpu",
    ) -> None:
        _one_thread_if_forked()  # before any torch op
        _choice("reward", reward, REWARDS)
        _choice("mode", mode, MODES)
        channels, obs_keys = _names("channels", channels), _names("obs_keys", obs_keys)
        for c in channels:
            _choice("channel", c, CHANNELS)
        self.budget_range = budget_range(budget)
        for key in obs_keys:
            if key in BUDGET_KEYS and self.budget_range is None:
                raise ValueError(f"observation key {key!r} needs a budget: pass budget= to the env")
            _choice("observation key", key, OBS_KEYS + BUDGET_KEYS)
        flops_weight = _finite("flops_weight", flops_weight)
        if _finite("budget_weight", budget_weight) < 0.0:
            raise ValueError(f"budget_weight must be a non-negative weight, got budget_weight={budget_weight!r}")
        if self.budget_range is not None:
            obs_keys = (*obs_keys, *(key for key in BUDGET_KEYS if key not in obs_keys))
        if isinstance(num_envs, bool) or not isinstance(num_envs, numbers.Integral) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer of at least 1, got {num_envs!r}")
        if not isinstance(dataset, str):
            raise ValueError(f"dataset must be a dataset name such as 'fashion-mnist', got {dataset!r}")
        try:
            self.device = torch.device(device)
            torch.empty(0, device=self.device)  # an unknown or absent device fails here, not inside the model
        except (RuntimeError, TypeError, AssertionError) as err:
            raise ValueError(f"device {device!r} cannot be used: {err}") from None
        if self.device.type == "meta":
            raise ValueError("device 'meta' holds no data: pass a device that computes, such as 'cpu' or 'cuda'")
        model = default_model() if model is None else model
        pv = build_backbone(model, prune_layers=prune_layers, min_keep=min_keep)
        self.pv = pv.to(self.device).eval()
        if not isinstance(model, PrunableViT) and not _is_checkpoint(model):  # built here, untrained: no data yet
            pv.data_config = dataset_data_config(dataset, img_size=pv.img_size[0], in_chans=pv.in_chans, root=data_root)
        self.data = dataset_for(pv, dataset, split, root=data_root)
        check_model_fits_data(model, pv, dataset, len(self.data.classes))
        if pv.img_size[0] != pv.img_size[1]:
            raise ValueError(f"square images are needed, the model takes {pv.img_size}")
        self.episodes = PruningEpisodes(
            self.pv,
            reward=reward,
            flops_weight=flops_weight,
            channels=channels,
            obs_keys=obs_keys,
            mode=mode,
            budget_weight=budget_weight if self.budget_range is not None else 0.0,
        )
        self.num_envs = int(num_envs)
        n, c, k = pv.num_patches, pv.embed_dim, pv.num_stages
        all_spaces = {
            "tokens": spaces.Box(-np.inf, np.inf, (n, c), np.float32),
            "cls": spaces.Box(-np.inf, np.inf, (c,), np.float32),
            "cls_attn": spaces.Box(0.0, 1.0, (n,), np.float32),
            "keep": spaces.MultiBinary(n),
            "stage": spaces.Discrete(k),
            "budget": spaces.Box(0.0, 1.0, (1,), np.float32),
            "keep_count": spaces.Box(0, n, (1,), np.int64),
        }
        self.single_observation_space = spaces.Dict(
            {key: all_spaces[key] for key in OBS_KEYS + BUDGET_KEYS if key in obs_keys}
        )
        self.single_action_space = spaces.MultiBinary(n)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)

    # -- tensor API (no numpy round trips; for native trainers) --------------------------------

    def reset_tensors(self, *, seed: int | None = None) -> dict[str, torch.Tensor]:
        """Like ``reset`` but returns tensors on ``device``."""
        VectorEnv.reset(self, seed=seed)
        return self._start()

    def step_tensors(
        self, actions: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Like ``step`` but takes and returns tensors on ``device``; ``final_obs`` is a batched dict and
        there are no ``_key`` masks."""
        keep = self._check_action(actions)
        obs, reward, info = self.episodes.step(keep)
        done = self.episodes.stage == self.episodes.num_stages
        terminated = torch.full((self.num_envs,), done, dtype=torch.bool, device=self.device)
        truncated = torch.zeros_like(terminated)
        if done:
            info = {**info, "final_obs": obs, "final_info": info}
            obs = self._start()
        return obs, reward, terminated, truncated, info

    # -- Gymnasium API -------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        return _to_numpy(self._start()), {}

    def step(self, actions: Any) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, dict]:
        obs, reward, terminated, truncated, info = self.step_tensors(actions)
        info = _vector_info(info, self.num_envs, self.observation_space)
        return _to_numpy(obs), reward.cpu().numpy(), terminated.cpu().numpy(), truncated.cpu().numpy(), info

    # -- helpers ---------------------------------------------------------------------------------

    def _start(self) -> dict[str, torch.Tensor]:
        idx = self.np_random.integers(0, len(self.data), size=self.num_envs)
        images, labels = zip(*(self.data[int(i)] for i in idx))
        images = torch.stack(images).to(self.device)
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        budget = None
        if self.budget_range is not None:
            low, high = self.budget_range
            draws = np.full(self.num_envs, low) if low == high else self.np_random.uniform(low, high, self.num_envs)
            budget = torch.as_tensor(draws, dtype=torch.float32, device=self.device)
        return self.episodes.start(images, labels, budget=budget, rng=self.np_random)

    def _check_action(self, actions: Any) -> torch.Tensor:
        """A (num_envs, N) bool tensor from any 0/1 array; anything else is a ValueError."""
        space = f"{self.num_envs} x {self.single_action_space}"
        return keep_mask(actions, (self.num_envs, self.pv.num_patches), space, self.device)


class APTPruneEnv(gym.Env):
    """One image at a time: the same environment as ``APTPruneVectorEnv`` with ``num_envs=1``.

    See ``APTPruneVectorEnv`` for the spaces, rewards and arguments. The episode ends after K steps;
    ``step`` after that needs a ``reset``.
    """

    metadata = {"render_modes": []}

    def __init__(self, **kwargs: Any) -> None:
        self.vector = APTPruneVectorEnv(num_envs=1, **kwargs)
        self.observation_space = self.vector.single_observation_space
        self.action_space = self.vector.single_action_space

    @property
    def pv(self) -> PrunableViT:
        return self.vector.pv

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self.vector._np_random = self.np_random  # one source of randomness
        return _unbatch(_to_numpy(self.vector._start())), {}

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        keep = keep_mask(action, self.action_space.shape, str(self.action_space), self.vector.device).unsqueeze(0)
        obs, reward, info = self.vector.episodes.step(keep)
        terminated = self.vector.episodes.stage == self.vector.episodes.num_stages
        info = {key: (v[0] if v.ndim > 1 else float(v[0])) for key, v in _to_numpy(info).items()}
        return _unbatch(_to_numpy(obs)), float(reward[0]), terminated, False, info


def keep_mask(actions: Any, shape: tuple[int, ...], space: str, device: torch.device) -> torch.Tensor:
    """A bool keep mask of ``shape`` on ``device`` from a 0/1 action: a tensor, numpy array or nested lists of
    any numeric dtype, byte order and strides. Anything else is a ValueError that names the action ``space``."""
    a = as_tensor(actions, f"action for {space}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"action must have shape {tuple(shape)} for {space}, got {tuple(a.shape)}")
    if a.dtype == torch.bool:
        return a.to(device)
    if not bool(((a == 0) | (a == 1)).all()):
        raise ValueError(f"action values must be 0 or 1 for {space}")
    return (a == 1).to(device)


def _vector_info(info: dict[str, Any], num_envs: int, space: spaces.Dict) -> dict[str, Any]:
    """Gymnasium's vector-env info: numpy arrays, each with its ``_key`` mask (every sub-environment
    has every key), nested dicts alike, and ``final_obs`` as an object array of per-env observations
    (split by the batched observation ``space``)."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        if key == "final_obs":
            out[key] = np.empty(num_envs, dtype=object)
            out[key][:] = list(iterate(space, _to_numpy(value)))
        elif isinstance(value, dict):
            out[key] = _vector_info(value, num_envs, space)
        else:
            out[key] = value.cpu().numpy()
        out[f"_{key}"] = np.ones(num_envs, dtype=bool)
    return out


def _to_numpy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _to_numpy(v) if isinstance(v, dict) else v.cpu().numpy() for k, v in tree.items()}


def _unbatch(obs: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: (int(v[0]) if k == "stage" else v[0]) for k, v in obs.items()}
