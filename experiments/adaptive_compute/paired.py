"""The paired comparison both experiments of this folder print: a policy against a reference on the same images."""

from __future__ import annotations

import math

from scipy.stats import spearmanr
from torch import Tensor

from apt_env.eval.evaluate import wilson_interval


def paired_columns(
    correct: Tensor, reference: Tensor, gflops: float, counts: Tensor, confidence: Tensor, *, versus: str
) -> dict[str, str]:
    """The table columns of a mean-budget policy scored on the same images as a reference policy.

    Args:
        correct, reference: 1 where each policy classified the image right, 0 else (B,) float64.
        gflops: the policy's mean backbone GFLOPs as a fraction of the dense model's.
        counts: the patch tokens it kept after each stage (B, K).
        confidence: the dense model's top probability per image (B,).
        versus: the reference's name in the difference's column.

    Returns:
        top-1 with its 95% (Wilson) interval, the paired difference from the reference with its 95% interval (from
        the per-image differences), the GFLOPs, the kept tokens per stage (mean and std over images) and the
        Spearman correlation of the last stage's count with ``confidence`` ("one count" where every image keeps
        the same).
    """
    diff = correct - reference
    mean, half = float(diff.mean()), 1.96 * float(diff.std()) / math.sqrt(len(diff))
    low, high = wilson_interval(int(correct.sum()), len(correct))
    last = counts[:, -1]
    varies = bool(last.min() < last.max())
    return {
        "top-1 (%) [95%]": f"{100 * correct.mean():.2f} [{100 * low:.2f}, {100 * high:.2f}]",
        f"minus {versus} (points) [95%]": f"{100 * mean:+.2f} [{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}]",
        "backbone GFLOPs of dense": f"{gflops:.4f}",
        "kept per stage: mean (std)": ", ".join(
            f"{m:.1f} ({s:.1f})" for m, s in zip(counts.mean(0).tolist(), counts.std(0).tolist())
        ),
        "Spearman(last count, confidence)": (
            f"{spearmanr(confidence.numpy(), last.numpy()).statistic:+.3f}" if varies else "one count"
        ),
    }
