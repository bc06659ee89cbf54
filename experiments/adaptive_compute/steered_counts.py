"""Do hard images gain from more tokens? A mean-budget agent steered by a probe of what pruning costs each image.

The threshold agent made from ``--agent`` (its weights, ``sampling="threshold"``, as ``train_agent.py
--total-env-steps 0`` makes it) keeps each image's tokens above a per-stage threshold, so an image's count follows
its logits. Here every logit of an image at stage ``k`` also gets ``weight * (w_k . norm(cls) + b_k)``: a ridge probe
of the class token at that stage, fitted on ``--train-images`` of the train split to predict (standardized) how much
pruning at the budget raises that image's loss over the dense model's. A positive weight moves tokens to the images
the probe calls costly, without changing which tokens an image ranks first. Each weight is calibrated per stage on
val images 0-999 and scored on ``--images`` val images from ``--start``: top-1, the paired difference from the
unsteered agent (weight 0) with its 95% interval, backbone GFLOPs, counts per stage, and the Spearman correlation of
the last stage's count with the dense model's confidence.

Run: ``python experiments/adaptive_compute/steered_counts.py`` (the 196-token model and its agent; ~10 minutes on 2
CPU cores).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import tyro
from paired import paired_columns
from torch import Tensor

from agents.calibrate import calibrate_thresholds
from agents.io import load_policy
from agents.policy import APTPolicy
from apt_env.data.datasets import dataset_for
from apt_env.defaults import P2_AGENT, P2_CHECKPOINT
from apt_env.envs.observe import BUDGET_KEYS, OBS_KEYS
from apt_env.eval.evaluate import forward_policy
from apt_env.eval.report import markdown_table
from apt_env.models.backbone import PrunableViT
from apt_env.models.checkpoint import load_backbone
from apt_env.models.flops import FlopCounter

KEYS = (*OBS_KEYS, *BUDGET_KEYS)


@dataclass
class Args:
    model: str = str(P2_CHECKPOINT)
    """the backbone checkpoint"""
    agent: str = str(P2_AGENT)
    """a budget agent (fixed-count or threshold); it runs here as a threshold agent"""
    dataset: str = "fashion-mnist"
    weights: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    """the probe's weights in logits per standard deviation of its target; 0: the unsteered agent"""
    budgets: tuple[float, ...] = (0.25, 0.5)
    train_images: int = 4000
    """train images the probe is fitted on (a seeded draw)"""
    calibration_images: int = 1000
    """val images 0 to this calibrate each weight's thresholds"""
    start: int = 1000
    """the first val image scored"""
    images: int = 2000
    ridge: float = 10.0
    """the probe's ridge penalty"""
    seed: int = 0
    data_root: str = "data"
    threads: int = 2


class SteeredPolicy(APTPolicy):
    """A threshold agent whose logits in a row all get ``probe[k] . [norm(cls), 1]`` added at stage ``k``: a
    per-image offset that moves the image's count, not its ranking of tokens."""

    probe: Tensor | None = None  # (K, C + 1)

    def keep_logits(self, obs: Mapping[str, Any]) -> Tensor:
        logits = super().keep_logits(obs)
        if self.probe is None:
            return logits
        o = self.prepare(obs)
        row = self.probe[o.stage]  # (B, C + 1)
        offset = (self.cls_norm(o.cls) * row[:, :-1]).sum(1) + row[:, -1]
        return logits + offset.unsqueeze(1).to(logits.dtype)


def take(pv: PrunableViT, args: Args, split: str, index: list[int]) -> tuple[Tensor, Tensor]:
    data = dataset_for(pv, args.dataset, split, root=args.data_root)
    if not index or index[-1] >= len(data):
        raise ValueError(f"{args.dataset}/{split} has {len(data)} images; asked for images up to {index[-1:]}")
    return torch.stack([data[i][0] for i in index]), torch.tensor([data[i][1] for i in index])


