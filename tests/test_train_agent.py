"""train_agent.py end to end, launched as a user would, on a tiny backbone and synthetic data."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_VIT, load_script
from helpers import run_train_agent as run

from agents.io import load_policy
from apt_env.envs.env import APTPruneVectorEnv

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["native", "ppo", "a2c"])
def test_each_algorithm_trains_and_writes_a_loadable_agent(algo, backbone, tmp_path):
    proc = run("--algo", algo, "--model", str(backbone), "--total-env-steps", "96", "--checkpoint-every", "1",
               out=tmp_path)  # fmt: skip
    assert "| APT agent |" in proc.stdout and "| cls-attn top-k (same ratio) |" in proc.stdout
    (run_dir,) = tmp_path.iterdir()
    envs = APTPruneVectorEnv(2, model=str(backbone), dataset="synthetic")
    policy = load_policy(run_dir / "agent", observation_space=envs.single_observation_space)
    assert policy.num_patches == 16
    assert any(run_dir.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_unknown_algo_lists_valid_ones(tmp_path):
    proc = run("--algo", "dqn-ish", out=tmp_path, check=False)
    assert proc.returncode != 0 and "dqn-ish" in proc.stderr
    assert all(f"'{algo}'" in proc.stderr for algo in ("native", "ppo", "a2c"))
    assert not any(tmp_path.iterdir())  # no run folder for a bad command


def test_algo_choices_are_native_the_sb3_algorithms_and_distillation():
    import typing

    module = load_script("train_agent")
    hints = typing.get_type_hints(module.Args)
    assert typing.get_args(hints["algo"]) == ("native", *module.SB3_ALGORITHMS, "distill")


@pytest.mark.slow
def test_distillation_writes_a_smaller_agent_that_reads_as_its_teacher(backbone, teacher, tmp_path):
    run("--algo", "distill", "--teacher", str(teacher), "--model", str(backbone), "--hidden", "8", "--qk-dim", "8",
        "--total-env-steps", "96", out=tmp_path)  # fmt: skip
    (run_dir,) = tmp_path.iterdir()
    config = json.loads((run_dir / "agent" / "config.json").read_text())
    assert config["hidden"] == config["qk_dim"] == 8 and config["algo"] == "distill"
    assert config["teacher"] == str(teacher) and config["global_step"] == 96
    taught = load_policy(teacher)
    assert (config["sampling"], config["use_budget"]) == (taught.sampling, taught.use_budget)


@pytest.mark.slow
def test_distillation_needs_a_teacher_that_fits_the_env(backbone, teacher, tmp_path):
    proc = run("--algo", "distill", "--model", str(backbone), out=tmp_path, check=False)
    assert proc.returncode != 0 and "--algo distill needs --teacher" in proc.stderr
    proc = run("--teacher", str(teacher), "--model", str(backbone), out=tmp_path, check=False)
    assert proc.returncode != 0 and "--teacher is for --algo distill only" in proc.stderr
    assert not any(tmp_path.iterdir())  # refused before a run folder is made
    flags = ["--algo", "distill", "--teacher", str(teacher), "--model", str(backbone), "--budget", "0.5", "1.0"]
    proc = run(*flags, out=tmp_path, check=False)
    assert proc.returncode != 0 and "reads no budget: drop --budget" in proc.stderr


@pytest.mark.slow
def test_agent_for_another_backbone_is_a_clear_error(backbone, tmp_path):
    run("--model", str(backbone), "--total-env-steps", "24", out=tmp_path)
    (run_dir,) = tmp_path.iterdir()
    other = APTPruneVectorEnv(2, model=("vit_tiny_patch16_224", {**TINY_VIT, "embed_dim": 64}), dataset="synthetic")
    with pytest.raises(ValueError, match="16 tokens of width 32.*16 tokens of width 64"):
        load_policy(run_dir / "agent", observation_space=other.single_observation_space)


@pytest.mark.slow
def test_two_processes_end_with_identical_agents(backbone, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "train_agent.py")]
    cmd += ["--model", str(backbone), "--dataset", "synthetic", "--num-envs", "4", "--total-env-steps", "96"]
    cmd += ["--val-episodes", "1", "--val-images", "32", "--out-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    digests = dict(re.findall(r"rank (\d) agent sha256 (\w+)", proc.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    assert "| APT agent |" in proc.stdout and len(list(tmp_path.iterdir())) == 1


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["native", "ppo"])
def test_a_budget_agent_trains_with_the_variance_reduced_reward(algo, backbone, tmp_path):
    flags = ["--budget", "0.5", "1.0", "--sampling", "topk", "--reward", "vs_random"]
    run("--algo", algo, "--model", str(backbone), "--total-env-steps", "96", *flags, out=tmp_path)
    (run_dir,) = tmp_path.iterdir()
    policy = load_policy(run_dir / "agent")
    assert policy.use_budget and policy.sampling == "topk"


def test_reward_choices_are_the_environments():
    import typing

    from apt_env.envs.episodes import REWARDS

    module = load_script("train_agent")
    hints = typing.get_type_hints(module.Args)
    assert typing.get_args(hints["reward"]) == REWARDS


def resume(run_dir: Path, **changes) -> subprocess.CompletedProcess:
    """``--resume`` a run folder, with some of its saved arguments changed first."""
    saved = run_dir / "args.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), **changes}, indent=2))
    proc = subprocess.run([sys.executable, str(ROOT / "train_agent.py"), "--resume", str(run_dir)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr
    return proc


def agent_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_policy(run_dir / "agent").state_dict()


# Distillation anneals its learning rate to the run's last step: a run extended on resume changes its schedule, so
# its resume is checked by a kill (tests/test_kill.py).
@pytest.mark.slow
@pytest.mark.parametrize("algo", ["native", "ppo"])
def test_a_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_weights(algo, backbone, tmp_path):
    flags = ["--algo", algo, "--model", str(backbone), "--episodes-per-rollout", "1", "--checkpoint-every", "2"]
    run(*flags, "--total-env-steps", "96", out=tmp_path / "whole")
    run(*flags, "--total-env-steps", "48", out=tmp_path / "part")  # stopped at the checkpoint of step 48
    (whole,), (part,) = (tmp_path / "whole").iterdir(), (tmp_path / "part").iterdir()
    expected, halfway = agent_weights(whole), agent_weights(part)
    assert not all(torch.equal(halfway[k], v) for k, v in expected.items()), "the second half must train"
    resume(part, total_env_steps=96)
    assert json.loads((part / "agent" / "config.json").read_text())["global_step"] == 96
    resumed = agent_weights(part)
    assert [k for k, v in expected.items() if not torch.equal(resumed[k], v)] == []


@pytest.mark.slow
def test_a_fixed_count_agent_is_fine_tuned_into_a_calibrated_mean_budget_agent(backbone, tmp_path):
    budget = ("--budget", "0.25", "1.0")
    run("--model", str(backbone), *budget, "--sampling", "topk", "--total-env-steps", "48", out=tmp_path / "fixed")
    (fixed,) = (tmp_path / "fixed").iterdir()
    mean_flags = (*budget, "--budget-mean", "--sampling", "threshold", "--init-agent", str(fixed / "agent"))
    run("--model", str(backbone), *mean_flags, "--total-env-steps", "48", "--calibration-images", "16",
        out=tmp_path / "mean")  # fmt: skip
    (mean,) = (tmp_path / "mean").iterdir()
    start, tuned = load_policy(fixed / "agent"), load_policy(mean / "agent")
    assert (start.sampling, tuned.sampling) == ("topk", "threshold")
    calibration = tuned.calibration
    assert calibration["budgets"][0] == 0.25 and calibration["budgets"][-1] == 1.0 and calibration["images"] == 16
    assert calibration["split"] == "val" and len(calibration["backbone"]) == 16  # the weights' digest
    proc = run("--model", str(backbone), *mean_flags, "--algo", "ppo", out=tmp_path / "bad", check=False)
    assert proc.returncode != 0 and "--init-agent starts native PPO" in proc.stderr
