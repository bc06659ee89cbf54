"""Where to prune on the cluttered task: each set of pruning layers at one budget, on val, by training-free rules.

For every candidate ``--layers`` set the backbone runs at the per-stage keep ratio that meets ``--budget`` (the same
backbone GFLOPs for every set): class-attention top-k, random tokens, and the object-box oracle at top-k's counts (the
garment's tokens first: what an agent that knew where the garment is could reach), top-1 on ``--images`` val images,
and img/s of top-k over the dense model's, timed side by side at batch 256. The set to train the agent with is the
one whose oracle and top-k are highest at the budget: measured, not assumed.

    python experiments/cluttered_task/prune_layers.py --model runs/clut_plain/RUN/checkpoint
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import tyro
from torch.utils.data import Subset

from agents.baselines import ClsAttentionTopK, RandomKeep
from apt_env.data.cluttered import box_token_mask
from apt_env.data.datasets import dataset_for, make_loader
from apt_env.eval.evaluate import (
    Contender,
    box_first_at_counts,
    budget_keep_ratio,
    evaluate_accuracy,
    measure_throughput,
)
from apt_env.eval.report import markdown_table
from apt_env.models.checkpoint import load_backbone
from apt_env.models.flops import FlopCounter


@dataclass
class Args:
    model: str
    """the backbone checkpoint (trained on the cluttered task)"""
    dataset: str = "cluttered-fashion-mnist"
    """a dataset whose images know their object's box"""
    layers: tuple[str, ...] = ("1,3,4", "1,2,3", "1,2,4", "1,2", "0,2,4", "0,1,3", "0,2,3", "0,3", "0,2", "0")
    """candidate sets of pruning layers, each comma-separated"""
    budget: float = 0.25
    """the fraction of the dense backbone's GFLOPs every set is run at"""
    images: int = 2000
    """val images scored"""
    seed: int = 0
    """seed of random pruning and of the oracle's order inside the box"""


def main(args: Args) -> list[dict]:
    torch.manual_seed(args.seed)
    base = load_backbone(args.model).eval()
    val = dataset_for(base, args.dataset, "val")
    data = Subset(val, range(min(args.images, len(val))))
    loader = make_loader(data, batch_size=256, shuffle=False, seed=args.seed)
    height, rows = base.img_size[0], base.grid_size[0]
    box = box_token_mask(torch.tensor([val.box(i) for i in range(len(data))]), grid=rows, patch=height // rows)
    timing = torch.stack([data[i][0] for i in range(min(256, len(data)))])
    dense = FlopCounter(base.model).dense() / 1e9
    table = []
    for text in args.layers:
        pv = base.with_pruning(prune_layers=[int(v) for v in text.split(",")])
        ratio = budget_keep_ratio(pv, args.budget)
        topk = Contender("top-k", ClsAttentionTopK(ratio).act, args.budget, obs_keys=("cls_attn", "live", "stage"))
        rand = Contender("random", RandomKeep(ratio, seed=args.seed).act, args.budget, obs_keys=("live", "stage"))
        rows_, decisions = evaluate_accuracy(pv, loader, [topk, rand], desc=text)
        oracle = Contender("oracle", box_first_at_counts(decisions["top-k"], box, seed=args.seed), args.budget,
                           obs_keys=("live", "stage"))  # fmt: skip
        (oracle_row,), _ = evaluate_accuracy(pv, loader, [oracle], desc=f"{text} oracle")
        speed = measure_throughput(pv, timing, [Contender("dense"), topk], batch_size=len(timing), repeats=3)
        kept = decisions["top-k"].masks.sum(-1).double().mean(0).round().int().tolist()
        by = {r["policy"]: r for r in [*rows_, oracle_row]}
        table.append({
            "layers": text, "kept per stage": ", ".join(map(str, kept)),
            "backbone GFLOPs of dense": f"{by['top-k']['gflops_backbone'] / dense:.3f}",
            "oracle val top-1 (%)": f"{100 * by['oracle']['top1']:.2f}",
            "top-k val top-1 (%)": f"{100 * by['top-k']['top1']:.2f}",
            "random val top-1 (%)": f"{100 * by['random']['top1']:.2f}",
            "top-k img/s over dense, b256": f"{speed['top-k'] / speed['dense']:.2f}",
        })  # fmt: skip
    print(f"{args.dataset} val, {len(data)} images, budget {args.budget:g}; {args.model}")
    print(markdown_table(table, list(table[0])))
    return table


if __name__ == "__main__":
    main(tyro.cli(Args))
