import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import apt_env  # noqa: F401  (registers APTPrune-v0)
from apt_env.env import APTPruneEnv, APTPruneVectorEnv

# A tiny backbone on the synthetic dataset: fast, and every code path of the env.
TINY = dict(
    model=(
        "vit_tiny_patch16_224",
        dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, depth=4, embed_dim=32, num_heads=2),
    ),
    dataset="synthetic",
)


def _vec(num_envs: int = 4, **kwargs) -> APTPruneVectorEnv:
    torch.manual_seed(0)  # the same untrained weights in every env built here
    return APTPruneVectorEnv(num_envs, **{**TINY, **kwargs})


def _rollout(envs: APTPruneVectorEnv, seed: int, steps: int) -> list:
    obs, _ = envs.reset(seed=seed)
    envs.action_space.seed(seed)
    out = [obs]
    for _ in range(steps):
        obs, reward, term, trunc, info = envs.step(envs.action_space.sample())
        out.append((obs, reward, term))
    return out


def test_make_and_make_vec_from_registry():
    env = gym.make("APTPrune-v0", **TINY)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    envs = gym.make_vec("APTPrune-v0", num_envs=5, vectorization_mode="vector_entry_point", **TINY)
    assert isinstance(envs.unwrapped, APTPruneVectorEnv) and envs.num_envs == 5
    obs, _ = envs.reset(seed=0)
    assert envs.observation_space.contains(obs)
    assert obs["tokens"].shape == (5, 16, 32) and obs["keep"].dtype == np.int8


def test_gymnasium_and_sb3_checkers_pass():
    torch.manual_seed(0)
    env = APTPruneEnv(**TINY)
    check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)


def test_same_seed_same_rollout_and_other_seed_differs():
    a = _rollout(_vec(), seed=3, steps=5)
    b = _rollout(_vec(), seed=3, steps=5)
    c = _rollout(_vec(), seed=4, steps=5)
    for (oa, ra, _), (ob, rb, _) in zip(a[1:], b[1:]):
        np.testing.assert_array_equal(ra, rb)
        for key in oa:
            np.testing.assert_array_equal(oa[key], ob[key])
    assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def test_rewards_telescope_to_plain_minus_final_plus_flops_saved():
    envs = _vec(num_envs=6, flops_weight=0.5)
    envs.reset(seed=1)
    rng = np.random.default_rng(0)
    total = np.zeros(6)
    k = envs.pv.num_stages
    for step in range(k):
        action = (rng.random((6, envs.pv.num_patches)) < 0.7).astype(np.int8)
        _, reward, term, _, info = envs.step(action)
        total += reward
        assert term.all() == (step == k - 1)
    final = info["final_info"]
    saved = 1 - final["gflops"] * 1e9 / envs.episodes.flops_all
    assert (saved > 0.1).all()
    expected = final["loss_plain"] - final["loss_multi"] + 0.5 * saved
    np.testing.assert_allclose(total, expected, atol=1e-5)


