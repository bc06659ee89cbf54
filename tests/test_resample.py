"""Starting a ViT of another patch size from trained weights (``--resample``), and the registered names."""

import pytest
import timm
import torch
from helpers import TINY_VIT, load_script

import apt_env  # noqa: F401  (registers the names)
from apt_env.data.datasets import dataset_info
from apt_env.models.backbone import PrunableViT
from apt_env.models.checkpoint import load_backbone, save_backbone
from apt_env.models.resample import patch_size, resample_into


def _tiny(patch: int) -> PrunableViT:
    return PrunableViT.from_timm("vit_tiny_patch16_224", **{**TINY_VIT, "patch_size": patch})


def test_a_resampled_model_runs_with_the_new_token_count_and_reloads_to_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    source = _tiny(4).eval()
    target = resample_into(source, _tiny(2)).eval()
    assert (source.num_patches, target.num_patches) == (16, 64)
    assert patch_size(target) == (2, 2)
    # Everything but the two embeddings carries over as it is.
    src, tgt = source.model.state_dict(), target.model.state_dict()
    for key in src:
        if key not in ("patch_embed.proj.weight", "pos_embed"):
            torch.testing.assert_close(src[key], tgt[key])
    assert tgt["pos_embed"].shape == (1, 1 + 64, TINY_VIT["embed_dim"])
    # The class token's position is kept; the patch positions are resampled, not random.
    torch.testing.assert_close(tgt["pos_embed"][:, 0], src["pos_embed"][:, 0])
    images = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        out = target(images)
        assert out.shape == (3, 10) and torch.isfinite(out).all()
        masks = [torch.rand(3, 64) < 0.5 for _ in range(target.num_stages)]
        assert torch.isfinite(target(images, keep_masks=masks, layout="gathered")).all()
    save_backbone(tmp_path / "ckpt", target, meta={"dataset": "synthetic"})
    reloaded = load_backbone(tmp_path / "ckpt")
    assert reloaded.num_patches == 64
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), out)


def test_resampled_patch_embedding_keeps_what_a_patch_sees():
    """FlexiViT's resampling: a constant image gives the same patch tokens before and after (up to scale of area)."""
    torch.manual_seed(0)
    source = _tiny(4).eval()
    target = resample_into(source, _tiny(2)).eval()
    image = torch.ones(1, 1, 16, 16)
    with torch.no_grad():
        before = source.model.patch_embed(image)[0, 0]
        after = target.model.patch_embed(image)[0, 0]
    assert torch.nn.functional.cosine_similarity(before, after, dim=0) > 0.9


def test_models_that_differ_in_more_than_the_patch_size_are_refused():
    with pytest.raises(ValueError, match="embed_dim"):
        resample_into(_tiny(4), PrunableViT.from_timm("vit_tiny_patch16_224", **{**TINY_VIT, "embed_dim": 64}))


@pytest.mark.parametrize(("name", "tokens"), [("vit_apt_tiny_patch2_28", 196), ("vit_apt_tiny_patch4_28", 49)])
def test_the_registered_names_build_what_they_state(name, tokens):
    model = timm.create_model(name)
    assert model.patch_embed.num_patches == tokens
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (128, 6, 4)
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_train_backbone_resamples_only_when_asked(tmp_path):
    script = load_script("train_backbone")
    torch.manual_seed(0)
    save_backbone(tmp_path / "p4", _tiny(4), meta={"dataset": "synthetic"})
    info = dataset_info("synthetic", str(tmp_path))
    kwargs = '{"img_size": 16, "patch_size": 2, "in_chans": 1, "depth": 4, "embed_dim": 32, "num_heads": 2}'
    args = script.Args(init_checkpoint=str(tmp_path / "p4"), model_name="vit_tiny_patch16_224", model_kwargs=kwargs)
    with pytest.raises(ValueError, match=r"16 patch tokens.*64.*--resample"):
        script.build_model(args, info)
    pv = script.build_model(script.Args(**{**vars(args), "resample": True}), info)
    assert pv.num_patches == 64 and pv.prune_layers == _tiny(4).prune_layers
    with pytest.raises(ValueError, match="--resample"):
        script.check_args(script.Args(resample=True))


@pytest.mark.parametrize(
    ("key", "value", "names"),
    [("prune_layers", [1, 2, 9], r"\[0, 3\].*4 blocks.*\[1, 2, 9\]"), ("min_keep", 65, r"\[0, 64\].*65")],
)
def test_a_checkpoint_whose_pruning_does_not_fit_its_model_names_both(tmp_path, key, value, names):
    import json

    save_backbone(tmp_path / "p2", _tiny(2), meta={"dataset": "synthetic"})
    config = json.loads((tmp_path / "p2" / "config.json").read_text())
    (tmp_path / "p2" / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=names):
        load_backbone(tmp_path / "p2")


def test_an_agent_for_one_token_count_on_a_backbone_of_another_names_both(tmp_path):
    from agents.policy import APTPolicy
    from apt_env.envs.env import APTPruneVectorEnv

    envs = APTPruneVectorEnv(2, model=_tiny(2), dataset="synthetic")
    other = APTPolicy.for_env(APTPruneVectorEnv(2, model=_tiny(4), dataset="synthetic"), hidden=8, qk_dim=8)
    script = load_script("evaluate")
    with pytest.raises(ValueError, match=r"16 tokens.*64 tokens"):
        script.check_fits(other, envs.pv, "AGENT")


def test_the_196_token_env_is_one_id_away_and_runs_the_shipped_backbone():
    import gymnasium as gym

    from apt_env.defaults import P2_AGENT, P2_CHECKPOINT

    envs = gym.make_vec("APTPrune196-v0", num_envs=2, vectorization_mode="vector_entry_point", budget=0.5)
    obs, _ = envs.reset(seed=0)
    assert obs["tokens"].shape == (2, 196, 128)
    obs, reward, *_ = envs.step(envs.action_space.sample())
    assert reward.shape == (2,)
    default = gym.make_vec("APTPrune-v0", num_envs=1, vectorization_mode="vector_entry_point")
    assert default.unwrapped.pv.num_patches == 49
    policy = load_script("evaluate").load_agent(str(P2_AGENT), load_backbone(P2_CHECKPOINT))
    assert policy.num_patches == 196
