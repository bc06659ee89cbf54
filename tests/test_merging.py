"""Token merging in the engine: ToMe (``PrunableViT.forward_merged``) against a plain-torch reference written here, on
every ViT family, its FLOPs against fvcore, the schedule matched to a budget; EViT's fused token (``prune``'s
``fuse_attn``)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis
from timm.models.vision_transformer import ResPostBlock
from torch import nn

from apt_env.models.backbone import PrunableViT
from apt_env.models.flops import FlopCounter
from apt_env.models.merging import MergeState, check_schedule, merged_counts
from apt_env.models.tokens import initial_state

# Small versions of the ViT families the engine runs, 64 patch tokens of 4x4 pixels at 32 px, 4 blocks.
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {}),
    "layerscale_qknorm": ("vit_tiny_patch16_224", dict(init_values=0.1, qk_norm=True)),
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=4, no_embed_class=True)),
    "avg_pool": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg", fc_norm=True)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "map_pool": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="map")),
    "res_post": ("vit_tiny_patch16_224", dict(block_fn=ResPostBlock)),
}
SCHEDULE = [8, 6, 4, 3]  # merges in every block: 64 -> 56 -> 50 -> 46 -> 43 patch tokens


@functools.cache
def _model(family: str) -> PrunableViT:
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    return PrunableViT.from_timm(name, img_size=32, patch_size=4, depth=4, num_classes=7, **kwargs).eval()


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# -- the reference: the merged pass by hand from the weights, one row and one token at a time for the matching --


def _ln(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    if isinstance(norm, nn.Identity):
        return x
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    return x @ linear.weight.T + (0 if linear.bias is None else linear.bias)


def _mlp(x: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
    return _linear(F.gelu(_linear(x, mlp.fc1)), mlp.fc2)


def _attention(x: torch.Tensor, attn: nn.Module, log_size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention with ``log_size`` (B, T) added to each key's logits; also the keys averaged over heads."""
    b, t, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    q, k, v = _linear(x, attn.qkv).reshape(b, t, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k = _ln(q, attn.q_norm), _ln(k, attn.k_norm)
    logits = (q @ k.transpose(-1, -2)) * d**-0.5 + log_size[:, None, None, :]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h * d)
    return _linear(out, attn.proj), k.mean(1)


def _merge(x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, r: int, p: int):
    """ToMe's matching and size-weighted merge, row by row: A = even patch positions, B = odd ones."""
    xs, sizes = [], []
    for i in range(len(x)):
        k = keys[i, p:]
        a_pos, b_pos = list(range(0, len(k), 2)), list(range(1, len(k), 2))
        sim = F.cosine_similarity(k[a_pos][:, None], k[b_pos][None], dim=-1)  # (La, Lb)
        best, partner = sim.max(dim=1)
        merged = sorted(range(len(a_pos)), key=lambda j: (-float(best[j]), j))[:r]
        total = {j: x[i, p + q] * size[i, p + q] for j, q in enumerate(b_pos)}
        weight = {j: size[i, p + q].clone() for j, q in enumerate(b_pos)}
        for j in merged:
            total[int(partner[j])] = total[int(partner[j])] + x[i, p + a_pos[j]] * size[i, p + a_pos[j]]
            weight[int(partner[j])] = weight[int(partner[j])] + size[i, p + a_pos[j]]
        rows = [x[i, t] for t in range(p)] + [x[i, p + q] for j, q in enumerate(a_pos) if j not in merged]
        row_sizes = [size[i, t] for t in range(p)] + [size[i, p + q] for j, q in enumerate(a_pos) if j not in merged]
        rows += [total[j] / weight[j] for j in range(len(b_pos))]
        row_sizes += [weight[j] for j in range(len(b_pos))]
        xs.append(torch.stack(rows))
        sizes.append(torch.stack(row_sizes))
    return torch.stack(xs), torch.stack(sizes)


