"""The env's ``model`` argument: what it may be (``ModelSpec``) and how it becomes a ``PrunableViT``."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from apt_env.defaults import DEFAULT_CHECKPOINT
from apt_env.models.backbone import DEFAULT_MODEL_KWARGS, DEFAULT_MODEL_NAME, PrunableViT
from apt_env.models.checkpoint import load_backbone, read_backbone_config

__all__ = ["ModelSpec", "build_backbone", "check_model_fits_data", "default_model", "is_checkpoint"]

_logger = logging.getLogger(__name__)

ModelSpec = str | Path | nn.Module | tuple[str, dict] | None
"""A checkpoint folder, a timm name, ``(name, timm_kwargs)``, a timm module or a ``PrunableViT``; None: the default."""


def build_backbone(
    model: ModelSpec, *, prune_layers: Sequence[int] | None = None, min_keep: int | None = None
) -> PrunableViT:
    """A ``PrunableViT`` from a checkpoint folder, a timm name, ``(name, kwargs)``, a timm module or a
    ``PrunableViT``.

    ``None`` is the default model: the checkpoint that ships with the package when there is one, else
    an untrained small ViT for 28x28 gray images. ``prune_layers`` and ``min_keep`` pass the
    ``PrunableViT`` constructor's checks whatever the model; ``None`` keeps a checkpoint's or a
    ``PrunableViT``'s own value, else the default (three evenly spaced blocks, 1). A ``PrunableViT`` is
    used as it is, not copied (its weights may be training elsewhere), so values other than its own
    are an error.
    """
    pruning = {k: v for k, v in dict(prune_layers=prune_layers, min_keep=min_keep).items() if v is not None}
    if isinstance(model, PrunableViT):
        wanted = model.with_pruning(**pruning)  # the constructor's checks
        if (wanted.prune_layers, wanted.min_keep) != (model.prune_layers, model.min_keep):
            given = ", ".join(f"{k}={v!r}" for k, v in pruning.items())
            raise ValueError(
                f"the PrunableViT given as model has prune_layers={model.prune_layers}, min_keep={model.min_keep}, "
                f"but {given} was asked: leave them unset to use the model's, or pass "
                f"model=pv.with_pruning({given}) (same weights)"
            )
        return model
    if isinstance(model, nn.Module):
        return PrunableViT(model, **pruning)
    if model is None:
        model = default_model()
    if isinstance(model, tuple):
        if len(model) != 2 or not isinstance(model[1], Mapping):
            raise ValueError(f"a model given as a tuple is (timm_name, timm_kwargs dict), got {model!r}")
        name, kwargs = model
        return PrunableViT.from_timm(name, **pruning, **kwargs)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            "model must be a checkpoint folder, a timm name, (name, timm_kwargs), a timm module or a PrunableViT, "
            f"got {type(model).__name__}"
        )
    if Path(model).exists():
        return load_backbone(model).with_pruning(**pruning)
    return PrunableViT.from_timm(str(model), **pruning)


def default_model() -> ModelSpec:
    """The checkpoint that ships with the package, else (with a warning) an untrained small ViT."""
    if (DEFAULT_CHECKPOINT / "config.json").is_file():
        return DEFAULT_CHECKPOINT
    _logger.warning("no trained default checkpoint ships with this install: using an untrained ViT")
    return (DEFAULT_MODEL_NAME, DEFAULT_MODEL_KWARGS)


def check_model_fits_data(model: ModelSpec, pv: PrunableViT, dataset: str, num_classes: int) -> None:
    """Refuse a model whose class count is not the dataset's; warn when a checkpoint runs on data other than
    it was trained on, and when a bare timm name gives an untrained model (rewards from a model that does not
    classify)."""
    if pv.num_classes != num_classes:
        raise ValueError(
            f"the model has {pv.num_classes} classes, dataset {dataset!r} has {num_classes}: pass a model trained "
            "on this dataset, or timm kwargs with num_classes matching it"
        )
    if is_checkpoint(model):
        trained_on = read_backbone_config(model).get("dataset")
        if trained_on is not None and trained_on != dataset:
            _logger.warning("the checkpoint %s was trained on %s, the env runs it on %s", model, trained_on, dataset)
    elif isinstance(model, (str, tuple)):
        name = model if isinstance(model, str) else model[0]
        _logger.warning("%s is built untrained: rewards come from a model that does not classify yet", name)


def is_checkpoint(model: ModelSpec) -> bool:
    """A model given as a path that exists: a checkpoint folder (``build_backbone`` loads it)."""
    return isinstance(model, (str, os.PathLike)) and Path(model).exists()
