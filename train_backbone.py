"""Train a ViT backbone: plain (the baseline) or jointly with the APT pruning agent (``--method apt``).

Joint training alternates two phases every epoch: a *backbone phase*, where the frozen agent samples keep
masks and the loss is the cross-entropy over the original method's three channels (plain, one stage's
action alone, all actions), and an *agent phase*, where the backbone is frozen and the agent is trained by
PPO on the environment (APTPrune-v0 over this very backbone). The first ``--warmup-epochs`` train plain.
With ``--compare-plain`` (the default with ``--method apt``) a plain ViT is first trained with the same seed and
schedule, and the final table puts plain ViT | APT (pruning) | APT (no pruning) side by side.

The default run is short (5 epochs of 50 batches on Fashion-MNIST); see
``--steps-per-epoch`` for the full schedule. Each epoch ends with an atomic checkpoint in the run folder
(``checkpoint/``, loadable with ``apt_env.models.checkpoint.load_backbone``) and a training state for
``--resume``; the run ends with a test-split evaluation table.

    python train_backbone.py                                   # joint training of the default ViT on Fashion-MNIST
    python train_backbone.py --method plain                    # the plain baseline only
    torchrun --nproc_per_node 2 train_backbone.py              # data-parallel over 2 processes
    python train_backbone.py --model-kwargs '{"depth": 12}'    # timm kwargs over the defaults
    python train_backbone.py --resume runs/fashion-mnist__train_backbone__1__1732800000
    tensorboard --logdir runs
"""

import itertools
import json
import logging
import math
import os
import random
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from agents.baselines import RandomKeep
from agents.build import AgentArgs, build_policy, sampling_for
from agents.calibrate import calibrate_on_val
from agents.io import load_policy, save_policy
from agents.observation import keep_counts, live_mask
from agents.ppo import NativePPO
from apt_env.data.datasets import DatasetInfo, dataset_data_config, dataset_for, dataset_info, make_loader
from apt_env.data.splits import VAL_FRACTION
from apt_env.envs.arguments import budget_range
from apt_env.envs.env import APTPruneVectorEnv
from apt_env.envs.observe import BUDGET_KEYS, OBS_KEYS
from apt_env.eval.evaluate import (
    Contender,
    budget_keep_ratio,
    evaluate,
    evaluate_accuracy,
    measure_throughput,
    random_at_counts,
)
from apt_env.eval.report import agent_masks_figure, markdown_table
from apt_env.models.backbone import DEFAULT_MODEL_KWARGS, DEFAULT_MODEL_NAME, PrunableViT
from apt_env.models.checkpoint import load_backbone, save_backbone
from apt_env.models.resample import patch_size, resample_into
from apt_env.models.tokens import random_count
from apt_env.train.distributed import gather_objects, init_distributed, state_digest
from apt_env.train.joint import ChannelLosses, draw_budgets
from apt_env.train.runs import hyperparameters_text, new_run_dir, resume_args, seed_everything
from apt_env.train.state import TRAIN_STATE_FILE, Resumed, get_rng_state, resume_state, save_train_state

logger = logging.getLogger("train_backbone")


RENAMED = {"mode": "method", "train_prune_mode": "train_layout"}
"""Fields renamed since a run folder's ``args.json`` was written (old -> new): such runs still resume."""


