"""Model names that state their configuration, registered with timm so that ``timm.create_model`` builds them.

import apt_env  # registers the names below
model = timm.create_model("vit_apt_tiny_patch4_28")  # the default backbone, untrained
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _cfg, _create_vision_transformer

__all__ = ["vit_apt_tiny_patch2_28", "vit_apt_tiny_patch4_28", "vit_apt_tiny_patch4_56"]

# Fashion-MNIST's statistics, no crop: the data config of both names.
_FASHION_MNIST_CFG = dict(
    input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,), num_classes=10, crop_pct=1.0, interpolation="bilinear"
)

# timm's registry reads this module's ``default_cfgs``: the data config (Fashion-MNIST statistics, no crop).
default_cfgs = generate_default_cfgs(
    {
        "vit_apt_tiny_patch4_28.untrained": _cfg(**_FASHION_MNIST_CFG),
        "vit_apt_tiny_patch2_28.untrained": _cfg(**_FASHION_MNIST_CFG),
        "vit_apt_tiny_patch4_56.untrained": _cfg(**dict(_FASHION_MNIST_CFG, input_size=(1, 56, 56))),
    }
)  # fmt: skip


def _fashion_mnist_vit(
    name: str, patch_size: int, pretrained: bool, kwargs: dict[str, Any], img_size: int = 28
) -> VisionTransformer:
    """The project's ViT for gray images at ``patch_size``: width 128, depth 6, 4 heads, 10 classes."""
    model_args = dict(
        img_size=img_size, patch_size=patch_size, in_chans=1, num_classes=10, embed_dim=128, depth=6, num_heads=4
    )
    return _create_vision_transformer(name, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_apt_tiny_patch4_28(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT for 28x28 gray images: patch 4 (49 patch tokens and a class token), width 128, depth 6, 4 heads,
    10 classes (1.2M parameters). The default backbone of ``APTPrune-v0``."""
    return _fashion_mnist_vit("vit_apt_tiny_patch4_28", 4, pretrained, kwargs)


@register_model
def vit_apt_tiny_patch2_28(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT for 28x28 gray images: patch 2 (196 patch tokens and a class token), width 128, depth 6, 4 heads,
    10 classes (1.2M parameters). The sequence length of ViT-B/16 at 224 px, on Fashion-MNIST."""
    return _fashion_mnist_vit("vit_apt_tiny_patch2_28", 2, pretrained, kwargs)


@register_model
def vit_apt_tiny_patch4_56(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT for 56x56 gray images (the cluttered Fashion-MNIST canvas): patch 4 (196 patch tokens and a class token),
    width 128, depth 6, 4 heads, 10 classes (1.2M parameters)."""
    return _fashion_mnist_vit("vit_apt_tiny_patch4_56", 4, pretrained, kwargs, img_size=56)
