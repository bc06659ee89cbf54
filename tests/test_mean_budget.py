"""A mean budget: the env's price of compute, the threshold agent, its calibration."""

from __future__ import annotations

import pytest
import torch
from helpers import SMALL, load_script, tiny_envs

from agents.calibrate import calibrate_thresholds, check_calibrated_for, mean_gflops_fraction, spend
from agents.fused import static_counts
from agents.io import load_policy, save_policy
from agents.observation import live_mask
from agents.policy import APTPolicy
from apt_env.data.datasets import build_dataset
from apt_env.envs.mean_budget import BudgetPrice


def threshold_policy(envs, seed: int = 0) -> APTPolicy:
    torch.manual_seed(seed)
    policy = APTPolicy.for_env(envs, sampling="threshold", **SMALL)
    with torch.no_grad():  # logits that differ between tokens and images, so counts vary per image
        policy.logit_head.weight.normal_(std=2.0)
    return policy.eval()


def images_of(envs, split: str, count: int | None = None) -> torch.Tensor:
    """Real images (scikit-learn's digits) at the tiny model's size: the first ``count`` of ``split``."""
    pv = envs.unwrapped.pv
    data = build_dataset("digits", split=split, img_size=pv.img_size[0], in_chans=pv.in_chans)
    return torch.stack([data[i][0] for i in range(min(count or len(data), len(data)))])


def test_price_rises_while_over_budget_and_falls_while_under():
    price = BudgetPrice(0.25, 1.0, lr=0.5)
    budget = torch.tensor([0.3, 0.3, 0.9])
    price.update(budget, torch.tensor([0.5, 0.5, 0.7]))  # 0.3 over by 0.2, 0.9 under by 0.2
    assert float(price(torch.tensor([0.3]))[0]) > 0 > float(price(torch.tensor([0.9]))[0])
    before = price.price.clone()
    price.update(budget, budget.clone())  # on budget: no move
    assert torch.equal(price.price, before)


def test_mean_budget_env_charges_each_image_its_compute_at_the_learned_price():
    envs = tiny_envs(8, budget=0.5, budget_mean=True, price_lr=1.0, flops_weight=0.0)
    obs, _ = envs.reset(seed=0)
    keep_all = torch.ones(8, envs.unwrapped.pv.num_patches, dtype=torch.int8).numpy()
    for _ in range(envs.unwrapped.pv.num_stages):  # an episode that spends everything: over by 0.5
        obs, reward, terminated, _, info = envs.step(keep_all)
    assert terminated.all()
    assert float(envs.unwrapped.episodes.price.price[0]) == pytest.approx(0.5)
    for _ in range(envs.unwrapped.pv.num_stages):  # the next one pays price 0.5 for 0.5 over budget
        obs, reward, terminated, _, info = envs.step(keep_all)
    assert info["budget_penalty"] == pytest.approx([0.25] * 8, abs=1e-5)


def test_mean_budget_needs_a_budget():
    with pytest.raises(ValueError, match="budget_mean=True .* pass budget="):
        tiny_envs(2, budget_mean=True)


def test_deterministic_action_is_the_mode_of_the_sampling_distribution():
    envs = tiny_envs(16, budget=(0.25, 1.0), budget_mean=True)
    policy = threshold_policy(envs)
    obs = envs.unwrapped.reset_tensors(seed=1)
    raw, _ = policy(obs)
    policy.calibration = {"budgets": [0.25, 1.0], "shifts": [1.5, -0.5]}
    shifted, _ = policy(obs)
    threshold = 1.5 - 2.0 * (obs["budget"].reshape(-1, 1) - 0.25) / 0.75  # s(b), linear between the two budgets
    assert torch.allclose(shifted, raw - threshold, atol=1e-5)
    mode = torch.distributions.Bernoulli(logits=shifted).probs > 0.5
    assert torch.equal(policy.act(obs, deterministic=True), mode & live_mask(obs))
    sampled = torch.stack([policy.act(obs, deterministic=False) for _ in range(100)]).float().mean(0)
    live = live_mask(obs)
    assert torch.allclose(sampled[live], torch.sigmoid(shifted)[live], atol=0.15)  # samples follow p(l - s)


def test_batch_one_decides_as_the_batch_does():
    envs = tiny_envs(16, budget=0.4, budget_mean=True)
    policy = threshold_policy(envs)
    obs = envs.unwrapped.reset_tensors(seed=2)
    logits = policy.keep_logits(obs).detach()[live_mask(obs)].sort().values
    # A threshold halfway between two logits near the median: a token exactly on it would be decided by rounding.
    middle = logits.numel() // 2
    policy.calibration = {"budgets": [0.4], "shifts": [float(logits[middle : middle + 2].mean())]}
    together = policy.act(obs)
    alone = torch.cat([policy.act({k: v[i : i + 1] for k, v in obs.items()}) for i in range(16)])
    assert torch.equal(together, alone)
    counts = together.sum(1)
    assert counts.min() < counts.max()  # the images keep different counts


