"""Train a ViT backbone: the plain baseline now; jointly with the APT pruning agent (``--mode apt``) later.

The default run is short (5 epochs of 50 batches on Fashion-MNIST, about 5 minutes on 2 CPU cores); see
``--steps-per-epoch`` for the full schedule. Each epoch ends with an atomic checkpoint in the run folder
(``checkpoint/``, loadable with ``apt_env.checkpoint.load_backbone``) and a training state for
``--resume``; the run ends with a test-split evaluation table.

    python train_backbone.py                                   # the default tiny ViT on Fashion-MNIST
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
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from timm.optim import param_groups_weight_decay
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from apt_env.backbone import DEFAULT_MODEL_KWARGS, DEFAULT_MODEL_NAME, PrunableViT
from apt_env.checkpoint import (
    get_rng_state,
    load_backbone,
    load_train_state,
    save_backbone,
    save_train_state,
    set_rng_state,
)
from apt_env.data import DatasetInfo, build_dataset, dataset_info, make_loader
from apt_env.evaluate import evaluate

logger = logging.getLogger("train_backbone")


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of the experiment: model initialization, data order and augmentation"""
    mode: Literal["plain", "apt"] = "plain"
    """`plain`: the ordinary ViT baseline; `apt`: jointly with the pruning agent (needs agents/, not yet available)"""
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
    then ignored"""
    epochs: int = 5
    """epochs to train; the learning-rate schedule spans them all"""
    steps_per_epoch: int = 50
    """batches per epoch, each epoch from a new seeded shuffle of the whole train split; 0: all of it. The
    default, 5 x 50 steps of 128 images, takes about 5 minutes on 2 CPU cores (a step of the default ViT: ~1 s;
    the test evaluation: ~35 s). The full schedule on Fashion-MNIST is `--epochs 30 --steps-per-epoch 0`
    (30 x 468 steps, about 4 hours there)"""
    stop_epoch: int | None = None
    """stop after this epoch's checkpoint (e.g. for a time-limited job) and continue later with --resume; the
    learning-rate schedule still spans --epochs"""
    batch_size: int = 128
    """training batch size"""
    eval_batch_size: int = 256
    """test-split batch size"""
    lr: float = 1e-3
    """peak learning rate of AdamW"""
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
    out_dir: str = "runs"
    """parent folder of the run folders"""
    resume: str | None = None
    """a run folder to continue from its last checkpoint, with the arguments saved in it (every other flag but
    --stop-epoch is ignored); the result is the same as an uninterrupted run"""


def check_args(args: Args) -> None:
    """Raise early on arguments that cannot work."""
    if args.mode == "apt":
        raise NotImplementedError(
            "--mode apt trains the backbone jointly with the pruning agent (agents/), which is not available yet; "
            "use --mode plain"
        )
    if args.pretrained and args.init_checkpoint:
        raise ValueError("pass either --pretrained or --init-checkpoint, not both")
    if args.epochs < 1 or args.steps_per_epoch < 0:
        raise ValueError(f"need --epochs >= 1 and --steps-per-epoch >= 0, got {args.epochs}, {args.steps_per_epoch}")
    if args.stop_epoch is not None and not 1 <= args.stop_epoch <= args.epochs:
        raise ValueError(f"--stop-epoch must be in [1, --epochs={args.epochs}], got {args.stop_epoch}")
    if not 0 <= args.warmup_frac < 1:
        raise ValueError(f"--warmup-frac must be in [0, 1), got {args.warmup_frac}")
    parse_model_kwargs(args.model_kwargs)


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


def resume_args(run_dir: Path, args: Args) -> Args:
    """The arguments saved in ``run_dir``, with this invocation's ``resume`` and ``stop_epoch``."""
    path = run_dir / "args.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no args.json there; is it a run folder of train_backbone.py?")
    saved = json.loads(path.read_text())
    unknown = sorted(set(saved) - {f.name for f in fields(Args)})
    if unknown:
        raise ValueError(f"--resume {run_dir}: args.json has fields {unknown} that this script does not know")
    return Args(**{**saved, "resume": str(run_dir), "stop_epoch": args.stop_epoch})


