"""The ordered-dither grid: its ranks, the heuristic that keeps it, the agent's prior on it, and its evaluation rows."""

import pytest
import torch
from helpers import SMALL, load_script, tiny_envs

from agents.baselines import DitherGrid
from agents.io import load_policy, save_policy
from agents.policy import APTPolicy
from apt_env.models.tokens import dither_rank

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_count_of_lowest_ranks_spreads_over_the_grid_and_the_counts_nest():
    rank = dither_rank((4, 4))
    assert sorted((rank * 16).round().long().tolist()) == list(range(16))  # a permutation of 0 .. 15, over 16
    order = rank.argsort()
    quadrant = lambda p: (int(p) // 4 // 2, int(p) % 4 // 2)  # noqa: E731
    assert len({quadrant(p) for p in order[:4]}) == 4  # the lowest 4: one in each 2x2 quadrant
    rows, cols = order[:8] // 4, order[:8] % 4
    assert torch.bincount(rows, minlength=4).tolist() == [2] * 4 == torch.bincount(cols, minlength=4).tolist()
    big = dither_rank((14, 14)).view(14, 14)  # a crop of the 16x16 matrix, renumbered
    assert sorted((big.flatten() * 196).round().long().tolist()) == list(range(196))
    r, c = torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij")
    assert torch.equal(big < 49 / 196, (r % 2 == 0) & (c % 2 == 0))  # the lowest quarter: a stride-2 grid
    assert torch.equal(big < 98 / 196, (r + c) % 2 == 0)  # the lowest half: a checkerboard
    with pytest.raises(ValueError, match="positive sides"):
        dither_rank((0, 4))


def test_the_grid_keeps_the_lowest_ranked_live_tokens_the_same_in_every_image():
    grid = DitherGrid(0.5, (4, 4))
    live = torch.ones(3, 16, dtype=torch.bool)
    live[1, :8] = False
    keep = grid.act({"live": live})
    assert keep.sum(1).tolist() == [8, 4, 8] and not (keep & ~live).any()
    assert torch.equal(keep[0], keep[2]) and torch.equal(keep[0], dither_rank((4, 4)) < 0.5)
    assert keep[1].nonzero().flatten().tolist() == sorted((dither_rank((4, 4))[8:].argsort()[:4] + 8).tolist())
    with pytest.raises(ValueError, match="grid of 16 patches, the observation has 9"):
        grid.act({"live": torch.ones(1, 9)})


def test_the_prior_adds_its_offsets_to_the_live_logits_and_travels_with_the_agent(tmp_path):
    envs = tiny_envs(budget=(0.25, 1.0))
    obs, _ = envs.reset(seed=0)
    torch.manual_seed(0)
    plain = APTPolicy.for_env(envs, sampling="topk", **SMALL)
    prior = APTPolicy.for_env(envs, sampling="topk", position_prior=2.0, **SMALL)
    prior.load_state_dict(plain.state_dict())  # the same weights: the logits differ by the prior alone
    offsets = 2.0 * (1 - 2 * dither_rank((4, 4)))
    torch.testing.assert_close(prior.keep_logits(obs) - plain.keep_logits(obs), offsets.expand(4, 16))
    logits, _ = prior(obs)
    torch.testing.assert_close(logits, prior.keep_logits(obs))  # the PPO pass and a decision agree
    assert torch.equal(prior.act(obs), prior.mode(prior.keep_logits(obs), torch.ones(4, 16, dtype=torch.bool), obs))
    pruned = {**obs, "live": obs["live"].copy()}
    pruned["live"][:, :5] = 0
    assert (prior.keep_logits(pruned)[:, :5] == -30.0).all()  # a pruned token gets no prior
    assert (prior.decision_flops(torch.full((1, 3), 16)) - plain.decision_flops(torch.full((1, 3), 16))).item() == 48
    save_policy(tmp_path / "agent", prior)
    again = load_policy(tmp_path / "agent")
    assert again.position_prior == 2.0 and torch.equal(again.keep_logits(obs), prior.keep_logits(obs))
    again.position_prior = 0.0  # settable on a loaded agent
    torch.testing.assert_close(again.keep_logits(obs), plain.keep_logits(obs))
    assert APTPolicy.from_config({k: v for k, v in plain.config().items() if k != "position_prior"}).position_prior == 0


@pytest.mark.parametrize(
    ("num_patches", "weight", "match"),
    [(12, 1.0, "square grid of patches; this policy has 12"), (16, -1.0, ">= 0"), (16, float("nan"), ">= 0"),
     (16, "1", ">= 0")],
)  # fmt: skip
def test_a_prior_that_cannot_work_is_refused(num_patches, weight, match):
    with pytest.raises(ValueError, match=match):
        APTPolicy(32, num_patches, 3, position_prior=weight, **SMALL)
    APTPolicy(32, 12, 3, position_prior=0.0, **SMALL)  # no prior: any token count


def test_evaluation_has_the_grid_at_every_budget_and_compares_the_agent_with_it():
    script = load_script("evaluate")
    rows = [
        dict(policy="dense", role="dense", rule="dense", fused_token=False, gflops=1.0, top1=0.9),
        dict(policy="random @ 0.5", role="heuristic", rule="random", fused_token=False, gflops=0.5, top1=0.7),
        dict(policy="dither grid @ 0.5", role="heuristic", rule="dither grid", fused_token=False, gflops=0.5, top1=0.8),
        dict(policy="APT agent @ 0.5", role="agent", rule="APT agent", fused_token=False, gflops=0.5, top1=0.75),
    ]
    text = script.equal_compute_text(rows)
    assert "random 70.00 (+5.00)" in text and "dither grid 80.00 (-5.00)" in text
    assert "cls-attn" not in text  # a family without rows is not compared
    contenders = script.heuristic_contenders({0.5: 0.6, 0.7: 0.8}, 0, (4, 4))
    assert [c.name for c in contenders if c.rule == "dither grid"] == ["dither grid @ 0.5", "dither grid @ 0.7"]
