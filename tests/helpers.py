"""What the tests share besides fixtures: the tiny model and its environment, and the scripts as a user launches them.

Test files import this module by name (``from helpers import ...``): pytest's default import mode puts ``tests/``
on ``sys.path``. Fixtures stay in ``conftest.py``.
"""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

from apt_env.envs.env import APTPruneVectorEnv

TINY_VIT = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, depth=4, embed_dim=32, num_heads=2)
"""timm kwargs of the tiny ViT: 16 patch tokens of 4x4 pixels, 4 blocks (pruning before blocks 1, 2, 3)."""

TINY = dict(model=("vit_tiny_patch16_224", TINY_VIT), dataset="synthetic")
"""Environment arguments for the tiny ViT on synthetic images."""

SMALL = dict(hidden=16, qk_dim=16)
"""A small APT agent."""


ROOT = Path(__file__).resolve().parents[1]
"""The repository: where the scripts are."""


def load_script(name: str) -> ModuleType:
    """A top-level script (``train_backbone``, ``train_agent``, ``evaluate``) as a module, to call its parts."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_in_checkout(*args: str) -> subprocess.CompletedProcess:
    """A command run in the repository with this interpreter first on PATH and the repository importable, as in an
    activated checkout (a benchmark or experiment script as a user launches it)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ, PATH=path, PYTHONPATH=str(ROOT))
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def tiny_envs(num_envs: int = 4, **kwargs) -> APTPruneVectorEnv:
    """The tiny environment, built from a fixed seed."""
    torch.manual_seed(0)
    return APTPruneVectorEnv(num_envs, **{**TINY, **kwargs})


def run_train_agent(*flags: str, out: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``train_agent.py`` as a user launches it, on synthetic data with 8 envs and a short final evaluation."""
    cmd = [sys.executable, str(ROOT / "train_agent.py"), "--dataset", "synthetic", "--num-envs", "8"]
    cmd += ["--val-episodes", "1", "--val-images", "32", "--out-dir", str(out), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


TAG = "APT_KILL_TEST_TAG"
"""An environment variable that marks the processes of one launch: torchrun starts each worker in a session of its
own, so killing torchrun's process group leaves the ranks running (they go on and finish the run)."""


def tagged(tag: str) -> list[int]:
    """The live processes whose environment holds ``TAG=tag``: torchrun and its workers (Linux's /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"{TAG}={tag}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return pids


def kill_all(tag: str) -> None:
    """SIGKILL torchrun and every rank at once: all their process groups stopped first, then killed; returns once
    none of them is left to write a file."""
    groups = set()
    for pid in tagged(tag):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 30
    while tagged(tag):  # a killed process's environ reads empty once it is a zombie
        assert time.monotonic() < deadline, f"processes of {tag} outlived SIGKILL"
        time.sleep(0.01)


@contextmanager
def torchrun(args: list[str], stderr, script: Path = ROOT / "train_agent.py") -> Iterator[subprocess.Popen]:
    """``script args`` (train_agent.py by default) on 2 processes of torchrun, all of them killed on the way out
    (a timeout, a failed check), so that no rank outlives the test."""
    tag = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", TAG: tag}
    proc = subprocess.Popen([*cmd, str(script), *args], stdout=subprocess.DEVNULL, stderr=stderr,
                            text=True, cwd=ROOT, env=env, start_new_session=True)  # fmt: skip
    try:
        yield proc
    finally:
        kill_all(tag)
        proc.wait()


def finish_two(args: list[str], script: Path = ROOT / "train_agent.py", weights: str = "agent") -> str:
    """Run ``script args`` (train_agent.py by default) on 2 processes to its end; returns the log, once both ranks
    reported the same weights (their ``rank R {weights} sha256 DIGEST`` lines: train_agent.py's agent,
    train_backbone.py's backbone ``weights``)."""
    with torchrun(args, subprocess.PIPE, script) as proc:
        _, log = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-4000:]
    digests = dict(re.findall(rf"rank (\d) {weights} sha256 (\w+)", log))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], digests
    return log
