"""Evaluation of token-pruning policies: top-1 with its interval, GFLOPs with the policy's own cost counted,
and throughput measured side by side, every policy on the same images.

A policy is a ``KeepFn`` (``apt_env.envs.observe``): ``keep_fn(obs) -> (B, N) bool`` on a batched observation of
``APTPrune-v0`` (only the keys the policy asks for) that also carries ``index``, the position of each image in
the evaluated dataset, so that a policy can replay recorded decisions. The dense model runs
as timm's own ``model(images)``, with nothing observed. The agent, the heuristics (random, EViT's
class-attention top-k) and replayed masks are all ``KeepFn``s; the environment package never imports
``agents``.

Accuracy comes with its 95% Wilson interval over images; throughput is timed for every policy in one
interleaved loop (each repetition times every policy once, in a rotating order, and the median is
reported), so ratios between rows hold on a noisy machine.
"""

from __future__ import annotations

import logging
import statistics
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from scipy.stats import binomtest
from torch import Tensor
from tqdm import tqdm

from apt_env.atomic import write_file
from apt_env.envs.observe import OBS_KEYS, BudgetKeepRatio, KeepFn, walk
from apt_env.models.backbone import Layout, PrunableViT
from apt_env.models.flops import FlopCounter, cls_attention_flops
from apt_env.models.merging import merged_counts
from apt_env.models.tokens import random_count, top_count
from apt_env.train.state import load_train_state

__all__ = [
    "COLUMNS",
    "Contender",
    "Decisions",
    "DenseAtLengths",
    "Merged",
    "TimedForward",
    "ROLES",
    "PolicyFlops",
    "box_first_at_counts",
    "budget_keep_ratio",
    "evaluate",
    "eval_mode",
    "evaluate_accuracy",
    "fixed_masks",
    "load_decisions",
    "forward_policy",
    "measure_throughput",
    "random_at_counts",
    "save_decisions",
    "synchronize",
    "wilson_interval",
]

_logger = logging.getLogger(__name__)

PolicyFlops = Callable[[Tensor], Tensor]
"""``flops(live)``: the policy's own FLOPs per image (B,) float64, from the live patch tokens (B, K) it
observed at each stage. The class attention it reads is counted by the evaluator, not here."""

COLUMNS: tuple[str, ...] = (
    "policy", "role", "rule", "fused_token", "budget", "top1", "top1_low", "top1_high", "loss", "gflops_backbone",
    "gflops_policy", "gflops", "tokens_last", "img_per_s_b1", "img_per_s_b256", "num_images",
)  # fmt: skip
"""The columns of one evaluation row, in order (``results.csv``)."""

ROLES: tuple[str, ...] = ("method", "dense", "agent", "heuristic", "control", "reference")
"""What an evaluation row is there for (``Contender.role``)."""


