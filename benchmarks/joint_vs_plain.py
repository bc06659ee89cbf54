"""The original APT method's protocol over seeds: plain ViT vs APT (pruning) vs APT (no pruning), and random tokens
at the agent's counts on both backbones, on the test split.

Runs the README's first command (``train_backbone.py --init-checkpoint apt_env/assets/plain`` with the shipped method's
flags, ``--method``: the shipped plain ViT fine-tuned plainly and jointly with a fresh budget agent, same seed and
schedule) once per seed and prints each row's
mean and standard deviation: top-1, GFLOPs per image (the agent's cost included), kept tokens. Extra flags go to
every run, e.g. ``--extra="--epochs 10 --steps-per-epoch 0"``. A seed whose run under ``--out-dir`` already finished is
read from its ``results.json``, not run again (a killed seed starts over).

Run: ``python benchmarks/joint_vs_plain.py`` (the default schedule: the README's first command, per seed).
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tyro

from apt_env.defaults import PLAIN_CHECKPOINT
from apt_env.eval.report import markdown_table

SCRIPT = Path(__file__).resolve().parents[1] / "train_backbone.py"


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` of a few repeats (sample std; 0 for one value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:.4g} ± {std:.2g}"


@dataclass
class Args:
    seeds: tuple[int, ...] = (1, 2, 3)
    """one run per seed"""
    out_dir: str = "runs/joint_vs_plain"
    """parent folder of the runs"""
    init_checkpoint: str = str(PLAIN_CHECKPOINT)
    """the trained backbone both runs start from"""
    method: str = ""
    """the method's flags beyond train_backbone.py's defaults (which are the shipped recipe: one budget agent for
    [0.25, 1], the backbone trained on its test-time masks, the pruned rows at --eval-budget 0.5)"""
    extra: str = ""
    """flags passed to every train_backbone.py run, as one string"""


def finished_run(out: Path) -> Path | None:
    """The newest run folder under ``out`` that finished (wrote ``results.json``), or None: a seed already run is
    read, not run again, so a killed sweep goes on from the seed it was on."""
    done = [p for p in out.iterdir() if (p / "results.json").is_file()] if out.is_dir() else []
    return max(done, key=lambda p: (p / "results.json").stat().st_mtime, default=None)


def main(args: Args) -> None:
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        out = Path(args.out_dir) / f"seed{seed}"
        run_dir = finished_run(out)
        if run_dir is None:
            cmd = [sys.executable, str(SCRIPT), "--method", "apt", "--seed", str(seed), "--out-dir", str(out)]
            cmd += ["--init-checkpoint", args.init_checkpoint]
            cmd += shlex.split(args.method) + shlex.split(args.extra)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
            run_dir = finished_run(out)
            assert run_dir is not None, f"train_backbone.py wrote no results.json under {out}"
        else:
            print(f"seed {seed}: read from {run_dir} (finished earlier)", flush=True)
        for results in json.loads((run_dir / "results.json").read_text()):
            name = results["policy"]
            rows.setdefault(name, []).append(results)
            print(f"seed {seed}: {name}: top-1 {100 * results['top1']:.2f}% [{100 * results['top1_low']:.2f}, "
                  f"{100 * results['top1_high']:.2f}], {results['gflops']:.4g} GFLOPs, "
                  f"{results['tokens_last']:.1f} tokens", flush=True)  # fmt: skip

    table = [
        {"model": name, "top-1 (%)": mean_std([100 * r["top1"] for r in results]),
         "GFLOPs/img": mean_std([r["gflops"] for r in results]),
         "tokens (last block)": mean_std([r["tokens_last"] for r in results])}
        for name, results in rows.items()
    ]  # fmt: skip
    print(f"\ntest split, seeds {', '.join(map(str, args.seeds))} (mean ± std)")
    print(markdown_table(table, list(table[0]), left=["model"]))


if __name__ == "__main__":
    main(tyro.cli(Args))
