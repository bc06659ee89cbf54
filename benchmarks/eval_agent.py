"""A backbone checkpoint and its agent on the test split, next to the heuristic baselines.

Prints episode return, loss delta, top-1, GFLOPs, kept tokens and measured images per second for the agent,
keep-all, random and class-attention top-k (both at the agent's own keep ratio per stage).

Run: ``python benchmarks/eval_agent.py`` (the shipped default; about 2 minutes on 2 CPU cores), or
``--model runs/RUN/checkpoint --agent runs/RUN/agent``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import tyro

from agents.compare import compare_policies, format_comparison
from agents.io import DEFAULT_AGENT, load_policy
from apt_env.env import DEFAULT_CHECKPOINT, APTPruneVectorEnv


@dataclass
class Args:
    model: str = str(DEFAULT_CHECKPOINT)
    """backbone checkpoint folder"""
    agent: str = str(DEFAULT_AGENT)
    """agent checkpoint folder"""
    dataset: str = "fashion-mnist"
    """dataset (its test split)"""
    flops_weight: float = 0.5
    """weight of the compute term in the episode return"""
    num_envs: int = 64
    """images per env batch"""
    episodes: int = 16
    """env batches for the episode returns"""
    images: int = 0
    """test images for the accuracy pass (0: all)"""
    seed: int = 0
    """seed"""


def main(args: Args) -> None:
    torch.manual_seed(args.seed)
    envs = APTPruneVectorEnv(
        args.num_envs, model=args.model, dataset=args.dataset, split="test", flops_weight=args.flops_weight,
        channels=("plain", "multi"),
    )  # fmt: skip
    policy = load_policy(args.agent, observation_space=envs.single_observation_space)
    ratios, rows = compare_policies(
        envs, policy, dataset=args.dataset, episodes=args.episodes, images=args.images, seed=args.seed
    )
    print(f"{args.model} + {args.agent} on {args.dataset} (test split)")
    print(format_comparison(ratios, rows, envs.pv.num_patches))


if __name__ == "__main__":
    main(tyro.cli(Args))
