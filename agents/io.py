"""Agent checkpoints: ``policy.safetensors`` + ``config.json`` in one folder, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from gymnasium import spaces

from agents.policy import APTPolicy
from apt_env.atomic import recover_interrupted_save, write_folder

FORMAT = "apt-agent/1"
WEIGHTS_FILE = "policy.safetensors"
CONFIG_FILE = "config.json"


def save_policy(path: str | Path, policy: APTPolicy, *, meta: dict[str, Any] | None = None) -> Path:
    """Write ``policy`` (its sizes, options and weights) as a checkpoint folder ``path``."""
    config = {"format": FORMAT, **policy.config(), **(meta or {})}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in policy.state_dict().items()}
    target = Path(path)
    write_folder(
        target,
        {
            WEIGHTS_FILE: lambda p: safetensors.torch.save_file(tensors, str(p)),
            CONFIG_FILE: lambda p: p.write_text(json.dumps(config, indent=2) + "\n"),
        },
    )
    return target


def load_policy(
    path: str | Path, *, observation_space: spaces.Dict | None = None, device: str | torch.device = "cpu"
) -> APTPolicy:
    """Rebuild a policy saved by ``save_policy``.

    Args:
        path: the checkpoint folder.
        observation_space: the env's single observation space; a policy for another token count or
            width is a ``ValueError`` naming both.
        device: where to put the policy.
    """
    folder = Path(path)
    recover_interrupted_save(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not an agent checkpoint: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        tensors = safetensors.torch.load_file(str(folder / WEIGHTS_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError, safetensors.SafetensorError, OSError) as err:
        raise ValueError(f"agent checkpoint {folder} is corrupt: {err}") from err
    if not isinstance(config, dict):
        kind = type(config).__name__
        raise ValueError(f"agent checkpoint {folder} is corrupt: {CONFIG_FILE} holds a {kind}, not an object")
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder}: format {config.get('format')!r}, expected {FORMAT!r}")
    try:
        policy = APTPolicy.from_config(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"agent checkpoint {folder} is corrupt: {CONFIG_FILE}: {err}") from err
    try:
        policy.load_state_dict(tensors)
    except RuntimeError as err:
        fit = f"the weights do not fit its config {policy.config()}"
        raise ValueError(f"agent checkpoint {folder}: {fit}: {err}") from err
    if observation_space is not None:
        _check_fits_space(folder, policy, observation_space)
    return policy.to(device)


def _check_fits_space(folder: Path, policy: APTPolicy, space: spaces.Dict) -> None:
    """A ``ValueError`` naming both when the policy is sized for other tokens or stages than ``space``'s."""
    n, c = space["tokens"].shape
    if (n, c) != (policy.num_patches, policy.embed_dim):
        raise ValueError(
            f"agent checkpoint {folder} expects {policy.num_patches} tokens of width {policy.embed_dim}, "
            f"the environment has {n} tokens of width {c}"
        )
    stages = space["stage"].n if "stage" in space.spaces else policy.num_stages
    if stages != policy.num_stages:
        raise ValueError(f"agent checkpoint {folder} has {policy.num_stages} stages, the environment {stages}")


def load_sb3_policy(path: str | Path) -> APTPolicy:
    """The APT policy inside a stable-baselines3 zip of ``APTActorCriticPolicy`` (``model.save``), as an agent.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable SB3 zip, no APT policy weights in it, or weights that do not fit its config.
    """
    from stable_baselines3.common.save_util import load_from_zip_file  # here: SB3 is slow to import

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"agent zip {path} does not exist")
    try:
        data, params, _ = load_from_zip_file(str(path), device="cpu")
    except Exception as err:  # SB3 raises many types for a bad zip
        raise ValueError(f"{path} is not a readable stable-baselines3 zip: {err}") from err
    keys = APTPolicy.CONFIG_KEYS + APTPolicy.OPTION_KEYS
    kwargs = {k: v for k, v in (data or {}).get("policy_kwargs", {}).items() if k in keys}
    net = {k[len("net.") :]: v for k, v in (params or {}).get("policy", {}).items() if k.startswith("net.")}
    if not net:
        raise ValueError(f"{path} holds no APTActorCriticPolicy weights (no 'net.' parameters)")
    policy = APTPolicy.from_space(data["observation_space"], **kwargs)
    try:
        policy.load_state_dict(net)
    except RuntimeError as err:
        raise ValueError(f"{path}: the agent's weights do not fit its config: {err}") from err
    return policy


def load_any_policy(path: str | Path) -> APTPolicy:
    """An agent folder (``load_policy``) or, for a path ending in ``.zip``, a stable-baselines3 zip
    (``load_sb3_policy``)."""
    return load_sb3_policy(path) if str(path).endswith(".zip") else load_policy(path)
