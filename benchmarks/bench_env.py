"""APTPrune-v0 step throughput against its bound and against N copies of the single env.

Printed, all measured in this run on the default config under random keep actions:

* env steps/s of ``APTPruneVectorEnv`` (numpy API, as a Gymnasium user sees it);
* the bound: the same block passes done directly with ``PrunableViT`` on the same masks (embed,
  prefix, the plain pass, one pass to the end per stage with the class attention on the way),
  and the ratio env / bound;
* steps/s of ``gymnasium.vector.SyncVectorEnv`` over ``num_envs`` single envs, our speed-up over it,
  next to the model's own batching gain (forward throughput at batch ``num_envs`` over batch 1);
* memory per sub-environment (the episode tensors the env keeps between steps).

Each registered env id in ``--env-ids`` is measured in turn: ``APTPrune-v0`` (the 49-token default) and
``APTPrune196-v0`` (the 196-token backbone).

Run: ``python benchmarks/bench_env.py``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch.utils.benchmark import Timer

import apt_env  # noqa: F401  (registers APTPrune-v0)
from apt_env.envs.env import APTPruneVectorEnv
from apt_env.envs.observe import CHANNELS
from apt_env.eval.evaluate import synchronize
from apt_env.train.runs import seed_everything


@dataclass
class Args:
    env_ids: tuple[str, ...] = ("APTPrune-v0", "APTPrune196-v0", "APTPruneCluttered-v0")
    """registered env ids to measure, each with its registered kwargs"""
    num_envs: int = 64
    """sub-environments (images per batch)"""
    episodes: int = 6
    """episodes timed per measurement (the median episode is reported)"""
    sync_episodes: int = 2
    """episodes of the SyncVectorEnv baseline (it is slow; 0 skips it and the batching gain)"""
    device: str = "cpu"
    """torch device of the env (e.g. cuda; timings synchronize it)"""
    keep_prob: float = 0.7
    """probability that a random action keeps a token"""
    channels: tuple[str, ...] = CHANNELS
    """channels the env reports (and the bound computes)"""
    seed: int = 0
    """seed"""


def random_actions(rng: np.random.Generator, shape: tuple[int, ...], p: float, steps: int) -> list[np.ndarray]:
    return [(rng.random(shape) < p).astype(np.int8) for _ in range(steps)]


def time_env_episode(envs: gym.vector.VectorEnv, actions: list[np.ndarray]) -> float:
    """Seconds per episode: K steps, the last of which also starts the next episode (the numpy API waits for
    the device)."""
    t0 = time.perf_counter()
    for a in actions:
        envs.step(a)
    return time.perf_counter() - t0


@torch.no_grad()
def time_bound(env: APTPruneVectorEnv, images: torch.Tensor, labels: torch.Tensor, masks: list[torch.Tensor]) -> float:
    """The same block passes as one env episode, done directly with PrunableViT."""
    pv, b, single = env.pv, env.pv.stage_bounds, "single" in env.episodes.channels
    images, labels, masks = images.to(env.device), labels.to(env.device), [m.to(env.device) for m in masks]
    synchronize(env.device)
    t0 = time.perf_counter()
    state, _ = pv.advance_to_stage(pv.embed(images), 0, take_attn=True)
    F.cross_entropy(pv.finish(state, b[1]), labels)
    plain = [state]
    if single:
        for k in range(1, pv.num_stages):
            plain.append(pv.run_blocks(plain[-1], b[k], b[k + 1]))
    for k, mask in enumerate(masks):
        state = pv.prune(state, mask, "gathered")
        if k + 1 < pv.num_stages:
            state, _ = pv.advance_to_stage(state, k + 1, take_attn=True)
            F.cross_entropy(pv.finish(state, b[k + 2]), labels)
        else:
            F.cross_entropy(pv.finish(state, b[k + 1]), labels)
        if single and k > 0:
            F.cross_entropy(pv.finish(pv.prune(plain[k], mask, "gathered"), b[k + 1]), labels)
    synchronize(env.device)
    return time.perf_counter() - t0


@torch.no_grad()
def forward_throughput(env: APTPruneVectorEnv, batch: int) -> float:
    """Images/s of the dense model at ``batch``, with the threads the env runs on."""
    x = torch.randn(batch, env.pv.in_chans, *env.pv.img_size, device=env.device)
    timer = Timer("pv(x)", globals={"pv": env.pv, "x": x}, num_threads=torch.get_num_threads())  # syncs CUDA
    return batch / timer.blocked_autorange(min_run_time=1.0).median


def main(args: Args) -> None:
    for env_id in args.env_ids:
        measure(env_id, args)


def measure(env_id: str, args: Args) -> None:
    """Print one env id's figures."""
    seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)
    registered = gym.spec(env_id).kwargs
    envs = APTPruneVectorEnv(args.num_envs, **registered, channels=args.channels, device=args.device)
    k, n = envs.pv.num_stages, envs.pv.num_patches
    envs.reset(seed=args.seed)
    t_env, t_bound = [], []
    for _ in range(args.episodes + 1):  # the first episode warms up
        actions = random_actions(rng, (args.num_envs, n), args.keep_prob, k)
        masks = [torch.from_numpy(a).bool() for a in actions]
        images = torch.stack([envs.data[i][0] for i in range(args.num_envs)])
        labels = torch.tensor([envs.data[i][1] for i in range(args.num_envs)])
        t_env.append(time_env_episode(envs, actions))
        t_bound.append(time_bound(envs, images, labels, masks))
    env_sps = args.num_envs * k / statistics.median(t_env[1:])
    bound_sps = args.num_envs * k / statistics.median(t_bound[1:])

    sync_sps = gain = None
    if args.sync_episodes > 0:
        torch.manual_seed(args.seed)
        sync = gym.vector.SyncVectorEnv(
            [lambda: gym.make(env_id, channels=args.channels, device=args.device) for _ in range(args.num_envs)],
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        )
        sync.reset(seed=args.seed)
        t_sync = [time_env_episode(sync, random_actions(rng, (args.num_envs, n), args.keep_prob, k))
                  for _ in range(args.sync_episodes + 1)]  # fmt: skip
        sync_sps = args.num_envs * k / statistics.median(t_sync[1:])
        gain = forward_throughput(envs, args.num_envs) / forward_throughput(envs, 1)

    ep = envs.episodes
    kept = [ep.state.x, ep.state.live, ep.state.index, ep.block_tokens, ep.labels, ep.loss_plain]
    kept += [s.x for s in getattr(ep, "plain_states", [])[1:]]
    mem = sum(t.numel() * t.element_size() for t in kept) / args.num_envs

    where = torch.cuda.get_device_name(envs.device) if envs.device.type == "cuda" else "cpu"
    print(f"{env_id}: num_envs={args.num_envs} stages={k} patches={n} channels={','.join(args.channels)} on {where}")
    print(f"{'APTPruneVectorEnv steps/s':<36}{env_sps:>10.0f}")
    print(f"{'bound (PrunableViT direct) steps/s':<36}{bound_sps:>10.0f}   env/bound = {env_sps / bound_sps:.2f}")
    if sync_sps is not None and gain is not None:
        print(f"{'SyncVectorEnv x single env steps/s':<36}{sync_sps:>10.0f}   speed-up = {env_sps / sync_sps:.2f}")
        print(f"{'model batching gain (batch N / 1)':<36}{gain:>10.2f}")
    print(f"{'memory per sub-env (KiB)':<36}{mem / 1024:>10.1f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
