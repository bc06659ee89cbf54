"""The training state for ``--resume``: one ``torch.save`` file of plain containers and tensors
(optimizer, scheduler, counters, RNG states), written atomically and read back with
``weights_only=True``. ``resume_state`` is how a script continues a run from it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apt_env.atomic import write_file

__all__ = [
    "TRAIN_STATE_FILE",
    "Resumed",
    "get_rng_state",
    "load_train_state",
    "resume_state",
    "save_train_state",
    "set_rng_state",
]

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.pt"
"""The file in a run folder that holds its training state."""


def save_train_state(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Atomically write a training state (optimizer, scheduler, counters, RNG states) for resuming.

    Args:
        path: the file to write; replaced only once the new one is complete.
        state: tensors and plain Python containers and scalars, as ``torch.load(weights_only=True)``
            reads them back; use ``get_rng_state()`` for RNG states.

    Returns:
        The file written.
    """
    return write_file(path, lambda f: torch.save(dict(state), f))


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    """The training state at ``path`` (tensors on the CPU), or None if there is none.

    Raises:
        ValueError: the file is corrupt or holds objects other than tensors and plain containers.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, disallowed global: all mean "cannot resume"
        raise ValueError(
            f"training state {path} is corrupt or unreadable: {err}; delete it to start the run over"
        ) from err
    if not isinstance(state, dict):
        raise ValueError(f"training state {path} is corrupt: it holds a {type(state).__name__}, not a dict")
    return state


def get_rng_state() -> dict[str, Any]:
    """The global RNG states of Python, NumPy and torch (CPU and CUDA), in a form ``save_train_state`` can store."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states captured by ``get_rng_state``."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Resumed:
    """A run's training state as one process continues it.

    Attributes:
        state: the whole saved state.
        own: this process's share: its RNG states (``"rng"``) and whatever else each process saved for itself.
    """

    state: dict[str, Any]
    own: dict[str, Any]

    def restore_rng(self) -> None:
        """Restore this process's global RNG states: last, once building the run has drawn from them."""
        set_rng_state(self.own["rng"])


def resume_state(run_dir: str | Path | None, *, rank: int = 0, world_size: int = 1) -> Resumed | None:
    """The training state ``--resume run_dir`` continues from, or None: a new run (``run_dir`` None), or a run
    folder without a state yet (it starts over, with a warning).

    A state saved by several processes holds their shares as ``{"ranks": [...]}``, resumed on as many processes,
    each its own; a state without ``"ranks"`` is one process's, its own share.

    Args:
        run_dir: the run folder that ``--resume`` names, or None.
        rank: this process's rank.
        world_size: the number of processes resuming the run.

    Raises:
        ValueError: the state is corrupt, or was saved by another number of processes.
    """
    if run_dir is None:
        return None
    state = load_train_state(Path(run_dir) / TRAIN_STATE_FILE)
    if state is None:
        logger.warning("%s has no training state yet: starting it over", run_dir)
        return None
    ranks = state.get("ranks", [state])
    if len(ranks) != world_size:
        raise ValueError(f"{run_dir} was trained on {len(ranks)} processes; resume it on as many, not {world_size}")
    return Resumed(state, ranks[rank])
