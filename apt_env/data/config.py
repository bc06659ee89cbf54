"""A backbone's data config: timm's data config keys and how the backbone preprocesses its images.

Apart from the datasets (``apt_env.data.datasets``), so that the model imports it without torchvision's datasets.
A backbone carries its preprocessing, ``PrunableViT.data_config``: timm's data config form (``input_size``, ``mean``,
``std``, ``interpolation``, ``crop_pct``, ``crop_mode``) and ``preprocessing``, either ``"apt_env"`` (this project's
transform, ``apt_env.data.transforms.build_transform``, normalised with the recorded statistics: those of the dataset
the backbone was trained on) or ``"timm"`` (timm's own eval transform: a backbone started from timm's pretrained
weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["PREPROCESSING", "TIMM_DATA_KEYS", "apt_env_data_config", "check_data_config", "model_data_config"]

PREPROCESSING: tuple[str, ...] = ("apt_env", "timm")
"""How a backbone's images are preprocessed: this project's transform, or timm's eval transform."""
_OWN_TRANSFORM = {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}  # build_transform's resize
TIMM_DATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
"""The keys of timm's data config (``timm.data.resolve_data_config``)."""


def check_data_config(config: Mapping[str, Any], *, input_size: Sequence[int]) -> dict[str, Any]:
    """``config`` as a backbone keeps it: timm's data config keys and ``preprocessing``, sizes as int tuples and
    statistics as float tuples, checked against the model's ``input_size`` ``(C, H, W)``.

    Raises:
        ValueError: a key missing or malformed, an input size other than the model's, statistics for other channels,
            an unknown ``preprocessing``, or an ``apt_env`` config that does not resize as ``build_transform`` does.
    """
    missing = [k for k in (*TIMM_DATA_KEYS, "preprocessing") if k not in config]
    if missing:
        raise ValueError(f"a data config needs {missing} (timm's data config keys and preprocessing), got {config!r}")
    out = {k: config[k] for k in (*TIMM_DATA_KEYS, "preprocessing")}
    try:
        out["input_size"] = tuple(int(v) for v in out["input_size"])
        out["mean"], out["std"] = (tuple(float(v) for v in out[k]) for k in ("mean", "std"))
        out["crop_pct"] = float(out["crop_pct"])
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"a data config's input_size, mean and std are sequences, crop_pct a number: {config!r}"
        ) from err
    input_size = tuple(int(v) for v in input_size)
    if out["input_size"] != input_size:
        raise ValueError(f"the data config's input_size {out['input_size']} is not the model's {input_size}")
    if not len(out["mean"]) == len(out["std"]) == input_size[0]:
        raise ValueError(
            f"the data config has {len(out['mean'])} mean and {len(out['std'])} std values for a model of "
            f"{input_size[0]} channel(s)"
        )
    if out["preprocessing"] not in PREPROCESSING:
        raise ValueError(f"a data config's preprocessing is one of {PREPROCESSING}, got {out['preprocessing']!r}")
    if out["preprocessing"] == "apt_env" and any(out[k] != v for k, v in _OWN_TRANSFORM.items()):
        raise ValueError(
            f"an apt_env data config resizes as build_transform does, {_OWN_TRANSFORM}; got {config!r}: pass "
            "preprocessing='timm' for timm's eval transform"
        )
    return out


def apt_env_data_config(input_size: Sequence[int], *, mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """The data config of this module's transform (``build_transform``) at ``input_size`` with ``mean`` and ``std``."""
    config = {"input_size": input_size, **_OWN_TRANSFORM, "mean": mean, "std": std, "preprocessing": "apt_env"}
    return check_data_config(config, input_size=input_size)


def model_data_config(
    pretrained_cfg: Mapping[str, Any], *, input_size: Sequence[int], pretrained: bool
) -> dict[str, Any]:
    """A timm model's own data config at the size and channels it runs with.

    With ``pretrained`` weights: timm's preprocessing of them (its eval transform). Else this module's transform
    with the statistics its timm config names (the registered ``vit_apt_*`` names name Fashion-MNIST's). An RGB
    model's statistics adapted to gray are their mean; gray ones are repeated for RGB.
    """
    import timm.data  # here: importing timm is slow and only this path needs it

    input_size = tuple(int(v) for v in input_size)
    config = timm.data.resolve_data_config({"input_size": input_size}, pretrained_cfg=dict(pretrained_cfg))
    mean, std = (_for_channels(config[k], input_size[0]) for k in ("mean", "std"))
    if pretrained:
        config = {**config, "mean": mean, "std": std, "preprocessing": "timm"}
        return check_data_config(config, input_size=input_size)
    return apt_env_data_config(input_size, mean=mean, std=std)


def _for_channels(values: Sequence[float], chans: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == chans:
        return values
    if chans == 1:  # an RGB model adapted to gray: gray statistics
        return (float(np.mean(values)),)
    if len(values) == 1:
        return values * chans
    raise ValueError(f"cannot adapt statistics of {len(values)} channels to {chans}")
