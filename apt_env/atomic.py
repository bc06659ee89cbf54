"""Atomic writes: a file or a folder of files replaces its target whole, or not at all.

Files go to a temporary sibling, are fsynced, then renamed over the target, so a crash leaves either
the previous complete version or the new one, never half of one. A folder cannot be renamed over a
non-empty one, so the old folder is first renamed aside to ``.NAME.old``; ``recover_interrupted_save``
puts it back if a save died between the two renames. One writer per path is assumed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["recover_interrupted_save", "write_file", "write_folder"]

_logger = logging.getLogger(__name__)


def write_file(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Write one file atomically: ``write(f)`` fills a temporary sibling opened for binary writing, which
    replaces ``path`` only once it is complete and synced.

    Args:
        path: the file to write; its folder is created if missing.
        write: called once with the open temporary file.

    Returns:
        The file written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        stale.unlink(missing_ok=True)  # left by a save that was killed
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
        _fsync_dir(target.parent)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def write_folder(target: Path, writers: Mapping[str, Callable[[Path], Any]]) -> None:
    """Write a folder of files atomically: each ``writers[name](path)`` writes one file into a temp
    folder beside ``target``; only when all are written and synced does it replace ``target``."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(target)
    for stale in parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a save that was killed
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        for name, write in writers.items():
            write(tmp / name)
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, target: Path) -> None:
    """Move the complete folder ``tmp`` to ``target``, keeping the old one until the new one is in place.

    The old folder is first renamed aside to ``.NAME.old``; a crash between the two renames is repaired
    by the next read or save (``recover_interrupted_save``).
    """
    backup = target.with_name(f".{target.name}.old")
    if backup.exists():
        shutil.rmtree(backup)
    if target.exists():
        os.replace(target, backup)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(backup, ignore_errors=True)


def recover_interrupted_save(target: str | Path) -> None:
    """Put back the previous folder if a save died after moving it aside (between the two renames of
    ``write_folder``); called before every read and write of a folder."""
    target = Path(target)
    backup = target.with_name(f".{target.name}.old")
    if not target.exists() and backup.is_dir():
        _logger.warning("restoring %s from %s (a previous save was interrupted)", target, backup)
        os.replace(backup, target)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