@dataclass
class Args(AgentArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of the experiment: model initialization, data order and augmentation"""
    method: Annotated[Literal["plain", "apt", "random"], tyro.conf.arg(aliases=("--mode",))] = "apt"
    """`plain`: the ordinary ViT baseline; `apt`: jointly with the pruning agent, in alternating phases; `random`:
    the control that isolates what the agent adds (PatchDropout-style): the same channels and schedule with
    uniformly random masks of each budget's token count in place of the agent (needs --budget), no agent"""
    compare_plain: bool = True
    """apt method: first train a plain ViT with the same seed and schedule (in the run folder's `plain/`), and
    put it in the final table"""
    dataset: str = "fashion-mnist"
    """dataset: fashion-mnist, cifar10, cifar100, digits, synthetic or imagefolder:PATH"""
    data_root: str = "data"
    """folder of downloaded datasets"""
    model_name: str = DEFAULT_MODEL_NAME
    """timm model name (any ViT-family model)"""
    model_kwargs: str = "{}"
    """timm kwargs as JSON, merged over the defaults, e.g. '{"depth": 2}'. Defaults: num_classes of the dataset;
    with the default model also DEFAULT_MODEL_KWARGS at the dataset's img_size and in_chans. The data is resized
    to the model's img_size and in_chans"""
    pretrained: bool = False
    """start from timm's pretrained weights (downloads them: needs internet)"""
    init_checkpoint: str | None = None
    """start from this local checkpoint folder (written by save_backbone); --model-name and --model-kwargs are
    then ignored, unless --resample"""
    resample: bool = False
    """with --init-checkpoint: build --model-name (with --model-kwargs) and start it from the checkpoint's weights,
    its patch and position embeddings resampled to the new patch size (FlexiViT's method, timm's
    resample_patch_embed and resample_abs_pos_embed), e.g. --model-name vit_apt_tiny_patch2_28 from the shipped
    patch-4 ViT"""
    epochs: int = 5
    """epochs to train; the learning-rate schedule spans them all"""
    steps_per_epoch: int = 50
    """batches per epoch, each epoch from a new seeded shuffle of the whole train split; 0: all of it. The
    default is 5 x 50 steps of 128 images. The shipped plain ViT's schedule, 15 then 25 full epochs (429 steps
    each), is in docs/training.md"""
    stop_epoch: int | None = None
    """stop after this epoch's checkpoint (e.g. for a time-limited job) and continue later with --resume; the
    learning-rate schedule still spans --epochs"""
    batch_size: int = 128
    """training batch size"""
    eval_batch_size: int = 256
    """test-split batch size"""
    lr: float | None = None
    """peak learning rate of AdamW; default 1e-3 from scratch, 2e-4 when fine-tuning trained weights
    (--init-checkpoint, --pretrained)"""
    weight_decay: float = 0.05
    """AdamW weight decay (biases, norms, position and class tokens are not decayed)"""
    warmup_frac: float = 0.1
    """fraction of all steps that warm the learning rate up linearly, before a cosine decay to 0"""
    label_smoothing: float = 0.0
    """label smoothing of the cross-entropy"""
    max_grad_norm: float = 1.0
    """gradient clipping norm; 0 disables clipping"""
    augment: bool = True
    """random crop (and flip where it keeps the class) on the train split"""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the main process); results are reproducible either way"""
    device: str | None = None
    """torch device; default cuda when available, else cpu"""
    warmup_epochs: int | None = None
    """apt method: epochs of plain training before the pruned channels join (the agent trains after each);
    default 0 when starting from trained weights (--init-checkpoint, --pretrained), else 1"""
    plain_weight: float = 1.0
    """apt method: weight of the plain channel's cross-entropy"""
    single_weight: float = 1.0
    """apt method: weight of the single-action channel (one random stage's action on the unpruned tokens)"""
    multi_weight: float = 1.0
    """apt method: weight of the multi-action channel (every stage's action)"""
    train_layout: Annotated[Literal["gathered", "masked"], tyro.conf.arg(aliases=("--train-prune-mode",))] = "gathered"
    """how the pruned channels run in training: pruned tokens removed (faster) or masked (fixed shapes)"""
    agent_steps: int = 6144
    """apt method: env transitions of PPO per agent phase (num_envs per env step)"""
    num_envs: int = 64
    """apt method: images per env batch in the agent phase (per process)"""
    flops_weight: float = 0.5
    """apt method: weight of the compute term of the agent's reward"""
    budget: tuple[float, float] | None = (0.25, 1.0)
    """apt method: a budget range (fractions of the dense backbone's GFLOPs) for one budget-conditioned agent: it
    keeps each budget's token count (Gumbel top-k, its mode at test time), every agent episode and every
    training image drawing a budget from the range, so the backbone trains on the masks it meets at test time;
    none: the agent chooses how many tokens to keep (a Bernoulli per token)"""
    budget_mean: bool = False
    """apt method with --budget: the budget holds on average over images, not in each: a threshold agent (a keep
    decision per token) under the env's price of compute, whose mode the backbone trains on like any agent's; its
    thresholds are calibrated on val before the test table"""
    budget_groups: int | None = 1
    """apt and random methods with --budget: distinct budgets per training batch, each drawn from its own part of the
    range and shared by that many consecutive (shuffled) images; None: one per image (how the shipped default was
    trained). Fewer groups run the pruned channels in fewer, unpadded groups of rows (one budget per batch is the
    fastest, at the same accuracy over 3 seeds; see docs/results.md), every image's budget still uniform over
    the range"""
    reward: Literal["loss_delta", "prob_delta", "vs_random"] = "vs_random"
    """apt method: the agent's reward (``APTPruneVectorEnv``'s ``reward``): by default the loss under a random mask of
    the agent's per-image count minus the loss under the agent's (common random numbers)"""
    eval_budget: float = 0.5
    """apt method with --budget: the budget of the final table's pruned rows"""
    out_dir: str = "runs"
    """parent folder of the run folders"""
    resume: str | None = None
    """a run folder to continue from its last checkpoint, with the arguments saved in it (every other flag but
    --stop-epoch is ignored); the result is the same as an uninterrupted run"""