@dataclass(frozen=True)
class Contender:
    """One row of an evaluation: a pruning rule, at a budget.

    Args:
        name: the row's name as printed, e.g. ``"random @ 0.5"``.
        keep_fn: the decisions; ``None`` is the dense model (timm's forward, nothing observed).
        budget: the fraction of the dense backbone's GFLOPs the rule was set to, or what it reached on its
            own (for policies without a budget input).
        obs_keys: the observation keys ``keep_fn`` reads; fewer is faster (``cls_attn`` costs a partial
            block, counted in ``gflops_policy``).
        flops: the policy's own cost (see ``PolicyFlops``); ``None`` is free (random, replay).
        model: run this backbone instead of the evaluation's (e.g. a plain ViT beside a jointly trained one).
        role: what the row is there for (``ROLES``): the dense model, the agent, a heuristic, a control (another
            backbone), or a reference (the agent's masks replayed); tables and plots group rows by it.
        rule: the pruning rule, the same at every budget (e.g. ``"random"``); rows of one ``(role, rule, fuse)``
            form one curve. Default: ``name``.
        fuse: EViT's fused token: the tokens pruned at each stage fused into one token weighted by the class
            attention (``PrunableViT.prune``'s ``fuse_attn``); the attention and the fusing count as the policy's cost.
            The row's ``fused_token`` column.
    """

    name: str
    keep_fn: KeepFn | None = None
    budget: float | None = None
    obs_keys: tuple[str, ...] = OBS_KEYS
    flops: PolicyFlops | None = None
    model: PrunableViT | None = None
    role: str = "method"
    rule: str | None = None
    fuse: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"a row's role is one of {ROLES}, got {self.role!r}")

    def run(self, pv: PrunableViT, images: Tensor, *, layout: Layout, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``forward_policy`` of this row: on its own model if it has one, observing its budget if asked."""
        observes_budget = bool({"budget", "keep_count"} & set(self.obs_keys))
        budget = self.budget if observes_budget else None
        return forward_policy(
            self.model or pv, images, self.keep_fn, obs_keys=self.obs_keys, layout=layout, index=index, budget=budget,
            fuse=self.fuse,
        )  # fmt: skip

    def backbone_flops(self, counter: FlopCounter, entering: Tensor) -> Tensor:
        """The backbone's FLOPs per image (B,) float64 from the tokens entering each block beyond the prefix tokens
        (B, depth), as ``run`` returns them."""
        return counter(entering + counter.num_prefix_tokens)

    def policy_flops(self, pv: PrunableViT) -> PolicyFlops | None:
        """The policy's own cost on ``pv`` (the row's backbone), besides the class attention it reads: ``flops``."""
        return self.flops if self.keep_fn is not None else None


@dataclass(frozen=True)
class TimedForward(Contender):
    """A row for ``measure_throughput`` only: ``forward`` (a module, e.g. a compiled model or a fused path) called on
    the images, nothing observed or recorded."""

    forward: Any = None

    def run(self, pv: PrunableViT, images: Tensor, **_: Any) -> tuple[Tensor, None, None]:
        return self.forward(images), None, None


@dataclass(frozen=True)
class DenseAtLengths(Contender):
    """A physical reference, for ``measure_throughput`` only: the backbone's blocks on a plain dense batch cut before
    stage ``k`` to ``lengths[k]`` patch tokens (the first ones: only the shapes matter for time), with nothing
    observed, decided, masked or gathered; the most that any rule keeping those counts can reach. Its logits are of
    no use."""

    lengths: tuple[int, ...] = ()

    @classmethod
    def of(cls, name: str, decisions: Decisions) -> DenseAtLengths:
        """At the mean count of patch tokens ``decisions`` kept at each stage, rounded."""
        return cls(
            name, role="reference", lengths=tuple(int(n) for n in decisions.masks.sum(-1).double().mean(0).round())
        )

    def run(self, pv: PrunableViT, images: Tensor, **_: Any) -> tuple[Tensor, Tensor, Tensor]:
        if len(self.lengths) != pv.num_stages:
            raise ValueError(f"need a length for each of {pv.num_stages} stages, got {self.lengths}")
        bounds, p = pv.stage_bounds, pv.num_prefix_tokens
        x = pv.dense_blocks(pv.embed(images).x, 0, bounds[1])  # timm's own blocks and head: nothing to wait for
        for stage, length in enumerate(self.lengths):
            x = pv.dense_blocks(x[:, : p + length], bounds[stage + 1], bounds[stage + 2])
        return pv.dense_head(x), torch.empty(0), torch.empty(0)


@dataclass(frozen=True)
class Merged(Contender):
    """Token merging, ToMe (``PrunableViT.forward_merged``): ``schedule[i]`` patch tokens merged in block ``i``,
    with proportional attention. Nothing is pruned (its decisions are all-True masks); the matching's cost is the
    policy's (``FlopCounter.merged``), the backbone's counts each block's MLP half on the tokens left after its
    merge. ``keep_fn`` and ``obs_keys`` are unused.

    ``Merged.at_budget`` sets the schedule to a budget of the dense backbone's GFLOPs."""

    schedule: tuple[int, ...] = ()

    @classmethod
    def at_budget(cls, name: str, pv: PrunableViT, budget: float, **kwargs: Any) -> Merged:
        """The row whose schedule's backbone GFLOPs are within 2% of ``budget`` times the dense model's
        (``FlopCounter.merge_schedule``; a ValueError where none is)."""
        schedule = FlopCounter(pv.model).merge_schedule(budget)
        return cls(name, budget=budget, schedule=schedule, obs_keys=(), **kwargs)

    def policy_flops(self, pv: PrunableViT) -> PolicyFlops | None:
        matching = FlopCounter(pv.model).merged(self.schedule)[1]  # the same for every image
        return lambda live: torch.full((live.shape[0],), matching, dtype=torch.float64, device=live.device)

    def run(self, pv: PrunableViT, images: Tensor, **_: Any) -> tuple[Tensor, Tensor, Tensor]:
        m = self.model or pv
        counts = merged_counts(m.num_patches, self.schedule)[:-1]  # forward_merged checks the schedule
        b = images.shape[0]
        entering = torch.tensor(counts, device=images.device).expand(b, -1)
        masks = torch.ones(b, m.num_stages, m.num_patches, dtype=torch.bool, device=images.device)
        return m.forward_merged(images, self.schedule), entering, masks

    def backbone_flops(self, counter: FlopCounter, entering: Tensor) -> Tensor:
        return torch.full((entering.shape[0],), counter.merged(self.schedule)[0], dtype=torch.float64)


