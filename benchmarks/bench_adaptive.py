"""What a mean-budget (adaptive) agent costs at batch 1 beside a fixed-count agent of the same weights, side by side.

At batch 1 an image has no other row to pad to, so the adaptive agent's per-image count costs nothing in shape: its
one-image fast path (``agents.fused.FusedAdaptiveAgent``) reads each stage's count once and otherwise runs the
fixed-count agent's fused walk. Rows, at each budget, timed in one interleaved loop
(``apt_env.eval.evaluate.measure_throughput``, median of repeats) on the same val images:

- the dense model (timm's forward), and compiled (``torch.compile``) when ``--compile``;
- the fixed-count agent (``topk``): the generic walk, its fused static-shape path, and compiled;
- its threshold twin: the same weights deciding token by token against thresholds calibrated on other val images so
  that the mean GFLOPs meet the budget (``agents.calibrate``), by the generic walk and by the one-image fast path.

The twin is not a trained mean-budget agent: its decisions only set the counts the timing runs at. Printed: img/s
and each row over dense and over the fixed-count agent's fastest row, and the twin's mean GFLOPs over the budget on
the timed images.

Run: ``python benchmarks/bench_adaptive.py`` (the shipped 196-token pair; ``--compile`` adds the compiled rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import tyro

from agents.calibrate import calibrate_thresholds, mean_gflops_fraction
from agents.fused import FusedAdaptiveAgent, FusedBudgetAgent
from agents.io import load_policy
from agents.policy import APTPolicy
from apt_env.data.datasets import dataset_for
from apt_env.envs.observe import BUDGET_KEYS, OBS_KEYS
from apt_env.eval.evaluate import Contender, TimedForward, measure_throughput
from apt_env.eval.report import markdown_table
from apt_env.models.checkpoint import load_backbone

ASSETS = "apt_env/assets"


@dataclass
class Args:
    model: str = f"{ASSETS}/p2_default"
    """backbone checkpoint folder"""
    agent: str = f"{ASSETS}/p2_agent"
    """a fixed-count budget agent (sampling topk, no mixer) for that backbone"""
    dataset: str = "fashion-mnist"
    """the backbone's dataset: val images for the calibration and the timing"""
    budgets: tuple[float, ...] = (0.25, 0.5)
    """fractions of the dense backbone's GFLOPs"""
    calibration_images: int = 256
    """val images the twin's thresholds are calibrated on"""
    timed_images: int = 64
    """the next val images, each timed in turn at batch 1"""
    compile: bool = False
    """also time the compiled dense model and fused paths"""
    repeats: int = 7
    """timed repetitions (median)"""
    threads: int = field(default_factory=torch.get_num_threads)
    """torch CPU threads"""


def threshold_twin(policy: APTPolicy) -> APTPolicy:
    """The same network deciding token by token against a threshold (``sampling="threshold"``), uncalibrated."""
    twin = APTPolicy.from_config({**policy.config(), "sampling": "threshold"})
    twin.load_state_dict(policy.state_dict())
    return twin.eval()


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    pv = load_backbone(args.model).eval()
    policy = load_policy(args.agent).eval()
    data = dataset_for(pv, args.dataset, "val")
    n = args.calibration_images
    images = torch.stack([data[i][0] for i in range(n + args.timed_images)])
    calib, timed = images[:n], images[n:]
    twin = threshold_twin(policy)
    with torch.inference_mode():
        twin.calibration = calibrate_thresholds(twin, pv, calib, args.budgets)
    print(f"threads={args.threads} torch={torch.__version__} model={args.model} agent={args.agent} batch=1")
    keys = (*OBS_KEYS, *BUDGET_KEYS)
    rows: list[Contender] = [Contender("dense")]
    if args.compile:
        rows.append(TimedForward("dense, compiled", forward=torch.compile(pv.model, dynamic=False)))
    for b in args.budgets:
        rows.append(Contender(f"fixed-count walk @ {b:g}", lambda o: policy.act(o), b, obs_keys=keys))
        fused = FusedBudgetAgent(pv, policy, b).eval()
        rows.append(TimedForward(f"fixed-count fused @ {b:g}", budget=b, forward=fused))
        if args.compile:
            compiled = torch.compile(fused, dynamic=False)
            rows.append(TimedForward(f"fixed-count fused, compiled @ {b:g}", budget=b, forward=compiled))
        rows.append(Contender(f"adaptive walk @ {b:g}", lambda o: twin.act(o), b, obs_keys=keys))
        fast = FusedAdaptiveAgent(pv, twin, b).eval()
        rows.append(TimedForward(f"adaptive fast path @ {b:g}", budget=b, forward=fast))
        if args.compile:  # dynamic shapes: the counts differ per image
            compiled = torch.compile(fast, dynamic=True)
            rows.append(TimedForward(f"adaptive fast path, compiled @ {b:g}", budget=b, forward=compiled))
    speed = measure_throughput(pv, timed, rows, batch_size=1, repeats=args.repeats)
    table = []
    with torch.inference_mode():
        for b in args.budgets:
            fixed = max(v for k, v in speed.items() if k.startswith("fixed-count") and k.endswith(f"@ {b:g}"))
            spent = mean_gflops_fraction(twin, pv, timed, b)
            for name in [c.name for c in rows if c.budget == b or c.name.startswith("dense")]:
                adaptive = name.startswith("adaptive")
                table.append({"budget": b, "row": name, "img/s": speed[name],
                              "over dense": speed[name] / speed["dense"],
                              "over the fixed-count fastest": speed[name] / fixed,
                              "twin's GFLOPs / budget": spent / b if adaptive else math.nan})  # fmt: skip
    print(markdown_table(table, list(table[0]), formats=FORMATS))


FORMATS = {"img/s": ".1f", "over dense": ".2f", "over the fixed-count fastest": ".2f", "twin's GFLOPs / budget": ".3f"}


if __name__ == "__main__":
    main(tyro.cli(Args))