def check_args(args: Args) -> None:
    """Raise early on arguments that cannot work."""
    if args.method != "plain" and not 0 <= warmup_epochs(args) < args.epochs:
        raise ValueError(f"--warmup-epochs must be in [0, --epochs={args.epochs}), got {args.warmup_epochs}")
    if args.init_agent and args.method != "apt":
        raise ValueError("--init-agent needs --method apt")
    if args.method == "apt":
        sampling_for(args, budget=args.budget, budget_mean=args.budget_mean)  # a clear error for a misfit
    if args.budget_groups is not None and args.budget_groups < 1:
        raise ValueError(f"--budget-groups must be at least 1 (None: a budget per image), got {args.budget_groups}")
    if args.budget is None and args.budget_groups != 1:
        raise ValueError(f"--budget-groups {args.budget_groups} needs --budget: without one there are no budgets")
    if args.budget_mean and (args.budget is None or args.method != "apt"):
        raise ValueError("--budget-mean makes the agent's budget hold on average: it needs --method apt and --budget")
    if args.budget is not None:
        budget_range(args.budget)  # a clear error for a bad range
    elif args.method == "random":
        raise ValueError("--method random draws masks of each budget's token count: pass --budget LOW HIGH")
    if not 0.0 < args.eval_budget <= 1.0:
        raise ValueError(f"--eval-budget must be a fraction in (0, 1], got {args.eval_budget}")
    if args.pretrained and args.init_checkpoint:
        raise ValueError("pass either --pretrained or --init-checkpoint, not both")
    if args.resample and not args.init_checkpoint:
        raise ValueError("--resample starts --model-name from the weights of --init-checkpoint: pass one")
    if args.epochs < 1 or args.steps_per_epoch < 0:
        raise ValueError(f"need --epochs >= 1 and --steps-per-epoch >= 0, got {args.epochs}, {args.steps_per_epoch}")
    if args.stop_epoch is not None and not 1 <= args.stop_epoch <= args.epochs:
        raise ValueError(f"--stop-epoch must be in [1, --epochs={args.epochs}], got {args.stop_epoch}")
    if not 0 <= args.warmup_frac < 1:
        raise ValueError(f"--warmup-frac must be in [0, 1), got {args.warmup_frac}")
    parse_model_kwargs(args.model_kwargs)


def fine_tuning(args: Args) -> bool:
    """Whether training starts from trained weights (--init-checkpoint, --pretrained)."""
    return bool(args.init_checkpoint or args.pretrained)


def warmup_epochs(args: Args) -> int:
    """Plain epochs before pruning: as given, else none for trained weights and one from scratch."""
    if args.warmup_epochs is not None:
        return args.warmup_epochs
    return 0 if fine_tuning(args) else 1


def peak_lr(args: Args) -> float:
    """The peak learning rate: as given, else lower for fine-tuning than for training from scratch."""
    if args.lr is not None:
        return args.lr
    return 2e-4 if fine_tuning(args) else 1e-3


def parse_model_kwargs(text: str) -> dict:
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--model-kwargs must be a JSON object such as '{{\"depth\": 2}}', got {text!r}: {err}"
        ) from err
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object such as '{{\"depth\": 2}}', got {text!r}")
    return kwargs


