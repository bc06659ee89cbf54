"""Reference scores of APTPrune-v0 at fixed budgets: the mean episode return and the top-1 of every policy.

For each budget in ``--budgets`` the env is ``APTPrune-v0`` with that ``budget`` (its default reward,
``loss_delta``, and its default backbone unless ``--model``), on ``--split``. Every policy plays the same
``--episodes`` batches of ``--num-envs`` images (one seed), and is then scored on the whole split by top-1 with its
95% interval, its own compute counted in GFLOPs. The policies: random tokens and class-attention top-k (EViT) at the
budget's keep ratio, and every agent of ``--agents NAME=FOLDER`` (an ``agents.io`` folder, as ``train_agent.py`` and
``train_backbone.py`` write), run by its mode through its budget input.

Run: ``python benchmarks/reference_scores.py --agents native=runs/ref_native/agent``; docs/reference_scores.md
lists the commands that train each agent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import tyro
from torch.utils.data import Subset

from agents.baselines import ClsAttentionTopK, RandomKeep
from agents.io import load_policy
from agents.rollout import evaluate_returns
from apt_env.data.datasets import make_loader
from apt_env.envs.env import APTPruneVectorEnv
from apt_env.envs.observe import BUDGET_KEYS, OBS_KEYS
from apt_env.eval.evaluate import Contender, budget_keep_ratio, evaluate_accuracy
from apt_env.eval.report import markdown_table
from apt_env.train.runs import seed_everything


@dataclass
class Args:
    agents: tuple[str, ...] = ()
    """agents to score, each NAME=FOLDER; the heuristics are always scored"""
    budgets: tuple[float, ...] = (0.3, 0.5, 0.7)
    """the env configurations: fractions of the dense backbone's GFLOPs"""
    model: str | None = None
    """the backbone checkpoint (default: the env's default)"""
    split: str = "test"
    """the data split episodes and top-1 are drawn from"""
    num_envs: int = 64
    """images per episode batch"""
    episodes: int = 16
    """episode batches per policy and budget (the same images for every policy)"""
    images: int = 0
    """top-1 on the split's first IMAGES images (0: all of them)"""
    batch_size: int = 256
    """images per batch for top-1"""
    seed: int = 0
    """the episodes' seed"""


def policies(args: Args, envs: APTPruneVectorEnv, budget: float) -> dict[str, tuple]:
    """Every policy at ``budget``: ``(act for the env, Contender for top-1)``, by name."""
    ratio = budget_keep_ratio(envs.pv, budget)
    rand, top = RandomKeep(ratio, seed=args.seed), ClsAttentionTopK(ratio)
    out = {
        "random": (rand.act, Contender("random", rand.act, budget, obs_keys=("live", "stage"))),
        "cls-attn top-k": (
            top.act,
            Contender("cls-attn top-k", top.act, budget, obs_keys=("cls_attn", "live", "stage")),
        ),
    }
    for spec in args.agents:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--agents takes NAME=FOLDER, got {spec!r}")
        policy = load_policy(folder, observation_space=envs.single_observation_space).eval()
        if not policy.use_budget:
            raise ValueError(f"agent {folder} has no budget input: train it with --budget LOW HIGH")
        act = lambda obs, p=policy: p.act(obs, deterministic=True)  # noqa: E731
        keys = (*OBS_KEYS, *BUDGET_KEYS)
        out[name] = (act, Contender(name, act, budget, obs_keys=keys, flops=policy.decision_flops))
    return out


def score_budget(args: Args, budget: float) -> list[dict]:
    """The rows of one env configuration."""
    envs = APTPruneVectorEnv(args.num_envs, model=args.model, split=args.split, budget=budget)
    table = policies(args, envs, budget)
    returns = {name: evaluate_returns(envs, act, episodes=args.episodes, seed=args.seed) for name, (act, _) in
               table.items()}  # fmt: skip
    data = envs.data if not args.images else Subset(envs.data, range(min(args.images, len(envs.data))))
    loader = make_loader(data, batch_size=args.batch_size, shuffle=False, seed=args.seed)
    rows, _ = evaluate_accuracy(envs.pv, loader, [c for _, c in table.values()], desc=f"budget {budget:g}")
    return [
        {
            "budget": budget, "policy": row["policy"], "mean_return": returns[row["policy"]]["episode_return"],
            "top1": row["top1"], "top1_low": row["top1_low"], "top1_high": row["top1_high"], "gflops": row["gflops"],
            "episodes": args.episodes * args.num_envs, "num_images": row["num_images"],
        }
        for row in rows
    ]  # fmt: skip


def main(args: Args) -> list[dict]:
    seed_everything(args.seed)
    torch.set_grad_enabled(False)
    rows = [row for budget in args.budgets for row in score_budget(args, budget)]
    columns = ("budget", "policy", "mean_return", "top1", "top1_low", "top1_high", "gflops", "episodes", "num_images")
    print(f"APTPrune-v0 ({args.model or 'default backbone'}), split {args.split}")
    print(markdown_table(rows, columns, formats={"budget": "g", "mean_return": ".4f", "gflops": ".4g"}))
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
