"""``PrunableViT``: any timm ViT run block by block under token keep masks.

This module and ``apt_env.models.packed`` are the only ones that know timm internals. It drives the pieces timm's own
forward pass uses (``patch_embed``, ``_pos_embed``, ``norm_pre``, ``blocks``, ``norm``, ``forward_head``) and
passes pruning to the blocks as an attention mask, so no attention code is forked.

Two modes give the same logits for the same masks:

* ``masked``: fixed shapes; pruned tokens stay in the sequence but are removed as attention keys
  (an additive 0 / -inf mask, which timm's fused and non-fused attention treat alike) and from
  pooling. Differentiable, for training.
* ``gathered``: pruned tokens are really removed; rows with different keep counts are padded to
  the batch maximum (padding masked as keys). For speed. timm's ``Block`` then runs everything but its attention
  on the live tokens alone (``packed``), restating ``Block.forward``'s sequence of timm's own modules.

Both modes can fuse the tokens a stage prunes into one token, as EViT does (``prune``'s ``fuse_attn``,
``forward(..., fuse=True)``). Token merging (ToMe, ``forward_merged``) merges tokens inside the blocks instead of
pruning them between blocks: the merge sits between a block's attention and its MLP, so that block runs its own
modules in ``Block.forward``'s order, the merge between its two residual lines; the operations on tokens are in
``apt_env.models.merging``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, ResPostBlock, VisionTransformer
from torch import nn

from apt_env.data.config import check_data_config, model_data_config
from apt_env.models.merging import (
    MergeState,
    bipartite_soft_matching,
    check_schedule,
    fuse_pruned,
    is_int,
    merge_tokens,
    weighted_mean,
)
from apt_env.models.packed import packs, run_packed
from apt_env.models.registry import vit_apt_tiny_patch4_28
from apt_env.models.tokens import (
    TokenState,
    additive_mask,
    append_fused,
    apply_keep_mask,
    gather_kept,
    initial_state,
    length_buckets,
    live_mean,
)

_logger = logging.getLogger(__name__)

Layout = Literal["masked", "gathered"]
LAYOUTS: tuple[str, ...] = ("masked", "gathered")
_POOLS = ("token", "avg", "max", "avgmax", "map")

# The default backbone: a small ViT for 28x28 gray images (Fashion-MNIST), 49 patch tokens; its configuration
# is in its registered name (apt_env/models/registry.py), so no kwargs are needed.
DEFAULT_MODEL_NAME = vit_apt_tiny_patch4_28.__name__
DEFAULT_MODEL_KWARGS: dict = {}


def default_prune_layers(depth: int, num_stages: int = 3) -> tuple[int, ...]:
    """Evenly spaced pruning points: (3, 6, 9) for depth 12, (1, 3, 4) for depth 6."""
    num_stages = min(num_stages, depth - 1)
    return tuple(sorted({depth * (k + 1) // (num_stages + 1) for k in range(num_stages)}))


class PrunableViT(nn.Module):
    """A timm Vision Transformer that prunes patch tokens before chosen blocks.

    Stage ``k`` starts before block ``prune_layers[k]``; its keep mask applies from that block on,
    combined with every earlier mask (a pruned token stays pruned). Prefix tokens (class,
    distillation, register) are always kept.

    Args:
        model: a timm ``VisionTransformer`` (or subclass: DeiT distilled, register tokens, average
            or attention pooling).
        prune_layers: block indices before which pruning happens, strictly increasing in
            ``[0, depth - 1]``; default three evenly spaced blocks. 0 prunes the embedded patches before any block
            (observed with the class attention block 0 is about to compute: ``attention_source``), so that budgets
            below the cost of the first block are reachable.
        min_keep: the least number of patch tokens a row keeps, in ``[0, num_patches]`` for a
            class-token classifier and ``[1, num_patches]`` for a model that pools its patch tokens.
            When a mask leaves a row fewer, the row keeps the tokens the mask kept plus those it
            dropped that were live before, lowest patch index first, until it has ``min_keep``.
        bucket_rows: in the gathered layout, a batch whose rows keep different numbers of tokens runs timm's ``Block``
            packed (``packed``); other blocks run in groups of about this many rows of similar length, each
            cut to its own longest row, when that saves enough padding (``tokens.length_buckets``).
        data_config: the model's preprocessing (``data_config``); default the model's own, ``model_data_config``
            of its timm ``pretrained_cfg`` without pretrained weights (``from_timm`` says when it loaded them).

    Attributes:
        data_config: the model's preprocessing, as timm's ``pretrained_cfg`` carries it on a timm model: timm's data
            config (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``) and
            ``preprocessing``, ``"apt_env"`` (``apt_env.data``'s transform with this ``mean`` and ``std``) or
            ``"timm"`` (timm's eval transform of pretrained weights). Checked when set (``check_data_config``);
            reading it gives a copy. ``apt_env.data.dataset_for`` builds data with it; checkpoints record it.
    """

    def __init__(
        self,
        model: nn.Module,
        prune_layers: Sequence[int] | None = None,
        min_keep: int = 1,
        bucket_rows: int = 32,
        data_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, VisionTransformer):
            raise ValueError(f"PrunableViT needs a timm VisionTransformer (or subclass), got {type(model).__name__}")
        if model.global_pool not in _POOLS:
            raise ValueError(f"global_pool={model.global_pool!r} is not supported; use one of {_POOLS}")
        if model.attn_pool is not None and getattr(model.attn_pool, "pos_embed", None) is not None:
            raise ValueError("attention pooling with its own position embedding cannot follow pruned tokens")
        for i, blk in enumerate(model.blocks):
            if "attn_mask" not in inspect.signature(blk.forward).parameters:
                raise ValueError(f"block {i} ({type(blk).__name__}) takes no attn_mask; cannot prune it")
        if len(model.blocks) < 2:
            raise ValueError(
                f"cannot prune a model of {len(model.blocks)} block(s): stages prune before blocks 1 to depth-1"
            )
        if not is_int(bucket_rows) or bucket_rows < 1:
            raise ValueError(f"bucket_rows must be a positive integer (rows per length bucket), got {bucket_rows!r}")
        self.model = model
        self.depth = len(model.blocks)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.num_patches = int(model.patch_embed.num_patches)
        self.grid_size = tuple(model.patch_embed.grid_size)
        self.img_size = tuple(model.patch_embed.img_size)
        self.in_chans = int(model.patch_embed.proj.in_channels)
        self.embed_dim = int(model.embed_dim)
        self.num_classes = int(model.num_classes)
        self.prune_layers = self._check_prune_layers(prune_layers)
        self.min_keep = self._check_min_keep(min_keep)
        self.bucket_rows = int(bucket_rows)
        # What from_timm built, so a checkpoint can rebuild the model; None/{} for a given module.
        self.timm_name: str | None = None
        self.timm_kwargs: dict = {}
        if data_config is None:
            data_config = model_data_config(getattr(model, "pretrained_cfg", {}), input_size=self.input_size,
                                            pretrained=False)  # fmt: skip
        self.data_config = data_config

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(in_chans, height, width)`` of the images the model takes, as timm's data config states it."""
        return (self.in_chans, *self.img_size)

    @property
    def data_config(self) -> dict[str, Any]:
        return dict(self._data_config)  # a copy: a change goes through the setter's checks

    @data_config.setter
    def data_config(self, config: Mapping[str, Any]) -> None:
        self._data_config = check_data_config(config, input_size=self.input_size)

    @classmethod
    def from_timm(
        cls,
        name: str = DEFAULT_MODEL_NAME,
        *,
        prune_layers: Sequence[int] | None = None,
        min_keep: int = 1,
        bucket_rows: int = 32,
        pretrained: bool = False,
        **timm_kwargs,
    ) -> PrunableViT:
        """Build with ``timm.create_model(name, pretrained=pretrained, **timm_kwargs)``."""
        if not isinstance(name, str) or not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:10] if isinstance(name, str) else []
            raise ValueError(f"unknown timm model {name!r}; similar names: {close}")
        try:
            model = timm.create_model(name, pretrained=pretrained, **timm_kwargs)
        except Exception as err:  # timm asserts sizes (embed_dim % num_heads), indexes img_size, looks names up
            raise ValueError(f"timm cannot build {name!r} with {timm_kwargs}: {type(err).__name__}: {err}") from err
        pv = cls(model, prune_layers=prune_layers, min_keep=min_keep, bucket_rows=bucket_rows)
        if pretrained:  # timm's preprocessing of its weights, at the size and channels the model runs with
            pv.data_config = model_data_config(model.pretrained_cfg, input_size=pv.input_size, pretrained=True)
        pv.timm_name, pv.timm_kwargs = name, dict(timm_kwargs)
        return pv

    def with_pruning(self, *, prune_layers: Sequence[int] | None = None, min_keep: int | None = None) -> PrunableViT:
        """The same timm model (shared weights, data config) with other pruning points or ``min_keep``, checked as
        by the constructor; ``None`` keeps this model's value."""
        pv = type(self)(
            self.model,
            prune_layers=self.prune_layers if prune_layers is None else prune_layers,
            min_keep=self.min_keep if min_keep is None else min_keep,
            bucket_rows=self.bucket_rows,
            data_config=self._data_config,
        )
        pv.timm_name, pv.timm_kwargs = self.timm_name, dict(self.timm_kwargs)
        return pv.train(self.training)

    def _check_prune_layers(self, prune_layers: Sequence[int] | None) -> tuple[int, ...]:
        if prune_layers is None:
            return default_prune_layers(self.depth)
        valid = f"strictly increasing block indices in [0, {self.depth - 1}] (the model has {self.depth} blocks)"
        try:
            layers = tuple(prune_layers)
        except TypeError:
            layers = ()
        if (
            not layers
            or not all(is_int(i) for i in layers)
            or any(b <= a for a, b in zip(layers, layers[1:]))
            or not 0 <= layers[0] <= layers[-1] < self.depth
        ):
            raise ValueError(f"prune_layers must be {valid}, got {prune_layers!r}")
        return tuple(int(i) for i in layers)

    def _check_min_keep(self, min_keep: int) -> int:
        m = self.model
        # Pooling over patch tokens needs one of them; a class-token classifier can drop them all.
        low = 0 if m.cls_token is not None and m.global_pool == "token" else 1
        if not is_int(min_keep) or not low <= min_keep <= self.num_patches:
            why = "" if low == 0 else f", at least 1 as global_pool={m.global_pool!r} pools the patch tokens"
            raise ValueError(
                f"min_keep must be an integer in [{low}, {self.num_patches}] (patch tokens per image{why}), "
                f"got {min_keep!r}"
            )
        return int(min_keep)

    @property
    def num_stages(self) -> int:
        return len(self.prune_layers)

    @property
    def stage_bounds(self) -> tuple[int, ...]:
        """Block ranges: the prefix runs ``[0, bounds[1])``, stage ``k`` runs ``[bounds[k + 1], bounds[k + 2])``."""
        return (0, *self.prune_layers, self.depth)

    # -- pieces ---------------------------------------------------------------------------------

    def embed(self, images: torch.Tensor) -> TokenState:
        """Patch embedding, prefix tokens and position embedding, as timm's ``forward_features``.

        timm's ``PatchDropout`` is not applied: pruning takes its place.
        """
        self.check_images(images)
        m = self.model
        x = m.norm_pre(m._pos_embed(m.patch_embed(images)))  # (B, P + N, C)
        return initial_state(x, self.num_prefix_tokens)

    def run_blocks(self, state: TokenState, start: int, end: int) -> TokenState:
        """Run blocks ``[start, end)`` with pruned tokens removed as attention keys."""
        return self._in_buckets(state, start, end, lambda part: (self._run(part, start, end), None))[0]

    def _in_buckets(
        self,
        state: TokenState,
        start: int,
        end: int,
        run: Callable[[TokenState], tuple[torch.Tensor, torch.Tensor | None]],
    ) -> tuple[TokenState, torch.Tensor | None]:
        """``run(part) -> (x, extra)`` for blocks ``[start, end)`` on the whole batch, or, for a gathered batch whose
        rows keep different numbers of tokens and blocks that do not run packed (``packed``), on groups of
        rows of similar length, each cut to its own longest row (``length_buckets``), put back in the batch's order.
        ``extra`` (rows first) or None.

        Each group's output is written into its rows of a new batch by ``index_put_``, differentiable, so
        training runs in groups too."""
        buckets = None
        if state.packed and not packs(self.model.blocks[start:end]) and not bool(state.live.all()):
            buckets = length_buckets(state.num_kept(), state.x.shape[0] // self.bucket_rows, state.num_prefix_tokens)
        if buckets is None:
            x, extra = run(state)
            return state.with_x(x), extra
        order = torch.cat([rows for rows, _ in buckets])
        # Rows already in order of count (e.g. a batch sorted by budget) are cut by a split, not copied by an index.
        in_order = bool((order == torch.arange(len(order), device=order.device)).all())
        if in_order:
            pieces = state.x.split([len(rows) for rows, _ in buckets])
        else:
            pieces = tuple(state.x[rows] for rows, _ in buckets)
        outs = [run(state.rows(rows, kept, x=piece)) for (rows, kept), piece in zip(buckets, pieces)]
        # In the blocks' output dtype (autocast); padding slots are not live: any finite value.
        x = outs[0][0].new_zeros(state.x.shape[0], state.x.shape[1], outs[0][0].shape[-1])
        for (rows, _), (out, _) in zip(buckets, outs):
            # Written straight into its rows and first slots: one copy, differentiable.
            x.index_put_((rows.unsqueeze(1), torch.arange(out.shape[1], device=x.device)), out)
        extra = None if outs[0][1] is None else torch.cat([extra for _, extra in outs])
        if extra is not None and not in_order:
            extra = extra.index_select(0, order.argsort())
        return state.with_x(x), extra

    def _run(self, state: TokenState, start: int, end: int, *, grouped: bool = True) -> torch.Tensor:
        """Blocks ``[start, end)`` on ``state``'s tokens: a gathered batch with padding runs packed where the blocks
        allow (``packed``, its attention in groups of rows where ``grouped`` and large enough), else every slot
        runs and pruned ones are masked as keys."""
        blocks, x = self.model.blocks[start:end], state.x
        key_mask = state.key_mask()
        if key_mask is not None and state.packed and packs(blocks):
            return run_packed(blocks, x, key_mask[:, 0, 0], grouped=grouped)
        attn_mask = None if key_mask is None else additive_mask(key_mask, x.dtype)
        for blk in blocks:
            x = blk(x) if attn_mask is None else blk(x, attn_mask=attn_mask)
        return x

    def prune(
        self, state: TokenState, mask: torch.Tensor, layout: Layout = "masked", *, fuse_attn: torch.Tensor | None = None
    ) -> TokenState:
        """Apply a keep mask over the N original patch positions. # mask: (B, N) bool

        Args:
            state: the tokens entering the stage.
            mask: True for the patch positions to keep; a pruned token stays pruned. # (B, N) bool
            layout: ``masked`` or ``gathered`` (the same logits).
            fuse_attn: EViT's fused token: the class attention of the block before at the original positions (the
                ``cls_attn`` observation). When given, the tokens this mask prunes are summed, weighted by it, into
                one more token that goes on through the blocks (``merging.fuse_pruned``): its weights sum to
                the pruned tokens' attention. It is never pruned, is left out of pooling, and is not added where no
                row prunes anything (a row that prunes nothing gets an empty one, masked as a key). Taken from
                ``advance_to_stage``, the weights carry no gradient. # (B, N) float
        """
        self.check_mask(mask, batch_size=state.x.shape[0])
        pruned = apply_keep_mask(state, mask.to(state.x.device), self.min_keep)
        if fuse_attn is not None:
            pruned = self._fuse(state, pruned, fuse_attn)
        return gather_kept(pruned) if layout == "gathered" else pruned

    def _fuse(self, before: TokenState, after: TokenState, attn: torch.Tensor) -> TokenState:
        """``after`` with the tokens live in ``before`` and not in ``after`` fused into one token, weighted by the
        class attention ``attn`` (B, N) at the original positions."""
        expected = (before.x.shape[0], self.num_patches)
        if not isinstance(attn, torch.Tensor) or tuple(attn.shape) != expected or not attn.is_floating_point():
            got = f"{attn.dtype} {tuple(attn.shape)}" if isinstance(attn, torch.Tensor) else type(attn).__name__
            raise ValueError(f"fuse_attn must be the class attention, a float tensor {expected}, got {got}")
        dropped = before.live & ~after.live  # (B, L)
        if not bool(dropped.any()):  # nothing pruned: no token added, the pass stays the model's own
            return after
        weight = attn.to(before.x.device).gather(1, before.index) * dropped  # (B, L)
        return append_fused(after, fuse_pruned(before.patches, weight), dropped.any(dim=1))

    def head(self, state: TokenState) -> torch.Tensor:
        """Final norm, pooling over live patch tokens (fused tokens left out) and the classifier. # (B, num_classes)"""
        m = self.model
        state = state.without_fused()
        x = m.norm(state.x)
        if m.global_pool == "token" or bool(state.live.all()):
            return m.forward_head(x)
        live = state.live
        if m.pool_include_prefix:
            live = torch.cat([live.new_ones(live.shape[0], self.num_prefix_tokens), live], dim=1)
        else:
            x = x[:, self.num_prefix_tokens :]
        if m.attn_pool is not None:
            pooled = m.attn_pool(x, attn_mask=additive_mask(live[:, None, None, :], x.dtype))
        else:
            pooled = _masked_pool(x, live, m.global_pool)
        return m.head(m.head_drop(m.fc_norm(pooled)))

    def finish(self, state: TokenState, start: int) -> torch.Tensor:
        """Logits of finishing the forward pass from block ``start`` with no further pruning."""
        return self.head(self.run_blocks(state, start, self.depth))

    def cls_attention(self, state: TokenState, block: int) -> torch.Tensor:
        """Attention of the class token to each patch in ``block``, mean over heads, computed apart from the block.

        ``state`` is the input of that block. Models without a class token use the mean of the
        live patch tokens as the query. Only the key projection and one query are computed.
        ``advance_to_stage`` reads the same attention from the block's own ``qkv`` at almost no cost.

        Returns:
            attention weights at the original patch positions, pruned positions 0. # (B, N)
        """
        blk = self.model.blocks[block]
        attn = blk.attn
        if not hasattr(attn, "qkv"):
            raise ValueError(f"block {block} attention ({type(attn).__name__}) has no qkv projection")
        x = state.x if isinstance(blk, ResPostBlock) else blk.norm1(state.x)
        a = attn.qkv.out_features // 3
        w, bias = attn.qkv.weight, attn.qkv.bias
        k = F.linear(x, w[a : 2 * a], None if bias is None else bias[a : 2 * a])
        if self.has_cls_token:
            xq = x[:, :1]
        else:
            xq = live_mean(x[:, state.num_prefix_tokens :], state.live).unsqueeze(1)
        q = F.linear(xq, w[:a], None if bias is None else bias[:a])
        return self._attention_row(attn, q, k, state)

    def _attention_row(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, state: TokenState) -> torch.Tensor:
        """The class query's attention over the keys, mean over heads, at the original patch positions (B, N).

        ``q`` (B, 1, A) and ``k`` (B, T, A) are the projections before the heads' ``q_norm`` / ``k_norm``."""
        b, t, a = k.shape
        h = attn.num_heads
        q = attn.q_norm(q.reshape(b, 1, h, a // h).transpose(1, 2))  # (B, H, 1, D)
        if isinstance(attn.k_norm, nn.Identity):
            # Each head's query on its own slice of the keys' width (a block-diagonal (B, H, A) query): one batched
            # product that reads the keys in place, a strided slice of qkv, instead of copying them head-major.
            eye = torch.eye(h, dtype=q.dtype, device=q.device).reshape(1, h, h, 1)
            scores = torch.bmm((q * eye).reshape(b, h, a), k.transpose(1, 2)).unsqueeze(2) * attn.scale
        else:
            k = attn.k_norm(k.reshape(b, t, h, a // h).transpose(1, 2))  # (B, H, T, D)
            scores = (q @ k.transpose(-2, -1)) * attn.scale  # (B, H, 1, T)
        probs = _class_attention(scores, state.key_mask())[:, state.num_prefix_tokens :]  # (B, L)
        probs = probs * state.live.to(probs.dtype)
        return probs.new_zeros(b, self.num_patches).scatter(1, state.index, probs)

    @property
    def has_cls_token(self) -> bool:
        """Whether the model has a class token (else its class query is the patch tokens' mean)."""
        return self.model.cls_token is not None

    def dense_blocks(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """timm's blocks ``[start, end)`` on a plain batch ``x`` (B, T, C): nothing masked, padded or gathered, every
        token of every row live (a static-shape walk, or a batch cut to given lengths)."""
        return self.model.blocks[start:end](x)

    def dense_head(self, x: torch.Tensor) -> torch.Tensor:
        """timm's final norm, pooling and classifier on a plain batch ``x`` (B, T, C), every token live."""
        return self.model.forward_head(self.model.norm(x))

    def runs_block_with_cls_attention(self, block: int) -> bool:
        """Whether ``block_with_cls_attention`` can run ``block``: timm's ``Block`` with its ``Attention`` (no gate)."""
        blk = self.model.blocks[block]
        return type(blk) is Block and type(blk.attn) is Attention and blk.attn.gate is None

    def block_with_cls_attention(self, block: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's ``Block`` ``block`` on a plain batch ``x`` (B, T, C), nothing pruned or padded, and the class
        query's attention over its patch tokens, mean over heads (B, T - P), from the same ``qkv`` (without a class
        token the query is the patch queries' mean): the static-shape walk of ``agents.fused``, which compiles whole.
        The block's own modules in ``Block.forward``'s order, as ``packed`` runs them (LayerScale, qk-norm and the
        attention's norm included), the attention by torch's ``scaled_dot_product_attention``."""
        blk = self.model.blocks[block]
        attn, (b, t, _) = blk.attn, x.shape
        q, k, v = self._static_qkv(block, x)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, attn.attn_dim)
        x = x + blk.drop_path1(blk.ls1(attn.proj_drop(attn.proj(attn.norm(out)))))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))), self._static_cls_row(block, q, k)

    def cls_attention_before(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """The class query's attention over the patch tokens (B, T - P) that ``block`` is about to compute on a plain
        batch ``x`` (B, T, C), without running the block: a stage before block 0 on the static-shape walk."""
        q, k, _ = self._static_qkv(block, x)
        return self._static_cls_row(block, q, k)

    def _static_qkv(self, block: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``block``'s queries and keys (after qk-norm) and values on a plain batch, each (B, H, T, D)."""
        if not self.runs_block_with_cls_attention(block):
            raise ValueError(f"block {block} is not timm's Block with its Attention: it has no static-shape walk")
        blk = self.model.blocks[block]
        attn, (b, t, _) = blk.attn, x.shape
        qkv = attn.qkv(blk.norm1(x)).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def _static_cls_row(self, block: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The class query's attention over the patch tokens (B, T - P) from ``_static_qkv``'s queries and keys."""
        p = self.num_prefix_tokens
        query = q[:, :, :1] if self.has_cls_token else q[:, :, p:].mean(2, keepdim=True)  # (B, H, 1, D)
        return _class_attention((query @ k.transpose(-2, -1)) * self.model.blocks[block].attn.scale, None)[:, p:]

    def reads_attention_from_qkv(self, block: int) -> bool:
        """Whether ``advance_to_stage`` takes ``block``'s class attention from the block's own ``qkv`` output
        (timm's ``Attention``, whose forward calls its ``qkv`` module), not from a second key projection."""
        attn = self.model.blocks[block].attn
        return type(attn) is Attention and type(attn.qkv) is nn.Linear

    def _run_reading_attention(self, state: TokenState, block: int) -> tuple[TokenState, torch.Tensor]:
        """Run ``block`` on ``state`` and read its class attention from the ``qkv`` output it computes anyway."""
        attn = self.model.blocks[block].attn

        def run(part: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
            rows: list[torch.Tensor] = []

            # Read in the hook, while the block holds qkv anyway: kept until the block ends, its (B, T, 3A) output
            # would stay allocated through the MLP and cost fresh memory there.
            def read(module: nn.Module, args: Any, qkv: torch.Tensor) -> None:
                a = qkv.shape[-1] // 3
                qkv = qkv[:, : part.x.shape[1]]  # the slots of the part, without padding added for the attention
                with torch.no_grad():
                    if self.has_cls_token:
                        q = qkv[:, :1, :a]
                    else:  # the query of the live patches' mean: the projection is affine, so their queries' mean
                        q = live_mean(qkv[:, part.num_prefix_tokens :, :a], part.live).unsqueeze(1)
                    rows.append(self._attention_row(attn, q, qkv[..., a : 2 * a], part))

            handle = attn.qkv.register_forward_hook(read)
            try:
                x = self._run(part, block, block + 1, grouped=False)  # one attention call, the rows in order
            finally:
                handle.remove()
            return x, rows[0]

        state, probs = self._in_buckets(state, block, block + 1, run)
        assert probs is not None
        return state, probs

    def advance_to_stage(
        self, state: TokenState, stage: int, *, take_attn: bool
    ) -> tuple[TokenState, torch.Tensor | None]:
        """Run from where stage ``stage - 1`` pruned (the embedding for stage 0) to the input of stage ``stage``.

        The one walk between pruning points that the env, joint training and evaluation share: blocks
        ``[stage_bounds[stage], prune_layers[stage])``, with the class attention of the last of them taken on
        the way when ``take_attn`` (else None): from that block's own query and key projections where
        ``reads_attention_from_qkv``, else by ``cls_attention``. The attention is an observation: it carries
        no gradient.

        Returns:
            the tokens entering block ``prune_layers[stage]``, and their class attention (B, N) or None.
        """
        start, end = self.stage_bounds[stage], self.stage_bounds[stage + 1]
        if not take_attn:
            return self.run_blocks(state, start, end), None
        block, from_qkv = self.attention_source(stage)
        state = self.run_blocks(state, start, block)  # block is end - 1, or 0 (= end) before block 0
        if from_qkv:
            return self._run_reading_attention(state, block)
        with torch.no_grad():
            attn = self.cls_attention(state, block)
        return self.run_blocks(state, block, end), attn

    def attention_source(self, stage: int) -> tuple[int, bool]:
        """The block whose class attention stage ``stage`` observes, and whether it is read from that block's own
        ``qkv`` as the block runs (``reads_attention_from_qkv``). The last block before the stage; for a stage
        before block 0 (``prune_layers[0] == 0``), block 0's attention over the embedded tokens, computed apart by
        ``cls_attention`` before the block runs (what block 0 is about to attend to)."""
        layer = self.prune_layers[stage]
        if layer == 0:
            return 0, False
        return layer - 1, self.reads_attention_from_qkv(layer - 1)

    # -- whole pass -----------------------------------------------------------------------------

    def forward(
        self,
        images: torch.Tensor,
        keep_masks: Sequence[torch.Tensor] | None = None,
        layout: Layout = "masked",
        *,
        fuse: bool = False,
    ) -> torch.Tensor:
        """Logits, pruning with ``keep_masks[k]`` (B, N) bool at stage ``k``; fewer masks prune fewer stages.

        Args:
            images: (B, C, H, W), as ``input_size``.
            keep_masks: one keep mask per stage, at most ``num_stages``.
            layout: ``masked`` or ``gathered`` (the same logits).
            fuse: EViT's fused token: at each stage the tokens pruned there are fused into one token, weighted by
                the class attention of the block before (``prune``'s ``fuse_attn``).
        """
        try:
            keep_masks = [] if keep_masks is None else list(keep_masks)
        except TypeError:
            raise ValueError(
                f"keep_masks must be a sequence of (B, N) bool masks, not {type(keep_masks).__name__}"
            ) from None
        if len(keep_masks) > self.num_stages:
            raise ValueError(f"got {len(keep_masks)} keep masks for {self.num_stages} pruning stages")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        bounds = self.stage_bounds
        state = self.embed(images)
        for k, mask in enumerate(keep_masks):
            state, attn = self.advance_to_stage(state, k, take_attn=fuse)
            state = self.prune(state, mask, layout, fuse_attn=attn)
        return self.finish(state, bounds[len(keep_masks)])

    # -- token merging (ToMe) -------------------------------------------------------------------

    def merge_schedule(self, schedule: int | Sequence[int]) -> tuple[int, ...]:
        """The tokens ToMe merges in each block, checked (``merging.check_schedule``): ``r`` for every block
        or one per block; each at most half of the patch tokens its block has. A block that merges must be timm's
        ``Block`` or ``ResPostBlock`` with timm's ``Attention``."""
        rs = check_schedule(schedule, self.depth, self.num_patches)
        for block, r in enumerate(rs):
            if r:
                self._check_mergeable(block)
        return rs

    def _check_mergeable(self, block: int) -> None:
        blk = self.model.blocks[block]
        if type(blk) not in (Block, ResPostBlock) or not isinstance(blk.attn, Attention):
            raise ValueError(
                f"block {block} ({type(blk).__name__}, attention {type(blk.attn).__name__}) cannot merge tokens: "
                "merging runs in timm's Block and ResPostBlock with timm's Attention; set its r to 0"
            )

    def forward_merged(
        self, images: torch.Tensor, schedule: int | Sequence[int], *, prop_attn: bool = True
    ) -> torch.Tensor:
        """Logits of ToMe: block ``i`` merges ``schedule[i]`` patch tokens between its attention and its MLP.

        With ``r = 0`` in every block this is the dense model exactly.

        Args:
            images: (B, C, H, W), as ``input_size``.
            schedule: ``r`` for every block, or one ``r`` per block (``merge_schedule``).
            prop_attn: proportional attention: each key's ``log(size)`` added to the attention logits.
        """
        rs = self.merge_schedule(schedule)
        state = MergeState(self.embed(images).x, self.num_prefix_tokens)
        for block, r in enumerate(rs):
            state = self.merge_block(state, block, r, prop_attn=prop_attn)
        return self.merged_head(state)

    def merge_block(self, state: MergeState, block: int, r: int, *, prop_attn: bool = True) -> MergeState:
        """Run ``block``, merging ``r`` patch tokens after its attention (ToMe).

        The block's own modules run in timm's order: ``x + ls1(attn(norm1(x)))`` (``ResPostBlock``:
        ``x + norm1(attn(x))``), then the merge, then ``x + ls2(mlp(norm2(x)))`` (``x + norm2(mlp(x))``). The
        matching reads the keys the attention computes (the output of its ``k_norm``, after any qk-norm), averaged
        over heads (``apt_env.models.merging.bipartite_soft_matching``); the merge is a mean weighted by the tokens'
        sizes (``merge_tokens``). A block with ``r = 0`` runs as timm's ``blk(x)``.

        Args:
            state: the tokens entering the block and their sizes.
            block: the block's index.
            r: patch tokens to merge, at most half of those the block has (``merge_schedule`` checks a schedule).
            prop_attn: add each key's ``log(size)`` to the attention logits (nothing while no token was merged).
        """
        blk = self.model.blocks[block]
        bias = state.attn_bias() if prop_attn else None
        if r == 0:
            return replace(state, x=blk(state.x) if bias is None else blk(state.x, attn_mask=bias))
        self._check_mergeable(block)
        keys: list[torch.Tensor] = []

        def read(module: nn.Module, args: Any, k: torch.Tensor) -> None:
            keys.append(k)

        handle = blk.attn.k_norm.register_forward_hook(read)
        try:
            x = state.x
            if type(blk) is ResPostBlock:
                x = x + blk.drop_path1(blk.norm1(blk.attn(x, attn_mask=bias)))
            else:
                x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x), attn_mask=bias)))
        finally:
            handle.remove()
        k = keys[0] if len(keys) == 1 else None
        if k is None or k.ndim != 4 or k.shape[1] != blk.attn.num_heads or k.shape[2] != x.shape[1]:
            raise ValueError(f"block {block}'s attention did not give its keys as (B, heads, tokens, head_dim)")
        p = state.num_prefix_tokens
        matching = bipartite_soft_matching(k.mean(dim=1)[:, p:], r)
        x, size = merge_tokens(x, state.sizes(), matching, p)
        if type(blk) is ResPostBlock:
            x = x + blk.drop_path2(blk.norm2(blk.mlp(x)))
        else:
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return MergeState(x, p, size)

    def merged_head(self, state: MergeState) -> torch.Tensor:
        """Final norm, pooling and the classifier on merged tokens: average pooling weighted by size, attention
        pooling with each token's ``log(size)`` added to its logits (a token counts as the tokens it merged, with
        or without proportional attention in the blocks); timm's own head while nothing was merged.
        # (B, num_classes)"""
        m = self.model
        x = m.norm(state.x)
        if state.size is None or m.global_pool == "token":
            return m.forward_head(x)
        size = state.size
        if not m.pool_include_prefix:
            x, size = x[:, state.num_prefix_tokens :], size[:, state.num_prefix_tokens :]
        if m.attn_pool is not None:
            pooled = m.attn_pool(x, attn_mask=size.log().to(x.dtype)[:, None, None, :])
        else:
            pooled = _weighted_pool(x, size, m.global_pool)
        return m.head(m.head_drop(m.fc_norm(pooled)))

    # -- input checks ---------------------------------------------------------------------------

    def check_images(self, images: torch.Tensor) -> None:
        expected = (self.in_chans, *self.img_size)
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor (B, {', '.join(map(str, expected))}), got {got}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point, got {images.dtype}")
        if images.layout != torch.strided or images.shape[0] == 0:
            raise ValueError(
                f"images must be a dense tensor of one image or more, got {images.layout} {tuple(images.shape)}"
            )
        weight = self.model.patch_embed.proj.weight
        if images.device != weight.device:
            raise ValueError(f"images are on {images.device}, the model on {weight.device}: move one of them")
        if images.dtype != weight.dtype and not torch.is_autocast_enabled(images.device.type):
            raise ValueError(f"images are {images.dtype}, the model {weight.dtype}: pass images.to({weight.dtype})")

    def check_mask(self, mask: torch.Tensor, batch_size: int) -> None:
        expected = (batch_size, self.num_patches)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != expected:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"keep mask must be a bool tensor of shape {expected} (batch, patches), got {got}")
        if mask.dtype != torch.bool:
            raise ValueError(f"keep mask must have dtype torch.bool, got {mask.dtype}")
        if mask.layout != torch.strided or mask.is_meta:
            raise ValueError(f"keep mask must be a dense tensor with data, got layout {mask.layout} on {mask.device}")


def _class_attention(scores: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """The class query's attention: its scores over the keys (B, H, 1, T) with masked keys out, softmax over keys,
    mean over heads (B, T). The one form every reading of the class attention ends in."""
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)[:, 0]


def _weighted_pool(x: torch.Tensor, size: torch.Tensor, pool: str) -> torch.Tensor:
    """timm's ``global_pool_nlc`` with each token counted ``size`` times. # x: (B, T, C), size: (B, T) -> (B, C)"""
    if pool == "max":
        return x.amax(1)
    mean = weighted_mean(x, size)
    return mean if pool == "avg" else 0.5 * (x.amax(1) + mean)


def _masked_pool(x: torch.Tensor, live: torch.Tensor, pool: str) -> torch.Tensor:
    """timm's ``global_pool_nlc`` over live tokens only. # x: (B, T, C), live: (B, T) -> (B, C)"""
    mean = live_mean(x, live)
    if pool == "avg":
        return mean
    peak = x.masked_fill(~live.unsqueeze(-1), float("-inf")).amax(1)
    return peak if pool == "max" else 0.5 * (peak + mean)
