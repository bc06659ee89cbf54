"""Evaluate a backbone and its pruning agent against random pruning, EViT's class-attention top-k, an evenly spread
grid and token merging (ToMe), at matched compute budgets, every policy on the same images.

For each budget (a fraction of the dense backbone's GFLOPs) random pruning, class-attention top-k, the ordered-dither
grid (``agents.baselines.DitherGrid``, the same tokens in every image) and the agent
ranked by its keep logits run at the per-stage keep ratio that reaches it; the agent also runs by its own rules
(sampled, as it was trained, and deterministic), and random and top-k again at the compute it reached; the dense
model runs once. ToMe runs at the merge schedule whose backbone GFLOPs are within 2% of each budget it can reach;
random, top-k and a budget agent's mode run again with EViT's fused token (`` + fused token``: the tokens each stage
prunes fused into one, weighted by the class attention), each printed against the same rule without it. Each row
has top-1 with its 95% interval, the loss, GFLOPs of the backbone and of the policy's own decision (its network, the
class attention it reads, ToMe's matching, the fusing), tokens entering the last block and images per second at
batch 1 and 256, timed side by side in one interleaved loop (median of ``--repeats``).

    python evaluate.py                                   # the shipped backbone and agent, Fashion-MNIST test split
    python evaluate.py --model runs/RUN/checkpoint --agent runs/RUN/agent --budgets 0.3 0.5 0.7
    python evaluate.py --agent runs/RUN/agent/model.zip  # an agent trained by stable-baselines3
    python evaluate.py --save-masks runs/eval/masks.pt   # every mask the deterministic agent chose
    python evaluate.py --replay runs/eval/masks.pt       # the backbone on those masks, no agent: same figures

Writes ``results.csv``, ``results.md``, ``summary.md`` (the short table the README shows), ``tradeoff.png``,
``masks.png`` (at ``--picture-budget``) and ``masks_at_B.png`` (at every other budget) to ``--out``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import tyro
from scipy.stats import spearmanr
from torch.utils.data import Subset

from agents.baselines import ClsAttentionTopK, DitherGrid, RandomKeep
from agents.calibrate import check_calibrated_for
from agents.distributions import gumbel_noise
from agents.fused import FusedAdaptiveAgent, FusedBudgetAgent, kept_masks
from agents.io import load_any_policy
from agents.policy import APTPolicy
from apt_env.data.cluttered import box_token_mask
from apt_env.data.datasets import dataset_for, dataset_info, make_loader
from apt_env.defaults import DEFAULT_AGENT, DEFAULT_CHECKPOINT
from apt_env.envs.observe import BUDGET_KEYS, OBS_KEYS
from apt_env.eval.evaluate import (
    COLUMNS,
    Contender,
    Decisions,
    DenseAtLengths,
    Merged,
    TimedForward,
    box_first_at_counts,
    budget_keep_ratio,
    evaluate_accuracy,
    fixed_masks,
    load_decisions,
    measure_throughput,
    save_decisions,
)
from apt_env.eval.report import markdown_table, plot_compute, plot_masks, plot_tradeoff, write_csv
from apt_env.models.backbone import PrunableViT
from apt_env.models.checkpoint import load_backbone, read_backbone_config
from apt_env.train.distributed import state_digest
from apt_env.train.runs import seed_everything

logger = logging.getLogger("evaluate")

AGENT = "APT agent"
AGENT_SAMPLED = f"{AGENT} (sampled)"
AGENT_FIXED_DRAW = f"{AGENT} (fixed draw)"
AGENT_DETERMINISTIC = f"{AGENT} (deterministic)"
AGENT_ADAPTIVE = f"{AGENT} (adaptive)"
AGENT_FUSED = f"{AGENT} (fused)"
CLS_TOPK = "cls-attn top-k"
FUSED_TOKEN = " + fused token"
TOME = "ToMe"
DENSE_COMPILED = "dense, compiled"
GRID = "dither grid"
REPLAYED = "agent's masks, no decision"
ORACLE = "object-box oracle"
PHYSICAL = "dense batch at the agent's kept lengths"
CONTROL = "control: "


@dataclass
class Args:
    model: str = str(DEFAULT_CHECKPOINT)
    """backbone checkpoint folder (written by train_backbone.py)"""
    agent: str | None = str(DEFAULT_AGENT)
    """agent checkpoint folder, or a stable-baselines3 .zip of APTActorCriticPolicy; `none` evaluates the
    heuristics only"""
    dataset: str = "fashion-mnist"
    """dataset name (see apt_env.data.DATASETS)"""
    split: Literal["train", "val", "test"] = "test"
    """split to evaluate: test (report), val (tune) or train"""
    data_root: str = "data"
    """folder of downloaded datasets"""
    images: int = 0
    """evaluate the first this many images of the split (0: all)"""
    budgets: tuple[float, ...] = (0.3, 0.5, 0.7)
    """fractions of the dense backbone's GFLOPs, each in (0, 1]"""
    picture_budget: float = 0.5
    """the budget shown in masks.png (every other budget in masks_at_B.png)"""
    picture_images: int = 8
    """images in masks.png"""
    batch_size: int = 256
    """images per batch of the accuracy pass and of the batch timing"""
    repeats: int = 5
    """timing repetitions (median reported)"""
    seed: int = 0
    """seed of random pruning and of the agent's sampling"""
    adaptive_agent: str | None = None
    """an agent trained for a mean budget (``train_agent.py --budget-mean``, thresholds calibrated on val): its rows
    ``APT agent (adaptive) @ B`` join the table beside the fixed-count agent's"""
    control: str | None = None
    """a backbone checkpoint trained as the control (``train_backbone.py --method random``): random pruning on it at
    every budget, and its dense model, join the table and the comparison at equal compute"""
    out: str = "runs/eval"
    """output folder"""
    save_masks: str | None = None
    """write every mask the deterministic agent chose (a budget agent: at --picture-budget; without an agent,
    class-attention top-k at --picture-budget) to this file, for --replay"""
    replay: str | None = None
    """run the backbone on the masks of this file (from --save-masks), without any policy"""
    device: str = "cpu"
    """torch device"""
    fused: bool = True
    """also run a budget agent (``"topk"``, no mixer) by its static-shape path (``agents.fused``) at every budget:
    rows ``APT agent (fused) @ B``, the same decisions as ``APT agent @ B`` in fewer ops, timed beside"""
    compile: bool = False
    """``torch.compile`` the fused paths: the fixed-count agent's, and the adaptive agent's at batch 1 (on CPU it needs
    a C++ compiler); compiling happens in the warm-up, outside the timings"""


