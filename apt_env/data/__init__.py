"""Data: the data config a backbone carries (``config``, no datasets imported), the transforms (``transforms``), the
datasets by name (``datasets``), the cluttered task (``cluttered``) and the held-out splits (``splits``).

Kept light: importing ``apt_env.data.config`` (as the model does) does not import torchvision's datasets.
"""
