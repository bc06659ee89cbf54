"""Does RL learn to prune, and on which reward fastest? Learning curves of native PPO, SB3 PPO and SB3 A2C.

Every learner trains the same budget-conditioned APT policy (Gumbel top-k, one budget per episode from
``--budget``) on the default backbone, once per reward in ``--rewards``, and is evaluated every ``--eval-every``
transitions on one fixed evaluation set: the same ``--val-episodes`` batches of held-out ``val`` images with
the same budgets, the policy deterministic (its mode), scored by the ``vs_random`` return, the loss under random
masks of the same per-image counts minus the loss under the agent's (common random numbers): how much better
than chance its choice of tokens is, whatever reward it was trained on. An untrained policy scores below 0:
the mode of near-equal logits is a fixed, mostly positional set of tokens, worse than random ones.

Writes TensorBoard logs (``--out``/ALGO_REWARD) and ``--png`` (the curves); prints each curve's start, end and
best, and the reward on which the learners improve fastest (the mean over learners of the end minus the start).

Run: ``python experiments/rl_algorithms/agent_evidence.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tyro  # noqa: E402
from stable_baselines3 import A2C, PPO  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from agents.policy import APTPolicy  # noqa: E402
from agents.ppo import NativePPO  # noqa: E402
from agents.rollout import evaluate_returns  # noqa: E402
from agents.sb3_policy import APTActorCriticPolicy  # noqa: E402
from apt_env.envs.env import APTPruneVectorEnv  # noqa: E402
from apt_env.envs.sb3_vec_env import SB3VecEnv  # noqa: E402
from apt_env.eval.report import markdown_table  # noqa: E402
from apt_env.train.runs import seed_everything  # noqa: E402

ALGOS = ("native", "ppo", "a2c")


@dataclass
class Args:
    steps: int = 24_576
    """transitions per learner and reward"""
    eval_every: int = 3_072
    """transitions between evaluations"""
    rewards: tuple[str, ...] = ("loss_delta", "vs_random")
    """the training rewards compared"""
    algos: tuple[str, ...] = ALGOS
    """native (PPO on the env's tensors), ppo, a2c (stable-baselines3)"""
    budget: tuple[float, float] = (0.25, 1.0)
    """the budget range, one budget drawn per episode"""
    num_envs: int = 64
    """sub-environments"""
    val_episodes: int = 4
    """batches of num_envs val images in the fixed evaluation set"""
    out: str = "runs/agent_evidence"
    """TensorBoard logs"""
    png: str = "experiments/rl_algorithms/learning_curves.png"
    """the learning curves"""
    seed: int = 1
    """seed"""


def train_env(args: Args, reward: str) -> APTPruneVectorEnv:
    return APTPruneVectorEnv(args.num_envs, budget=args.budget, reward=reward)


def make_evaluator(args: Args) -> Callable[[APTPolicy], float]:
    """The fixed evaluation: the policy's mode on the same val images and budgets, scored by the vs_random return."""
    envs = APTPruneVectorEnv(args.num_envs, split="val", budget=args.budget, reward="vs_random")

    def score(policy: APTPolicy) -> float:
        was_training = policy.training
        policy.eval()
        act = lambda obs: policy.act(obs, deterministic=True)  # noqa: E731
        result = evaluate_returns(envs, act, episodes=args.val_episodes, seed=args.seed)["episode_return"]
        policy.train(was_training)
        return float(result)

    return score


class EvalEvery(BaseCallback):
    """Evaluate an SB3 model's APT policy every ``every`` transitions."""

    def __init__(self, every: int, record: Callable[[int], None]) -> None:
        super().__init__()
        self.every, self.record, self.next = every, record, every

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.next:
            self.record(self.num_timesteps)
            self.next += self.every
        return True


def learn(algo: str, reward: str, args: Args, score: Callable[[APTPolicy], float]) -> list[tuple[int, float]]:
    """Train one learner on one reward; its evaluation curve ``[(transitions, score), ...]`` from 0."""
    seed_everything(args.seed)
    envs = train_env(args, reward)
    writer = SummaryWriter(str(Path(args.out) / f"{algo}_{reward}"))
    curve: list[tuple[int, float]] = []

    def record(step: int, policy: APTPolicy) -> None:
        curve.append((step, score(policy)))
        writer.add_scalar("eval/gain_over_random", curve[-1][1], step)

    k = envs.pv.num_stages
    if algo == "native":
        trainer = NativePPO(envs, policy_kwargs=dict(sampling="topk"), episodes_per_rollout=4, seed=args.seed)
        record(0, trainer.policy)
        while trainer.global_step < args.steps:
            for stats in trainer.learn(args.eval_every):
                writer.add_scalar("train/episode_return", stats["episode_return"], stats["global_step"])
            record(trainer.global_step, trainer.policy)
    else:
        extra = dict(n_steps=4 * k, batch_size=4 * k * args.num_envs // 4) if algo == "ppo" else dict(n_steps=k)
        model = (PPO if algo == "ppo" else A2C)(
            APTActorCriticPolicy, SB3VecEnv(envs), gamma=1.0, seed=args.seed, policy_kwargs=dict(sampling="topk"),
            **extra,
        )  # fmt: skip
        record(0, model.policy.net)
        model.learn(args.steps, callback=EvalEvery(args.eval_every, lambda step: record(step, model.policy.net)))
    writer.close()
    return curve


def main(args: Args) -> None:
    unknown = set(args.algos) - set(ALGOS)
    if unknown:
        raise ValueError(f"unknown algos {sorted(unknown)}; valid: {', '.join(ALGOS)}")
    score = make_evaluator(args)
    curves: dict[tuple[str, str], list[tuple[int, float]]] = {}
    rows = []
    for reward in args.rewards:
        for algo in args.algos:
            start = time.perf_counter()
            curve = curves[algo, reward] = learn(algo, reward, args, score)
            rows.append({
                "learner": algo, "reward": reward, "start": curve[0][1],
                "end": statistics.mean(s for _, s in curve[-2:]), "best": max(s for _, s in curve),
                "transitions": curve[-1][0], "seconds": time.perf_counter() - start,
            })  # fmt: skip
            print(f"{algo} on {reward}: " + ", ".join(f"{step}: {s:.4f}" for step, s in curve), flush=True)

    print(f"\nbudget {args.budget}, fixed evaluation: {args.val_episodes} x {args.num_envs} val episodes, the mode's")
    print("vs_random return (loss under random masks of the same counts minus the agent's; end: mean of the last two)")
    formats = {"start": ".4f", "end": ".4f", "best": ".4f", "transitions": "d", "seconds": ".0f"}
    print(markdown_table(rows, list(rows[0]), formats=formats, left=["learner", "reward"]))
    gains = {r: statistics.mean(row["end"] - row["start"] for row in rows if row["reward"] == r) for r in args.rewards}
    best = max(gains, key=gains.get)
    print("mean improvement over learners: " + ", ".join(f"{r} {g:+.4f}" for r, g in gains.items()))
    print(f"fastest: {best}")

    fig, axes = plt.subplots(1, len(args.rewards), figsize=(5 * len(args.rewards), 3.6), sharey=True, squeeze=False)
    for ax, reward in zip(axes[0], args.rewards):
        for algo in args.algos:
            steps, scores = zip(*curves[algo, reward])
            ax.plot(steps, scores, marker="o", ms=3, label=algo)
        ax.axhline(0.0, color="gray", lw=0.8, ls="--")
        ax.set(title=f"trained on {reward}", xlabel="transitions")
        ax.legend()
    axes[0][0].set_ylabel("gain over random (val, mode)")
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png} and TensorBoard logs in {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
