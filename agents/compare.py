"""The agent next to the heuristic baselines at its own keep ratio: episode returns and test accuracy."""

from __future__ import annotations

import logging
from typing import Any

import torch

from agents.baselines import ClsAttentionTopK, KeepAll, RandomKeep
from agents.policy import APTPolicy
from agents.rollout import at_stage_ratios, evaluate_returns
from apt_env.data.datasets import dataset_for, make_loader
from apt_env.envs.env import APTPruneVectorEnv
from apt_env.eval.evaluate import evaluate
from apt_env.eval.report import markdown_table

_logger = logging.getLogger(__name__)


def compare_policies(
    envs: APTPruneVectorEnv,
    policy: APTPolicy,
    *,
    dataset: str,
    data_root: str = "data",
    episodes: int = 8,
    images: int = 0,
    seed: int = 0,
    split: str = "val",
) -> tuple[list[float], list[tuple[str, dict[str, Any]]]]:
    """Rows for the agent, keep-all, random and class-attention top-k (both at the agent's stage ratios).

    Args:
        envs: the environment on the split of the returns (its backbone is evaluated).
        policy: the agent, acting deterministically (its expected keep count, by logit).
        dataset: the dataset's name, for the accuracy pass over its ``split``.
        data_root: where datasets live.
        episodes: batches of ``num_envs`` test images for the episode returns (the same for every row).
        images: test images for the accuracy pass (0: all).
        seed: seed of the episode draws and of random pruning.
        split: the split of the accuracy pass (``val``, the default, to tune; ``test`` to report).

    Returns:
        The agent's keep ratio per stage, and ``(name, results)`` rows, results holding
        ``evaluate_returns``'s and ``evaluate``'s keys.
    """
    pv = envs.pv
    policy.eval()
    agent = lambda obs: policy.act(obs, deterministic=True)  # noqa: E731
    ours = evaluate_returns(envs, agent, episodes=episodes, seed=seed)
    ratios = ours["stage_ratios"]
    acts = {
        "APT agent": agent,
        "keep all": KeepAll().act,
        "random (same ratio)": at_stage_ratios(RandomKeep(0.5, seed=seed).act, ratios),
        "cls-attn top-k (same ratio)": at_stage_ratios(ClsAttentionTopK(0.5).act, ratios),
    }
    test_set = dataset_for(pv, dataset, split, root=data_root)  # as the backbone preprocesses, as the env does
    if images:
        test_set = torch.utils.data.Subset(test_set, range(min(images, len(test_set))))
    loader = make_loader(test_set, batch_size=256, shuffle=False, seed=seed)
    rows = []
    for name, act in acts.items():
        returns = ours if name == "APT agent" else evaluate_returns(envs, act, episodes=episodes, seed=seed)
        rows.append((name, {**returns, **evaluate(pv, loader, act, desc=name)}))
    return ratios, rows


def format_comparison(ratios: list[float], rows: list[tuple[str, dict[str, Any]]], num_patches: int) -> str:
    """The rows as a Markdown table, under the agent's keep ratio per stage."""
    table = [
        {
            "policy": name,
            "episode return": r["episode_return"],
            "loss delta": r["loss_delta"],
            "top-1 (%)": 100 * r["acc1"],
            "GFLOPs/img": r["gflops"],
            "tokens (last block)": f"{r['tokens']:.1f}/{num_patches}",
            "img/s": r["img_per_s"],
        }
        for name, r in rows
    ]
    formats = {"episode return": ".4f", "loss delta": ".4f", "top-1 (%)": ".2f", "img/s": ".0f"}
    ratios_text = ", ".join(f"{r:.2f}" for r in ratios)
    return f"stage keep ratios of the agent: {ratios_text}\n" + markdown_table(
        table, list(table[0]), formats=formats, left=["policy"]
    )
