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
* ``"threshold"``: for an env with a *mean* budget (``budget_mean=True``): an independent keep decision per live
  token, ``p_i = sigmoid(l_i - s(b))``, so each image keeps as many tokens as its logits earn. ``s(b)`` is the
  threshold calibrated on held-out images so that the mean GFLOPs meet each budget (``agents.calibrate``; 0 before
  calibration), one for every stage or one per stage, and the logits the policy returns are already shifted by it.
  The deterministic action keeps ``l_i > s(b)``: the distribution's mode, token by token, the same for an image
  alone and inside any batch.

With ``position_prior`` w > 0 every logit has ``w * (1 - 2 * r_i)`` added, ``r_i`` in [0, 1) the ordered-dither
rank of the token's patch position (``apt_env.models.tokens.dither_rank``): the policy then starts from an evenly spread
grid of tokens and learns where the image needs another one, in every sampling rule alike.

The distributions live in ``agents.distributions``, the reading of observations in ``agents.observation``.
One way builds a fresh policy: ``APTPolicy.from_space`` (or ``for_env``, its env's space), which sizes it from
the observation space; a saved one is rebuilt from its ``config()`` by ``APTPolicy.from_config``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import Tensor, nn

from agents.distributions import (
    gumbel_top_count,
    interp,
    plackett_luce_entropy,
    plackett_luce_log_prob,
    top_count_live,
    top_k_live,
)
from agents.observation import (
    TOPK_NEEDS_BUDGET,
    Batch,
    check_budget_observed,
    keep_counts,
    live_mask,
    read_batch,
)
from apt_env.models.tokens import dither_rank

PRUNED_LOGIT = -30.0
"""The logit of a token pruned at an earlier stage: finite, so log-probs stay finite, and so low
that it is never kept and adds ~1e-13 to log-probabilities and entropies."""

SAMPLINGS: tuple[str, ...] = ("bernoulli", "topk", "threshold")
MIXERS: tuple[str, ...] = ("none", "attention")


@runtime_checkable
class TokenPolicy(Protocol):
    """The APT agent and the heuristic baselines alike: ``act``, with its options bound, is the ``KeepFn``
    (``apt_env.envs.observe``) that the env, joint training and evaluation call to pick the patch tokens to keep."""

    def act(self, obs: Mapping[str, Any], *, deterministic: bool = True, keep_ratio: float | None = None) -> Tensor:
        """A keep mask (B, N) bool for a batched observation; pruned tokens are never kept."""
        ...


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
        sampling: ``"bernoulli"`` (a keep decision per token), ``"topk"`` (keep ``obs["keep_count"]``
            tokens, drawn by Gumbel-top-k) or ``"threshold"`` (a keep decision per token against a calibrated
            threshold of the budget, for a mean budget); see the module docstring.
        mixer: ``"none"``: every token scored on its own features (and the class token's); ``"attention"``: one
            pre-norm multi-head self-attention layer over the live tokens' hidden features (residual) before the
            logit head, so that a token's score depends on the others (what is already covered).
        mixer_heads: heads of the mixer's attention (dividing ``hidden``).
        position_prior: w >= 0, the weight of the ordered-dither prior added to every logit (see the module
            docstring); needs a square grid of patches. 0: none.
        calibration: with ``"threshold"``, the calibrated thresholds ``{"budgets": [...], "shifts": [...],
            "backbone": digest, ...}`` (``agents.calibrate.calibrate_thresholds``), each shift one number or one per
            stage, interpolated linearly between budgets; ``None``: threshold 0.
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
        position_prior: float = 0.0,
        calibration: Mapping[str, Any] | None = None,
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
        if sampling == "threshold" and not use_budget:
            raise ValueError("sampling='threshold' is for a mean budget: it reads obs['budget'] (use_budget=True)")
        if mixer not in MIXERS:
            raise ValueError(f"unknown mixer {mixer!r}; valid: {', '.join(MIXERS)}")
        if mixer == "attention" and (not isinstance(mixer_heads, int) or mixer_heads < 1 or hidden % mixer_heads):
            raise ValueError(f"mixer_heads must be a positive divisor of hidden={hidden}, got {mixer_heads!r}")
        self.embed_dim, self.num_patches, self.num_stages = embed_dim, num_patches, num_stages
        self.hidden, self.qk_dim = hidden, qk_dim
        self.use_cls_attn, self.init_keep_prob = use_cls_attn, init_keep_prob
        self.use_budget, self.sampling = bool(use_budget), sampling
        self.mixer, self.mixer_heads = mixer, mixer_heads
        self.calibration = calibration  # checked, and its thresholds kept as tensors, by the setter
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
        self._fold: tuple[tuple, tuple[Tensor, Tensor]] | None = None  # see keys_and_values
        if mixer == "attention":
            self.mixer_norm = nn.LayerNorm(hidden)
            self.mixer_attn = nn.MultiheadAttention(hidden, mixer_heads, batch_first=True)
        # The prior's (N,) offsets: a buffer, so that it moves with the policy, derived from the config (not saved).
        self.register_buffer("_prior", None, persistent=False)
        self.position_prior = position_prior  # checked, and its offsets built, by the setter

    CONFIG_KEYS = ("embed_dim", "num_patches", "num_stages", "hidden", "qk_dim", "use_cls_attn", "init_keep_prob")
    OPTION_KEYS = ("use_budget", "sampling", "mixer", "mixer_heads", "position_prior", "calibration")
    """Constructor arguments added later, with defaults, so checkpoints without them still load."""

    def config(self) -> dict[str, Any]:
        """The sizes and options that rebuild this policy (``APTPolicy.from_config``); what an agent folder saves."""
        return {key: getattr(self, key) for key in self.CONFIG_KEYS + self.OPTION_KEYS}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> APTPolicy:
        """Rebuild a policy from its ``config()``, e.g. a saved agent's ``config.json``.

        Args:
            config: the arguments every saved config holds (``CONFIG_KEYS``) and those added later
                (``OPTION_KEYS``; absent ones, as in older checkpoints, take their defaults); other keys (format,
                metadata) are ignored.

        Raises:
            ValueError: one of ``CONFIG_KEYS`` is missing, or a value is not valid.
        """
        missing = [key for key in cls.CONFIG_KEYS if key not in config]
        if missing:
            raise ValueError(f"the policy config lacks {missing}")
        return cls(**{key: config[key] for key in cls.CONFIG_KEYS + cls.OPTION_KEYS if key in config})

    @classmethod
    def from_space(cls, space: spaces.Dict, **options: Any) -> APTPolicy:
        """A fresh policy sized for one sub-environment's observation space (what every new agent is built by).

        Args:
            space: a ``Dict`` with ``tokens`` (N, C), ``cls`` and ``stage`` ``Discrete(K)``.
            **options: the other constructor arguments; ``use_cls_attn`` defaults to whether the
                space has ``cls_attn``, ``use_budget`` to whether it has ``budget``.
        """
        missing = [key for key in ("tokens", "cls", "stage") if key not in space.spaces]
        if missing:
            raise ValueError(f"the APT policy needs observation keys {missing}; add them to the env's obs_keys")
        n, c = space["tokens"].shape
        options.setdefault("use_cls_attn", "cls_attn" in space.spaces)
        options.setdefault("use_budget", "budget" in space.spaces)
        check_budget_observed(bool(options["use_budget"]), "budget" in space.spaces, "space")
        if options.get("sampling") == "topk" and "keep_count" not in space.spaces:
            raise ValueError(TOPK_NEEDS_BUDGET)
        return cls(int(c), int(n), int(space["stage"].n), **options)

    @classmethod
    def for_env(cls, envs: Any, **options: Any) -> APTPolicy:
        """``from_space`` for a vector env (Gymnasium ``VectorEnv`` or SB3 ``VecEnv``).

        Args:
            envs: an env with ``single_observation_space`` (or an unbatched ``observation_space``).
            **options: the other constructor arguments.
        """
        space = getattr(envs, "single_observation_space", None)
        return cls.from_space(envs.observation_space if space is None else space, **options)

    def prepare(self, obs: Mapping[str, Any]) -> Batch:
        """Tensors on the policy's device from an env observation or an SB3-preprocessed one, checked against
        this policy's sizes and inputs (``agents.observation.read_batch``)."""
        return read_batch(
            obs,
            num_patches=self.num_patches,
            embed_dim=self.embed_dim,
            num_stages=self.num_stages,
            use_cls_attn=self.use_cls_attn,
            use_budget=self.use_budget,
            topk=self.sampling == "topk",
            device=self.stage_embed.weight.device,
        )

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
        weight, bias = self.keys_and_values()
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
        h = self._token_mlp(qk, base, None if o.cls_attn is None else live_rows(o.cls_attn))
        if self.mixer == "attention":
            h = h + self._mix(h, rows, cols, o.live)
        return h, (rows, cols), q

    def _token_mlp(self, qk: Tensor, base: Tensor, cls_attn: Tensor | None) -> Tensor:
        """The MLP's hidden features (M, H) of M tokens from ``q * k_i`` (M, D), fc1's share of ``v_i`` plus the row's
        stage and budget terms (M, H), and the class attention (M, 1) or None."""
        feats = [qk] if cls_attn is None else [qk, cls_attn * self.num_patches]
        h = torch.addmm(base, torch.cat(feats, -1), self.fc1.weight[:, self.qk_dim :].t())
        return self.act_fn(self.fc2(self.act_fn(h)))

    def row_term(self, stage: int, budget: float | None = None) -> Tensor:
        """What the hidden layer adds for every token of a row at ``stage`` under ``budget`` (H,): the stage
        embedding and the budget's projection."""
        term = self.stage_embed.weight[stage]
        if self.use_budget:
            if budget is None:
                raise ValueError("this policy reads a budget: pass one")
            term = term + self.budget_embed(term.new_tensor([budget]))
        return term

    def equal_count_logits(
        self,
        tokens: Tensor,
        cls: Tensor,
        cls_attn: Tensor | None,
        row_term: Tensor,
        positions: Tensor,
        keys_and_values: tuple[Tensor, Tensor],
    ) -> Tensor:
        """Keep logits (B, M) of rows that all hold M live tokens, given as they are, with no mask over the N
        positions: what ``keep_logits`` computes for them, in fewer ops (``agents.fused``). Only for
        ``mixer="none"``; a calibrated threshold is not subtracted (``thresholds_at``).

        Args:
            tokens: the live patch tokens (B, M, C); cls: the class token (B, C).
            cls_attn: the class attention over those tokens (B, M), or None for a policy that does not read it.
            row_term: ``row_term(stage, budget)`` (H,).
            positions: each token's original patch position (B, M) long, for the position prior.
            keys_and_values: ``keys_and_values()``, computed once by the caller (a compiled graph then holds no
                check of whether the weights changed).
        """
        if self.mixer != "none":
            raise ValueError("equal_count_logits is for a policy with mixer='none'")
        b, m, _ = tokens.shape
        weight, bias = keys_and_values
        k, h_v = F.linear(self.token_norm(tokens), weight, bias).split([self.qk_dim, self.hidden], dim=-1)
        q = self.q(self.cls_norm(cls))  # (B, D)
        qk = (k * q.unsqueeze(1)).view(b * m, self.qk_dim)
        base = (h_v + row_term).view(b * m, self.hidden)
        attn = None if cls_attn is None else cls_attn.reshape(b * m, 1)
        scores = self.logit_head(self._token_mlp(qk, base, attn)).view(b, m)
        if self._prior is not None:
            scores = scores + self._prior[positions].to(scores.dtype)
        return scores

    def keys_and_values(self) -> tuple[Tensor, Tensor]:
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
        """Keep logits (B, N) from the live tokens' hidden features (and the position prior), ``PRUNED_LOGIT``
        elsewhere."""
        scores = self.logit_head(h).squeeze(-1)
        if self._prior is not None:
            scores = scores + self._prior.index_select(0, index[1]).to(scores.dtype)
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
        return self._shifted(self._logits(h, index, o.live), o.budget, o.stage), value

    def keep_logits(self, obs: Mapping[str, Any]) -> Tensor:
        """The keep logits of ``forward`` without the value head: all that a decision needs."""
        o = self.prepare(obs)
        h, index, _ = self._hidden(o)
        return self._shifted(self._logits(h, index, o.live), o.budget, o.stage)

    @property
    def position_prior(self) -> float:
        """The weight of the ordered-dither prior on the logits (0: none); settable, e.g. on a loaded agent."""
        return self._position_prior

    @position_prior.setter
    def position_prior(self, value: float) -> None:
        weight = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"position_prior must be a finite weight >= 0, got {value!r}")
        side = math.isqrt(self.num_patches)
        if weight > 0 and side * side != self.num_patches:
            raise ValueError(f"position_prior needs a square grid of patches; this policy has {self.num_patches}")
        self._position_prior = weight
        prior = weight * (1 - 2 * dither_rank((side, side))) if weight > 0 else None
        self._prior = None if prior is None else prior.to(self.stage_embed.weight.device)

    @property
    def calibration(self) -> dict[str, Any] | None:
        """A ``"threshold"`` policy's calibrated thresholds (``agents.calibrate``), or None."""
        return self._calibration

    @calibration.setter
    def calibration(self, value: Mapping[str, Any] | None) -> None:
        self._calibration = check_calibration(value, self.sampling, self.use_budget, self.num_stages)
        self._thresholds = None  # (budgets, shifts) as tensors: built once, not at every decision
        if self._calibration is not None:
            budgets, shifts = self._calibration["budgets"], self._calibration["shifts"]
            shifts = torch.tensor(shifts, dtype=torch.float64)
            if shifts.dim() == 1:  # one threshold for every stage
                shifts = shifts.unsqueeze(1).expand(-1, self.num_stages)
            self._thresholds = (torch.tensor(budgets, dtype=torch.float64), shifts.contiguous())

    def thresholds_at(self, budget: float) -> Tensor:
        """The calibrated threshold of each stage at ``budget`` (K,) float64, interpolated as the decisions are."""
        if self._thresholds is None:
            raise ValueError("this policy has no calibrated thresholds (agents.calibrate)")
        knots, shifts = self._thresholds
        return interp(knots.new_tensor([budget]), knots, shifts)[0]

    def _shifted(self, logits: Tensor, budget: Tensor | None, stage: Tensor) -> Tensor:
        """With calibrated thresholds, the logits less each row's ``s(b, stage)`` (``budget``: (B, 1), ``stage``:
        (B,)): kept where positive."""
        if self._thresholds is None:
            return logits
        if self._thresholds[0].device != logits.device:  # moved once, where the policy runs
            self._thresholds = tuple(t.to(logits.device) for t in self._thresholds)
        knots, shifts = self._thresholds
        per_stage = interp(budget.reshape(-1).double(), knots, shifts)  # (B, K): every stage's row at each budget
        return logits - per_stage.gather(1, stage.reshape(-1, 1)).to(logits.dtype)

    def decision_flops(self, live: Tensor) -> Tensor:
        """The FLOPs of ``act`` per image (fvcore's convention: a multiply-add is one, LayerNorm five per
        element), from the live patch tokens at each stage (B, K): the network runs on the live tokens only,
        and a decision skips the value head.
        """
        c, d, h = self.embed_dim, self.qk_dim, self.hidden
        # its norm, keys and fc1's share of v_i (folded: C x (D + H)), q * k_i, the rest of fc1, fc2, the logit
        per_token = 5 * c + c * (d + h) + d + (d + int(self.use_cls_attn)) * h + h * h + h
        per_token += int(self.position_prior > 0)  # the prior's addition
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
        gumbel: Tensor | None = None,
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
            gumbel: with ``"topk"`` and ``deterministic=False``, this Gumbel noise (N,) or (B, N) in place of a
                fresh draw (``agents.distributions.gumbel_top_count``): one fixed draw is a deterministic rule.
        """
        if gumbel is not None and self.sampling != "topk":
            raise ValueError(f"a fixed Gumbel draw is for sampling='topk', not {self.sampling!r}")
        logits = self.keep_logits(obs)
        live = live_mask(obs, logits.device)
        if keep_ratio is not None:
            return top_k_live(logits, live, keep_ratio)
        if deterministic:
            return self.mode(logits, live, obs)
        if self.sampling == "topk":
            return gumbel_top_count(logits, live, keep_counts(obs, logits.device), generator, gumbel=gumbel)
        u = torch.rand(logits.shape, generator=generator, device=logits.device)
        return (u < torch.sigmoid(logits)) & live

    def mode(self, logits: Tensor, live: Tensor, obs: Mapping[str, Any]) -> Tensor:
        """The deterministic keep mask (B, N) bool for this policy's logits (B, N): the live tokens with the
        highest logits, as many as kept in expectation (``"bernoulli"``) or ``obs["keep_count"]`` (``"topk"``)."""
        if self.sampling == "topk":
            count = keep_counts(obs, logits.device)
            return top_count_live(logits, live, count.float()) & (count > 0).unsqueeze(1)
        if self.sampling == "threshold":  # the Bernoulli's mode, token by token: no count, no batch
            return (logits > 0) & live
        expected = (torch.sigmoid(logits) * live).sum(1)  # (B,)
        return top_count_live(logits, live, expected)


def check_calibration(
    calibration: Mapping[str, Any] | None, sampling: str, use_budget: bool, num_stages: int
) -> dict | None:
    """A threshold calibration, checked: only for ``"threshold"`` with a budget input, increasing budgets, and for
    each a finite shift, or one per stage (``num_stages`` of them)."""
    if calibration is None:
        return None
    if sampling != "threshold" or not use_budget:
        raise ValueError(
            f"a threshold calibration is for sampling='threshold' with use_budget=True, not sampling={sampling!r}, "
            f"use_budget={use_budget}"
        )
    budgets, shifts = list(calibration.get("budgets", [])), list(calibration.get("shifts", []))
    if not budgets or len(budgets) != len(shifts) or any(b >= a for b, a in zip(budgets, budgets[1:])):
        raise ValueError(f"a calibration needs increasing 'budgets' with one 'shift' each, got {dict(calibration)!r}")
    try:  # a number per budget, or a row of one per stage
        table = torch.tensor(shifts, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):  # ragged rows, or not numbers
        table = None
    if table is None or not (table.dim() == 1 or (table.dim() == 2 and table.shape[1] == num_stages)):
        raise ValueError(
            f"a calibration's shifts must be one number per budget or {num_stages} per budget (one per stage), "
            f"got {shifts}"
        )
    if not bool(torch.isfinite(table).all()):
        raise ValueError(f"a calibration's shifts must be finite, got {shifts}")
    return dict(calibration)
