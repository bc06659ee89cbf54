"""The one smoke test of ``experiments/``: an experiment script runs end to end on the tiny model and data.

Experiments answer one-off questions (each folder's README has the question, the command and the answer); CI runs
one of them, so that the shared library they stand on cannot break them unnoticed.
"""

import sys

import pytest
import torch
from helpers import run_in_checkout

SCRIPT = "experiments/adaptive_compute/adaptive_counts.py"


@pytest.mark.slow
def test_adaptive_counts_compares_a_calibrated_agent_with_its_fixed_count_form(backbone, tmp_path):
    from agents.calibrate import calibrate_thresholds
    from agents.io import save_policy
    from agents.policy import APTPolicy
    from apt_env.data.datasets import dataset_for
    from apt_env.models.checkpoint import load_backbone
    from apt_env.train.distributed import state_digest

    pv = load_backbone(backbone)
    torch.manual_seed(0)
    fixed = APTPolicy(pv.embed_dim, pv.num_patches, pv.num_stages, hidden=8, qk_dim=8, use_budget=True, sampling="topk")
    adaptive = APTPolicy.from_config({**fixed.config(), "sampling": "threshold"})
    adaptive.load_state_dict(fixed.state_dict())
    data = dataset_for(pv, "synthetic", "val")
    images = torch.stack([data[i][0] for i in range(16)])  # the split's first 16 of 40: calibration
    adaptive.calibration = calibrate_thresholds(
        adaptive, pv, images, [0.4, 0.7], meta={"backbone": state_digest(pv.model)}
    )
    args = ("--model", str(backbone), "--agent", str(save_policy(tmp_path / "fixed", fixed)), "--dataset", "synthetic",
            "--start", "16", "--images", "24", "--budgets", "0.4", "0.7")  # fmt: skip
    path = save_policy(tmp_path / "adaptive", adaptive)
    proc = run_in_checkout(
        sys.executable, "experiments/adaptive_compute/adaptive_counts.py", "--adaptive", str(path), *args
    )
    assert proc.returncode == 0, proc.stderr
    assert "images 16-39 (24)" in proc.stdout and proc.stdout.count("fixed-count agent") == 2
    assert "kept per stage" in proc.stdout and "Spearman" in proc.stdout
    proc = run_in_checkout(
        sys.executable, "experiments/adaptive_compute/adaptive_counts.py", "--adaptive", str(tmp_path / "fixed"), *args
    )
    assert proc.returncode != 0 and "keeps fixed counts" in proc.stderr
