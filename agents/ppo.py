"""A native batched PPO trainer on ``APTPruneVectorEnv``'s tensor API.

CleanRL's ``ppo.py`` (GAE, clipped surrogate, clipped value loss, entropy bonus, gradient clipping)
specialised to this environment: every episode has exactly K steps and all sub-environments end
together, so a rollout is a whole number of episodes and nothing is bootstrapped across rollouts.
Observations, actions and rewards stay tensors on the env's device. With an env that has budgets and
a policy with ``sampling="topk"``, the ratio uses the policy's Plackett-Luce surrogate log-probability
of the kept set, the same function at collection and at update.

References:
    PPO: Schulman et al., "Proximal Policy Optimization Algorithms", 2017, arXiv:1707.06347.
    GAE: Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
    2016, arXiv:1506.02438.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from agents.policy import APTPolicy
from apt_env.train.distributed import all_reduce_grads

_logger = logging.getLogger(__name__)


class NativePPO:
    """PPO for ``APTPolicy`` on an ``APTPruneVectorEnv``.

    Args:
        envs: the vector env (its ``reset_tensors``/``step_tensors`` are used).
        policy: the agent; default ``APTPolicy.for_env(envs, **policy_kwargs)`` on the env's device.
        policy_kwargs: constructor arguments of the default policy.
        lr: Adam learning rate.
        episodes_per_rollout: episodes of the whole batch per rollout; a rollout has
            ``episodes_per_rollout * K * num_envs`` transitions.
        update_epochs: passes over each rollout.
        num_minibatches: minibatches per pass.
        clip_coef: PPO's surrogate clipping coefficient (also clips the value loss).
        gamma: discount over the K stages.
        gae_lambda: GAE's lambda.
        ent_coef: entropy bonus weight.
        vf_coef: value loss weight.
        max_grad_norm: gradient norm clipping.
        norm_adv: normalise advantages per minibatch.
        clip_vloss: clip the value loss as in PPO's paper (CleanRL's default).
        seed: seeds the policy's initial weights (when built here), the sampling and minibatch
            generator, and the env's first reset.
    """

    def __init__(
        self,
        envs: Any,
        policy: APTPolicy | None = None,
        *,
        policy_kwargs: dict[str, Any] | None = None,
        lr: float = 3e-4,
        episodes_per_rollout: int = 8,
        update_epochs: int = 4,
        num_minibatches: int = 4,
        clip_coef: float = 0.2,
        gamma: float = 1.0,
        gae_lambda: float = 0.95,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = 0.5,
        norm_adv: bool = True,
        clip_vloss: bool = True,
        seed: int | None = None,
    ) -> None:
        if episodes_per_rollout < 1 or update_epochs < 1 or num_minibatches < 1:
            raise ValueError("episodes_per_rollout, update_epochs and num_minibatches must be at least 1")
        self.envs = envs
        self.device = torch.device(envs.device)
        self.seed = seed
        if policy is None:
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                policy = APTPolicy.for_env(envs, **(policy_kwargs or {}))
        self.policy = policy.to(self.device)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr, eps=1e-5)
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.num_stages = envs.pv.num_stages
        self.episodes_per_rollout = episodes_per_rollout
        self.update_epochs, self.num_minibatches = update_epochs, num_minibatches
        self.clip_coef, self.gamma, self.gae_lambda = clip_coef, gamma, gae_lambda
        self.ent_coef, self.vf_coef, self.max_grad_norm = ent_coef, vf_coef, max_grad_norm
        self.norm_adv, self.clip_vloss = norm_adv, clip_vloss
        self.global_step = 0  # env transitions, num_envs per step (CleanRL's count)
        self.num_rollouts = 0
        self._next_obs: dict[str, Tensor] | None = None

    @property
    def steps_per_rollout(self) -> int:
        """Env transitions per rollout: episodes x stages x sub-environments."""
        return self.episodes_per_rollout * self.num_stages * self.envs.num_envs

    def restart_episodes(self) -> None:
        """Start fresh episodes at the next rollout (after the backbone changed under the env, or a checkpoint)."""
        self._next_obs = None

    def learn(self, total_env_steps: int, callback: Callable[[dict], None] | None = None) -> list[dict]:
        """Train for at least ``total_env_steps`` more transitions, in whole rollouts.

        Args:
            total_env_steps: transitions to collect in this call (``num_envs`` per env step).
            callback: called with each rollout's stats as they come (for logging).

        Returns:
            One dict per rollout: ``global_step``, ``episode_return``, ``loss_delta``
            (``loss_plain - loss_multi`` at the episode's end), ``keep_ratio``, ``gflops``, ``sps``
            (transitions per second), ``policy_loss``, ``value_loss``, ``entropy``, ``approx_kl``,
            ``clipfrac``, ``explained_variance``; with a budget also ``budget_penalty`` (the mean
            over-budget penalty per episode).
        """
        history = []
        for _ in range(max(1, math.ceil(total_env_steps / self.steps_per_rollout))):
            start = time.perf_counter()
            rollout, stats = self._collect()
            stats.update(self._update(rollout))
            self.num_rollouts += 1
            stats["global_step"] = self.global_step
            stats["sps"] = self.steps_per_rollout / (time.perf_counter() - start)
            _logger.info(
                "rollout %d step %d: return %.4f keep %.3f loss_delta %.4f sps %.0f",
                self.num_rollouts, self.global_step, stats["episode_return"], stats["keep_ratio"],
                stats["loss_delta"], stats["sps"],
            )  # fmt: skip
            history.append(stats)
            if callback is not None:
                callback(stats)
        return history

    @torch.no_grad()
    def _collect(self) -> tuple[dict[str, Any], dict[str, float]]:
        """Whole episodes from the current policy; returns the rollout tensors and episode stats.

        The stored action is the one the env executed (``info["executed_action"]``), with its
        log-probability under the current policy: it differs from the sampled one where the env
        topped a row up to ``min_keep``.
        """
        obs = self._next_obs
        if obs is None:
            obs = self.envs.reset_tensors(seed=self.seed if self.num_rollouts == 0 else None)
        steps = self.episodes_per_rollout * self.num_stages
        obs_buf: dict[str, list[Tensor]] = {key: [] for key in obs}
        actions, log_probs, values, rewards = [], [], [], []
        finals: list[dict[str, Tensor]] = []
        for _ in range(steps):
            for key, v in obs.items():
                obs_buf[key].append(v)
            action, log_prob, _, value = self.policy.get_action_and_value(obs, generator=self.generator)
            next_obs, reward, _, _, info = self.envs.step_tensors(action)
            # Credit what the env did: it tops rows up to min_keep, overriding the sampled action.
            executed = info["executed_action"].to(action.dtype)
            if not torch.equal(executed, action):
                _, log_prob, _, _ = self.policy.get_action_and_value(obs, executed)
                action = executed
            obs = next_obs
            actions.append(action)
            log_probs.append(log_prob)
            values.append(value)
            rewards.append(reward)
            if "final_info" in info:
                finals.append(info["final_info"])
        self._next_obs = obs
        self.global_step += steps * self.envs.num_envs
        rollout = {
            "obs": {key: torch.stack(v) for key, v in obs_buf.items()},  # (T, B, ...)
            "actions": torch.stack(actions),  # (T, B, N)
            "log_probs": torch.stack(log_probs),  # (T, B)
            "values": torch.stack(values),
            "rewards": torch.stack(rewards),
        }
        rollout["advantages"] = self._gae(rollout["rewards"], rollout["values"])
        rollout["returns"] = rollout["advantages"] + rollout["values"]
        ends = {key: torch.stack([f[key] for f in finals]).float() for key in ("loss_plain", "loss_multi")}
        returns = rollout["rewards"].view(self.episodes_per_rollout, self.num_stages, -1).sum(1)  # (E, B)
        stats = {
            "episode_return": returns.mean().item(),
            "loss_delta": (ends["loss_plain"] - ends["loss_multi"]).mean().item(),
            "keep_ratio": torch.stack([f["keep_ratio"] for f in finals]).float().mean().item(),
            "gflops": torch.stack([f["gflops"] for f in finals]).float().mean().item(),
        }
        if "budget_penalty" in finals[0]:
            stats["budget_penalty"] = torch.stack([f["budget_penalty"] for f in finals]).float().mean().item()
        return rollout, stats

    def _gae(self, rewards: Tensor, values: Tensor) -> Tensor:
        """GAE advantages (T, B); an episode's last stage (every K-th step) is terminal."""
        advantages = torch.zeros_like(rewards)
        last = torch.zeros_like(rewards[0])
        for t in reversed(range(rewards.shape[0])):
            if (t + 1) % self.num_stages == 0:  # terminal: no next value, no carried advantage
                next_value, last = torch.zeros_like(last), torch.zeros_like(last)
            else:
                next_value = values[t + 1]
            delta = rewards[t] + self.gamma * next_value - values[t]
            last = delta + self.gamma * self.gae_lambda * last
            advantages[t] = last
        return advantages

    def _update(self, rollout: dict[str, Any]) -> dict[str, float]:
        """PPO epochs over the flattened rollout; returns the last epoch's mean losses."""
        flat_obs = {key: v.flatten(0, 1) for key, v in rollout["obs"].items()}
        actions, old_log_probs = rollout["actions"].flatten(0, 1), rollout["log_probs"].flatten()
        advantages, returns, old_values = (rollout[k].flatten() for k in ("advantages", "returns", "values"))
        size = advantages.shape[0]
        mb_size = max(1, size // self.num_minibatches)
        sums: dict[str, float] = {}
        for _ in range(self.update_epochs):
            sums = dict.fromkeys(("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac"), 0.0)
            order = torch.randperm(size, generator=self.generator, device=self.device)
            batches = list(order.split(mb_size))
            for idx in batches:
                _, log_prob, entropy, value = self.policy.get_action_and_value(
                    {key: v[idx] for key, v in flat_obs.items()}, actions[idx]
                )
                log_ratio = log_prob - old_log_probs[idx]
                ratio = log_ratio.exp()
                adv = advantages[idx]
                if self.norm_adv and adv.numel() > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - self.clip_coef, 1 + self.clip_coef)).mean()
                if self.clip_vloss:
                    clipped = old_values[idx] + (value - old_values[idx]).clamp(-self.clip_coef, self.clip_coef)
                    v_loss = 0.5 * torch.max((value - returns[idx]) ** 2, (clipped - returns[idx]) ** 2).mean()
                else:
                    v_loss = 0.5 * ((value - returns[idx]) ** 2).mean()
                ent = entropy.mean()
                loss = pg_loss - self.ent_coef * ent + self.vf_coef * v_loss
                self.optimizer.zero_grad()
                loss.backward()
                all_reduce_grads(self.policy.parameters())  # a no-op in one process
                nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    sums["policy_loss"] += pg_loss.item()
                    sums["value_loss"] += v_loss.item()
                    sums["entropy"] += ent.item()
                    sums["approx_kl"] += ((ratio - 1) - log_ratio).mean().item()
                    sums["clipfrac"] += ((ratio - 1).abs() > self.clip_coef).float().mean().item()
            sums = {key: v / len(batches) for key, v in sums.items()}
        var = returns.var()
        sums["explained_variance"] = (1 - (returns - old_values).var() / var).item() if var > 0 else float("nan")
        return sums

    def state_dict(self) -> dict[str, Any]:
        """Policy, optimizer, counters and random states, for checkpoint and resume.

        The episodes in flight are not saved: a trainer resumed from this state starts fresh ones from the
        saved env RNG. Call ``restart_episodes()`` after taking it for this trainer to go on exactly as that one.
        """
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "global_step": self.global_step,
            "num_rollouts": self.num_rollouts,
            "generator": self.generator.get_state(),
            "env_rng": self.envs.np_random.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``: the next rollout starts fresh episodes from the saved env RNG, as the
        saved trainer's does once it calls ``restart_episodes()``."""
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step, self.num_rollouts = int(state["global_step"]), int(state["num_rollouts"])
        self.generator.set_state(state["generator"])
        self.envs.np_random.bit_generator.state = state["env_rng"]
        self._next_obs = None