def build_model(args: Args, info: DatasetInfo) -> PrunableViT:
    """A fresh timm model (optionally pretrained), or the one in ``--init-checkpoint``."""
    if not args.init_checkpoint:
        return fresh_model(args, info)
    source = load_backbone(args.init_checkpoint, expect={"num_classes": info.num_classes})
    if args.resample:
        return resample_into(source, fresh_model(args, info, prune_layers=source.prune_layers))
    if args.model_name != DEFAULT_MODEL_NAME or args.model_kwargs.strip() not in ("", "{}"):
        wanted = fresh_model(args, info)  # named, so it must fit the checkpoint it would be ignored for
        if wanted.num_patches != source.num_patches:
            raise ValueError(
                f"--init-checkpoint {args.init_checkpoint} has {source.num_patches} patch tokens (patch "
                f"{patch_size(source)}), --model-name {args.model_name} has {wanted.num_patches} (patch "
                f"{patch_size(wanted)}): pass --resample to start it from the checkpoint's weights resampled"
            )
    return source


def fresh_model(args: Args, info: DatasetInfo, prune_layers: tuple[int, ...] | None = None) -> PrunableViT:
    """``--model-name`` with ``--model-kwargs``, as timm builds it: with timm's preprocessing of its pretrained
    weights (``--pretrained``), else to be trained on the dataset's statistics."""
    defaults = {}
    if args.model_name == DEFAULT_MODEL_NAME:
        defaults = {**DEFAULT_MODEL_KWARGS, "img_size": info.img_size, "in_chans": info.in_chans}
    kwargs = {**defaults, "num_classes": info.num_classes, **parse_model_kwargs(args.model_kwargs)}
    pv = PrunableViT.from_timm(args.model_name, pretrained=args.pretrained, prune_layers=prune_layers, **kwargs)
    if not args.pretrained:
        size, chans = pv.img_size[0], pv.in_chans
        pv.data_config = dataset_data_config(args.dataset, img_size=size, in_chans=chans, root=args.data_root)
    return pv