def _head(m: nn.Module, x: torch.Tensor, size: torch.Tensor, p: int) -> torch.Tensor:
    x = _ln(x, m.norm)
    if m.global_pool == "token":
        if getattr(m, "head_dist", None) is not None:
            return (_linear(x[:, 0], m.head) + _linear(x[:, 1], m.head_dist)) / 2
        return _linear(_ln(x[:, 0], m.fc_norm), m.head)
    x, size = x[:, p:], size[:, p:]
    if m.global_pool == "avg":
        pooled = (x * size[..., None]).sum(1) / size.sum(1, keepdim=True)
    else:  # 'map': timm's AttentionPoolLatent, each token's logit raised by log(size)
        pool = m.attn_pool
        b, n, c = x.shape
        h, d, latent = pool.num_heads, pool.head_dim, pool.latent_len
        q = _linear(pool.latent.expand(b, -1, -1), pool.q).reshape(b, latent, h, d).transpose(1, 2)
        k, v = _linear(x, pool.kv).reshape(b, n, 2, h, d).permute(2, 0, 3, 1, 4)
        q, k = _ln(q, pool.q_norm), _ln(k, pool.k_norm)
        att = ((q @ k.transpose(-1, -2)) * pool.scale + size.log()[:, None, None, :]).softmax(-1)
        y = _linear((att @ v).transpose(1, 2).reshape(b, latent, c), pool.proj)
        pooled = (y + _mlp(_ln(y, pool.norm), pool.mlp))[:, 0]
    return _linear(_ln(pooled, m.fc_norm), m.head)


def _reference(pv: PrunableViT, images: torch.Tensor, schedule: list[int], prop_attn: bool) -> torch.Tensor:
    m, p = pv.model, pv.num_prefix_tokens
    x = m.norm_pre(m._pos_embed(m.patch_embed(images)))  # timm's embedding; the blocks and head are by hand
    size = torch.ones(x.shape[:2])
    for blk, r in zip(m.blocks, schedule):
        bias = size.log() if prop_attn else torch.zeros_like(size)
        if isinstance(blk, ResPostBlock):
            out, keys = _attention(x, blk.attn, bias)
            x = x + _ln(out, blk.norm1)
        else:
            out, keys = _attention(_ln(x, blk.norm1), blk.attn, bias)
            x = x + out * (blk.ls1.gamma if hasattr(blk.ls1, "gamma") else 1)
        if r:
            x, size = _merge(x, size, keys, r, p)
        if isinstance(blk, ResPostBlock):
            x = x + _ln(_mlp(x, blk.mlp), blk.norm2)
        else:
            x = x + _mlp(_ln(x, blk.norm2), blk.mlp) * (blk.ls2.gamma if hasattr(blk.ls2, "gamma") else 1)
    return _head(m, x, size, p)


# -- ToMe ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merged_pass_matches_the_reference(family, prop_attn, one_thread):
    pv = _model(family)
    images = _images(3)
    with torch.no_grad():
        got = pv.forward_merged(images, SCHEDULE, prop_attn=prop_attn)
        expected = _reference(pv, images, SCHEDULE, prop_attn)
        dense = pv.model(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - dense).abs().max() > 1e-3, "merging must change the logits"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merging_nothing_is_the_dense_model(family, one_thread):
    pv = _model(family)
    for batch in (1, 3):
        images = _images(batch)
        with torch.no_grad():
            dense = pv.model(images)
            assert torch.equal(pv.forward_merged(images, 0), dense)
            assert torch.equal(pv.forward_merged(images, [0] * pv.depth, prop_attn=False), dense)


@pytest.mark.parametrize("family", ["registers", "deit_distilled", "avg_pool"])
def test_sizes_sum_to_the_token_count_and_counts_follow_the_schedule(family, one_thread):
    pv = _model(family)
    p, n = pv.num_prefix_tokens, pv.num_patches
    counts = merged_counts(n, check_schedule(SCHEDULE, pv.depth, n))
    for batch in (1, 3):
        state = MergeState(pv.embed(_images(batch)).x, p)
        with torch.no_grad():
            for block, r in enumerate(SCHEDULE):
                state = pv.merge_block(state, block, r)
                assert state.x.shape == (batch, p + counts[block + 1], pv.embed_dim)
                assert state.sizes().shape == (batch, p + counts[block + 1])
                torch.testing.assert_close(state.sizes().sum(1), torch.full((batch,), float(p + n)), atol=0, rtol=0)
                assert bool((state.sizes()[:, :p] == 1).all()), "prefix tokens are never merged"
        assert float(state.sizes().max()) > 1


