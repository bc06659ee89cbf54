"""Analytic per-sample FLOPs of a timm VisionTransformer from the token count entering each block.

Convention: fvcore's, which is also what papers quote as GFLOPs for ViT/DeiT (DeiT-S: 4.6): one
multiply-add is one flop. Counted, as fvcore counts them:

- convolutions and ``nn.Linear`` layers: one flop per weight per output position (bias ignored);
- the two attention matmuls, ``q @ k^T`` and ``attn @ v``: ``n * n * head_dim`` each, per head;
- ``LayerNorm``: 5 flops per element (4 without an affine weight).

Not counted, as in fvcore: elementwise ops (residual adds, activations, softmax, the attention scale,
LayerScale, position embeddings) and pooling reductions (``mean``/``amax``).

With ``n_i`` the tokens entering block ``i`` (prefix tokens included), the cost is

    constant (patch embedding, ``norm_pre``, head) + sum_i (a_i * n_i + b_i * n_i ** 2)
    + c * n_last (final norm and any per-token pooling, on the tokens leaving the last block),

where ``n_last`` is the count entering the last block (a block does not change the token count).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence

import torch
from timm.layers import AttentionPoolLatent, LayerScale
from torch import nn

from apt_env.models.merging import check_schedule, merged_counts

_logger = logging.getLogger(__name__)

MERGE_BUDGET_TOLERANCE = 0.02
"""How near a budget ``FlopCounter.merge_schedule`` must bring ToMe's backbone FLOPs, relative to the budget."""

# Pool types after which one vector per sample reaches fc_norm and the head.
_REDUCING_POOLS = ("token", "avg", "max", "avgmax")


def _norm_flops(norm: nn.Module, where: str) -> int:
    """Flops of a norm applied to one vector of its normalized shape.

    Args:
        norm: ``nn.LayerNorm`` (timm's subclasses included) or ``nn.Identity``.
        where: module path, for the error message.
    """
    if isinstance(norm, nn.Identity):
        return 0
    if isinstance(norm, nn.LayerNorm):
        return (5 if norm.weight is not None else 4) * math.prod(norm.normalized_shape)
    raise ValueError(
        f"{where} is a {type(norm).__name__}; FlopCounter counts only nn.LayerNorm (and subclasses) "
        "or nn.Identity norms. Add its fvcore-equivalent count to apt_env/models/flops.py to support it."
    )


def _linear_flops(linear: nn.Module | None, where: str) -> int:
    """Flops of a linear layer applied to one token (``in_features * out_features``).

    Args:
        linear: ``nn.Linear``; ``nn.Identity`` or ``None`` (absent optional layer) count 0.
        where: module path, for the error message.
    """
    if linear is None or isinstance(linear, nn.Identity):
        return 0
    if isinstance(linear, nn.Linear):
        return linear.in_features * linear.out_features
    raise ValueError(f"{where} is a {type(linear).__name__}, expected nn.Linear or nn.Identity.")


def _per_token_flops(module: nn.Module, where: str) -> int:
    """Flops per token of a module made only of per-token Linear layers and norms (an MLP).

    Args:
        module: e.g. timm ``Mlp``, ``GluMlp`` or ``SwiGLU``; every parameterised submodule must be
            an ``nn.Linear`` or a norm over its own feature width.
        where: module path, for the error message.
    """
    flops = 0
    for name, sub in module.named_modules():
        if not any(True for _ in sub.parameters(recurse=False)):
            continue
        path = f"{where}.{name}" if name else where
        if isinstance(sub, nn.Linear):
            flops += _linear_flops(sub, path)
        else:
            flops += _norm_flops(sub, path)
    return flops


