"""``render_mode="rgb_array"``: the sub-environment's image with its pruned patches dimmed, through Gymnasium's
checker and its video and window wrappers."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from helpers import TINY, tiny_envs

import apt_env  # noqa: F401  (registers APTPrune-v0)
from apt_env.envs.env import APTPruneEnv
from apt_env.envs.render import PRUNED_BRIGHTNESS

pytestmark = pytest.mark.usefixtures("one_thread")

SCALE = 14  # the tiny ViT's 16x16 images are shown at 224x224
PATCH = 4 * SCALE  # a 4x4-pixel patch on screen


def _patch(frame: np.ndarray, j: int) -> np.ndarray:
    """Patch ``j`` (raster order on the 4x4 grid) of a frame, as int."""
    r, c = divmod(j, 4)
    return frame[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH].astype(int)


def test_check_env_passes_with_the_rgb_array_render_mode():
    torch.manual_seed(0)
    env = gym.make("APTPrune-v0", render_mode="rgb_array", **TINY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)  # also builds the env anew for every declared render mode
    assert not [w for w in caught if "render" in str(w.message).lower()]
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8


def test_frames_are_the_stored_images_enlarged_with_pruned_patches_dimmed():
    envs = tiny_envs(num_envs=2, render_mode="rgb_array")
    envs.reset(seed=0)
    before = envs.render()
    assert isinstance(before, tuple) and len(before) == 2
    for frame in before:
        assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8
        assert (frame == frame[::SCALE, ::SCALE].repeat(SCALE, 0).repeat(SCALE, 1)).all()  # whole pixels
        assert (frame[..., 0] == frame[..., 1]).all() and (frame[..., 1] == frame[..., 2]).all()  # gray
        # The normalization undone: the image as the dataset stored it (uint8), give or take rounding.
        stored = envs.data.images[:, 0].int()  # (M, H, W)
        assert ((stored - torch.from_numpy(frame[::SCALE, ::SCALE, 0]).int()).abs() <= 1).flatten(1).all(1).any()
    assert not np.array_equal(before[0], before[1])
    action = np.zeros((2, 16), dtype=np.int8)
    action[:, ::2] = 1  # keep the even patches
    _, _, terminated, _, info = envs.step(action)
    assert not terminated.any()
    after = envs.render()
    for i in range(2):
        kept = info["executed_action"][i].astype(bool)
        assert kept.sum() == 8
        for j in range(16):
            old, new = _patch(before[i], j), _patch(after[i], j)
            if kept[j]:
                assert np.array_equal(new, old)
            else:
                assert np.abs(new - PRUNED_BRIGHTNESS * old).max() <= 1 and old.max() > 20


def test_render_needs_a_mode_and_a_reset():
    envs = tiny_envs(num_envs=2)
    envs.reset(seed=0)
    with pytest.warns(UserWarning, match="render_mode"):
        assert envs.render() is None
    with pytest.raises(RuntimeError, match="reset"):
        tiny_envs(num_envs=2, render_mode="rgb_array").render()
    with pytest.raises(ValueError, match="rgb_array"):
        tiny_envs(num_envs=2, render_mode="human")


def test_record_video_writes_a_video_of_each_stage(tmp_path):
    pytest.importorskip("moviepy")
    from moviepy import VideoFileClip

    torch.manual_seed(0)
    env = gym.wrappers.RecordVideo(
        APTPruneEnv(render_mode="rgb_array", **TINY), str(tmp_path / "single"), episode_trigger=lambda _: True
    )
    env.reset(seed=0)
    terminated = False
    while not terminated:
        _, _, terminated, _, _ = env.step(env.action_space.sample())
    env.close()
    (video,) = (tmp_path / "single").glob("*.mp4")
    with VideoFileClip(str(video)) as clip:
        assert tuple(clip.size) == (224, 224) and clip.fps == 2
        assert clip.duration == pytest.approx(4 / 2)  # the reset and the 3 stages, two frames a second

    envs = gym.wrappers.vector.RecordVideo(
        tiny_envs(num_envs=4, render_mode="rgb_array"), str(tmp_path / "vector"), episode_trigger=lambda e: e == 0
    )
    envs.reset(seed=0)
    for _ in range(4):  # past the first episode's end
        envs.step(envs.action_space.sample())
    envs.close()
    (video,) = (tmp_path / "vector").glob("*.mp4")
    with VideoFileClip(str(video)) as clip:
        assert tuple(clip.size) == (448, 448)  # the 4 sub-environments on a 2x2 grid


def test_human_rendering_shows_the_frames_in_a_window(monkeypatch):
    """Headless: pygame's dummy video driver. The vector wrapper also needs OpenCV to tile the frames, which is not
    installed here: it is checked to accept the env and to get a frame per sub-environment."""
    pytest.importorskip("pygame")
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    torch.manual_seed(0)
    env = gym.wrappers.HumanRendering(APTPruneEnv(render_mode="rgb_array", **TINY))
    env.reset(seed=0)
    env.step(env.action_space.sample())
    assert env.window.get_size() == (224, 224)
    env.close()

    envs = gym.wrappers.vector.HumanRendering(tiny_envs(num_envs=3, render_mode="rgb_array"))
    assert envs.render_mode == "human" and "human" in envs.metadata["render_modes"]
    envs.env.reset(seed=0)
    assert len(envs.env.render()) == envs.num_envs
