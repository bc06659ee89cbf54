import pytest
import torch
from helpers import load_script

from apt_env.models.backbone import LAYOUTS, PrunableViT
from apt_env.train.joint import ChannelLosses

KWARGS = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, depth=4, embed_dim=32, num_heads=2)


def _setup():
    torch.manual_seed(0)
    pv = PrunableViT.from_timm("vit_tiny_patch16_224", **KWARGS)
    return pv, torch.randn(6, 1, 16, 16), torch.randint(0, 10, (6,))


def keep_half(obs):
    keep = obs["live"].bool().clone()
    keep[:, ::2] = False
    return keep


def test_keep_all_makes_every_channel_the_plain_loss():
    pv, x, y = _setup()
    losses, logits = ChannelLosses(pv)(x, y, keep_fn=lambda obs: obs["live"].bool())
    assert set(losses) == {"plain", "single", "multi"}
    torch.testing.assert_close(losses["single"], losses["plain"])
    torch.testing.assert_close(losses["multi"], losses["plain"])
    torch.testing.assert_close(logits, pv(x))


def test_pruned_channels_differ_and_train_the_backbone():
    pv, x, y = _setup()
    losses, _ = ChannelLosses(pv)(x, y, keep_fn=keep_half, single_stage=1)
    assert not torch.allclose(losses["single"], losses["plain"])
    assert not torch.allclose(losses["multi"], losses["single"])
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in pv.model.blocks[-1].parameters())


