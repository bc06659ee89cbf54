"""The APT agent: one keep logit per patch token from its feature and the class token's.

For patch token ``x_i`` and class token ``c`` (both LayerNorm'ed), ``q = W_q c``, ``k_i = W_k x_i``,
``v_i = W_v x_i``; an MLP with weights shared across tokens maps ``[v_i ; q * k_i]`` (and, if asked,
the class attention ``cls_attn_i``) to a keep logit, with a learned stage embedding added in its
hidden layer. A value head reads the mean hidden feature of the live tokens and the class query.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from gymnasium import spaces
from torch import Tensor, nn

PRUNED_LOGIT = -30.0
"""The logit of a token pruned at an earlier stage: finite, so log-probs stay finite, and so low
that it is never kept and adds ~1e-13 to log-probabilities and entropies."""


@runtime_checkable
class TokenPolicy(Protocol):
    """Anything that picks patch tokens to keep: the APT agent and the heuristic baselines."""

    def act(self, obs: Mapping[str, Any], *, deterministic: bool = True, keep_ratio: float | None = None) -> Tensor:
        """A keep mask (B, N) bool for a batched observation; pruned tokens are never kept."""
        ...


def live_mask(obs: Mapping[str, Any], device: torch.device | str | None = None) -> Tensor:
    """The tokens still alive, (B, N) bool, from ``obs["keep"]`` (int8, float or bool).

    Without a ``keep`` key every token of ``obs["tokens"]`` or ``obs["cls_attn"]`` is alive.
    """
    if "keep" in obs:
        return torch.as_tensor(obs["keep"], device=device) > 0.5
    ref = obs["tokens"] if "tokens" in obs else obs["cls_attn"]
    ref = torch.as_tensor(ref, device=device)
    return torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device)


def top_k_live(scores: Tensor, live: Tensor, keep_ratio: float) -> Tensor:
    """Keep the highest-scoring ``keep_ratio`` of each row's live tokens (at least one).

    Args:
        scores: (B, N) float, higher is kept first.
        live: (B, N) bool, the tokens that may be kept.
        keep_ratio: fraction in (0, 1] of the live count, rounded half up.

    Returns:
        (B, N) bool keep mask, a subset of ``live``.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return top_count_live(scores, live, live.sum(1, dtype=torch.float32) * keep_ratio)


def top_count_live(scores: Tensor, live: Tensor, count: Tensor) -> Tensor:
    """Keep each row's ``count`` (B,) highest-scoring live tokens, rounded half up, at least one."""
    count = torch.floor(count + 0.5).clamp(min=1)  # (B,)
    order = scores.float().masked_fill(~live, -math.inf).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < count.unsqueeze(1)) & live


@dataclass
class Batch:
    """An observation in the policy's own terms (see ``APTPolicy.prepare``)."""

    tokens: Tensor  # (B, N, C) float
    cls: Tensor  # (B, C) float
    cls_attn: Tensor | None  # (B, N) float
    live: Tensor  # (B, N) bool
    stage: Tensor  # (B,) long


