"""The APT agent as a stable-baselines3 policy, so SB3's PPO and A2C train it.

    model = PPO(APTActorCriticPolicy, SB3VecEnv(envs), policy_kwargs=dict(hidden=32))

A per-token head with shared weights does not fit SB3's features-extractor + MLP split, so this is
a thin ``ActorCriticPolicy`` subclass around ``APTPolicy`` (``self.net``), with SB3's Bernoulli
distribution over the net's keep logits.
"""

from __future__ import annotations

from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import BernoulliDistribution, Distribution
from stable_baselines3.common.policies import MultiInputActorCriticPolicy
from stable_baselines3.common.preprocessing import preprocess_obs
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import Tensor

from agents.policy import APTPolicy


class APTActorCriticPolicy(MultiInputActorCriticPolicy):
    """``APTPolicy`` behind SB3's actor-critic interface.

    SB3's ``net_arch``, ``activation_fn``, ``ortho_init`` and features extractor do not apply: the
    network is ``APTPolicy``, sized from the observation space.

    Args:
        observation_space: the env's ``Dict`` space (``tokens``, ``cls``, ``stage``, optionally
            ``cls_attn`` and ``keep``).
        action_space: ``MultiBinary(N)``.
        lr_schedule: SB3's learning-rate schedule.
        hidden: ``APTPolicy`` hidden width.
        qk_dim: ``APTPolicy`` query/key/value width.
        use_cls_attn: read ``cls_attn``; default: whether the space has it.
        init_keep_prob: ``APTPolicy``'s initial keep probability.
        **kwargs: passed to ``MultiInputActorCriticPolicy`` (optimizer class and kwargs, ...).
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.MultiBinary,
        lr_schedule: Schedule,
        hidden: int = 64,
        qk_dim: int = 64,
        use_cls_attn: bool | None = None,
        init_keep_prob: float = 0.5,
        **kwargs: Any,
    ) -> None:
        if not isinstance(action_space, spaces.MultiBinary):
            raise ValueError(f"APTActorCriticPolicy needs a MultiBinary action space, got {action_space}")
        if use_cls_attn is None:
            use_cls_attn = "cls_attn" in observation_space.spaces
        self.net_kwargs = dict(hidden=hidden, qk_dim=qk_dim, use_cls_attn=use_cls_attn, init_keep_prob=init_keep_prob)
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        self.net = APTPolicy.from_space(self.observation_space, **self.net_kwargs)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), **self.net_kwargs}

    def _logits_and_values(self, obs: PyTorchObs) -> tuple[Tensor, Tensor]:
        """Keep logits (B, N) and values (B, 1), SB3's value shape."""
        logits, value = self.net(preprocess_obs(obs, self.observation_space, normalize_images=self.normalize_images))
        return logits, value.unsqueeze(-1)

    def _distribution(self, logits: Tensor) -> BernoulliDistribution:
        assert isinstance(self.action_dist, BernoulliDistribution)
        return self.action_dist.proba_distribution(action_logits=logits)

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        logits, values = self._logits_and_values(obs)
        dist = self._distribution(logits)
        actions = dist.get_actions(deterministic=deterministic)
        return actions, values, dist.log_prob(actions)

    def evaluate_actions(self, obs: PyTorchObs, actions: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        logits, values = self._logits_and_values(obs)
        dist = self._distribution(logits)
        return values, dist.log_prob(actions), dist.entropy()

    def get_distribution(self, obs: PyTorchObs) -> Distribution:
        return self._distribution(self._logits_and_values(obs)[0])

    def predict_values(self, obs: PyTorchObs) -> torch.Tensor:
        return self._logits_and_values(obs)[1]
