import numpy as np
import torch
from helpers import TINY
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecEnv

from apt_env.envs.env import APTPruneVectorEnv
from apt_env.envs.sb3_vec_env import SB3VecEnv


def _adapter(num_envs: int = 4, **kwargs) -> SB3VecEnv:
    torch.manual_seed(0)
    return SB3VecEnv(APTPruneVectorEnv(num_envs, **TINY, **kwargs))


def test_adapter_speaks_sb3_vecenv():
    venv = _adapter()
    assert isinstance(venv, VecEnv) and venv.num_envs == 4
    venv.seed(7)
    obs = venv.reset()
    assert set(obs) == set(venv.observation_space.spaces) and obs["tokens"].shape == (4, 16, 32)
    k = venv.venv.pv.num_stages
    for step in range(k):
        obs, rewards, dones, infos = venv.step(np.ones((4, 16), dtype=np.float32))  # SB3 sends floats
        assert rewards.shape == (4,) and rewards.dtype == np.float32 and len(infos) == 4
        assert dones.all() == (step == k - 1)
    assert all("terminal_observation" in i and not i["TimeLimit.truncated"] for i in infos)
    assert infos[0]["terminal_observation"]["stage"] == k - 1 and (obs["stage"] == 0).all()
    assert {"loss_plain", "loss_multi", "keep_ratio", "gflops"} <= set(infos[0])
    assert venv.get_attr("num_envs") == [4] * 4 and venv.env_is_wrapped(object) == [False] * 4


def test_adapter_seed_reproduces():
    a, b = _adapter(), _adapter()
    a.seed(3)
    b.seed(3)
    np.testing.assert_array_equal(a.reset()["tokens"], b.reset()["tokens"])


def test_sb3_ppo_learns_through_adapter():
    venv = _adapter()
    model = PPO("MultiInputPolicy", venv, n_steps=6, batch_size=12, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=48)
    assert model.num_timesteps >= 48
    action, _ = model.predict(venv.reset(), deterministic=True)
    assert action.shape == (4, 16)
