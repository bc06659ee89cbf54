"""What the tests share: the tiny model, its environment, and one thread for tests of tiny tensors."""

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from apt_env.backbone import PrunableViT
from apt_env.checkpoint import save_backbone
from apt_env.env import APTPruneVectorEnv

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


def tiny_envs(num_envs: int = 4, **kwargs) -> APTPruneVectorEnv:
    """The tiny environment, built from a fixed seed."""
    torch.manual_seed(0)
    return APTPruneVectorEnv(num_envs, **{**TINY, **kwargs})


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A saved checkpoint of the tiny ViT (untrained), for the scripts' tests."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "checkpoint"
    save_backbone(path, PrunableViT.from_timm("vit_tiny_patch16_224", **TINY_VIT), meta={"dataset": "synthetic"})
    return path


def run_train_agent(*flags: str, out: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``train_agent.py`` as a user launches it, on synthetic data with 8 envs and a short final evaluation."""
    cmd = [sys.executable, str(ROOT / "train_agent.py"), "--dataset", "synthetic", "--num-envs", "8"]
    cmd += ["--eval-episodes", "1", "--eval-images", "32", "--out-dir", str(out), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def teacher(backbone, tmp_path_factory) -> Path:
    """An agent trained briefly by native PPO on the tiny backbone (no budget): a teacher to distil."""
    out = tmp_path_factory.mktemp("teacher")
    run_train_agent("--model", str(backbone), "--total-env-steps", "48", out=out)
    (run_dir,) = out.iterdir()
    return run_dir / "agent"


@pytest.fixture
def one_thread():
    """Tiny tensors on shared cores: more threads only add contention (10x slower when loaded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
