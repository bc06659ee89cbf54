"""The backbone checkpoint format: ``save_backbone``, ``read_backbone_config``, ``load_backbone``.

A backbone checkpoint is a folder in timm's own layout, so ``timm.create_model("local-dir:PATH",
pretrained=True)`` loads the trained model with no code of ours::

    PATH/
      model.safetensors   the timm model's state_dict
      config.json         {"architecture", "model_args", "num_classes", "pretrained_cfg" (the backbone's data config,
                           ``PrunableViT.data_config``: input size, mean, std, interpolation, crop, as timm's
                           ``resolve_data_config`` reads it)} and ours: {"format": "apt-backbone/1", "preprocessing"
                           ("apt_env" or "timm": whose transform the data config is), "prune_layers", "min_keep",
                           "bucket_rows", the model's num_classes, img_size, in_chans, depth, embed_dim,
                           num_prefix_tokens, num_patches, and the caller's ``meta`` (dataset, split, command, weights
                           digest, accuracy, ...)}

Folders written before this layout still load, with the preprocessing they were used with: ``timm_name`` and
``timm_kwargs`` instead of ``architecture`` and ``model_args``; no ``preprocessing`` key, with timm's pretrained data
config in a ``data_config`` key (``train_backbone.py --pretrained``), else this project's transforms with the
statistics of ``pretrained_cfg`` (``recorded_data_config``).

The folder is written atomically (``apt_env.atomic.write_folder``): a crash leaves either the previous
complete checkpoint or the new one, never half of one. The training state for ``--resume`` lives in
``apt_env.train.state``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from apt_env.atomic import recover_interrupted_save, write_folder
from apt_env.data.config import apt_env_data_config
from apt_env.models.backbone import PrunableViT

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "WEIGHTS_FILE",
    "load_backbone",
    "read_backbone_config",
    "recorded_data_config",
    "save_backbone",
]

_logger = logging.getLogger(__name__)

FORMAT = "apt-backbone/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Keys that describe how to rebuild the model; ``meta`` may not set them.
_BUILD_KEYS = ("format", "timm_name", "timm_kwargs", "prune_layers", "min_keep", "bucket_rows")
_TIMM_KEYS = ("architecture", "model_args", "pretrained_cfg")
# The data config is the model's (``pv.data_config``); ``meta`` may not state another beside it.
_DATA_KEYS = ("preprocessing", "data_config", "mean", "std")


def _model_facts(pv: PrunableViT) -> dict[str, Any]:
    """What the model is, as recorded in config.json and checked against ``meta`` and ``expect``."""
    h, w = pv.img_size
    return {
        "num_classes": pv.num_classes,
        "img_size": h if h == w else [h, w],
        "in_chans": pv.in_chans,
        "depth": pv.depth,
        "embed_dim": pv.embed_dim,
        "num_prefix_tokens": pv.num_prefix_tokens,
        "num_patches": pv.num_patches,
    }


def _canonical(key: str, value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists; a square size becomes one int)."""
    value = json.loads(json.dumps(value))
    if key == "img_size" and isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    return value


def _checkpoint_config(pv: PrunableViT, meta: dict[str, Any]) -> dict[str, Any]:
    """config.json of ``pv``: timm's keys, the pruning geometry, the model's facts, then ``meta`` (checked against
    them)."""
    facts = _model_facts(pv)
    clashes = sorted(k for k in meta if k in _BUILD_KEYS or k in _TIMM_KEYS or k in _DATA_KEYS)
    if clashes:
        raise ValueError(
            f"meta may not set {clashes}: they are written from the model (its preprocessing: set pv.data_config)"
        )
    for key, value in meta.items():
        if key in facts and _canonical(key, value) != facts[key]:
            raise ValueError(f"meta[{key!r}] = {value!r} but the model has {key} = {facts[key]!r}")
    data_config = pv.data_config
    # timm's own key, so that timm.create_model("local-dir:PATH") and resolve_data_config preprocess as we do;
    # ``preprocessing`` is not a field of timm's PretrainedCfg (it would refuse the folder), so it sits beside it.
    pretrained_cfg = {k: v for k, v in data_config.items() if k != "preprocessing"}
    config = {
        "architecture": pv.timm_name,
        "model_args": pv.timm_kwargs,
        "pretrained_cfg": {**pretrained_cfg, "num_classes": pv.num_classes},
        "format": FORMAT,
        "preprocessing": data_config["preprocessing"],
        "prune_layers": list(pv.prune_layers),
        "min_keep": pv.min_keep,
        "bucket_rows": pv.bucket_rows,
        **facts,
        **{k: v for k, v in meta.items() if k not in facts},
    }
    return config


