import numpy as np
import pytest
import torch
from helpers import SMALL, tiny_envs
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.preprocessing import preprocess_obs
from stable_baselines3.common.utils import obs_as_tensor

from agents.baselines import ClsAttentionTopK, KeepAll, RandomKeep
from agents.policy import PRUNED_LOGIT, APTPolicy, TokenPolicy
from agents.ppo import NativePPO
from agents.sb3_policy import APTActorCriticPolicy
from apt_env.envs.sb3_vec_env import SB3VecEnv
from apt_env.train.state import load_train_state, save_train_state

pytestmark = pytest.mark.usefixtures("one_thread")


_envs = tiny_envs


@pytest.fixture(scope="module")
def pruned_obs() -> dict[str, torch.Tensor]:
    """A stage-1 observation in which rows have pruned tokens (different ones per row)."""
    envs = _envs(num_envs=6)
    envs.reset_tensors(seed=0)
    keep = torch.rand(6, 16, generator=torch.Generator().manual_seed(0)) < 0.6
    keep[:, 0] = True
    obs, *_ = envs.step_tensors(keep)
    assert (obs["live"] == 0).any() and (obs["stage"] == 1).all()
    return obs


def _policy(**kwargs) -> APTPolicy:
    torch.manual_seed(0)
    return APTPolicy(32, 16, 3, **{**SMALL, **kwargs})


def test_forward_and_get_action_and_value_shapes(pruned_obs):
    policy = APTPolicy.for_env(_envs(), **SMALL)
    assert (policy.embed_dim, policy.num_patches, policy.num_stages, policy.use_cls_attn) == (32, 16, 3, True)
    logits, value = policy(pruned_obs)
    assert logits.shape == (6, 16) and value.shape == (6,)
    action, log_prob, entropy, value2 = policy.get_action_and_value(pruned_obs)
    assert action.shape == (6, 16) and action.dtype == torch.float32 and set(action.unique().tolist()) <= {0.0, 1.0}
    assert log_prob.shape == entropy.shape == value2.shape == (6,)
    torch.testing.assert_close(value, value2)
    assert (logits[pruned_obs["live"] == 0] == PRUNED_LOGIT).all()


def test_a_decision_runs_on_the_live_tokens_only_and_skips_the_value_head(pruned_obs):
    policy = _policy()
    logits, _ = policy(pruned_obs)
    torch.testing.assert_close(policy.keep_logits(pruned_obs), logits, atol=0, rtol=0)
    # Pruned positions are not read: garbage there changes nothing.
    dead = pruned_obs["live"] == 0
    garbage = {**pruned_obs, "tokens": pruned_obs["tokens"].masked_fill(dead[..., None], 1e6)}
    torch.testing.assert_close(policy(garbage), policy(pruned_obs), atol=0, rtol=0)
    # Its FLOPs grow with the live tokens: one token's worth per token, whatever the positions.
    live = torch.tensor([[16, 9, 4], [16, 16, 16], [16, 9, 5]])
    flops = policy.decision_flops(live)
    assert flops[0] < flops[2] < flops[1] and flops[1] - flops[2] == 18 * (flops[2] - flops[0])
    calls = []
    policy.value_head.register_forward_hook(lambda *args: calls.append(1))
    policy.act(pruned_obs) & policy.act(pruned_obs, deterministic=False)
    assert calls == []


def test_rows_of_one_count_and_rows_of_all_tokens_score_as_rows_of_any_count(pruned_obs):
    """The shortcuts for a batch whose rows keep the same count (a budget's), or every token, give the logits and
    values that each row gets in a batch of mixed counts."""
    policy = _policy(use_cls_attn=True)
    keep = torch.zeros(6, 16, dtype=torch.int8)
    keep[:3, :7] = 1  # three rows of 7 live tokens
    keep[3:5] = 1  # two rows of all 16
    keep[5, ::2] = 1  # one of 8
    obs = {**pruned_obs, "live": keep}
    mixed_logits, mixed_values = policy(obs)
    for rows in (slice(0, 3), slice(3, 5)):  # same-count batches
        logits, values = policy({key: value[rows] for key, value in obs.items()})
        torch.testing.assert_close(logits, mixed_logits[rows])
        torch.testing.assert_close(values, mixed_values[rows])
    assert (mixed_logits[:3, 7:] == PRUNED_LOGIT).all() and (mixed_logits[3:5] > PRUNED_LOGIT).all()


