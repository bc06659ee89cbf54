"""Pruning speed in the gathered layout against the physical reference, side by side in one run.

For each backbone, batch size and keep ratio ``r`` (stage ``k`` keeps ``r**k`` of the patches, as
DynamicViT), with counts uniform or varying inside the batch (``r`` +- 0.15 per sample):

* ``img/s``: throughput of ``PrunableViT(x, keep_masks, layout="gathered")``;
* ``flops x``: dense FLOPs / pruned FLOPs (analytic, ``apt_env.models.flops``);
* ``dense x``: the reference's speed-up over the unpruned model;
* ``efficiency``: time of the reference / measured time. The reference runs the same blocks on a
  plain dense batch whose length at each stage is the batch's mean kept length: no masks, no
  padding, no gathering (``apt_env.eval.evaluate.DenseAtLengths``).

Run: ``python benchmarks/bench_backbone.py``; on a GPU, e.g.
``--device cuda --models vit_small_patch16_224 vit_base_patch16_224 --batch-sizes 256 --amp bf16``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import tyro

from apt_env.eval.evaluate import DenseAtLengths, synchronize
from apt_env.models.backbone import DEFAULT_MODEL_KWARGS, DEFAULT_MODEL_NAME, PrunableViT
from apt_env.models.flops import FlopCounter


@dataclass
class Args:
    batch_sizes: tuple[int, ...] = (1, 64)
    """batch sizes to measure"""
    ratios: tuple[float, ...] = (1.0, 0.7, 0.5, 0.3)
    """per-stage keep ratios"""
    repeats: int = 7
    """timed runs per measurement (the median is reported)"""
    models: tuple[str, ...] = ("default", "vit_apt_tiny_patch2_28", "vit_tiny_patch16_224")
    """`default` (the 49-token Fashion-MNIST ViT) and/or timm names, built at their own img_size (the project's
    `vit_apt_*` names with their own classes)"""
    spread: float = 0.15
    """half-width of the per-sample keep ratio when counts vary inside the batch"""
    device: str = "cpu"
    """torch device (e.g. cuda; timings synchronize it)"""
    amp: Literal["none", "bf16"] = "none"
    """bf16: every row under ``torch.autocast`` in bfloat16"""
    bucket_rows: int = 32
    """rows per length group when counts vary (``PrunableViT(bucket_rows=...)``)"""
    threads: int = field(default_factory=torch.get_num_threads)
    """torch CPU threads"""


def stage_counts(n: int, ratios: torch.Tensor, num_stages: int) -> torch.Tensor:
    """Kept patch counts per sample and stage. # (B,) ratios -> (B, K)"""
    k = torch.arange(1, num_stages + 1, dtype=torch.float64)
    return (n * ratios.double().unsqueeze(1) ** k).round().clamp(min=1).long()


def nested_masks(counts: torch.Tensor, n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Random nested keep masks with the given counts. # (B, K) -> K x (B, N)"""
    score = torch.rand(counts.shape[0], n, generator=gen)
    rank = score.argsort(dim=1).argsort(dim=1)  # each token's rank within its row
    return [rank < counts[:, k : k + 1] for k in range(counts.shape[1])]


def tokens_per_block(pv: PrunableViT, counts: torch.Tensor) -> torch.Tensor:
    """Tokens entering each block, prefix included. # (B, K) -> (B, depth)"""
    full = torch.full((counts.shape[0], 1), pv.num_patches)
    per_stage = torch.cat([full, counts], dim=1) + pv.num_prefix_tokens  # (B, K + 1)
    repeats = torch.tensor([b - a for a, b in zip(pv.stage_bounds, pv.stage_bounds[1:])])
    return per_stage.repeat_interleave(repeats, dim=1)


def timed(fns: list[Callable[[], object]], repeats: int, device: torch.device) -> list[float]:
    """Median seconds of each function, runs interleaved so that machine noise hits all alike (a CUDA device
    synchronized around each run)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def build(name: str, bucket_rows: int = 32) -> PrunableViT:
    if name == "default":
        return PrunableViT.from_timm(DEFAULT_MODEL_NAME, bucket_rows=bucket_rows, **DEFAULT_MODEL_KWARGS).eval()
    if name.startswith("vit_apt_"):
        return PrunableViT.from_timm(name, bucket_rows=bucket_rows).eval()
    return PrunableViT.from_timm(name, num_classes=10, bucket_rows=bucket_rows).eval()


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    device = torch.device(args.device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} CPU threads"
    print(f"{where}, torch {torch.__version__}, amp {args.amp}, bucket_rows={args.bucket_rows}")
    header = f"{'model':<22}{'batch':>6}{'ratio':>7}{'counts':>9}{'kept/stage':>16}{'img/s':>10}"
    header += f"{'flops x':>9}{'dense x':>9}{'efficiency':>12}"
    print(header)
    for name in args.models:
        pv = build(name, args.bucket_rows).to(device)
        flops = FlopCounter(pv.model)
        n = pv.num_patches
        for batch in args.batch_sizes:
            images = torch.randn(batch, pv.in_chans, *pv.img_size, generator=gen).to(device)
            full = DenseAtLengths("dense", lengths=(n,) * pv.num_stages)
            for ratio in args.ratios:
                kinds = ["uniform"] if ratio == 1.0 or batch == 1 else ["uniform", "varying"]
                for kind in kinds:
                    spread = args.spread if kind == "varying" else 0.0
                    r = ratio + spread * (2 * torch.rand(batch, generator=gen) - 1)
                    counts = stage_counts(n, r.clamp(0.05, 1.0), pv.num_stages)
                    masks = [mask.to(device) for mask in nested_masks(counts, n, gen)]
                    lengths = counts.double().mean(0).round().long().tolist()
                    ref = DenseAtLengths("reference", lengths=tuple(lengths))
                    with torch.inference_mode(), amp:
                        t_ours, t_ref, t_full = timed(
                            [
                                lambda: pv(images, masks, layout="gathered"),
                                lambda: ref.run(pv, images),
                                lambda: full.run(pv, images),
                            ],
                            args.repeats,
                            device,
                        )
                    flops_x = flops.dense() / float(flops(tokens_per_block(pv, counts)).mean())
                    print(
                        f"{name:<22}{batch:>6}{ratio:>7.1f}{kind:>9}{'/'.join(map(str, lengths)):>16}"
                        f"{batch / t_ours:>10.1f}{flops_x:>9.2f}{t_full / t_ref:>9.2f}{t_ref / t_ours:>12.2f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main(tyro.cli(Args))
