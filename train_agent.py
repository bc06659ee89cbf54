"""Train a token-pruning agent against a frozen backbone on APTPrune-v0, with a choice of RL algorithm.

    python train_agent.py                                   # native batched PPO on the default backbone
    python train_agent.py --algo ppo                        # stable-baselines3 PPO (or a2c)
    python train_agent.py --algo distill --teacher RUN/agent --hidden 32 --qk-dim 32   # a smaller agent, distilled
    python train_agent.py --model runs/RUN/checkpoint       # a backbone written by train_backbone.py
    python train_agent.py --resume runs/APTPrune-v0__train_agent__1__TIME
    tensorboard --logdir runs

The run folder holds the agent (``agent/``, loadable with ``agents.io.load_policy``), the trainer's state for
``--resume``, TensorBoard logs, and ends with a table on the held-out val split: the agent next to keep-all, random
and class-attention top-k at the agent's own keep ratio per stage.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import tyro
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.vec_env import VecMonitor
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from agents.build import AgentArgs, build_policy, load_agent_for, sampling_for
from agents.calibrate import calibrate_on_val
from agents.compare import compare_policies, format_comparison
from agents.distill import Distiller
from agents.io import save_policy
from agents.policy import APTPolicy
from agents.ppo import NativePPO
from agents.sb3_policy import APTActorCriticPolicy
from apt_env.envs.env import APTPruneVectorEnv
from apt_env.envs.sb3_vec_env import SB3VecEnv
from apt_env.eval.report import agent_masks_figure
from apt_env.train.distributed import gather_objects, init_distributed, is_distributed, state_digest
from apt_env.train.runs import hyperparameters_text, new_run_dir, resume_args, seed_everything
from apt_env.train.state import TRAIN_STATE_FILE, get_rng_state, resume_state, save_train_state

logger = logging.getLogger("train_agent")


@dataclass
class Args(AgentArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of the experiment: policy initialization, sampling and the images drawn"""
    algo: Literal["native", "ppo", "a2c", "distill"] = "native"
    """`native` (batched PPO on the env's tensors), a stable-baselines3 on-policy algorithm (`ppo`, `a2c`), or
    `distill`: a new agent learns the decisions of `--teacher` (policy distillation, no reward)"""
    teacher: str | None = None
    """with `--algo distill`: the trained agent to distil (an agent folder); the student reads, samples and keeps
    budgets as it does (`--sampling` is not used) at its own `--hidden`, `--qk-dim` and `--mixer`"""
    model: str | None = None
    """the frozen backbone: a checkpoint folder from train_backbone.py or a timm name; default: the one that
    ships with the package"""
    dataset: str = "fashion-mnist"
    """dataset the episodes draw images from (train split); the table uses its val split"""
    data_root: str = "data"
    """folder of downloaded datasets"""
    num_envs: int = 64
    """sub-environments: images per batch"""
    total_env_steps: int = 60_000
    """env transitions to train for (num_envs per step); 0 with --init-agent and --budget-mean: only calibrate that
    agent's thresholds"""
    reward: Literal["loss_delta", "prob_delta", "vs_random"] = "loss_delta"
    """reward: loss_delta, prob_delta or vs_random (the loss under a random mask of the same per-image count
    minus the loss under the agent's)"""
    budget: tuple[float, float] | None = None
    """a budget range (fractions of the dense GFLOPs), one drawn per episode and observed, e.g. `0.25 1.0`;
    none: no budget"""
    budget_weight: float = 2.0
    """weight of the penalty on GFLOPs above the budget at an episode's end"""
    budget_mean: bool = False
    """the budget holds on average over images, not in each: a price of compute learned by dual ascent (needs
    --budget; the agent samples by threshold)"""
    price_lr: float = 1.0
    """the step size of the mean budget's price"""
    calibration_images: int = 1000
    """val images the thresholds of a --budget-mean agent are calibrated on"""
    flops_weight: float = 0.5
    """weight of the compute term of the reward (fraction of FLOPs saved)"""
    min_keep: int = 1
    """the least number of patch tokens kept"""
    episodes_per_rollout: int = 4
    """episodes of the whole batch per rollout (PPO: n_steps = this x stages)"""
    update_epochs: int = 4
    """PPO passes over each rollout"""
    num_minibatches: int = 4
    """PPO minibatches per pass"""
    ent_coef: float = 0.0
    """entropy bonus"""
    checkpoint_every: int = 5
    """rollouts between checkpoints"""
    val_episodes: int = 8
    """val-split batches of num_envs images for the episode-return comparison"""
    val_images: int = 2000
    """val images for the accuracy table (0: all)"""
    device: str | None = None
    """torch device; default cuda when available, else cpu"""
    out_dir: str = "runs"
    """parent folder of the run folders"""
    resume: str | None = None
    """a run folder to continue from its last checkpoint, with the arguments saved in it"""


