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
from conftest import ROOT

from agents.io import load_policy
from apt_env.train_state import load_train_state

TOTAL = 96
"""env steps of a run: 4 rollouts of 1 episode x 3 stages x 8 images"""
INTERVAL = 48
"""env steps between checkpoints: 2 rollouts"""



def command(algo: str, backbone: Path, out: Path) -> list[str]:
    flags = ["--algo", algo, "--model", str(backbone), "--dataset", "synthetic", "--num-envs", "8"]
    flags += ["--episodes-per-rollout", "1", "--checkpoint-every", "2", "--total-env-steps", str(TOTAL)]
    flags += ["--eval-episodes", "1", "--eval-images", "32", "--out-dir", str(out)]
    return [sys.executable, str(ROOT / "train_agent.py"), *flags]


def finish(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def reached_step(log: str) -> int:
    """The env steps of the last rollout the log reports."""
    return max((int(s) for s in re.findall(r"rollout \d+ step (\d+)", log)), default=0)


def agent_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_policy(run_dir / "agent").state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["native", "ppo"])
def test_a_killed_run_resumes_from_its_last_complete_checkpoint(algo, backbone, tmp_path):
    finish(command(algo, backbone, tmp_path / "whole"))
    (whole,) = (tmp_path / "whole").iterdir()

    log = tmp_path / "killed.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(command(algo, backbone, tmp_path / "killed"), stderr=stderr,
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