def test_calibration_meets_the_mean_budget_on_held_out_images(tmp_path):
    envs = tiny_envs(4, budget=(0.25, 1.0), budget_mean=True)
    pv, policy = envs.unwrapped.pv, threshold_policy(envs)
    calibration = calibrate_thresholds(
        policy, pv, images_of(envs, "val"), [0.4, 0.55, 0.7], iters=14, meta={"backbone": "x"}
    )
    policy.calibration = calibration
    test = images_of(envs, "test")
    for budget in (0.4, 0.55, 0.7):  # within 2% of the asked GFLOPs on images it never saw
        assert mean_gflops_fraction(policy, pv, test, budget) == pytest.approx(budget, rel=0.02)
    save_policy(tmp_path / "agent", policy)
    again = load_policy(tmp_path / "agent")
    assert again.calibration["shifts"] == calibration["shifts"]
    check_calibrated_for(again, backbone="x", budgets=[0.4, 0.7])
    with pytest.raises(ValueError, match="calibrated on backbone x, this one is y"):
        check_calibrated_for(again, backbone="y", budgets=[0.5])
    with pytest.raises(ValueError, match="outside the calibrated range"):
        check_calibrated_for(again, backbone="x", budgets=[0.9])


def test_per_stage_calibration_keeps_the_fixed_schedule_on_average_and_meets_the_budget(tmp_path):
    envs = tiny_envs(4, budget=(0.25, 1.0), budget_mean=True)
    pv, policy = envs.unwrapped.pv, threshold_policy(envs)
    val, test = images_of(envs, "val"), images_of(envs, "test")
    calibration = calibrate_thresholds(policy, pv, val, [0.4, 0.7], iters=14)
    assert all(len(shifts) == pv.num_stages for shifts in calibration["shifts"])
    policy.calibration = calibration
    for budget in (0.4, 0.7):  # within 2% of the asked GFLOPs on images it never saw
        assert spend(policy, pv, test, budget)[1] == pytest.approx(budget, rel=0.02)
    counts, _ = spend(policy, pv, val, 0.4)
    assert counts.tolist() == pytest.approx(list(static_counts(pv, 0.4)), abs=0.5)  # within half a token
    together = policy.act(obs := envs.unwrapped.reset_tensors(seed=3))
    alone = torch.cat([policy.act({k: v[i : i + 1] for k, v in obs.items()}) for i in range(4)])
    assert torch.equal(together, alone)
    save_policy(tmp_path / "agent", policy)
    assert load_policy(tmp_path / "agent").calibration["shifts"] == calibration["shifts"]
    with pytest.raises(ValueError, match=f"one number per budget or {pv.num_stages} per budget"):
        policy.calibration = {"budgets": [0.5], "shifts": [[0.0] * (pv.num_stages + 1)]}


def test_calibration_is_for_threshold_agents_only():
    envs = tiny_envs(4, budget=(0.25, 1.0))
    topk = APTPolicy.for_env(envs, sampling="topk", **SMALL)
    with pytest.raises(ValueError, match="sampling='threshold'"):
        calibrate_thresholds(topk, envs.unwrapped.pv, images_of(envs, "val", 8), [0.5])
    with pytest.raises(ValueError, match="for sampling='threshold'"):
        APTPolicy.for_env(envs, sampling="topk", calibration={"budgets": [0.5], "shifts": [0.0]}, **SMALL)


def test_train_agent_pairs_a_mean_budget_with_threshold_sampling_only():
    module = load_script("train_agent")
    budget = (0.25, 1.0)
    for flags in (
        dict(budget=budget, budget_mean=True, sampling="topk"),  # a mean budget, a fixed-count agent
        dict(budget=budget, sampling="threshold"),  # a threshold agent, a per-image budget
        dict(budget_mean=True, sampling="threshold"),  # a mean of no budget
    ):
        with pytest.raises(ValueError, match="--budget-mean.*--sampling threshold"):
            module.check_args(module.Args(**flags))
    module.check_args(module.Args(budget=(0.25, 1.0), budget_mean=True, sampling="threshold"))


def test_evaluate_takes_each_kind_of_agent_in_its_own_place():
    module = load_script("evaluate")
    envs = tiny_envs(4, budget=(0.25, 1.0), budget_mean=True)
    adaptive, fixed = threshold_policy(envs), APTPolicy.for_env(envs, sampling="topk", **SMALL)
    args = module.Args(agent="A", adaptive_agent="B", budgets=(0.5,))
    with pytest.raises(ValueError, match="agent A was trained for a mean budget .* --adaptive-agent"):
        module.check_agent_kinds(args, adaptive, None, "x")
    with pytest.raises(ValueError, match="--adaptive-agent B was trained for fixed counts .* pass it as --agent"):
        module.check_agent_kinds(args, fixed, fixed, "x")
    with pytest.raises(ValueError, match="never calibrated"):
        module.check_agent_kinds(args, fixed, adaptive, "x")
    adaptive.calibration = {"budgets": [0.25, 1.0], "shifts": [1.0, -1.0], "backbone": "x"}
    module.check_agent_kinds(args, fixed, adaptive, "x")
    with pytest.raises(ValueError, match="--adaptive-agent B on --model .*calibrated on backbone x, this one is y"):
        module.check_agent_kinds(args, fixed, adaptive, "y")