def _check_all_counted(module: nn.Module, counted: set[nn.Module], where: str) -> None:
    """Raise if ``module`` holds parameters in a submodule the count did not cover.

    Args:
        module: the block (or pool) that was counted.
        counted: submodules whose flops were added (LayerScale is elementwise and free by convention).
        where: module path, for the error message.
    """
    for name, sub in module.named_modules():
        if sub in counted or isinstance(sub, LayerScale):
            continue
        if any(True for _ in sub.parameters(recurse=False)):
            raise ValueError(
                f"{where}: parameterised submodule {name or '<self>'!r} ({type(sub).__name__}) of "
                f"{type(module).__name__} is not understood by FlopCounter; its flops would be missed."
            )


def _block_flops(block: nn.Module, where: str) -> tuple[int, int, int]:
    """Linear and quadratic flop coefficients of one transformer block.

    Args:
        block: a timm ``Block``-like module: ``norm1``, ``attn`` (``qkv``, ``proj``, ``num_heads``,
            ``head_dim``, optional ``q_norm``/``k_norm``/``norm``/``gate``), ``norm2``, ``mlp``.
        where: module path, for the error message.

    Returns:
        ``(a, m, b)`` such that the block costs ``a * n + b * n ** 2`` flops on ``n`` tokens, ``m`` of ``a`` per
        token in its MLP half (``norm2`` and ``mlp``), the part that runs after a ToMe merge.
    """
    attn = getattr(block, "attn", None)
    mlp = getattr(block, "mlp", None)
    qkv = getattr(attn, "qkv", None)
    proj = getattr(attn, "proj", None)
    if (
        not isinstance(qkv, nn.Linear)
        or not isinstance(proj, nn.Linear)
        or not hasattr(attn, "num_heads")
        or not hasattr(attn, "head_dim")
        or mlp is None
        or not hasattr(block, "norm1")
        or not hasattr(block, "norm2")
    ):
        raise ValueError(
            f"{where} is a {type(block).__name__} (attn: {type(attn).__name__}); FlopCounter expects a "
            "timm Block with norm1, attn.qkv (nn.Linear), attn.proj, attn.num_heads, attn.head_dim, norm2 "
            "and mlp."
        )
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    attn_dim = heads * head_dim
    if qkv.out_features != 3 * attn_dim:
        raise ValueError(
            f"{where}.attn.qkv has out_features={qkv.out_features}, expected 3 * num_heads * head_dim = "
            f"{3 * attn_dim}; FlopCounter does not understand this attention layout."
        )
    q_norm = getattr(attn, "q_norm", nn.Identity())
    k_norm = getattr(attn, "k_norm", nn.Identity())
    attn_norm = getattr(attn, "norm", nn.Identity())
    gate = getattr(attn, "gate", None)
    mlp_linear = _norm_flops(block.norm2, f"{where}.norm2") + _per_token_flops(mlp, f"{where}.mlp")
    linear = (
        _norm_flops(block.norm1, f"{where}.norm1")
        + _linear_flops(qkv, f"{where}.attn.qkv")
        + _linear_flops(gate, f"{where}.attn.gate")
        # q_norm / k_norm normalise each head_dim slice: num_heads applications per token.
        + heads * _norm_flops(q_norm, f"{where}.attn.q_norm")
        + heads * _norm_flops(k_norm, f"{where}.attn.k_norm")
        + _norm_flops(attn_norm, f"{where}.attn.norm")
        + _linear_flops(proj, f"{where}.attn.proj")
        + mlp_linear
    )
    quadratic = 2 * attn_dim  # q @ k^T and attn @ v, each n * n * head_dim per head
    counted = {block.norm1, qkv, q_norm, k_norm, attn_norm, proj, block.norm2, *mlp.modules()}
    if gate is not None:
        counted.add(gate)
    _check_all_counted(block, counted, where)
    return linear, mlp_linear, quadratic


