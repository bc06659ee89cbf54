"""Cluttered Fashion-MNIST: a garment at a random place on a larger canvas among fragments of other garments.

The Fashion-MNIST form of cluttered translated MNIST (Mnih et al. 2014, "Recurrent Models of Visual Attention"):
every image is one 28x28 garment placed uniformly at random fully inside a square canvas, plus ``fragments`` squares
of ``fragment_size`` px cropped at random from other garments of the same split and placed at random; pixel values
add up and are clipped to 0..255. The label is the garment's class, and its box (the smallest box holding every
non-zero pixel of the garment, in canvas pixels) is known per image, for the object-box oracle.

Names (``build_dataset``'s ``name``), with options after a colon, ``key=value`` separated by commas:

- ``cluttered-fashion-mnist``: canvas 56 px (196 tokens at patch 4), 4 fragments of 8x8 px.
- ``translated-fashion-mnist``: the same without fragments (``fragments=0``).
- ``scaled-cluttered-fashion-mnist``: the garment resized to a side drawn per image from 14 to 42 px first.
- options: ``canvas`` (px, e.g. RAM's 60), ``fragments``, ``fragment_size``, ``scale=LOW-HIGH`` (px), ``seed``;
  e.g. ``cluttered-fashion-mnist:canvas=60,fragments=8``.

Every image is a function of (split, index, seed): every run and policy sees the same val and test images. The train
split with ``augment`` draws new placements every time an image is read (from torch's RNG, as the other datasets'
augmentation). Fragments come from the same split's garments, so val and test never borrow from a training image.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["CLUTTERED", "ClutterSpec", "ClutteredDataset", "box_token_mask", "parse_cluttered"]

GARMENT = 28  # Fashion-MNIST's side
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}  # one random stream per split
Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, end exclusive


@dataclass(frozen=True)
class ClutterSpec:
    """How a cluttered image is made.

    Args:
        canvas: side of the square canvas, in pixels.
        fragments: clutter fragments per image (0: the translated task).
        fragment_size: side of each square fragment, in pixels.
        scale: ``(low, high)``: the garment's side is drawn per image uniformly from ``low..high`` px (inclusive);
            None keeps the garment at 28 px.
        seed: seed of the fixed val and test images (and of the train images without augmentation).
    """

    canvas: int = 56
    fragments: int = 4
    fragment_size: int = 8
    scale: tuple[int, int] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fragments < 0:
            raise ValueError(f"fragments must be 0 or more, got {self.fragments}")
        if not 1 <= self.fragment_size <= GARMENT:
            raise ValueError(f"fragment_size must be in 1..{GARMENT} (a crop of a garment), got {self.fragment_size}")
        if self.fragment_size > self.canvas:
            raise ValueError(f"fragments of {self.fragment_size} px do not fit a canvas of {self.canvas} px")
        low, high = self.scale if self.scale is not None else (GARMENT, GARMENT)
        if not 1 <= low <= high:
            raise ValueError(f"scale must be LOW-HIGH with 1 <= LOW <= HIGH, got {self.scale}")
        if high > self.canvas:
            raise ValueError(f"a garment of up to {high} px does not fit a canvas of {self.canvas} px")


CLUTTERED: dict[str, ClutterSpec] = {
    "cluttered-fashion-mnist": ClutterSpec(),
    "translated-fashion-mnist": ClutterSpec(fragments=0),
    "scaled-cluttered-fashion-mnist": ClutterSpec(scale=(14, 42)),
}
"""The cluttered task's names and their specs; options after a colon override them."""


def parse_cluttered(name: str) -> ClutterSpec | None:
    """The spec a dataset name stands for, or None when the name is not one of ``CLUTTERED``.

    Raises:
        ValueError: an unknown option or a malformed value, naming it.
    """
    base, _, options = name.partition(":")
    if base not in CLUTTERED:
        return None
    spec = CLUTTERED[base]
    known = {f.name for f in fields(ClutterSpec)}
    changes: dict[str, object] = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in known:
            raise ValueError(f"{name!r}: unknown option {key!r}; options: {', '.join(sorted(known))}")
        if key == "scale":
            match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)
            if match is None:
                raise ValueError(f"{name!r}: scale is LOW-HIGH in pixels, e.g. scale=14-42; got {value!r}")
            changes[key] = (int(match[1]), int(match[2]))
        else:
            try:
                changes[key] = int(value)
            except ValueError:
                raise ValueError(f"{name!r}: {key} must be an integer, got {value!r}") from None
    return replace(spec, **changes)


def _tight_boxes(garments: np.ndarray) -> np.ndarray:
    """``(N, 4)`` boxes ``(x0, y0, x1, y1)`` (end exclusive) of every image's non-zero pixels; a blank image gets
    its whole frame."""
    n, height, width = garments.shape
    rows, cols = garments.any(axis=2), garments.any(axis=1)
    boxes = np.empty((n, 4), dtype=np.int64)
    boxes[:, 0] = np.where(cols.any(1), cols.argmax(1), 0)
    boxes[:, 1] = np.where(rows.any(1), rows.argmax(1), 0)
    boxes[:, 2] = np.where(cols.any(1), width - cols[:, ::-1].argmax(1), width)
    boxes[:, 3] = np.where(rows.any(1), height - rows[:, ::-1].argmax(1), height)
    return boxes


