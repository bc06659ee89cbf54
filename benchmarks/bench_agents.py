"""Trainer overhead, side by side in one run on the same env and policy.

Printed: env transitions per second of the env alone under random actions (tensor API), of the native
PPO trainer and of stable-baselines3 PPO through ``SB3VecEnv``, both with the APT policy, the same rollout
size and the same PPO epochs and minibatches; and each trainer's *overhead* per transition: its time
beyond the env's own (``1/trainer - 1/env``), split into the gradient updates (the same learning work in
both) and the rest (acting, buffers, conversions: the trainer's own plumbing). Targets: native overhead at
most a fifth of SB3's; native end to end at least 0.7 of the env alone.

Run: ``python benchmarks/bench_agents.py`` (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import tyro
from stable_baselines3 import PPO

from agents.ppo import NativePPO
from agents.sb3_policy import APTActorCriticPolicy
from apt_env.env import APTPruneVectorEnv
from apt_env.runs import seed_everything
from apt_env.sb3_vec_env import SB3VecEnv


@dataclass
class Args:
    num_envs: int = 64
    """sub-environments"""
    rollouts: int = 3
    """rollouts timed per trainer (after one warm-up rollout)"""
    episodes_per_rollout: int = 4
    """episodes per rollout (both trainers)"""
    seed: int = 0
    """seed"""


def env_alone(envs: APTPruneVectorEnv, steps: int) -> float:
    """Transitions per second of the env under random keep actions, tensor API."""
    gen = torch.Generator().manual_seed(0)
    envs.reset_tensors(seed=0)
    shape = (envs.num_envs, envs.pv.num_patches)
    envs.step_tensors(torch.rand(shape, generator=gen) < 0.7)
    start = time.perf_counter()
    for _ in range(steps):
        envs.step_tensors(torch.rand(shape, generator=gen) < 0.7)
    return steps * envs.num_envs / (time.perf_counter() - start)


class Stopwatch:
    """Total seconds spent in a wrapped method."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def main(args: Args) -> None:
    seed_everything(args.seed)
    envs = APTPruneVectorEnv(args.num_envs)
    k = envs.pv.num_stages
    rollout = args.episodes_per_rollout * k * args.num_envs
    policy_kwargs = dict(hidden=64)

    native = NativePPO(envs, policy_kwargs=policy_kwargs, episodes_per_rollout=args.episodes_per_rollout, seed=0)
    native.learn(rollout)  # warm-up
    native_updates = Stopwatch()
    native._update = native_updates.wrap(native._update)
    start = time.perf_counter()
    native.learn(args.rollouts * rollout)
    native_sps = args.rollouts * rollout / (time.perf_counter() - start)

    sb3 = PPO(
        APTActorCriticPolicy,
        SB3VecEnv(envs),
        n_steps=args.episodes_per_rollout * k,
        batch_size=rollout // 4,
        n_epochs=4,
        gamma=1.0,
        policy_kwargs=dict(policy_kwargs),
        seed=0,
        device=envs.device,
    )
    sb3.learn(rollout)  # warm-up
    sb3_updates = Stopwatch()
    sb3.train = sb3_updates.wrap(sb3.train)
    start = time.perf_counter()
    sb3.learn(args.rollouts * rollout, reset_num_timesteps=False)
    sb3_sps = args.rollouts * rollout / (time.perf_counter() - start)

    env_sps = env_alone(envs, args.rollouts * args.episodes_per_rollout * k)
    steps = args.rollouts * rollout
    native_over, sb3_over = 1 / native_sps - 1 / env_sps, 1 / sb3_sps - 1 / env_sps
    native_upd, sb3_upd = native_updates.seconds / steps, sb3_updates.seconds / steps
    print(f"num_envs={args.num_envs} stages={k} rollout={rollout} transitions, {args.rollouts} rollouts timed")
    print(f"{'':<20}{'transitions/s':>14}{'overhead us/tr':>16}{'of it updates':>15}{'of it the rest':>16}")
    print(f"{'env alone (random)':<20}{env_sps:>14.0f}")
    for name, sps, over, upd in (("native PPO", native_sps, native_over, native_upd),
                                 ("SB3 PPO (adapter)", sb3_sps, sb3_over, sb3_upd)):  # fmt: skip
        print(f"{name:<20}{sps:>14.0f}{1e6 * over:>16.1f}{1e6 * upd:>15.1f}{1e6 * (over - upd):>16.1f}")
    print(f"native overhead / SB3 overhead = {native_over / sb3_over:.2f} "
          f"(without the updates: {(native_over - native_upd) / (sb3_over - sb3_upd):.2f})")  # fmt: skip
    print(f"native end to end / env alone  = {native_sps / env_sps:.2f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