def _attn_pool_flops(pool: nn.Module, where: str) -> tuple[int, int, int]:
    """Flops of timm's ``AttentionPoolLatent`` ('map' pooling).

    Args:
        pool: the model's ``attn_pool``.
        where: module path, for the error message.

    Returns:
        ``(per_input_token, constant, out_vectors)``: cost is ``per_input_token * n + constant`` for
        ``n`` input tokens, and ``out_vectors`` vectors per sample go on to ``fc_norm`` and the head.
    """
    if not isinstance(pool, AttentionPoolLatent):
        raise ValueError(
            f"{where} is a {type(pool).__name__}; FlopCounter supports only AttentionPoolLatent ('map'). "
            "Use global_pool='token' or 'avg', or add its count to apt_env/models/flops.py."
        )
    if pool.pos_embed is not None:
        raise ValueError(f"{where} has a fixed-length pos_embed, so it cannot take a pruned token count.")
    heads, head_dim, latent_len = int(pool.num_heads), int(pool.head_dim), int(pool.latent_len)
    per_input_token = (
        _linear_flops(pool.kv, f"{where}.kv")
        + heads * _norm_flops(pool.k_norm, f"{where}.k_norm")
        + 2 * latent_len * heads * head_dim  # q @ k^T and attn @ v
    )
    counted = {pool.q, pool.kv, pool.q_norm, pool.k_norm, pool.proj, pool.norm}
    constant = latent_len * (
        _linear_flops(pool.q, f"{where}.q")
        + heads * _norm_flops(pool.q_norm, f"{where}.q_norm")
        + _linear_flops(pool.proj, f"{where}.proj")
    )
    if pool.mlp is not None:
        constant += latent_len * (_norm_flops(pool.norm, f"{where}.norm") + _per_token_flops(pool.mlp, f"{where}.mlp"))
        counted.update(pool.mlp.modules())
    _check_all_counted(pool, counted | {pool}, where)  # pool's own parameter is the latent query
    out_vectors = 1 if pool.pool in ("token", "avg") else latent_len
    return per_input_token, constant, out_vectors


