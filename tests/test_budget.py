"""Budgets in the environment, the budget-conditioned top-k policy, and the ``vs_random`` reward."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gymnasium.utils.env_checker import check_env
from helpers import SMALL, TINY, TINY_VIT, tiny_envs
from stable_baselines3 import PPO

from agents.distributions import (
    gumbel_noise,
    gumbel_top_count,
    plackett_luce_entropy,
    plackett_luce_log_prob,
    top_count_live,
)
from agents.observation import keep_counts
from agents.policy import APTPolicy
from agents.ppo import NativePPO
from agents.sb3_policy import APTActorCriticPolicy
from apt_env.data.datasets import build_dataset
from apt_env.envs.env import APTPruneEnv, APTPruneVectorEnv
from apt_env.envs.model_spec import build_backbone
from apt_env.envs.observe import BudgetKeepRatio
from apt_env.envs.sb3_vec_env import SB3VecEnv
from apt_env.eval.evaluate import budget_keep_ratio

pytestmark = pytest.mark.usefixtures("one_thread")


_envs = tiny_envs


# -- the environment ------------------------------------------------------------------------------


def test_budget_is_observed_in_both_apis_and_drawn_per_episode():
    envs = _envs(num_envs=8, budget=(0.25, 1.0))
    space = envs.single_observation_space
    assert space["budget"].shape == (1,) and space["keep_count"].shape == (1,)
    obs, _ = envs.reset(seed=0)
    assert envs.observation_space.contains(obs)
    budget = obs["budget"][:, 0]
    assert ((budget >= 0.25) & (budget <= 1.0)).all() and len(np.unique(budget)) == 8  # one draw per sub-env
    assert (obs["keep_count"][:, 0] <= 16).all() and (obs["keep_count"][:, 0] >= 1).all()
    for _ in range(envs.pv.num_stages):
        obs, *_, info = envs.step(np.ones((8, 16), dtype=np.int8))
    np.testing.assert_array_equal(info["final_obs"][0]["budget"], budget[:1])  # the episode's own budget
    assert not np.array_equal(obs["budget"][:, 0], budget)  # a new episode draws again
    again = _envs(num_envs=8, budget=(0.25, 1.0))
    np.testing.assert_array_equal(again.reset(seed=0)[0]["budget"][:, 0], budget)  # seeded
    tensors = again.reset_tensors(seed=0)
    assert tensors["budget"].dtype == torch.float32 and tensors["keep_count"].dtype == torch.int64
    np.testing.assert_array_equal(tensors["budget"][:, 0].numpy(), budget)
    # A fixed budget is the same in every episode; without one nothing is observed.
    fixed, _ = _envs(budget=0.5).reset(seed=1)
    assert (fixed["budget"] == 0.5).all()
    assert not {"budget", "keep_count"} & set(_envs().reset(seed=0)[0])


def test_single_env_with_a_budget_passes_the_checker():
    torch.manual_seed(0)
    env = APTPruneEnv(**TINY, budget=(0.3, 0.9), reward="vs_random")
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    assert obs["budget"].shape == (1,) and env.observation_space.contains(obs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(budget=0.0), "budget=0.0"),
        (dict(budget=1.5), "budget=1.5"),
        (dict(budget=(0.8, 0.2)), r"low <= high.*budget=\(0.8, 0.2\)"),
        (dict(budget=(0.2, 1.2)), "budget="),
        (dict(budget="half"), "budget='half'"),
        (dict(budget=0.5, budget_weight=-1.0), "budget_weight"),
        (dict(obs_keys=("tokens", "budget")), "budget"),
    ],
)
def test_bad_budget_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _envs(**kwargs)


def test_keep_ratio_table_matches_the_evaluators_budget_rule():
    pv = build_backbone(TINY["model"], prune_layers=(1, 2, 3))
    table = BudgetKeepRatio(pv)
    budgets = torch.tensor([0.3, 0.4, 0.5, 0.65, 0.8, 1.0], dtype=torch.float64)
    ratios = table(budgets)
    assert [float(r) for r in ratios] == [budget_keep_ratio(pv, float(b)) for b in budgets]


def test_budget_penalty_at_the_last_step_and_the_return_telescopes():
    envs = _envs(num_envs=6, flops_weight=0.5, budget=0.5, budget_weight=3.0)
    envs.reset(seed=1)
    rng = np.random.default_rng(0)
    total, k = np.zeros(6), envs.pv.num_stages
    for step in range(k):
        keep = (rng.random((6, 16)) < (0.95 if step else 0.6)).astype(np.int8)
        _, reward, _, _, info = envs.step(keep)
        total += reward
        if step + 1 < k:
            assert (info["budget_penalty"] == 0).all()
    final = info["final_info"]
    fraction = final["gflops"] * 1e9 / envs.episodes.flops_all
    penalty = 3.0 * np.maximum(0.0, fraction - 0.5)
    np.testing.assert_allclose(final["budget_penalty"], penalty, atol=1e-5)
    assert (penalty > 0).any() and (penalty == 0).any()  # some over budget, some under
    expected = final["loss_plain"] - final["loss_multi"] + 0.5 * (1 - fraction) - penalty
    np.testing.assert_allclose(total, expected, atol=1e-5)


# -- the vs_random reward -----------------------------------------------------------------------


def _random_policy_rewards(envs: APTPruneVectorEnv, episodes: int, seed: int) -> np.ndarray:
    envs.reset(seed=seed)
    rng = np.random.default_rng(seed)
    rewards = []
    for _ in range(episodes * envs.pv.num_stages):
        _, reward, *_ = envs.step((rng.random((envs.num_envs, 16)) < 0.5).astype(np.int8))
        rewards.append(reward)
    return np.concatenate(rewards)


def test_vs_random_is_zero_in_expectation_for_a_random_policy_and_reproducible():
    envs = _envs(num_envs=64, reward="vs_random")
    rewards = _random_policy_rewards(envs, episodes=4, seed=0)
    assert rewards.std() > 0  # the masks do matter to the loss
    assert abs(rewards.mean()) < 3 * rewards.std() / math.sqrt(len(rewards)), (rewards.mean(), rewards.std())
    again = _random_policy_rewards(_envs(num_envs=64, reward="vs_random"), 4, 0)
    np.testing.assert_array_equal(again, rewards)  # the random masks come from the env's seeded generator


def _backbone_trained_with_the_bright_patch_kept() -> torch.nn.Module:
    """A tiny ViT briefly trained on ``synthetic`` (the class is the cell of a bright square: with 16x16
    images and 4x4 patches, exactly the class's patch) under random masks that keep that patch, as joint
    training with an agent that keeps it would: a backbone for which the choice of tokens matters."""
    torch.manual_seed(0)
    pv = build_backbone(("vit_tiny_patch16_224", {**TINY_VIT, "global_pool": "avg"}))
    data = build_dataset("synthetic", split="train", img_size=16, in_chans=1, root="data")
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([int(data[i][1]) for i in range(len(data))])
    optimizer = torch.optim.AdamW(pv.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(images), (64,), generator=g)
        bright = F.one_hot(labels[idx], 16).bool()
        masks = [
            (torch.rand(64, 16, generator=g) < 0.25 + 0.75 * torch.rand(64, 1, generator=g)) | bright for _ in range(3)
        ]
        loss = F.cross_entropy(pv(images[idx], masks), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return pv.eval()


def test_vs_random_rewards_an_oracle_that_keeps_the_bright_patch_and_not_chance():
    envs = APTPruneVectorEnv(
        64, model=_backbone_trained_with_the_bright_patch_kept(), dataset="synthetic", reward="vs_random"
    )
    envs.reset(seed=0)
    g = torch.Generator().manual_seed(0)
    oracle, chance = [], []
    for step in range(6 * envs.pv.num_stages):
        live = envs.episodes.state.mask(16)
        bright = F.one_hot(envs.episodes.labels, 16).bool() & live
        scores = torch.rand(64, 16, generator=g)
        if step < 3 * envs.pv.num_stages:  # the oracle: the bright patch, then random others
            scores = scores + bright
        _, reward, *_ = envs.step_tensors(top_count_live(scores, live, live.sum(1) * 0.5))
        (oracle if step < 3 * envs.pv.num_stages else chance).append(reward)
    oracle, chance = torch.cat(oracle), torch.cat(chance)
    assert oracle.mean() > 3 * oracle.std() / math.sqrt(len(oracle)), (oracle.mean(), oracle.std())
    assert abs(chance.mean()) < 3 * chance.std() / math.sqrt(len(chance)), (chance.mean(), chance.std())
    assert chance.std() > 0.1  # the masks matter to this backbone: chance is zero on average, not always


# -- the top-k policy ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def budget_obs() -> dict[str, torch.Tensor]:
    """A stage-1 observation of an env with budgets, rows with different live tokens and counts."""
    envs = _envs(num_envs=6, budget=(0.4, 1.0))
    envs.reset_tensors(seed=0)
    keep = torch.rand(6, 16, generator=torch.Generator().manual_seed(0)) < 0.7
    obs, *_ = envs.step_tensors(keep)
    assert (obs["live"] == 0).any() and (obs["stage"] == 1).all()
    assert len(obs["keep_count"].unique()) > 1
    return obs


def _topk_policy() -> APTPolicy:
    torch.manual_seed(0)
    return APTPolicy(32, 16, 3, **SMALL, use_budget=True, sampling="topk")


def test_topk_deterministic_action_is_the_top_count_by_logit(budget_obs):
    policy = _topk_policy()
    live, count = budget_obs["live"].bool(), budget_obs["keep_count"][:, 0]
    with torch.no_grad():
        logits, _ = policy(budget_obs)
    keep = policy.act(budget_obs, deterministic=True)
    assert torch.equal(keep.sum(1), count) and not (keep & ~live).any()
    lowest_kept = logits.masked_fill(~keep, float("inf")).min(1).values
    highest_dropped = logits.masked_fill(keep | ~live, float("-inf")).max(1).values
    assert (lowest_kept >= highest_dropped).all()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        sampled = policy.act(budget_obs, deterministic=False, generator=g)
        assert torch.equal(sampled.sum(1), count) and not (sampled & ~live).any()


def test_top_count_set_is_the_mode_and_gumbel_top_k_samples_plackett_luce():
    """Exact set probabilities (summed over orders) on 5 tokens: the top-2 set is the most likely, the
    sampler's frequencies match, and the surrogate is the log-probability of the set's best order."""
    logits = torch.tensor([[1.2, -0.3, 0.4, 2.0, -1.0]])
    live = torch.tensor([[True, True, True, True, False]])  # token 4 was pruned
    weights = logits[0, :4].exp()

    def order_prob(order):
        left, p = weights.sum(), 1.0
        for i in order:
            p, left = p * weights[i] / left, left - weights[i]
        return float(p)

    sets = list(itertools.combinations(range(4), 2))
    exact = {s: order_prob(s) + order_prob(s[::-1]) for s in sets}
    mode = max(exact, key=exact.get)
    count = torch.tensor([2])
    top = top_count_live(logits, live, count.float())
    assert set(top[0].nonzero().flatten().tolist()) == set(mode)
    many = gumbel_top_count(
        logits.expand(40000, 5), live.expand(40000, 5), count.expand(40000), torch.Generator().manual_seed(0)
    )
    assert not many[:, 4].any() and (many.sum(1) == 2).all()
    for s in sets:
        freq = (many[:, list(s)].all(1)).float().mean().item()
        assert abs(freq - exact[s]) < 0.01, (s, freq, exact[s])
    for s in sets:
        keep = torch.zeros(1, 5, dtype=torch.bool)
        keep[0, list(s)] = True
        best = max(order_prob(s), order_prob(s[::-1]))
        assert abs(plackett_luce_log_prob(logits, live, keep).item() - math.log(best)) < 1e-5
    # Entropy surrogate: the first pick's entropy plus the second's, along the descending order.
    first = torch.softmax(logits[0, :4], 0)
    second = torch.softmax(logits[0, [0, 1, 2]], 0)  # token 3 (the highest) taken first
    expected = -(first * first.log()).sum() - (second * second.log()).sum()
    torch.testing.assert_close(plackett_luce_entropy(logits, live, count), expected.reshape(1))


def test_topk_log_probs_agree_between_sampling_and_evaluation(budget_obs):
    policy = _topk_policy()
    g = torch.Generator().manual_seed(1)
    action, log_prob, entropy, value = policy.get_action_and_value(budget_obs, generator=g)
    assert torch.equal(action.sum(1).long(), budget_obs["keep_count"][:, 0])
    assert torch.isfinite(log_prob).all() and (log_prob <= 0).all() and (entropy > 0).all()
    _, again, entropy2, value2 = policy.get_action_and_value(budget_obs, action)
    torch.testing.assert_close(again, log_prob)
    torch.testing.assert_close(entropy2, entropy)
    torch.testing.assert_close(value2, value)
    # The mode is at least as likely as any sample, under the surrogate too.
    mode = policy.act(budget_obs).float()
    _, mode_log_prob, _, _ = policy.get_action_and_value(budget_obs, mode)
    assert (mode_log_prob >= log_prob - 1e-6).all()
    # Gradients are finite everywhere (pruned tokens, rows keeping every live token).
    _, lp, ent, _ = policy.get_action_and_value(budget_obs, budget_obs["live"].float())
    (lp.sum() + ent.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)


def test_budget_enters_the_network(budget_obs):
    policy = _topk_policy()
    with torch.no_grad():
        logits, value = policy(budget_obs)
        other, other_value = policy({**budget_obs, "budget": 1 - budget_obs["budget"]})
    assert not torch.allclose(logits, other) and not torch.allclose(value, other_value)
    live = torch.full((6, 3), 16)
    extra = policy.decision_flops(live) - APTPolicy(32, 16, 3, **SMALL).decision_flops(live)
    assert (extra == 3 * policy.hidden).all()  # the budget's projection, once per stage


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_topk_policy_meets_the_budget(budget):
    """Keeping obs['keep_count'] at every stage ends at the budget's FLOPs (to the reachable counts)."""
    vit = dict(TINY_VIT, patch_size=2, depth=6)  # 64 patches, pruning from block 1: fine FLOPs steps
    torch.manual_seed(0)
    envs = APTPruneVectorEnv(
        8, model=("vit_tiny_patch16_224", vit), dataset="synthetic", prune_layers=(1, 2, 3), budget=budget
    )
    policy = APTPolicy.for_env(envs, **SMALL, sampling="topk")
    obs = envs.reset_tensors(seed=0)
    g = torch.Generator().manual_seed(0)
    fractions, penalties = [], []
    for _ in range(2 * envs.pv.num_stages):
        obs, _, terminated, _, info = envs.step_tensors(policy.act(obs, deterministic=False, generator=g))
        if terminated.all():
            fractions.append(info["final_info"]["gflops"].double() * 1e9 / envs.episodes.flops_all)
            penalties.append(info["final_info"]["budget_penalty"])
    fraction = torch.cat(fractions).mean().item()
    assert abs(fraction - budget) < 0.05 * budget, fraction
    assert torch.cat(penalties).max().item() < 2.0 * 0.05 * budget


# -- mismatches, trainers -------------------------------------------------------------------------


def test_policy_and_env_budgets_must_match(budget_obs):
    plain_envs, budget_envs = _envs(), _envs(budget=0.5)
    blind = APTPolicy.for_env(plain_envs, **SMALL)
    with pytest.raises(ValueError, match="use_budget=False"):
        blind(budget_obs)
    with pytest.raises(ValueError, match="use_budget=False"):
        APTPolicy.for_env(budget_envs, use_budget=False)
    aware = APTPolicy.for_env(budget_envs, **SMALL)
    assert aware.use_budget and aware.config()["use_budget"]
    with pytest.raises(ValueError, match="use_budget=True"):
        aware(plain_envs.reset_tensors(seed=0))
    with pytest.raises(ValueError, match="sampling='topk'.*budget="):
        APTPolicy.for_env(plain_envs, sampling="topk")
    with pytest.raises(ValueError, match="sampling"):
        APTPolicy(32, 16, 3, sampling="greedy")
    assert "budget_embed.weight" not in blind.state_dict()  # no budget, today's parameters


def test_native_ppo_trains_the_topk_policy_on_a_budget_range():
    envs = _envs(num_envs=8, budget=(0.25, 1.0))
    trainer = NativePPO(envs, episodes_per_rollout=1, seed=0, policy_kwargs=dict(**SMALL, sampling="topk"))
    assert trainer.policy.use_budget and trainer.policy.sampling == "topk"
    history = trainer.learn(2 * trainer.steps_per_rollout)
    assert len(history) == 2
    for stats in history:
        assert math.isfinite(stats["episode_return"]) and math.isfinite(stats["approx_kl"])
        assert 0.0 <= stats["budget_penalty"] < 0.2


def test_sb3_ppo_trains_the_topk_policy_and_predicts_the_budgets_count():
    venv = SB3VecEnv(_envs(budget=(0.3, 1.0)))
    model = PPO(
        APTActorCriticPolicy,
        venv,
        n_steps=6,
        batch_size=12,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs=dict(**SMALL, sampling="topk"),
    )
    model.learn(total_timesteps=48)
    obs = venv.reset()
    action, _ = model.predict(obs, deterministic=True)
    np.testing.assert_array_equal(action.sum(1), obs["keep_count"][:, 0])
    sampled, _ = model.predict(obs, deterministic=False)
    np.testing.assert_array_equal(sampled.sum(1), obs["keep_count"][:, 0])


def test_a_fixed_gumbel_draw_makes_the_agents_sample_a_rule_of_the_image_alone():
    envs = tiny_envs(8, budget=0.5)
    torch.manual_seed(0)
    policy = APTPolicy.for_env(envs, sampling="topk", **SMALL).eval()
    obs = envs.unwrapped.reset_tensors(seed=3)
    draw = gumbel_noise((policy.num_patches,), torch.Generator().manual_seed(0))
    together = policy.act(obs, deterministic=False, gumbel=draw)
    one = [{k: v[i : i + 1] for k, v in obs.items()} for i in range(8)]
    alone = torch.cat([policy.act(o, deterministic=False, gumbel=draw) for o in one])
    assert torch.equal(together, alone) and torch.equal(together, policy.act(obs, deterministic=False, gumbel=draw))
    assert torch.equal(together.sum(1), keep_counts(obs))  # the budget's count, as any sample
    other = gumbel_noise((policy.num_patches,), torch.Generator().manual_seed(1))
    assert not torch.equal(together, policy.act(obs, deterministic=False, gumbel=other))
    bernoulli = APTPolicy.for_env(tiny_envs(2), **SMALL)
    with pytest.raises(ValueError, match="fixed Gumbel draw is for sampling='topk'"):
        bernoulli.act(tiny_envs(2).unwrapped.reset_tensors(seed=0), deterministic=False, gumbel=draw[:16])
