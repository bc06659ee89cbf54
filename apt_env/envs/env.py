"""The ViT as a Gymnasium environment: one image per sub-environment, one step per pruning stage.

The Gymnasium classes and the numpy conversion; the episodes themselves run in torch (``episodes``), the model
argument resolves in ``model_spec`` and the other arguments are checked in ``arguments``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space, iterate

from apt_env.data.datasets import dataset_data_config, dataset_for
from apt_env.envs.arguments import check_env_arguments, check_finite
from apt_env.envs.episodes import DEFAULT_CHANNELS, PruningEpisodes
from apt_env.envs.mean_budget import BudgetPrice
from apt_env.envs.model_spec import ModelSpec, build_backbone, check_model_fits_data, default_model, is_checkpoint
from apt_env.envs.observe import BUDGET_KEYS, OBS_KEYS, as_tensor
from apt_env.envs.render import rgb_frame
from apt_env.models.backbone import PrunableViT

__all__ = ["APTPruneEnv", "APTPruneVectorEnv", "keep_mask"]

# A process forked after this import (gymnasium's AsyncVectorEnv with Linux's default start method)
# inherits torch's thread pool without its threads: see ``_one_thread_if_forked``.
_IMPORT_PID = os.getpid()


def _one_thread_if_forked() -> None:
    """Run single-threaded in a process forked after this module was imported, as DataLoader workers do.

    The fork copies torch's intra-op thread pool but not its threads, so the first parallel op in the
    child waits for them forever (``gym.make_vec(..., vectorization_mode="async")`` on Linux builds a
    first env in the parent, then forks the workers).
    """
    if os.getpid() != _IMPORT_PID:
        torch.set_num_threads(1)


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
    | ``live`` | ``MultiBinary(N)`` (int8) | the patch tokens still alive (1), after the actions so far |
    | ``stage`` | ``Discrete(K)`` | the stage index |
    | ``budget`` | ``Box(0, 1, (1,), float32)`` | the episode's budget, a fraction of dense GFLOPs (1) |
    | ``keep_count`` | ``Box(0, N, (1,), int64)`` | patch tokens to keep at this stage to meet it (1) |

    (1) Only in an env built with ``budget=``, and then always.

    ``keep_count`` is the budget's schedule, set by the env so that a policy need not know the
    backbone: the per-stage keep ratio ``rho`` whose FLOPs, keeping the same share of the live tokens
    at every stage, are closest to the budget (``BudgetKeepRatio``, the counting of
    ``apt_env.eval.evaluate.budget_keep_ratio``), applied to this row's live count:
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
    random numbers: the draw comes from a generator seeded from the env's ``np_random`` at every episode start,
    so a seed reproduces it). A policy
    that picks tokens at random gets 0 in expectation at every stage, whatever it keeps; the return
    does not telescope. ``info["loss_random"]`` is ``L(c_k)``.

    The default is ``loss_delta``, the method's own reward (why: ``experiments/rl_algorithms/agent_evidence.py`` and
    docs/results.md, "Learning curves"); the shipped agent was trained jointly on ``vs_random``.

    With a budget ``b`` (see ``budget``), the last step also subtracts
    ``budget_weight * max(0, F(final) / F(all) - b)``: going over the budget costs, staying under it
    earns nothing beyond the compute term. With ``loss_delta`` the return is then
    ``L(plain) - L(final) + flops_weight * fraction_saved - budget_weight * max(0, F(final) / F(all) - b)``.
    ``info["budget_penalty"]`` is that term (0 before the last step).

    With ``budget_mean=True`` the budget holds on average over images, not in each: the last step subtracts
    ``lambda(b) * (F(final) / F(all) - b)`` instead, a price of compute that pays back what an image saves under
    its budget. ``lambda`` (``apt_env.envs.mean_budget.BudgetPrice``, piecewise linear in ``b``, non-negative) takes a
    dual-ascent step of ``price_lr`` times the mean overshoot after every batch of episodes, so that the agent's
    mean compute meets each budget while images that need more tokens may take them. Use it with
    ``APTPolicy(sampling="threshold")``; ``keep_count`` is then the budget's count, for reference only.

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

    ## Rendering

    ``render_mode="rgb_array"``: ``render()`` returns, for each sub-environment, its image as the dataset stored it
    (the normalization undone) with the patches pruned so far dimmed, as ``masks.png`` draws them, an
    ``(H', W', 3)`` uint8 array enlarged by an integer factor to at least 224 pixels a side (a 28x28 image 8
    times); a tuple of ``num_envs`` of them (``APTPruneEnv``: the one array). After a reset every patch is
    shown; after stage ``k``, the mask that stage left. ``metadata["render_fps"]`` is 2, so each stage shows for
    half a second in ``gymnasium.wrappers.RecordVideo``; ``HumanRendering`` shows it in a window. Without a
    render mode ``render()`` warns and returns None, as Gymnasium's own environments do.

    ## Arguments

    * ``num_envs``: images per batch.
    * ``model``: a checkpoint folder, a timm name, ``(name, timm_kwargs)``, a timm module, a
      ``PrunableViT`` (used as is, weights shared), or ``None`` for the default (the shipped
      checkpoint, else an untrained ViT for 28x28 gray images). The default is the 49-token ViT
      (``apt_env.defaults.DEFAULT_CHECKPOINT``), chosen by measurement: 726 env steps/s at 64 envs
      against 160 for the 196-token one (``benchmarks/bench_env.py``, each at 0.95-1.02 of its
      block-pass bound), so an RL experiment runs 4.5x the transitions in the same time, and its task
      already separates a learned policy from random pruning (84.15% against 73.43% top-1 at budget 0.3,
      ``docs/results.md``). ``gym.make("APTPrune196-v0")`` is the same environment on the 196-token ViT
      (``apt_env.defaults.P2_CHECKPOINT``), the sequence length of ViT-B/16 at 224 px.
    * ``dataset``, ``split``, ``data_root``: a dataset from ``apt_env.data`` and where it lives, preprocessed as
      the backbone says (``PrunableViT.data_config``: a checkpoint's recorded one, a ``PrunableViT``'s own); a model
      built here untrained (a timm name, ``(name, kwargs)``, a module) takes the dataset's statistics.
    * ``prune_layers``: blocks before which the stages prune, strictly increasing in ``[0, depth - 1]`` (0: the
      embedded patches, before any block).
    * ``reward``: ``"loss_delta"``, ``"prob_delta"`` or ``"vs_random"``; ``flops_weight``: weight of
      the compute term.
    * ``budget``: ``None`` (no budget, the default), a fraction in ``(0, 1]`` of the dense backbone's
      GFLOPs (``FlopCounter``), or a range ``(low, high)`` of them from which every episode draws its
      own; observed as ``budget`` and ``keep_count``. ``budget_weight``: weight of the over-budget
      penalty (non-negative).
    * ``budget_mean``: the budget holds on average over images (see Rewards), with the price's step size
      ``price_lr`` (finite); needs ``budget``.
    * ``min_keep``: the least number of patch tokens kept (see Action Space), in ``[1, N]``, or
      ``[0, N]`` for a class-token classifier.
    * ``prune_layers`` and ``min_keep`` are checked alike for every kind of ``model`` (a ValueError
      names the valid range). Unset, they are the model's own (a checkpoint's or a ``PrunableViT``'s),
      else three evenly spaced blocks and 1. A ``PrunableViT`` with other values is a ValueError:
      pass ``pv.with_pruning(...)`` instead.
    * ``channels``: which of ``plain``, ``single``, ``multi`` to report; ``plain`` and ``multi`` are
      always computed (the reward needs them) and are the default; ``single`` costs one more pass of the
      remaining blocks per step. ``obs_keys``: which observation keys to compute.
    * ``layout``: ``"gathered"`` (pruned tokens removed, fast) or ``"masked"`` (kept in place under a mask); same
      results.
    * ``fuse``: EViT's fused token: the tokens each stage prunes are averaged, weighted by the class attention of
      the block before, into one more token that goes on through the blocks (``PrunableViT.prune``'s
      ``fuse_attn``), in every channel and in the ``vs_random`` reward's masks; its tokens count in ``gflops``.
    * ``device``: where the model and every tensor live.
    * ``render_mode``: ``None`` (the default) or ``"rgb_array"`` (see Rendering).

    ## Version History

    * v0: initial version; budgets and the ``vs_random`` reward added as options (the defaults are unchanged);
      ``loss_single`` reported only when ``channels`` asks for it (rewards and observations unchanged); the
      ``data_config`` argument removed: the backbone carries its preprocessing (``PrunableViT.data_config``), the
      same a checkpoint's reader got before; ``render_mode="rgb_array"`` added; the ``vs_random`` masks drawn from
      a generator seeded from ``np_random`` (the same reward in expectation, other draws for a given seed);
      ``budget_mean`` added (the default unchanged); the observation's live mask ``keep`` renamed ``live`` (a keep
      mask is the action): ``obs_keys`` with ``keep`` still reads it (a warning), ``agents`` read an observation
      recorded with ``keep`` alike, and agents saved before load unchanged; the argument ``mode`` ("gathered" or
      "masked") renamed ``layout`` (a mode is also a distribution's); ``fuse`` added (off by default).
    """

    # Two frames a second: each pruning stage shows for half a second in a video.
    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": ["rgb_array"], "render_fps": 2}

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
        budget_mean: bool = False,
        price_lr: float = 1.0,
        min_keep: int | None = None,
        channels: Sequence[str] = DEFAULT_CHANNELS,
        obs_keys: Sequence[str] = OBS_KEYS,
        layout: str = "gathered",
        fuse: bool = False,
        device: str | torch.device = "cpu",
        render_mode: str | None = None,
    ) -> None:
        _one_thread_if_forked()  # before any torch op
        args = check_env_arguments(
            num_envs=num_envs, dataset=dataset, reward=reward, layout=layout, fuse=fuse, channels=channels,
            obs_keys=obs_keys, budget=budget, flops_weight=flops_weight, budget_weight=budget_weight, device=device,
            render_mode=render_mode, render_modes=self.metadata["render_modes"],
        )  # fmt: skip
        self.num_envs, self.device, self.budget_range = args.num_envs, args.device, args.budget_range
        self.render_mode = render_mode
        if budget_mean and self.budget_range is None:
            raise ValueError("budget_mean=True makes a budget hold on average over images: pass budget= too")
        price = BudgetPrice(*self.budget_range, lr=check_finite("price_lr", price_lr)) if budget_mean else None
        model = default_model() if model is None else model
        pv = build_backbone(model, prune_layers=prune_layers, min_keep=min_keep)
        self.pv = pv.to(self.device).eval()
        if not isinstance(model, PrunableViT) and not is_checkpoint(model):  # built here, untrained: no data yet
            pv.data_config = dataset_data_config(dataset, img_size=pv.img_size[0], in_chans=pv.in_chans, root=data_root)
        self.data = dataset_for(pv, dataset, split, root=data_root)
        check_model_fits_data(model, pv, dataset, len(self.data.classes))
        if pv.img_size[0] != pv.img_size[1]:
            raise ValueError(f"square images are needed, the model takes {pv.img_size}")
        self.episodes = PruningEpisodes(
            self.pv, reward=reward, flops_weight=args.flops_weight, channels=args.channels, obs_keys=args.obs_keys,
            layout=layout, budget_weight=args.budget_weight, price=price, fuse=fuse,
        )  # fmt: skip
        self.single_observation_space = observation_space(pv, args.obs_keys)
        self.single_action_space = spaces.MultiBinary(pv.num_patches)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

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

    def render(self) -> tuple[np.ndarray, ...] | None:
        """Each sub-environment's image with its pruned patches dimmed (see Rendering), or None without a render
        mode."""
        if self.render_mode is None:
            gym.logger.warn('render() needs a render mode: pass render_mode="rgb_array" to the env')
            return None
        if self.episodes.stage < 0:
            raise RuntimeError("render() called before reset()")
        keep = self.episodes.state.mask(self.pv.num_patches).cpu()  # (B, N) the mask at the current stage
        info = self.data.info
        return tuple(
            rgb_frame(image, row, grid=self.pv.grid_size, mean=info.mean, std=info.std)
            for image, row in zip(self._images.cpu(), keep)
        )

    # -- helpers ---------------------------------------------------------------------------------

    def _start(self) -> dict[str, torch.Tensor]:
        idx = self.np_random.integers(0, len(self.data), size=self.num_envs)
        images, labels = zip(*(self.data[int(i)] for i in idx))
        self._images = torch.stack(images).to(self.device)  # kept for render()
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        budget = generator = None
        if self.budget_range is not None:
            low, high = self.budget_range
            draws = np.full(self.num_envs, low) if low == high else self.np_random.uniform(low, high, self.num_envs)
            budget = torch.as_tensor(draws, dtype=torch.float32, device=self.device)
        if self.episodes.reward == "vs_random":  # its masks' draws, seeded like everything else from np_random
            generator = torch.Generator().manual_seed(int(self.np_random.integers(2**63)))
        return self.episodes.start(self._images, labels, budget=budget, generator=generator)

    def _check_action(self, actions: Any) -> torch.Tensor:
        """A (num_envs, N) bool tensor from any 0/1 array; anything else is a ValueError."""
        space = f"{self.num_envs} x {self.single_action_space}"
        return keep_mask(actions, (self.num_envs, self.pv.num_patches), space, self.device)


