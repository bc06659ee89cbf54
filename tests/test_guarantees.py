"""Guarantees of data-parallel training that only several processes can show.

Elsewhere: the phases of joint training freeze the other part (``test_joint.py``), GAE against a hand
computation and a resumed PPO trainer's final weights (``test_agents.py``), the ``prob_delta`` reward under
pruning (``test_env.py``), and two ranks ending with the same weights and resuming exactly
(``test_train_backbone.py::test_two_processes_agree_see_different_data_and_resume_exactly``, which reads
the ranks' RNG states, not their data: this file looks at the data).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RECORDING_RUN = """
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

from apt_env.envs.episodes import PruningEpisodes

script_path, out = sys.argv[1], Path(sys.argv[2])
sys.argv = [script_path, *sys.argv[3:]]
spec = importlib.util.spec_from_file_location("train_backbone", script_path)
script = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = script
spec.loader.exec_module(script)

seen = {"train_indices": [], "episode_images": []}


class Recording(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset, self.info = dataset, dataset.info

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        seen["train_indices"].append(int(index))
        return self.dataset[index]


dataset_for = script.dataset_for


def recording_dataset_for(pv, name, split, **kwargs):
    dataset = dataset_for(pv, name, split, **kwargs)
    return Recording(dataset) if split == "train" else dataset


script.dataset_for = recording_dataset_for
start = PruningEpisodes.start


def recording_start(self, images, labels, **kw):
    seen["episode_images"].append(hashlib.sha256(images.cpu().numpy().tobytes()).hexdigest())
    return start(self, images, labels, **kw)


PruningEpisodes.start = recording_start
script.agent_masks_figure = lambda *args, **kwargs: None  # slow, and rank 0's only
SummaryWriter.add_figure = lambda *args, **kwargs: None
args, run_dir = script.prepare_run(tyro.cli(script.Args))
assert script.train(args, run_dir)
(out / f"{os.environ['RANK']}.json").write_text(json.dumps(seen))
"""


@pytest.mark.slow
def test_two_ranks_train_on_different_images_in_both_phases(tmp_path):
    """Under torchrun, each rank's backbone phase reads its own shard of the train split (disjoint indices),
    and its agent phase starts episodes on its own images (seed + rank)."""
    runner = tmp_path / "recording_run.py"
    runner.write_text(RECORDING_RUN)
    steps, batch = 3, 16
    flags = [
        "--dataset", "synthetic", "--model-kwargs", json.dumps({"depth": 2, "embed_dim": 32, "num_heads": 2}),
        "--batch-size", str(batch), "--steps-per-epoch", str(steps), "--eval-batch-size", "64",
        "--method", "apt", "--epochs", "1", "--warmup-epochs", "0", "--num-envs", "8", "--agent-steps", "48",
        "--no-compare-plain", "--out-dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(runner)]
    cmd += [str(ROOT / "train_backbone.py"), str(tmp_path), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    shards = [set(s["train_indices"]) for s in seen]
    assert [len(s["train_indices"]) for s in seen] == [steps * batch] * 2
    assert all(len(shard) == steps * batch for shard in shards)  # no image twice in an epoch ...
    assert not shards[0] & shards[1]  # ... nor on both ranks
    episodes = [s["episode_images"] for s in seen]
    assert episodes[0] and len(episodes[0]) == len(episodes[1])
    assert not set(episodes[0]) & set(episodes[1])