def test_the_folded_value_projection_is_fc1_on_v_and_is_folded_again_after_every_update(pruned_obs):
    policy = _policy()
    for p in (policy.fc1.bias, policy.v.bias, policy.k.bias):
        torch.nn.init.normal_(p)  # no zero bias hides a term
    o = policy.prepare(pruned_obs)
    rows, cols = o.live.nonzero(as_tuple=True)
    x = policy.token_norm(o.tokens[rows, cols])
    feats = [policy.v(x), policy.q(policy.cls_norm(o.cls))[rows] * policy.k(x), o.cls_attn[rows, cols, None] * 16]
    h = policy.fc1(torch.cat(feats, -1)) + policy.stage_embed(o.stage)[rows]
    unfolded = policy.logit_head(policy.act_fn(policy.fc2(policy.act_fn(h)))).squeeze(-1)
    torch.testing.assert_close(policy.keep_logits(pruned_obs)[rows, cols], unfolded)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    for _ in range(2):
        with torch.no_grad():
            kept = policy.keep_logits(pruned_obs)  # the fold kept from the last call without gradients
        torch.testing.assert_close(kept, policy.keep_logits(pruned_obs))  # folded anew, with gradients
        optimizer.zero_grad()
        policy(pruned_obs)[0].logsumexp(1).sum().backward()
        optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(policy.keep_logits(pruned_obs), kept)


def test_the_attention_mixer_makes_scores_depend_on_the_other_live_tokens_only(pruned_obs, tmp_path):
    from agents.io import load_policy, save_policy

    policy = _policy(mixer="attention")
    logits, value = policy(pruned_obs)
    assert torch.isfinite(logits).all() and torch.isfinite(value).all()
    dead = pruned_obs["live"] == 0
    garbage = {**pruned_obs, "tokens": pruned_obs["tokens"].masked_fill(dead[..., None], 1e6)}
    torch.testing.assert_close(policy(garbage)[0], logits)  # pruned tokens are not attended to
    live = (pruned_obs["live"] == 1).nonzero()
    row, col = int(live[0, 0]), int(live[0, 1])
    other = int(live[1, 1]) if int(live[1, 0]) == row else None
    edited = pruned_obs["tokens"].clone()
    edited[row, col] += torch.randn(edited.shape[-1], generator=torch.Generator().manual_seed(0))
    changed = policy({**pruned_obs, "tokens": edited})[0]
    assert other is not None and changed[row, other] != logits[row, other]  # another token's score moved
    solo = _policy()  # without the mixer, scores are per token
    torch.testing.assert_close(solo({**pruned_obs, "tokens": edited})[0][row, other], solo(pruned_obs)[0][row, other])
    assert policy.decision_flops(torch.tensor([[16, 8, 4]])) > solo.decision_flops(torch.tensor([[16, 8, 4]]))
    again = load_policy(save_policy(tmp_path / "agent", policy))
    assert again.mixer == "attention"
    torch.testing.assert_close(again(pruned_obs)[0], logits)
    with pytest.raises(ValueError, match="mixer"):
        _policy(mixer="transformer")


