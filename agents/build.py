"""The agent as both training scripts build it: one set of flags, one construction, one calibration.

``train_backbone.py`` (the agent phase of joint training) and ``train_agent.py`` (an agent over a frozen backbone)
inherit ``AgentArgs``, so an agent's flags have the same names and meanings in both, and build their agent with
``build_policy``; a mean-budget agent is calibrated by ``agents.calibrate.calibrate_on_val`` in both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from agents.io import load_policy
from agents.policy import APTPolicy
from apt_env.envs.env import APTPruneVectorEnv

__all__ = ["AgentArgs", "Sampling", "build_policy", "load_agent_for", "sampling_for"]

_logger = logging.getLogger(__name__)

Sampling = Literal["bernoulli", "topk", "threshold"]


@dataclass
class AgentArgs:
    """The agent's flags, read flat by tyro in both training scripts (``--hidden``, ``--init-agent``, ...)."""

    init_agent: str | None = None
    """start from this agent's weights (an agent folder: its width and inputs), sampled as --sampling says (e.g. a
    fixed-count agent fine-tuned into a mean-budget one); a threshold agent keeps its calibrated thresholds"""
    sampling: Sampling | None = None
    """how the agent keeps tokens: a Bernoulli per token; (with --budget) the budget's token count without
    replacement, whose mode is its test-time rule; or (with --budget-mean) a Bernoulli per token against a threshold
    of the budget, calibrated on val after training. Default: threshold with --budget-mean, topk with --budget,
    else bernoulli"""
    hidden: int = 64
    """width of the agent's per-token MLP"""
    qk_dim: int = 64
    """width of the agent's query, key and value projections (its cost per token grows with both)"""
    mixer: Literal["none", "attention"] = "none"
    """the agent's token mixer: none (each token scored on its own) or one attention layer over the live tokens"""
    init_keep_prob: float = 0.9
    """initial keep probability of every token (a fresh agent)"""
    position_prior: float | None = None
    """weight of the agent's ordered-dither prior on its logits (an evenly spread grid of tokens it learns to depart
    from; APTPolicy's position_prior): a fresh agent's (None: 0), or with --init-agent in place of the loaded one's
    (None: keep it)"""
    agent_lr: float | None = None
    """the agent's learning rate; default 3e-4 (PPO, A2C), 2e-3 (distillation, annealed linearly to 0)"""


def sampling_for(args: AgentArgs, *, budget: tuple[float, float] | None, budget_mean: bool) -> Sampling:
    """``args.sampling``, or the one the budget asks for; a mean budget and a threshold agent go together.

    Raises:
        ValueError: a sampling that does not fit the budget, naming both.
    """
    sampling = args.sampling or ("threshold" if budget_mean else "topk" if budget is not None else "bernoulli")
    if (sampling == "threshold") != budget_mean or (budget_mean and budget is None):
        raise ValueError(
            "a mean budget (--budget-mean, with --budget LOW HIGH) goes with --sampling threshold, and --sampling "
            f"threshold with a mean budget; got --sampling {sampling}, --budget-mean {budget_mean}, --budget {budget}"
        )
    if sampling == "topk" and budget is None:
        raise ValueError("--sampling topk keeps each budget's token count: it needs --budget LOW HIGH")
    return sampling


def load_agent_for(path: str, envs: APTPruneVectorEnv, what: str) -> APTPolicy:
    """An agent folder checked against the env: its tokens, and a budget input exactly when the env has budgets.

    Raises:
        ValueError: an agent sized for other tokens, or one that reads a budget where the env has none (or the
            reverse), naming ``what`` and ``path``.
    """
    policy = load_policy(path, observation_space=envs.single_observation_space, device=envs.device)
    if policy.use_budget != (envs.budget_range is not None):
        need = "needs --budget LOW HIGH" if policy.use_budget else "reads no budget: drop --budget"
        raise ValueError(f"{what} {path} {need}")
    return policy


def build_policy(args: AgentArgs, envs: APTPruneVectorEnv, *, sampling: Sampling) -> APTPolicy:
    """A fresh agent from the flags, or ``--init-agent``'s weights sampled as ``sampling``, on ``envs.device``.

    Raises:
        ValueError: an ``--init-agent`` sized for other tokens, or that reads a budget where the env has none (or
            the reverse), naming both.
    """
    if args.init_agent is None:
        return APTPolicy.for_env(
            envs, hidden=args.hidden, qk_dim=args.qk_dim, init_keep_prob=args.init_keep_prob, sampling=sampling,
            mixer=args.mixer, position_prior=args.position_prior or 0.0,
        ).to(envs.device)  # fmt: skip
    start = load_agent_for(args.init_agent, envs, "--init-agent")
    prior = start.position_prior if args.position_prior is None else args.position_prior
    calibration = start.calibration if start.sampling == sampling == "threshold" else None
    policy = APTPolicy.from_config(
        {**start.config(), "sampling": sampling, "calibration": calibration, "position_prior": prior}
    )
    policy.load_state_dict(start.state_dict())
    _logger.info("agent from %s, sampled as %s", args.init_agent, sampling)
    return policy.to(envs.device)
