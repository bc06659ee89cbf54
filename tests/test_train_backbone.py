"""train_backbone.py launched as a subprocess with tiny flags, as CleanRL tests its scripts."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apt_env.checkpoint import load_backbone, load_train_state

SCRIPT = Path(__file__).resolve().parents[1] / "train_backbone.py"
TINY_MODEL = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 16}
TINY = [
    "--dataset", "synthetic",
    "--model-kwargs", json.dumps(TINY_MODEL),
    "--batch-size", "16",
    "--steps-per-epoch", "3",
    "--eval-batch-size", "64",
]  # fmt: skip


def _run(out_dir: Path, *flags: str) -> tuple[Path, str]:
    """Run the script; return its run folder (the only one in ``out_dir``) and its stdout."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--out-dir", str(out_dir), *flags],
        cwd=out_dir.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = out_dir.iterdir()
    return run_dir, proc.stdout


def test_end_to_end_writes_a_loadable_checkpoint_and_prints_the_table(tmp_path):
    run_dir, stdout = _run(tmp_path / "runs", "--epochs", "1")
    assert run_dir.name.startswith("synthetic__train_backbone__1__")
    assert "| plain |" in stdout and "/16 |" in stdout  # 16 patch tokens of 4x4 pixels in a 16x16 image

    pv = load_backbone(run_dir / "checkpoint", expect={"dataset": "synthetic", "num_classes": 10, "img_size": 16})
    assert pv.depth == 2 and pv.embed_dim == 32
    config = json.loads((run_dir / "checkpoint" / "config.json").read_text())
    assert config["epoch"] == 1 and 0 <= config["test_acc1"] <= 1
    state = load_train_state(run_dir / "train_state.pt")
    assert state["epoch"] == 1 and state["global_step"] == 3
    assert all(torch.equal(v, state["model"][k]) for k, v in pv.model.state_dict().items())
    assert list(run_dir.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    run_a, _ = _run(tmp_path / "a", "--epochs", "2")
    run_b, stdout = _run(tmp_path / "b", "--epochs", "2", "--stop-epoch", "1")
    assert "| plain |" not in stdout  # stopped before the test evaluation
    assert load_train_state(run_b / "train_state.pt")["epoch"] == 1
    _, stdout = _run(tmp_path / "b", "--resume", str(run_b))
    assert "| plain |" in stdout

    a = load_backbone(run_a / "checkpoint").model.state_dict()
    b = load_backbone(run_b / "checkpoint").model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run_b / "checkpoint" / "config.json").read_text())["epoch"] == 2


def _script():
    spec = importlib.util.spec_from_file_location("train_backbone", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_arguments_are_refused_early():
    script = _script()
    with pytest.raises(NotImplementedError, match="--mode apt .* pruning agent"):
        script.check_args(script.Args(mode="apt"))
    with pytest.raises(ValueError, match="--model-kwargs must be a JSON object"):
        script.check_args(script.Args(model_kwargs="depth=2"))
    with pytest.raises(ValueError, match="--stop-epoch"):
        script.check_args(script.Args(epochs=2, stop_epoch=3))


def test_learning_rate_warms_up_then_decays_to_zero():
    factor = _script().cosine_with_warmup(total_steps=100, warmup_steps=10)
    values = [factor(step) for step in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == 1.0
    assert all(a >= b for a, b in zip(values[9:], values[10:]))
    assert values[100] == pytest.approx(0.0)
