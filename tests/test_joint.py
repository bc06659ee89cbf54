import pytest
import torch

from apt_env.backbone import PrunableViT
from apt_env.joint import ChannelLosses

KWARGS = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, depth=4, embed_dim=32, num_heads=2)


def _setup():
    torch.manual_seed(0)
    pv = PrunableViT.from_timm("vit_tiny_patch16_224", **KWARGS)
    return pv, torch.randn(6, 1, 16, 16), torch.randint(0, 10, (6,))


def keep_half(obs):
    keep = obs["keep"].bool().clone()
    keep[:, ::2] = False
    return keep


def test_keep_all_makes_every_channel_the_plain_loss():
    pv, x, y = _setup()
    losses, logits = ChannelLosses(pv)(x, y, keep_fn=lambda obs: obs["keep"].bool())
    assert set(losses) == {"plain", "single", "multi"}
    torch.testing.assert_close(losses["single"], losses["plain"])
    torch.testing.assert_close(losses["multi"], losses["plain"])
    torch.testing.assert_close(logits, pv(x))


def test_pruned_channels_differ_and_train_the_backbone():
    pv, x, y = _setup()
    losses, _ = ChannelLosses(pv)(x, y, keep_fn=keep_half, single_stage=1)
    assert not torch.allclose(losses["single"], losses["plain"])
    assert not torch.allclose(losses["multi"], losses["single"])
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in pv.model.blocks[-1].parameters())


@pytest.mark.parametrize("stage", [0, 2])
def test_masked_and_gathered_give_the_same_losses_and_gradients(stage):
    results = {}
    for mode in ("masked", "gathered"):
        pv, x, y = _setup()
        losses, _ = ChannelLosses(pv, mode=mode)(x, y, keep_fn=keep_half, single_stage=stage)
        sum(losses.values()).backward()
        results[mode] = (losses, pv.model.blocks[0].attn.qkv.weight.grad.clone())
    for channel in ("plain", "single", "multi"):
        torch.testing.assert_close(results["masked"][0][channel], results["gathered"][0][channel])
    torch.testing.assert_close(results["masked"][1], results["gathered"][1], atol=1e-6, rtol=1e-4)


def test_weights_and_plain_only():
    pv, x, y = _setup()
    plain, _ = ChannelLosses(pv)(x, y)
    assert set(plain) == {"plain"}
    weighted, _ = ChannelLosses(pv)(x, y, keep_fn=keep_half, weights={"plain": 0.5, "multi": 2.0})
    assert set(weighted) == {"plain", "multi"}
    torch.testing.assert_close(weighted["plain"], 0.5 * plain["plain"])
    with pytest.raises(ValueError, match="valid: plain, single, multi"):
        ChannelLosses(pv)(x, y, keep_fn=keep_half, weights={"double": 1.0})