def build_model(args: Args, info: DatasetInfo) -> PrunableViT:
    """A fresh timm model (optionally pretrained), or the one in ``--init-checkpoint``."""
    if args.init_checkpoint:
        return load_backbone(args.init_checkpoint, expect={"num_classes": info.num_classes})
    defaults = {}
    if args.model_name == DEFAULT_MODEL_NAME:
        defaults = {**DEFAULT_MODEL_KWARGS, "img_size": info.img_size, "in_chans": info.in_chans}
    kwargs = {**defaults, "num_classes": info.num_classes, **parse_model_kwargs(args.model_kwargs)}
    return PrunableViT.from_timm(args.model_name, pretrained=args.pretrained, **kwargs)


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """Learning-rate factor of each step: linear warm-up to 1, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def batch_losses(
    pv: PrunableViT, images: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The losses of one training batch by channel (summed into the training loss), and the plain logits.

    ``plain`` is the unpruned forward pass. ``--mode apt`` adds its pruned channels here: ``single`` (only this
    stage's agent action) and ``multi`` (all actions so far), the same images under the agent's masks.
    """
    logits = pv(images)  # (B, num_classes)
    return {"plain": F.cross_entropy(logits, labels, label_smoothing=label_smoothing)}, logits


def checkpoint_meta(info: DatasetInfo, **extra: float) -> dict:
    """What a checkpoint records besides the model: the data it expects and how far training got."""
    return {
        "dataset": info.name,
        "num_classes": info.num_classes,
        "img_size": info.img_size,
        "in_chans": info.in_chans,
        "mean": list(info.mean),
        "std": list(info.std),
        **extra,
    }


