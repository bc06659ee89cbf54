"""Where the shipped models live: the one place that names them."""

from pathlib import Path

__all__ = ["ASSETS", "DEFAULT_AGENT", "DEFAULT_CHECKPOINT", "PLAIN_CHECKPOINT"]

ASSETS = Path(__file__).parent / "assets"

PLAIN_CHECKPOINT = ASSETS / "plain"
"""The plain ViT trained on Fashion-MNIST by ``train_backbone.py --mode plain``: where fine-tuning starts."""

DEFAULT_CHECKPOINT = ASSETS / "default"
"""The backbone ``APTPrune-v0`` runs by default: the plain ViT fine-tuned jointly with its agent."""

DEFAULT_AGENT = ASSETS / "default_agent"
"""The agent trained with ``DEFAULT_CHECKPOINT``."""