SB3_ALGORITHMS: dict[str, type[OnPolicyAlgorithm]] = {"ppo": PPO, "a2c": A2C}
"""The stable-baselines3 algorithms of ``--algo``: on-policy, so they handle MultiBinary actions."""


def check_args(args: Args) -> None:
    if args.total_env_steps < 0 or args.num_envs < 1:
        raise ValueError("--total-env-steps must be >= 0 and --num-envs positive")
    if args.total_env_steps == 0 and (args.init_agent is None or not args.budget_mean):
        raise ValueError(
            "--total-env-steps 0 calibrates --init-agent's thresholds without training (with --budget-mean); "
            f"got --init-agent {args.init_agent}, --budget-mean {args.budget_mean}"
        )
    if args.algo != "distill":  # a student samples as its teacher does
        sampling_for(args, budget=args.budget, budget_mean=args.budget_mean)
    if args.init_agent is not None and args.algo != "native":
        raise ValueError(f"--init-agent starts native PPO from an agent's weights; --algo {args.algo} builds its own")
    if (args.algo == "distill") != (args.teacher is not None):
        raise ValueError("--algo distill needs --teacher (an agent folder), and --teacher is for --algo distill only")


def learning_rate(args: Args) -> float:
    if args.agent_lr is not None:
        return args.agent_lr
    return 2e-3 if args.algo == "distill" else 3e-4


def load_teacher(args: Args, envs: APTPruneVectorEnv) -> APTPolicy:
    """The agent to distil, checked against the env and the run's kind of budget."""
    assert args.teacher is not None
    teacher = load_agent_for(args.teacher, envs, "the teacher")
    if (teacher.sampling == "threshold") != args.budget_mean:
        raise ValueError(
            f"the teacher {args.teacher} has sampling {teacher.sampling!r}, for "
            f"{'a mean' if teacher.sampling == 'threshold' else 'a per-image'} budget; this run has "
            f"--budget-mean {args.budget_mean}"
        )
    return teacher


def run_folder(args: Args, main_rank: bool) -> tuple[Path, Args]:
    """A new run folder (CleanRL's naming; made by rank 0), or the one to resume with its saved arguments."""
    if args.resume:
        args = resume_args(args, script="train_agent.py")
        return Path(args.resume), args
    run_dir = new_run_dir(
        args.out_dir, env_id="APTPrune-v0", exp_name=args.exp_name, seed=args.seed, config=asdict(args),
        main_rank=main_rank,
    )  # fmt: skip
    return run_dir, args


def log_rollout(writer: SummaryWriter | None, stats: dict, step: int) -> None:
    if writer is None:  # not the main process
        return
    for key in ("episode_return", "loss_delta", "keep_ratio", "gflops"):
        writer.add_scalar(f"charts/{key}", stats[key], step)
    writer.add_scalar("charts/SPS", stats["sps"], step)
    for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "explained_variance"):
        if key in stats:
            writer.add_scalar(f"losses/{key}", stats[key], step)


def policy_kwargs(args: Args) -> dict[str, Any]:
    """The APT policy's constructor arguments from the flags, for SB3's policy and the distilled student."""
    return dict(
        hidden=args.hidden,
        qk_dim=args.qk_dim,
        init_keep_prob=args.init_keep_prob,
        sampling=sampling_for(args, budget=args.budget, budget_mean=args.budget_mean),
        mixer=args.mixer,
        position_prior=args.position_prior or 0.0,
    )


