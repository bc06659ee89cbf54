"""Where the shipped models live: the one place that names them."""

from pathlib import Path

__all__ = ["ASSETS", "DEFAULT_AGENT", "DEFAULT_CHECKPOINT", "JOINT_AGENT", "PLAIN_CHECKPOINT"]

ASSETS = Path(__file__).parent / "assets"

PLAIN_CHECKPOINT = ASSETS / "plain"
"""The plain ViT trained on Fashion-MNIST by ``train_backbone.py --mode plain``: where fine-tuning starts."""

DEFAULT_CHECKPOINT = ASSETS / "default"
"""The backbone ``APTPrune-v0`` runs by default: the plain ViT fine-tuned jointly with its agent."""

JOINT_AGENT = ASSETS / "joint_agent"
"""The agent trained jointly with ``DEFAULT_CHECKPOINT`` (64 wide): the teacher of ``DEFAULT_AGENT``."""

DEFAULT_AGENT = ASSETS / "default_agent"
"""The agent ``evaluate.py`` runs by default: ``JOINT_AGENT`` distilled into a 32-wide agent (``train_agent.py --algo
distill``), the same decisions for less."""