def check_args(args: Args) -> None:
    """Raise early on arguments that cannot work."""
    for budget in (*args.budgets, args.picture_budget):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"a budget is a fraction of the dense GFLOPs in (0, 1], got {budget}")
    if args.images < 0 or args.batch_size < 1 or args.repeats < 1:
        raise ValueError("--images must be >= 0, --batch-size and --repeats >= 1")


def load_model(args: Args, path: str | None = None) -> PrunableViT:
    """The backbone (``args.model``, or ``path``), checked against the dataset: class count refused, other data
    warned about."""
    path = args.model if path is None else path
    info = dataset_info(args.dataset, args.data_root)
    config = read_backbone_config(path)
    if config["num_classes"] != info.num_classes:
        raise ValueError(
            f"the backbone {path} has {config['num_classes']} classes, {args.dataset} has {info.num_classes}"
        )
    trained_on = config.get("dataset")
    if trained_on is not None and trained_on != args.dataset:
        logger.warning("the backbone %s was trained on %s, evaluated here on %s", path, trained_on, args.dataset)
    return load_backbone(path, device=args.device)


def load_agent(path: str, pv: PrunableViT) -> APTPolicy:
    """An agent folder or an SB3 zip of ``APTActorCriticPolicy`` (``agents.io.load_any_policy``), sized for ``pv``."""
    return check_fits(load_any_policy(path), pv, path)


def check_fits(policy: APTPolicy, pv: PrunableViT, path: str) -> APTPolicy:
    """``policy`` if it is sized for ``pv``'s tokens and stages, else a ValueError naming both."""
    want = (pv.num_patches, pv.embed_dim, pv.num_stages)
    have = (policy.num_patches, policy.embed_dim, policy.num_stages)
    if have != want:
        raise ValueError(
            f"agent {path} expects {have[0]} tokens of width {have[1]} in {have[2]} stages; the backbone has "
            f"{want[0]} tokens of width {want[1]} in {want[2]} stages"
        )
    return policy


def agent_contenders(policy: APTPolicy, budgets: dict[float, float], seed: int) -> list[Contender]:
    """The agent at every budget through its budget input, sampled (as trained) and by its mode; an agent
    without one runs by its own rules (its own compute) and ranked by its keep logits at every budget."""
    policy.eval()
    generator = torch.Generator().manual_seed(seed)
    cost = policy.decision_flops
    sampled = lambda o: policy.act(o, deterministic=False, generator=generator)  # noqa: E731
    mode = lambda o: policy.act(o, deterministic=True)  # noqa: E731
    if policy.use_budget:
        keys = (*OBS_KEYS, *BUDGET_KEYS)
        rules = [(AGENT_SAMPLED, sampled), (AGENT, mode)]
        if policy.sampling == "topk":  # a sample under one Gumbel draw per patch position: deterministic
            draw = gumbel_noise((policy.num_patches,), torch.Generator().manual_seed(seed))
            draw = draw.to(next(policy.parameters()).device)  # once, not at every decision
            rules.append((AGENT_FIXED_DRAW, lambda o: policy.act(o, deterministic=False, gumbel=draw)))
        rows = [
            Contender(f"{rule} @ {b:g}", act, b, obs_keys=keys, flops=cost, role="agent", rule=rule)
            for b in budgets
            for rule, act in rules
        ]
        return rows + [
            Contender(f"{AGENT}{FUSED_TOKEN} @ {b:g}", mode, b, obs_keys=keys, flops=cost, role="agent", rule=AGENT,
                      fuse=True)
            for b in budgets
        ]  # fmt: skip
    rows = [
        Contender(AGENT_SAMPLED, sampled, flops=cost, role="agent"),
        Contender(AGENT_DETERMINISTIC, mode, flops=cost, role="agent"),
    ]
    for budget, ratio in budgets.items():
        keep = lambda o, r=ratio: policy.act(o, keep_ratio=r)  # noqa: E731
        rule = f"{AGENT} logit top-k"
        rows.append(Contender(f"{rule} @ {budget:g}", keep, budget, flops=cost, role="agent", rule=rule))
    return rows


