"""A budget that holds on average over images: the price of compute, learned by dual ascent.

With a *mean* budget ``b`` the constraint is ``E[F(final) / F(all)] = b`` over the episodes of budget
``b``, not ``F(final) / F(all) <= b`` in each. Its Lagrangian charges every image for its own compute
at a price ``lambda(b)``: the return ``G - lambda(b) * (F(final) / F(all) - b)`` rewards an image
for keeping a token exactly when the token's gain is worth its cost at that price, so images whose
tokens help more get more of them. The price rises while the episodes of budget ``b`` spend more than
``b`` on average and falls while they spend less (dual ascent, as in constrained RL: Altman,
"Constrained Markov Decision Processes", 1999; Tessler et al., "Reward Constrained Policy
Optimization", ICLR 2019), so at its fixed point the mean is met.

``lambda`` is piecewise linear in the budget, on ``knots`` evenly spaced over the env's budget range
(one knot for a single budget); an episode's overshoot moves the two knots around its budget in
proportion to its interpolation weights.
"""

from __future__ import annotations

import torch

__all__ = ["BudgetPrice"]


class BudgetPrice:
    """The price of compute ``lambda(b)`` for each budget of a range, updated by dual ascent.

    Args:
        low, high: the budget range (fractions of the dense backbone's GFLOPs).
        lr: the dual step: ``lambda`` moves by ``lr`` times the mean overshoot (in fractions of dense
            GFLOPs) of a batch's episodes at that knot.
        knots: points of the piecewise-linear price over ``[low, high]`` (1 when ``low == high``).
    """

    def __init__(self, low: float, high: float, *, lr: float = 1.0, knots: int = 9) -> None:
        if not lr > 0.0:
            raise ValueError(f"the price's learning rate must be positive, got price_lr={lr!r}")
        if isinstance(knots, bool) or not isinstance(knots, int) or knots < 2:
            raise ValueError(f"a price needs at least 2 knots, got knots={knots!r}")
        self.low, self.high, self.lr = float(low), float(high), float(lr)
        self.knots = torch.linspace(low, high, 1 if low == high else knots, dtype=torch.float64)
        self.price = torch.zeros_like(self.knots)

    def _weights(self, budget: torch.Tensor) -> torch.Tensor:
        """Interpolation weights (B, knots) of each budget on the knots."""
        b = budget.detach().double().cpu().clamp(self.low, self.high)
        if len(self.knots) == 1:
            return torch.ones(len(b), 1, dtype=torch.float64)
        pos = (b - self.low) / (self.high - self.low) * (len(self.knots) - 1)
        left = pos.floor().long().clamp(max=len(self.knots) - 2)
        frac = pos - left
        weights = torch.zeros(len(b), len(self.knots), dtype=torch.float64)
        weights.scatter_(1, left.unsqueeze(1), (1 - frac).unsqueeze(1))
        weights.scatter_add_(1, (left + 1).unsqueeze(1), frac.unsqueeze(1))
        return weights

    def __call__(self, budget: torch.Tensor) -> torch.Tensor:
        """``lambda(b)`` for each row's budget (B,), float64 on the budget's device."""
        return (self._weights(budget) @ self.price).to(budget.device)

    def update(self, budget: torch.Tensor, used: torch.Tensor) -> None:
        """One dual step from finished episodes: ``used`` (B,) is each one's ``F(final) / F(all)``."""
        weights = self._weights(budget)
        over = (used.detach().double().cpu() - budget.detach().double().cpu()).unsqueeze(1)
        mass = weights.sum(0)
        seen = mass > 0
        self.price[seen] += self.lr * (weights * over).sum(0)[seen] / mass[seen]
