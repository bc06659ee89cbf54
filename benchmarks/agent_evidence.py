"""Does RL learn to prune? Evidence on the default data and backbone, for a fixed budget.

1. The native PPO agent, trained for ``--native-steps`` transitions, against random pruning and
   class-attention top-k (EViT's rule) run at the agent's own keep ratio per stage: mean episode
   return on the test split, on the same images.
2. stable-baselines3 PPO and A2C with the APT policy, ``--sb3-steps`` transitions each: mean episode
   return over the first 10% and the last 10% of training.

Run: ``python benchmarks/agent_evidence.py`` (about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback

from agents.baselines import ClsAttentionTopK, RandomKeep
from agents.ppo import NativePPO
from agents.rollout import at_stage_ratios, evaluate_returns
from agents.sb3_policy import APTActorCriticPolicy
from apt_env.env import APTPruneVectorEnv
from apt_env.report import markdown_table
from apt_env.runs import seed_everything
from apt_env.sb3_vec_env import SB3VecEnv


@dataclass
class Args:
    native_steps: int = 60_000
    """native PPO budget (transitions)"""
    sb3_steps: int = 30_000
    """budget of SB3 PPO and of SB3 A2C (transitions each)"""
    num_envs: int = 64
    """sub-environments"""
    flops_weight: float = 0.5
    """weight of the compute term of the reward"""
    eval_episodes: int = 16
    """test-split batches for the comparison"""
    seed: int = 1
    """seed"""


class EpisodeReturns(BaseCallback):
    """Mean return of each batch of episodes that ends during SB3 training."""

    def __init__(self) -> None:
        super().__init__()
        self.means: list[float] = []
        self.acc: np.ndarray | None = None

    def _on_step(self) -> bool:
        rewards = self.locals["rewards"].astype(np.float64)
        self.acc = rewards if self.acc is None else self.acc + rewards
        if self.locals["dones"].all():
            self.means.append(float(self.acc.mean()))
            self.acc = None
        return True


def envs_for(args: Args, split: str) -> APTPruneVectorEnv:
    return APTPruneVectorEnv(args.num_envs, split=split, flops_weight=args.flops_weight)


def main(args: Args) -> None:
    seed_everything(args.seed)
    train, test = envs_for(args, "train"), envs_for(args, "test")
    print(f"default backbone, fashion-mnist, flops_weight={args.flops_weight}, num_envs={args.num_envs}")

    start = time.perf_counter()
    trainer = NativePPO(train, seed=args.seed)
    trainer.learn(args.native_steps)
    trainer.policy.eval()
    agent = lambda obs: trainer.policy.act(obs, deterministic=True)  # noqa: E731
    same = dict(episodes=args.eval_episodes, seed=args.seed)  # the same test images for every policy
    ours = evaluate_returns(test, agent, **same)
    ratios = ours["stage_ratios"]
    rows = {
        "native PPO agent": ours,
        "random (same ratio)": evaluate_returns(
            test, at_stage_ratios(RandomKeep(0.5, seed=args.seed).act, ratios), **same
        ),
        "cls-attn top-k (same ratio)": evaluate_returns(
            test, at_stage_ratios(ClsAttentionTopK(0.5).act, ratios), **same
        ),
    }
    print(f"\n1. native PPO, {args.native_steps} transitions ({time.perf_counter() - start:.0f} s); test split, "
          f"{args.eval_episodes * args.num_envs} episodes; agent's stage keep ratios "
          + ", ".join(f"{r:.2f}" for r in ratios))  # fmt: skip
    table = [
        {"policy": name, "episode return": r["episode_return"], "loss delta": r["loss_delta"],
         "final keep ratio": r["keep_ratio"], "GFLOPs": r["gflops"]}
        for name, r in rows.items()
    ]  # fmt: skip
    formats = {"episode return": ".4f", "loss delta": ".4f", "final keep ratio": ".3f", "GFLOPs": ".4f"}
    print(markdown_table(table, list(table[0]), formats=formats))

    print(f"\n2. stable-baselines3, {args.sb3_steps} transitions each: mean episode return, first vs last 10%")
    curves = []
    k = train.pv.num_stages
    for algo, extra in ((PPO, dict(n_steps=4 * k, batch_size=4 * k * args.num_envs // 4)), (A2C, dict(n_steps=k))):
        torch.manual_seed(args.seed)
        venv = SB3VecEnv(envs_for(args, "train"))
        model = algo(
            APTActorCriticPolicy, venv, gamma=1.0, seed=args.seed, **extra
        )
        returns = EpisodeReturns()
        model.learn(args.sb3_steps, callback=returns, progress_bar=True)
        tenth = max(1, len(returns.means) // 10)
        curves.append({
            "algorithm": algo.__name__, "first 10%": np.mean(returns.means[:tenth]),
            "last 10%": np.mean(returns.means[-tenth:]), "episodes": f"{len(returns.means)} x {args.num_envs}",
        })  # fmt: skip
    print(markdown_table(curves, list(curves[0]), formats={"first 10%": ".4f", "last 10%": ".4f"}, left=["algorithm"]))


if __name__ == "__main__":
    main(tyro.cli(Args))
