"""Start a ViT of another patch size from trained weights, FlexiViT's way, with timm's own resampling.

``resample_into`` loads a trained ``PrunableViT``'s weights into a model of another patch size or image size (and so
another token count): timm's ``checkpoint_filter_fn`` resamples the patch embedding
(``timm.layers.resample_patch_embed``, the pseudo-inverse resize of FlexiViT) and the position embedding
(``timm.layers.resample_abs_pos_embed``); every other weight is shape-independent and copied as is. The data config
is the source's at the target's image size.
"""

from __future__ import annotations

import logging

import torch
from timm.models.vision_transformer import checkpoint_filter_fn

from apt_env.models.backbone import PrunableViT

__all__ = ["patch_size", "resample_into"]

_logger = logging.getLogger(__name__)


def patch_size(pv: PrunableViT) -> tuple[int, int]:
    """The model's patch size (height, width)."""
    return tuple(pv.model.patch_embed.patch_size)


def resample_into(source: PrunableViT, target: PrunableViT) -> PrunableViT:
    """Load ``source``'s weights and data config into ``target``, resampling its patch and position embeddings to
    ``target``'s (a larger image at the same patch size: the position embedding alone, onto the larger grid).

    Raises:
        ValueError: the two differ in anything but patch size, image size and token count (width, depth, classes,
            channels, prefix tokens), so that the weights cannot carry over.
    """
    mismatch = {
        key: (getattr(source, key), getattr(target, key))
        for key in ("embed_dim", "depth", "num_classes", "in_chans", "num_prefix_tokens")
        if getattr(source, key) != getattr(target, key)
    }
    if mismatch:
        raise ValueError(f"cannot resample: the models differ in more than the patch size (source, target): {mismatch}")
    with torch.no_grad():
        state = checkpoint_filter_fn(source.model.state_dict(), target.model)
        target.model.load_state_dict(state, strict=True)
    # The same preprocessing (statistics, resize rule) at the target's image size.
    target.data_config = {**source.data_config, "input_size": (target.in_chans, *target.img_size)}
    _logger.info(
        "resampled patch %s (%d tokens) to patch %s (%d tokens)",
        patch_size(source), source.num_patches, patch_size(target), target.num_patches,
    )  # fmt: skip
    return target
