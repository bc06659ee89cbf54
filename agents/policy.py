"""The APT agent: one keep logit per patch token from its feature and the class token's.

For patch token ``x_i`` and class token ``c`` (both LayerNorm'ed), ``q = W_q c``, ``k_i = W_k x_i``,
``v_i = W_v x_i``; an MLP with weights shared across tokens maps ``[v_i ; q * k_i]`` (and, if asked,
the class attention ``cls_attn_i``) to a keep logit, with a learned stage embedding (and, for an env
with budgets, a projection of the budget) added in its hidden layer. A value head reads the mean
hidden feature of the live tokens and the class query.

Two ways to turn the logits into a keep mask (``sampling``):

* ``"bernoulli"``: an independent keep decision per live token, ``p_i = sigmoid(l_i)``; the policy
  chooses how many tokens to keep.
* ``"topk"``: the env's budget sets the count (``obs["keep_count"]``, see ``APTPruneVectorEnv``) and
  the policy chooses which tokens: Gumbel-top-k over the live tokens, i.e. Plackett-Luce sampling of
  ``count`` tokens without replacement with weights ``exp(l_i)`` (Kool et al., "Stochastic Beams and
  Where to Find Them", 2019). It is trained as it is evaluated: the deterministic action, the
  ``count`` live tokens with the highest logits, is the mode of this distribution.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import Tensor, nn

from apt_env.observe import as_tensor
from apt_env.tokens import top_count

PRUNED_LOGIT = -30.0
"""The logit of a token pruned at an earlier stage: finite, so log-probs stay finite, and so low
that it is never kept and adds ~1e-13 to log-probabilities and entropies."""

SAMPLINGS: tuple[str, ...] = ("bernoulli", "topk")
MIXERS: tuple[str, ...] = ("none", "attention")

_TOPK_NEEDS_BUDGET = (
    "sampling='topk' keeps obs['keep_count'] tokens, which only an env with a budget observes: pass budget= "
    "to the env, or use sampling='bernoulli'"
)

_ABSENT = 1e4
"""How far below a row's lowest logit the Plackett-Luce terms put tokens that cannot be picked:
``exp(-1e4)`` is 0 in float32, and finite values keep the gradients of ``logcumsumexp`` finite."""


@runtime_checkable
class TokenPolicy(Protocol):
    """The APT agent and the heuristic baselines alike: ``act``, with its options bound, is the ``KeepFn``
    (``apt_env.observe``) that the env, joint training and evaluation call to pick the patch tokens to keep."""

    def act(self, obs: Mapping[str, Any], *, deterministic: bool = True, keep_ratio: float | None = None) -> Tensor:
        """A keep mask (B, N) bool for a batched observation; pruned tokens are never kept."""
        ...


def obs_tensor(obs: Mapping[str, Any], key: str, device: torch.device | str | None = None) -> Tensor:
    """``obs[key]`` as a tensor on ``device``; an observation that is not a dict, lacks ``key`` or holds something
    other than numbers there is a clear error."""
    if not isinstance(obs, Mapping):
        raise TypeError(f"an observation is a dict of batched arrays, as the env returns, got {type(obs).__name__}")
    if key not in obs:
        raise ValueError(f"the observation has no {key!r} (it has {list(obs)}): add {key!r} to the env's obs_keys")
    return as_tensor(obs[key], f"obs[{key!r}]", device)


def live_mask(obs: Mapping[str, Any], device: torch.device | str | None = None) -> Tensor:
    """The tokens still alive, (B, N) bool, from ``obs["keep"]`` (int8, float or bool).

    Without a ``keep`` key every token of ``obs["tokens"]`` or ``obs["cls_attn"]`` is alive.
    """
    key = next((k for k in ("keep", "tokens", "cls_attn") if isinstance(obs, Mapping) and k in obs), "keep")
    ref = obs_tensor(obs, key, device)
    if ref.dim() != (3 if key == "tokens" else 2):
        shape = "(B, N, C)" if key == "tokens" else "(B, N)"
        raise ValueError(f"obs[{key!r}] must be batched {shape}, got shape {tuple(ref.shape)}")
    if key == "keep":
        return ref > 0.5
    return torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device)


def check_keep_ratio(keep_ratio: Any) -> float:
    """``keep_ratio`` as a float in (0, 1], else a ValueError."""
    try:
        ratio = math.nan if isinstance(keep_ratio, (str, bytes)) else float(keep_ratio)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
        ratio = math.nan
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep_ratio must be a fraction in (0, 1], got {keep_ratio!r}")
    return ratio


def top_k_live(scores: Tensor, live: Tensor, keep_ratio: float) -> Tensor:
    """Keep the highest-scoring ``keep_ratio`` of each row's live tokens (at least one).

    Args:
        scores: (B, N) float, higher is kept first.
        live: (B, N) bool, the tokens that may be kept.
        keep_ratio: fraction in (0, 1] of the live count, rounded half up.

    Returns:
        (B, N) bool keep mask, a subset of ``live``.
    """
    return top_count(scores, live, ratio_count(live, keep_ratio))


def ratio_count(live: Tensor, keep_ratio: float) -> Tensor:
    """Tokens kept per row at ``keep_ratio`` (in (0, 1]) of its live ones: rounded half up, at least one.
    # live: (B, N) bool -> (B,) float"""
    ratio = check_keep_ratio(keep_ratio)
    return torch.floor(live.sum(1, dtype=torch.float32) * ratio + 0.5).clamp(min=1)


