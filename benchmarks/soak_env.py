"""Soak test of APTPrune-v0: a long run of the vector env with flat memory and no drift in speed.

Runs ``gym.make_vec("APTPrune-v0")`` (the default config) under random keep actions for
``--sub-env-steps`` sub-environment steps (one vector step is ``num_envs`` of them) and prints:

* resident memory (RSS) after a warm-up and at the end, and its growth;
* steps/s in each tenth of the run, the last tenth over the first and the slowest over the fastest.

Run: ``python benchmarks/soak_env.py`` (200,000 sub-env steps by default).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import tyro

import apt_env  # noqa: F401  (registers APTPrune-v0)


@dataclass
class Args:
    sub_env_steps: int = 200_000
    """sub-environment steps in all (vector steps x num_envs), warm-up excluded"""
    num_envs: int = 64
    """sub-environments (images per batch)"""
    warmup_steps: int = 50
    """vector steps before memory is first read (allocator and caches settle)"""
    keep_prob: float = 0.7
    """probability that a random action keeps a token"""
    seed: int = 0
    """seed of the env and the actions"""


def rss_mib() -> float:
    """Resident memory of this process now (not the peak), from /proc."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(args: Args) -> None:
    if args.sub_env_steps < 10 * args.num_envs:
        raise ValueError(f"--sub-env-steps must be at least 10 x num_envs = {10 * args.num_envs}")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    envs = gym.make_vec("APTPrune-v0", num_envs=args.num_envs)
    envs.reset(seed=args.seed)
    shape = envs.action_space.shape

    def step() -> None:
        envs.step((rng.random(shape) < args.keep_prob).astype(np.int8))

    for _ in range(args.warmup_steps):
        step()
    rss_start = rss_mib()
    steps = args.sub_env_steps // args.num_envs
    tenth = steps // 10
    rates = []
    for _ in range(10):
        t0 = time.perf_counter()
        for _ in range(tenth):
            step()
        rates.append(tenth * args.num_envs / (time.perf_counter() - t0))
    rss_end = rss_mib()
    envs.close()

    done = 10 * tenth * args.num_envs
    print(f"num_envs={args.num_envs} sub-env steps={done} (+{args.warmup_steps} warm-up vector steps)")
    print(f"RSS after warm-up {rss_start:.1f} MiB, at the end {rss_end:.1f} MiB, growth {rss_end / rss_start - 1:+.2%}")
    print("steps/s per tenth: " + " ".join(f"{r:.0f}" for r in rates))
    print(f"last tenth / first tenth = {rates[-1] / rates[0]:.2f}; min / max = {min(rates) / max(rates):.2f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
