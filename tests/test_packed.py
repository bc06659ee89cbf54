import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock

from apt_env.packed import packs, run_packed
from apt_env.tokens import additive_mask


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=5, **kwargs)


@pytest.mark.parametrize("kwargs", [{}, dict(init_values=0.1, qk_norm=True)], ids=["vit", "layerscale_qknorm"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "not_fused"])
def test_packed_blocks_give_each_row_what_timm_gives_it_alone(kwargs, fused):
    """Each row's live tokens come out as timm's blocks give that row run alone, cut to them, with no mask; slots
    not live come back untouched."""
    blocks = _model(**kwargs).eval().blocks
    for blk in blocks:
        blk.attn.fused_attn = fused
    b, t, c = 4, 9, blocks[0].norm1.normalized_shape[0]
    x = torch.randn(b, t, c)
    counts = [9, 2, 6, 4]  # live tokens first in each row, as a gathered batch
    live = torch.arange(t) < torch.tensor(counts).unsqueeze(1)
    with torch.no_grad():
        out = run_packed(blocks, x, live, additive_mask(live[:, None, None, :], x.dtype))
        for row, n in enumerate(counts):
            torch.testing.assert_close(out[row, :n], blocks(x[row : row + 1, :n])[0], atol=1e-5, rtol=1e-4)
            assert torch.equal(out[row, n:], x[row, n:])


def test_packed_gradients_reach_every_live_token_and_no_padding():
    blocks = _model().train().blocks
    x = torch.randn(3, 7, blocks[0].norm1.normalized_shape[0], requires_grad=True)
    live = torch.arange(7) < torch.tensor([[7], [3], [5]])
    out = run_packed(blocks, x, live, additive_mask(live[:, None, None, :], x.dtype))
    (out * live.unsqueeze(-1)).square().sum().backward()
    assert (x.grad.abs().sum(-1) > 0).equal(live)


def test_only_timm_blocks_without_active_stochastic_depth_run_packed():
    assert packs(_model().blocks)
    assert not packs(_model(block_fn=ResPostBlock).blocks)
    dropping = _model(drop_path_rate=0.1).blocks
    assert packs(dropping.eval()) and not packs(dropping.train())  # DropPath drops whole rows: only while training


def test_packed_blocks_run_under_bf16_autocast_as_the_padded_path():
    blocks = _model().eval().blocks
    x = torch.randn(3, 7, blocks[0].norm1.normalized_shape[0]).to(torch.bfloat16)
    live = torch.arange(7) < torch.tensor([[7], [3], [5]])
    mask = additive_mask(live[:, None, None, :], torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_packed(blocks, x, live, mask)
        padded = x
        for blk in blocks:
            padded = blk(padded, attn_mask=mask)
    assert out.dtype == padded.dtype
    torch.testing.assert_close(out[live], padded[live], atol=0.1, rtol=0.05)