class FlopCounter:
    """Analytic per-sample FLOPs of a timm ViT from the token count entering each block.

    Everything is read from the model at construction (dims, heads, MLP widths, norms, prefix tokens,
    patch grid); the model is not kept. See the module docstring for the counting convention.

    Args:
        model: a timm ``VisionTransformer`` (or subclass: DeiT distilled, register tokens, avg or 'map'
            pooling) with a convolutional patch embedding and LayerNorm norms.
    """

    def __init__(self, model: nn.Module) -> None:
        pe = getattr(model, "patch_embed", None)
        proj = getattr(pe, "proj", None)
        if not isinstance(proj, nn.Conv2d):
            raise ValueError(
                f"model.patch_embed.proj is a {type(proj).__name__}, expected nn.Conv2d (timm PatchEmbed); "
                "hybrid backbones are not supported by FlopCounter."
            )
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.num_patches = int(pe.num_patches)
        self.depth = len(model.blocks)
        prefix = self.num_prefix_tokens

        # Conv: one flop per weight per output position (fvcore ignores the bias).
        constant = self.num_patches * proj.out_channels * math.prod(proj.weight.shape[1:])
        constant += self.num_patches * _norm_flops(pe.norm, "patch_embed.norm")
        constant += (prefix + self.num_patches) * _norm_flops(model.norm_pre, "norm_pre")

        coeffs = [_block_flops(blk, f"blocks[{i}]") for i, blk in enumerate(model.blocks)]
        final = _norm_flops(model.norm, "norm")  # per token leaving the last block

        fc_norm = _norm_flops(model.fc_norm, "fc_norm")
        head = _linear_flops(model.head, "head")
        head_dist = getattr(model, "head_dist", None)
        attn_pool = getattr(model, "attn_pool", None)
        if head_dist is not None:
            # VisionTransformerDistilled.forward_head: head on x[:, 0], head_dist on x[:, 1], no fc_norm.
            constant += head + _linear_flops(head_dist, "head_dist")
        elif attn_pool is not None:
            per_token, pool_constant, out_vectors = _attn_pool_flops(attn_pool, "attn_pool")
            final += per_token
            if not getattr(model, "pool_include_prefix", False):
                constant -= prefix * per_token  # the pool sees only the n_last - prefix patch tokens
            constant += pool_constant + out_vectors * (fc_norm + head)
        elif model.global_pool in _REDUCING_POOLS:
            constant += fc_norm + head
        elif not model.global_pool:
            final += fc_norm + head  # no pooling: fc_norm and head run on every token
        else:
            raise ValueError(f"model.global_pool={model.global_pool!r} is not understood by FlopCounter.")

        self._linear = torch.tensor([a for a, _, _ in coeffs], dtype=torch.float64)
        self._mlp_linear = [float(m) for _, m, _ in coeffs]
        self._quadratic = torch.tensor([b for _, _, b in coeffs], dtype=torch.float64)
        self._head_dims = [int(blk.attn.head_dim) for blk in model.blocks]
        self._final = float(final)
        self._constant = float(constant)
        _logger.debug(
            "FlopCounter: depth=%d prefix=%d patches=%d dense=%.4g GFLOPs",
            self.depth,
            prefix,
            self.num_patches,
            self.dense() / 1e9,
        )

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-sample FLOPs for the given per-block token counts.

        Args:
            tokens: integer tensor ``(..., depth)``: tokens entering each block, prefix tokens included.

        Returns:
            float64 tensor ``(...,)`` of FLOPs, on ``tokens.device``.
        """
        if tokens.ndim == 0 or tokens.shape[-1] != self.depth:
            raise ValueError(
                f"tokens must have shape (..., depth={self.depth}) with one count per block, "
                f"got shape {tuple(tokens.shape)}."
            )
        if tokens.is_floating_point() or tokens.is_complex():
            raise ValueError(f"tokens must be an integer tensor of counts, got dtype {tokens.dtype}.")
        n = tokens.to(torch.float64)  # (..., depth)
        linear = self._linear.to(n.device)
        quadratic = self._quadratic.to(n.device)
        blocks = (n * (linear + n * quadratic)).sum(-1)  # (...,)
        return blocks + self._final * n[..., -1] + self._constant

    def dense(self) -> float:
        """FLOPs per sample with every token kept (``num_prefix_tokens + num_patches`` at every block)."""
        full = torch.full((self.depth,), self.num_prefix_tokens + self.num_patches, dtype=torch.long)
        return float(self(full))

    def merged(self, schedule: int | Sequence[int]) -> tuple[float, float]:
        """FLOPs per sample of ToMe (``PrunableViT.forward_merged``) merging ``schedule[i]`` patch tokens in block
        ``i``: the backbone's and the matching's, ``(backbone, matching)``.

        Block ``i`` runs its attention half on the tokens entering it and its MLP half (``norm2``, ``mlp``) on those
        left after its merge; the final norm and pooling run on the tokens leaving the last block. The matching is
        the merging policy's own cost: in each block that merges, the cosine similarities of set A's keys (averaged
        over heads) with set B's, one matmul of ``ceil(L / 2) * floor(L / 2) * head_dim`` on ``L`` patch tokens.
        The head mean, the normalisation, the sort and the weighted merge are reductions or elementwise, free by
        fvcore's convention, as is the proportional attention's ``log(size)``.

        Args:
            schedule: ``r`` for every block or one per block, checked as ``apt_env.models.merging.check_schedule``.
        """
        rs = check_schedule(schedule, self.depth, self.num_patches)
        counts = merged_counts(self.num_patches, rs)
        p = self.num_prefix_tokens
        backbone, matching = self._constant + self._final * (p + counts[-1]), 0.0
        for i, r in enumerate(rs):
            n, left = p + counts[i], p + counts[i + 1]
            linear, quadratic, mlp = float(self._linear[i]), float(self._quadratic[i]), self._mlp_linear[i]
            backbone += (linear - mlp) * n + quadratic * n * n + mlp * left
            if r:
                matching += (counts[i] - counts[i] // 2) * (counts[i] // 2) * self._head_dims[i]
        return backbone, matching

    def merge_schedule(self, budget: float, *, tolerance: float = MERGE_BUDGET_TOLERANCE) -> tuple[int, ...]:
        """The ToMe schedule whose backbone FLOPs (``merged``) are nearest ``budget`` times the dense model's.

        ToMe's constant ``r``, made fractional to reach any budget: ``m`` merges spread evenly over the blocks,
        block ``i`` merging ``floor((i + 1) m / depth) - floor(i m / depth)`` tokens (``r = m / depth`` on average,
        the extra ones in the later blocks first), each at most half of the patch tokens its block has, as ToMe
        clamps ``r``. Every ``m`` from 0 (dense) to merging half of the tokens in every block is tried; the
        nearest wins, the fewest merges on a tie. The matching's cost is not part of the match: it is the
        policy's (``merged``).

        Args:
            budget: a fraction of the dense backbone's FLOPs, in (0, 1].
            tolerance: the largest gap allowed between the schedule's fraction and ``budget``, relative to ``budget``.

        Raises:
            ValueError: a budget outside (0, 1], one below the least that merging half of the tokens in every block
                reaches, or one that no schedule of the family reaches within ``tolerance`` (each with the limit).
        """
        if not isinstance(budget, numbers.Real) or not 0.0 < budget <= 1.0:
            raise ValueError(f"a budget is a fraction of the dense GFLOPs in (0, 1], got {budget!r}")
        dense = self.dense()
        best: tuple[float, tuple[int, ...]] | None = None
        for m in range(self.depth * (self.num_patches // 2) + 1):
            rs, length = [], self.num_patches
            for i in range(self.depth):
                r = min((i + 1) * m // self.depth - i * m // self.depth, length // 2)
                rs.append(r)
                length -= r
            gap = abs(self.merged(rs)[0] / dense - budget)
            if best is None or gap < best[0]:
                best = (gap, tuple(rs))
        assert best is not None
        gap, rs = best
        if gap > tolerance * budget:
            halves, length = [], self.num_patches
            for _ in range(self.depth):
                halves.append(length // 2)
                length -= length // 2
            lowest = self.merged(halves)[0] / dense
            if budget < lowest:
                raise ValueError(
                    f"budget {budget:g} is below what ToMe reaches on this model: merging half of the patch tokens "
                    f"in every block leaves {lowest:.4g} of the dense GFLOPs"
                )
            raise ValueError(
                f"no ToMe schedule reaches budget {budget:g} within {tolerance:.0%}: the nearest, {list(rs)}, gives "
                f"{self.merged(rs)[0] / dense:.4g} of the dense GFLOPs"
            )
        return rs


def cls_attention_flops(model: nn.Module, block: int, *, from_qkv: bool = False) -> tuple[int, int]:
    """Flops of reading the class token's attention in ``block``.

    Apart from the block (``PrunableViT.cls_attention``) it recomputes ``norm1`` and the key third of ``qkv``
    on every token, one query, and one row of ``q @ k^T`` per head. ``from_qkv``: read from the block's own
    ``qkv`` output (``PrunableViT.advance_to_stage``), only the heads' key and query norms and the row of
    ``q @ k^T`` are extra (and, without a class token, the mean of the queries). Softmax and the head mean
    are free by convention.

    Returns:
        ``(per_token, constant)``: the cost is ``per_token * n + constant`` on ``n`` tokens (prefix included).
    """
    blk = model.blocks[block]
    qkv, where = blk.attn.qkv, f"blocks[{block}]"
    attn_dim = qkv.out_features // 3
    heads = blk.attn.num_heads
    k_norm = heads * _norm_flops(blk.attn.k_norm, f"{where}.attn.k_norm")
    q_norm = heads * _norm_flops(blk.attn.q_norm, f"{where}.attn.q_norm")
    if from_qkv:
        mean_query = attn_dim if getattr(model, "cls_token", None) is None else 0
        return k_norm + attn_dim + mean_query, q_norm
    norm = _norm_flops(blk.norm1, f"{where}.norm1")
    key = qkv.in_features * attn_dim + k_norm
    query = qkv.in_features * attn_dim + q_norm
    return norm + key + attn_dim, query