def test_log_prob_and_entropy_are_bernoulli_over_live_tokens(pruned_obs):
    policy = _policy()
    action, log_prob, entropy, _ = policy.get_action_and_value(pruned_obs)
    logits, _ = policy(pruned_obs)
    live = pruned_obs["live"].bool()
    for i in range(6):
        dist = torch.distributions.Bernoulli(logits=logits[i, live[i]])
        assert abs(dist.log_prob(action[i, live[i]]).sum().item() - log_prob[i].item()) < 1e-5
        assert abs(dist.entropy().sum().item() - entropy[i].item()) < 1e-5
    # Summing over every token (as SB3 does) gives the same: pruned tokens add ~0.
    full = torch.distributions.Bernoulli(logits=logits)
    torch.testing.assert_close(full.log_prob(action).sum(1), log_prob, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.entropy().sum(1), entropy, atol=1e-5, rtol=0)
    # Evaluating the sampled action again gives the same log-probability.
    _, again, _, _ = policy.get_action_and_value(pruned_obs, action)
    torch.testing.assert_close(again, log_prob)


def test_pruned_tokens_are_never_kept(pruned_obs):
    policy = _policy(init_keep_prob=0.999)  # every live token would be kept
    live = pruned_obs["live"].bool()
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        sampled = policy.act(pruned_obs, deterministic=False, generator=g)
        assert not (sampled & ~live).any()
        action, *_ = policy.get_action_and_value(pruned_obs, generator=g)
        assert not (action.bool() & ~live).any()
    assert torch.equal(policy.act(pruned_obs), live)  # threshold: all live, no pruned
    assert not (policy.act(pruned_obs, keep_ratio=0.5) & ~live).any()


def test_top_k_keeps_the_highest_logits_at_the_ratio(pruned_obs):
    policy = _policy()
    live = pruned_obs["live"].bool()
    logits, _ = policy(pruned_obs)
    for ratio in (0.25, 0.5, 0.75, 1.0, 1e-3):
        keep = policy.act(pruned_obs, keep_ratio=ratio)
        expected = torch.floor(live.sum(1) * ratio + 0.5).clamp(min=1)
        torch.testing.assert_close(keep.sum(1).float(), expected)
        lowest_kept = logits.masked_fill(~keep, float("inf")).min(1).values
        highest_dropped = logits.masked_fill(keep | ~live, -float("inf")).max(1).values
        assert (lowest_kept >= highest_dropped).all()
    with pytest.raises(ValueError, match="keep_ratio"):
        policy.act(pruned_obs, keep_ratio=0.0)


def test_accepts_numpy_and_sb3_preprocessed_observations(pruned_obs):
    envs = _envs()
    policy = _policy()
    logits, value = policy(pruned_obs)
    as_numpy = {k: v.numpy() for k, v in pruned_obs.items()}
    torch.testing.assert_close(policy(as_numpy)[0], logits)
    space = envs.single_observation_space
    one_hot = preprocess_obs(obs_as_tensor(as_numpy, "cpu"), space)
    assert one_hot["stage"].shape == (6, 3) and one_hot["live"].dtype == torch.float32
    torch.testing.assert_close(policy(one_hot)[0], logits)
    # SB3's rollout buffer stores a Discrete observation as (B, 1): one-hot (B, 1, K).
    buffered = {**as_numpy, "stage": as_numpy["stage"].reshape(6, 1).astype(np.float32)}
    l2, v2 = policy(preprocess_obs(obs_as_tensor(buffered, "cpu"), space))
    torch.testing.assert_close(l2, logits)
    torch.testing.assert_close(v2, value)


def test_size_mismatch_and_missing_key_errors(pruned_obs):
    expected = "policy expects 49 tokens of width 192, observation has 16 tokens of width 32"
    with pytest.raises(ValueError, match=expected):
        APTPolicy(192, 49, 3)(pruned_obs)
    without_attn = {k: v for k, v in pruned_obs.items() if k != "cls_attn"}
    with pytest.raises(ValueError, match="cls_attn"):
        _policy()(without_attn)
    assert _policy(use_cls_attn=False)(without_attn)[0].shape == (6, 16)
    assert not APTPolicy.for_env(_envs(obs_keys=("tokens", "cls", "live", "stage"))).use_cls_attn
    with pytest.raises(ValueError, match="obs_keys"):
        APTPolicy.for_env(_envs(obs_keys=("live", "stage")))


