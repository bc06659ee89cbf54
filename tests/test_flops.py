"""FlopCounter against fvcore on tiny timm ViTs, dense and pruned, plus its tensor interface."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from fvcore.nn import FlopCountAnalysis
from timm.models.vision_transformer import ParallelScalingBlock
from torch import nn

from apt_env.models.flops import FlopCounter

# FlopCounter follows fvcore's convention term by term, so the counts agree exactly; any looser tolerance
# would hide small terms (a distillation head or the 'map' pool's attention are ~1e-5 of the total).
REL_TOL = 1e-9
TINY = dict(img_size=64, patch_size=8, depth=6, num_classes=10)  # 64 patches, attention ~5% of flops
SPECS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "reg4": ("vit_tiny_patch16_224", dict(reg_tokens=4, no_embed_class=True)),
    "avg": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
    "map": ("vit_tiny_patch16_224", dict(global_pool="map")),
}
# fvcore ops whose absence from the unsupported list proves no matmul went uncounted.
COUNTED_OPS = ("matmul", "mm", "linear", "conv", "einsum", "scaled_dot_product")


@functools.cache
def _model(key: str) -> nn.Module:
    name, kwargs = SPECS[key]
    model = timm.create_model(name, pretrained=False, **TINY, **kwargs).eval()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # explicit q @ k^T and attn @ v, which fvcore counts
    return model


def _fvcore_per_sample(module: nn.Module, x: torch.Tensor) -> float:
    analysis = FlopCountAnalysis(module, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    total = analysis.total() / x.shape[0]
    hidden = [op for op in analysis.unsupported_ops() if any(word in op for word in COUNTED_OPS)]
    assert not hidden, f"fvcore skipped {hidden}: its total would miss those flops"
    return total


def _input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *model.patch_embed.img_size)


class _PrunedViT(nn.Module):
    """Runs ``model`` keeping the prefix tokens plus the first ``keep[i]`` patch tokens before block i."""

    def __init__(self, model: nn.Module, keep: dict[int, int]) -> None:
        super().__init__()
        self.model = model
        self.keep = keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.norm_pre(m._pos_embed(m.patch_embed(x)))  # (B, N, C)
        for i, blk in enumerate(m.blocks):
            if i in self.keep:
                x = x[:, : m.num_prefix_tokens + self.keep[i]]
            x = blk(x)
        return m.forward_head(m.norm(x))


@pytest.mark.parametrize("key", list(SPECS))
def test_dense_matches_fvcore(key: str) -> None:
    model = _model(key)
    expected = _fvcore_per_sample(model, _input(model))
    assert FlopCounter(model).dense() == pytest.approx(expected, rel=REL_TOL)


@pytest.mark.parametrize("key", list(SPECS))
def test_pruned_matches_fvcore(key: str) -> None:
    model = _model(key)
    counter = FlopCounter(model)
    prefix, patches = model.num_prefix_tokens, counter.num_patches
    keep = {2: patches // 2, 4: patches // 5}
    pruned = _PrunedViT(model, keep)
    expected = _fvcore_per_sample(pruned, _input(model))

    per_block, kept = [], patches
    for i in range(counter.depth):
        kept = keep.get(i, kept)
        per_block.append(prefix + kept)
    got = float(counter(torch.tensor(per_block)))
    assert got == pytest.approx(expected, rel=REL_TOL)
    assert got < 0.8 * counter.dense()


def test_batched_matches_rows() -> None:
    counter = FlopCounter(_model("reg4"))
    low, high = counter.num_prefix_tokens, counter.num_prefix_tokens + counter.num_patches
    tokens = torch.randint(low, high + 1, (2, 3, counter.depth), generator=torch.Generator().manual_seed(0))
    batched = counter(tokens)
    assert batched.shape == (2, 3)
    assert batched.dtype == torch.float64
    rows = torch.stack([counter(row) for row in tokens.reshape(-1, counter.depth)]).reshape(2, 3)
    torch.testing.assert_close(batched, rows, rtol=0, atol=0)
    assert len(set(batched.flatten().tolist())) > 1


def test_more_tokens_more_flops() -> None:
    counter = FlopCounter(_model("vit"))
    base = torch.full((counter.depth,), counter.num_prefix_tokens + 10)
    for i in range(counter.depth):
        more = base.clone()
        more[i] += 1
        assert counter(more) > counter(base)
    assert counter(base) < counter.dense()


def test_attention_term_is_quadratic() -> None:
    model = _model("vit")
    counter = FlopCounter(model)
    n = torch.full((3, counter.depth), 20)
    n[:, 0] = torch.tensor([19, 20, 21])
    f = counter(n)
    attn_dim = model.blocks[0].attn.num_heads * model.blocks[0].attn.head_dim
    # second difference of b * n^2 is 2b, with b = 2 * attn_dim (q @ k^T and attn @ v)
    assert float(f[0] + f[2] - 2 * f[1]) == 4 * attn_dim


def test_wrong_depth_raises() -> None:
    counter = FlopCounter(_model("vit"))
    with pytest.raises(ValueError, match=f"depth={counter.depth}"):
        counter(torch.full((4, counter.depth + 1), 10))
    with pytest.raises(ValueError, match="integer"):
        counter(torch.full((counter.depth,), 10.0))


def test_unknown_block_raises() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, block_fn=ParallelScalingBlock, **TINY)
    with pytest.raises(ValueError, match="ParallelScalingBlock"):
        FlopCounter(model)
