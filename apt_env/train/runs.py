"""What every script does with a run, in one place, as CleanRL's scripts do it: seed everything first, name the run
folder ``{env}__{exp_name}__{seed}__{time}``, keep the arguments that made it in its ``args.json`` (so that
``--resume`` continues with exactly those), and show them in TensorBoard as a ``|param|value|`` table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

from stable_baselines3.common.utils import set_random_seed

from apt_env.train.distributed import broadcast_int

__all__ = ["ARGS_FILE", "hyperparameters_text", "load_args", "new_run_dir", "resume_args", "seed_everything"]

ARGS_FILE = "args.json"
"""The file in a run folder that holds the arguments of the run."""

T = TypeVar("T")


class _Resumable(Protocol):
    """A script's ``Args``: what ``resume_args`` reads."""

    resume: str | None


R = TypeVar("R", bound=_Resumable)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators, as CleanRL scripts do first (stable-baselines3's
    ``set_random_seed``; cuDNN's algorithm choice left as it is)."""
    set_random_seed(seed, using_cuda=False)


def new_run_dir(
    out_dir: str | Path, *, env_id: str, exp_name: str, seed: int, config: Mapping[str, Any], main_rank: bool = True
) -> Path:
    """A new run folder ``out_dir/{env_id}__{exp_name}__{seed}__{time}`` holding ``config`` as ``args.json``.

    Call it on every process of a distributed run (after joining the process group): all of them get the folder
    named by rank 0's clock, and only the main rank makes it.

    Args:
        out_dir: the parent folder of the run folders.
        env_id: what the run is on: the environment id, or the dataset's name.
        exp_name: the name of the experiment.
        seed: the seed of the run.
        config: the arguments of the run, JSON-serializable (``dataclasses.asdict(args)``).
        main_rank: whether this process makes the folder.
    """
    stamp = broadcast_int(int(time.time()))
    run_dir = Path(out_dir) / f"{env_id}__{exp_name}__{seed}__{stamp}"
    if main_rank:
        run_dir.mkdir(parents=True)
        (run_dir / ARGS_FILE).write_text(json.dumps(dict(config), indent=2) + "\n")
    return run_dir


def load_args(
    run_dir: str | Path,
    args_type: type[T],
    *,
    script: str,
    renamed: Mapping[str, str] | None = None,
    **changes: Any,
) -> T:
    """The arguments saved in ``run_dir``'s ``args.json`` as an ``args_type`` dataclass, with ``changes`` over them.

    Args:
        run_dir: the run folder (what ``--resume`` names).
        args_type: the script's ``Args`` dataclass.
        script: the script's file name, for the error message.
        renamed: old field name -> new, for run folders saved before a field was renamed.
        changes: fields to replace, e.g. ``resume=str(run_dir)``.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``args.json``.
        ValueError: ``args.json`` has fields that ``args_type`` does not know.
    """
    path = Path(run_dir) / ARGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no {ARGS_FILE} there; is it a run folder of {script}?")
    saved = {(renamed or {}).get(k, k): v for k, v in json.loads(path.read_text()).items()}
    unknown = sorted(set(saved) - {f.name for f in fields(args_type)})
    if unknown:
        raise ValueError(f"--resume {run_dir}: {ARGS_FILE} has fields {unknown} that {script} does not know")
    return args_type(**{**saved, **changes})


def resume_args(args: R, *, script: str, keep: Sequence[str] = (), renamed: Mapping[str, str] | None = None) -> R:
    """The arguments of the run that ``args.resume`` names, to resume it: those saved in its ``args.json``, with
    ``resume`` and the fields in ``keep`` (e.g. ``stop_epoch``) taken from ``args``, this invocation's.

    Args:
        args: the script's parsed ``Args``, with ``resume`` set to the run folder.
        script: the script's file name, for the error messages.
        keep: fields that this invocation sets, not the saved run.
        renamed: old field name -> new (``load_args``).
    """
    run_dir = args.resume
    if run_dir is None:
        raise ValueError(f"{script}: resume_args needs --resume RUN_DIR")
    changes = {name: getattr(args, name) for name in keep}
    return load_args(run_dir, type(args), script=script, renamed=renamed, resume=str(run_dir), **changes)


def hyperparameters_text(config: Mapping[str, Any]) -> str:
    """The arguments as CleanRL's Markdown table for ``SummaryWriter.add_text("hyperparameters", ...)``."""
    return "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in config.items())
