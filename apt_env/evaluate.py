"""Evaluation of a ``PrunableViT`` on a data loader: accuracy, FLOPs, kept tokens and throughput.

Pruning is decided by an optional ``keep_fn(obs) -> keep mask`` on the environment's observation
(``apt_env.env.observe``): an agent, a heuristic baseline (random, top-k by class attention), or
nothing (the dense model). Its time counts in the measured throughput.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from apt_env.backbone import Mode, PrunableViT
from apt_env.env import OBS_KEYS, observe
from apt_env.flops import FlopCounter

__all__ = ["KeepFn", "evaluate"]

_logger = logging.getLogger(__name__)

KeepFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
"""``keep_fn(obs)``: the keep mask (B, N) bool for an observation of ``APTPrune-v0`` (batched tensors)."""


def evaluate(
    pv: PrunableViT,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    keep_fn: KeepFn | None = None,
    *,
    mode: Mode = "gathered",
    obs_keys: Sequence[str] = OBS_KEYS,
    desc: str = "eval",
) -> dict[str, float]:
    """Run ``pv`` over ``loader`` in eval mode, pruning with ``keep_fn`` at every stage.

    Args:
        pv: the model; evaluated on the device of its parameters and left in its previous mode.
        loader: batches of ``(images, labels)``.
        keep_fn: pruning decisions (see ``KeepFn``); None runs the dense model.
        mode: ``gathered`` removes pruned tokens (real speed), ``masked`` keeps shapes fixed.
        obs_keys: the observation keys ``keep_fn`` reads (fewer is faster).
        desc: progress bar label.

    Returns:
        ``acc1`` (top-1 accuracy, 0..1), ``loss`` (mean cross-entropy), ``gflops`` (mean per image,
        ``FlopCounter`` convention), ``tokens`` (mean patch tokens entering the last block),
        ``keep_ratio`` (mean fraction of patch tokens over all blocks), ``img_per_s`` (images per
        second of model time, data loading excluded) and ``num_images``.
    """
    device = next(pv.parameters()).device
    counter = FlopCounter(pv.model)
    was_training = pv.training
    pv.eval()
    loss = correct = flops = tokens = keep = 0.0
    num_images, model_time = 0, 0.0
    try:
        with torch.inference_mode():
            for images, labels in tqdm(loader, desc=desc, leave=False, disable=None):
                images, labels = images.to(device), labels.to(device)
                _synchronize(device)
                start = time.perf_counter()
                logits, kept = _forward(pv, images, keep_fn, mode, obs_keys)  # (B, classes), (B, depth)
                _synchronize(device)
                model_time += time.perf_counter() - start
                loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
                correct += float((logits.argmax(dim=1) == labels).sum())
                flops += float(counter(kept + pv.num_prefix_tokens).sum())
                tokens += float(kept[:, -1].sum())
                keep += float(kept.double().mean(dim=1).sum()) / pv.num_patches
                num_images += len(labels)
    finally:
        pv.train(was_training)
    if num_images == 0:
        raise ValueError("evaluate got an empty loader")
    results = {
        "acc1": correct / num_images,
        "loss": loss / num_images,
        "gflops": flops / num_images / 1e9,
        "tokens": tokens / num_images,
        "keep_ratio": keep / num_images,
        "img_per_s": num_images / max(model_time, 1e-9),
        "num_images": float(num_images),
    }
    _logger.info("%s: %s", desc, ", ".join(f"{k}={v:.4g}" for k, v in results.items()))
    return results


def _forward(
    pv: PrunableViT, images: torch.Tensor, keep_fn: KeepFn | None, mode: Mode, obs_keys: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits, and the patch tokens entering every block. # (B, num_classes), (B, depth) long"""
    bounds = pv.stage_bounds
    state, cls_attn = pv.embed(images), None
    kept = []
    for k in range(pv.num_stages + 1):
        if k > 0 and keep_fn is not None:
            state = pv.prune(state, keep_fn(observe(pv, state, cls_attn, k - 1, obs_keys)), mode)
        start, end = bounds[k], bounds[k + 1]
        kept.append(state.num_kept().unsqueeze(1).expand(-1, end - start))
        if keep_fn is not None and "cls_attn" in obs_keys and k < pv.num_stages:
            state = pv.run_blocks(state, start, end - 1)
            cls_attn = pv.cls_attention(state, end - 1)
            start = end - 1
        state = pv.run_blocks(state, start, end)
    return pv.head(state), torch.cat(kept, dim=1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
