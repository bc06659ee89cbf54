"""The held-out splits: val out of the original train split, and test out of a folder without one, fixed and seeded."""

from __future__ import annotations

import numpy as np
from torch import Tensor

__all__ = ["TEST_FRACTION", "TEST_SEED", "VAL_FRACTION", "holdout_indices", "stratified_holdout"]

VAL_FRACTION = 1 / 12
"""Share of the original train split held out as ``val`` (5,000 of Fashion-MNIST's 60,000 images): tuning and
model selection happen there, never on ``test``."""
VAL_SEED = 0
TEST_FRACTION = 0.1
"""Share of an ``imagefolder:PATH`` without split subfolders held out as ``test`` (stratified, seeded)."""
TEST_SEED = 1  # another stream than the val split's, which is drawn from what is left


def holdout_indices(targets: Tensor | list[int], split: str) -> np.ndarray:
    """Sorted indices of ``split`` (``train`` or ``val``) within an original train split of ``targets``.

    A stratified ``VAL_FRACTION`` of every class (at least one image where a class has two or more) goes to
    ``val``, drawn with a fixed seed, so the same images are held out in every run and on every machine.
    """
    is_val = stratified_holdout(targets, VAL_FRACTION, seed=VAL_SEED)
    return np.flatnonzero(is_val if split == "val" else ~is_val)


def stratified_holdout(targets: Tensor | list[int], fraction: float, *, seed: int) -> np.ndarray:
    """Which items are held out: ``fraction`` of every class (at least one where a class has two or more), drawn with
    ``seed``. Not scikit-learn's ``train_test_split``: it refuses a class of one image, which small folders have."""
    labels = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, round(len(members) * fraction)) if len(members) > 1 else 0
        held.append(rng.permutation(members)[:count])
    out = np.zeros(len(labels), dtype=bool)
    out[np.concatenate(held) if held else []] = True
    return out