@dataclass(frozen=True)
class FusedRow(Contender):
    """The agent's mode at one budget by ``FusedBudgetAgent`` (or its compiled form, ``forward``)."""

    forward: Any = None
    counts: tuple[int, ...] = ()

    def run(self, pv: PrunableViT, images: torch.Tensor, **_: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, kept = self.forward(images, return_positions=True)
        return logits, entering_at(pv, self.counts, len(images), logits.device), kept_masks(kept, pv.num_patches)


def entering_at(pv: PrunableViT, counts: Sequence[int], rows: int, device: torch.device) -> torch.Tensor:
    """Tokens entering every block beyond the prefix (rows, depth) long, for ``counts`` patch tokens after each
    stage."""
    bounds = pv.stage_bounds
    tokens = [pv.num_patches] * bounds[1]
    for stage, count in enumerate(counts):
        tokens += [count] * (bounds[stage + 2] - bounds[stage + 1])
    return torch.tensor(tokens, device=device).expand(rows, -1)


def fused_contenders(pv: PrunableViT, policy: APTPolicy, budgets: dict[float, float], compile: bool) -> list[Contender]:
    """The budget agent's mode by its fused static-shape path at every budget, compiled if asked."""
    rows = []
    if compile:  # every budget's module shares one forward: each budget and batch shape is a graph of its own
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 4 * len(budgets))
    for b in budgets:
        fused = FusedBudgetAgent(pv, policy, b).eval()
        forward = torch.compile(fused, dynamic=False) if compile else fused
        mode = lambda o: policy.act(o, deterministic=True)  # noqa: E731  the same decisions, for the record
        rows.append(FusedRow(f"{AGENT_FUSED} @ {b:g}", mode, b, obs_keys=(*OBS_KEYS, *BUDGET_KEYS),
                             flops=policy.decision_flops, role="agent", rule=AGENT_FUSED, forward=forward,
                             counts=fused.counts))  # fmt: skip
    return rows


def has_fused_path(policy: APTPolicy | None) -> bool:
    """Whether ``agents.fused`` can run this agent: a budget agent of fixed counts without a mixer."""
    return policy is not None and policy.use_budget and policy.sampling == "topk" and policy.mixer == "none"


