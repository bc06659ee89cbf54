"""The fused static-shape path of a budget agent: the generic walk's logits and masks, its checks, and its rows."""

import pytest
import torch
from helpers import SMALL, TINY_VIT, load_script

from agents.fused import FusedAdaptiveAgent, FusedBudgetAgent, kept_masks, static_counts
from agents.policy import APTPolicy
from apt_env.envs.observe import BUDGET_KEYS, OBS_KEYS
from apt_env.eval.evaluate import forward_policy
from apt_env.models.backbone import PrunableViT

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = (*OBS_KEYS, *BUDGET_KEYS)


def tiny(position_prior: float = 2.0, **options) -> tuple[PrunableViT, APTPolicy]:
    torch.manual_seed(0)
    pv = PrunableViT.from_timm("vit_tiny_patch16_224", **TINY_VIT).eval()
    options = dict(sampling="topk", use_budget=True, position_prior=position_prior, **SMALL) | options
    policy = APTPolicy(pv.embed_dim, pv.num_patches, pv.num_stages, **options).eval()
    torch.nn.init.normal_(policy.logit_head.weight, std=1.0)  # logits far apart: no ties between tokens
    return pv, policy


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("cls_attn", [True, False])
@pytest.mark.parametrize("prune_layers", [None, (0, 2, 3)])
def test_fused_logits_and_masks_are_the_walks(budget, cls_attn, prune_layers):
    pv, policy = tiny(use_cls_attn=cls_attn)
    pv = pv.with_pruning(prune_layers=prune_layers)  # (0, ...): the first stage before any block
    images = torch.randn(5, 1, 16, 16)
    keys = KEYS if cls_attn else tuple(k for k in KEYS if k != "cls_attn")
    with torch.inference_mode():
        ref, kept, masks = forward_policy(pv, images, lambda o: policy.act(o), obs_keys=keys, budget=budget)
        fused = FusedBudgetAgent(pv, policy, budget)
        logits, positions = fused(images, return_positions=True)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(kept_masks(positions, pv.num_patches), masks)
    assert [int(c) for c in masks.sum(-1)[0]] == list(fused.counts) == list(static_counts(pv, budget))
    assert all(torch.equal(p, p.sort(1).values) for p in positions)  # raster order, as the walk keeps them


