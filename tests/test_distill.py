"""Policy distillation (``agents.distill``): a student agent learns a teacher's decisions on the env."""

import pytest
import torch
from helpers import tiny_envs

from agents.distill import Distiller, decision_agreement, live_kl
from agents.observation import live_mask
from agents.policy import APTPolicy

pytestmark = pytest.mark.usefixtures("one_thread")


def budget_agent(envs, width: int, seed: int) -> APTPolicy:
    torch.manual_seed(seed)
    return APTPolicy.for_env(envs, hidden=width, qk_dim=width, sampling="topk")


def test_live_kl_is_the_kl_of_the_softmax_over_the_live_tokens():
    torch.manual_seed(0)
    t, s = torch.randn(3, 6), torch.randn(3, 6)
    live = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    kl = live_kl(t, s, live)
    for row in range(2):
        p = torch.distributions.Categorical(logits=t[row, live[row]])
        q = torch.distributions.Categorical(logits=s[row, live[row]])
        torch.testing.assert_close(kl[row], torch.distributions.kl_divergence(p, q))
    assert kl[2] == 0  # a row with nothing live: nothing to learn, no NaN
    assert torch.all(live_kl(t, t + 5.0, live).abs() < 1e-6)  # a shift changes no decision
    assert decision_agreement(live, live & (torch.arange(6) < 3)) == pytest.approx(5 / 10)


def test_a_student_learns_the_teachers_decisions():
    envs = tiny_envs(num_envs=16, budget=(0.25, 1.0))
    teacher = budget_agent(envs, 16, seed=0)
    with torch.no_grad():  # a decided teacher: logits spread well beyond the initial ones
        teacher.logit_head.weight.mul_(20.0)
    student = budget_agent(envs, 8, seed=1)
    held_out = [envs.reset_tensors(seed=123)]  # the teacher's episode on fixed images, every stage
    for _ in range(envs.pv.num_stages - 1):
        obs, *_ = envs.step_tensors(teacher.act(held_out[-1]))
        held_out.append(obs)

    def gap() -> tuple[float, float]:
        with torch.no_grad():
            kl = sum(
                float(live_kl(teacher.keep_logits(o), student.keep_logits(o), live_mask(o)).mean()) for o in held_out
            )
            agree = [decision_agreement(teacher.act(o), student.act(o)) for o in held_out]
        return kl, sum(agree) / len(agree)

    kl_before, agree_before = gap()
    trainer = Distiller(envs, teacher, student, lr=1e-2, seed=0)
    history = trainer.learn(40 * trainer.steps_per_update, anneal=40 * trainer.steps_per_update)
    kl_after, agree_after = gap()
    assert trainer.global_step == 40 * 3 * 16 and history[-1]["lr"] < history[0]["lr"]
    assert kl_after < 0.3 * kl_before, (kl_before, kl_after)
    assert agree_after > agree_before + 0.1, (agree_before, agree_after)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_the_student_must_read_and_sample_as_the_teacher():
    envs = tiny_envs(num_envs=2, budget=(0.25, 1.0))
    teacher = budget_agent(envs, 8, seed=0)
    student = APTPolicy.for_env(envs, hidden=8, qk_dim=8, sampling="bernoulli")
    with pytest.raises(ValueError, match="sampling is 'bernoulli' for the student, 'topk' for the teacher"):
        Distiller(envs, teacher, student)


def test_the_shipped_agent_decides_as_the_joint_agent_it_was_distilled_from():
    from agents.io import load_policy
    from apt_env.data.datasets import build_dataset
    from apt_env.defaults import DEFAULT_AGENT, DEFAULT_CHECKPOINT, JOINT_AGENT
    from apt_env.envs.observe import BUDGET_KEYS, OBS_KEYS
    from apt_env.eval.evaluate import forward_policy
    from apt_env.models.checkpoint import load_backbone

    pv = load_backbone(DEFAULT_CHECKPOINT).eval()
    student, teacher = load_policy(DEFAULT_AGENT).eval(), load_policy(JOINT_AGENT).eval()
    assert student.hidden < teacher.hidden and student.qk_dim < teacher.qk_dim
    val = build_dataset("fashion-mnist", split="val")
    images = torch.stack([val[i][0] for i in range(128)])
    keys = (*OBS_KEYS, *BUDGET_KEYS)
    with torch.inference_mode():
        masks = {
            name: forward_policy(pv, images, lambda o, p=policy: p.act(o), obs_keys=keys, budget=0.5)[2]
            for name, policy in (("student", student), ("teacher", teacher))
        }
    # The same counts (the budget's); most of the same tokens at every stage.
    assert torch.equal(masks["student"].sum(-1), masks["teacher"].sum(-1))
    assert decision_agreement(masks["teacher"], masks["student"]) > 0.85