@dataclass(frozen=True)
class AdaptiveRow(Contender):
    """A mean-budget agent's mode at one budget: the batched walk, and at batch 1 its one-image fast path
    (``FusedAdaptiveAgent``, the same decisions)."""

    one_image: Any = None

    def run(self, pv: PrunableViT, images: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        if len(images) != 1 or self.one_image is None:
            return super().run(pv, images, **kwargs)
        logits, kept = self.one_image(images, return_positions=True)
        counts = [k.shape[1] for k in kept]
        return logits, entering_at(pv, counts, 1, logits.device), kept_masks(kept, pv.num_patches)


def adaptive_contenders(
    pv: PrunableViT, policy: APTPolicy, budgets: dict[float, float], compile: bool = False
) -> list[Contender]:
    """A mean-budget agent by its mode (its calibrated threshold of each budget) at every budget; at batch 1 by its
    one-image fast path where it has one (a policy without a mixer), compiled if asked (with dynamic shapes: the
    counts differ per image, each stage's read of them a break between graphs)."""
    policy.eval()
    mode = lambda o: policy.act(o, deterministic=True)  # noqa: E731
    keys = (*OBS_KEYS, *BUDGET_KEYS)
    rows = []
    for b in budgets:
        try:
            fast = FusedAdaptiveAgent(pv, policy, b).eval()
            fast = torch.compile(fast, dynamic=True) if compile else fast
        except ValueError as err:
            logger.warning("%s at batch 1 by the batched walk: %s", AGENT_ADAPTIVE, err)
            fast = None
        rows.append(AdaptiveRow(f"{AGENT_ADAPTIVE} @ {b:g}", mode, b, obs_keys=keys, flops=policy.decision_flops,
                                role="agent", rule=AGENT_ADAPTIVE, one_image=fast))  # fmt: skip
    return rows


def check_agent_kinds(args: Args, agent: APTPolicy | None, adaptive: APTPolicy | None, backbone: str) -> None:
    """A mean-budget agent only as ``--adaptive-agent``, calibrated on this backbone for these budgets; a fixed-count
    one only as ``--agent``."""
    if agent is not None and agent.sampling == "threshold":
        raise ValueError(f"agent {args.agent} was trained for a mean budget (sampling 'threshold'): pass it as "
                         "--adaptive-agent")  # fmt: skip
    if adaptive is None:
        return
    if adaptive.sampling != "threshold":
        raise ValueError(f"--adaptive-agent {args.adaptive_agent} was trained for fixed counts (sampling "
                         f"{adaptive.sampling!r}): pass it as --agent, or train one with --budget-mean")  # fmt: skip
    try:
        check_calibrated_for(adaptive, backbone=backbone, budgets=args.budgets)
    except ValueError as err:
        raise ValueError(f"--adaptive-agent {args.adaptive_agent} on --model {args.model}: {err}") from err


def random_contender(budget: float, ratio: float, seed: int, model: PrunableViT | None = None) -> Contender:
    """Random pruning at a budget's keep ratio, on the evaluation's backbone or on ``model`` (the control)."""
    name, role = (
        (f"random @ {budget:.3g}", "heuristic") if model is None else (f"{CONTROL}random @ {budget:.3g}", "control")
    )
    act = RandomKeep(ratio, seed=seed).act
    return Contender(name, act, budget, obs_keys=("live", "stage"), model=model, role=role, rule="random")


def heuristic_contenders(budgets: dict[float, float], seed: int, grid: tuple[int, int]) -> list[Contender]:
    """Random pruning, class-attention top-k (EViT) and the ordered-dither grid of the (H, W) patch ``grid`` at the
    keep ratio of every budget; random and top-k again with EViT's fused token (``FUSED_TOKEN``: the tokens each
    stage prunes fused into one, weighted by the class attention), the same masks otherwise."""
    rows = []
    for budget, ratio in budgets.items():
        rows.append(random_contender(budget, ratio, seed))
        top = ClsAttentionTopK(ratio)
        keys = ("cls_attn", "live", "stage")
        name = f"{CLS_TOPK} @ {budget:.3g}"
        rows.append(Contender(name, top.act, budget, obs_keys=keys, role="heuristic", rule=CLS_TOPK))
        act = DitherGrid(ratio, grid).act
        rows.append(Contender(f"{GRID} @ {budget:.3g}", act, budget, obs_keys=("live", "stage"), role="heuristic",
                              rule=GRID))  # fmt: skip
        rows.append(Contender(f"random{FUSED_TOKEN} @ {budget:.3g}", RandomKeep(ratio, seed=seed).act, budget,
                              obs_keys=("live", "stage"), role="heuristic", rule="random", fuse=True))  # fmt: skip
        rows.append(Contender(f"{CLS_TOPK}{FUSED_TOKEN} @ {budget:.3g}", top.act, budget, obs_keys=keys,
                              role="heuristic", rule=CLS_TOPK, fuse=True))  # fmt: skip
    return rows


def merging_contenders(pv: PrunableViT, budgets: Iterable[float]) -> list[Contender]:
    """ToMe at every budget it reaches: the schedule whose backbone GFLOPs are within 2% of the budget
    (``FlopCounter.merge_schedule``); a budget below what merging half of the tokens in every block reaches is left
    out, with a warning."""
    rows = []
    for budget in budgets:
        try:
            rows.append(Merged.at_budget(f"{TOME} @ {budget:.3g}", pv, budget, role="heuristic", rule=TOME))
        except ValueError as err:
            logger.warning("no %s row at budget %g: %s", TOME, budget, err)
    return rows


def control_contenders(
    control: PrunableViT, pv: PrunableViT, budgets: dict[float, float], seed: int
) -> list[Contender]:
    """The control backbone, dense and with random pruning at every budget (the keep ratio of ``pv``'s geometry)."""
    if (control.num_patches, control.prune_layers, control.depth) != (pv.num_patches, pv.prune_layers, pv.depth):
        raise ValueError("--control must have the backbone's tokens, depth and pruning layers")
    dense = Contender(f"{CONTROL}dense", None, 1.0, model=control, role="control", rule="dense")
    return [dense] + [random_contender(budget, ratio, seed, control) for budget, ratio in budgets.items()]


BASELINE_FAMILIES = {"random": ("heuristic", "random", False), CLS_TOPK: ("heuristic", CLS_TOPK, False),
                     GRID: ("heuristic", GRID, False), TOME: ("heuristic", TOME, False),
                     f"random{FUSED_TOKEN}": ("heuristic", "random", True),
                     f"{CLS_TOPK}{FUSED_TOKEN}": ("heuristic", CLS_TOPK, True),
                     "control, random": ("control", "random", False)}  # fmt: skip
"""The curves an agent is compared with at equal compute and at equal speed, by the name printed."""


def _at_equal(rows: list[dict], agents: list[dict], key: str, what: str) -> list[str]:
    """Each row of ``agents`` against every baseline family at the agent's ``key`` (GFLOPs or an img/s): the
    family's top-1 interpolated linearly in ``key`` between its budget rows and its own dense model; ``-`` where the
    agent lies outside the family's range (no extrapolation)."""
    present = {curve(r) for r in rows}
    families = {name: family for name, family in BASELINE_FAMILIES.items() if family in present}
    lines = []
    for agent in agents:
        parts = []
        for name, family in families.items():
            dense = ("control" if family[0] == "control" else "dense", "dense", False)  # its own backbone, unpruned
            points = sorted((r[key], r["top1"]) for r in rows if curve(r) in (family, dense))
            x = [k for k, _ in points]
            if not x[0] <= agent[key] <= x[-1]:
                parts.append(f"{name} -")
                continue
            at = float(np.interp(agent[key], x, [t for _, t in points]))
            parts.append(f"{name} {100 * at:.2f} ({100 * (agent['top1'] - at):+.2f})")
        lines.append(f"{agent['policy']}: {100 * agent['top1']:.2f} at {agent[key]:.4g} {what}; at equal {what} "
                     + ", ".join(parts))  # fmt: skip
    return lines


def equal_compute_text(rows: list[dict]) -> str:
    """Each deterministic agent row against every baseline family at the agent's GFLOPs, its own cost included."""
    return "\n".join(_at_equal(rows, [r for r in rows if is_agent_decision(r)], "gflops", "GFLOPs"))


def equal_speed_text(rows: list[dict]) -> str:
    """Each agent row that decides by its mode (the generic walk and the fused path) against every baseline family at
    the agent's measured img/s, at batch 256 and at batch 1."""
    agents = [r for r in rows if is_agent_decision(r) or r["rule"] == AGENT_FUSED]
    lines = []
    for b, what in (("b256", "img/s at batch 256"), ("b1", "img/s at batch 1")):
        lines += _at_equal(rows, agents, f"img_per_s_{b}", what)
    return "\n".join(lines)


def curve(row: dict) -> tuple[str, str, bool]:
    """The curve a row lies on, one point per budget: ``(role, rule, fused_token)``."""
    return row["role"], row["rule"], row["fused_token"]


SUMMARY_CURVES = (("agent", AGENT), ("agent", AGENT_FUSED), ("agent", AGENT_ADAPTIVE), ("heuristic", TOME),
                  ("heuristic", GRID), ("heuristic", "random"), ("heuristic", CLS_TOPK), ("control", "random"),
                  ("reference", ORACLE))  # fmt: skip
"""The curves ``summary.md`` shows, in this order at each budget (those the evaluation has)."""


def summary_table(rows: list[dict]) -> str:
    """The short table (``summary.md``, what the README shows): the dense model, then at each budget the agent's
    decisions, ToMe, the heuristics, the control and the oracle; top-1 with its interval, GFLOPs with the policy's
    cost, img/s over the dense model's at batch 256 / 1."""
    dense = next(r for r in rows if r["role"] == "dense")
    order = {curve: i for i, curve in enumerate(SUMMARY_CURVES)}
    picked = [r for r in rows if not r["fused_token"] and (r["role"], r["rule"]) in order]
    picked.sort(key=lambda r: (r["budget"], order[r["role"], r["rule"]]))
    lines = ["| policy | top-1 (%) [95% interval] | GFLOPs | img/s over dense, b256 / b1 |", "|---|---:|---:|---:|"]
    for r in [dense, *picked]:
        speed = " / ".join(f"{r[f'img_per_s_{b}'] / dense[f'img_per_s_{b}']:.2f}" for b in ("b256", "b1"))
        top1 = f"{100 * r['top1']:.2f} [{100 * r['top1_low']:.2f}, {100 * r['top1_high']:.2f}]"
        lines.append(f"| {r['policy']} | {top1} | {r['gflops']:.4f} | {speed} |")
    return "\n".join(lines)


def is_agent_decision(row: dict) -> bool:
    """Whether a row is the agent deciding by its mode or logit ranking (not sampling, not fusing): a row with a
    replay."""
    return row["role"] == "agent" and not row["fused_token"] and row["rule"] not in (AGENT_SAMPLED, AGENT_FUSED)


def fused_token_text(rows: list[dict]) -> str:
    """Each row with EViT's fused token against the same rule without it at the same budget: top-1 and GFLOPs (its
    cost included) and their differences."""
    by_key = {(*curve(r), r["budget"]): r for r in rows}
    lines = []
    for r in rows:
        if not r["fused_token"]:
            continue
        base = by_key.get((r["role"], r["rule"], False, r["budget"]))
        if base is None:
            continue
        lines.append(f"{r['policy']}: {100 * r['top1']:.2f} at {r['gflops']:.4g} GFLOPs; without the fused token "
                     f"{100 * base['top1']:.2f} at {base['gflops']:.4g} ({100 * (r['top1'] - base['top1']):+.2f} "
                     f"top-1, {100 * (r['gflops'] / base['gflops'] - 1):+.1f}% GFLOPs)")  # fmt: skip
    return "\n".join(lines)


def speed_per_gflop_text(rows: list[dict]) -> str:
    """Merging against pruning on this machine: at each budget ToMe reaches, the measured img/s over the dense model's
    against the speed-up its GFLOPs promise (dense GFLOPs over the row's, its own cost included), for ToMe, random
    tokens and class-attention top-k, at batch 256 and 1. An efficiency of 1 turns every GFLOP saved into time."""
    dense = next(r for r in rows if r["role"] == "dense")
    by_key = {(*curve(r), r["budget"]): r for r in rows}
    lines = []
    for tome in (r for r in rows if r["rule"] == TOME):
        parts = []
        for rule in (TOME, "random", CLS_TOPK):
            r = by_key.get(("heuristic", rule, False, tome["budget"]))
            if r is None:
                continue
            promised = dense["gflops"] / r["gflops"]
            measured = [r[f"img_per_s_{b}"] / dense[f"img_per_s_{b}"] for b in ("b256", "b1")]
            parts.append(f"{rule} {measured[0]:.2f}x / {measured[1]:.2f}x of {promised:.2f}x (efficiency "
                         f"{measured[0] / promised:.2f} / {measured[1] / promised:.2f})")  # fmt: skip
        lines.append(f"budget {tome['budget']:.3g}, img/s over dense at batch 256 / 1 of the GFLOPs' speed-up: "
                     + "; ".join(parts))  # fmt: skip
    return "\n".join(lines)


REPLAY_RECORDED = ("top1", "gflops_backbone")
"""What a replay file records of its evaluation, printed and written beside the replayed figures."""


def _of(row: dict) -> str:
    """What tells apart the references of two agents at one budget."""
    return {AGENT_ADAPTIVE: " (adaptive)", AGENT_FIXED_DRAW: " (fixed draw)"}.get(row["rule"], "")


def replay_name(row: dict) -> str:
    return f"{REPLAYED}{_of(row)} @ {row['budget']:.3g}"


def replay_contenders(rows: list[dict], decisions: dict[str, Decisions]) -> list[Contender]:
    """The physical reference of every deterministic agent row: the backbone on the masks the agent chose,
    replayed without observing or deciding anything. Its speed over the agent's is the decision's cost."""
    return [
        Contender(
            replay_name(r),
            fixed_masks(decisions[r["policy"]]),
            r["budget"],
            obs_keys=("stage",),
            role="reference",
            rule=REPLAYED,
        )  # fmt: skip
        for r in rows
        if is_agent_decision(r)
    ]


def object_boxes(dataset) -> torch.Tensor | None:
    """``(M, 4)`` long: the object's box ``(x0, y0, x1, y1)`` in every image of a dataset that knows them (the
    cluttered task's), else None."""
    base, positions = (dataset.dataset, list(dataset.indices)) if isinstance(dataset, Subset) else (dataset, None)
    if not hasattr(base, "box"):
        return None
    return torch.tensor([base.box(i) for i in (positions if positions is not None else range(len(base)))])


def oracle_contenders(
    pv: PrunableViT, boxes: torch.Tensor, rows: list[dict], decisions: dict[str, Decisions], seed: int
) -> list[Contender]:
    """The object-box oracle at the counts of every fixed-count agent row: the tokens that overlap the object's box
    first, the rest at random (``box_first_at_counts``)."""
    (height, width), (rows_, cols) = pv.img_size, pv.grid_size
    if height // rows_ != width // cols:
        raise ValueError(f"the object-box oracle needs square patches; the model has {pv.img_size} in {pv.grid_size}")
    box_tokens = box_token_mask(boxes, grid=rows_, patch=height // rows_)
    return [
        Contender(
            f"{ORACLE} @ {r['budget']:.3g}",
            box_first_at_counts(decisions[r["policy"]], box_tokens, seed=seed),
            r["budget"],
            obs_keys=("live", "stage"),
            role="reference",
            rule=ORACLE,
        )  # fmt: skip
        for r in rows
        if curve(r) == ("agent", AGENT, False)
    ]


def physical_name(row: dict) -> str:
    return f"{PHYSICAL}{_of(row)} @ {row['budget']:.3g}"


def physical_contenders(rows: list[dict], decisions: dict[str, Decisions]) -> list[Contender]:
    """The physical reference of every deterministic agent row, timed only: the same blocks on a plain dense batch at
    the agent's mean kept length per stage, with no decision, mask or gather."""
    return [DenseAtLengths.of(physical_name(r), decisions[r["policy"]]) for r in rows if is_agent_decision(r)]


def speed_ratios(row: dict, ref: dict) -> str:
    """``row``'s images per second over ``ref``'s, at batch 256 and 1."""
    return ", ".join(f"{b} {row[f'img_per_s_{b}'] / ref[f'img_per_s_{b}']:.2f}" for b in ("b256", "b1"))


def decision_cost_text(rows: list[dict], physical: dict[str, dict]) -> str:
    """Each deterministic agent row's throughput over its physical reference (``physical``: images per second by
    name), over its masks replayed (the same blocks and pruning, no decision) and over the dense model, at batch 256
    and 1; a fused row's also over the compiled dense model when ``physical`` has it (``--compile``)."""
    by_name = {r["policy"]: r for r in rows} | physical
    lines = []
    for r in rows:
        if not (is_agent_decision(r) or r["rule"] == AGENT_FUSED):
            continue
        replayed = ""
        if r["rule"] != AGENT_FUSED:  # the fused path has the same masks: its replay is the agent row's
            replayed = f"over its masks replayed {speed_ratios(r, by_name[replay_name(r)])}; "
        compiled = ""
        if r["rule"] == AGENT_FUSED and DENSE_COMPILED in by_name:
            compiled = f"; over the dense model compiled {speed_ratios(r, by_name[DENSE_COMPILED])}"
        lines.append(f"{r['policy']}: img/s over the physical reference {speed_ratios(r, by_name[physical_name(r)])}; "
                     f"{replayed}over dense {speed_ratios(r, by_name['dense'])}{compiled}")  # fmt: skip
    return "\n".join(lines)


def shown(path: str | None) -> str:
    """A path as a results file shows it: relative to the working directory where it lies below it, so that no file
    that ships names the machine that made it."""
    if path is None:
        return "none"
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def command(args: Args) -> str:
    """The command line that gives ``args`` (the flags that differ from the defaults)."""
    flags = []
    for f in fields(Args):
        value = getattr(args, f.name)
        if value != f.default:
            text = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
            flags.append(f"--{f.name.replace('_', '-')} {text}")
    return " ".join(["python evaluate.py", *flags])


def replay(args: Args, pv: PrunableViT, dataset, digest: str, out: Path, source: str) -> dict[str, dict]:
    """``--replay``: the backbone on a file's recorded masks, no policy; ``results.csv`` and ``results.md`` as an
    evaluation writes them, with the recorded top-1 and GFLOPs beside the replayed ones."""
    decisions, facts = load_decisions(args.replay, backbone_digest=digest, dataset=args.dataset)
    if (facts["split"], facts["batch_size"]) != (args.split, args.batch_size):
        raise ValueError(
            f"{args.replay} was recorded on split {facts['split']!r} at batch {facts['batch_size']}; "
            f"pass --split {facts['split']} --batch-size {facts['batch_size']}"
        )
    if int(decisions.index.max()) >= len(dataset):
        raise ValueError(f"{args.replay} holds images up to {int(decisions.index.max())}; {source} is shorter")
    replayed = Subset(dataset, decisions.index.tolist())
    loader = make_loader(replayed, batch_size=args.batch_size, shuffle=False, seed=args.seed)
    name = f"replay of {facts.get('policy', '?')}"
    contender = Contender(name, fixed_masks(decisions), obs_keys=("stage",), role="reference", rule=REPLAYED)
    rows, _ = evaluate_accuracy(pv, loader, [contender])
    row = {**rows[0], "budget": facts.get("budget", rows[0].get("budget"))}
    row.update({f"recorded_{key}": facts.get(key) for key in REPLAY_RECORDED})
    columns = [c for c in COLUMNS if c in row and not c.startswith("img_per_s")]
    columns += [f"recorded_{key}" for key in REPLAY_RECORDED]
    write_csv(out / "results.csv", [row], columns)
    table = markdown_table([row], columns)
    (out / "results.md").write_text(f"`{command(args)}`: {args.model} on {source}, masks of {args.replay}\n\n{table}\n")
    print(table)
    for key in REPLAY_RECORDED:
        print(f"{key}: replayed {row[key]!r}, recorded {row[f'recorded_{key}']!r}")
    return {name: row}


def main(args: Args) -> dict[str, dict]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_args(args)
    seed_everything(args.seed)
    pv = load_model(args)
    dataset = dataset_for(pv, args.dataset, args.split, root=args.data_root)
    if args.images:
        dataset = Subset(dataset, range(min(args.images, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"{args.dataset}/{args.split} has no images")
    loader = make_loader(dataset, batch_size=args.batch_size, shuffle=False, seed=args.seed)
    digest = state_digest(pv.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = f"{args.dataset}/{args.split}, {len(dataset)} images"

    if args.replay:
        return replay(args, pv, dataset, digest, out, source)

    agent = None if args.agent in (None, "", "none") else load_agent(args.agent, pv)
    adaptive = load_agent(args.adaptive_agent, pv) if args.adaptive_agent else None
    check_agent_kinds(args, agent, adaptive, digest)
    rows, decisions, contenders = evaluate_rows(args, pv, loader, agent, adaptive)
    physical = physical_contenders(rows, decisions)
    if args.compile and any(r["rule"] == AGENT_FUSED for r in rows):  # compiled fused rows: compare like with like
        physical.append(TimedForward(DENSE_COMPILED, role="reference", forward=torch.compile(pv.model, dynamic=False)))
    timing = torch.stack([dataset[i][0] for i in range(min(len(dataset), args.batch_size))])
    speed = {b: measure_throughput(pv, timing, contenders + physical, batch_size=b, repeats=args.repeats)
             for b in (len(timing), 1)}  # fmt: skip
    for row in rows:
        row["img_per_s_b1"], row["img_per_s_b256"] = speed[1][row["policy"]], speed[len(timing)][row["policy"]]
    physical_speed = {
        c.name: {"img_per_s_b1": speed[1][c.name], "img_per_s_b256": speed[len(timing)][c.name]} for c in physical
    }
    rows.sort(key=lambda r: (r["role"] != "dense", r["budget"], r["policy"]))

    write_csv(out / "results.csv", rows, COLUMNS)
    table = markdown_table(rows, COLUMNS)
    header = (
        f"`{command(args)}`: {shown(args.model)} + {shown(args.agent)} on {source}; "
        f"timings on {torch.get_num_threads()} threads, batch 256 = {len(timing)} images\n\n"
    )
    (out / "results.md").write_text(header + table + "\n")
    (out / "summary.md").write_text(header + summary_table(rows) + "\n")
    plot_tradeoff(out / "tradeoff.png", rows, title=source)
    write_masks(args, pv, dataset, rows, decisions, out / "masks.png", source, args.picture_budget)
    for b in (b for b in args.budgets if b != args.picture_budget):  # the others too: masks_at_B.png
        write_masks(args, pv, dataset, rows, decisions, out / f"masks_at_{b:g}.png", source, b)
    if adaptive is not None:
        print(write_compute(args, pv, loader, rows, decisions, out, source))
    if args.save_masks:
        deterministic = [r for r in rows if r["rule"] == AGENT_DETERMINISTIC]  # an agent without a budget input
        row = (deterministic or picture_rows(rows, args.picture_budget))[0]
        save_decisions(
            args.save_masks, decisions[row["policy"]], dataset=args.dataset, split=args.split,
            batch_size=args.batch_size, backbone_digest=digest, policy=row["policy"], budget=row["budget"],
            top1=row["top1"], gflops_backbone=row["gflops_backbone"],
        )  # fmt: skip
    print(header + table)
    print(decision_cost_text(rows, physical_speed))
    print(equal_compute_text(rows))
    print(equal_speed_text(rows))
    print(fused_token_text(rows))
    print(speed_per_gflop_text(rows))
    print(f"\nwrote {out}/results.csv, results.md, tradeoff.png, masks.png")
    return {r["policy"]: r for r in rows}


def evaluate_rows(
    args: Args, pv: PrunableViT, loader, agent: APTPolicy | None, adaptive: APTPolicy | None = None
) -> tuple[list[dict], dict[str, Decisions], list[Contender]]:
    """Every accuracy row on the same images: dense and the agent first, then the heuristics at the budgets (and at
    the compute an agent without a budget input reached), the agent's masks replayed and the control."""
    ratios = {b: budget_keep_ratio(pv, b) for b in args.budgets}
    first = [Contender("dense", None, role="dense", rule="dense")]
    first += agent_contenders(agent, ratios, args.seed) if agent is not None else []
    first += fused_contenders(pv, agent, ratios, args.compile) if args.fused and has_fused_path(agent) else []
    first += adaptive_contenders(pv, adaptive, ratios, args.compile) if adaptive is not None else []
    rows, decisions = evaluate_accuracy(pv, loader, first, desc="agent")
    budgets = dict(ratios)
    if agent is not None and not agent.use_budget:
        reached = next(r["budget"] for r in rows if r["rule"] == AGENT_DETERMINISTIC)
        budgets[round(reached, 3)] = budget_keep_ratio(pv, reached)
    grid = pv.grid_size
    second = heuristic_contenders(budgets, args.seed, grid) + merging_contenders(pv, budgets)
    second += replay_contenders(rows, decisions)
    boxes = object_boxes(loader.dataset)
    if boxes is not None:
        second += oracle_contenders(pv, boxes, rows, decisions, args.seed)
    if args.control:
        second += control_contenders(load_model(args, args.control), pv, budgets, args.seed)
    more_rows, more_decisions = evaluate_accuracy(pv, loader, second, desc="heuristics")
    return rows + more_rows, decisions | more_decisions, first + second


def picture_rows(rows: list[dict], budget: float) -> list[dict]:
    """The rows ``masks.png`` shows at ``budget``: the agents' decisions (if any), class-attention top-k, random."""
    at = [r for r in rows if math.isclose(r["budget"], budget, rel_tol=1e-6)]
    agent = [r for r in at if is_agent_decision(r)][:2]  # the fixed-count agent, and the adaptive one if any
    heuristics = [r for rule in (CLS_TOPK, "random") for r in at if curve(r) == ("heuristic", rule, False)]
    picked = agent + heuristics
    if len(heuristics) < 2:
        raise ValueError(f"--picture-budget {budget} must be one of --budgets")
    return picked


@torch.inference_mode()
def write_compute(args: Args, pv: PrunableViT, loader, rows: list[dict], decisions, out: Path, source: str) -> str:
    """``compute.png``: each image's kept tokens under the agents at ``--picture-budget`` against the dense model's
    confidence (do easy images get fewer tokens?); on a dataset that knows its objects' boxes also
    ``compute_area.png``, against the box's area in pixels (do larger objects get more?). Returns the rank correlation
    of each."""
    quantities = {"the dense model's confidence": torch.cat([pv(x).softmax(-1).amax(-1) for x, _ in loader]).cpu()}
    boxes = object_boxes(loader.dataset)
    if boxes is not None:
        quantities["the object's box area"] = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).double()
    picked = [r["policy"] for r in picture_rows(rows, args.picture_budget) if r["role"] == "agent"]
    counts = {name: decisions[name].masks[:, -1].sum(-1) for name in picked}
    title = f"budget {args.picture_budget:g} ({source})"
    for (what, values), file in zip(quantities.items(), ("compute.png", "compute_area.png")):
        plot_compute(out / file, values, counts, label=what.removeprefix("the "), title=title)
    lines = []
    for name, count in counts.items():
        text = f"{name}: last-block tokens {float(count.double().mean()):.1f} on average [{int(count.min())}, "
        if count.min() == count.max():
            lines.append(text + f"{int(count.max())}], the same in every image")
            continue
        rhos = [f"with {what} {spearmanr(v.numpy(), count.numpy()).statistic:+.3f}" for what, v in quantities.items()]
        lines.append(text + f"{int(count.max())}], Spearman rank correlation " + ", ".join(rhos))
    return "\n".join(lines)


def write_masks(
    args: Args, pv: PrunableViT, dataset, rows: list[dict], decisions, path: Path, source: str, budget: float
) -> None:
    """The first ``--picture-images`` images with the patches each picture row kept at every stage, at ``budget``."""
    b = budget
    names = [r["policy"] for r in picture_rows(rows, b)]
    m = min(args.picture_images, len(dataset))
    plot_masks(
        path,
        torch.stack([dataset[i][0] for i in range(m)]),
        {name.replace(" @ ", "\n@ "): decisions[name].masks[:m] for name in names},
        grid=pv.grid_size,
        title=f"kept patches at budget {b:g} ({source})",
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
