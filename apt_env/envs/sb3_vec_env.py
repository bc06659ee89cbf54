"""One adapter from a Gymnasium ``VectorEnv`` to stable-baselines3's ``VecEnv``.

The two APIs differ: SB3 steps with ``step_async``/``step_wait``, returns ``dones`` (4-tuple), a list
of per-env info dicts with ``terminal_observation``, and ``reset()`` returns only observations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn


class SB3VecEnv(VecEnv):
    """A Gymnasium vector env (autoreset in the same step) as a stable-baselines3 ``VecEnv``.

    The whole batch shares one random generator, so ``seed(s)`` seeds the next ``reset`` with ``s``.

    Args:
        venv: a vector env with ``metadata["autoreset_mode"] == AutoresetMode.SAME_STEP``, such as
            ``APTPruneVectorEnv``.
    """

    def __init__(self, venv: VectorEnv) -> None:
        mode = venv.metadata.get("autoreset_mode")
        if mode != AutoresetMode.SAME_STEP:
            raise ValueError(f"SB3VecEnv needs a vector env that autoresets in the same step, got {mode}")
        self.venv = venv
        self._actions: np.ndarray | None = None
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)

    def reset(self) -> VecEnvObs:
        obs, _ = self.venv.reset(seed=self._seeds[0])
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, terminated, truncated, info = self.venv.step(self._actions)
        if "final_obs" in info:
            final_obs, ended, batch_info = info["final_obs"], info["_final_obs"], info["final_info"]
        else:
            final_obs, ended, batch_info = None, np.zeros(self.num_envs, dtype=bool), info
        infos = _unbatch_info(batch_info, self.num_envs)
        for i, env_info in enumerate(infos):
            env_info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            if ended[i]:
                env_info["terminal_observation"] = final_obs[i]
        return obs, rewards.astype(np.float32), terminated | truncated, infos

    def close(self) -> None:
        self.venv.close()

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self.venv, attr_name)] * len(self._indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        if len(self._indices(indices)) != self.num_envs:
            raise ValueError("the sub-environments share one batch: set attributes on all of them at once")
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: Any = None, **method_kwargs: Any) -> list:
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        return [result] * len(self._indices(indices))

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False] * len(self._indices(indices))

    def _indices(self, indices: None | int | Iterable[int]) -> Sequence[int]:
        if indices is None:
            return range(self.num_envs)
        return [indices] if isinstance(indices, int) else list(indices)


def _unbatch_info(info: dict[str, Any], num_envs: int) -> list[dict[str, Any]]:
    """Gymnasium's dict of arrays to SB3's list of dicts (``_key`` masks dropped)."""
    items = [(k, v) for k, v in info.items() if not k.startswith("_") and isinstance(v, np.ndarray)]
    return [{k: v[i] for k, v in items} for i in range(num_envs)]