def random_budget_masks(obs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``--method random``'s masks: each image's budget count of its live tokens, uniformly at random (torch's RNG,
    so a resumed run draws the same)."""
    live = live_mask(obs)
    return random_count(live, keep_counts(obs))


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """Learning-rate factor of each step: linear warm-up to 1, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def checkpoint_meta(info: DatasetInfo, **extra: float) -> dict:
    """What a checkpoint records besides the model and its preprocessing (``pv.data_config``): the data it
    expects, where it came from, how far it got."""
    return {
        "dataset": info.name,
        "split": "train",
        "val_fraction": VAL_FRACTION,
        "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
        "num_classes": info.num_classes,
        "img_size": info.img_size,
        "in_chans": info.in_chans,
        **extra,
    }


def make_agent_trainer(args: Args, pv: PrunableViT, rank: int, device: torch.device) -> NativePPO:
    """PPO for the agent on the environment over this very backbone (shared weights, no copy)."""
    envs = APTPruneVectorEnv(
        args.num_envs,
        model=pv,
        dataset=args.dataset,
        data_root=args.data_root,
        flops_weight=args.flops_weight,
        budget=args.budget,
        budget_mean=args.budget_mean,
        reward=args.reward,
        device=device,
    )
    sampling = sampling_for(args, budget=args.budget, budget_mean=args.budget_mean)
    # Every rank starts from the same agent (seed), and samples and draws its own images (seed + rank).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        policy = build_policy(args, envs, sampling=sampling)
    return NativePPO(envs, policy, lr=args.agent_lr or 3e-4, seed=args.seed + rank)


def prepare_run(args: Args) -> tuple[Args, Path]:
    """The run folder, new (with ``args.json``) or the one ``--resume`` names (with its saved arguments)."""
    if args.resume:  # the saved arguments, with this invocation's --stop-epoch
        args = resume_args(args, script="train_backbone.py", keep=("stop_epoch",), renamed=RENAMED)
        check_args(args)
        return args, Path(args.resume)
    check_args(args)
    rank, _, _ = init_distributed(args.device)  # joined first: every rank gets rank 0's folder name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", args.dataset)  # imagefolder:PATH has slashes
    run_dir = new_run_dir(
        args.out_dir, env_id=name, exp_name=args.exp_name, seed=args.seed, config=asdict(args), main_rank=rank == 0
    )
    return args, run_dir


def plain_baseline(args: Args, run_dir: Path) -> tuple[Args, Path]:
    """The plain ViT of an apt run: same seed, data and schedule, in ``run_dir``'s ``*__plain__*`` folder."""
    previous = sorted(run_dir.glob("*__plain__*"))
    plain = replace(
        args, method="plain", compare_plain=False, exp_name="plain", out_dir=str(run_dir), resume=None, init_agent=None
    )
    if previous:
        plain = replace(plain, resume=str(previous[-1]), stop_epoch=args.stop_epoch)
    return prepare_run(plain)


@dataclass
class Run:
    """What one training run works with, built once by ``setup`` and passed to each phase."""

    args: Args
    run_dir: Path
    rank: int
    world_size: int
    device: torch.device
    pv: PrunableViT
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    steps_per_epoch: int
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    losses_fn: torch.nn.Module
    agent: NativePPO | None
    writer: SummaryWriter | None
    start_epoch: int = 0
    global_step: int = 0

    @property
    def main_rank(self) -> bool:
        return self.rank == 0


@dataclass
class EpochStats:
    """The backbone phase's running loss and accuracy over the images it saw."""

    sum_loss: float = 0.0
    sum_correct: int = 0
    seen: int = 0

    def add(self, loss: float, correct: int, count: int) -> None:
        self.sum_loss += loss * count
        self.sum_correct += correct
        self.seen += count

    @property
    def loss(self) -> float:
        return self.sum_loss / max(1, self.seen)

    @property
    def acc1(self) -> float:
        return self.sum_correct / max(1, self.seen)


def load_or_build_model(args: Args, run_dir: Path, info: DatasetInfo, resumed: Resumed | None) -> PrunableViT:
    """The run's backbone: its own checkpoint's (with the saved weights) on resume, else built from the arguments."""
    if resumed is not None:
        pv = load_backbone(run_dir / "checkpoint", expect={"dataset": args.dataset})
        pv.model.load_state_dict(resumed.state["model"])
    else:
        pv = build_model(args, info)
    if pv.num_classes != info.num_classes:
        raise ValueError(f"the model has {pv.num_classes} classes, {args.dataset} has {info.num_classes}")
    if pv.img_size[0] != pv.img_size[1]:
        raise ValueError(f"datasets are square; the model's img_size is {pv.img_size}")
    return pv


def setup(args: Args, run_dir: Path) -> Run:
    """Model, data, optimizer, schedule and agent of a run, restored from its training state on resume."""
    rank, world_size, device = init_distributed(args.device)
    seed_everything(args.seed)  # the same model on every rank
    resumed = resume_state(args.resume, rank=rank, world_size=world_size)
    pv = load_or_build_model(args, run_dir, dataset_info(args.dataset, args.data_root), resumed).to(device)
    if world_size > 1:  # augmentation and stage draws: each rank its own stream
        seed_everything(args.seed + rank)
    # The model's own preprocessing: the dataset's statistics from scratch, else what its weights were trained with.
    train_set = dataset_for(pv, args.dataset, "train", augment=args.augment, root=args.data_root)
    val_set = dataset_for(pv, args.dataset, "val", root=args.data_root)
    batches = len(train_set) // (args.batch_size * world_size)  # drop_last: every step sees a full batch
    if batches == 0:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the train split ({len(train_set)} images)")
    steps_per_epoch = min(args.steps_per_epoch or batches, batches)
    total_steps = args.epochs * steps_per_epoch
    decay = param_groups_weight_decay(pv.model, args.weight_decay, no_weight_decay_list=pv.model.no_weight_decay())
    optimizer = torch.optim.AdamW(decay, lr=peak_lr(args))
    warmup_steps = round(args.warmup_frac * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, warmup_steps))
    channels = ChannelLosses(pv, layout=args.train_layout, label_smoothing=args.label_smoothing)
    agent = make_agent_trainer(args, pv, rank, device) if args.method == "apt" else None
    run = Run(
        args, run_dir, rank, world_size, device, pv, train_set, val_set, steps_per_epoch, total_steps, optimizer,
        scheduler, DDP(channels) if world_size > 1 else channels, agent, writer=None,
    )  # fmt: skip
    if resumed is not None:
        optimizer.load_state_dict(resumed.state["optimizer"])
        scheduler.load_state_dict(resumed.state["scheduler"])
        if agent is not None:
            agent.load_state_dict(resumed.own["agent"])
        run.start_epoch, run.global_step = resumed.state["epoch"], resumed.state["global_step"]
        resumed.restore_rng()  # last: building the model drew from the same RNGs
        logger.info("resuming %s after epoch %d (step %d)", run_dir, run.start_epoch, run.global_step)
    if run.main_rank:
        run.writer = SummaryWriter(str(run_dir), purge_step=run.global_step if resumed is not None else None)
        run.writer.add_text("hyperparameters", hyperparameters_text(vars(args)))
    return run


