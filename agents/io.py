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