@dataclass
class Decisions:
    """Every mask a policy chose: ``masks[i, k]`` is image ``index[i]``'s keep mask after stage ``k``.

    Attributes:
        index: positions of the images in the evaluated dataset. # (M,) long
        masks: keep masks over the original patch positions. # (M, K, N) bool
    """

    index: Tensor
    masks: Tensor
    _rows: Tensor | None = field(default=None, repr=False)

    def rows(self, index: Tensor) -> Tensor:
        """Rows of ``masks`` for dataset positions ``index`` (B,); a position not recorded is an error."""
        if self._rows is None:
            lookup = torch.full((int(self.index.max()) + 1,), -1, dtype=torch.long)
            lookup[self.index] = torch.arange(len(self.index))
            self._rows = lookup
        index = index.cpu()
        rows = self._rows[index.clamp(max=len(self._rows) - 1)]
        missing = (index >= len(self._rows)) | (rows < 0)
        if bool(missing.any()):
            raise ValueError(f"no recorded decision for images {index[missing][:5].tolist()}")
        return rows


@contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode for the block, then back in the mode each was in."""
    was_training = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, training in zip(modules, was_training):
            m.train(training)


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``correct / total`` (scipy's ``binomtest``)."""
    if total <= 0:
        raise ValueError(f"an interval needs at least one trial, got total={total}")
    ci = binomtest(int(correct), int(total)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def forward_policy(
    pv: PrunableViT,
    images: Tensor,
    keep_fn: KeepFn | None,
    *,
    obs_keys: Sequence[str] = OBS_KEYS,
    layout: Layout = "gathered",
    index: Tensor | None = None,
    budget: float | None = None,
    fuse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The model's logits with ``keep_fn`` pruning at every stage (observing ``budget`` where asked), fusing the
    pruned tokens of each stage into one (EViT) where ``fuse``.

    Returns:
        logits (B, classes); tokens entering every block beyond the model's prefix tokens, the live patch tokens
        and any fused ones (B, depth) long; the keep mask after every stage (B, K, N) bool (all True for the
        dense model).
    """
    b, n, k = images.shape[0], pv.num_patches, pv.num_stages
    if keep_fn is None:  # the dense model, exactly as timm runs it
        pv.check_images(images)
        kept = torch.full((b, pv.depth), n, dtype=torch.long, device=images.device)
        return pv.model(images), kept, torch.ones(b, k, n, dtype=torch.bool, device=images.device)
    if index is None:
        index = torch.arange(b, device=images.device)
    bounds = pv.stage_bounds
    budgets = ratios = None
    if budget is not None:
        budgets = torch.full((b,), budget, dtype=torch.float64, device=images.device)
        ratios = torch.full_like(budgets, budget_keep_ratio(pv, budget))

    def keep(obs: dict[str, Tensor]) -> Tensor:
        obs["index"] = index  # which images these are, for replayed decisions
        return keep_fn(obs)

    state, cls_attn = pv.advance_to_stage(pv.embed(images), 0, take_attn="cls_attn" in obs_keys or fuse)
    pruned = walk(pv, state, cls_attn, keep, keys=obs_keys, layout=layout, budget=budgets, keep_ratio=ratios, fuse=fuse)
    kept, masks = [state.num_kept().unsqueeze(1).expand(-1, bounds[1])], []
    for stage, state in enumerate(pruned):
        masks.append(state.mask(n))
        kept.append(state.num_entering().unsqueeze(1).expand(-1, bounds[stage + 2] - bounds[stage + 1]))
    return pv.finish(state, bounds[-2]), torch.cat(kept, dim=1), torch.stack(masks, dim=1)


def _decision_gflops(pv: PrunableViT, contender: Contender) -> Callable[[Tensor, Tensor], Tensor]:
    """The policy's own GFLOPs per image (B,) from the live patch tokens at each stage (B, K) and the tokens entering
    each block beyond the prefix tokens (B, depth): its own cost (``contender.policy_flops``: its network, ToMe's
    matching), the class attention it reads or fuses by, whose coefficients are read once here, and the fusing: one
    product of the attention with the live tokens per stage, ``embed_dim`` per token."""
    attn = []
    if contender.keep_fn is not None and ("cls_attn" in contender.obs_keys or contender.fuse):
        sources = [pv.attention_source(stage) for stage in range(pv.num_stages)]
        attn = [(block, *cls_attention_flops(pv.model, block, from_qkv=from_qkv)) for block, from_qkv in sources]
    own = contender.policy_flops(pv)

    def cost(live: Tensor, entering: Tensor) -> Tensor:
        total = torch.zeros(live.shape[0], dtype=torch.float64, device=live.device)
        for block, per_token, constant in attn:  # on the tokens in that block, fused tokens included
            total += per_token * (entering[:, block].double() + pv.num_prefix_tokens) + constant
        if contender.fuse:
            total += pv.embed_dim * live.double().sum(1)
        if own is not None:
            total += own(live).double().to(total.device)
        return total / 1e9

    return cost


def _row(c: Contender, sums: dict[str, float], num_images: int, dense_flops: float) -> dict[str, Any]:
    """One evaluation row (``COLUMNS``, less the timings) from a contender's sums over ``num_images`` images."""
    low, high = wilson_interval(int(sums["correct"]), num_images)
    backbone, policy = sums["backbone"] / num_images / 1e9, sums["policy"] / num_images
    row = {
        "policy": c.name, "role": c.role, "rule": c.rule or c.name, "fused_token": c.fuse,
        "budget": c.budget if c.budget is not None else backbone * 1e9 / dense_flops,
        "top1": sums["correct"] / num_images, "top1_low": low, "top1_high": high, "loss": sums["loss"] / num_images,
        "gflops_backbone": backbone, "gflops_policy": policy, "gflops": backbone + policy,
        "tokens_last": sums["tokens"] / num_images, "num_images": num_images,
    }  # fmt: skip
    _logger.info("%s: top-1 %.4f [%.4f, %.4f], %.4g GFLOPs", c.name, row["top1"], low, high, backbone + policy)
    return row


@torch.inference_mode()
def evaluate_accuracy(
    pv: PrunableViT,
    loader: Iterable[tuple[Tensor, Tensor]],
    contenders: Sequence[Contender],
    *,
    layout: Layout = "gathered",
    desc: str = "eval",
) -> tuple[list[dict[str, float | str]], dict[str, Decisions]]:
    """Top-1 (with its 95% interval), loss, GFLOPs and kept tokens of every contender on the same images.

    Args:
        pv: the model, evaluated on the device of its parameters, in eval mode (its mode is restored).
        loader: batches of ``(images, labels)`` in dataset order (``index`` counts images from 0).
        contenders: the rows; names must be unique.
        layout: ``gathered`` removes pruned tokens, ``masked`` keeps shapes fixed (same logits).
        desc: progress bar label.

    Returns:
        One row per contender with every key of ``COLUMNS`` but the throughputs, and each contender's
        ``Decisions`` by name.
    """
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must be unique, got {names}")
    device = next(pv.parameters()).device
    models = {c.name: c.model or pv for c in contenders}
    counters = {c.name: FlopCounter(models[c.name].model) for c in contenders}
    policy_cost = {c.name: _decision_gflops(models[c.name], c) for c in contenders}
    sums = {c.name: dict(correct=0, loss=0.0, backbone=0.0, policy=0.0, tokens=0.0) for c in contenders}
    masks: dict[str, list[Tensor]] = {c.name: [] for c in contenders}
    num_images = 0
    with eval_mode(*set(models.values())):
        for images, labels in tqdm(loader, desc=desc, leave=False, disable=None):
            images, labels = images.to(device), labels.to(device)
            index = torch.arange(num_images, num_images + len(labels), device=device)
            for c in contenders:
                m = models[c.name]
                logits, kept, stage_masks = c.run(pv, images, layout=layout, index=index)
                live = torch.cat([torch.full_like(kept[:, :1], m.num_patches), stage_masks.sum(-1)[:, :-1]], 1)
                s = sums[c.name]
                s["correct"] += int((logits.argmax(dim=1) == labels).sum())
                s["loss"] += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
                s["backbone"] += float(c.backbone_flops(counters[c.name], kept).sum())
                s["policy"] += float(policy_cost[c.name](live, kept).sum())
                s["tokens"] += float(kept[:, -1].sum())
                masks[c.name].append(stage_masks.cpu())
            num_images += len(labels)
    if num_images == 0:
        raise ValueError("the evaluation got no images: the dataset split is empty")
    rows, decisions = [], {}
    for c in contenders:
        rows.append(_row(c, sums[c.name], num_images, counters[c.name].dense()))
        decisions[c.name] = Decisions(torch.arange(num_images), torch.cat(masks[c.name]))
    return rows, decisions


@torch.inference_mode()
def measure_throughput(
    pv: PrunableViT,
    images: Tensor,
    contenders: Sequence[Contender],
    *,
    batch_size: int,
    repeats: int = 5,
    layout: Layout = "gathered",
    min_seconds: float = 0.05,
) -> dict[str, float]:
    """Images per second of every contender (decision time included), timed side by side.

    Each repetition times every contender once, in an order rotated by one every repetition; a contender's figure is
    the median over repetitions. A timing runs batches until ``min_seconds`` have passed, each the next
    ``batch_size`` of ``images`` in turn (cycling; each contender's turn carries on across repetitions, so every
    contender meets the same images in the same order): a policy whose cost differs per image (an adaptive agent at
    batch 1) is timed over many images, not one. A batch's ``index`` is its images' positions in ``images``.

    Args:
        pv: the model (on the device it runs on).
        images: at least ``batch_size`` images; whole batches of them are used.
        contenders: the rows; random policies draw from their own generators.
        batch_size: images per forward pass (1 for latency-bound use).
        repeats: repetitions; the median is reported.
        layout: the pruned tokens' layout, ``gathered`` or ``masked``.
        min_seconds: the least time one measurement runs.
    """
    if len(images) < batch_size:
        raise ValueError(f"need at least {batch_size} images to time batch {batch_size}, got {len(images)}")
    device = next(pv.parameters()).device
    count = len(images) // batch_size
    batches = images[: count * batch_size].to(device).split(batch_size)
    indices = torch.arange(count * batch_size, device=device).split(batch_size)
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    turn = dict.fromkeys(times, 0)
    with eval_mode(*{c.model or pv for c in contenders}):
        for c in contenders:  # warm-up: allocator, kernels, lazy inits
            c.run(pv, batches[0], layout=layout, index=indices[0])
        for rep in range(repeats):
            shift = rep % len(contenders)
            for c in [*contenders[shift:], *contenders[:shift]]:
                runs, start = 0, time.perf_counter()
                while True:
                    j = turn[c.name] % count
                    c.run(pv, batches[j], layout=layout, index=indices[j])
                    turn[c.name] += 1
                    synchronize(device)
                    runs += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= min_seconds:
                        break
                times[c.name].append(runs * batch_size / elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def budget_keep_ratio(pv: PrunableViT, budget: float) -> float:
    """The keep ratio per stage (of the live tokens, rounded half up) whose backbone GFLOPs are closest to
    ``budget`` times the dense model's, for rules that keep the same count in every image
    (``BudgetKeepRatio``, the environment's own rule for budgets).
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"a budget is a fraction of the dense GFLOPs in (0, 1], got {budget}")
    if pv not in _KEEP_RATIOS:  # tabulated once per model: timed forward passes must not pay for it
        _KEEP_RATIOS[pv] = BudgetKeepRatio(pv)
    return float(_KEEP_RATIOS[pv](torch.tensor([budget], dtype=torch.float64))[0])


_KEEP_RATIOS: weakref.WeakKeyDictionary[PrunableViT, BudgetKeepRatio] = weakref.WeakKeyDictionary()


def fixed_masks(decisions: Decisions) -> KeepFn:
    """Replay recorded decisions: the mask of each image (by ``obs["index"]``) at each stage."""

    def keep(obs: dict[str, Tensor]) -> Tensor:
        rows = decisions.rows(obs["index"])
        return decisions.masks[rows, int(obs["stage"][0])].to(obs["index"].device)

    return keep


def random_at_counts(decisions: Decisions, *, seed: int) -> KeepFn:
    """Random pruning that keeps, in every image and at every stage, as many tokens as ``decisions`` did:
    the control that separates *which* tokens a policy keeps from *how many*."""
    counts = decisions.masks.sum(-1)  # (M, K)
    generator = torch.Generator().manual_seed(seed)

    def keep(obs: dict[str, Tensor]) -> Tensor:
        live = obs["live"].bool()
        count = counts[decisions.rows(obs["index"]), int(obs["stage"][0])].to(live.device)
        return random_count(live, count, generator)

    return keep


def box_first_at_counts(decisions: Decisions, box_tokens: Tensor, *, seed: int) -> KeepFn:
    """The object-box oracle: in every image and at every stage as many tokens as ``decisions`` kept, the live tokens
    that overlap the object's box first (at random among them), then the others at random: how far a policy is from
    knowing where the object is. ``box_tokens`` (M, N) bool marks, by dataset position, the patches the object's box
    overlaps (``apt_env.data.cluttered.box_token_mask``)."""
    counts = decisions.masks.sum(-1)  # (M, K)
    generator = torch.Generator().manual_seed(seed)

    def keep(obs: dict[str, Tensor]) -> Tensor:
        live = obs["live"].bool()
        rows = decisions.rows(obs["index"])
        count = counts[rows, int(obs["stage"][0])].to(live.device)
        scores = torch.rand(live.shape, generator=generator) + box_tokens[rows].float()  # the box's tokens rank first
        return top_count(scores.to(live.device), live, count)

    return keep


def evaluate(
    pv: PrunableViT,
    loader: Iterable[tuple[Tensor, Tensor]],
    keep_fn: KeepFn | None = None,
    *,
    layout: Layout = "gathered",
    obs_keys: Sequence[str] = OBS_KEYS,
    desc: str = "eval",
) -> dict[str, float]:
    """One policy's accuracy and cost on ``loader`` (a short form of ``evaluate_accuracy``).

    Returns:
        ``acc1``, ``acc1_low``, ``acc1_high`` (95% interval), ``loss``, ``gflops`` (backbone and policy),
        ``gflops_backbone``, ``tokens`` (mean patch tokens entering the last block), ``img_per_s`` (model
        time of this pass, decision included; for comparisons use ``measure_throughput``) and ``num_images``.
    """
    start = time.perf_counter()
    (row,), _ = evaluate_accuracy(
        pv, loader, [Contender(desc, keep_fn, obs_keys=tuple(obs_keys))], layout=layout, desc=desc
    )
    seconds = time.perf_counter() - start
    return {
        "acc1": row["top1"], "acc1_low": row["top1_low"], "acc1_high": row["top1_high"], "loss": row["loss"],
        "gflops": row["gflops"], "gflops_backbone": row["gflops_backbone"], "tokens": row["tokens_last"],
        "img_per_s": row["num_images"] / seconds, "num_images": float(row["num_images"]),
    }  # fmt: skip


def synchronize(device: torch.device) -> None:
    """Wait for a CUDA device's queued work, so that a wall-clock timing covers it; nothing on other devices."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


REPLAY_FORMAT = "apt-decisions/1"


def save_decisions(path: str | Path, decisions: Decisions, **facts: Any) -> Path:
    """Write ``decisions`` with the facts that make them replayable (dataset, split, image count, batch size,
    backbone digest, policy, budget, and the figures a replay must reproduce), atomically."""
    state = {"format": REPLAY_FORMAT, **facts, "index": decisions.index, "masks": decisions.masks}
    return write_file(path, lambda f: torch.save(state, f))


def load_decisions(path: str | Path, *, backbone_digest: str, dataset: str) -> tuple[Decisions, dict[str, Any]]:
    """Read a file of ``save_decisions``; refuse one made for other weights or other data.

    Returns:
        The decisions and the facts stored with them.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a decisions file, corrupt, or recorded for other weights (both digests named) or data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"replay file {path} does not exist; write one with --save-masks")
    state = load_train_state(path)
    if state is None or state.get("format") != REPLAY_FORMAT:
        raise ValueError(f"{path} is not a decisions file (format {REPLAY_FORMAT!r} expected)")
    missing = sorted({"index", "masks", "backbone_digest", "dataset", "split", "batch_size"} - set(state))
    if missing:
        raise ValueError(f"replay file {path} is corrupt: it lacks {missing}")
    if state["backbone_digest"] != backbone_digest:
        raise ValueError(
            f"replay file {path} was recorded with backbone weights {state['backbone_digest']}, these are "
            f"{backbone_digest}: replay it on the backbone it was made with"
        )
    if state["dataset"] != dataset:
        raise ValueError(f"replay file {path} was recorded on {state['dataset']!r}, not {dataset!r}")
    index, masks = state.pop("index"), state.pop("masks")
    if masks.dtype != torch.bool or masks.ndim != 3 or index.shape != masks.shape[:1]:
        raise ValueError(f"replay file {path} is corrupt: masks {tuple(masks.shape)}, index {tuple(index.shape)}")
    return Decisions(index, masks), state
