"""Where the shipped models live: the one place that names them."""

from pathlib import Path

__all__ = [
    "ASSETS",
    "CLUTTERED_AGENT",
    "CLUTTERED_CHECKPOINT",
    "CLUTTERED_DATASET",
    "CLUTTERED_PLAIN_CHECKPOINT",
    "DEFAULT_AGENT",
    "DEFAULT_CHECKPOINT",
    "JOINT_AGENT",
    "PLAIN_CHECKPOINT",
    "P2_AGENT",
    "P2_CHECKPOINT",
]

ASSETS = Path(__file__).parent / "assets"

PLAIN_CHECKPOINT = ASSETS / "plain"
"""The plain ViT trained on Fashion-MNIST by ``train_backbone.py --method plain``: where fine-tuning starts."""

DEFAULT_CHECKPOINT = ASSETS / "default"
"""The backbone ``APTPrune-v0`` runs by default: the plain ViT fine-tuned jointly with its agent."""

JOINT_AGENT = ASSETS / "joint_agent"
"""The agent trained jointly with ``DEFAULT_CHECKPOINT`` (64 wide): the teacher of ``DEFAULT_AGENT``."""

DEFAULT_AGENT = ASSETS / "default_agent"
"""The agent ``evaluate.py`` runs by default: ``JOINT_AGENT`` distilled into a 32-wide agent (``train_agent.py --algo
distill``), the same decisions for less."""

P2_CHECKPOINT = ASSETS / "p2_default"
"""The 196-token backbone (``vit_apt_tiny_patch2_28``, patch 2): the plain ViT resampled from ``PLAIN_CHECKPOINT``'s
weights, trained plainly, then fine-tuned jointly with ``P2_AGENT``. ``APTPrune196-v0`` runs it."""

P2_AGENT = ASSETS / "p2_agent"
"""The budget-conditioned agent trained jointly with ``P2_CHECKPOINT``."""

CLUTTERED_PLAIN_CHECKPOINT = ASSETS / "cluttered_plain"
"""The plain ViT of the cluttered task (``vit_apt_tiny_patch4_56``, 196 tokens on the 56 px canvas of
``cluttered-fashion-mnist``): ``PLAIN_CHECKPOINT``'s weights with the position embedding resampled to the larger grid,
trained plainly on the task. Where joint training on the task starts."""

CLUTTERED_DATASET = "cluttered-fashion-mnist"
"""The cluttered task (``apt_env.data.cluttered``): a garment at a random place on a 56 px canvas among fragments of
others."""

CLUTTERED_CHECKPOINT = ASSETS / "cluttered"
"""The cluttered task's backbone: ``CLUTTERED_PLAIN_CHECKPOINT`` fine-tuned jointly with ``CLUTTERED_AGENT`` (budgets
down to 0.1). ``APTPruneCluttered-v0`` runs it."""

CLUTTERED_AGENT = ASSETS / "cluttered_agent"
"""The budget-conditioned agent trained jointly with ``CLUTTERED_CHECKPOINT``."""
