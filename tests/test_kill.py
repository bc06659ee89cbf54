"""SIGKILL train_agent.py in the middle of training, resume it, and end where an uninterrupted run ends."""

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, finish_two, torchrun

from agents.io import load_policy
from apt_env.train.state import load_train_state

TOTAL = 96
"""env steps of a run: 4 rollouts of 1 episode x 3 stages x 8 images"""
INTERVAL = 48
"""env steps between checkpoints: 2 rollouts"""


def command(algo: str, backbone: Path, out: Path, teacher: Path | None = None) -> list[str]:
    flags = ["--algo", algo, "--model", str(backbone), "--dataset", "synthetic", "--num-envs", "8"]
    flags += [] if teacher is None else ["--teacher", str(teacher)]
    flags += ["--episodes-per-rollout", "1", "--checkpoint-every", "2", "--total-env-steps", str(TOTAL)]
    flags += ["--val-episodes", "1", "--val-images", "32", "--out-dir", str(out)]
    return [sys.executable, str(ROOT / "train_agent.py"), *flags]


def finish(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def reached_step(log: str) -> int:
    """The env steps of the last rollout the log reports."""
    return max((int(s) for s in re.findall(r"(?:rollout|update) \d+ step (\d+)", log)), default=0)


def agent_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_policy(run_dir / "agent").state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["native", "ppo", "distill"])
def test_a_killed_run_resumes_from_its_last_complete_checkpoint(algo, backbone, request, tmp_path):
    teacher = request.getfixturevalue("teacher") if algo == "distill" else None
    finish(command(algo, backbone, tmp_path / "whole", teacher))
    (whole,) = (tmp_path / "whole").iterdir()

    log = tmp_path / "killed.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(command(algo, backbone, tmp_path / "killed", teacher), stderr=stderr,
                                stdout=subprocess.DEVNULL, cwd=ROOT)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not list((tmp_path / "killed").glob("*/train_state.pt")):  # the first checkpoint
                assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint came"
                time.sleep(0.01)
            time.sleep(random.Random(algo).uniform(0.0, 0.5))  # in the next rollouts or the last checkpoint
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    reached = reached_step(log.read_text())

    (run_dir,) = (tmp_path / "killed").iterdir()
    assert load_train_state(run_dir / "train_state.pt") is not None  # whole: a torn file would not load
    resumed = finish([sys.executable, str(ROOT / "train_agent.py"), "--resume", str(run_dir)])
    saved = int(re.search(r"resuming \S+ at step (\d+)", resumed).group(1))
    assert reached - saved <= INTERVAL, f"the run reached step {reached} before the kill, resumed at {saved}"
    leftovers = [p.name for p in run_dir.iterdir() if ".tmp-" in p.name or p.name.endswith(".old")]
    assert not leftovers, f"a killed save's files survived the resumed run: {leftovers}"
    expected, got = agent_weights(whole), agent_weights(run_dir)
    assert [k for k, v in expected.items() if not torch.equal(got[k], v)] == []


def rank_states(run_dir: Path) -> list[dict]:
    """Each rank's saved trainer and global RNG states, in rank order."""
    ranks = load_train_state(run_dir / "train_state.pt")["ranks"]
    assert len(ranks) == 2 and all(set(r) == {"trainer", "rng"} for r in ranks)
    return ranks


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers in /proc")
def test_a_killed_two_process_run_resumes_on_two_processes(backbone, tmp_path):
    flags = command("native", backbone, tmp_path / "whole")[2:]  # the flags, without python and the script
    finish_two(flags)
    (whole,) = (tmp_path / "whole").iterdir()

    log = tmp_path / "killed.log"
    with log.open("w") as stderr, torchrun(command("native", backbone, tmp_path / "killed")[2:], stderr) as proc:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "killed").glob("*/train_state.pt")):  # the first checkpoint
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint came"
            time.sleep(0.01)
        time.sleep(random.Random("native x 2").uniform(0.0, 0.3))  # in the next rollouts or the last checkpoint
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    reached = reached_step(log.read_text())

    (run_dir,) = (tmp_path / "killed").iterdir()
    saved_ranks = rank_states(run_dir)  # whole: a torn file would not load
    steps = [r["trainer"]["global_step"] for r in saved_ranks]
    assert steps[0] == steps[1], f"the ranks were saved at different steps: {steps}"
    trainers = [r["trainer"] for r in saved_ranks]  # each rank draws its own images and samples
    assert not torch.equal(trainers[0]["generator"], trainers[1]["generator"])
    assert trainers[0]["env_rng"] != trainers[1]["env_rng"]

    resumed = finish_two(["--resume", str(run_dir)])
    saved = {int(s) for s in re.findall(r"resuming \S+ at step (\d+)", resumed)}
    assert saved == {steps[0]}, f"the ranks resumed at steps {saved}, the checkpoint holds {steps[0]}"
    assert reached - steps[0] <= INTERVAL, f"the run reached step {reached} before the kill, resumed at {steps[0]}"
    leftovers = [p.name for p in run_dir.iterdir() if ".tmp-" in p.name or p.name.endswith(".old")]
    assert not leftovers, f"a killed save's files survived the resumed run: {leftovers}"
    expected, got = agent_weights(whole), agent_weights(run_dir)
    assert [k for k, v in expected.items() if not torch.equal(got[k], v)] == []
    for rank, (want, have) in enumerate(zip(rank_states(whole), rank_states(run_dir))):  # each rank went on as its own
        w, h = want["trainer"], have["trainer"]
        assert h["global_step"] == w["global_step"] and torch.equal(h["generator"], w["generator"]), rank
        assert h["env_rng"] == w["env_rng"], rank
        w, h = want["rng"], have["rng"]  # and the global RNGs
        assert torch.equal(h["torch"], w["torch"]) and h["python"] == w["python"], rank
        assert torch.equal(h["numpy"][1], w["numpy"][1]) and h["numpy"][2:] == w["numpy"][2:], rank