def train_native(args: Args, envs: APTPruneVectorEnv, run_dir: Path, writer: SummaryWriter | None) -> APTPolicy:
    rank = torch.distributed.get_rank() if is_distributed() else 0
    with torch.random.fork_rng(devices=[]):  # every rank starts from the same agent
        torch.manual_seed(args.seed)
        sampling = sampling_for(args, budget=args.budget, budget_mean=args.budget_mean)
        policy = build_policy(args, envs, sampling=sampling)
    trainer = NativePPO(
        envs,
        policy,
        lr=learning_rate(args),
        episodes_per_rollout=args.episodes_per_rollout,
        update_epochs=args.update_epochs,
        num_minibatches=args.num_minibatches,
        ent_coef=args.ent_coef,
        seed=args.seed + rank,  # each rank its own images and samples
    )
    world_size = torch.distributed.get_world_size() if is_distributed() else 1
    resumed = resume_state(args.resume, rank=rank, world_size=world_size)
    if resumed is not None:
        trainer.load_state_dict(resumed.own["trainer"])
        resumed.restore_rng()
        logger.info("resuming %s at step %d", run_dir, trainer.global_step)
    bar = tqdm(
        total=args.total_env_steps, initial=trainer.global_step, desc="env steps", unit="step", disable=writer is None
    )
    while trainer.global_step < args.total_env_steps:
        chunk = min(args.checkpoint_every * trainer.steps_per_rollout, args.total_env_steps - trainer.global_step)
        for stats in trainer.learn(chunk):
            log_rollout(writer, stats, stats["global_step"])
            bar.update(trainer.steps_per_rollout)
            bar.set_postfix(ret=f"{stats['episode_return']:.3f}", keep=f"{stats['keep_ratio']:.2f}")
        if writer is not None:
            writer.add_figure("masks", agent_masks_figure(envs.pv, trainer.policy, envs.data), trainer.global_step)
        ranks = gather_objects({"trainer": trainer.state_dict(), "rng": get_rng_state()})  # every rank its own
        if writer is not None:
            save_policy(run_dir / "agent", trainer.policy, meta={"algo": "native", "global_step": trainer.global_step})
            save_train_state(run_dir / TRAIN_STATE_FILE, {"ranks": ranks})
        # A resumed run starts fresh episodes from the saved env RNG (the env's episodes in flight are not saved);
        # this run does the same, so that both go on alike.
        trainer.restart_episodes()
    bar.close()
    return trainer.policy