def main() -> None:
    args = tyro.cli(Args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.resume:
        run_dir = Path(args.resume)
        args = resume_args(run_dir, args)
    check_args(args)
    if not args.resume:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", args.dataset)  # imagefolder:PATH has slashes
        run_dir = Path(args.out_dir) / f"{name}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir.mkdir(parents=True)
        (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    info = dataset_info(args.dataset, args.data_root)
    state = load_train_state(run_dir / "train_state.pt") if args.resume else None
    if state is not None:
        pv = load_backbone(run_dir / "checkpoint", expect={"dataset": args.dataset})
        pv.model.load_state_dict(state["model"])
    else:
        pv = build_model(args, info)
    if pv.num_classes != info.num_classes:
        raise ValueError(f"the model has {pv.num_classes} classes, {args.dataset} has {info.num_classes}")
    if pv.img_size[0] != pv.img_size[1]:
        raise ValueError(f"datasets are square; the model's img_size is {pv.img_size}")
    pv = pv.to(device)
    data = dict(img_size=pv.img_size[0], in_chans=pv.in_chans, root=args.data_root)
    train_set = build_dataset(args.dataset, split="train", augment=args.augment, **data)
    test_set = build_dataset(args.dataset, split="test", **data)
    info = train_set.info  # as the model sees it: resized, channels converted
    batches = len(train_set) // args.batch_size  # drop_last: every step sees a full batch
    if batches == 0:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the train split ({len(train_set)} images)")
    steps_per_epoch = min(args.steps_per_epoch or batches, batches)
    total_steps = args.epochs * steps_per_epoch

    param_groups = param_groups_weight_decay(
        pv.model, args.weight_decay, no_weight_decay_list=pv.model.no_weight_decay()
    )
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, round(args.warmup_frac * total_steps))
    )
    start_epoch, global_step = 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, global_step = state["epoch"], state["global_step"]
        set_rng_state(state["rng"])  # last: building the model drew from the same RNGs
        logger.info("resuming %s after epoch %d (step %d)", run_dir, start_epoch, global_step)
    elif args.resume:
        logger.warning("%s has no training state yet: starting it over", run_dir)

    writer = SummaryWriter(str(run_dir), purge_step=global_step if state is not None else None)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()),
    )
    logger.info("run folder %s: %d steps of %d images on %s", run_dir, total_steps, args.batch_size, device)

    meta = checkpoint_meta(info, epoch=start_epoch)
    start_time, start_step = time.time(), global_step
    with logging_redirect_tqdm():
        for epoch in range(start_epoch, args.epochs):
            loader = make_loader(
                train_set,
                batch_size=args.batch_size,
                shuffle=True,
                seed=args.seed + epoch,  # a fresh, reproducible order every epoch, also after --resume
                drop_last=True,
                num_workers=args.num_workers,
            )
            pv.train()
            sum_loss, sum_correct, seen = 0.0, 0, 0
            bar = tqdm(itertools.islice(loader, steps_per_epoch), total=steps_per_epoch, desc=f"epoch {epoch + 1}")
            for images, labels in bar:
                images, labels = images.to(device), labels.to(device)
                losses, logits = batch_losses(pv, images, labels, label_smoothing=args.label_smoothing)
                loss = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if args.max_grad_norm > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(pv.parameters(), args.max_grad_norm)
                    writer.add_scalar("losses/grad_norm", float(grad_norm), global_step + 1)
                optimizer.step()
                scheduler.step()
                global_step += 1

                correct = int((logits.argmax(dim=1) == labels).sum())
                sum_loss += loss.item() * len(labels)
                sum_correct += correct
                seen += len(labels)
                writer.add_scalar("losses/loss", loss.item(), global_step)
                for channel, value in losses.items():
                    writer.add_scalar(f"losses/{channel}", value.item(), global_step)
                writer.add_scalar("charts/train_acc1", correct / len(labels), global_step)
                writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
                writer.add_scalar("charts/SPS", (global_step - start_step) / (time.time() - start_time), global_step)
                bar.set_postfix(loss=f"{sum_loss / seen:.3f}", acc=f"{sum_correct / seen:.3f}")

            rng = get_rng_state()  # before anything else could draw, so a resumed run continues identically
            meta = checkpoint_meta(info, epoch=epoch + 1, train_loss=sum_loss / seen, train_acc1=sum_correct / seen)
            writer.add_scalar("charts/epoch", epoch + 1, global_step)
            save_backbone(run_dir / "checkpoint", pv, meta=meta)  # first: a resume rebuilds the model from it
            save_train_state(
                run_dir / "train_state.pt",
                {
                    "model": pv.model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                    "global_step": global_step,
                    "rng": rng,
                },
            )
            if args.stop_epoch is not None and epoch + 1 == args.stop_epoch < args.epochs:
                logger.info("stopped after epoch %d; continue with --resume %s", epoch + 1, run_dir)
                writer.close()
                return

        test_loader = make_loader(
            test_set, batch_size=args.eval_batch_size, shuffle=False, seed=args.seed, num_workers=args.num_workers
        )
        results = evaluate(pv, test_loader, desc="test")
    for key in ("acc1", "loss", "gflops", "tokens", "img_per_s"):
        writer.add_scalar(f"charts/test_{key}", results[key], global_step)
    save_backbone(run_dir / "checkpoint", pv, meta={**meta, "test_acc1": results["acc1"], "test_loss": results["loss"]})
    writer.close()

    print(f"\n{args.dataset} test split, {int(results['num_images'])} images; checkpoint: {run_dir / 'checkpoint'}")
    print("| model | top-1 | GFLOPs/img | tokens | img/s |")
    print("|-------|------:|-----------:|-------:|------:|")
    print(
        f"| {args.mode} | {100 * results['acc1']:.2f}% | {results['gflops']:.4g} | "
        f"{results['tokens']:.1f}/{pv.num_patches} | {results['img_per_s']:.0f} |"
    )


if __name__ == "__main__":
    main()