def epoch_loader(run: Run, epoch: int) -> torch.utils.data.DataLoader:
    """The train split in a fresh, seeded order every epoch (also after ``--resume``); one shard per rank."""
    sampler = None
    if run.world_size > 1:
        sampler = DistributedSampler(run.train_set, shuffle=True, seed=run.args.seed, drop_last=True)
        sampler.set_epoch(epoch)
    return make_loader(
        run.train_set,
        batch_size=run.args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        seed=run.args.seed + epoch,
        drop_last=True,
        num_workers=run.args.num_workers,
    )


def backbone_keep_fn(run: Run, epoch: int):
    """The masks the pruned channels see this epoch: none while warming up, the agent's, or random ones."""
    if run.args.method == "plain" or epoch < warmup_epochs(run.args):
        return None
    if run.agent is None:
        return random_budget_masks
    agent = run.agent
    agent.policy.eval()
    # The agent's test-time rule, its mode: sampled masks measured 11.6 points worse at budget 0.3 (CHANGELOG).
    return lambda obs: agent.policy.act(obs, deterministic=True, generator=agent.generator)


def train_one_epoch(run: Run, epoch: int, start: tuple[float, int]) -> EpochStats:
    """The backbone phase: one epoch of the channel losses under the agent's (or random) masks."""
    args, pv, writer = run.args, run.pv, run.writer
    keep_fn = backbone_keep_fn(run, epoch)
    weights = {"plain": args.plain_weight, "single": args.single_weight, "multi": args.multi_weight}
    pv.train()
    stats = EpochStats()
    bar = tqdm(
        itertools.islice(epoch_loader(run, epoch), run.steps_per_epoch),
        total=run.steps_per_epoch,
        desc=f"epoch {epoch + 1}" + (" (pruning)" if keep_fn is not None else ""),
        disable=not run.main_rank or None,
    )
    for images, labels in bar:
        images, labels = images.to(run.device), labels.to(run.device)
        single_stage = random.randrange(pv.num_stages)
        groups = None if args.budget_groups is None else min(args.budget_groups, len(labels))
        budget = draw_budgets(args.budget, len(labels), run.device, groups) if keep_fn is not None else None
        losses, logits = run.losses_fn(images, labels, keep_fn, weights, single_stage, budget)
        loss = sum(losses.values())
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if args.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(pv.parameters(), args.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.global_step += 1
        correct = int((logits.argmax(dim=1) == labels).sum())
        stats.add(loss.item(), correct, len(labels))
        if writer is not None:
            scalars = {"losses/loss": loss.item(), **{f"losses/{c}": v.item() for c, v in losses.items()}}
            if grad_norm is not None:
                scalars["losses/grad_norm"] = float(grad_norm)
            scalars["charts/train_acc1"] = correct / len(labels)
            scalars["charts/learning_rate"] = run.optimizer.param_groups[0]["lr"]
            scalars["charts/SPS"] = (run.global_step - start[1]) / (time.time() - start[0])
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, run.global_step)
        bar.set_postfix(loss=f"{stats.loss:.3f}", acc=f"{stats.acc1:.3f}")
    return stats