def test_a_row_merges_the_same_alone_or_in_a_batch(one_thread):
    pv = _model("registers")
    images = _images(4)
    with torch.no_grad():
        batched = pv.forward_merged(images, SCHEDULE)
        alone = torch.cat([pv.forward_merged(images[i : i + 1], SCHEDULE) for i in range(4)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["vit", "avg_pool", "map_pool"])
def test_proportional_attention_changes_nothing_while_every_size_is_one(family, one_thread):
    pv = _model(family)
    images = _images(3)
    with torch.no_grad():
        x = pv.embed(images).x
        none = pv.merge_block(MergeState(x, pv.num_prefix_tokens), 0, 8)
        ones = pv.merge_block(MergeState(x, pv.num_prefix_tokens, torch.ones(x.shape[:2])), 0, 8)
        torch.testing.assert_close(ones.x, none.x, atol=1e-6, rtol=0)
        torch.testing.assert_close(ones.sizes(), none.sizes(), atol=0, rtol=0)
        # Merging only in the last block: no attention ever sees a merged token.
        last = [0] * (pv.depth - 1) + [8]
        on, off = pv.forward_merged(images, last), pv.forward_merged(images, last, prop_attn=False)
        torch.testing.assert_close(on, off, atol=0, rtol=0)
        # Once merged tokens are attended to, it matters.
        assert (
            pv.forward_merged(images, SCHEDULE) - pv.forward_merged(images, SCHEDULE, prop_attn=False)
        ).abs().max() > 1e-4


def test_bad_schedules_are_refused(one_thread):
    pv = _model("vit")
    images = _images(1)
    with pytest.raises(ValueError, match=r"r=33 at block 0 .* 64 patch tokens .* at most 32"):
        pv.forward_merged(images, 33)
    with pytest.raises(ValueError, match=r"r=20 at block 2 .* 24 patch tokens .* at most 12"):
        pv.forward_merged(images, 20)  # 64 -> 44 -> 24: too many in the third block
    with pytest.raises(ValueError, match=r"one r per block: 4 for this model, got 3"):
        pv.forward_merged(images, [2, 2, 2])
    with pytest.raises(ValueError, match=r"r of block 1 must be a non-negative integer, got -1"):
        pv.forward_merged(images, [2, -1, 0, 0])
    with pytest.raises(ValueError, match=r"r=5 merges more than half of the 8 tokens \(at most 4\)"):
        pv.merge_block(MergeState(pv.embed(images).x[:, : 1 + 8], 1), 0, 5)


# -- FLOPs ---------------------------------------------------------------------------------------------------------


class _Merged(nn.Module):
    def __init__(self, pv: PrunableViT, schedule: list[int]) -> None:
        super().__init__()
        self.pv, self.schedule = pv, schedule

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pv.forward_merged(images, self.schedule)


@pytest.mark.parametrize("family", ["vit", "registers", "avg_pool", "deit_distilled", "map_pool"])
def test_merged_flops_match_fvcore(family, one_thread):
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    pv = PrunableViT.from_timm(name, img_size=32, patch_size=4, depth=4, num_classes=7, **kwargs).eval()
    for module in pv.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # explicit q @ k^T and attn @ v, which fvcore counts
    images = _images(2)
    analysis = FlopCountAnalysis(_Merged(pv, SCHEDULE), images)
    analysis = analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    total = analysis.total() / 2
    hidden = [op for op in analysis.unsupported_ops() if any(w in op for w in ("matmul", "mm", "linear", "einsum"))]
    assert not hidden, hidden
    backbone, matching = FlopCounter(pv.model).merged(SCHEDULE)
    assert backbone + matching == pytest.approx(total, rel=1e-9)
    # The matching: 4 blocks of 32x32, 28x28, 25x25 and 23x23 similarities over head_dim 64.
    assert matching == (32 * 32 + 28 * 28 + 25 * 25 + 23 * 23) * 64


def test_merged_flops_of_no_merging_are_the_dense_count():
    counter = FlopCounter(_model("registers").model)
    assert counter.merged(0) == (counter.dense(), 0.0)
    assert counter.merged(SCHEDULE)[0] < counter.merged([8, 0, 0, 0])[0] < counter.dense()


@pytest.mark.parametrize("budget", [0.35, 0.5, 0.62, 0.8, 0.97])
def test_the_schedule_for_a_budget_meets_it_within_two_percent(budget):
    pv = _model("vit")
    counter = FlopCounter(pv.model)
    schedule = counter.merge_schedule(budget)
    assert pv.merge_schedule(schedule) == schedule  # a valid schedule for the model
    assert counter.merged(schedule)[0] / counter.dense() == pytest.approx(budget, rel=0.02)
    assert counter.merge_schedule(1.0) == (0,) * pv.depth


def test_a_budget_no_schedule_reaches_is_refused():
    counter = FlopCounter(_model("vit").model)
    halves = [32, 16, 8, 4]  # merging half of the patch tokens in every block: the least ToMe reaches
    lowest = counter.merged(halves)[0] / counter.dense()
    with pytest.raises(ValueError, match=rf"budget 0.1 is below .* {lowest:.4g} of the dense GFLOPs"):
        counter.merge_schedule(0.1)
    assert counter.merge_schedule(lowest) == tuple(halves)
    with pytest.raises(ValueError, match=r"\(0, 1\], got 0"):
        counter.merge_schedule(0)


# -- EViT's fused token --------------------------------------------------------------------------------------------


def _masks(pv: PrunableViT, batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, pv.num_patches, generator=g) < r for r in (0.8, 0.6, 0.5)[: pv.num_stages]]