@pytest.mark.parametrize("stage", [0, 2])
def test_masked_and_gathered_give_the_same_losses_and_gradients(stage):
    results = {}
    for layout in ("masked", "gathered"):
        pv, x, y = _setup()
        losses, _ = ChannelLosses(pv, layout=layout)(x, y, keep_fn=keep_half, single_stage=stage)
        sum(losses.values()).backward()
        results[layout] = (losses, pv.model.blocks[0].attn.qkv.weight.grad.clone())
    for channel in ("plain", "single", "multi"):
        torch.testing.assert_close(results["masked"][0][channel], results["gathered"][0][channel])
    torch.testing.assert_close(results["masked"][1], results["gathered"][1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_each_channel_is_the_model_under_its_masks(stage):
    """The single channel is the model under the one action at its stage (at stage 0 the multi channel's first
    action, shared with it), the multi channel under every action; each as ``pv(x, masks)`` computes it."""
    import torch.nn.functional as F

    pv, x, y = _setup()
    masks: list[torch.Tensor] = []

    def keep(obs):
        mask = keep_half(obs)
        masks.append(mask)
        return mask

    losses, _ = ChannelLosses(pv)(x, y, keep_fn=keep, single_stage=stage)
    single, multi = (masks[0], masks[1:]) if stage else (masks[0], masks)
    assert len(multi) == pv.num_stages
    expected_single = pv(x, [torch.ones_like(single)] * stage + [single], layout="gathered")
    torch.testing.assert_close(losses["single"], F.cross_entropy(expected_single, y))
    torch.testing.assert_close(losses["multi"], F.cross_entropy(pv(x, multi, layout="gathered"), y))


def test_weights_and_plain_only():
    pv, x, y = _setup()
    plain, _ = ChannelLosses(pv)(x, y)
    assert set(plain) == {"plain"}
    weighted, _ = ChannelLosses(pv)(x, y, keep_fn=keep_half, weights={"plain": 0.5, "multi": 2.0})
    assert set(weighted) == {"plain", "multi"}
    torch.testing.assert_close(weighted["plain"], 0.5 * plain["plain"])
    with pytest.raises(ValueError, match="valid: plain, single, multi"):
        ChannelLosses(pv)(x, y, keep_fn=keep_half, weights={"double": 1.0})


# ---- train_backbone.py's phases: each trains one part and leaves the other as it was ----

import json  # noqa: E402

from torch.utils.tensorboard import SummaryWriter  # noqa: E402


def _copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_joint_training_freezes_the_agent_in_the_backbone_phase_and_the_backbone_in_the_agent_phase(
    tmp_path, monkeypatch, one_thread
):
    """One epoch of ``train_backbone.py --method apt``, pruned from the start: weights are taken when the agent
    is built (the backbone phase begins), when its PPO phase begins and when it ends."""
    script = load_script("train_backbone")
    monkeypatch.setattr(script, "agent_masks_figure", lambda *args, **kwargs: None)  # 2/3 of the run, no weights
    monkeypatch.setattr(SummaryWriter, "add_figure", lambda *args, **kwargs: None)
    taken: list[tuple[dict, dict, torch.Tensor]] = []
    build = script.make_agent_trainer

    def make_agent_trainer(args, pv, *rest):
        trainer = build(args, pv, *rest)
        learn = trainer.learn

        def take() -> None:
            taken.append((_copy(pv.model), _copy(trainer.policy), trainer.generator.get_state()))

        def learn_between_takes(*a, **kw):
            take()
            history = learn(*a, **kw)
            take()
            return history

        take()
        trainer.learn = learn_between_takes
        return trainer

    monkeypatch.setattr(script, "make_agent_trainer", make_agent_trainer)
    args = script.Args(
        dataset="synthetic", model_kwargs=json.dumps({"depth": 2, "embed_dim": 32, "num_heads": 2}), batch_size=16,
        steps_per_epoch=3, eval_batch_size=64, epochs=1, warmup_epochs=0, num_envs=8, agent_steps=48,
        compare_plain=False, out_dir=str(tmp_path / "runs"),
    )  # fmt: skip
    args, run_dir = script.prepare_run(args)
    assert script.train(args, run_dir)

    (vit0, agent0, rng0), (vit1, agent1, rng1), (vit2, agent2, _) = taken
    assert torch.equal(rng0, rng1), "the backbone phase takes the agent's mode (its test-time masks), not samples"
    assert _same(agent0, agent1) and not _same(vit0, vit1)  # backbone phase: only the backbone trains
    assert _same(vit1, vit2) and not _same(agent1, agent2)  # agent phase: only the agent trains


def test_a_budget_agent_is_observed_with_each_images_budget_and_its_count():
    """With budgets the backbone trains on the masks a budget agent picks at test time: the env's observation."""
    from agents.policy import APTPolicy
    from apt_env.envs.observe import BudgetKeepRatio
    from apt_env.models.tokens import keep_count

    pv, x, y = _setup()
    budget = torch.tensor([0.3, 0.5, 0.7, 1.0, 0.25, 0.6], dtype=torch.float64)
    ratio = BudgetKeepRatio(pv)(budget)
    policy = APTPolicy(32, 16, 3, hidden=16, qk_dim=16, use_budget=True, sampling="topk")
    seen = []

    def keep_fn(obs):
        seen.append(obs)
        return policy.act(obs, deterministic=False)

    losses, _ = ChannelLosses(pv)(x, y, keep_fn, budget=budget, single_stage=0)
    assert set(losses) == {"plain", "single", "multi"} and len(seen) == pv.num_stages  # the first action shared
    live = torch.full((6,), 16.0)
    for obs in seen:  # the multi channel's walk
        torch.testing.assert_close(obs["budget"][:, 0], budget.float())
        count = keep_count(live, ratio, pv.min_keep)
        assert obs["keep_count"][:, 0].tolist() == count.long().tolist()
        assert obs["live"].sum(1).tolist() == live.long().tolist()
        live = count
    with pytest.raises(ValueError, match="budget"):
        ChannelLosses(pv)(x, y, keep_fn)  # a budget agent without budgets


@pytest.mark.parametrize("groups", [None, 1, 3, 10])
def test_budgets_come_in_stratified_groups_of_consecutive_rows_in_order(groups):
    from apt_env.train.joint import draw_budgets

    torch.manual_seed(0)
    budget = draw_budgets((0.25, 1.0), 10, torch.device("cpu"), groups)
    assert budget.dtype == torch.float64 and budget.shape == (10,)
    values, sizes = budget.unique_consecutive(return_counts=True)
    g = 10 if groups is None else groups
    assert len(values) == g and sizes.tolist() == [len(p) for p in torch.arange(10).tensor_split(g)]
    part = ((values - 0.25) / 0.75 * g).floor()  # each group draws from its own g-th of the range, in order
    assert part.tolist() == list(range(g))
    for bad in (0, 11, 2.5, True):
        with pytest.raises(ValueError, match=r"groups must be an integer in \[1, 10\]"):
            draw_budgets((0.25, 1.0), 10, torch.device("cpu"), bad)
    assert draw_budgets(None, 10, torch.device("cpu"), groups) is None


def test_one_budget_per_batch_runs_the_pruned_channels_unpadded_and_trains_as_masked():
    """Rows of one budget keep the same counts: no padding in the gathered channels, masked mode's losses."""
    from agents.policy import APTPolicy
    from apt_env.train.joint import draw_budgets

    pv, x, y = _setup()
    policy = APTPolicy(32, 16, 3, hidden=16, qk_dim=16, use_budget=True, sampling="topk")
    budget = draw_budgets((0.25, 1.0), 6, torch.device("cpu"), 1)
    seen = []

    def keep_fn(obs):
        seen.append(obs["live"].sum(1))
        return policy.act(obs, deterministic=True)

    out = {lay: ChannelLosses(pv, layout=lay)(x, y, keep_fn, budget=budget, single_stage=1)[0] for lay in LAYOUTS}
    for c in out["masked"]:
        torch.testing.assert_close(out["masked"][c], out["gathered"][c])
    assert len(seen) == 2 * (pv.num_stages + 1) and all(len(live.unique()) == 1 for live in seen)
