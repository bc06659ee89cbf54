import pytest
import timm
import torch

from apt_env.models.backbone import DEFAULT_MODEL_KWARGS, DEFAULT_MODEL_NAME, PrunableViT, default_prune_layers

# Small versions of the ViT families that pruning must handle, each at a small img_size.
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=4, no_embed_class=True)),
    "avg_pool": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg", fc_norm=True)),
    "map_pool": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="map")),
    "layerscale_qknorm": ("vit_tiny_patch16_224", dict(init_values=0.1, qk_norm=True)),
}


def _build(family: str, **extra) -> PrunableViT:
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    return PrunableViT.from_timm(name, img_size=32, patch_size=8, depth=4, num_classes=7, **kwargs, **extra).eval()


def _masks(pv: PrunableViT, batch: int, ratios=(0.8, 0.5, 0.3), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, pv.num_patches, generator=g) < r for r in ratios[: pv.num_stages]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unpruned_matches_timm(family):
    pv = _build(family)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pv(x), pv.model(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(pv(x, layout="gathered"), pv.model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_masked_and_gathered_agree_with_varying_counts(family):
    pv = _build(family)
    x = torch.randn(6, 3, 32, 32)
    masks = _masks(pv, 6)
    assert len({int(m.sum()) for m in masks[0]}) > 1, "counts must differ inside the batch"
    with torch.no_grad():
        masked, gathered = pv(x, masks, layout="masked"), pv(x, masks, layout="gathered")
    torch.testing.assert_close(masked, gathered, atol=1e-5, rtol=1e-4)
    # Pruning really changes the prediction (the masks are not ignored).
    assert (masked - pv(x)).abs().max() > 1e-3


def test_pruned_equals_dense_model_on_kept_tokens():
    """Gathered pruning at stage 0 is exactly the same model run on a shorter sequence."""
    pv = _build("vit")
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, pv.num_patches, dtype=torch.bool)
    mask[:, [1, 4, 6, 9]] = True
    m = pv.model
    with torch.no_grad():
        tokens = m._pos_embed(m.patch_embed(x))
        p = pv.num_prefix_tokens
        b0 = pv.prune_layers[0]
        tokens = m.blocks[:b0](tokens)
        short = torch.cat([tokens[:, :p], tokens[:, p:][:, [1, 4, 6, 9]]], dim=1)
        expected = m.forward_head(m.norm(m.blocks[b0:](short)))
        torch.testing.assert_close(pv(x, [mask], layout="gathered"), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(pv(x, [mask], layout="masked"), expected, atol=1e-5, rtol=0)


def test_pruned_token_stays_pruned():
    pv = _build("vit")
    x = torch.randn(2, 3, 32, 32)
    first = torch.ones(2, pv.num_patches, dtype=torch.bool)
    first[:, :8] = False
    revive = torch.ones_like(first)  # asks to keep everything, including the pruned tokens
    with torch.no_grad():
        state = pv.prune(pv.embed(x), first)
        state = pv.prune(state, revive)
    assert not state.mask(pv.num_patches)[:, :8].any()
    assert state.num_kept().tolist() == [pv.num_patches - 8] * 2


@pytest.mark.parametrize("layout", ["masked", "gathered"])
def test_all_zero_mask_keeps_min_keep_first_tokens(layout):
    pv = _build("avg_pool", min_keep=3)
    x = torch.randn(2, 3, 32, 32)
    none = torch.zeros(2, pv.num_patches, dtype=torch.bool)
    with torch.no_grad():
        state = pv.prune(pv.embed(x), none, layout=layout)
        logits = pv.finish(state, pv.prune_layers[0])
    assert state.num_kept().tolist() == [3, 3]
    assert state.mask(pv.num_patches)[:, :3].all()  # the first live tokens in raster order
    assert torch.isfinite(logits).all()


def test_cls_attention_matches_timm_attention_probs():
    pv = _build("layerscale_qknorm")
    blk = pv.model.blocks[2]
    blk.attn.fused_attn = False  # expose the probabilities through attn_drop
    seen = {}
    blk.attn.attn_drop.register_forward_hook(lambda mod, inp, out: seen.setdefault("p", out))
    x = torch.randn(2, 3, 32, 32)
    mask = _masks(pv, 2)[0]
    with torch.no_grad():
        state = pv.prune(pv.run_blocks(pv.embed(x), 0, 1), mask, layout="gathered")
        state = pv.run_blocks(state, 1, 2)
        ours = pv.cls_attention(state, 2)
        pv.run_blocks(state, 2, 3)
    probs = seen["p"].mean(1)[:, 0, pv.num_prefix_tokens :] * state.live  # (B, L) over slots
    expected = torch.zeros(2, pv.num_patches).scatter(1, state.index, probs)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    assert (ours[~mask] == 0).all()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("layout", ["masked", "gathered"])
def test_the_walk_reads_the_class_attention_from_the_blocks_own_qkv(family, layout):
    """``advance_to_stage`` reads the attention from the projections the block computes anyway: the same
    values as the separate computation, the same tokens as a walk without it, and far fewer FLOPs."""
    from apt_env.models.flops import FlopCounter, cls_attention_flops

    pv = _build(family, bucket_rows=4)  # several length buckets at batch 12
    x = torch.randn(12, 3, 32, 32)
    ratios = torch.linspace(0.2, 1, 12)[:, None]
    mask = torch.rand(12, pv.num_patches, generator=torch.Generator().manual_seed(0)) < ratios
    bounds = pv.stage_bounds
    with torch.no_grad():
        state, attn0 = pv.advance_to_stage(pv.embed(x), 0, take_attn=True)
        state = pv.prune(state, mask, layout)
        ours_state, ours = pv.advance_to_stage(state, 1, take_attn=True)
        plain_state, none = pv.advance_to_stage(state, 1, take_attn=False)
        apart = pv.cls_attention(pv.run_blocks(state, bounds[1], bounds[2] - 1), bounds[2] - 1)
    assert pv.reads_attention_from_qkv(bounds[2] - 1) and none is None
    torch.testing.assert_close(ours, apart, atol=1e-6, rtol=1e-5)
    live = torch.cat([torch.ones(12, pv.num_prefix_tokens, dtype=torch.bool), state.live], 1)  # padding is dead
    torch.testing.assert_close(ours_state.x[live], plain_state.x[live], atol=1e-5, rtol=1e-4)
    assert (ours[~mask] == 0).all() and (ours[mask] > 0).all() and (attn0 > 0).all()
    hooked = cls_attention_flops(pv.model, bounds[2] - 1, from_qkv=True)
    separate = cls_attention_flops(pv.model, bounds[2] - 1)
    block = FlopCounter(pv.model).dense() / pv.depth
    assert hooked[0] * 20 < separate[0] and hooked[0] * (pv.num_patches + 1) < block / 100


@pytest.mark.parametrize("grouped", [False, True], ids=["one_group", "groups"])
def test_the_walk_reads_the_class_attention_where_packed_rows_are_padded_for_the_attention(grouped, monkeypatch):
    """Packed rows whose attention runs padded to 16 slots (15 long: a prefix token and at most 14 patches), and with
    groups allowed: the class attention read from ``qkv`` and the tokens are those of masked mode."""
    import apt_env.models.packed

    if grouped:
        monkeypatch.setattr(apt_env.models.packed, "ATTENTION_GROUP_ROWS", 2)
        monkeypatch.setattr(apt_env.models.packed, "ATTENTION_GROUP_MIN_ELEMENTS", 1)
    pv = _build("vit")
    x = torch.randn(8, 3, 32, 32)
    rank = torch.rand(8, pv.num_patches, generator=torch.Generator().manual_seed(0)).argsort(1).argsort(1)
    mask = rank < torch.tensor([[14], [3], [13], [6], [14], [9], [2], [11]])
    seen = {}
    with torch.no_grad():
        for layout in ("masked", "gathered"):
            state = pv.prune(pv.advance_to_stage(pv.embed(x), 0, take_attn=False)[0], mask, layout)
            state, attn = pv.advance_to_stage(state, 1, take_attn=True)
            seen[layout] = (attn, pv.finish(state, pv.stage_bounds[2]))
    assert apt_env.models.packed.attention_length(pv.model.blocks, 15, x.device) == 16
    torch.testing.assert_close(seen["gathered"][0], seen["masked"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(seen["gathered"][1], seen["masked"][1], atol=1e-5, rtol=1e-4)


def test_default_prune_layers_read_depth():
    assert default_prune_layers(12) == (3, 6, 9)
    assert default_prune_layers(4) == (1, 2, 3)
    pv = PrunableViT.from_timm(DEFAULT_MODEL_NAME, **DEFAULT_MODEL_KWARGS)
    assert pv.num_patches == 49 and pv.num_prefix_tokens == 1 and pv.depth == 6


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.randn(2, 1, 32, 32), r"\(B, 3, 32, 32\)"),
        (torch.randn(2, 3, 28, 28), r"\(B, 3, 32, 32\)"),
        (torch.randn(3, 32, 32), r"\(B, 3, 32, 32\)"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "floating point"),
    ],
)
def test_bad_images_are_clear_errors(images, match):
    with pytest.raises(ValueError, match=match):
        _build("vit")(images)


def test_bad_masks_are_clear_errors():
    pv = _build("vit")
    x = torch.randn(2, 3, 32, 32)
    n = pv.num_patches
    with pytest.raises(ValueError, match=rf"\(2, {n}\)"):
        pv(x, [torch.ones(2, n + 1, dtype=torch.bool)])
    with pytest.raises(ValueError, match=rf"\(2, {n}\)"):
        pv(x, [torch.ones(3, n, dtype=torch.bool)])
    with pytest.raises(ValueError, match="torch.bool"):
        pv(x, [torch.ones(2, n)])
    with pytest.raises(ValueError, match="3 pruning stages"):
        pv(x, [torch.ones(2, n, dtype=torch.bool)] * 4)
    with pytest.raises(ValueError, match="layout"):
        pv(x, layout="sparse")


def test_bad_construction_is_clear_error():
    with pytest.raises(ValueError, match="unknown timm model"):
        PrunableViT.from_timm("vit_tiny_patch99")
    with pytest.raises(ValueError, match="VisionTransformer"):
        PrunableViT(timm.create_model("resnet18"))
    with pytest.raises(ValueError, match="strictly increasing"):
        _build("vit", prune_layers=(2, 1))
    with pytest.raises(ValueError, match="strictly increasing"):
        _build("vit", prune_layers=(-1, 2))
    with pytest.raises(ValueError, match="min_keep"):
        _build("avg_pool", min_keep=0)


@pytest.mark.parametrize("family", ["vit", "avg_pool"])
@pytest.mark.parametrize("rows", ["in order of count", "shuffled"])
@pytest.mark.parametrize("path", ["packed", "buckets"])
def test_gathered_varying_counts_agree_with_masked_in_values_and_gradients(family, rows, path):
    """Rows of very different counts run packed (timm's ``Block``) or in groups of rows (any other block, here
    ``ResPostBlock``), with and without gradients (training runs them too); rows already in order of count are
    split into groups, not indexed."""
    from timm.models.vision_transformer import ResPostBlock

    from apt_env.models.packed import packs
    from apt_env.models.tokens import length_buckets

    pv = _build(family, bucket_rows=8, **({} if path == "packed" else {"block_fn": ResPostBlock}))
    assert packs(pv.model.blocks) == (path == "packed")
    x = torch.randn(40, 3, 32, 32)
    g = torch.Generator().manual_seed(1)
    rank = torch.rand(40, pv.num_patches, generator=g).argsort(1).argsort(1)  # nested masks: counts fall by stage
    counts = (torch.linspace(0.2, 1.0, 40).unsqueeze(1) ** torch.arange(1, pv.num_stages + 1) * pv.num_patches).ceil()
    if rows == "shuffled":
        counts = counts[torch.randperm(40, generator=g)]
    masks = [rank < counts[:, k : k + 1] for k in range(pv.num_stages)]
    with torch.no_grad():
        state = pv.prune(pv.embed(x), masks[0], layout="gathered")
    buckets = length_buckets(state.num_kept(), 40 // pv.bucket_rows, pv.num_prefix_tokens)
    assert state.packed and buckets
    order = torch.cat([r for r, _ in buckets])
    assert torch.equal(order, torch.arange(40)) == (rows == "in order of count")
    grads = {}
    for layout in ("masked", "gathered"):
        pv.zero_grad()
        logits = pv(x, masks, layout=layout)
        logits.logsumexp(1).sum().backward()
        grads[layout] = (logits.detach(), [p.grad.clone() for p in pv.parameters() if p.grad is not None])
    torch.testing.assert_close(grads["masked"][0], grads["gathered"][0], atol=1e-5, rtol=1e-4)
    assert len(grads["masked"][1]) == len(grads["gathered"][1]) > 0
    for a, b in zip(grads["masked"][1], grads["gathered"][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_length_buckets_group_only_when_they_save_padding():
    from apt_env.models.tokens import length_buckets

    varied = torch.tensor([2, 30, 3, 29, 4, 28, 5, 27])
    buckets = length_buckets(varied, 2, num_prefix_tokens=1)
    assert [(sorted(r.tolist()), n) for r, n in buckets] == [([0, 2, 4, 6], 5), ([1, 3, 5, 7], 30)]
    assert length_buckets(torch.tensor([20, 21, 20, 21, 19, 21, 20, 21]), 2, 1) is None  # 2% saved
    # Two budgets in a batch: four parts, but neighbours of the same length make one group each, without padding.
    two = torch.tensor([9] * 8 + [30] * 8)
    assert [(r.tolist(), n) for r, n in length_buckets(two, 4, 1)] == [(list(range(8)), 9), (list(range(8, 16)), 30)]
    assert length_buckets(varied, 1, 1) is None


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "not_fused"])
def test_map_pool_ignores_pruned_tokens_with_and_without_fused_attention(fused):
    """timm's non-fused attention (TIMM_FUSED_ATTN=0) adds the mask to the scores: it must be 0 / -inf."""
    pv = _build("map_pool")
    switched = [mod for mod in pv.modules() if hasattr(mod, "fused_attn")]
    assert pv.model.attn_pool in switched and len(switched) == pv.depth + 1
    for mod in switched:
        mod.fused_attn = fused
    x = torch.randn(2, 3, 32, 32)
    kept = [1, 4, 6, 9, 12]
    mask = torch.zeros(2, pv.num_patches, dtype=torch.bool)
    mask[:, kept] = True
    m, b0 = pv.model, pv.prune_layers[0]
    with torch.no_grad():
        tokens = m.blocks[:b0](m._pos_embed(m.patch_embed(x)))  # no prefix tokens
        expected = m.forward_head(m.norm(m.blocks[b0:](tokens[:, kept])))  # the tokens really dropped
        torch.testing.assert_close(pv(x, [mask], layout="masked"), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(pv(x, [mask], layout="gathered"), expected, atol=1e-5, rtol=0)
        masks = _masks(pv, 6)  # different counts per row: gathered rows are padded and masked
        x = torch.randn(6, 3, 32, 32)
        torch.testing.assert_close(pv(x, masks, layout="masked"), pv(x, masks, layout="gathered"), atol=1e-5, rtol=1e-4)


def test_the_default_model_has_a_registered_name_that_states_its_config():
    import timm

    import apt_env  # noqa: F401  (registers the name)

    model = timm.create_model("vit_apt_tiny_patch4_28")
    assert model.patch_embed.num_patches == 49 and len(model.blocks) == 6 and model.embed_dim == 128
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (1, 28, 28)
    assert PrunableViT.from_timm().timm_name == "vit_apt_tiny_patch4_28"


def test_rows_with_equal_counts_take_the_unpadded_path():
    """A budget gives every row the same count: the gathered batch is then dense, and attention runs unmasked."""
    from apt_env.models.tokens import top_count

    pv = _build("vit")
    state = pv.embed(torch.randn(6, 3, 32, 32))
    live = torch.ones(6, pv.num_patches, dtype=torch.bool)
    keep = top_count(torch.rand(6, pv.num_patches), live, torch.full((6,), 7.0))
    pruned = pv.prune(state, keep, "gathered")
    assert pruned.x.shape[1] == pv.num_prefix_tokens + 7 and pruned.key_mask() is None
    keep[0, keep[0].nonzero()[0]] = False  # one row one token short: padded and masked
    assert pv.prune(state, keep, "gathered").key_mask() is not None


def test_a_stage_before_block_0_prunes_the_embedded_patches_and_reaches_budgets_below_one_block():
    from agents.baselines import ClsAttentionTopK
    from apt_env.eval.evaluate import budget_keep_ratio, forward_policy
    from apt_env.models.flops import FlopCounter

    torch.manual_seed(0)
    pv = _build("vit", prune_layers=(0, 2, 3)).eval()
    images = torch.randn(3, *pv.input_size)
    masks = [torch.rand(3, pv.num_patches) < 0.5 for _ in range(3)]
    with torch.no_grad():
        torch.testing.assert_close(pv(images, masks, layout="masked"), pv(images, masks, layout="gathered"))
        state, attn = pv.advance_to_stage(pv.embed(images), 0, take_attn=True)
        torch.testing.assert_close(state.x, pv.embed(images).x)  # no block has run
        torch.testing.assert_close(attn, pv.cls_attention(pv.embed(images), 0))  # what block 0 will attend to
    assert pv.attention_source(0) == (0, False) and pv.attention_source(1)[0] == 1
    # Below the cost of one block, which a first stage before block 1 cannot go under (block 0 runs dense).
    counter, reached = FlopCounter(pv.model), []
    for model in (pv, pv.with_pruning(prune_layers=(1, 2, 3))):
        keep = ClsAttentionTopK(budget_keep_ratio(model, 0.05)).act
        with torch.no_grad():
            _, kept, _ = forward_policy(model, images, keep, obs_keys=("cls_attn", "live", "stage"))
        reached.append(float(counter(kept + model.num_prefix_tokens).mean()) / counter.dense())
    assert reached[0] < 1 / pv.depth <= reached[1], reached