def run(policy: SteeredPolicy, pv: PrunableViT, x: Tensor, y: Tensor, budget: float) -> dict[str, Tensor]:
    """Per image: cross-entropy, correct, patch tokens entering each block, kept per stage; and the class token
    (normalized as the policy reads it) at each stage."""
    feats: list[list[Tensor]] = [[] for _ in range(pv.num_stages)]

    def keep(obs: dict[str, Tensor]) -> Tensor:
        feats[int(obs["stage"][0])].append(policy.cls_norm(obs["cls"]))
        return policy.act(obs)

    out: dict[str, list[Tensor]] = {"loss": [], "correct": [], "kept": [], "counts": []}
    for chunk, labels in zip(x.split(256), y.split(256)):
        logits, kept, masks = forward_policy(pv, chunk, keep, obs_keys=KEYS, budget=budget)
        out["loss"].append(F.cross_entropy(logits, labels, reduction="none"))
        out["correct"].append((logits.argmax(-1) == labels).double())
        out["kept"].append(kept)
        out["counts"].append(masks.sum(-1).double())
    return {**{k: torch.cat(v) for k, v in out.items()}, "feats": torch.stack([torch.cat(f) for f in feats])}


def fit_probe(features: Tensor, target: Tensor, ridge: float) -> tuple[Tensor, list[float]]:
    """Ridge regression of the standardized ``target`` (B,) on each stage's ``features`` (K, B, C): (K, C + 1)
    and the correlation of fit and target at each stage."""
    z = ((target - target.mean()) / target.std()).clamp(-3, 3).double()
    probe, fits = [], []
    for x in features.double():
        x = torch.cat([x, x.new_ones(len(x), 1)], 1)
        w = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ z)
        probe.append(w.float())
        fits.append(float(torch.corrcoef(torch.stack([x @ w, z]))[0, 1]))
    return torch.stack(probe), fits


@torch.no_grad()  # not inference mode: thresholds and probes are set on the policy between passes
def main(args: Args) -> list[dict]:
    torch.set_num_threads(args.threads)
    pv = load_backbone(args.model)
    start = load_policy(args.agent).eval()
    if not start.use_budget:
        raise ValueError(f"--agent {args.agent} reads no budget: a budget agent is needed")
    policy = SteeredPolicy.from_config({**start.config(), "sampling": "threshold", "calibration": None})
    policy.load_state_dict(start.state_dict())
    policy.eval()
    draw = torch.randperm(len(dataset_for(pv, args.dataset, "train", root=args.data_root)),
                          generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    x_fit, y_fit = take(pv, args, "train", sorted(draw[: args.train_images].tolist()))
    x_cal, _ = take(pv, args, "val", list(range(args.calibration_images)))
    x, y = take(pv, args, "val", list(range(args.start, args.start + args.images)))
    pairs = zip(x_fit.split(256), y_fit.split(256))
    dense_fit = torch.cat([F.cross_entropy(pv.model(c), t, reduction="none") for c, t in pairs])
    confidence = torch.cat([pv.model(c).softmax(-1).amax(-1) for c in x.split(256)])
    counter, rows = FlopCounter(pv.model), []
    for budget in args.budgets:
        policy.probe, reference, unit = None, None, None
        for weight in args.weights:
            if weight and unit is None:  # the probe, fitted under the unsteered agent's decisions at this budget
                fit = run(policy, pv, x_fit, y_fit, budget)
                unit, fits = fit_probe(fit["feats"], fit["loss"] - dense_fit, args.ridge)
                print(f"budget {budget:g}: probe correlation with its target on the train images, per stage: "
                      + ", ".join(f"{r:.2f}" for r in fits), flush=True)  # fmt: skip
            policy.probe = None if not weight else weight * unit
            policy.calibration = calibrate_thresholds(policy, pv, x_cal, [budget], iters=12)
            got = run(policy, pv, x, y, budget)
            reference = got["correct"] if reference is None else reference
            gflops = float(counter(got["kept"] + pv.num_prefix_tokens).mean()) / counter.dense()
            columns = paired_columns(got["correct"], reference, gflops, got["counts"], confidence, versus="weight 0")
            rows.append({"budget": f"{budget:g}", "weight": f"{weight:g}", **columns})
    print(f"{args.dataset}/val images {args.start}-{args.start + args.images - 1}, probe fitted on "
          f"{args.train_images} train images, backbone {args.model}")  # fmt: skip
    print(markdown_table(rows, list(rows[0])))
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