def test_channels_single_multi_plain():
    envs = _vec(num_envs=3)
    envs.reset(seed=0)
    n = envs.pv.num_patches
    keep_half = np.zeros((3, n), dtype=np.int8)
    keep_half[:, : n // 2] = 1
    _, _, _, _, info = envs.step(keep_half)
    np.testing.assert_allclose(info["loss_single"], info["loss_multi"])  # one action so far
    np.testing.assert_allclose(info["keep_ratio"], 0.5, atol=1 / n)
    other = np.zeros((3, n), dtype=np.int8)
    other[:, n // 2 :] = 1  # disjoint from the first: alone it keeps half, together min_keep
    _, _, _, _, info = envs.step(other)
    assert not np.allclose(info["loss_single"], info["loss_multi"])
    np.testing.assert_allclose(info["keep_ratio"], 1 / n)


def test_loss_plain_is_the_unpruned_model():
    envs = _vec(num_envs=4, channels=("plain", "multi"), obs_keys=("keep",))
    envs.reset(seed=0)
    idx = gym.utils.seeding.np_random(0)[0].integers(0, len(envs.data), size=4)
    images = torch.stack([envs.data[int(i)][0] for i in idx])
    labels = torch.tensor([envs.data[int(i)][1] for i in idx])
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(envs.pv.model(images), labels, reduction="none")
    _, _, _, _, info = envs.step(np.ones((4, envs.pv.num_patches), dtype=np.int8))
    np.testing.assert_allclose(info["loss_plain"], expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(info["loss_multi"], expected.numpy(), atol=1e-5)
    assert "loss_single" not in info


def test_only_requested_keys_and_channels():
    envs = _vec(obs_keys=("keep", "stage"), channels=("plain", "multi"))
    obs, _ = envs.reset(seed=0)
    assert set(obs) == {"keep", "stage"} and set(envs.single_observation_space.spaces) == {"keep", "stage"}
    _, _, _, _, info = envs.step(np.ones((4, envs.pv.num_patches)))
    assert "loss_single" not in info and {"loss_plain", "loss_multi", "keep_ratio", "gflops"} <= set(info)


def test_observation_follows_the_mask():
    envs = _vec(num_envs=2)
    obs, _ = envs.reset(seed=0)
    assert obs["keep"].all() and (obs["stage"] == 0).all()
    np.testing.assert_allclose(obs["cls_attn"].sum(1), obs["cls_attn"].sum(1).clip(0, 1))
    n = envs.pv.num_patches
    action = np.ones((2, n), dtype=np.int8)
    action[:, ::2] = 0
    obs, *_ = envs.step(action)
    assert (obs["keep"] == action).all() and (obs["stage"] == 1).all()
    assert (obs["tokens"][:, ::2] == 0).all() and (np.abs(obs["tokens"][:, 1::2]).sum(-1) > 0).all()
    assert (obs["cls_attn"][:, ::2] == 0).all()
    # A token pruned earlier stays pruned even if the action asks to keep it.
    obs, *_ = envs.step(np.ones((2, n), dtype=np.int8))
    assert (obs["keep"] == action).all()


def test_same_step_autoreset():
    envs = _vec(num_envs=3)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    obs, _ = envs.reset(seed=0)
    n, k = envs.pv.num_patches, envs.pv.num_stages
    half = np.zeros((3, n), dtype=np.int8)
    half[:, : n // 2] = 1
    for _ in range(k):
        obs, _, term, trunc, info = envs.step(half)
    assert term.all() and not trunc.any()
    assert obs["keep"].all() and (obs["stage"] == 0).all()  # a new episode began in the same step
    assert info["_final_obs"].all() and info["final_obs"][0]["keep"][: n // 2].all()
    assert not info["final_obs"][0]["keep"][n // 2 :].any()
    obs, _, term, *_ = envs.step(half)
    assert not term.any() and (obs["stage"] == 1).all()


def test_all_zero_action_keeps_min_keep():
    envs = _vec(num_envs=2, min_keep=3)
    envs.reset(seed=0)
    obs, _, _, _, info = envs.step(np.zeros((2, envs.pv.num_patches), dtype=np.int8))
    assert (obs["keep"].sum(1) == 3).all() and obs["keep"][:, :3].all()
    assert np.isfinite(info["loss_multi"]).all()


@pytest.mark.parametrize(
    "action, match",
    [
        (np.ones((4, 15)), r"shape \(4, 16\)"),
        (np.ones((3, 16)), r"shape \(4, 16\)"),
        (np.full((4, 16), 2), "0 or 1"),
        (np.full((4, 16), -1), "0 or 1"),
        (np.full((4, 16), np.nan), "0 or 1"),
        (np.array([["a"] * 16] * 4), "dtype"),
    ],
)
def test_bad_actions_name_the_action_space(action, match):
    envs = _vec()
    envs.reset(seed=0)
    with pytest.raises(ValueError, match=match) as err:
        envs.step(action)
    assert "MultiBinary" in str(err.value)


def test_step_before_reset_and_after_end_are_clear_errors():
    envs = _vec()
    with pytest.raises(RuntimeError, match="before reset"):
        envs.step(np.ones((4, 16)))
    torch.manual_seed(0)
    env = APTPruneEnv(**TINY)
    env.reset(seed=0)
    for _ in range(env.pv.num_stages):
        env.step(np.ones(16, dtype=np.int8))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.ones(16, dtype=np.int8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reward="accuracy"), "loss_delta, prob_delta"),
        (dict(dataset="mnist3d"), "fashion-mnist"),
        (dict(model="vit_nonexistent_model"), "unknown timm model"),
        (dict(channels=("plain", "double")), "single"),
        (dict(obs_keys=("pixels",)), "cls_attn"),
    ],
)
def test_bad_arguments_list_valid_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _vec(**kwargs)


def test_prob_delta_reward_is_probability_gain():
    envs = _vec(num_envs=4, reward="prob_delta", flops_weight=0.0)
    envs.reset(seed=0)
    total = np.zeros(4)
    for _ in range(envs.pv.num_stages):
        _, reward, _, _, info = envs.step(np.ones((4, envs.pv.num_patches)))
        total += reward
    np.testing.assert_allclose(total, 0.0, atol=1e-6)  # nothing pruned: probability unchanged


def test_masked_and_gathered_envs_agree():
    a = _rollout(_vec(mode="masked"), seed=2, steps=4)
    b = _rollout(_vec(mode="gathered"), seed=2, steps=4)
    for (oa, ra, _), (ob, rb, _) in zip(a[1:], b[1:]):
        np.testing.assert_allclose(ra, rb, atol=1e-5)
        np.testing.assert_allclose(oa["tokens"], ob["tokens"], atol=1e-4)


def test_env_loads_a_checkpoint_folder(tmp_path):
    from apt_env.backbone import PrunableViT
    from apt_env.checkpoint import save_backbone

    name, kwargs = TINY["model"]
    torch.manual_seed(0)
    pv = PrunableViT.from_timm(name, **kwargs)
    save_backbone(tmp_path / "ckpt", pv, meta={"dataset": "synthetic"})
    env = gym.make("APTPrune-v0", model=str(tmp_path / "ckpt"), dataset="synthetic")
    env.reset(seed=0)
    loaded = env.unwrapped.pv
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pv.eval()(x))


def test_default_env_runs_the_shipped_classifier_and_agent():
    from agents.io import DEFAULT_AGENT, load_policy

    envs = gym.make_vec("APTPrune-v0", num_envs=32, vectorization_mode="vector_entry_point")
    envs.reset(seed=0)
    _, _, _, _, info = envs.step(np.ones((32, 49), dtype=np.int8))
    assert info["loss_plain"].mean() < 1.0  # chance is ln(10) = 2.3: the shipped ViT classifies
    policy = load_policy(DEFAULT_AGENT, observation_space=envs.unwrapped.single_observation_space)
    assert policy.num_patches == 49