def train_agent_phase(run: Run, epoch: int) -> None:
    """The agent phase: PPO on the env over the frozen backbone."""
    agent = run.agent
    run.pv.eval()
    agent.policy.train()
    agent.restart_episodes()
    for stats in agent.learn(run.args.agent_steps):
        if run.writer is not None:
            for key in ("episode_return", "loss_delta", "keep_ratio", "gflops", "sps"):
                run.writer.add_scalar(f"agent/{key}", stats[key], run.global_step)
    logger.info("epoch %d agent: return %.4f keep %.3f", epoch + 1, stats["episode_return"], stats["keep_ratio"])


def validate(run: Run) -> dict:
    """Top-1 and loss on the held-out val split: what tuning may look at."""
    loader = make_loader(run.val_set, batch_size=run.args.eval_batch_size, shuffle=False, seed=run.args.seed)
    return evaluate(run.pv, loader, desc="val")


def save_epoch(run: Run, epoch: int, stats: EpochStats, ranks: list) -> None:
    """Validate, then write the checkpoint, the agent and the training state (rank 0), each atomically."""
    pv, writer = run.pv, run.writer
    val = validate(run)
    logger.info("epoch %d: val top-1 %.4f loss %.4f", epoch + 1, val["acc1"], val["loss"])
    meta = checkpoint_meta(
        run.train_set.info,  # as the model sees it: resized, channels converted
        epoch=epoch + 1,
        train_loss=stats.loss,
        train_acc1=stats.acc1,
        val_acc1=val["acc1"],
        val_loss=val["loss"],
        weights_digest=state_digest(pv.model),
    )
    for tag, value in (("charts/epoch", epoch + 1), ("charts/val_acc1", val["acc1"]), ("charts/val_loss", val["loss"])):
        writer.add_scalar(tag, value, run.global_step)
    if run.agent is not None:
        writer.add_figure("masks", agent_masks_figure(pv, run.agent.policy, run.val_set), run.global_step)
    save_backbone(run.run_dir / "checkpoint", pv, meta=meta)  # first: a resume rebuilds the model from it
    if run.agent is not None:
        save_policy(run.run_dir / "agent", run.agent.policy, meta={"global_step": run.agent.global_step})
    state = {
        "model": pv.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "ranks": ranks,
        "epoch": epoch + 1,
        "global_step": run.global_step,
    }
    save_train_state(run.run_dir / TRAIN_STATE_FILE, state)


def train(args: Args, run_dir: Path) -> bool:
    """Train one model (plain, or jointly with its agent) in ``run_dir``, from its last checkpoint if any.

    Returns:
        True when the schedule is complete, False when it stopped at ``--stop-epoch``.
    """
    run = setup(args, run_dir)
    logger.info(
        "run folder %s: %s, %d steps of %d images on %s x %d", run_dir, args.method, run.total_steps, args.batch_size,
        run.device, run.world_size,
    )  # fmt: skip
    start = (time.time(), run.global_step)
    complete = True
    with logging_redirect_tqdm():
        for epoch in range(run.start_epoch, args.epochs):
            stats = train_one_epoch(run, epoch, start)
            if run.agent is not None and epoch + 1 >= warmup_epochs(args):  # the backbone frozen
                train_agent_phase(run, epoch)
            # Before anything else could draw, so a resumed run continues identically; every rank its own.
            agent_state = run.agent.state_dict() if run.agent is not None else {}
            ranks = gather_objects({"rng": get_rng_state(), "agent": agent_state})
            if run.main_rank:
                save_epoch(run, epoch, stats, ranks)
            if args.stop_epoch is not None and epoch + 1 == args.stop_epoch < args.epochs:
                logger.info("stopped after epoch %d; continue with --resume %s", epoch + 1, run_dir)
                complete = False
                break
    if run.writer is not None:
        run.writer.close()
    if complete:  # every rank reports its weights, so that a test can check that they agree
        logger.info("rank %d weights sha256 %s", run.rank, state_digest(run.pv.model))
    return complete


