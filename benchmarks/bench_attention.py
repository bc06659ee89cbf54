"""torch's ``scaled_dot_product_attention`` by row length, side by side in one run: why ``models.packed`` pads a row
length just short of a multiple of 16 up to it on CPU (``attention_length``).

For each length, the time of one call on a batch of rows of that length (keys masked as in the packed blocks), and
its ratio to the time at the next multiple of 16 (above 1: padding up to it makes the attention itself faster; the
packed blocks pay ``qkv`` and ``proj`` on the extra slots too, so they pad only within 4 slots). Lengths are timed
in turns, median of ``--repeats``.

Run: ``python benchmarks/bench_attention.py`` (the default backbone's 4 heads of 32 at batch 64);
``--heads 3 --head-dim 64 --lengths 60 64 76 80`` for ``vit_tiny_patch16_224``'s.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import tyro

from apt_env.eval.evaluate import synchronize
from apt_env.models.packed import CPU_ATTENTION_TILE


@dataclass
class Args:
    batch: int = 64
    """rows per call"""
    heads: int = 4
    """attention heads"""
    head_dim: int = 32
    """width of a head"""
    lengths: tuple[int, ...] = (12, 14, 15, 16, 28, 30, 31, 32, 44, 46, 47, 48)
    """row lengths to time (with each one's next multiple of 16)"""
    calls: int = 20
    """calls per timing"""
    repeats: int = 7
    """timings per length (median)"""
    device: str = "cpu"
    """torch device"""
    threads: int = field(default_factory=torch.get_num_threads)
    """torch CPU threads"""


def next_tile(length: int) -> int:
    """The smallest multiple of ``CPU_ATTENTION_TILE`` not below ``length``."""
    return -(-length // CPU_ATTENTION_TILE) * CPU_ATTENTION_TILE


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lengths = sorted({*args.lengths, *map(next_tile, args.lengths)})
    gen = torch.Generator().manual_seed(0)
    inputs = {}
    for n in lengths:
        q = torch.randn(args.batch, args.heads, n, args.head_dim, generator=gen).to(device)
        inputs[n] = (q, torch.zeros(args.batch, 1, 1, n, device=device))
    times: dict[int, list[float]] = {n: [] for n in lengths}
    with torch.inference_mode():
        for rep in range(args.repeats + 1):
            for n in lengths[rep % len(lengths) :] + lengths[: rep % len(lengths)]:
                q, mask = inputs[n]
                synchronize(device)
                start = time.perf_counter()
                for _ in range(args.calls):
                    F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
                synchronize(device)
                if rep:  # the first turn warms up
                    times[n].append((time.perf_counter() - start) / args.calls)
    median = {n: statistics.median(t) for n, t in times.items()}
    print(f"{args.device}, {args.threads} threads, batch {args.batch}, {args.heads} heads of {args.head_dim}")
    print(f"{'length':>7}{'us/call':>10}{'/ next x16':>12}")
    for n in lengths:
        print(f"{n:>7}{1e6 * median[n]:>10.0f}{median[n] / median[next_tile(n)]:>12.2f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
