"""The APT agent as a stable-baselines3 policy, so SB3's PPO and A2C train it.

    model = PPO(APTActorCriticPolicy, SB3VecEnv(envs), policy_kwargs=dict(hidden=32))

A per-token head with shared weights does not fit SB3's features-extractor + MLP split, so this is
a thin ``ActorCriticPolicy`` subclass around ``APTPolicy`` (``self.net``), with SB3's Bernoulli
distribution over the net's keep logits, or with ``sampling="topk"`` the net's Gumbel-top-k. Either
way the deterministic action (``predict(obs, deterministic=True)``) is ``APTPolicy.act``'s: the live
tokens with the highest logits, as many as kept in expectation (Bernoulli) or ``obs["keep_count"]``.
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

from agents.distributions import gumbel_top_count, plackett_luce_entropy, plackett_luce_log_prob
from agents.observation import keep_counts, live_mask
from agents.policy import APTPolicy


class ExpectedCountBernoulli(BernoulliDistribution):
    """SB3's Bernoulli distribution whose mode is ``APTPolicy.act``'s deterministic rule, not a threshold.

    Thresholding each keep probability at 0.5 keeps every token of a policy that keeps each with
    probability 0.7, although it prunes 30% of them when sampled.
    """

    def proba_distribution(  # type: ignore[override]
        self, action_logits: Tensor, net: APTPolicy, obs: PyTorchObs
    ) -> ExpectedCountBernoulli:
        super().proba_distribution(action_logits)
        self.logits, self.net, self.obs = action_logits, net, obs
        return self

    def mode(self) -> Tensor:
        return self.net.mode(self.logits, live_mask(self.obs, self.logits.device), self.obs).float()


class GumbelTopK(Distribution):
    """``APTPolicy``'s ``"topk"`` distribution in SB3's terms: ``obs["keep_count"]`` live tokens drawn by
    Gumbel-top-k (torch's global generator, which SB3 seeds), the Plackett-Luce surrogates of
    ``agents.distributions`` as log-probability and entropy, and the top-count tokens by logit as the mode."""

    def proba_distribution_net(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the logits come from APTPolicy")

    def proba_distribution(  # type: ignore[override]
        self, action_logits: Tensor, net: APTPolicy, obs: PyTorchObs
    ) -> GumbelTopK:
        self.logits, self.net, self.obs = action_logits, net, obs
        self.live = live_mask(obs, action_logits.device)
        self.count = keep_counts(obs, action_logits.device)
        return self

    def log_prob(self, actions: Tensor) -> Tensor:
        return plackett_luce_log_prob(self.logits, self.live, actions > 0.5)

    def entropy(self) -> Tensor:
        return plackett_luce_entropy(self.logits, self.live, self.count)

    def sample(self) -> Tensor:
        return gumbel_top_count(self.logits, self.live, self.count).float()

    def mode(self) -> Tensor:
        return self.net.mode(self.logits, self.live, self.obs).float()

    def actions_from_params(self, *args: Any, **kwargs: Any) -> Tensor:
        raise NotImplementedError("use proba_distribution(...).get_actions()")

    def log_prob_from_params(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("use proba_distribution(...).log_prob()")


class APTActorCriticPolicy(MultiInputActorCriticPolicy):
    """``APTPolicy`` behind SB3's actor-critic interface.

    SB3's ``net_arch``, ``activation_fn``, ``ortho_init`` and features extractor do not apply: the
    network is ``APTPolicy``, sized from the observation space.

    Args:
        observation_space: the env's ``Dict`` space (``tokens``, ``cls``, ``stage``, optionally
            ``cls_attn`` and ``live``).
        action_space: ``MultiBinary(N)``.
        lr_schedule: SB3's learning-rate schedule.
        hidden: ``APTPolicy`` hidden width.
        qk_dim: ``APTPolicy`` query/key/value width.
        use_cls_attn: read ``cls_attn``; default: whether the space has it.
        init_keep_prob: ``APTPolicy``'s initial keep probability.
        use_budget: read ``budget``; default: whether the space has it.
        sampling: ``APTPolicy``'s ``"bernoulli"`` or ``"topk"``.
        mixer: ``APTPolicy``'s ``"none"`` or ``"attention"``.
        position_prior: ``APTPolicy``'s weight of the ordered-dither prior.
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
        init_keep_prob: float = 0.9,
        use_budget: bool | None = None,
        sampling: str = "bernoulli",
        mixer: str = "none",
        position_prior: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(action_space, spaces.MultiBinary):
            raise ValueError(f"APTActorCriticPolicy needs a MultiBinary action space, got {action_space}")
        if use_cls_attn is None:
            use_cls_attn = "cls_attn" in observation_space.spaces
        if use_budget is None:
            use_budget = "budget" in observation_space.spaces
        self.net_kwargs = dict(
            hidden=hidden,
            qk_dim=qk_dim,
            use_cls_attn=use_cls_attn,
            init_keep_prob=init_keep_prob,
            use_budget=use_budget,
            sampling=sampling,
            mixer=mixer,
            position_prior=position_prior,
        )
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        self.net = APTPolicy.from_space(self.observation_space, **self.net_kwargs)
        self.action_dist = GumbelTopK() if self.net.sampling == "topk" else ExpectedCountBernoulli(self.net.num_patches)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), **self.net_kwargs}

    def _distribution_and_values(self, obs: PyTorchObs) -> tuple[ExpectedCountBernoulli | GumbelTopK, Tensor]:
        """The action distribution over the net's keep logits (B, N) and values (B, 1), SB3's value shape."""
        obs = preprocess_obs(obs, self.observation_space, normalize_images=self.normalize_images)
        logits, value = self.net(obs)
        assert isinstance(self.action_dist, (ExpectedCountBernoulli, GumbelTopK))
        return self.action_dist.proba_distribution(logits, self.net, obs), value.unsqueeze(-1)

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        dist, values = self._distribution_and_values(obs)
        actions = dist.get_actions(deterministic=deterministic)
        return actions, values, dist.log_prob(actions)

    def evaluate_actions(self, obs: PyTorchObs, actions: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        dist, values = self._distribution_and_values(obs)
        return values, dist.log_prob(actions), dist.entropy()

    def get_distribution(self, obs: PyTorchObs) -> Distribution:
        return self._distribution_and_values(obs)[0]

    def predict_values(self, obs: PyTorchObs) -> torch.Tensor:
        obs = preprocess_obs(obs, self.observation_space, normalize_images=self.normalize_images)
        return self.net(obs)[1].unsqueeze(-1)
