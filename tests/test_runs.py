"""The run helpers every script shares (``apt_env.train.runs``) and the Markdown tables of ``apt_env.eval.report``."""

import json
import random
from dataclasses import asdict, dataclass

import numpy as np
import pytest
import torch

from apt_env.eval.report import markdown_table
from apt_env.train.runs import hyperparameters_text, load_args, new_run_dir, resume_args, seed_everything


@dataclass
class Args:
    exp_name: str = "demo"
    seed: int = 3
    lr: float = 1e-3
    resume: str | None = None


def test_a_run_folder_is_named_as_cleanrl_and_holds_its_arguments(tmp_path):
    args = Args()
    run_dir = new_run_dir(tmp_path, env_id="APTPrune-v0", exp_name=args.exp_name, seed=args.seed, config=asdict(args))
    env_id, exp_name, seed, stamp = run_dir.name.split("__")
    assert (env_id, exp_name, seed) == ("APTPrune-v0", "demo", "3") and stamp.isdigit()
    assert json.loads((run_dir / "args.json").read_text()) == asdict(args)
    assert load_args(run_dir, Args, script="demo.py", resume=str(run_dir)) == Args(resume=str(run_dir))


def test_only_the_main_rank_makes_the_folder(tmp_path):
    run_dir = new_run_dir(tmp_path, env_id="x", exp_name="demo", seed=1, config={}, main_rank=False)
    assert run_dir.parent == tmp_path and not run_dir.exists()


def test_resuming_a_folder_without_or_with_foreign_arguments_says_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no args.json there; is it a run folder of demo.py"):
        load_args(tmp_path, Args, script="demo.py")
    (tmp_path / "args.json").write_text(json.dumps({**asdict(Args()), "epochs": 3}))
    with pytest.raises(ValueError, match=r"fields \['epochs'\] that demo.py does not know"):
        load_args(tmp_path, Args, script="demo.py")


def test_resume_args_are_the_saved_ones_with_this_invocations_kept_fields(tmp_path):
    run_dir = new_run_dir(tmp_path, env_id="x", exp_name="demo", seed=3, config=asdict(Args(lr=0.5)))
    resumed = resume_args(Args(lr=0.1, seed=9, resume=str(run_dir)), script="demo.py", keep=("seed",))
    assert resumed == Args(lr=0.5, seed=9, resume=str(run_dir))


def test_hyperparameters_are_cleanrls_table():
    assert hyperparameters_text({"seed": 1, "lr": 0.001}) == "|param|value|\n|-|-|\n|seed|1|\n|lr|0.001|"


def test_seed_everything_repeats_python_numpy_and_torch():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    seed_everything(5)
    first = draw()
    seed_everything(5)
    assert draw() == first


def test_markdown_table_formats_and_aligns_as_asked():
    rows = [{"name": "a", "ret": 0.123456, "n": 50, "runs": "3 x 8"}, {"name": "b", "ret": 1.0, "n": 468, "runs": "1"}]
    table = markdown_table(rows, ["name", "ret", "n", "runs"], formats={"ret": ".4f", "n": "d"}, left=["name"])
    assert table.splitlines() == [
        "| name | ret | n | runs |",
        "|---|---:|---:|---:|",
        "| a | 0.1235 | 50 | 3 x 8 |",
        "| b | 1.0000 | 468 | 1 |",
    ]
    # By default text is left-aligned and every key has its own format (top-1 in percent).
    assert markdown_table([{"policy": "x", "top1": 0.5}], ["policy", "top1"]).splitlines()[1:] == [
        "|---|---:|",
        "| x | 50.00 |",
    ]


def test_a_run_saved_before_a_field_was_renamed_still_resumes(tmp_path):
    saved = {k: v for k, v in asdict(Args(lr=0.5)).items() if k != "lr"} | {"learning_rate": 0.5}
    (tmp_path / "args.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="learning_rate"):
        load_args(tmp_path, Args, script="demo.py")
    resumed = resume_args(Args(resume=str(tmp_path)), script="demo.py", renamed={"learning_rate": "lr"})
    assert resumed == Args(lr=0.5, resume=str(tmp_path))