def train_distill(args: Args, envs: APTPruneVectorEnv, run_dir: Path, writer: SummaryWriter) -> APTPolicy:
    teacher = load_teacher(args, envs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        student = APTPolicy.for_env(
            envs, **{**policy_kwargs(args), "sampling": teacher.sampling, "use_cls_attn": teacher.use_cls_attn}
        )
    trainer = Distiller(envs, teacher, student, lr=learning_rate(args), seed=args.seed)
    resumed = resume_state(args.resume)
    if resumed is not None:
        trainer.load_state_dict(resumed.own["trainer"])
        resumed.restore_rng()
        logger.info("resuming %s at step %d", run_dir, trainer.global_step)
    bar = tqdm(total=args.total_env_steps, initial=trainer.global_step, desc="env steps", unit="step")
    while trainer.global_step < args.total_env_steps:
        chunk = min(args.checkpoint_every * trainer.steps_per_update, args.total_env_steps - trainer.global_step)
        for stats in trainer.learn(chunk, anneal=args.total_env_steps):
            for key in ("kl", "agreement", "lr", "sps"):
                writer.add_scalar(f"distill/{key}", stats[key], stats["global_step"])
            bar.update(trainer.steps_per_update)
            bar.set_postfix(kl=f"{stats['kl']:.4f}", agree=f"{stats['agreement']:.3f}")
        meta = {"algo": "distill", "teacher": args.teacher, "global_step": trainer.global_step}
        save_policy(run_dir / "agent", trainer.student, meta=meta)
        save_train_state(run_dir / TRAIN_STATE_FILE, {"trainer": trainer.state_dict(), "rng": get_rng_state()})
        trainer.restart_episodes()  # as a run resumed from this checkpoint does
    bar.close()
    return trainer.student


class SB3Progress(BaseCallback):
    """Episode statistics to the log and TensorBoard, and a progress bar, across the ``learn`` calls of a run."""

    def __init__(self, writer: SummaryWriter, bar: tqdm) -> None:
        super().__init__()
        self.writer, self.bar = writer, bar
        self.returns: np.ndarray | None = None
        self.stats: dict[str, float] = {}
        self.start, self.start_step = time.time(), bar.n

    def _on_step(self) -> bool:
        rewards, dones, infos = self.locals["rewards"], self.locals["dones"], self.locals["infos"]
        self.returns = rewards.astype(np.float64) if self.returns is None else self.returns + rewards
        self.bar.update(len(rewards))
        if dones.all():
            self.stats = {
                "episode_return": float(self.returns.mean()),
                "loss_delta": float(np.mean([i["loss_plain"] - i["loss_multi"] for i in infos])),
                "keep_ratio": float(np.mean([i["keep_ratio"] for i in infos])),
                "gflops": float(np.mean([i["gflops"] for i in infos])),
                "sps": (self.num_timesteps - self.start_step) / (time.time() - self.start),
            }
            log_rollout(self.writer, self.stats, self.num_timesteps)
            self.bar.set_postfix(ret=f"{self.stats['episode_return']:.3f}", keep=f"{self.stats['keep_ratio']:.2f}")
            self.returns = None
        return True

    def _on_rollout_end(self) -> None:
        logger.info(
            "rollout %d step %d: return %.4f keep %.3f loss_delta %.4f sps %.0f",
            self.num_timesteps // (self.model.n_steps * self.model.n_envs), self.num_timesteps,
            self.stats["episode_return"], self.stats["keep_ratio"], self.stats["loss_delta"], self.stats["sps"],
        )  # fmt: skip


def save_sb3(run_dir: Path, model: OnPolicyAlgorithm, envs: APTPruneVectorEnv, args: Args) -> None:
    """The agent alone, and in one atomically replaced ``train_state.pt`` the SB3 model (weights, optimizer,
    counters) with the random states its training draws from: SB3's (Python, NumPy and torch) and the env's."""
    save_policy(run_dir / "agent", model.policy.net, meta={"algo": args.algo, "global_step": model.num_timesteps})
    zipped = io.BytesIO()
    model.save(zipped)
    state = {"sb3_model": zipped.getvalue(), "rng": get_rng_state(), "env_rng": envs.np_random.bit_generator.state}
    save_train_state(run_dir / TRAIN_STATE_FILE, state)


def train_sb3(args: Args, envs: APTPruneVectorEnv, run_dir: Path, writer: SummaryWriter) -> APTPolicy:
    algo = SB3_ALGORITHMS[args.algo]
    venv = VecMonitor(SB3VecEnv(envs))  # episode returns and lengths in SB3's own logs (`rollout/ep_rew_mean`)
    resumed = resume_state(args.resume)
    if resumed is not None:
        # Loading seeds the global RNGs and, given an env, its next reset with the run's seed: so the env is set
        # after, and the saved random states are restored last.
        model = algo.load(io.BytesIO(resumed.state["sb3_model"]), device=envs.device)
        model.set_env(venv)  # the first rollout starts fresh episodes, as the run did after this checkpoint
        resumed.restore_rng()
        envs.np_random.bit_generator.state = resumed.state["env_rng"]
        logger.info("resuming %s at step %d", run_dir, model.num_timesteps)
    else:
        k = envs.pv.num_stages
        hyper = dict(
            learning_rate=learning_rate(args), n_steps=args.episodes_per_rollout * k, gamma=1.0, ent_coef=args.ent_coef
        )
        if args.algo == "ppo":
            rollout = args.episodes_per_rollout * k * args.num_envs
            hyper.update(batch_size=rollout // args.num_minibatches, n_epochs=args.update_epochs)
        model = algo(
            APTActorCriticPolicy,
            venv,
            policy_kwargs=policy_kwargs(args),
            seed=args.seed,  # SB3's global RNGs and the env's first reset
            device=envs.device,
            **hyper,
        )
    model.set_logger(configure(str(run_dir / "sb3"), ["tensorboard"]))
    bar = tqdm(total=args.total_env_steps, initial=model.num_timesteps, desc="env steps", unit="step")
    progress = SB3Progress(writer, bar)
    # In chunks of whole rollouts, as train_native: SB3's callbacks run before the update of their rollout, so a
    # checkpoint taken in one would lose that update.
    while model.num_timesteps < args.total_env_steps:
        rollout_steps = model.n_steps * model.n_envs
        chunk = min(args.checkpoint_every * rollout_steps, args.total_env_steps - model.num_timesteps)
        model.learn(chunk, callback=progress, reset_num_timesteps=False)
        writer.add_figure("masks", agent_masks_figure(envs.pv, model.policy.net, envs.data), model.num_timesteps)
        save_sb3(run_dir, model, envs, args)
        model.set_env(venv)  # fresh episodes from the saved env RNG, as a run resumed from here starts
    bar.close()
    return model.policy.net


def calibrate(args: Args, envs: APTPruneVectorEnv, policy: APTPolicy, run_dir: Path) -> None:
    """A threshold agent's thresholds for the budget range, on the first val images, saved with the agent."""
    policy.calibration = calibrate_on_val(
        policy, envs.pv, dataset=args.dataset, budget_range=args.budget, root=args.data_root,
        images=args.calibration_images,
    )  # fmt: skip
    save_policy(run_dir / "agent", policy, meta={"algo": args.algo, "calibrated": True})
    logger.info(
        "thresholds calibrated on %d val images: %s", policy.calibration["images"], policy.calibration["shifts"]
    )


def report(args: Args, envs: APTPruneVectorEnv, policy: APTPolicy, writer: SummaryWriter) -> None:
    """Episode returns and accuracy on the held-out val split of the agent and the baselines at the agent's
    keep ratios (the test split is for ``evaluate.py``'s report, not for choices made here)."""
    if args.budget is not None:
        print("\na budget agent: compare it at matched budgets with `python evaluate.py --split val --agent RUN/agent`")
        return
    val_envs = APTPruneVectorEnv(
        args.num_envs,
        model=envs.pv,
        dataset=args.dataset,
        split="val",
        data_root=args.data_root,
        reward=args.reward,
        flops_weight=args.flops_weight,
        min_keep=args.min_keep,
        device=envs.device,
    )
    ratios, rows = compare_policies(
        val_envs, policy, dataset=args.dataset, data_root=args.data_root, episodes=args.val_episodes,
        images=args.val_images, seed=args.seed,
    )  # fmt: skip
    print(f"\n{args.dataset} val split")
    print(format_comparison(ratios, rows, envs.pv.num_patches))
    for name, results in rows:
        writer.add_text(f"eval/{name}", json.dumps(results))


def main() -> None:
    args = tyro.cli(Args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.resume:
        check_args(args)  # before a run folder is made
    rank, world_size, device = init_distributed(args.device)
    run_dir, args = run_folder(args, main_rank=rank == 0)
    check_args(args)
    if world_size > 1 and args.algo != "native":
        raise ValueError(f"--algo {args.algo} runs in one process; use --algo native with torchrun")
    seed_everything(args.seed)
    envs = APTPruneVectorEnv(
        args.num_envs,
        model=args.model,
        dataset=args.dataset,
        data_root=args.data_root,
        reward=args.reward,
        flops_weight=args.flops_weight,
        min_keep=args.min_keep,
        device=device,
        budget=args.budget,
        budget_weight=args.budget_weight,
        budget_mean=args.budget_mean,
        price_lr=args.price_lr,
    )
    writer = SummaryWriter(str(run_dir)) if rank == 0 else None
    if writer is not None:
        writer.add_text("hyperparameters", hyperparameters_text(vars(args)))
    logger.info("run folder %s: %s on %s x %d for %d env steps", run_dir, args.algo, device, world_size,
                args.total_env_steps)  # fmt: skip
    train = {"native": train_native, "distill": train_distill}.get(args.algo, train_sb3)
    policy = train(args, envs, run_dir, writer)
    if world_size > 1:  # every rank reports its agent, so a test can check that they agree
        logger.info("rank %d agent sha256 %s", rank, state_digest(policy))
    if writer is not None and policy.sampling == "threshold":
        calibrate(args, envs, policy, run_dir)
    if writer is not None:
        report(args, envs, policy, writer)
        writer.close()
        print(f"agent: {run_dir / 'agent'}")


if __name__ == "__main__":
    main()
