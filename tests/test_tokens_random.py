"""``random_count``: the one random-pruning rule, and the callers that draw through it."""

import torch

from agents.baselines import RandomKeep
from agents.distributions import ratio_count
from apt_env.eval.evaluate import Decisions, random_at_counts
from apt_env.models.tokens import random_count


def _live(rows: int = 400, n: int = 12) -> torch.Tensor:
    live = torch.ones(rows, n, dtype=torch.bool)
    live[:, :3] = False  # 9 live tokens per row
    live[0] = False  # a row with none left
    return live


def test_random_count_keeps_count_live_tokens_uniformly():
    live = _live()
    count = torch.full((live.shape[0],), 3)
    count[1] = 20  # more than the row has: all of its live tokens
    keep = random_count(live, count, torch.Generator().manual_seed(0))
    assert not (keep & ~live).any()
    assert keep[0].sum() == 0 and keep[1].sum() == 9 and (keep[2:].sum(1) == 3).all()
    frequency = keep[2:, 3:].float().mean(0)  # each live token kept with probability 3 / 9
    assert (frequency - 1 / 3).abs().max() < 0.08


def test_random_count_is_reproducible_from_its_generator():
    live, count = _live(), torch.full((400,), 4)
    first = random_count(live, count, torch.Generator().manual_seed(5))
    assert torch.equal(first, random_count(live, count, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, random_count(live, count, torch.Generator().manual_seed(6)))
    torch.manual_seed(7)  # without a generator: torch's default one, as a seeded run sets it
    default = random_count(live, count)
    torch.manual_seed(7)
    assert torch.equal(default, random_count(live, count))


def test_random_keep_and_random_at_counts_draw_through_random_count():
    live = _live(8)
    obs = {"live": live.to(torch.int8), "stage": torch.zeros(8, dtype=torch.long), "index": torch.arange(8)}
    expected = random_count(live, ratio_count(live, 0.5), torch.Generator().manual_seed(3))
    assert torch.equal(RandomKeep(0.5, seed=3).act(obs), expected)
    decisions = Decisions(torch.arange(8), expected.unsqueeze(1))  # (M, K=1, N)
    again = random_count(live, expected.sum(1), torch.Generator().manual_seed(4))
    assert torch.equal(random_at_counts(decisions, seed=4)(obs), again)
