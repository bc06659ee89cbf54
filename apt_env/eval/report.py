"""Evaluation rows as files: ``results.csv``, a Markdown table, the trade-off plot and the kept-token pictures."""

from __future__ import annotations

import csv
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from apt_env.envs.observe import BUDGET_KEYS, OBS_KEYS
from apt_env.envs.render import dim_pruned
from apt_env.eval.evaluate import eval_mode, forward_policy

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "agent_masks_figure",
    "markdown_table",
    "plot_compute",
    "plot_masks",
    "plot_tradeoff",
    "write_csv",
]


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Rows as CSV with exactly ``columns``, in that order."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _cell(key: str, value: Any, spec: str | None) -> str:
    if isinstance(value, str):
        return value
    if spec is not None:
        return format(value, spec)
    if key in ("top1", "top1_low", "top1_high"):
        return f"{100 * value:.2f}"
    if key.startswith("img_per_s") or key == "num_images":
        return f"{value:.0f}"
    if key == "budget":
        return f"{value:.3f}"
    return f"{value:.4g}"


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    formats: Mapping[str, str] | None = None,
    left: Collection[str] | None = None,
) -> str:
    """Rows as a Markdown table (top-1 in percent, text left-aligned, numbers right-aligned).

    Args:
        rows: one mapping per row, with a value for every column.
        columns: the keys shown, in order; also the header.
        formats: a format spec per column (``".4f"``) in place of the default of its key.
        left: the left-aligned columns; default: those whose first value is text.
    """
    formats = formats or {}
    if left is None:
        left = [c for c in columns if isinstance(rows[0][c], str)]
    lines = ["| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---" if c in left else "---:" for c in columns) + "|")
    lines += ["| " + " | ".join(_cell(c, r[c], formats.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def curve_label(row: Mapping[str, Any]) -> str:
    """The curve a row belongs to (its ``(role, rule, fused_token)``): its rule, prefixed by its role when that is a
    control (another backbone), suffixed when the row carries EViT's fused token."""
    label = f"{row['role']}: {row['rule']}" if row["role"] == "control" else str(row["rule"])
    return label + (" + fused token" if row["fused_token"] else "")


def plot_tradeoff(path: str | Path, rows: Sequence[Mapping[str, Any]], *, title: str = "") -> Figure:
    """Top-1 (with its 95% interval) against total GFLOPs and against measured img/s at batch 256; returns the
    (closed) figure.

    One curve per ``(role, rule, fused_token)`` of the rows (``curve_label``); single rows are points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    families: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        families.setdefault(curve_label(row), []).append(row)
    for ax, x_key, x_label in (
        (axes[0], "gflops", "GFLOPs per image (backbone + policy)"),
        (axes[1], "img_per_s_b256", "measured images/s at batch 256"),
    ):
        for family, members in families.items():
            members = sorted(members, key=lambda r: r[x_key])
            x = [r[x_key] for r in members]
            y = [100 * r["top1"] for r in members]
            err = [[100 * (r["top1"] - r["top1_low"]) for r in members],
                   [100 * (r["top1_high"] - r["top1"]) for r in members]]  # fmt: skip
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=family, linestyle="-" if len(x) > 1 else "")
        ax.set_xlabel(x_label)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def plot_masks(
    path: str | Path | None,
    images: Tensor,
    masks: Mapping[str, Tensor],
    *,
    grid: tuple[int, int],
    title: str = "",
) -> Figure:
    """A grid of images with pruned patches dimmed: one row per image, the image and then, for each policy,
    its kept tokens after every stage with their count; returns the (closed) figure.

    Args:
        path: the PNG to write (None: only return the figure, e.g. for TensorBoard).
        images: (M, C, H, W) normalized images.
        masks: policy name -> keep masks (M, K, N) bool over the patch grid.
        grid: the patch grid ``(rows, cols)``, ``rows * cols == N``.
        title: the figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = images.shape[0]
    stages = next(iter(masks.values())).shape[1]
    cols = 1 + stages * len(masks)
    fig, axes = plt.subplots(m, cols, figsize=(1.3 * cols, 1.3 * m + 0.6), squeeze=False)
    for i in range(m):
        img = images[i].float().mean(0)  # gray
        img = (img - img.min()) / (img.max() - img.min()).clamp(min=1e-8)
        panels: list[tuple[str, Tensor, str]] = [("image", img, "")]
        for name, mask in masks.items():
            for k in range(stages):
                kept = f"{int(mask[i, k].sum())} kept"
                panels.append((f"{name}\nstage {k + 1}", dim_pruned(img, mask[i, k], grid), kept))
        for j, (label, panel, kept) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(panel.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(kept, fontsize=6, labelpad=1)  # each image's own count: adaptive agents differ
            if i == 0:
                ax.set_title(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def plot_compute(
    path: str | Path,
    against: Tensor,
    counts: Mapping[str, Tensor],
    *,
    label: str = "dense model's confidence (top softmax probability)",
    title: str = "",
) -> Figure:
    """Where the compute went: each image's kept patch tokens in the last block against a per-image quantity (by
    default the dense model's confidence in its answer; the object's area, ...), one series per policy, with the mean
    count in ten bins of it; returns the (closed) figure.

    Args:
        path: the PNG to write.
        against: (M,) the quantity per image; shown as its percentile over the images.
        counts: policy name -> (M,) patch tokens kept at the last stage, per image.
        label: what ``against`` is, for the axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    # Percentiles, not values: confidences crowd near 1, and areas and probabilities are not on one scale.
    x = (against.double().argsort().argsort().double() + 0.5) * 100 / len(against)
    bins = (x // 10).clamp(max=9).long()
    for name, count in counts.items():
        count = count.double()
        ax.scatter(x.numpy(), count.numpy(), s=2, alpha=0.15)
        means = [(float(x[bins == i].mean()), float(count[bins == i].mean())) for i in range(10) if (bins == i).any()]
        ax.plot(*zip(*means), marker="o", label=f"{name} (mean per decile)")
    ax.set_xlabel(f"{label}, percentile over the images")
    ax.set_ylabel("patch tokens entering the last block")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def agent_masks_figure(pv: Any, policy: Any, dataset: Any, *, count: int = 8, budget: float = 0.5) -> Figure:
    """A policy's kept patches at every stage (its deterministic rule) on a dataset's first ``count`` images, as
    ``evaluate.py``'s masks.png, for TensorBoard's ``add_figure``.

    Args:
        pv: the ``PrunableViT``.
        policy: anything with ``act(obs, deterministic=True)`` and ``use_budget``, e.g. ``APTPolicy``.
        dataset: items ``(image, label)``.
        count: images shown.
        budget: the budget a policy with a budget input observes.
    """
    device = next(pv.parameters()).device
    images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
    use_budget = getattr(policy, "use_budget", False)
    keys = (*OBS_KEYS, *BUDGET_KEYS) if use_budget else OBS_KEYS
    with torch.inference_mode(), eval_mode(pv, policy):
        _, _, masks = forward_policy(
            pv, images.to(device), lambda obs: policy.act(obs, deterministic=True), obs_keys=keys,
            budget=budget if use_budget else None,
        )  # fmt: skip
    return plot_masks(None, images, {"agent": masks.cpu()}, grid=pv.grid_size)
