"""APT: the Vision Transformer as a Gymnasium environment for token pruning.

Importing the package registers ``APTPrune-v0`` (the 49-token default backbone), ``APTPrune196-v0`` (the same
environment on the 196-token backbone, ``apt_env.defaults.P2_CHECKPOINT``) and ``APTPruneCluttered-v0`` (the
cluttered task and its backbone, ``apt_env.defaults.CLUTTERED_CHECKPOINT``)::

    import gymnasium as gym
    import apt_env

    env = gym.make("APTPrune-v0")
    envs = gym.make_vec("APTPrune-v0", num_envs=64, vectorization_mode="vector_entry_point")
"""

from gymnasium.envs.registration import register, registry

from apt_env.defaults import CLUTTERED_CHECKPOINT, CLUTTERED_DATASET, P2_CHECKPOINT
from apt_env.models.backbone import PrunableViT

__all__ = ["PrunableViT"]

if "APTPrune-v0" not in registry:
    register(
        id="APTPrune-v0",
        entry_point="apt_env.envs.env:APTPruneEnv",
        vector_entry_point="apt_env.envs.env:APTPruneVectorEnv",
    )
if "APTPrune196-v0" not in registry:
    register(
        id="APTPrune196-v0",
        entry_point="apt_env.envs.env:APTPruneEnv",
        vector_entry_point="apt_env.envs.env:APTPruneVectorEnv",
        kwargs={"model": str(P2_CHECKPOINT)},
    )
if "APTPruneCluttered-v0" not in registry:
    register(
        id="APTPruneCluttered-v0",
        entry_point="apt_env.envs.env:APTPruneEnv",
        vector_entry_point="apt_env.envs.env:APTPruneVectorEnv",
        kwargs={"model": str(CLUTTERED_CHECKPOINT), "dataset": CLUTTERED_DATASET},
    )