def test_all_policies_share_the_token_policy_interface(pruned_obs):
    live = pruned_obs["live"].bool()
    for policy in (_policy(), KeepAll(), RandomKeep(0.5, seed=0), ClsAttentionTopK(0.5)):
        assert isinstance(policy, TokenPolicy)
        keep = policy.act(pruned_obs, deterministic=True, keep_ratio=None)
        assert keep.shape == (6, 16) and keep.dtype == torch.bool and not (keep & ~live).any()
    assert torch.equal(KeepAll().act(pruned_obs), live)


def test_cls_attention_top_k_keeps_the_most_attended_live_tokens():
    attn = torch.tensor([[0.1, 0.5, 0.05, 0.2, 0.15, 0.0], [0.3, 0.1, 0.2, 0.25, 0.05, 0.1]])
    keep = torch.tensor([[1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.int8)
    obs = {"cls_attn": attn, "live": keep}
    got = ClsAttentionTopK(0.5).act(obs)  # row 0: 5 live -> 3 kept (0.5 rounds up); token 1 is pruned
    expected = torch.tensor([[1, 0, 0, 1, 1, 0], [1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(got, expected)
    assert ClsAttentionTopK(0.5).act(obs, keep_ratio=0.2).sum(1).tolist() == [1, 1]
    with pytest.raises(ValueError, match="cls_attn"):
        ClsAttentionTopK(0.5).act({"live": keep})


def test_random_keep_ratio_and_seed():
    keep = torch.ones(64, 20, dtype=torch.int8)
    keep[:, :4] = 0  # 16 live tokens per row
    obs = {"live": keep, "tokens": torch.zeros(64, 20, 2)}
    a = RandomKeep(0.25, seed=1).act(obs)
    assert (a.sum(1) == 4).all() and not a[:, :4].any()
    assert torch.equal(a, RandomKeep(0.25, seed=1).act(obs))
    assert not torch.equal(a, RandomKeep(0.25, seed=2).act(obs))
    frequency = a[:, 4:].float().mean(0)  # every live token equally likely
    assert frequency.min() > 0.05 and frequency.max() < 0.5


@pytest.mark.parametrize("algo", [PPO, A2C])
def test_sb3_trains_the_apt_policy_and_round_trips(algo, tmp_path):
    venv = SB3VecEnv(_envs())
    kwargs = dict(n_steps=6, seed=0, device="cpu", policy_kwargs=dict(SMALL))  # SB3 edits it in place
    if algo is PPO:
        kwargs.update(batch_size=12, n_epochs=2)
    model = algo(APTActorCriticPolicy, venv, **kwargs)
    assert isinstance(model.policy.net, APTPolicy) and model.policy.net.fc1.out_features == 16
    before = [p.detach().clone() for p in model.policy.net.parameters()]
    model.learn(total_timesteps=240)
    assert model.num_timesteps >= 240
    assert any(not torch.equal(b, p) for b, p in zip(before, model.policy.net.parameters()))
    venv.seed(5)
    obs = venv.reset()
    action, _ = model.predict(obs, deterministic=True)
    assert action.shape == (4, 16) and set(np.unique(action)) <= {0, 1}
    model.save(tmp_path / "agent")
    loaded = algo.load(tmp_path / "agent", device="cpu")
    assert isinstance(loaded.policy, APTActorCriticPolicy) and loaded.policy.net.fc1.out_features == 16
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], action)
    values = model.policy.predict_values(obs_as_tensor(obs, "cpu"))
    assert values.shape == (4, 1)
    torch.testing.assert_close(loaded.policy.predict_values(obs_as_tensor(obs, "cpu")), values)
    # The APT policy alone, out of SB3's zip, as evaluate.py takes an agent: the same weights.
    from agents.io import load_any_policy

    alone = load_any_policy(tmp_path / "agent.zip")
    for name, tensor in model.policy.net.state_dict().items():
        torch.testing.assert_close(alone.state_dict()[name], tensor)
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable stable-baselines3 zip"):
        load_any_policy(tmp_path / "broken.zip")


def test_sb3_deterministic_prediction_prunes_as_act_does():
    """SB3's Bernoulli mode thresholds at 0.5, which keeps every token of a policy with keep probabilities
    of 0.7; the deterministic prediction keeps the expected count, as ``APTPolicy.act``."""
    venv = SB3VecEnv(_envs())
    model = PPO(
        APTActorCriticPolicy,
        venv,
        n_steps=6,
        batch_size=24,
        seed=0,
        device="cpu",
        policy_kwargs=dict(**SMALL, init_keep_prob=0.7),
    )
    venv.seed(0)
    obs = venv.reset()
    with torch.no_grad():
        logits, _ = model.policy.net(obs)
    assert (torch.sigmoid(logits) > 0.5).all()
    action, _ = model.predict(obs, deterministic=True)
    assert (action.sum(1) < 16).all() and (action.sum(1) >= 10).all()
    np.testing.assert_array_equal(action, model.policy.net.act(obs, deterministic=True).numpy())


def _trainer(seed: int, **kwargs) -> NativePPO:
    envs = _envs(num_envs=8, flops_weight=1.0)
    args = dict(lr=3e-3, episodes_per_rollout=2, seed=seed, policy_kwargs=dict(**SMALL, init_keep_prob=0.9))
    return NativePPO(envs, **{**args, **kwargs})


def test_native_ppo_learns_to_prune_when_flops_are_rewarded():
    trainer = _trainer(seed=0)
    seen = []
    history = trainer.learn(20 * trainer.steps_per_rollout, callback=seen.append)
    assert len(history) == 20 and seen == history and trainer.global_step == 20 * 48
    assert {"episode_return", "loss_delta", "keep_ratio", "gflops", "sps", "policy_loss", "value_loss"} <= set(
        history[0]
    )
    first = np.mean([s["episode_return"] for s in history[:4]])
    last = np.mean([s["episode_return"] for s in history[-4:]])
    assert last > first + 0.15, (first, last)
    assert history[-1]["keep_ratio"] < history[0]["keep_ratio"] - 0.2


def test_native_ppo_is_reproducible_and_resumes():
    a, b = _trainer(seed=3), _trainer(seed=3)
    ha, hb = a.learn(2 * a.steps_per_rollout), b.learn(2 * b.steps_per_rollout)
    for sa, sb in zip(ha, hb):
        assert {k: v for k, v in sa.items() if k != "sps"} == {k: v for k, v in sb.items() if k != "sps"}
    for pa, pb in zip(a.policy.parameters(), b.policy.parameters()):
        assert torch.equal(pa, pb)
    c = _trainer(seed=4)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.policy.parameters(), c.policy.parameters()))
    c.load_state_dict(a.state_dict())
    assert c.global_step == a.global_step and c.num_rollouts == 2
    for pa, pc in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(pa, pc)
    assert c.learn(1)[0]["global_step"] == 3 * c.steps_per_rollout


def test_deterministic_act_keeps_the_expected_count_by_logit(pruned_obs):
    policy = _policy()
    with torch.no_grad():
        logits, _ = policy(pruned_obs)
    live = pruned_obs["live"].bool()
    keep = policy.act(pruned_obs, deterministic=True)
    expected = torch.floor((torch.sigmoid(logits) * live).sum(1) + 0.5).clamp(min=1)
    assert torch.equal(keep.sum(1).float(), expected)
    # The kept tokens are the live ones with the highest logits.
    lowest_kept = logits.masked_fill(~keep, float("inf")).min(1).values
    highest_dropped = logits.masked_fill(keep | ~live, float("-inf")).max(1).values
    assert (lowest_kept >= highest_dropped).all()


def test_native_ppo_stores_and_credits_the_executed_action(monkeypatch):
    """The env tops rows up to min_keep; PPO must learn from what was done, not what was sampled."""
    envs = _envs(num_envs=4, min_keep=4)
    trainer = NativePPO(envs, episodes_per_rollout=1, seed=0, policy_kwargs=dict(**SMALL, init_keep_prob=0.05))
    sampled, done = [], []
    step = envs.step_tensors

    def spy(action):
        obs, reward, terminated, truncated, info = step(action)
        sampled.append(action.clone())
        done.append(info["final_obs"]["live"] if "final_obs" in info else obs["live"])  # the mask in force
        return obs, reward, terminated, truncated, info

    monkeypatch.setattr(envs, "step_tensors", spy)
    rollout, _ = trainer._collect()
    assert (torch.stack(sampled).sum(-1) < 4).any(), "the policy must ask for fewer than min_keep tokens"
    torch.testing.assert_close(rollout["actions"], torch.stack(done).float())
    flat_obs = {key: v.flatten(0, 1) for key, v in rollout["obs"].items()}
    with torch.no_grad():
        _, log_prob, _, _ = trainer.policy.get_action_and_value(flat_obs, rollout["actions"].flatten(0, 1))
    torch.testing.assert_close(rollout["log_probs"].flatten(), log_prob)


def test_gae_matches_a_hand_computation_and_stops_at_every_episode_end():
    """Two episodes of K = 3 stages per sub-environment; the stage after the last has no value (the episode
    terminated: nothing is bootstrapped across it) and no advantage is carried back over it. Every number is
    dyadic, so float32 holds it exactly. gamma = lambda = 0.5: delta = r + 0.5 v' - v, A = delta + 0.25 A'."""
    trainer = NativePPO(_envs(num_envs=2), gamma=0.5, gae_lambda=0.5, seed=0, policy_kwargs=SMALL)
    assert trainer.num_stages == 3
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0], [1.0] * 6]).T  # (T, B)
    values = torch.tensor([[0.5, 1.0, 1.0, 1.0, 0.0, 0.5], [0.0] * 6]).T
    expected = torch.tensor(
        [
            # env 0, episode 2: A5 = 1 - 0.5; A4 = (1 + 0.5 * 0.5 - 0) + 0.25 * 0.5; A3 = (0 + 0 - 1) + 0.25 * 1.375
            # episode 1: A2 = 2 - 1 (not 2 + 0.5 * v3 - 1 + 0.25 * A3); A1 = (0 + 0.5 - 1) + 0.25; A0 = 1 - 0.0625
            [0.9375, -0.25, 1.0, -0.65625, 1.375, 0.5],
            # env 1, every reward 1 and value 0: 1, 1 + 0.25, 1 + 0.25 * 1.25 from each episode's end
            [1.3125, 1.25, 1.0, 1.3125, 1.25, 1.0],
        ]
    ).T
    torch.testing.assert_close(trainer._gae(rewards, values), expected, rtol=0, atol=0)


def test_native_ppo_resumed_from_its_state_ends_with_the_uninterrupted_weights(tmp_path):
    """Weights after more training, not counters: a trainer built with another seed and loaded from the state
    after 2 rollouts ends, a rollout later, bit for bit where the saved one ends (it restarts its episodes)."""
    a = _trainer(seed=3, episodes_per_rollout=1)
    a.learn(2 * a.steps_per_rollout)
    # Through a file, as a checkpoint: state_dict() holds a's own tensors (Adam's moments, its step count),
    # which a's next updates would change under b.
    saved = save_train_state(tmp_path / "state.pt", a.state_dict())
    a.restart_episodes()
    b = _trainer(seed=4, episodes_per_rollout=1)
    b.load_state_dict(load_train_state(saved))
    halfway = {k: v.clone() for k, v in a.policy.state_dict().items()}
    a.learn(1)
    b.learn(1)
    expected, resumed = a.policy.state_dict(), b.policy.state_dict()
    assert not all(torch.equal(halfway[k], v) for k, v in expected.items()), "the last rollout must train"
    assert [k for k, v in expected.items() if not torch.equal(resumed[k], v)] == []