class APTPolicy(nn.Module):
    """The APT pruning agent with a value head.

    Args:
        embed_dim: width C of the observed tokens.
        num_patches: number N of patch tokens.
        num_stages: number K of pruning stages (size of the stage embedding).
        hidden: width of the per-token MLP.
        qk_dim: width of the query, key and value projections.
        use_cls_attn: also read ``obs["cls_attn"]`` (scaled by N, so a uniform attention is 1).
        init_keep_prob: initial keep probability of every token (the logit head's bias); a high
            value starts from a policy that prunes little.
    """

    def __init__(
        self,
        embed_dim: int,
        num_patches: int,
        num_stages: int,
        hidden: int = 64,
        qk_dim: int = 64,
        use_cls_attn: bool = True,
        init_keep_prob: float = 0.5,
    ) -> None:
        super().__init__()
        if not 0.0 < init_keep_prob < 1.0:
            raise ValueError(f"init_keep_prob must be in (0, 1), got {init_keep_prob}")
        self.embed_dim, self.num_patches, self.num_stages = embed_dim, num_patches, num_stages
        self.hidden, self.qk_dim = hidden, qk_dim
        self.use_cls_attn, self.init_keep_prob = use_cls_attn, init_keep_prob
        self.token_norm = nn.LayerNorm(embed_dim)
        self.cls_norm = nn.LayerNorm(embed_dim)
        self.q = nn.Linear(embed_dim, qk_dim)
        self.k = nn.Linear(embed_dim, qk_dim)
        self.v = nn.Linear(embed_dim, qk_dim)
        self.fc1 = nn.Linear(2 * qk_dim + int(use_cls_attn), hidden)
        self.stage_embed = nn.Embedding(num_stages, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act_fn = nn.GELU()
        self.logit_head = nn.Linear(hidden, 1)
        self.value_head = nn.Sequential(nn.Linear(hidden + qk_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.normal_(self.stage_embed.weight, std=0.02)
        nn.init.normal_(self.logit_head.weight, std=0.01)  # start near the bias: every token alike
        nn.init.constant_(self.logit_head.bias, math.log(init_keep_prob / (1 - init_keep_prob)))

    CONFIG_KEYS = ("embed_dim", "num_patches", "num_stages", "hidden", "qk_dim", "use_cls_attn", "init_keep_prob")

    def config(self) -> dict[str, Any]:
        """The constructor arguments, to rebuild this policy (``APTPolicy(**config)``)."""
        return {key: getattr(self, key) for key in self.CONFIG_KEYS}

    @classmethod
    def from_space(cls, space: spaces.Dict, **kwargs: Any) -> APTPolicy:
        """A policy sized for one sub-environment's observation space.

        Args:
            space: a ``Dict`` with ``tokens`` (N, C) and ``stage`` ``Discrete(K)``.
            **kwargs: the other constructor arguments; ``use_cls_attn`` defaults to whether the
                space has ``cls_attn``.
        """
        missing = [key for key in ("tokens", "cls", "stage") if key not in space.spaces]
        if missing:
            raise ValueError(f"the APT policy needs observation keys {missing}; add them to the env's obs_keys")
        n, c = space["tokens"].shape
        kwargs.setdefault("use_cls_attn", "cls_attn" in space.spaces)
        return cls(int(c), int(n), int(space["stage"].n), **kwargs)

    @classmethod
    def for_env(cls, envs: Any, **kwargs: Any) -> APTPolicy:
        """A policy sized for a vector env (Gymnasium ``VectorEnv`` or SB3 ``VecEnv``).

        Args:
            envs: an env with ``single_observation_space`` (or an unbatched ``observation_space``).
            **kwargs: the other constructor arguments.
        """
        space = getattr(envs, "single_observation_space", None)
        return cls.from_space(envs.observation_space if space is None else space, **kwargs)

    def prepare(self, obs: Mapping[str, Any]) -> Batch:
        """Tensors on the policy's device from an env observation or an SB3-preprocessed one.

        Accepts ``stage`` as indices (B,) or (B, 1), or one-hot (B, K) or (B, 1, K) float, and
        ``keep`` as int8, bool or float; numpy arrays too.
        """
        device = self.stage_embed.weight.device
        tokens = torch.as_tensor(obs["tokens"], device=device).float()  # (B, N, C)
        if tokens.dim() != 3:
            raise ValueError(f"obs['tokens'] must be batched (B, N, C), got shape {tuple(tokens.shape)}")
        if tuple(tokens.shape[1:]) != (self.num_patches, self.embed_dim):
            raise ValueError(
                f"policy expects {self.num_patches} tokens of width {self.embed_dim}, observation has "
                f"{tokens.shape[1]} tokens of width {tokens.shape[2]}: build the policy for this env"
            )
        b = tokens.shape[0]
        stage = torch.as_tensor(obs["stage"], device=device)
        if stage.is_floating_point() and stage.dim() >= 2 and stage.shape[-1] == self.num_stages:
            stage = stage.argmax(-1)  # SB3's one-hot
        stage = stage.long().reshape(b)
        cls_attn = None
        if self.use_cls_attn:
            if "cls_attn" not in obs:
                raise ValueError(
                    "the policy reads obs['cls_attn'], which this env does not observe: add 'cls_attn' to "
                    "obs_keys or build the policy with use_cls_attn=False"
                )
            cls_attn = torch.as_tensor(obs["cls_attn"], device=device).float()
        cls_token = torch.as_tensor(obs["cls"], device=device).float()
        return Batch(tokens, cls_token, cls_attn, live_mask(obs, device), stage)

    def forward(self, obs: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Keep logits (B, N), ``PRUNED_LOGIT`` where already pruned, and state values (B,)."""
        o = self.prepare(obs)
        x = self.token_norm(o.tokens)  # (B, N, C)
        q = self.q(self.cls_norm(o.cls))  # (B, D)
        feats = [self.v(x), q.unsqueeze(1) * self.k(x)]
        if o.cls_attn is not None:
            feats.append(o.cls_attn.unsqueeze(-1) * self.num_patches)
        h = self.act_fn(self.fc1(torch.cat(feats, -1)) + self.stage_embed(o.stage).unsqueeze(1))
        h = self.act_fn(self.fc2(h))  # (B, N, H)
        logits = self.logit_head(h).squeeze(-1).masked_fill(~o.live, PRUNED_LOGIT)  # (B, N)
        live = o.live.unsqueeze(-1).to(h.dtype)
        pooled = (h * live).sum(1) / live.sum(1).clamp(min=1)  # (B, H)
        value = self.value_head(torch.cat([pooled, q], -1)).squeeze(-1)  # (B,)
        return logits, value

    def decision_flops(self, live: Tensor) -> Tensor:
        """The FLOPs of ``act`` per image (fvcore's convention: a multiply-add is one, LayerNorm five per
        element), from the live patch tokens at each stage (B, K).

        The network runs on all ``N`` positions (pruned ones zeroed) and ``forward`` computes the value head
        too, so the cost does not depend on ``live`` beyond its number of stages.
        """
        c, d, h, n = self.embed_dim, self.qk_dim, self.hidden, self.num_patches
        per_token = 5 * c + 2 * c * d + d + (2 * d + int(self.use_cls_attn)) * h + h * h + h
        per_image = 5 * c + c * d + (h + d) * h + h  # class-token norm and query, value head
        per_stage = n * per_token + per_image
        return torch.full(live.shape[:1], float(per_stage * live.shape[1]), dtype=torch.float64)

    def get_action_and_value(
        self, obs: Mapping[str, Any], action: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """CleanRL's agent interface: a Bernoulli keep decision per token.

        Args:
            obs: a batched observation.
            action: (B, N) 0/1 actions to evaluate; sampled when ``None`` (never keeping a pruned token).
            generator: the random source for sampling; torch's global one when ``None``.

        Returns:
            action (B, N) float, log-probability (B,) and entropy (B,) summed over the live tokens,
            value (B,).
        """
        logits, value = self(obs)
        live = live_mask(obs, logits.device)
        dist = torch.distributions.Bernoulli(logits=logits)
        if action is None:
            u = torch.rand(logits.shape, generator=generator, device=logits.device)
            action = ((u < dist.probs) & live).float()
        livef = live.float()
        log_prob = (dist.log_prob(action.float()) * livef).sum(-1)
        entropy = (dist.entropy() * livef).sum(-1)
        return action.float(), log_prob, entropy, value

    @torch.no_grad()
    def act(
        self,
        obs: Mapping[str, Any],
        *,
        deterministic: bool = True,
        keep_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """A keep mask (B, N) bool.

        Args:
            obs: a batched observation.
            deterministic: keep as many tokens as the policy keeps in expectation (the sum of the
                live tokens' keep probabilities), those with the highest logits; else sample.
                (Thresholding each probability at 0.5 would keep every token of a policy that keeps
                each with probability 0.7, although it prunes 30% of them when sampled.)
            keep_ratio: if given, keep the top ``keep_ratio`` of the live tokens by logit (at least
                one), whatever ``deterministic`` says: a fixed budget.
            generator: the random source for sampling.
        """
        logits, _ = self(obs)
        live = live_mask(obs, logits.device)
        if keep_ratio is not None:
            return top_k_live(logits, live, keep_ratio)
        if deterministic:
            expected = (torch.sigmoid(logits) * live).sum(1)  # (B,)
            return top_count_live(logits, live, expected)
        u = torch.rand(logits.shape, generator=generator, device=logits.device)
        return (u < torch.sigmoid(logits)) & live