@pytest.mark.parametrize("family", ["vit", "registers", "avg_pool", "deit_distilled", "map_pool"])
def test_fusing_with_nothing_pruned_is_the_dense_model(family, one_thread):
    pv = _model(family)
    for batch in (1, 3):
        images = _images(batch)
        everything = [torch.ones(batch, pv.num_patches, dtype=torch.bool)] * pv.num_stages
        with torch.no_grad():
            dense = pv.model(images)
            for layout in ("masked", "gathered"):
                torch.testing.assert_close(pv(images, everything, layout, fuse=True), dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["vit", "registers", "avg_pool", "deit_distilled", "map_pool"])
def test_fused_token_masked_and_gathered_agree_and_a_row_that_prunes_nothing_stays_dense(family, one_thread):
    pv = _model(family)
    images = _images(4)
    masks = _masks(pv, 4)
    for mask in masks:
        mask[0] = True  # row 0 prunes nothing: its fused tokens are empty, masked as keys
    with torch.no_grad():
        masked, gathered = pv(images, masks, "masked", fuse=True), pv(images, masks, "gathered", fuse=True)
        plain, dense = pv(images, masks, "masked"), pv.model(images)
    torch.testing.assert_close(masked, gathered, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(masked[0], dense[0], atol=1e-5, rtol=0)
    assert (masked[1:] - plain[1:]).abs().max() > 1e-4, "the fused token must change the pruned rows' logits"


def test_the_fused_token_weights_sum_to_the_pruned_tokens_attention(one_thread):
    pv = _model("registers")
    p, n = pv.num_prefix_tokens, pv.num_patches
    with torch.no_grad():
        state, attn = pv.advance_to_stage(pv.embed(_images(3)), 0, take_attn=True)
    mask = _masks(pv, 3)[1]
    pruned = mask == 0
    for layout in ("masked", "gathered"):
        after = pv.prune(state, mask, layout, fuse_attn=attn)
        assert (after.num_prefix_tokens, after.num_fused) == (p + 1, 1)
        expected = (attn * pruned).unsqueeze(-1).mul(state.patches).sum(1)  # masked state: slot j is patch j
        torch.testing.assert_close(after.x[:, p], expected, atol=1e-6, rtol=1e-5)
        assert after.mask(n).equal(mask)
    # On equal tokens the fused token is that token times its weights' sum: the pruned tokens' attention.
    token = torch.randn(pv.embed_dim)
    equal = initial_state(token.expand(3, p + n, -1).clone(), p)
    fused = pv.prune(equal, mask, fuse_attn=attn).x[:, p]
    weight = fused @ token / token.dot(token)
    torch.testing.assert_close(weight, (attn * pruned).sum(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused, weight[:, None] * token, atol=1e-6, rtol=1e-5)
    # A second stage fuses only the tokens it prunes; the first fused token goes on.
    first = pv.prune(equal, mask, fuse_attn=attn)
    second_mask = mask & (torch.arange(n) % 3 != 0)
    second = pv.prune(first, second_mask, "gathered", fuse_attn=attn)
    assert second.num_fused == 2
    torch.testing.assert_close(second.x[:, p], first.x[:, p], atol=0, rtol=0)
    torch.testing.assert_close(second.x[:, p + 1] @ token / token.dot(token), (attn * (mask & ~second_mask)).sum(1),
                               atol=1e-6, rtol=1e-5)  # fmt: skip


def test_bad_fuse_attention_is_refused():
    pv = _model("vit")
    state = pv.embed(_images(2))
    mask = _masks(pv, 2)[0]
    with pytest.raises(ValueError, match=r"fuse_attn must be the class attention, a float tensor \(2, 64\)"):
        pv.prune(state, mask, fuse_attn=torch.rand(2, 63))


# -- evaluation rows -----------------------------------------------------------------------------------------------


def _loader(pv: PrunableViT, images: int = 24) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(images, *pv.input_size, generator=g), torch.randint(0, pv.num_classes, (images,), generator=g)
    )
    return torch.utils.data.DataLoader(data, batch_size=10)


def test_a_tome_row_meets_its_budget_and_pays_for_its_matching(one_thread):
    from apt_env.eval.evaluate import Contender, Merged, evaluate_accuracy, measure_throughput

    pv = _model("registers")
    tome = Merged.at_budget("ToMe @ 0.5", pv, 0.5, role="heuristic", rule="ToMe")
    rows, decisions = evaluate_accuracy(pv, _loader(pv), [Contender("dense", role="dense"), tome])
    dense, row = rows
    counter = FlopCounter(pv.model)
    assert row["gflops_backbone"] / dense["gflops_backbone"] == pytest.approx(0.5, rel=0.02)
    assert row["gflops_backbone"] * 1e9 == pytest.approx(counter.merged(tome.schedule)[0], rel=1e-12)
    assert row["gflops_policy"] * 1e9 == pytest.approx(counter.merged(tome.schedule)[1], rel=1e-12)
    assert row["gflops_policy"] > 0
    assert row["tokens_last"] == merged_counts(pv.num_patches, tome.schedule)[-2]
    assert bool(decisions["ToMe @ 0.5"].masks.all())  # merges, prunes nothing
    images, labels = _loader(pv).dataset.tensors
    with torch.no_grad():
        correct = int((pv.forward_merged(images, tome.schedule).argmax(1) == labels).sum())
        assert row["top1"] == correct / len(labels)
        logits, _, _ = tome.run(pv, images)
    torch.testing.assert_close(logits, pv.forward_merged(images, tome.schedule), atol=0, rtol=0)
    speed = measure_throughput(pv, images, [Contender("dense"), tome], batch_size=2, repeats=1, min_seconds=0)
    assert speed["ToMe @ 0.5"] > 0 and speed["dense"] > 0


@pytest.mark.parametrize("rule", ["random", "top-k"])
def test_a_fused_token_row_keeps_the_rules_masks_and_pays_for_its_token(rule, one_thread):
    from agents.baselines import ClsAttentionTopK, RandomKeep
    from apt_env.eval.evaluate import Contender, evaluate_accuracy

    pv = _model("vit")
    if rule == "random":
        acts, keys = [RandomKeep(0.6, seed=0).act, RandomKeep(0.6, seed=0).act], ("live", "stage")
    else:
        acts, keys = [ClsAttentionTopK(0.6).act] * 2, ("cls_attn", "live", "stage")
    contenders = [Contender(rule, acts[0], 0.5, obs_keys=keys), Contender(f"{rule} + fused", acts[1], 0.5,
                                                                           obs_keys=keys, fuse=True)]  # fmt: skip
    (plain, fused), decisions = evaluate_accuracy(pv, _loader(pv), contenders)
    masks, fused_masks = decisions[rule].masks, decisions[f"{rule} + fused"].masks
    assert torch.equal(masks.sum(-1), fused_masks.sum(-1))  # the same counts; the same tokens before any fusing
    assert torch.equal(masks[:, 0], fused_masks[:, 0])
    if rule == "random":  # its draws do not look at the tokens
        assert torch.equal(masks, fused_masks)
    # One more token from the first stage on (every row prunes at every stage).
    counter = FlopCounter(pv.model)
    kept = decisions[rule].masks.sum(-1)[0].tolist()
    bounds = pv.stage_bounds
    entering = [pv.num_patches] * bounds[1]
    for stage, count in enumerate(kept):
        entering += [count + stage + 1] * (bounds[stage + 2] - bounds[stage + 1])
    assert fused["gflops_backbone"] * 1e9 == pytest.approx(float(counter(torch.tensor(entering) + 1)), rel=1e-12)
    assert fused["gflops_backbone"] > plain["gflops_backbone"]
    assert fused["gflops_policy"] > plain["gflops_policy"]  # the class attention (random reads none) and the fusing
    assert fused["tokens_last"] == plain["tokens_last"] + pv.num_stages
    assert fused["loss"] != plain["loss"]
