"""Pictures of kept tokens: pruned patches dimmed, as ``masks.png`` (``eval.report``) and the env's ``render`` draw
them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PRUNED_BRIGHTNESS", "RENDER_SIZE", "dim_pruned", "rgb_frame", "unnormalize"]

PRUNED_BRIGHTNESS = 0.15
"""The share of its brightness a pruned patch keeps: dark, but its content still shows."""

RENDER_SIZE = 224
"""The least side of a rendered frame, in pixels: a 28x28 image is shown 8 times larger, watchable in a video."""


def dim_pruned(image: Tensor, keep: Tensor, grid: tuple[int, int]) -> Tensor:
    """``image`` with the patches that ``keep`` prunes dimmed to ``PRUNED_BRIGHTNESS``.

    Args:
        image: values on a 0..1 scale. # (..., H, W)
        keep: kept patches in raster order over the patch ``grid`` (rows, cols). # (N,) bool
        grid: the patch grid, ``rows * cols == N``.
    """
    h, w = image.shape[-2:]
    kept = F.interpolate(keep.float().view(1, 1, *grid), size=(h, w), mode="nearest")[0, 0]  # (H, W)
    return image * (PRUNED_BRIGHTNESS + (1.0 - PRUNED_BRIGHTNESS) * kept.to(image.dtype))


def unnormalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """A normalized image (C, H, W) back on the 0..1 scale the dataset stored it at, clamped."""
    mean_ = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    std_ = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return (image * std_ + mean_).clamp(0.0, 1.0)


def rgb_frame(
    image: Tensor,
    keep: Tensor,
    *,
    grid: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    min_size: int = RENDER_SIZE,
) -> np.ndarray:
    """One sub-environment's frame: its image as the dataset stored it, pruned patches dimmed, enlarged by an integer
    factor to at least ``min_size`` pixels a side (each pixel a square block, no blur).

    Args:
        image: the normalized image the model sees. # (C, H, W)
        keep: the current keep mask over the patch grid. # (N,) bool
        grid: the patch grid (rows, cols).
        mean, std: the dataset normalization to undo.
        min_size: the least side of the frame.

    Returns:
        an RGB image, gray images repeated on the three channels. # (H', W', 3) uint8
    """
    shown = dim_pruned(unnormalize(image.detach().float().cpu(), mean, std), keep.cpu(), grid)
    if shown.shape[0] != 3:  # gray, or channels that are not RGB: their mean
        shown = shown.mean(0, keepdim=True).expand(3, -1, -1)
    h, w = shown.shape[-2:]
    factor = max(1, math.ceil(min_size / max(h, w)))
    if (h * factor) % 2 or (w * factor) % 2:  # video encoders (H.264 in yuv420p) need even sides
        factor += 1
    pixels = (shown * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
    return np.ascontiguousarray(pixels.repeat(factor, axis=0).repeat(factor, axis=1))
