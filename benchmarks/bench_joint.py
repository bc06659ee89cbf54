"""Time per epoch of joint (APT) training against plain training, measured side by side in one run.

Per training step of the default ViT on Fashion-MNIST batches: the plain channel alone, and the three
channels with the agent's masks, as the shipped default trains (``--budget 0.25 1.0
--reward vs_random``, the agent's mode; ``--budget`` none times a Bernoulli agent's samples instead), with one
budget per batch (``--budget-groups 1``, the default), four, and one per image (how the shipped default was trained);
plus one agent phase (PPO on the env over the same backbone). An epoch of the given schedule is then ``steps x
step time`` (plain) and ``steps x joint step time + one agent phase`` (joint), printed as their ratio.

Run: ``python benchmarks/bench_joint.py``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import tyro

from agents.policy import APTPolicy
from agents.ppo import NativePPO
from apt_env.data.datasets import dataset_for, make_loader
from apt_env.envs.env import APTPruneVectorEnv
from apt_env.eval.report import markdown_table
from apt_env.models.backbone import DEFAULT_MODEL_KWARGS, DEFAULT_MODEL_NAME, PrunableViT
from apt_env.train.joint import ChannelLosses, draw_budgets
from apt_env.train.runs import seed_everything


@dataclass
class Args:
    steps: int = 32
    """training steps timed per kind (interleaved, after a warm-up step; means, as budgets vary by step)"""
    batch_size: int = 128
    """training batch size"""
    steps_per_epoch: tuple[int, ...] = (50, 468)
    """epoch lengths to report (the default short schedule, and a full pass over Fashion-MNIST)"""
    agent_steps: int = 6144
    """env transitions of one agent phase (train_backbone's default)"""
    num_envs: int = 64
    """env batch of the agent phase"""
    budget: tuple[float, float] | None = (0.25, 1.0)
    """the budget range of joint training (none: a Bernoulli agent that chooses its count)"""
    budget_groups: tuple[int | None, ...] = (1, 4, None)
    """distinct budgets per batch to time, each a row of its own (train_backbone's --budget-groups; none: one per
    image)"""
    agent_hidden: int = 64
    """width of the agent's per-token MLP"""
    agent_qk_dim: int = 64
    """width of the agent's query, key and value projections"""
    seed: int = 0
    """seed"""


def pruning_agent(args: Args, pv: PrunableViT) -> NativePPO:
    """An agent that already prunes, as after the first agent phase (half the agent steps of PPO)."""
    budgets = args.budget is not None
    envs = APTPruneVectorEnv(
        args.num_envs, model=pv, flops_weight=0.5, budget=args.budget, reward="vs_random" if budgets else "loss_delta"
    )
    policy = APTPolicy.for_env(
        envs, hidden=args.agent_hidden, qk_dim=args.agent_qk_dim, sampling="topk" if budgets else "bernoulli"
    )
    agent = NativePPO(envs, policy, seed=args.seed)
    agent.learn(args.agent_steps // 2)
    return agent


def time_backbone_steps(
    args: Args, pv: PrunableViT, agent: NativePPO, kinds: list[int | None]
) -> tuple[float, dict[int | None, float]]:
    """Mean seconds of a plain step and of a joint step of every budget kind, interleaved step by step."""
    data = dataset_for(pv, "fashion-mnist", "train", augment=True)
    batches = iter(make_loader(data, batch_size=args.batch_size, shuffle=True, seed=args.seed, drop_last=True))
    budgets = args.budget is not None
    agent.policy.eval()
    keep_fn = lambda obs: agent.policy.act(obs, deterministic=budgets, generator=agent.generator)  # noqa: E731
    losses = ChannelLosses(pv)
    optimizer = torch.optim.AdamW(pv.parameters(), lr=1e-4)
    strata = torch.randperm(args.steps).tolist()

    def step(pruned: bool, stage: int, groups: int | None = None, timed: int | None = None) -> None:
        images, labels = next(batches)
        budget = None
        if pruned:
            low, high = args.budget
            if groups == 1 and timed is not None:
                # One budget per batch: timed step i draws from the strata[i]-th of equal parts of the range, so the
                # mean over the steps estimates an epoch's without the spread of a few single draws.
                width = (high - low) / args.steps
                low, high = low + width * strata[timed], low + width * (strata[timed] + 1)
            budget = draw_budgets((low, high), len(labels), images.device, groups)
        out, _ = losses(images, labels, keep_fn if pruned else None, single_stage=stage, budget=budget)
        optimizer.zero_grad()
        sum(out.values()).backward()
        optimizer.step()

    pv.train()
    step(False, 0)
    for groups in kinds:
        step(True, 0, groups)
    plain: list[float] = []
    joint: dict[int | None, list[float]] = {groups: [] for groups in kinds}
    for i in range(args.steps):
        start = time.perf_counter()
        step(False, 0)
        plain.append(time.perf_counter() - start)
        for groups in kinds:
            start = time.perf_counter()
            step(True, i % pv.num_stages, groups, timed=i)
            joint[groups].append(time.perf_counter() - start)
    # Means, not medians: a step's time follows the budgets it drew, and an epoch is the sum of its steps.
    return statistics.mean(plain), {groups: statistics.mean(times) for groups, times in joint.items()}


def epoch_rows(args: Args, t_plain: float, t_joint: dict[int | None, float], t_agent: float) -> list[dict]:
    """A plain epoch against a joint one (backbone steps plus the agent phase), per budget kind and epoch length."""
    budgets = args.budget is not None
    rows = []
    for groups, t in t_joint.items():
        name = "Bernoulli" if not budgets else "one per image" if groups is None else f"{groups} per batch"
        name += " (default)" if budgets and groups == 1 else ""
        for steps in args.steps_per_epoch:
            plain_epoch, joint_epoch = steps * t_plain, steps * t + t_agent
            rows.append({"budgets": name, "step joint / plain": t / t_plain, "steps/epoch": steps,
                         "plain epoch (s)": plain_epoch, "joint epoch (s)": joint_epoch,
                         "joint / plain": joint_epoch / plain_epoch})  # fmt: skip
    return rows


def main(args: Args) -> None:
    seed_everything(args.seed)
    pv = PrunableViT.from_timm(DEFAULT_MODEL_NAME, **DEFAULT_MODEL_KWARGS)
    agent = pruning_agent(args, pv)
    budgets = args.budget is not None
    kinds: list[int | None] = list(args.budget_groups) if budgets else [None]
    t_plain, t_joint = time_backbone_steps(args, pv, agent, kinds)

    pv.eval()
    agent.policy.train()
    agent.restart_episodes()
    start = time.perf_counter()
    stats = agent.learn(args.agent_steps)
    t_agent = time.perf_counter() - start

    kind = f"budgets {args.budget[0]:g}-{args.budget[1]:g}, the agent's mode" if budgets else "Bernoulli agent, sampled"
    print(f"default ViT, batch {args.batch_size}, {kind}; agent keep ratio at the end {stats[-1]['keep_ratio']:.2f}")
    print(f"agent phase: {args.agent_steps} transitions in {t_agent:.1f} s")
    rows = epoch_rows(args, t_plain, t_joint, t_agent)
    formats = {"budgets": "s", "step joint / plain": ".2f", "steps/epoch": "d", "plain epoch (s)": ".1f",
               "joint epoch (s)": ".1f", "joint / plain": ".2f"}  # fmt: skip
    print(f"step: plain {t_plain:.3f} s (mean of {args.steps})")
    print(markdown_table(rows, list(formats), formats=formats))
    for row in rows:
        if row["steps/epoch"] == max(args.steps_per_epoch):
            ratio = row["joint / plain"]
            print(f"joint / plain, an epoch of {row['steps/epoch']} steps: {ratio:.2f}x ({row['budgets']})")


if __name__ == "__main__":
    main(tyro.cli(Args))
