import os
import signal
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode
from helpers import TINY, tiny_envs
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import apt_env  # noqa: F401  (registers APTPrune-v0)
from apt_env.envs.env import APTPruneEnv, APTPruneVectorEnv
from apt_env.envs.observe import CHANNELS
from apt_env.models.backbone import PrunableViT
from apt_env.models.checkpoint import save_backbone

_vec = tiny_envs  # the same untrained weights in every env built here


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
    assert obs["tokens"].shape == (5, 16, 32) and obs["live"].dtype == np.int8


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
    envs = _vec(num_envs=3, channels=CHANNELS)
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


def test_the_env_fuses_the_pruned_tokens_as_the_evaluation_does():
    """``fuse=True``: every channel and the ``vs_random`` masks run with EViT's fused token, whose tokens count in
    the GFLOPs; the multi channel's loss is the evaluation's fused walk on the same masks."""
    from apt_env.eval.evaluate import Decisions, fixed_masks, forward_policy

    kw = dict(num_envs=4, obs_keys=("live", "stage"), channels=("plain", "single", "multi"), reward="vs_random")
    fused, plain = _vec(fuse=True, **kw), _vec(**kw)
    fused.reset(seed=0), plain.reset(seed=0)
    n, k = fused.pv.num_patches, fused.pv.num_stages
    idx = gym.utils.seeding.np_random(0)[0].integers(0, len(fused.data), size=4)
    images = torch.stack([fused.data[int(i)][0] for i in idx])
    labels = torch.tensor([fused.data[int(i)][1] for i in idx])
    masks = torch.zeros(4, k, n, dtype=torch.bool)
    for stage in range(k):
        masks[:, stage, : n // (2 + stage)] = True  # fewer tokens at every stage
        _, _, _, _, with_token = fused.step(masks[:, stage].numpy().astype(np.int8))
        _, _, _, _, without = plain.step(masks[:, stage].numpy().astype(np.int8))
        assert (with_token["gflops"] > without["gflops"]).all()  # one more token from this stage on
        assert not np.allclose(with_token["loss_single"], without["loss_single"]) or stage == 0
    with torch.no_grad():
        keep = fixed_masks(Decisions(torch.arange(4), masks))
        logits, _, _ = forward_policy(fused.pv, images, keep, obs_keys=("stage",), fuse=True)
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    np.testing.assert_allclose(with_token["loss_multi"], expected.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="fuse must be True or False"):
        _vec(fuse="yes")


def test_loss_plain_is_the_unpruned_model():
    envs = _vec(num_envs=4, obs_keys=("live",))  # the default channels: plain and multi
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
    envs = _vec(obs_keys=("live", "stage"), channels=("plain", "multi"))
    obs, _ = envs.reset(seed=0)
    assert set(obs) == {"live", "stage"} and set(envs.single_observation_space.spaces) == {"live", "stage"}
    _, _, _, _, info = envs.step(np.ones((4, envs.pv.num_patches)))
    assert "loss_single" not in info and {"loss_plain", "loss_multi", "keep_ratio", "gflops"} <= set(info)


def test_the_live_masks_old_name_still_reads(caplog):
    from agents.observation import live_mask

    with caplog.at_level("WARNING"):
        envs = _vec(obs_keys=("keep", "stage"))
    assert "'keep' is now 'live'" in caplog.text
    obs, _ = envs.reset(seed=0)
    assert set(obs) == {"live", "stage"}
    recorded = {"keep": obs["live"], "stage": obs["stage"]}  # an observation saved before the rename
    assert torch.equal(live_mask(recorded), live_mask(obs))


def test_observation_follows_the_mask():
    envs = _vec(num_envs=2)
    obs, _ = envs.reset(seed=0)
    assert obs["live"].all() and (obs["stage"] == 0).all()
    np.testing.assert_allclose(obs["cls_attn"].sum(1), obs["cls_attn"].sum(1).clip(0, 1))
    n = envs.pv.num_patches
    action = np.ones((2, n), dtype=np.int8)
    action[:, ::2] = 0
    obs, *_ = envs.step(action)
    assert (obs["live"] == action).all() and (obs["stage"] == 1).all()
    assert (obs["tokens"][:, ::2] == 0).all() and (np.abs(obs["tokens"][:, 1::2]).sum(-1) > 0).all()
    assert (obs["cls_attn"][:, ::2] == 0).all()
    # A token pruned earlier stays pruned even if the action asks to keep it.
    obs, *_ = envs.step(np.ones((2, n), dtype=np.int8))
    assert (obs["live"] == action).all()


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
    assert obs["live"].all() and (obs["stage"] == 0).all()  # a new episode began in the same step
    assert info["_final_obs"].all() and info["final_obs"][0]["live"][: n // 2].all()
    assert not info["final_obs"][0]["live"][n // 2 :].any()
    obs, _, term, *_ = envs.step(half)
    assert not term.any() and (obs["stage"] == 1).all()


def test_all_zero_action_keeps_min_keep():
    envs = _vec(num_envs=2, min_keep=3)
    envs.reset(seed=0)
    obs, _, _, _, info = envs.step(np.zeros((2, envs.pv.num_patches), dtype=np.int8))
    assert (obs["live"].sum(1) == 3).all() and obs["live"][:, :3].all()
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


def test_prob_delta_reward_when_pruning_is_the_true_class_probability_gained():
    """The rewards telescope to p(true class | final mask) - p(true class | all tokens), read back from the
    final step's cross-entropies; the actions drop tokens, so the probability does change."""
    envs = _vec(num_envs=4, reward="prob_delta", flops_weight=0.0)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    total = np.zeros(4)
    for _ in range(envs.pv.num_stages):
        _, reward, _, _, info = envs.step((rng.random((4, envs.pv.num_patches)) < 0.5).astype(np.int8))
        total += reward
    final = info["final_info"]
    assert (final["executed_action"].sum(1) < envs.pv.num_patches).all()  # every row dropped tokens
    expected = np.exp(-final["loss_multi"]) - np.exp(-final["loss_plain"])
    np.testing.assert_allclose(total, expected, atol=1e-6)
    assert (np.abs(total) > 1e-4).all()


def test_masked_and_gathered_envs_agree():
    a = _rollout(_vec(layout="masked"), seed=2, steps=4)
    b = _rollout(_vec(layout="gathered"), seed=2, steps=4)
    for (oa, ra, _), (ob, rb, _) in zip(a[1:], b[1:]):
        np.testing.assert_allclose(ra, rb, atol=1e-5)
        np.testing.assert_allclose(oa["tokens"], ob["tokens"], atol=1e-4)


def test_env_loads_a_checkpoint_folder(tmp_path):
    from apt_env.models.backbone import PrunableViT
    from apt_env.models.checkpoint import save_backbone

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
    from agents.io import load_policy
    from apt_env.defaults import DEFAULT_AGENT

    envs = gym.make_vec("APTPrune-v0", num_envs=32, vectorization_mode="vector_entry_point")
    envs.reset(seed=0)
    _, _, _, _, info = envs.step(np.ones((32, 49), dtype=np.int8))
    assert info["loss_plain"].mean() < 1.0  # chance is ln(10) = 2.3: the shipped ViT classifies
    budgeted = gym.make_vec("APTPrune-v0", num_envs=32, vectorization_mode="vector_entry_point", budget=(0.25, 1.0))
    policy = load_policy(DEFAULT_AGENT, observation_space=budgeted.unwrapped.single_observation_space)
    assert policy.num_patches == 49 and policy.use_budget and policy.sampling == "topk"  # one agent, every budget


# The tiny backbone pooling its patch tokens (no class token): min_keep must be at least 1.
POOLED = (
    "vit_tiny_patch16_224",
    dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, depth=4, embed_dim=32, num_heads=2)
    | dict(class_token=False, global_pool="avg", fc_norm=True),
)


@pytest.fixture(scope="module")
def model_specs(tmp_path_factory) -> dict:
    """The same pooled backbone as every kind of ``model`` argument; its own pruning is (1, 3), 2."""
    name, kwargs = POOLED
    torch.manual_seed(0)
    pv = PrunableViT.from_timm(name, prune_layers=(1, 3), min_keep=2, **kwargs)
    folder = save_backbone(tmp_path_factory.mktemp("ckpt") / "pooled", pv, meta={"dataset": "synthetic"})
    return {"timm": POOLED, "checkpoint": str(folder), "module": pv.model, "prunable": pv}


@pytest.mark.parametrize("kind", ["timm", "checkpoint", "module", "prunable"])
@pytest.mark.parametrize(
    "bad, match",
    [
        (
            dict(prune_layers=(3, 1)),
            r"prune_layers must be strictly increasing block indices in \[0, 3\].*got \(3, 1\)",
        ),
        (dict(prune_layers=(-1, 3)), r"in \[0, 3\].*got \(-1, 3\)"),
        (dict(prune_layers=(1, 4)), r"in \[0, 3\].*got \(1, 4\)"),
        (dict(prune_layers=(1.5, 3)), r"in \[0, 3\].*got \(1.5, 3\)"),
        (dict(min_keep=500), r"min_keep must be an integer in \[1, 16\].*got 500"),
        (dict(min_keep=0), r"min_keep must be an integer in \[1, 16\].*pools the patch tokens.*got 0"),
    ],
)
def test_pruning_arguments_are_checked_for_every_kind_of_model(model_specs, kind, bad, match):
    with pytest.raises(ValueError, match=match):
        APTPruneVectorEnv(2, model=model_specs[kind], dataset="synthetic", **bad)


def test_checkpoint_pruning_defaults_to_its_own_and_takes_checked_overrides(model_specs):
    envs = APTPruneVectorEnv(2, model=model_specs["checkpoint"], dataset="synthetic")
    assert (envs.pv.prune_layers, envs.pv.min_keep) == ((1, 3), 2)
    envs = APTPruneVectorEnv(2, model=model_specs["checkpoint"], dataset="synthetic", prune_layers=(2,), min_keep=5)
    assert (envs.pv.prune_layers, envs.pv.min_keep, envs.pv.num_stages) == ((2,), 5, 1)
    envs.reset(seed=0)
    _, _, _, _, info = envs.step(np.zeros((2, 16), dtype=np.int8))
    assert (info["executed_action"].sum(1) == 5).all() and np.isfinite(info["loss_multi"]).all()


def test_a_prunable_vit_is_used_as_is_and_other_pruning_is_an_error(model_specs):
    pv = model_specs["prunable"]
    assert APTPruneVectorEnv(2, model=pv, dataset="synthetic").pv is pv
    assert APTPruneVectorEnv(2, model=pv, dataset="synthetic", prune_layers=[1, 3], min_keep=2).pv is pv
    with pytest.raises(ValueError, match=r"prune_layers=\(1, 3\), min_keep=2.*prune_layers=\(2,\).*with_pruning"):
        APTPruneVectorEnv(2, model=pv, dataset="synthetic", prune_layers=(2,))
    with pytest.raises(ValueError, match=r"min_keep=4 was asked"):
        APTPruneVectorEnv(2, model=pv, dataset="synthetic", min_keep=4)
    other = pv.with_pruning(prune_layers=(2,), min_keep=4)
    assert other.model is pv.model and (pv.prune_layers, pv.min_keep) == ((1, 3), 2)
    assert APTPruneVectorEnv(2, model=other, dataset="synthetic").pv.min_keep == 4


def _edit_in_place(tree: dict) -> None:
    """Overwrite every numeric array or tensor of an observation or info, nested dicts too."""
    for value in tree.values():
        if isinstance(value, dict):
            _edit_in_place(value)
        elif isinstance(value, torch.Tensor):
            value.fill_(7)
        elif isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
            value[...] = 7


def _copy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    return value.cpu().numpy().copy() if isinstance(value, torch.Tensor) else value.copy()


@pytest.mark.parametrize("api", ["numpy", "tensor"])
def test_editing_observations_and_info_in_place_changes_nothing(api):
    def run(edit: bool) -> list:
        envs = _vec(num_envs=3)
        obs = envs.reset(seed=0)[0] if api == "numpy" else envs.reset_tensors(seed=0)
        rng = np.random.default_rng(0)
        out = []
        for _ in range(2 * envs.pv.num_stages):  # two episodes: the autoreset too
            action = rng.random((3, 16)) < 0.7
            out.append({k: _copy(v) for k, v in obs.items()})  # before any edit
            if edit:
                _edit_in_place(obs)
            if api == "numpy":
                obs, reward, _, _, info = envs.step(action.astype(np.int8))
            else:
                obs, reward, _, _, info = envs.step_tensors(torch.from_numpy(action))
            out.append(_copy(reward))
            if edit:
                _edit_in_place(info)
        return out

    for clean, edited in zip(run(edit=False), run(edit=True)):
        if isinstance(clean, dict):
            for key in clean:
                np.testing.assert_array_equal(clean[key], edited[key], err_msg=key)
        else:
            np.testing.assert_array_equal(clean, edited)


INFO_KEYS = ("loss_plain", "loss_multi", "loss_single", "keep_ratio", "gflops", "executed_action")


def test_info_has_key_masks_and_the_terminal_step_info_at_the_top_level():
    envs = _vec(num_envs=2, prune_layers=(2,), channels=CHANNELS)  # one stage: every step ends an episode
    envs.reset(seed=0)
    for _ in range(2):
        _, _, terminated, _, info = envs.step(np.ones((2, 16), dtype=np.int8))
        assert terminated.all() and info["_final_obs"].all() and info["_final_info"].all()
        for key in INFO_KEYS:
            assert info[key].shape[0] == 2 and info[f"_{key}"].dtype == bool and info[f"_{key}"].all()
            np.testing.assert_array_equal(info[key], info["final_info"][key])
            assert info["final_info"][f"_{key}"].all()
    _, _, _, _, info = envs.step_tensors(torch.ones(2, 16, dtype=torch.bool))
    assert set(INFO_KEYS) <= set(info) and set(INFO_KEYS) <= set(info["final_info"])
    envs = _vec(num_envs=2, channels=CHANNELS)  # three stages: the first step does not end the episode
    envs.reset(seed=0)
    _, _, terminated, _, info = envs.step(np.ones((2, 16), dtype=np.int8))
    assert not terminated.any() and "final_info" not in info
    assert set(info) == set(INFO_KEYS) | {f"_{key}" for key in INFO_KEYS}


def test_executed_action_reports_the_min_keep_top_up():
    envs = _vec(num_envs=2, min_keep=3)
    envs.reset(seed=0)
    action = np.zeros((2, 16), dtype=np.int8)
    action[:, 10] = 1
    obs, _, _, _, info = envs.step(action)
    # The kept token stays; the dropped tokens come back lowest index first until 3 are kept.
    expected = action.copy()
    expected[:, [0, 1]] = 1
    np.testing.assert_array_equal(info["executed_action"], expected)
    np.testing.assert_array_equal(obs["live"], expected)
    _, _, _, _, info = envs.step(np.ones((2, 16), dtype=np.int8))  # asks to revive pruned tokens
    np.testing.assert_array_equal(info["executed_action"], expected)


ASYNC_SCRIPT = """
import sys

import gymnasium as gym
import numpy as np
import torch

import apt_env  # noqa: F401

if __name__ == "__main__":
    torch.set_num_threads(2)
    torch.randn(512, 512) @ torch.randn(512, 512)  # torch's thread pool runs in the parent
    kwargs = dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2, in_chans=1, num_classes=10)
    model = ("vit_tiny_patch16_224", kwargs)
    envs = gym.make_vec(
        "APTPrune-v0", num_envs=2, vectorization_mode="async", vector_kwargs=dict(context=sys.argv[1]),
        model=model, dataset="synthetic",
    )
    obs, _ = envs.reset(seed=0)
    _, reward, terminated, _, _ = envs.step(np.ones((2, 16), dtype=np.int8))
    envs.close()
    assert obs["tokens"].shape == (2, 16, 32) and terminated.all() and np.isfinite(reward).all()
    print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_async_vector_env_runs_with_fork_and_spawn(context, tmp_path):
    script = tmp_path / "async_env.py"
    script.write_text(ASYNC_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the parent's threads are the point
    proc = subprocess.Popen(
        [sys.executable, str(script), context],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
        start_new_session=True,  # so that a hang can be killed with its worker processes
    )
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"gym.make_vec(..., vectorization_mode='async') with context={context!r} hangs")
    assert proc.returncode == 0 and "ok" in stdout, stderr[-3000:]


def test_model_and_dataset_that_do_not_fit_are_named(tmp_path, caplog):
    name, kwargs = TINY["model"]
    with pytest.raises(ValueError, match="the model has 5 classes, dataset 'synthetic' has 10"):
        APTPruneVectorEnv(2, model=(name, {**kwargs, "num_classes": 5}), dataset="synthetic")
    torch.manual_seed(0)
    path = save_backbone(tmp_path / "ckpt", PrunableViT.from_timm(name, **kwargs), meta={"dataset": "digits"})
    with caplog.at_level("WARNING"):
        APTPruneVectorEnv(2, model=str(path), dataset="synthetic")
        APTPruneVectorEnv(2, **TINY)
    assert "trained on digits" in caplog.text and "built untrained" in caplog.text


def test_a_first_stage_before_block_0_observes_the_embedded_patches_and_passes_the_checker():
    from apt_env.envs.env import APTPruneEnv

    env = APTPruneEnv(**TINY, prune_layers=(0, 2, 3), budget=(0.1, 1.0))
    check_env(env.unwrapped, skip_render_check=True)
    envs = tiny_envs(4, prune_layers=(0, 2, 3), budget=0.1)
    obs, _ = envs.reset(seed=0)
    assert (obs["cls_attn"] > 0).all() and (obs["cls_attn"].sum(1) < 1).all()  # block 0 attends to every patch
    for _ in range(3):
        obs, reward, terminated, truncated, info = envs.step(envs.action_space.sample())
    assert terminated.all() and np.isfinite(reward).all()
