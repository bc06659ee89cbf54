import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock

import apt_env.models.packed
from apt_env.models.packed import attention_groups, attention_length, packs, run_packed
from apt_env.models.tokens import additive_mask


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=5, **kwargs)


@pytest.mark.parametrize("kwargs", [{}, dict(init_values=0.1, qk_norm=True)], ids=["vit", "layerscale_qknorm"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "not_fused"])
@pytest.mark.parametrize(
    "counts",
    [[9, 2, 6, 4], [14, 2, 13, 5], [14, 2, 12, 5, 3, 9, 13, 4]],
    ids=["rows_of_9", "rows_of_14_attended_as_16", "in_groups_of_2_rows"],
)
def test_packed_blocks_give_each_row_what_timm_gives_it_alone(kwargs, fused, counts, monkeypatch):
    """Each row's live tokens come out as timm's blocks give that row run alone, cut to them, with no mask; slots
    not live come back untouched."""
    if len(counts) == 8:  # attention in groups of rows of similar count, however small the batch
        monkeypatch.setattr(apt_env.models.packed, "ATTENTION_GROUP_ROWS", 2)
        monkeypatch.setattr(apt_env.models.packed, "ATTENTION_GROUP_MIN_ELEMENTS", 1)
    blocks = _model(**kwargs).eval().blocks
    for blk in blocks:
        blk.attn.fused_attn = fused
    b, t, c = len(counts), max(counts), blocks[0].norm1.normalized_shape[0]
    x = torch.randn(b, t, c)
    live = torch.arange(t) < torch.tensor(counts).unsqueeze(1)  # live tokens first in each row, as a gathered batch
    with torch.no_grad():
        out = run_packed(blocks, x, live)
        for row, n in enumerate(counts):
            torch.testing.assert_close(out[row, :n], blocks(x[row : row + 1, :n])[0], atol=1e-5, rtol=1e-4)
            assert torch.equal(out[row, n:], x[row, n:])


@pytest.mark.parametrize("grouped", [False, True], ids=["one_group", "groups"])
def test_packed_gradients_reach_every_live_token_and_no_padding(grouped, monkeypatch):
    if grouped:
        monkeypatch.setattr(apt_env.models.packed, "ATTENTION_GROUP_ROWS", 1)
        monkeypatch.setattr(apt_env.models.packed, "ATTENTION_GROUP_MIN_ELEMENTS", 1)
    blocks = _model().train().blocks
    x = torch.randn(3, 7, blocks[0].norm1.normalized_shape[0], requires_grad=True)
    live = torch.arange(7) < torch.tensor([[7], [3], [5]])
    assert (attention_groups(blocks, live) is not None) == grouped
    out = run_packed(blocks, x, live)
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
        out = run_packed(blocks, x, live)
        padded = x
        for blk in blocks:
            padded = blk(padded, attn_mask=mask)
    assert out.dtype == padded.dtype
    torch.testing.assert_close(out[live], padded[live], atol=0.1, rtol=0.05)


def test_fused_attention_on_cpu_takes_rows_to_the_next_multiple_of_16_only_when_close():
    blocks = _model().blocks
    cpu = torch.device("cpu")
    expected = {11: 11, 12: 16, 15: 16, 16: 16, 17: 17, 27: 27, 28: 32, 31: 32, 32: 32}
    assert {n: attention_length(blocks, n, cpu) for n in expected} == expected
    assert attention_length(blocks, 15, torch.device("cuda")) == 15  # other kernels, other shapes
    for blk in blocks:
        blk.attn.fused_attn = False
    assert attention_length(blocks, 15, cpu) == 15  # timm's own matmuls: padding only costs


def test_only_a_large_batch_runs_its_attention_in_groups():
    blocks = _model().blocks  # width 192
    counts = torch.arange(64) % 40 + 10  # 10 to 49 live tokens a row, 3x that in rows of 160
    assert attention_groups(blocks, torch.arange(20) < (counts % 20 + 1).unsqueeze(1)) is None  # 0.25M elements
    assert attention_groups(blocks, (torch.arange(160) < (counts * 3).unsqueeze(1))[:16]) is None  # 16 rows
    groups = attention_groups(blocks, torch.arange(160) < (counts * 3).unsqueeze(1))  # 2M: 4 groups of 16 rows
    assert [len(rows) for rows, _ in groups] == [16] * 4
    assert [length for _, length in groups] == [int(counts[rows].max()) * 3 for rows, _ in groups]