def final_table(args: Args, run_dir: Path, plain_dir: Path | None) -> list[dict]:
    """The test-split table, every row on the same images, timed side by side.

    Rows: the plain ViT; APT pruning with its agent and without; and random tokens at the agent's counts (in every
    image and at every stage as many tokens as the agent kept, random ones), on the APT backbone and on the plain one
    (what the agent's choice of tokens adds, and what joint training adds).
    """
    _, _, device = init_distributed(args.device)
    pv = load_backbone(run_dir / "checkpoint", device=device)
    test_set = dataset_for(pv, args.dataset, "test", root=args.data_root)
    loader = make_loader(test_set, batch_size=args.eval_batch_size, shuffle=False, seed=args.seed)
    plain_pv = load_backbone(plain_dir / "checkpoint", device=device) if plain_dir is not None else None
    if plain_pv is not None and plain_pv.data_config != pv.data_config:  # both rows are scored on one loader
        raise ValueError(f"{plain_dir} preprocesses its images otherwise than {run_dir}: they cannot share a table")
    if args.method == "plain":
        contenders = [Contender("plain ViT")]
    elif args.method == "random":
        ratio = budget_keep_ratio(pv, args.eval_budget)
        rand = RandomKeep(ratio, seed=args.seed).act
        pruned = Contender("random-trained (pruning)", rand, args.eval_budget, obs_keys=("live", "stage"))
        contenders = [pruned, Contender("random-trained (no pruning)")]
        if plain_pv is not None:
            contenders.append(Contender("plain ViT", model=plain_pv))
    else:
        policy = load_policy(run_dir / "agent", device=device).eval()
        if policy.sampling == "threshold":  # its mean budget met on val, then scored on test
            policy.calibration = calibrate_on_val(
                policy, pv, dataset=args.dataset, budget_range=args.budget, root=args.data_root
            )
            save_policy(run_dir / "agent", policy, meta={"calibrated": True})
        act = lambda obs: policy.act(obs, deterministic=True)  # noqa: E731
        if policy.use_budget:  # run through its budget input
            budget_keys = (*OBS_KEYS, *BUDGET_KEYS)
            agent = Contender("APT (pruning)", act, args.eval_budget, obs_keys=budget_keys, flops=policy.decision_flops)
        else:
            agent = Contender("APT (pruning)", act, flops=policy.decision_flops)
        contenders = [agent, Contender("APT (no pruning)")]
    rows, decisions = evaluate_accuracy(pv, loader, contenders, desc="test")
    if args.method == "apt":
        counts = decisions["APT (pruning)"]
        live = ("live", "stage")  # what random pruning reads: no class attention to pay for
        at_counts = [
            Contender("APT, random at the agent's counts", random_at_counts(counts, seed=args.seed), obs_keys=live)
        ]
        if plain_pv is not None:
            random_plain = random_at_counts(counts, seed=args.seed)
            at_counts += [
                Contender("plain ViT", model=plain_pv),
                Contender("plain ViT, random at the agent's counts", random_plain, obs_keys=live, model=plain_pv),
            ]
        more, _ = evaluate_accuracy(pv, loader, at_counts, desc="test, random at the agent's counts")
        rows, contenders = rows + more, contenders + at_counts
    timing = torch.stack([test_set[i][0] for i in range(min(len(test_set), args.eval_batch_size))])
    speed = measure_throughput(pv, timing, contenders, batch_size=len(timing))
    for row in rows:
        row["img_per_s_b256"] = speed[row["policy"]]
    order = ["plain ViT", "APT (pruning)", "APT (no pruning)", "random-trained (pruning)"]
    return sorted(rows, key=lambda r: order.index(r["policy"]) if r["policy"] in order else len(order))


TABLE_COLUMNS = ("policy", "top1", "top1_low", "top1_high", "gflops", "gflops_policy", "tokens_last", "img_per_s_b256")


def main() -> None:
    args = tyro.cli(Args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, run_dir = prepare_run(args)
    plain_dir = None
    if args.method != "plain" and args.compare_plain:
        plain_args, plain_dir = plain_baseline(args, run_dir)
        if not train(plain_args, plain_dir):
            return
    if not train(args, run_dir) or int(os.environ.get("RANK", "0")) != 0:
        return
    rows = final_table(args, run_dir, plain_dir)
    (run_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown_table(rows, TABLE_COLUMNS)
    (run_dir / "results.md").write_text(table + "\n")
    print(f"\n{args.dataset} test split, {rows[0]['num_images']} images; run folder: {run_dir}")
    print(table)


if __name__ == "__main__":
    main()
