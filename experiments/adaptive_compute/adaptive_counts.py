"""Where an adaptive agent spends a mean budget, against the fixed-count agent it was made from, on held-out images.

For each budget and each agent: top-1 with its 95% interval, the paired difference from the fixed-count agent on the
same images (its 95% interval from the per-image differences), the mean backbone GFLOPs as a fraction of the dense
model's, the patch tokens kept after each stage (mean and spread over images), and the rank correlation of the
last stage's count with the dense model's confidence (negative: easy images get fewer tokens). The images are
``--images`` of ``--split`` from ``--start``: by default val images the thresholds were not calibrated on (the first
1,000), so that adaptive agents can be chosen here without the test split.

Run: ``python experiments/adaptive_compute/adaptive_counts.py --adaptive RUN/agent [RUN2/agent ...]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from paired import paired_columns

from agents.calibrate import check_calibrated_for
from agents.io import load_policy
from apt_env.data.datasets import dataset_for
from apt_env.defaults import P2_AGENT, P2_CHECKPOINT
from apt_env.envs.observe import BUDGET_KEYS, OBS_KEYS
from apt_env.eval.evaluate import forward_policy
from apt_env.eval.report import markdown_table
from apt_env.models.checkpoint import load_backbone
from apt_env.models.flops import FlopCounter
from apt_env.train.distributed import state_digest


@dataclass
class Args:
    adaptive: tuple[str, ...]
    """mean-budget agents (``train_agent.py --budget-mean``), calibrated for ``--model``"""
    model: str = str(P2_CHECKPOINT)
    """the backbone checkpoint"""
    agent: str = str(P2_AGENT)
    """the fixed-count agent they are compared with"""
    dataset: str = "fashion-mnist"
    split: Literal["train", "val", "test"] = "val"
    start: int = 1000
    """the first image (val's first 1,000 calibrate the thresholds)"""
    images: int = 2000
    budgets: tuple[float, ...] = (0.25, 0.5, 0.7)
    data_root: str = "data"
    threads: int = 2


@torch.no_grad()  # not inference mode: the agents' weights are loaded here and must stay ordinary tensors
def main(args: Args) -> list[dict]:
    torch.set_num_threads(args.threads)
    pv = load_backbone(args.model)
    fixed = load_policy(args.agent).eval()
    adaptive = {path: load_policy(path).eval() for path in args.adaptive}
    for path, policy in adaptive.items():
        if policy.sampling != "threshold":
            raise ValueError(f"--adaptive {path} keeps fixed counts (sampling {policy.sampling!r}): pass it as --agent")
        check_calibrated_for(policy, backbone=state_digest(pv.model), budgets=args.budgets)
    data = dataset_for(pv, args.dataset, args.split, root=args.data_root)
    stop = min(args.start + args.images, len(data))
    if stop <= args.start:
        raise ValueError(f"{args.dataset}/{args.split} has {len(data)} images: none from --start {args.start}")
    x = torch.stack([data[i][0] for i in range(args.start, stop)])
    y = torch.tensor([data[i][1] for i in range(args.start, stop)])
    confidence = torch.cat([pv.model(chunk).softmax(-1).amax(-1) for chunk in x.split(256)])
    keys, counter = (*OBS_KEYS, *BUDGET_KEYS), FlopCounter(pv.model)
    rows = []
    for budget in args.budgets:
        reference = None
        for name, policy in (("fixed-count agent", fixed), *adaptive.items()):
            correct, counts, flops = [], [], 0.0
            for chunk, labels in zip(x.split(256), y.split(256)):
                logits, kept, masks = forward_policy(pv, chunk, policy.act, obs_keys=keys, budget=budget)
                correct.append(logits.argmax(-1) == labels)
                counts.append(masks.sum(-1))
                flops += float(counter(kept + pv.num_prefix_tokens).sum())
            correct, counts = torch.cat(correct).double(), torch.cat(counts).double()  # (B,), (B, K)
            reference = correct if reference is None else reference
            gflops = flops / len(x) / counter.dense()
            columns = paired_columns(correct, reference, gflops, counts, confidence, versus="fixed")
            rows.append({"budget": f"{budget:g}", "agent": name, **columns})
    print(f"{args.dataset}/{args.split} images {args.start}-{stop - 1} ({stop - args.start}), backbone {args.model}")
    print(markdown_table(rows, list(rows[0])))
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