def test_a_fused_path_refuses_agents_it_cannot_run():
    pv, policy = tiny()
    for options, match in [(dict(sampling="bernoulli", use_budget=False), "sampling='topk'"),
                           (dict(mixer="attention"), "mixer='none'")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            FusedBudgetAgent(pv, tiny(**options)[1], 0.5)
    other = APTPolicy(pv.embed_dim, 4 * pv.num_patches, pv.num_stages, sampling="topk", use_budget=True, **SMALL)
    with pytest.raises(ValueError, match="sized for 64 patches .* the backbone has 16"):
        FusedBudgetAgent(pv, other, 0.5)
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        FusedBudgetAgent(pv, policy, 1.5)


def calibrated(shifts: list, **options) -> tuple[PrunableViT, APTPolicy]:
    pv, policy = tiny(sampling="threshold", **options)
    policy.calibration = {"budgets": [0.25, 0.75], "shifts": shifts}
    return pv, policy


@pytest.mark.parametrize("budget", [0.25, 0.5])
@pytest.mark.parametrize("cls_attn", [True, False])
@pytest.mark.parametrize("prune_layers", [None, (0, 2, 3)])
def test_the_adaptive_one_image_path_decides_as_the_batched_walk(budget, cls_attn, prune_layers):
    """Per-stage thresholds, and counts that differ between images: each image alone by the fast path gets the
    logits and masks the batched walk gives it."""
    pv, policy = calibrated([[2.0, 2.6, 2.3], [1.7, 2.4, 2.1]], use_cls_attn=cls_attn)
    pv = pv.with_pruning(prune_layers=prune_layers)
    images = torch.randn(6, 1, 16, 16)
    keys = KEYS if cls_attn else tuple(k for k in KEYS if k != "cls_attn")
    with torch.inference_mode():
        ref, _, masks = forward_policy(pv, images, lambda o: policy.act(o), obs_keys=keys, budget=budget)
        fast = FusedAdaptiveAgent(pv, policy, budget)
        for i in range(len(images)):
            logits, positions = fast(images[i : i + 1], return_positions=True)
            torch.testing.assert_close(logits, ref[i : i + 1], rtol=1e-5, atol=1e-5)
            assert torch.equal(kept_masks(positions, pv.num_patches), masks[i : i + 1])
    assert len({tuple(m.sum(-1).tolist()) for m in masks}) > 1  # the images keep different counts


def test_the_adaptive_one_image_path_tops_up_to_min_keep_and_refuses_what_it_cannot_run():
    pv, policy = calibrated([50.0, 50.0])  # no logit above the threshold: the engine keeps min_keep tokens
    pv = pv.with_pruning(min_keep=3)
    image = torch.randn(1, 1, 16, 16)
    with torch.inference_mode():
        ref, _, masks = forward_policy(pv, image, lambda o: policy.act(o), obs_keys=KEYS, budget=0.5)
        logits, positions = FusedAdaptiveAgent(pv, policy, 0.5)(image, return_positions=True)
    assert masks.sum(-1).tolist() == [[3, 3, 3]] and torch.equal(kept_masks(positions, pv.num_patches), masks)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one image at a time, got a batch of 2"):
        FusedAdaptiveAgent(pv, policy, 0.5)(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="calibrated thresholds .* got sampling='topk'"):
        FusedAdaptiveAgent(pv, tiny()[1], 0.5)
    with pytest.raises(ValueError, match="calibrated=False"):
        FusedAdaptiveAgent(pv, tiny(sampling="threshold")[1], 0.5)


@pytest.mark.parametrize("cls_attn", [True, False])
@pytest.mark.parametrize("prune_layers", [None, (0, 2, 3)])
def test_the_fused_path_traces_as_one_graph(cls_attn, prune_layers):
    """A graph break hands control back to Python between compiled pieces: at batch 1 that costs more than the
    pruning saves. Dynamo's trace (no compiling) finds every break."""
    pv, policy = tiny(use_cls_attn=cls_attn)
    pv = pv.with_pruning(prune_layers=prune_layers)
    with torch.inference_mode():
        explained = torch._dynamo.explain(FusedBudgetAgent(pv, policy, 0.5))(torch.randn(1, 1, 16, 16))
    assert explained.graph_break_count == 0, [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.slow
def test_the_compiled_fused_path_gives_the_same_logits():
    pv, policy = tiny()
    images = torch.randn(3, 1, 16, 16)
    fused = FusedBudgetAgent(pv, policy, 0.5)
    with torch.inference_mode():
        torch.testing.assert_close(torch.compile(fused, dynamic=False)(images), fused(images), rtol=1e-4, atol=1e-4)


def test_evaluate_has_fused_rows_with_the_agents_figures(tmp_path):
    evaluate = load_script("evaluate")
    pv, policy = tiny()
    contenders = evaluate.fused_contenders(pv, policy, {0.5: 0.5}, compile=False)
    assert [c.name for c in contenders] == ["APT agent (fused) @ 0.5"] and evaluate.has_fused_path(policy)
    images = torch.randn(4, 1, 16, 16)
    with torch.inference_mode():
        logits, entering, masks = contenders[0].run(pv, images)
        ref, ref_entering, ref_masks = forward_policy(pv, images, lambda o: policy.act(o), obs_keys=KEYS, budget=0.5)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(entering, ref_entering) and torch.equal(masks, ref_masks)
    assert not evaluate.is_agent_decision({"role": "agent", "rule": evaluate.AGENT_FUSED, "fused_token": False})
    assert not evaluate.has_fused_path(tiny(sampling="bernoulli", use_budget=False)[1])


def test_a_fused_row_is_compared_with_the_compiled_dense_model_when_there_is_one():
    evaluate = load_script("evaluate")
    fused = {"policy": "APT agent (fused) @ 0.5", "rule": evaluate.AGENT_FUSED, "role": "agent", "fused_token": False,
             "budget": 0.5,
             "img_per_s_b256": 400.0, "img_per_s_b1": 150.0}  # fmt: skip
    dense = {"policy": "dense", "rule": "dense", "role": "dense", "fused_token": False, "budget": 1.0,
             "img_per_s_b256": 200.0,
             "img_per_s_b1": 100.0}  # fmt: skip
    physical = {evaluate.physical_name(fused): {"img_per_s_b256": 400.0, "img_per_s_b1": 300.0}}
    assert "compiled" not in evaluate.decision_cost_text([dense, fused], physical)
    physical[evaluate.DENSE_COMPILED] = {"img_per_s_b256": 250.0, "img_per_s_b1": 200.0}
    text = evaluate.decision_cost_text([dense, fused], physical)
    assert "over dense b256 2.00, b1 1.50; over the dense model compiled b256 1.60, b1 0.75" in text
    compiled = evaluate.TimedForward(evaluate.DENSE_COMPILED, role="reference", forward=lambda x: x.sum(-1))
    assert torch.equal(compiled.run(None, torch.ones(2, 3))[0], torch.full((2,), 3.0))


def test_the_fused_path_runs_timm_blocks_with_layerscale_and_qk_norm_as_the_engine_does():
    """The static-shape walk asks the engine for every block (``block_with_cls_attention``, ``dense_blocks``): on a ViT
    with LayerScale and qk-norm its logits are the generic walk's."""
    torch.manual_seed(0)
    pv = PrunableViT.from_timm(
        "vit_small_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=10, depth=4, embed_dim=32,
        num_heads=2, init_values=0.1, qk_norm=True,
    ).eval()  # fmt: skip
    policy = APTPolicy(pv.embed_dim, pv.num_patches, pv.num_stages, sampling="topk", use_budget=True, **SMALL).eval()
    torch.nn.init.normal_(policy.logit_head.weight, std=1.0)
    images = torch.randn(3, 1, 16, 16)
    with torch.inference_mode():
        ref, _, masks = forward_policy(pv, images, lambda o: policy.act(o), obs_keys=KEYS, budget=0.5)
        logits, positions = FusedBudgetAgent(pv, policy, 0.5)(images, return_positions=True)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(kept_masks(positions, pv.num_patches), masks)