class APTPruneEnv(gym.Env):
    """One image at a time: the same environment as ``APTPruneVectorEnv`` with ``num_envs=1``.

    See ``APTPruneVectorEnv`` for the spaces, rewards, rendering and arguments. The episode ends after K steps;
    ``step`` after that needs a ``reset``; ``render()`` returns the one sub-environment's frame.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 2}

    def __init__(self, *, render_mode: str | None = None, **kwargs: Any) -> None:
        self.vector = APTPruneVectorEnv(num_envs=1, render_mode=render_mode, **kwargs)
        self.render_mode = render_mode
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

    def render(self) -> np.ndarray | None:
        """The image with its pruned patches dimmed, ``(H', W', 3)`` uint8, or None without a render mode."""
        frames = self.vector.render()
        return None if frames is None else frames[0]


def observation_space(pv: PrunableViT, obs_keys: Sequence[str]) -> spaces.Dict:
    """One sub-environment's observation space: the keys in ``obs_keys``, in the order of the spec's table."""
    n, c, k = pv.num_patches, pv.embed_dim, pv.num_stages
    all_spaces = {
        "tokens": spaces.Box(-np.inf, np.inf, (n, c), np.float32),
        "cls": spaces.Box(-np.inf, np.inf, (c,), np.float32),
        "cls_attn": spaces.Box(0.0, 1.0, (n,), np.float32),
        "live": spaces.MultiBinary(n),
        "stage": spaces.Discrete(k),
        "budget": spaces.Box(0.0, 1.0, (1,), np.float32),
        "keep_count": spaces.Box(0, n, (1,), np.int64),
    }
    return spaces.Dict({key: all_spaces[key] for key in OBS_KEYS + BUDGET_KEYS if key in obs_keys})


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