class ClutteredDataset(Dataset[tuple[Tensor, int]]):
    """Cluttered canvases made on the fly from one split's garments.

    Args:
        garments: ``(N, 1, 28, 28)`` uint8 garments of one split (fragments come from these too).
        targets: ``(N,)`` labels.
        classes: class names.
        spec: how the canvas is made.
        split: ``train``, ``val`` or ``test``: which fixed stream the images come from.
        redraw: draw new placements every read (training augmentation) instead of the fixed ones.
        transform: uint8 ``(1, canvas, canvas)`` canvas -> the model's input.
        info: what the transformed samples look like.
    """

    def __init__(
        self,
        garments: Tensor,
        targets: Tensor,
        *,
        classes: list[str],
        spec: ClutterSpec,
        split: str,
        redraw: bool,
        transform: Callable[[Tensor], Tensor],
        info: object,
    ) -> None:
        if garments.dtype != torch.uint8 or tuple(garments.shape[1:]) != (1, GARMENT, GARMENT):
            raise ValueError(f"garments must be uint8 (N, 1, 28, 28), got {garments.dtype} {tuple(garments.shape)}")
        if len(garments) < 2 and spec.fragments:
            raise ValueError("fragments come from other garments: the split needs at least 2 images")
        self._garments = garments[:, 0].numpy()
        self._boxes = _tight_boxes(self._garments)
        self.targets = targets.long()
        self.classes = classes
        self.spec = spec
        self.split = split
        self.redraw = redraw
        self.transform = transform
        self.info = info

    def __len__(self) -> int:
        return len(self._garments)

    @property
    def garments(self) -> Tensor:
        """``(N, 1, 28, 28)`` uint8: the split's garments, the only source of its images and fragments."""
        return torch.from_numpy(self._garments)[:, None]

    def _rng(self, index: int) -> np.random.Generator:
        if self.redraw:
            return np.random.default_rng(int(torch.randint(0, 2**62, ())))
        return np.random.default_rng([self.spec.seed, _SPLIT_CODES[self.split], index])

    def render(self, index: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, Box]:
        """The uint8 ``(canvas, canvas)`` image ``index`` and its garment's box ``(x0, y0, x1, y1)`` (end exclusive)."""
        spec, size = self.spec, self.spec.canvas
        rng = self._rng(index) if rng is None else rng
        garment, box = self._garments[index], self._boxes[index]
        if spec.scale is not None:
            side = int(rng.integers(spec.scale[0], spec.scale[1] + 1))
            if side != GARMENT:
                resized = F.interpolate(
                    torch.from_numpy(garment)[None, None].float(), size=(side, side), mode="bilinear",
                    antialias=True, align_corners=False,
                )  # fmt: skip
                garment = resized[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()
                box = _tight_boxes(garment[None])[0]
        side = garment.shape[0]
        canvas = np.zeros((size, size), dtype=np.int32)
        y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        canvas[y : y + side, x : x + side] += garment
        frag = spec.fragment_size
        for _ in range(spec.fragments):
            other = int(rng.integers(0, len(self._garments) - 1))
            other += other >= index  # any garment but this one
            sy, sx = (int(v) for v in rng.integers(0, GARMENT - frag + 1, size=2))
            ty, tx = (int(v) for v in rng.integers(0, size - frag + 1, size=2))
            canvas[ty : ty + frag, tx : tx + frag] += self._garments[other, sy : sy + frag, sx : sx + frag]
        x0, y0, x1, y1 = (int(v) for v in box)
        return np.minimum(canvas, 255).astype(np.uint8), (x + x0, y + y0, x + x1, y + y1)

    def box(self, index: int) -> Box:
        """The garment's box in image ``index`` (the fixed image: ``redraw`` does not apply)."""
        return self.render(index, np.random.default_rng([self.spec.seed, _SPLIT_CODES[self.split], index]))[1]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, _box = self.render(index)
        return self.transform(torch.from_numpy(image)[None]), int(self.targets[index])


def box_token_mask(boxes: Tensor, *, grid: int, patch: int) -> Tensor:
    """``(B, grid * grid)`` bool: which patch tokens (row-major) overlap each box ``(x0, y0, x1, y1)`` of ``boxes``
    ``(B, 4)``, end exclusive, in pixels."""
    start = torch.arange(grid, device=boxes.device) * patch
    cols = (start + patch > boxes[:, 0:1]) & (start < boxes[:, 2:3])  # (B, grid)
    rows = (start + patch > boxes[:, 1:2]) & (start < boxes[:, 3:4])
    return (rows[:, :, None] & cols[:, None, :]).flatten(1)
