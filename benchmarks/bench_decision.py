"""What the APT agent's decision costs in wall time, per backbone and agent size, side by side in one run.

For each backbone and batch size, at one budget: the dense model (timm's forward), a budget agent deciding at
every stage (``act``, its mode: observe, score the live tokens, keep the budget's count), the masks it chose
replayed with nothing observed or decided (the pruning itself still applied: masks, gathers), and the physical
reference: the same blocks on a plain dense batch whose length at each stage is the agent's mean kept length, no
decision, no mask, no gather (``apt_env.eval.evaluate.DenseAtLengths``). The agents are fresh, seeded ones of each
size: at a budget the count is fixed, so the blocks run and the decision's cost do not depend on the agent's
weights. ``apt_env.eval.evaluate.measure_throughput`` times every row in one interleaved loop (median of repeats).
Printed: each row's images/s and its ratios to the others; ``physical / dense`` is the most any decision could reach.

Run: ``python benchmarks/bench_decision.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import tyro
from gymnasium import spaces

from agents.policy import APTPolicy
from apt_env.defaults import DEFAULT_CHECKPOINT
from apt_env.envs.env import APTPruneVectorEnv
from apt_env.envs.observe import BUDGET_KEYS, OBS_KEYS
from apt_env.eval.evaluate import Contender, Decisions, DenseAtLengths, fixed_masks, forward_policy, measure_throughput
from apt_env.eval.report import markdown_table
from apt_env.models.backbone import PrunableViT
from apt_env.models.checkpoint import load_backbone


@dataclass
class Args:
    models: tuple[str, ...] = ("default", "vit_small_patch16_224")
    """`default` (the shipped default backbone) and/or timm names (10 classes, at their own img_size)"""
    batch_sizes: tuple[int, ...] = (1, 256)
    """batch sizes for the default backbone"""
    timm_batch_sizes: tuple[int, ...] = (1, 16)
    """batch sizes for the timm backbones (224 px images: far more work per image than the default's)"""
    agent_sizes: tuple[int, ...] = (64, 32)
    """agent widths to time: the hidden width and the query/key/value width of each"""
    budget: float = 0.5
    """fraction of the dense backbone's GFLOPs"""
    repeats: int = 7
    """timed repetitions (median)"""
    threads: int = field(default_factory=torch.get_num_threads)
    """torch CPU threads"""
    seed: int = 0
    """seed of the images and the agents"""


def build(name: str) -> PrunableViT:
    if name == "default":
        return load_backbone(DEFAULT_CHECKPOINT).eval()
    return PrunableViT.from_timm(name, num_classes=10).eval()


def budget_space(pv: PrunableViT, budget: float) -> spaces.Dict:
    """What an agent observes on ``pv`` with a budget: the space of a one-image env (synthetic data, never drawn)."""
    return APTPruneVectorEnv(1, model=pv, dataset="synthetic", split="test", budget=budget).single_observation_space


def budget_agent(space: spaces.Dict, width: int) -> APTPolicy:
    """A fresh budget-conditioned agent (Gumbel top-k, its mode at test time) of one width."""
    return APTPolicy.from_space(space, hidden=width, qk_dim=width, sampling="topk").eval()


def rows_for(pv: PrunableViT, images: torch.Tensor, args: Args) -> list[Contender]:
    """The dense model, the physical reference, and per agent size the agent and its masks replayed."""
    keys = (*OBS_KEYS, *BUDGET_KEYS)
    index = torch.arange(len(images))
    rows: list[Contender] = [Contender("dense")]
    space = budget_space(pv, args.budget)
    for width in args.agent_sizes:
        policy = budget_agent(space, width)
        agent = Contender(f"agent {width}", lambda o, p=policy: p.act(o), args.budget, obs_keys=keys)
        with torch.inference_mode():
            _, _, masks = forward_policy(pv, images, agent.keep_fn, obs_keys=keys, index=index, budget=args.budget)
        decisions = Decisions(index, masks)
        rows += [agent, Contender(f"replay {width}", fixed_masks(decisions), args.budget, obs_keys=("stage",))]
    # A budget fixes the counts: every agent keeps the same, so the last one's decisions serve all.
    return [*rows, DenseAtLengths.of("physical", decisions)]


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"threads={args.threads} torch={torch.__version__} budget={args.budget:g}")
    table = []
    for name in args.models:
        pv = build(name)
        sizes = args.batch_sizes if name == "default" else args.timm_batch_sizes
        for batch in sizes:
            images = torch.randn(batch, pv.in_chans, *pv.img_size)
            contenders = rows_for(pv, images, args)
            speed = measure_throughput(pv, images, contenders, batch_size=batch, repeats=args.repeats)
            dense, physical = speed["dense"], speed["physical"]
            for width in args.agent_sizes:
                agent, replay = speed[f"agent {width}"], speed[f"replay {width}"]
                table.append({
                    "model": name, "batch": batch, "agent": f"{width}/{width}", "dense img/s": dense,
                    "agent img/s": agent, "agent / physical": agent / physical, "agent / replay": agent / replay,
                    "agent / dense": agent / dense, "replay / dense": replay / dense,
                    "physical / dense": physical / dense,
                })  # fmt: skip
            print(markdown_table(table[-len(args.agent_sizes) :], list(table[-1]), formats=FORMATS), flush=True)
    print()
    print(markdown_table(table, list(table[0]), formats=FORMATS))


FORMATS = {
    "dense img/s": ".1f", "agent img/s": ".1f", "agent / physical": ".2f", "agent / replay": ".2f",
    "agent / dense": ".2f", "replay / dense": ".2f", "physical / dense": ".2f",
}  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(Args))
