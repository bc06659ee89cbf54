"""The image transforms: this project's (``build_transform``) and timm's eval transform of a data config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

from apt_env.data.config import TIMM_DATA_KEYS

__all__ = ["CHANNELS", "build_transform", "timm_eval_transform"]

CHANNELS = (1, 3)
"""Gray or RGB: what v2.Grayscale and v2.RGB convert between."""


def build_transform(
    *,
    img_size: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool = False,
    hflip: bool = True,
    input_shape: tuple[int, int, int] | None = None,
) -> v2.Compose:
    """uint8 image (PIL or ``(C, H, W)`` tensor) -> normalized float32 ``(in_chans, img_size, img_size)``.

    Channels: ``v2.Grayscale`` turns RGB into gray (luma) when ``in_chans`` is 1, ``v2.RGB`` repeats gray
    when it is 3. Size: ``v2.Resize`` of the short side to ``img_size`` (bilinear, antialias), then
    ``v2.CenterCrop``. Augmentation: ``v2.RandomCrop`` with zero padding of ``img_size // 8``, then
    ``v2.RandomHorizontalFlip`` when ``hflip``; both draw from torch's global RNG, which DataLoader
    workers seed from the loader's generator.

    Args:
        img_size: output side in pixels.
        in_chans: output channels, 1 or 3.
        mean: per-channel mean of the output channels, 0..1 scale.
        std: per-channel standard deviation of the output channels.
        augment: add the random crop (and flip when ``hflip``).
        hflip: allow the horizontal flip when augmenting.
        input_shape: ``(C, H, W)`` of every input when all share it (tensor datasets): the steps that would
            not change it are left out, saving their per-image cost. None: any PIL image or tensor.

    Returns:
        The transform.
    """
    if in_chans not in CHANNELS:
        raise ValueError(f"in_chans must be 1 (gray) or 3 (RGB), got {in_chans}")
    chans, height, width = (None, None, None) if input_shape is None else input_shape
    steps: list[v2.Transform] = [v2.PILToTensor()] if input_shape is None else []  # PIL to uint8 tensor
    # x / 255 exactly, as ToTensor and timm's eval transform divide; ToDtype(scale=True) multiplies by 1 / 255,
    # one ulp away on half of the 256 levels.
    steps += [v2.ToDtype(torch.float32), v2.Normalize(mean=[0.0], std=[255.0])]
    if in_chans == 1 and chans != 1:
        steps.append(v2.Grayscale(1))  # before resizing: less work
    if (height, width) != (img_size, img_size):
        steps += [v2.Resize(img_size, interpolation=v2.InterpolationMode.BILINEAR), v2.CenterCrop(img_size)]
    if augment:
        steps.append(v2.RandomCrop(img_size, padding=max(1, img_size // 8)))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    if in_chans == 3 and chans != 3:
        steps.append(v2.RGB())  # after resizing: less work
    steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return v2.Compose(steps)


def timm_eval_transform(data_config: Mapping[str, Any], *, in_chans: int) -> v2.Compose:
    """timm's eval transform of a model's data config, fed PIL images in the model's channels, as timm's
    own datasets feed it."""
    import timm.data  # here: importing timm is slow and only this path needs it

    timm_config = {k: v for k, v in data_config.items() if k in TIMM_DATA_KEYS}  # not ``preprocessing``
    return v2.Compose(
        [
            v2.ToPILImage(),  # uint8 tensors to PIL; PIL images pass through
            v2.Grayscale(1) if in_chans == 1 else v2.RGB(),
            timm.data.create_transform(**timm_config, is_training=False),
        ]
    )