def save_backbone(path: str | Path, pv: PrunableViT, *, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``pv`` as a checkpoint folder ``path``, atomically replacing any previous one.

    Args:
        path: the checkpoint folder; created, or replaced if it already holds a checkpoint.
        pv: a model built by ``PrunableViT.from_timm`` (its timm name and kwargs are recorded).
        meta: JSON-serializable facts stored in config.json next to the build keys, e.g. ``dataset``,
            ``test_acc1``. ``num_classes``, ``img_size`` and ``in_chans`` are recorded from the model; if given
            here they must agree with it. The preprocessing is ``pv.data_config``'s, not meta's.

    Returns:
        The checkpoint folder.

    Raises:
        ValueError: ``pv`` was not built by ``from_timm``, ``meta`` clashes with the model or is not
            JSON-serializable, or ``path`` exists and is not a checkpoint folder.
    """
    target = Path(path)
    if pv.timm_name is None:
        raise ValueError(
            "save_backbone needs a PrunableViT built by PrunableViT.from_timm (it records the timm name "
            "and kwargs needed to rebuild the model); this one wraps a module passed directly."
        )
    config = _checkpoint_config(pv, dict(meta or {}))
    try:
        config_text = json.dumps(config, indent=2, sort_keys=False) + "\n"
    except TypeError as err:
        raise ValueError(
            f"checkpoint config is not JSON-serializable ({err}); pass timm kwargs and meta as plain "
            "values (e.g. act_layer='gelu', not a class)"
        ) from err
    if target.exists() and not (target.is_dir() and ((target / CONFIG_FILE).exists() or not any(target.iterdir()))):
        raise ValueError(f"refusing to replace {target}: it exists and is not a checkpoint folder")

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in pv.model.state_dict().items()}
    write_folder(
        target,
        {
            WEIGHTS_FILE: lambda p: safetensors.torch.save_file(tensors, str(p), metadata={"format": "pt"}),
            CONFIG_FILE: lambda p: p.write_text(config_text),
        },
    )
    _logger.info("saved backbone checkpoint %s", target)
    return target


def read_backbone_config(path: str | Path) -> dict[str, Any]:
    """The config.json of checkpoint folder ``path``, checked for format and required keys.

    Raises:
        FileNotFoundError: the folder or its config.json is missing.
        ValueError: ``path`` is not a folder, or config.json is corrupt or of another format.
    """
    folder = Path(path)
    recover_interrupted_save(folder)
    if not folder.exists():
        hint = ""
        if folder.with_name(f".{folder.name}.old").is_dir():
            hint = f"; a save was interrupted: the previous checkpoint is in {folder.with_name(f'.{folder.name}.old')}"
        raise FileNotFoundError(f"no checkpoint folder at {folder}{hint}")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file; a checkpoint is a folder with {WEIGHTS_FILE} and {CONFIG_FILE}")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {folder} is corrupt: {CONFIG_FILE}: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(
            f"checkpoint {folder} is corrupt: {CONFIG_FILE} holds a {type(config).__name__}, not an object"
        )
    if config.get("format") != FORMAT:
        raise ValueError(f"checkpoint {folder} has format {config.get('format')!r}; this code reads {FORMAT!r}")
    if "architecture" in config:  # timm's layout; older folders have timm_name and timm_kwargs
        config["timm_name"] = config["architecture"]
        config["timm_kwargs"] = config.get("model_args", {})
    missing = [k for k in _BUILD_KEYS if k not in config]
    if missing:
        raise ValueError(f"checkpoint {folder} is corrupt: {CONFIG_FILE} lacks {missing}")
    return config


def recorded_data_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The data config a checkpoint's config.json records, in ``PrunableViT.data_config``'s form; None for an old
    folder that records no statistics (the model keeps its own default).

    This format: ``pretrained_cfg`` with ``preprocessing`` beside it. Older folders: timm's pretrained data config
    in ``data_config``, else this project's transforms with ``pretrained_cfg``'s mean and std.
    """
    pretrained_cfg = config.get("pretrained_cfg") or {}
    if "preprocessing" in config:
        return {**pretrained_cfg, "preprocessing": config["preprocessing"]}
    if "data_config" in config:
        if not isinstance(config["data_config"], dict):
            raise ValueError(f"its data_config is a {type(config['data_config']).__name__}, not an object")
        return {"crop_mode": "center", **config["data_config"], "preprocessing": "timm"}
    if "mean" in pretrained_cfg and "std" in pretrained_cfg:
        return apt_env_data_config(pretrained_cfg["input_size"], mean=pretrained_cfg["mean"], std=pretrained_cfg["std"])
    return None


def load_backbone(
    path: str | Path,
    *,
    expect: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> PrunableViT:
    """Rebuild a checkpoint's model with ``timm.create_model`` and load its weights (strict).

    Args:
        path: a checkpoint folder written by ``save_backbone``.
        expect: values the checkpoint must record, e.g. ``{"num_classes": 10, "in_chans": 1,
            "img_size": 28, "dataset": "fashion-mnist"}``; checked before the model is built.
        device: where the model goes.

    Returns:
        The model, in eval mode, on ``device``.

    Raises:
        FileNotFoundError: the folder, config.json or model.safetensors is missing.
        ValueError: a corrupt file, weights that do not fit the config, or a value of ``expect`` that
            the checkpoint does not record or records differently.
    """
    folder = Path(path)
    config = read_backbone_config(folder)
    _check_expected(config, expect or {}, folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {WEIGHTS_FILE}")
    try:
        tensors = safetensors.torch.load_file(str(weights_path), device=str(device))
    except Exception as err:  # safetensors raises its own SafetensorError for a bad header or size
        raise ValueError(f"checkpoint {folder} is corrupt: {WEIGHTS_FILE}: {err}") from err

    described = f"{config['timm_name']} with {config['timm_kwargs']}"
    try:
        pv = PrunableViT.from_timm(
            config["timm_name"],
            prune_layers=config["prune_layers"],
            min_keep=config["min_keep"],
            bucket_rows=config["bucket_rows"],
            **config["timm_kwargs"],
        )
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"checkpoint {folder}: cannot rebuild {described}: {err}") from err
    try:
        pv.model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {folder}: the weights in {WEIGHTS_FILE} do not match the model in {CONFIG_FILE} "
            f"({described}): {err}"
        ) from err
    facts = _model_facts(pv)
    drift = {k: (config[k], v) for k, v in facts.items() if k in config and _canonical(k, config[k]) != v}
    if drift:
        raise ValueError(
            f"checkpoint {folder}: rebuilding {described} gives a different model than recorded "
            f"(recorded, rebuilt): {drift}; was it written with another timm version?"
        )
    _set_recorded_data_config(pv, config, folder)
    return pv.to(device).eval()


def _check_expected(config: Mapping[str, Any], expect: Mapping[str, Any], folder: Path) -> None:
    """Refuse a checkpoint that does not record every value of ``expect``, or records another."""
    for key, want in expect.items():
        if key not in config:
            known = sorted(k for k in config if k not in ("format", "timm_kwargs"))
            raise ValueError(f"checkpoint {folder} records no {key!r} to check against {want!r}; it records {known}")
        if _canonical(key, config[key]) != _canonical(key, want):
            raise ValueError(f"checkpoint {folder} has {key} = {config[key]!r}, expected {want!r}")


def _set_recorded_data_config(pv: PrunableViT, config: Mapping[str, Any], folder: Path) -> None:
    """Give ``pv`` the preprocessing its checkpoint records, checked against the model."""
    try:
        data_config = recorded_data_config(config)
        if data_config is not None:
            pv.data_config = data_config
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {folder} is corrupt: its data config: {err}") from err
    if data_config is None:
        _logger.warning("checkpoint %s records no mean and std: using the model's own, %s", folder, pv.data_config)
