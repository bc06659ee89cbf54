"""Episode returns of any token policy on ``APTPruneVectorEnv``, so agents and baselines compare alike."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from apt_env.envs.env import APTPruneVectorEnv
from apt_env.envs.observe import KeepFn


@torch.no_grad()
def evaluate_returns(envs: APTPruneVectorEnv, act: KeepFn, *, episodes: int, seed: int) -> dict[str, float | list]:
    """Mean episode return and what it is made of, over ``episodes`` batches of ``num_envs`` images.

    The same ``seed`` draws the same images, so policies evaluated with it are compared on the same
    episodes.

    Returns:
        ``episode_return``, ``loss_delta`` (``loss_plain - loss_multi`` at the end), ``keep_ratio``
        (final fraction of patch tokens), ``gflops``, and ``stage_ratios``: the mean fraction of the
        live tokens kept at each stage (to run a baseline at the same keep ratio).
    """
    obs = envs.reset_tensors(seed=seed)
    k = envs.pv.num_stages
    total = {"episode_return": 0.0, "loss_delta": 0.0, "keep_ratio": 0.0, "gflops": 0.0}
    stage_kept = torch.zeros(k, dtype=torch.float64)
    for _ in range(episodes):
        ret = torch.zeros(envs.num_envs, device=envs.device)
        before = torch.ones(envs.num_envs, device=envs.device)
        for stage in range(k):
            obs, reward, _, _, info = envs.step_tensors(act(obs))
            ret += reward
            if stage + 1 == k:
                info = info["final_info"]
            stage_kept[stage] += float((info["keep_ratio"] / before).mean())
            before = info["keep_ratio"]
        total["episode_return"] += float(ret.mean())
        total["loss_delta"] += float((info["loss_plain"] - info["loss_multi"]).mean())
        total["keep_ratio"] += float(info["keep_ratio"].mean())
        total["gflops"] += float(info["gflops"].mean())
    results: dict[str, float | list] = {key: value / episodes for key, value in total.items()}
    results["stage_ratios"] = (stage_kept / episodes).tolist()
    return results


def at_stage_ratios(act: Callable[..., torch.Tensor], ratios: Sequence[float]) -> KeepFn:
    """A baseline's ``act`` run at a given keep ratio (of the live tokens) per stage."""

    def run(obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return act(obs, keep_ratio=ratios[int(obs["stage"][0])])

    return run