def top_count_live(scores: Tensor, live: Tensor, count: Tensor) -> Tensor:
    """Keep each row's ``count`` (B,) highest-scoring live tokens, rounded half up, at least one."""
    return top_count(scores, live, torch.floor(count + 0.5).clamp(min=1))


def keep_counts(obs: Mapping[str, Any], device: torch.device | str | None = None) -> Tensor:
    """The tokens to keep at this stage, (B,) long, from ``obs["keep_count"]`` ((B,) or (B, 1), any dtype)."""
    if isinstance(obs, Mapping) and "keep_count" not in obs:
        raise ValueError(_TOPK_NEEDS_BUDGET)
    count = obs_tensor(obs, "keep_count", device)
    if count.dim() not in (1, 2) or count.shape[1:] not in ((), (1,)):
        raise ValueError(f"obs['keep_count'] must be (B,) or (B, 1), got shape {tuple(count.shape)}")
    return count.reshape(count.shape[0]).round().long()


def gumbel_top_count(logits: Tensor, live: Tensor, count: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Sample ``count`` (B,) live tokens per row without replacement, with probabilities ``softmax(logits)``
    at each pick (Plackett-Luce), by perturbing the logits with Gumbel noise and keeping the top ones.

    Returns:
        (B, N) bool keep mask, a subset of ``live`` with ``min(count, live)`` tokens per row.
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(min=1e-20)
    gumbel = -torch.log(-torch.log(u))
    return top_count_live(logits.detach().float() + gumbel, live, count.float()) & (count > 0).unsqueeze(1)


def _sequential_logsumexp(logits: Tensor, live: Tensor, first: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sort each row for sequential picks: the ``first`` tokens by descending logit, then the other live
    ones, then the rest pushed ``_ABSENT`` below the row's lowest logit.

    Returns:
        the sorted logits (B, N), ``lse[:, j]`` = logsumexp of sorted positions ``>= j`` (what is left
        to pick from after ``j`` picks), and whether each sorted position is live (B, N) bool.
    """
    z = logits.float()
    low = z.detach().amin(1, keepdim=True) - _ABSENT
    key = torch.where(first, z.detach(), torch.where(live, low, 2 * low))  # picks, then live, then absent
    order = key.argsort(dim=1, descending=True, stable=True)
    zs = z.masked_fill(~live, 0.0).gather(1, order)
    live_sorted = live.gather(1, order)
    zs = torch.where(live_sorted, zs, low)
    lse = torch.logcumsumexp(zs.flip(1), dim=1).flip(1)
    return zs, lse, live_sorted


def plackett_luce_log_prob(logits: Tensor, live: Tensor, keep: Tensor) -> Tensor:
    """A consistent surrogate for the log-probability of the *set* ``keep`` under Gumbel-top-k sampling.

    The exact probability of a set of ``m`` tokens sums the Plackett-Luce probabilities of its ``m!``
    orders. The surrogate is the log-probability of one of them, the most likely: the set in
    descending logit order, ``sum_j [l_(j) - logsumexp(l over the live tokens not yet picked)]``.
    It is a lower bound of the exact value, equal when ``m <= 1``, and a function of the set alone,
    so sampling time and PPO's re-evaluation of a stored action agree exactly.

    Args:
        logits: (B, N) float.
        live: (B, N) bool, the tokens that can be picked.
        keep: (B, N) bool or 0/1, the set (only its live tokens count).

    Returns:
        (B,) float log-probability surrogate.
    """
    picks = keep.bool() & live
    zs, lse, _ = _sequential_logsumexp(logits, live, picks)
    taken = torch.arange(zs.shape[1], device=zs.device) < picks.sum(1, keepdim=True)  # (B, N)
    return torch.where(taken, zs - lse, torch.zeros_like(zs)).sum(1)


def plackett_luce_entropy(logits: Tensor, live: Tensor, count: Tensor) -> Tensor:
    """A surrogate of the entropy of Gumbel-top-k with ``count`` (B,) picks: the sum over the picks of
    the entropy of the pick distribution (softmax over the live tokens not yet picked), along the most
    likely order (descending logits). It is 0 for a deterministic policy and grows with the spread of
    the logits; it depends on the distribution only, not on an action.

    Returns:
        (B,) float.
    """
    mode = top_count_live(logits.detach(), live, count.float()) & (count > 0).unsqueeze(1)
    zs, lse, live_sorted = _sequential_logsumexp(logits, live, mode)
    # Entropy of pick j: lse_j - E_j[z], with E_j[z] from a second logcumsumexp of z + log(z - c + 1),
    # c the lowest live logit, so that every term is well defined and nothing cancels badly.
    c = zs.detach().masked_fill(~live_sorted, math.inf).amin(1, keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    shifted = (zs - c).clamp(min=0) + 1
    weighted = torch.where(live_sorted, zs + shifted.log(), zs)
    lse_weighted = torch.logcumsumexp(weighted.flip(1), dim=1).flip(1)
    mean_z = (lse_weighted - lse).exp() + c - 1
    taken = torch.arange(zs.shape[1], device=zs.device) < mode.sum(1, keepdim=True)
    return torch.where(taken, lse - mean_z, torch.zeros_like(zs)).sum(1)


@dataclass
class Batch:
    """An observation in the policy's own terms (see ``APTPolicy.prepare``)."""

    tokens: Tensor  # (B, N, C) float
    cls: Tensor  # (B, C) float
    cls_attn: Tensor | None  # (B, N) float
    live: Tensor  # (B, N) bool
    stage: Tensor  # (B,) long
    budget: Tensor | None = None  # (B, 1) float


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
        use_budget: read ``obs["budget"]`` (an env built with ``budget=``), projected into the hidden
            layer; observations must have it exactly when this is set.
        sampling: ``"bernoulli"`` (a keep decision per token) or ``"topk"`` (keep ``obs["keep_count"]``
            tokens, drawn by Gumbel-top-k); see the module docstring.
        mixer: ``"none"``: every token scored on its own features (and the class token's); ``"attention"``: one
            pre-norm multi-head self-attention layer over the live tokens' hidden features (residual) before the
            logit head, so that a token's score depends on the others (what is already covered).
        mixer_heads: heads of the mixer's attention (dividing ``hidden``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_patches: int,
        num_stages: int,
        hidden: int = 64,
        qk_dim: int = 64,
        use_cls_attn: bool = True,
        init_keep_prob: float = 0.9,
        use_budget: bool = False,
        sampling: str = "bernoulli",
        mixer: str = "none",
        mixer_heads: int = 4,
    ) -> None:
        super().__init__()
        sizes = dict(embed_dim=embed_dim, num_patches=num_patches, num_stages=num_stages, hidden=hidden, qk_dim=qk_dim)
        for name, size in sizes.items():
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
                raise ValueError(f"{name} must be a positive integer, got {size!r}")
        if not 0.0 < init_keep_prob < 1.0:
            raise ValueError(f"init_keep_prob must be in (0, 1), got {init_keep_prob}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {sampling!r}; valid: {', '.join(SAMPLINGS)}")
        if mixer not in MIXERS:
            raise ValueError(f"unknown mixer {mixer!r}; valid: {', '.join(MIXERS)}")
        if mixer == "attention" and (not isinstance(mixer_heads, int) or mixer_heads < 1 or hidden % mixer_heads):
            raise ValueError(f"mixer_heads must be a positive divisor of hidden={hidden}, got {mixer_heads!r}")
        self.embed_dim, self.num_patches, self.num_stages = embed_dim, num_patches, num_stages
        self.hidden, self.qk_dim = hidden, qk_dim
        self.use_cls_attn, self.init_keep_prob = use_cls_attn, init_keep_prob
        self.use_budget, self.sampling = bool(use_budget), sampling
        self.mixer, self.mixer_heads = mixer, mixer_heads
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
        if self.use_budget:  # only then: a policy without budgets keeps today's parameters
            self.budget_embed = nn.Linear(1, hidden)
        self._fold: tuple[tuple, tuple[Tensor, Tensor]] | None = None  # see _keys_and_values
        if mixer == "attention":
            self.mixer_norm = nn.LayerNorm(hidden)
            self.mixer_attn = nn.MultiheadAttention(hidden, mixer_heads, batch_first=True)

    CONFIG_KEYS = ("embed_dim", "num_patches", "num_stages", "hidden", "qk_dim", "use_cls_attn", "init_keep_prob")
    OPTION_KEYS = ("use_budget", "sampling", "mixer", "mixer_heads")
    """Constructor arguments added later, with defaults, so checkpoints without them still load."""

    def config(self) -> dict[str, Any]:
        """The constructor arguments, to rebuild this policy (``APTPolicy(**config)``)."""
        return {key: getattr(self, key) for key in self.CONFIG_KEYS + self.OPTION_KEYS}

    @classmethod
    def from_space(cls, space: spaces.Dict, **kwargs: Any) -> APTPolicy:
        """A policy sized for one sub-environment's observation space.

        Args:
            space: a ``Dict`` with ``tokens`` (N, C) and ``stage`` ``Discrete(K)``.
            **kwargs: the other constructor arguments; ``use_cls_attn`` defaults to whether the
                space has ``cls_attn``, ``use_budget`` to whether it has ``budget``.
        """
        missing = [key for key in ("tokens", "cls", "stage") if key not in space.spaces]
        if missing:
            raise ValueError(f"the APT policy needs observation keys {missing}; add them to the env's obs_keys")
        n, c = space["tokens"].shape
        kwargs.setdefault("use_cls_attn", "cls_attn" in space.spaces)
        kwargs.setdefault("use_budget", "budget" in space.spaces)
        _check_budget(bool(kwargs["use_budget"]), "budget" in space.spaces, "space")
        if kwargs.get("sampling") == "topk" and "keep_count" not in space.spaces:
            raise ValueError(_TOPK_NEEDS_BUDGET)
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
        tokens = obs_tensor(obs, "tokens", device).float()  # (B, N, C)
        if tokens.dim() != 3:
            raise ValueError(f"obs['tokens'] must be batched (B, N, C), got shape {tuple(tokens.shape)}")
        if tuple(tokens.shape[1:]) != (self.num_patches, self.embed_dim):
            raise ValueError(
                f"policy expects {self.num_patches} tokens of width {self.embed_dim}, observation has "
                f"{tokens.shape[1]} tokens of width {tokens.shape[2]}: build the policy for this env"
            )
        b = tokens.shape[0]
        stage = obs_tensor(obs, "stage", device)
        if stage.is_floating_point() and stage.dim() >= 2 and stage.shape[-1] == self.num_stages:
            stage = stage.argmax(-1)  # SB3's one-hot
        stage = _per_row(stage, b, "stage").long()
        if bool(((stage < 0) | (stage >= self.num_stages)).any()):  # an IndexError inside the embedding else
            raise ValueError(f"obs['stage'] must be in [0, {self.num_stages}), got {stage.tolist()}")
        cls_attn = None
        if self.use_cls_attn:
            if "cls_attn" not in obs:
                raise ValueError(
                    "the policy reads obs['cls_attn'], which this env does not observe: add 'cls_attn' to "
                    "obs_keys or build the policy with use_cls_attn=False"
                )
            cls_attn = _batched(obs, "cls_attn", (b, self.num_patches), device).float()
        cls_token = _batched(obs, "cls", (b, self.embed_dim), device).float()
        _check_budget(self.use_budget, "budget" in obs, "observation")
        budget = _per_row(obs_tensor(obs, "budget", device), b, "budget").float()[:, None] if self.use_budget else None
        if self.sampling == "topk" and "keep_count" in obs:
            _per_row(keep_counts(obs, device), b, "keep_count")
        live = live_mask(obs, device)
        if tuple(live.shape) != (b, self.num_patches):
            raise ValueError(f"obs['keep'] must be ({b}, {self.num_patches}), got {tuple(live.shape)}")
        return Batch(tokens, cls_token, cls_attn, live, stage, budget)

    def _hidden(self, o: Batch) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
        """The MLP's hidden features of the live tokens only, (L, H), with their (row, position) indices:
        pruned tokens cost nothing. Also the class query (B, D) for the value head."""
        b, n = o.live.shape
        rows, cols = o.live.nonzero(as_tuple=True)  # (L,) each, row-major
        flat = rows * n + cols  # index_select on flat rows: a faster gather than o.tokens[rows, cols]

        def live_rows(t: Tensor) -> Tensor:  # (B, N, ...) -> (L, ...): a copy only when some token is pruned
            t = t.reshape(b * n, -1)
            return t if len(flat) == b * n else t.index_select(0, flat)

        x = self.token_norm(live_rows(o.tokens))  # (L, C)
        q = self.q(self.cls_norm(o.cls))  # (B, D)
        weight, bias = self._keys_and_values()
        k, h_v = F.linear(x, weight, bias).split([self.qk_dim, self.hidden], dim=-1)
        per_row = self.stage_embed(o.stage)  # (B, H): what is the same for every token of a row
        if o.budget is not None:
            per_row = per_row + self.budget_embed(o.budget)
        m = len(flat) // b
        if len(flat) == b * m and bool((o.live.sum(1) == m).all()):  # m tokens in every row (a budget): broadcast
            qk = (k.view(b, m, self.qk_dim) * q.unsqueeze(1)).view(len(flat), self.qk_dim)
            base = (h_v.view(b, m, self.hidden) + per_row.unsqueeze(1)).view(len(flat), self.hidden)
        else:  # each row's values gathered for its tokens
            qk = q.index_select(0, rows) * k
            base = h_v + per_row.index_select(0, rows)
        feats = [qk] if o.cls_attn is None else [qk, live_rows(o.cls_attn) * self.num_patches]
        h = torch.addmm(base, torch.cat(feats, -1), self.fc1.weight[:, self.qk_dim :].t())
        h = self.act_fn(self.fc2(self.act_fn(h)))
        if self.mixer == "attention":
            h = h + self._mix(h, rows, cols, o.live)
        return h, (rows, cols), q

    def _keys_and_values(self) -> tuple[Tensor, Tensor]:
        """The keys' projection and fc1's share of ``v_i`` as one (D + H, C) weight and its bias.

        fc1's share of ``v_i`` is linear in ``x_i``: one product with ``W1_v W_v`` (C x H) replaces v's (C x D)
        and fc1's (D x H), and the keys come out of the same matmul. Without gradients the fold is kept until a
        weight changes (their version counters), like a folded norm: a decision does not pay for it."""
        params = (self.k.weight, self.k.bias, self.v.weight, self.v.bias, self.fc1.weight, self.fc1.bias)
        key = tuple((p.data_ptr(), p._version) for p in params)
        if not torch.is_grad_enabled() and self._fold is not None and self._fold[0] == key:
            return self._fold[1]
        w1_v = self.fc1.weight[:, : self.qk_dim]
        weight = torch.cat([self.k.weight, w1_v @ self.v.weight])
        bias = torch.cat([self.k.bias, w1_v @ self.v.bias + self.fc1.bias])
        if not torch.is_grad_enabled():
            self._fold = (key, (weight, bias))
        return weight, bias

    def _mix(self, h: Tensor, rows: Tensor, cols: Tensor, live: Tensor) -> Tensor:
        """Self-attention of the live tokens of each row over each other, (L, H) in and out."""
        b, n = live.shape
        padded = h.new_zeros(b, n, h.shape[1]).index_put((rows, cols), self.mixer_norm(h))
        ignore = ~live & live.any(1, keepdim=True)  # a row with no live token attends to its zeros: no NaN
        mixed, _ = self.mixer_attn(padded, padded, padded, key_padding_mask=ignore, need_weights=False)
        return mixed[rows, cols]

    def _logits(self, h: Tensor, index: tuple[Tensor, Tensor], live: Tensor) -> Tensor:
        """Keep logits (B, N) from the live tokens' hidden features, ``PRUNED_LOGIT`` elsewhere."""
        scores = self.logit_head(h).squeeze(-1)
        if len(scores) == live.numel():  # every token live: already in (row, position) order
            return scores.view(live.shape)
        logits = torch.full(live.shape, PRUNED_LOGIT, dtype=h.dtype, device=h.device)
        return logits.index_put(index, scores)

    def forward(self, obs: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Keep logits (B, N), ``PRUNED_LOGIT`` where already pruned, and state values (B,)."""
        o = self.prepare(obs)
        h, index, q = self._hidden(o)
        pooled = h.new_zeros(o.live.shape[0], h.shape[1]).index_add(0, index[0], h)
        pooled = pooled / o.live.sum(1, keepdim=True).clamp(min=1).to(h.dtype)  # mean over live tokens (B, H)
        value = self.value_head(torch.cat([pooled, q], -1)).squeeze(-1)  # (B,)
        return self._logits(h, index, o.live), value

    def keep_logits(self, obs: Mapping[str, Any]) -> Tensor:
        """The keep logits of ``forward`` without the value head: all that a decision needs."""
        o = self.prepare(obs)
        h, index, _ = self._hidden(o)
        return self._logits(h, index, o.live)

    def decision_flops(self, live: Tensor) -> Tensor:
        """The FLOPs of ``act`` per image (fvcore's convention: a multiply-add is one, LayerNorm five per
        element), from the live patch tokens at each stage (B, K): the network runs on the live tokens only,
        and a decision skips the value head.
        """
        c, d, h = self.embed_dim, self.qk_dim, self.hidden
        # its norm, keys and fc1's share of v_i (folded: C x (D + H)), q * k_i, the rest of fc1, fc2, the logit
        per_token = 5 * c + c * (d + h) + d + (d + int(self.use_cls_attn)) * h + h * h + h
        per_stage = 5 * c + c * d + h * int(self.use_budget)  # class-token norm and query, the budget's projection
        if self.mixer == "attention":
            per_token += 5 * h + 4 * h * h  # its norm, the in and out projections
        live = live.double()
        flops = live * per_token + per_stage
        if self.mixer == "attention":
            flops = flops + 2 * h * live * live  # q k^T and the weighted sum over the live tokens
        return flops.sum(1).cpu()

    def get_action_and_value(
        self, obs: Mapping[str, Any], action: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """CleanRL's agent interface: a Bernoulli keep decision per token, or with ``sampling="topk"``
        ``obs["keep_count"]`` tokens by Gumbel-top-k.

        Args:
            obs: a batched observation.
            action: (B, N) 0/1 actions to evaluate; sampled when ``None`` (never keeping a pruned token).
            generator: the random source for sampling; torch's global one when ``None``.

        Returns:
            action (B, N) float, log-probability (B,) and entropy (B,) summed over the live tokens,
            value (B,). With ``"topk"`` the log-probability and entropy are the Plackett-Luce
            surrogates ``plackett_luce_log_prob`` (of the set) and ``plackett_luce_entropy``.
        """
        logits, value = self(obs)
        live = live_mask(obs, logits.device)
        if self.sampling == "topk":
            count = keep_counts(obs, logits.device)
            if action is None:
                action = gumbel_top_count(logits, live, count, generator)
            action = action.float()
            log_prob = plackett_luce_log_prob(logits, live, action > 0.5)
            return action, log_prob, plackett_luce_entropy(logits, live, count), value
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
            deterministic: keep the mode's count of tokens, those with the highest logits; else
                sample. The count is, with ``"bernoulli"``, as many as the policy keeps in expectation
                (the sum of the live tokens' keep probabilities: thresholding each at 0.5 would keep
                every token of a policy that keeps each with probability 0.7, although it prunes 30%
                of them when sampled); with ``"topk"``, ``obs["keep_count"]`` (the most likely set).
            keep_ratio: if given, keep the top ``keep_ratio`` of the live tokens by logit (at least
                one), whatever ``deterministic`` says: a fixed budget.
            generator: the random source for sampling.
        """
        logits = self.keep_logits(obs)
        live = live_mask(obs, logits.device)
        if keep_ratio is not None:
            return top_k_live(logits, live, keep_ratio)
        if deterministic:
            return self.mode(logits, live, obs)
        if self.sampling == "topk":
            return gumbel_top_count(logits, live, keep_counts(obs, logits.device), generator)
        u = torch.rand(logits.shape, generator=generator, device=logits.device)
        return (u < torch.sigmoid(logits)) & live

    def mode(self, logits: Tensor, live: Tensor, obs: Mapping[str, Any]) -> Tensor:
        """The deterministic keep mask (B, N) bool for this policy's logits (B, N): the live tokens with the
        highest logits, as many as kept in expectation (``"bernoulli"``) or ``obs["keep_count"]`` (``"topk"``)."""
        if self.sampling == "topk":
            count = keep_counts(obs, logits.device)
            return top_count_live(logits, live, count.float()) & (count > 0).unsqueeze(1)
        expected = (torch.sigmoid(logits) * live).sum(1)  # (B,)
        return top_count_live(logits, live, expected)


def _per_row(value: Tensor, rows: int, key: str) -> Tensor:
    """``value`` as (B,), from (B,) or (B, 1): checked to hold one value per row."""
    if value.numel() != rows:
        raise ValueError(f"obs[{key!r}] must hold one value for each of {rows} rows, got shape {tuple(value.shape)}")
    return value.reshape(rows)


def _batched(obs: Mapping[str, Any], key: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """``obs[key]``, checked to have ``shape``."""
    value = obs_tensor(obs, key, device)
    if tuple(value.shape) != shape:
        raise ValueError(f"obs[{key!r}] must have shape {shape} (batch, ...), got {tuple(value.shape)}")
    return value


def _check_budget(use_budget: bool, observed: bool, where: str) -> None:
    """A policy reads a budget exactly when the env observes one."""
    if use_budget and not observed:
        raise ValueError(
            f"the policy was built with use_budget=True but the {where} has no 'budget': build the env with "
            "budget=... or the policy with use_budget=False"
        )
    if observed and not use_budget:
        raise ValueError(
            f"the {where} has a 'budget' (an env built with budget=...) but the policy was built with "
            "use_budget=False, so it would ignore it: build it with use_budget=True (APTPolicy.for_env does)"
        )
