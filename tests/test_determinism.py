"""Same seed, same result, bit for bit, on CPU under ``torch.use_deterministic_algorithms(True)``; another
seed, another result (so that every test here can fail).

Covered elsewhere, not repeated here: the numpy API's rollouts (``test_env.py::
test_same_seed_same_rollout_and_other_seed_differs``), native PPO's default Bernoulli agent
(``test_agents.py::test_native_ppo_is_reproducible_and_resumes``), the ``vs_random`` reward's draws
(``test_budget.py``), the data order and augmentation (``test_data.py``), and resumed runs ending as
uninterrupted ones (``test_train_backbone.py``, ``test_train_agent.py``, ``test_kill.py``).
"""

import json

import pytest
import torch
from helpers import SMALL, load_script, tiny_envs
from stable_baselines3 import PPO
from torch.utils.data import TensorDataset
from torch.utils.tensorboard import SummaryWriter

from agents.policy import APTPolicy
from agents.ppo import NativePPO
from agents.sb3_policy import APTActorCriticPolicy
from apt_env.envs.sb3_vec_env import SB3VecEnv
from apt_env.eval.evaluate import budget_keep_ratio, evaluate_accuracy
from apt_env.models.backbone import PrunableViT
from apt_env.models.checkpoint import load_backbone
from apt_env.train.state import load_train_state


@pytest.fixture
def deterministic(one_thread):
    """Deterministic algorithms only (an error where torch has none), restored afterwards."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


pytestmark = pytest.mark.usefixtures("deterministic")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two state dicts hold the same tensors, bit for bit."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_env_rollout_with_budgets_and_random_baselines_repeats_exactly():
    """The tensor API, where every draw (images, budgets, the ``vs_random`` masks) comes from the env's seed;
    the actions are the same in every run, so only the seed can change the rewards."""

    def rollout(seed: int) -> list[torch.Tensor]:
        envs = tiny_envs(num_envs=6, reward="vs_random", budget=(0.3, 1.0), budget_weight=1.0)
        obs = envs.reset_tensors(seed=seed)
        actions = torch.Generator().manual_seed(0)
        out = [*obs.values()]
        for _ in range(2 * envs.pv.num_stages):  # two episodes: the autoreset draws too
            obs, reward, terminated, _, info = envs.step_tensors(torch.rand(6, 16, generator=actions) < 0.6)
            out += [*obs.values(), reward, terminated, info["loss_random"], info["executed_action"]]
        return out

    a, b, c = rollout(3), rollout(3), rollout(4)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_native_ppo_with_budgets_and_top_k_sampling_repeats_exactly():
    """The Gumbel-top-k agent on a budget range (the Bernoulli one: ``test_agents.py``)."""

    def train(seed: int) -> tuple[dict, list[dict]]:
        envs = tiny_envs(num_envs=8, budget=(0.25, 1.0))
        trainer = NativePPO(envs, episodes_per_rollout=1, seed=seed, policy_kwargs=dict(**SMALL, sampling="topk"))
        history = trainer.learn(2 * trainer.steps_per_rollout)
        return trainer.policy.state_dict(), [{k: v for k, v in s.items() if k != "sps"} for s in history]

    (wa, ha), (wb, hb), (wc, hc) = train(3), train(3), train(4)
    assert same(wa, wb) and ha == hb
    assert not same(wa, wc) and ha != hc


@pytest.mark.parametrize("sampling", ["bernoulli", "topk"])
def test_sb3_ppo_repeats_exactly(sampling):
    """SB3 seeds its policy's weights, the env and torch's global generator (Bernoulli and Gumbel draws)."""

    def train(seed: int) -> dict[str, torch.Tensor]:
        budget = dict(budget=(0.3, 1.0)) if sampling == "topk" else {}
        venv = SB3VecEnv(tiny_envs(**budget))
        kwargs = dict(policy_kwargs=dict(**SMALL, sampling=sampling), n_steps=6, batch_size=12, n_epochs=2)
        model = PPO(APTActorCriticPolicy, venv, seed=seed, device="cpu", **kwargs)
        model.learn(total_timesteps=48)
        return model.policy.state_dict()

    a, b, c = train(3), train(3), train(4)
    assert same(a, b)
    assert not same(a, c)


def test_joint_backbone_training_repeats_exactly(tmp_path, monkeypatch):
    """``train_backbone.py --method apt`` in this process: one epoch, pruned from the start (a backbone phase with
    the agent's sampled masks, then an agent phase); the backbone and the agent end bit for bit the same."""
    script = load_script("train_backbone")
    # The TensorBoard mask figure is deterministic and draws no random numbers, but takes 2/3 of the run.
    monkeypatch.setattr(script, "agent_masks_figure", lambda *args, **kwargs: None)
    monkeypatch.setattr(SummaryWriter, "add_figure", lambda *args, **kwargs: None)

    def train(seed: int, out: str) -> tuple[dict, dict]:
        args = script.Args(
            seed=seed, dataset="synthetic", model_kwargs=json.dumps({"depth": 2, "embed_dim": 32, "num_heads": 2}),
            batch_size=16, steps_per_epoch=3, eval_batch_size=64, epochs=1, warmup_epochs=0, num_envs=8, agent_steps=48,
            compare_plain=False, out_dir=str(tmp_path / out),
        )  # fmt: skip
        args, run_dir = script.prepare_run(args)
        assert script.train(args, run_dir)
        agent = load_train_state(run_dir / "train_state.pt")["ranks"][0]["agent"]["policy"]
        return load_backbone(run_dir / "checkpoint").model.state_dict(), agent

    (ba, aa), (bb, ab), (bc, ac) = train(1, "a"), train(1, "b"), train(2, "c")
    assert same(ba, bb) and same(aa, ab)
    assert not same(ba, bc) and not same(aa, ac)


def test_evaluation_of_sampled_and_random_pruning_repeats_exactly():
    """``evaluate.py``'s rows (the agent sampled and by its mode, random and class-attention top-k at a budget)
    through ``evaluate_accuracy``: rows and every mask the same with the same seed; the seeded ones differ with
    another."""
    script = load_script("evaluate")
    torch.manual_seed(0)
    pv = PrunableViT.from_timm(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=5, depth=4, embed_dim=32,
        num_heads=2,
    )  # fmt: skip
    policy = APTPolicy(pv.embed_dim, pv.num_patches, pv.num_stages, **SMALL)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(40, 1, 16, 16, generator=g), torch.randint(0, 5, (40,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    budgets = {0.5: budget_keep_ratio(pv, 0.5)}

    def run(seed: int) -> tuple[list[dict], dict]:
        contenders = script.agent_contenders(policy, budgets, seed) + script.heuristic_contenders(budgets, seed, (4, 4))
        rows, decisions = evaluate_accuracy(pv, loader, contenders)
        return rows, {name: d.masks for name, d in decisions.items()}

    (ra, ma), (rb, mb), (rc, mc) = run(0), run(0), run(1)
    assert ra == rb and same(ma, mb)
    assert ra != rc
    seeded = ("APT agent (sampled)", "random @ 0.5", "random + fused token @ 0.5")
    assert set(seeded) <= set(ma)
    assert all(not torch.equal(ma[name], mc[name]) for name in seeded)
    assert all(torch.equal(ma[name], mc[name]) for name in ma if name not in seeded)  # only the seeded differ
