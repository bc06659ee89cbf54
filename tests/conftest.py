"""The tests' fixtures: a saved tiny backbone, a teacher agent trained on it, and one thread for tiny tensors.

Plain helpers (the tiny model's arguments, the scripts' launchers) are in ``helpers.py``."""

from pathlib import Path

import pytest
import torch
from helpers import TINY_VIT, run_train_agent

from apt_env.data.datasets import dataset_data_config
from apt_env.models.backbone import PrunableViT
from apt_env.models.checkpoint import save_backbone


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A saved checkpoint of the tiny ViT (untrained), for the scripts' tests."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "checkpoint"
    pv = PrunableViT.from_timm("vit_tiny_patch16_224", **TINY_VIT)
    pv.data_config = dataset_data_config("synthetic", img_size=16, in_chans=1)  # as train_backbone.py records it
    save_backbone(path, pv, meta={"dataset": "synthetic"})
    return path


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
