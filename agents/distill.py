"""Policy distillation on ``APTPruneVectorEnv``'s tensor API: a student agent learns a trained agent's decisions.

A smaller agent decides for less: its network runs on every live token at every stage, so its width is most of the
decision's cost. The teacher acts by its mode, so the student learns on the states it meets at test time (the teacher's
masks, which a jointly trained backbone was fitted to), and at every step the student's keep logits are pulled to the
teacher's by the KL divergence of their keep distributions over the live tokens: the softmax of the logits, the first
pick of Gumbel top-k (Plackett-Luce), whose ranking the mode keeps. One Adam step per episode of the whole batch,
its K stages together.

References:
    Policy distillation: Rusu et al., "Policy Distillation", 2016, arXiv:1511.06295.
    Knowledge distillation: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015, arXiv:1503.02531.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from agents.observation import live_mask
from agents.policy import APTPolicy

_logger = logging.getLogger(__name__)


def live_kl(teacher_logits: Tensor, student_logits: Tensor, live: Tensor) -> Tensor:
    """KL(teacher || student) of the softmax over each row's live tokens, (B,); rows with no live token give 0.

    Args:
        teacher_logits, student_logits: keep logits (B, N).
        live: (B, N) bool, the tokens that can be kept.
    """
    t = teacher_logits.float().masked_fill(~live, -math.inf).log_softmax(1)
    s = student_logits.float().masked_fill(~live, -math.inf).log_softmax(1)
    return (t.exp() * (t - s)).masked_fill(~live, 0.0).sum(1)


def decision_agreement(teacher_keep: Tensor, student_keep: Tensor) -> float:
    """The fraction of the tokens the teacher keeps that the student keeps too."""
    return float((teacher_keep & student_keep).sum() / teacher_keep.sum().clamp(min=1))


class Distiller:
    """Distil ``teacher`` into ``student`` on an ``APTPruneVectorEnv``.

    Args:
        envs: the vector env (its ``reset_tensors``/``step_tensors`` are used); it must observe what both agents read.
        teacher: the trained agent; frozen here.
        student: the agent to train, with the teacher's inputs (budget, class attention) and sampling.
        lr: Adam's learning rate, annealed linearly to 0 over the ``learn`` call's steps (as CleanRL's ``anneal_lr``)
            when ``anneal`` is given.
        seed: seeds the env's first reset.
    """

    def __init__(
        self, envs: Any, teacher: APTPolicy, student: APTPolicy, *, lr: float = 2e-3, seed: int | None = None
    ) -> None:
        for key in ("use_budget", "use_cls_attn", "sampling", "num_patches", "embed_dim", "num_stages"):
            if getattr(teacher, key) != getattr(student, key):
                raise ValueError(
                    f"the student must read and sample as the teacher does: {key} is {getattr(student, key)!r} for "
                    f"the student, {getattr(teacher, key)!r} for the teacher"
                )
        self.envs = envs
        self.device = torch.device(envs.device)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.student = student.to(self.device)
        self.lr = lr
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=lr)
        self.seed = seed
        self.num_stages = envs.pv.num_stages
        self.global_step = 0  # env transitions, num_envs per step (as NativePPO)
        self.num_updates = 0
        self._next_obs: dict[str, Tensor] | None = None

    @property
    def steps_per_update(self) -> int:
        """Env transitions per update: one episode of every sub-environment."""
        return self.num_stages * self.envs.num_envs

    def restart_episodes(self) -> None:
        """Start fresh episodes at the next update (after a checkpoint: a resumed run does the same)."""
        self._next_obs = None

    def learn(
        self, total_env_steps: int, callback: Callable[[dict], None] | None = None, *, anneal: int | None = None
    ) -> list[dict]:
        """Train for at least ``total_env_steps`` more transitions, in whole episodes.

        Args:
            total_env_steps: transitions to collect in this call.
            callback: called with each update's stats (for logging).
            anneal: the run's last ``global_step``: the learning rate falls linearly to 0 there.

        Returns:
            One dict per update: ``global_step``, ``kl`` (mean over rows and stages), ``agreement`` (of the
            student's mode with the teacher's), ``lr`` and ``sps`` (transitions per second).
        """
        history = []
        for _ in range(max(1, math.ceil(total_env_steps / self.steps_per_update))):
            start = time.perf_counter()
            lr = self.lr if anneal is None else self.lr * max(0.0, 1.0 - self.global_step / anneal)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            stats = self._update()
            self.num_updates += 1
            stats.update(global_step=self.global_step, lr=lr, sps=self.steps_per_update / (time.perf_counter() - start))
            _logger.info("update %d step %d: kl %.4f agreement %.3f", self.num_updates, self.global_step,
                         stats["kl"], stats["agreement"])  # fmt: skip
            history.append(stats)
            if callback is not None:
                callback(stats)
        return history

    def _update(self) -> dict[str, float]:
        """One episode of the whole batch under the teacher's mode, then one step on the student's mean KL."""
        obs = self._next_obs
        if obs is None:
            obs = self.envs.reset_tensors(seed=self.seed if self.num_updates == 0 else None)
        losses, agreements = [], []
        for _ in range(self.num_stages):
            live = live_mask(obs, self.device)
            with torch.no_grad():
                teacher_logits = self.teacher.keep_logits(obs)
                keep = self.teacher.mode(teacher_logits, live, obs)
            student_logits = self.student.keep_logits(obs)
            losses.append(live_kl(teacher_logits, student_logits, live).mean())
            with torch.no_grad():
                agreements.append(decision_agreement(keep, self.student.mode(student_logits, live, obs)))
            obs, _, _, _, _ = self.envs.step_tensors(keep)
        self._next_obs = obs
        self.global_step += self.steps_per_update
        loss = torch.stack(losses).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"kl": loss.item(), "agreement": sum(agreements) / len(agreements)}

    def state_dict(self) -> dict[str, Any]:
        """Student, optimizer, counters and the env's random state, for checkpoint and resume (see ``NativePPO``)."""
        return {
            "policy": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "global_step": self.global_step,
            "num_updates": self.num_updates,
            "env_rng": self.envs.np_random.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step, self.num_updates = int(state["global_step"]), int(state["num_updates"])
        self.envs.np_random.bit_generator.state = state["env_rng"]
        self._next_obs = None
