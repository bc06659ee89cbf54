"""train_backbone.py launched as a subprocess with tiny flags, as CleanRL tests its scripts."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import finish_two, load_script, run_train_agent, torchrun

from agents.io import load_policy
from apt_env.envs.env import APTPruneVectorEnv
from apt_env.models.checkpoint import load_backbone
from apt_env.train.distributed import state_digest
from apt_env.train.state import load_train_state

SCRIPT = Path(__file__).resolve().parents[1] / "train_backbone.py"
TINY_MODEL = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 16}
TINY = [
    "--dataset", "synthetic",
    "--model-kwargs", json.dumps(TINY_MODEL),
    "--batch-size", "16",
    "--steps-per-epoch", "3",
    "--eval-batch-size", "64",
]  # fmt: skip
APT = ["--method", "apt", "--num-envs", "8", "--agent-steps", "48", "--warmup-epochs", "1"]


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


@pytest.mark.slow
def test_end_to_end_writes_a_loadable_checkpoint_and_prints_the_table(tmp_path):
    run_dir, stdout = _run(tmp_path / "runs", "--method", "plain", "--epochs", "1")
    assert run_dir.name.startswith("synthetic__train_backbone__1__")
    assert "| plain ViT |" in stdout and "| 16 |" in stdout  # 16 patch tokens of 4x4 pixels in a 16x16 image

    pv = load_backbone(run_dir / "checkpoint", expect={"dataset": "synthetic", "num_classes": 10, "img_size": 16})
    assert pv.depth == 2 and pv.embed_dim == 32
    config = json.loads((run_dir / "checkpoint" / "config.json").read_text())
    assert config["epoch"] == 1 and 0 <= config["val_acc1"] <= 1
    assert config["split"] == "train" and "train_backbone.py" in config["command"]  # provenance
    assert config["weights_digest"] == state_digest(pv.model)
    state = load_train_state(run_dir / "train_state.pt")
    assert state["epoch"] == 1 and state["global_step"] == 3
    assert all(torch.equal(v, state["model"][k]) for k, v in pv.model.state_dict().items())
    assert list(run_dir.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_joint_training_prints_the_three_rows_and_writes_backbone_and_agent(tmp_path):
    run_dir, stdout = _run(tmp_path / "runs", *APT, "--epochs", "2")
    rows = {r["policy"]: r for r in json.loads((run_dir / "results.json").read_text())}
    at_counts = ("plain ViT, random at the agent's counts", "APT, random at the agent's counts")
    for row in ("plain ViT", "APT (pruning)", "APT (no pruning)", *at_counts):
        assert f"| {row} |" in stdout and rows[row]["top1_low"] <= rows[row]["top1"] <= rows[row]["top1_high"]
    for row in at_counts:  # as many tokens as the agent kept, image by image
        assert rows[row]["tokens_last"] == rows["APT (pruning)"]["tokens_last"]
    assert len(list(run_dir.glob("*__plain__*/checkpoint"))) == 1  # the plain baseline, same seed and schedule
    envs = APTPruneVectorEnv(2, model=str(run_dir / "checkpoint"), dataset="synthetic")
    load_policy(run_dir / "agent", observation_space=envs.single_observation_space)
    state = load_train_state(run_dir / "train_state.pt")
    assert state["ranks"][0]["agent"]["global_step"] >= 2 * 48


@pytest.mark.slow
def test_joint_training_with_budgets_trains_one_budget_agent_and_reports_it_at_a_budget(tmp_path):
    flags = ["--budget", "0.3", "0.9", "--reward", "vs_random", "--eval-budget", "0.5", "--no-compare-plain"]
    run_dir, stdout = _run(tmp_path / "runs", *APT, "--epochs", "2", *flags)
    policy = load_policy(run_dir / "agent")
    assert policy.use_budget and policy.sampling == "topk"
    rows = {r["policy"]: r for r in json.loads((run_dir / "results.json").read_text())}
    pruned = rows["APT (pruning)"]
    assert pruned["budget"] == 0.5 and pruned["tokens_last"] < 16
    assert rows["APT, random at the agent's counts"]["tokens_last"] == pruned["tokens_last"]
    bad = subprocess.run([sys.executable, str(SCRIPT), *APT, "--budget", "0.8", "0.2"], capture_output=True, text=True)
    assert bad.returncode != 0 and "needs low <= high" in bad.stderr


@pytest.mark.slow
def test_joint_training_with_a_mean_budget_trains_the_backbone_on_a_threshold_agent_calibrated_on_val(tmp_path):
    flags = ["--budget", "0.3", "0.9", "--budget-mean", "--eval-budget", "0.5", "--no-compare-plain"]
    run_dir, _ = _run(tmp_path / "runs", *APT, "--epochs", "2", *flags)
    policy = load_policy(run_dir / "agent")
    assert policy.sampling == "threshold" and policy.calibration["split"] == "val"
    assert policy.calibration["backbone"] == state_digest(load_backbone(run_dir / "checkpoint").model)
    pruned = {r["policy"]: r for r in json.loads((run_dir / "results.json").read_text())}["APT (pruning)"]
    assert pruned["budget"] == 0.5 and pruned["tokens_last"] < 16
    bad = subprocess.run([sys.executable, str(SCRIPT), "--method", "plain", "--budget-mean"], capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode != 0 and "--budget-mean makes the agent's budget hold on average" in bad.stderr
    # train_agent.py calibrates the same weights on the same images to the same thresholds: one calibration path.
    again = tmp_path / "again"
    run_train_agent("--model", str(run_dir / "checkpoint"), "--init-agent", str(run_dir / "agent"),
                    "--total-env-steps", "0", *flags[:4], out=again)  # fmt: skip
    recalibrated = load_policy(next(again.iterdir()) / "agent").calibration
    assert recalibrated["shifts"] == policy.calibration["shifts"]
    assert recalibrated["budgets"] == policy.calibration["budgets"]


@pytest.mark.slow
def test_the_random_mask_control_trains_on_each_budgets_count_without_an_agent(tmp_path):
    flags = ["--method", "random", "--budget", "0.3", "0.9", "--no-compare-plain"]
    run_dir, stdout = _run(tmp_path / "runs", *APT[2:], "--epochs", "2", *flags)
    rows = {r["policy"]: r for r in json.loads((run_dir / "results.json").read_text())}
    assert set(rows) == {"random-trained (pruning)", "random-trained (no pruning)"} and not (run_dir / "agent").exists()
    assert rows["random-trained (pruning)"]["budget"] == 0.5 and rows["random-trained (pruning)"]["tokens_last"] < 16
    bad = subprocess.run([sys.executable, str(SCRIPT), "--method", "random", "--budget", "None"], capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode != 0 and "pass --budget" in bad.stderr


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    run_a, _ = _run(tmp_path / "a", "--method", "plain", "--epochs", "2")
    run_b, stdout = _run(tmp_path / "b", "--method", "plain", "--epochs", "2", "--stop-epoch", "1")
    assert "| plain ViT |" not in stdout  # stopped before the test evaluation
    assert load_train_state(run_b / "train_state.pt")["epoch"] == 1
    _, stdout = _run(tmp_path / "b", "--resume", str(run_b))
    assert "| plain ViT |" in stdout

    a = load_backbone(run_a / "checkpoint").model.state_dict()
    b = load_backbone(run_b / "checkpoint").model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run_b / "checkpoint" / "config.json").read_text())["epoch"] == 2


@pytest.mark.slow
def test_init_checkpoint_fine_tunes_a_trained_backbone_in_both_modes(tmp_path):
    first, _ = _run(tmp_path / "first", "--method", "plain", "--epochs", "1")
    init = str(first / "checkpoint")
    plain, _ = _run(tmp_path / "plain", "--method", "plain", "--epochs", "1", "--init-checkpoint", init)
    joint, stdout = _run(tmp_path / "joint", *APT[:-2], "--epochs", "1", "--init-checkpoint", init,
                         "--init-agent", str(_agent(tmp_path, first)))  # fmt: skip
    assert "| APT (pruning) |" in stdout  # warm-up defaults to 0 from trained weights: it pruned at once
    start = load_backbone(first / "checkpoint").model.state_dict()
    for run in (plain, joint):
        tuned = load_backbone(run / "checkpoint").model.state_dict()
        assert not all(torch.equal(start[k], tuned[k]) for k in start)  # trained further ...
        assert load_backbone(run / "checkpoint").depth == 2  # ... the checkpoint's architecture
    small = tmp_path / "small"
    torch.manual_seed(0)
    from apt_env.models.backbone import PrunableViT
    from apt_env.models.checkpoint import save_backbone

    kwargs = {**TINY_MODEL, "patch_size": 4, "in_chans": 1, "num_classes": 5}
    pv = PrunableViT.from_timm("vit_tiny_patch16_224", **kwargs)
    save_backbone(small, pv, meta={"dataset": "synthetic"})
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--out-dir", str(tmp_path / "bad"), "--method", "plain", "--epochs", "1",
         "--init-checkpoint", str(small)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and "num_classes = 5, expected 10" in proc.stderr


def _agent(tmp_path, run_dir):
    from agents.io import save_policy
    from agents.policy import APTPolicy

    pv = load_backbone(run_dir / "checkpoint")
    agent = APTPolicy(pv.embed_dim, pv.num_patches, pv.num_stages, init_keep_prob=0.7, use_budget=True, sampling="topk")
    return save_policy(tmp_path / "agent0", agent)


def test_bad_arguments_are_refused_early():
    script = load_script("train_backbone")
    with pytest.raises(ValueError, match="--warmup-epochs"):
        script.check_args(script.Args(method="apt", epochs=2, warmup_epochs=2))
    with pytest.raises(ValueError, match="--model-kwargs must be a JSON object"):
        script.check_args(script.Args(model_kwargs="depth=2"))
    with pytest.raises(ValueError, match="--stop-epoch"):
        script.check_args(script.Args(epochs=2, stop_epoch=3))
    with pytest.raises(ValueError, match="--budget-groups 4 needs --budget"):
        script.check_args(script.Args(budget=None, budget_groups=4))
    with pytest.raises(ValueError, match="--budget-groups must be at least 1"):
        script.check_args(script.Args(budget=(0.25, 1.0), budget_groups=0))
    script.check_args(script.Args())  # the default: the shipped recipe, one budget per batch
    script.check_args(script.Args(budget=(0.25, 1.0), budget_groups=None))  # one per image


def test_the_run_kind_is_method_and_the_old_flag_still_reads():
    import tyro

    script = load_script("train_backbone")
    assert tyro.cli(script.Args, args=["--method", "random"]).method == "random"
    assert tyro.cli(script.Args, args=["--mode", "plain"]).method == "plain"  # commands recorded before the rename


def test_learning_rate_warms_up_then_decays_to_zero():
    factor = load_script("train_backbone").cosine_with_warmup(total_steps=100, warmup_steps=10)
    values = [factor(step) for step in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == 1.0
    assert all(a >= b for a, b in zip(values[9:], values[10:]))
    assert values[100] == pytest.approx(0.0)


@pytest.mark.slow
def test_sigkill_mid_joint_training_then_resume_ends_as_uninterrupted(tmp_path):
    flags = [*TINY, *APT, "--no-compare-plain", "--epochs", "3", "--steps-per-epoch", "12"]
    run_a, _ = _run(tmp_path / "a", *flags[len(TINY) :])
    out = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *flags, "--out-dir", str(out)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        states = list(out.glob("*/train_state.pt"))
        if states and load_train_state(states[0])["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (run_b,) = out.iterdir()
    assert load_train_state(run_b / "train_state.pt")["epoch"] < 3
    _run(out, "--resume", str(run_b))

    a, b = (load_backbone(r / "checkpoint").model.state_dict() for r in (run_a, run_b))
    assert all(torch.equal(a[k], b[k]) for k in a)
    pa, pb = (load_train_state(r / "train_state.pt")["ranks"][0]["agent"]["policy"] for r in (run_a, run_b))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def _torchrun(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_two_processes_agree_see_different_data_and_resume_exactly(tmp_path):
    flags = [*TINY, *APT, "--no-compare-plain", "--epochs", "2"]
    proc = _torchrun(tmp_path, *flags, "--out-dir", str(tmp_path / "a"))
    digests = dict(re.findall(r"rank (\d) weights sha256 (\w+)", proc.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    assert "| APT (pruning) |" in proc.stdout
    (run_a,) = (tmp_path / "a").iterdir()
    ranks = load_train_state(run_a / "train_state.pt")["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])

    _torchrun(tmp_path, *flags, "--out-dir", str(tmp_path / "b"), "--stop-epoch", "1")
    (run_b,) = (tmp_path / "b").iterdir()
    _torchrun(tmp_path, "--resume", str(run_b))
    a, b = (load_backbone(r / "checkpoint").model.state_dict() for r in (run_a, run_b))
    assert all(torch.equal(a[k], b[k]) for k in a)  # as if never stopped, on both ranks


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers in /proc")
def test_sigkill_two_process_joint_training_then_resume_on_two_ends_as_uninterrupted(tmp_path):
    """SIGKILL torchrun and both ranks of a joint run at a random moment after its first checkpoint (in an epoch's
    backbone or agent phase, or in a checkpoint's saves); resumed on 2 processes it ends with the uninterrupted
    run's backbone, agent and per-rank random states, having lost at most one epoch, with no killed save's files
    left over."""
    epochs = 4  # the kill lands in epoch 2 or 3 or their checkpoints: epoch 4 is the margin before the run ends
    flags = [*TINY, *APT, "--no-compare-plain", "--epochs", str(epochs)]
    finish_two([*flags, "--out-dir", str(tmp_path / "whole")], SCRIPT, "weights")
    (whole,) = (tmp_path / "whole").iterdir()

    log, killed = tmp_path / "killed.log", tmp_path / "killed"
    with log.open("w") as stderr, torchrun([*flags, "--out-dir", str(killed)], stderr, SCRIPT) as proc:
        deadline, started = time.monotonic() + 240, None
        while not list(killed.glob("*/train_state.pt")):  # the first checkpoint
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint came"
            if started is None and "run folder" in log.read_text():  # logged just before the first epoch
                started = time.monotonic()
            time.sleep(0.01)
        assert started is not None, "the run did not log its run folder before its first checkpoint"
        epoch_s = time.monotonic() - started  # the first epoch and its checkpoint: about as long as the next ones
        delay = random.uniform(0.0, epoch_s)
        time.sleep(delay)
    when = f"killed {delay:.2f} s after the first checkpoint (epoch 1 took {epoch_s:.2f} s)"
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {when}"
    reached = max(int(e) for e in re.findall(r"epoch (\d+): val top-1", log.read_text()))  # rank 0, before saving

    (run_dir,) = killed.iterdir()
    state = load_train_state(run_dir / "train_state.pt")  # whole: a torn file would not load
    saved = state["epoch"]
    assert 1 <= saved < epochs, f"{when}: checkpoint of epoch {saved}, nothing left to resume"
    assert reached - saved <= 1, f"{when}: epoch {reached} was done, the checkpoint holds epoch {saved}"
    ranks = state["ranks"]  # each rank draws its own stages, augmentations, masks and images
    assert len(ranks) == 2 and not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"]), when
    assert not torch.equal(ranks[0]["agent"]["generator"], ranks[1]["agent"]["generator"]), when

    resumed = finish_two(["--resume", str(run_dir)], SCRIPT, "weights")
    assert re.findall(r"resuming \S+ after epoch (\d+)", resumed) == [str(saved)] * 2, when  # both ranks
    assert (run_dir / "results.json").exists(), when  # and the run went on to its final table
    leftovers = [p.relative_to(run_dir) for p in run_dir.rglob("*") if ".tmp-" in p.name or p.name.endswith(".old")]
    assert not leftovers, f"{when}: a killed save's files survived the resumed run: {leftovers}"

    a, b = (load_backbone(r / "checkpoint").model.state_dict() for r in (whole, run_dir))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == [], when
    configs = [json.loads((r / "checkpoint" / "config.json").read_text()) for r in (whole, run_dir)]
    assert configs[0]["weights_digest"] == configs[1]["weights_digest"] and configs[1]["epoch"] == epochs, when
    a, b = (load_policy(r / "agent").state_dict() for r in (whole, run_dir))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == [], when
    want, have = (load_train_state(r / "train_state.pt")["ranks"] for r in (whole, run_dir))
    for rank, (w, h) in enumerate(zip(want, have, strict=True)):  # each rank went on as its own
        assert h["agent"]["global_step"] == w["agent"]["global_step"], (when, rank)
        assert torch.equal(h["agent"]["generator"], w["agent"]["generator"]), (when, rank)
        assert h["agent"]["env_rng"] == w["agent"]["env_rng"], (when, rank)
        w, h = w["rng"], h["rng"]
        assert torch.equal(h["torch"], w["torch"]) and h["python"] == w["python"], (when, rank)
        assert torch.equal(h["numpy"][1], w["numpy"][1]) and h["numpy"][2:] == w["numpy"][2:], (when, rank)
