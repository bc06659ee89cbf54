"""The benchmark scripts' own options, run on tiny settings (their timings are not checked)."""

import sys
from pathlib import Path

import pytest
import torch
from helpers import run_in_checkout

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # each test launches a benchmark script


_run = run_in_checkout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_checks_refuse_to_run_without_a_cuda_device(tmp_path):
    proc = _run("bash", "benchmarks/gpu_checks.sh", str(tmp_path / "out"))
    assert proc.returncode != 0 and "no CUDA device: these checks need one" in proc.stderr


def test_backbone_benchmark_runs_under_bf16_autocast():
    proc = _run(sys.executable, "benchmarks/bench_backbone.py", "--models", "default", "--batch-sizes", "4",
                "--ratios", "0.5", "--repeats", "1", "--amp", "bf16")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "amp bf16" in proc.stdout and "varying" in proc.stdout


def test_env_benchmark_runs_without_its_sync_baseline():
    proc = _run(
        sys.executable, "benchmarks/bench_env.py", "--env-ids", "APTPrune-v0", "--num-envs", "2", "--episodes", "1",
        "--sync-episodes", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "env/bound" in proc.stdout and "SyncVectorEnv" not in proc.stdout


def test_decision_benchmark_times_the_physical_reference():
    proc = _run(sys.executable, "benchmarks/bench_decision.py", "--models", "default", "--batch-sizes", "2",
                "--agent-sizes", "8", "--repeats", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "agent / physical" in proc.stdout and "physical / dense" in proc.stdout


def test_trainer_benchmark_prints_the_most_native_ppo_could_gain():
    proc = _run(sys.executable, "benchmarks/bench_agents.py", "--num-envs", "4", "--rollouts", "1",
                "--episodes-per-rollout", "1", "--repeats", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "with no native plumbing at all" in proc.stdout and "native plumbing / SB3's" in proc.stdout


def test_attention_benchmark_times_each_length_against_its_next_multiple_of_16():
    proc = _run(sys.executable, "benchmarks/bench_attention.py", "--batch", "2", "--lengths", "15", "--calls", "1",
                "--repeats", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["15", "16"] and rows[1][2] == "1.00"


def test_reference_scores_score_every_policy_on_the_same_episodes_and_refuse_a_bad_agent_spec():
    common = ("--budgets", "0.5", "--episodes", "1", "--num-envs", "8", "--images", "64", "--split", "val")
    proc = _run(sys.executable, "benchmarks/reference_scores.py", "--agents", "shipped=apt_env/assets/default_agent",
                *common)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 0.5 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["random", "cls-attn top-k", "shipped"]
    assert all(row.rstrip(" |").endswith("| 8 | 64") for row in rows)
    proc = _run(sys.executable, "benchmarks/reference_scores.py", "--agents", "apt_env/assets/default_agent", *common)
    assert proc.returncode != 0 and "--agents takes NAME=FOLDER" in proc.stderr


def test_joint_vs_plain_reads_a_finished_seed_instead_of_running_it_again(backbone, tmp_path):
    extra = ("--dataset synthetic --batch-size 16 --steps-per-epoch 2 --epochs 1 --eval-batch-size 64 "
             "--num-envs 8 --agent-steps 48")  # fmt: skip
    args = ("benchmarks/joint_vs_plain.py", "--seeds", "1", "--out-dir", str(tmp_path / "runs"),
            "--init-checkpoint", str(backbone), f"--extra={extra}")  # fmt: skip
    first = _run(sys.executable, *args)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "seed 1: APT (no pruning): top-1" in first.stdout and "read from" not in first.stdout
    again = _run(sys.executable, *args)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "seed 1: read from" in again.stdout and len(list((tmp_path / "runs" / "seed1").iterdir())) == 1
    table = first.stdout[first.stdout.index("test split, seeds") :]
    assert again.stdout.endswith(table)  # the same rows, from the same results.json
