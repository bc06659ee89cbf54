"""Trainer overhead, side by side in one run on the same env and policy.

Native PPO and stable-baselines3 PPO (through ``SB3VecEnv``) train the same APT policy with the same rollout
size, PPO epochs and minibatches, each on its own copy of the default env, timed in turns. Each trainer's time per
transition is split into the env's own work (drawing and embedding new images and the backbone passes,
``APTPruneVectorEnv._start`` and ``PruningEpisodes.step``, measured inside each trainer, since what a policy keeps
changes the env's cost), the gradient updates and the rest: acting, buffers and conversions, the trainer's own
plumbing. Printed as the median over ``--repeats`` turns: native transitions/s over SB3's (with the most it could
reach, were native plumbing free) and native plumbing per transition over SB3's.

Run: ``python benchmarks/bench_agents.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import tyro
from stable_baselines3 import PPO

from agents.ppo import NativePPO
from agents.sb3_policy import APTActorCriticPolicy
from apt_env.envs.env import APTPruneVectorEnv
from apt_env.envs.sb3_vec_env import SB3VecEnv
from apt_env.train.runs import seed_everything


@dataclass
class Args:
    num_envs: int = 64
    """sub-environments"""
    rollouts: int = 2
    """rollouts per timed turn (after one warm-up rollout)"""
    episodes_per_rollout: int = 4
    """episodes per rollout (both trainers)"""
    repeats: int = 3
    """timed turns per trainer, interleaved; medians are printed"""
    seed: int = 0
    """seed"""


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


@dataclass
class Turn:
    """Seconds per transition of one timed turn of a trainer: in all, in the env's own work, in updates."""

    total: float
    env: float
    updates: float

    @property
    def plumbing(self) -> float:
        return self.total - self.env - self.updates


def timed_turn(learn: Callable[[], None], steps: int, env: Stopwatch, updates: Stopwatch) -> Turn:
    env.seconds = updates.seconds = 0.0
    start = time.perf_counter()
    learn()
    return Turn((time.perf_counter() - start) / steps, env.seconds / steps, updates.seconds / steps)


def main(args: Args) -> None:
    seed_everything(args.seed)
    native_envs, sb3_envs = APTPruneVectorEnv(args.num_envs), APTPruneVectorEnv(args.num_envs)
    k = native_envs.pv.num_stages
    rollout = args.episodes_per_rollout * k * args.num_envs
    steps = args.rollouts * rollout
    policy_kwargs = dict(hidden=64)

    native = NativePPO(native_envs, policy_kwargs=policy_kwargs, episodes_per_rollout=args.episodes_per_rollout, seed=0)
    sb3 = PPO(
        APTActorCriticPolicy,
        SB3VecEnv(sb3_envs),
        n_steps=args.episodes_per_rollout * k,
        batch_size=rollout // 4,
        n_epochs=4,
        gamma=1.0,
        policy_kwargs=dict(policy_kwargs),
        seed=0,
        device=native_envs.device,
    )
    native.learn(rollout)  # warm-up
    sb3.learn(rollout)
    watches = {name: (Stopwatch(), Stopwatch()) for name in ("native", "sb3")}
    for name, envs in (("native", native_envs), ("sb3", sb3_envs)):  # the env's own work: new images, then stages
        envs._start = watches[name][0].wrap(envs._start)
        envs.episodes.step = watches[name][0].wrap(envs.episodes.step)
    native._update = watches["native"][1].wrap(native._update)
    sb3.train = watches["sb3"][1].wrap(sb3.train)
    learn = {
        "native": lambda: native.learn(steps),
        "sb3": lambda: sb3.learn(steps, reset_num_timesteps=False),
    }
    turns: dict[str, list[Turn]] = {"native": [], "sb3": []}
    for rep in range(args.repeats):
        for name in ("native", "sb3") if rep % 2 == 0 else ("sb3", "native"):
            turns[name].append(timed_turn(learn[name], steps, *watches[name]))

    print(f"num_envs={args.num_envs} stages={k} rollout={rollout} transitions, {args.rollouts} rollouts a turn, "
          f"{args.repeats} turns each, interleaved; medians")  # fmt: skip
    print(f"{'':<20}{'transitions/s':>14}{'us/tr in all':>14}{'env':>8}{'updates':>9}{'plumbing':>10}")
    for name, label in (("native", "native PPO"), ("sb3", "SB3 PPO (adapter)")):
        t = turns[name]
        med = {key: statistics.median(getattr(x, key) for x in t) for key in ("total", "env", "updates", "plumbing")}
        print(f"{label:<20}{1 / med['total']:>14.0f}{1e6 * med['total']:>14.0f}{1e6 * med['env']:>8.0f}"
              f"{1e6 * med['updates']:>9.0f}{1e6 * med['plumbing']:>10.0f}")  # fmt: skip
    speed = statistics.median(s.total / n.total for n, s in zip(turns["native"], turns["sb3"]))
    plumbing = statistics.median(n.plumbing / s.plumbing for n, s in zip(turns["native"], turns["sb3"]))
    # Were native plumbing free, a transition would still cost the env's work and the updates, which both trainers do.
    bound = statistics.median(s.total / (n.env + n.updates) for n, s in zip(turns["native"], turns["sb3"]))
    print(f"native transitions/s / SB3's = {speed:.2f} ({bound:.2f} with no native plumbing at all)")
    print(f"native plumbing / SB3's      = {plumbing:.2f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
