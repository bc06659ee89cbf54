"""One of everything: one random-pruning function, and the data config carried by the backbone itself.

A backbone started from timm's pretrained weights is preprocessed as those weights were (timm's data config:
mean, std, interpolation, crop). The model carries that config (``PrunableViT.data_config``), its checkpoint
records it as its ``pretrained_cfg``, and every dataset built for the model takes it from there, so no caller can
score the model on the wrong normalisation.
"""

import hashlib
import json
from types import SimpleNamespace

import pytest
import timm
import torch
from helpers import TINY_VIT, load_script

from agents.baselines import RandomKeep
from agents.compare import compare_policies
from agents.policy import APTPolicy
from apt_env.backbone import PrunableViT
from apt_env.checkpoint import load_backbone, save_backbone
from apt_env.data import build_dataset, dataset_for, pretrained_data_config
from apt_env.defaults import DEFAULT_CHECKPOINT, PLAIN_CHECKPOINT
from apt_env.env import APTPruneVectorEnv
from apt_env.evaluate import Decisions, evaluate, random_at_counts
from apt_env.tokens import random_count

CONFIG = {"input_size": (1, 16, 16), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
          "mean": (0.9,), "std": (0.05,)}  # fmt: skip
"""An unusual data config for the tiny ViT: its normalised pixels are far from those of the project's transforms."""


def _tiny() -> PrunableViT:
    torch.manual_seed(0)
    return PrunableViT.from_timm("vit_tiny_patch16_224", **TINY_VIT)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A tiny checkpoint whose config.json records ``CONFIG`` as the earlier layout did (a ``data_config`` key)."""
    path = save_backbone(tmp_path_factory.mktemp("recorded") / "checkpoint", _tiny(), meta={"dataset": "synthetic"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "data_config": CONFIG}))
    return path


def _expected(split: str = "val") -> torch.utils.data.Dataset:
    return build_dataset("synthetic", split=split, img_size=16, in_chans=1, data_config=CONFIG)


def _loss_on(pv: PrunableViT, dataset, images: int) -> float:
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(images)), batch_size=256)
    return evaluate(pv, loader)["loss"]


# -- the data config travels with the model ------------------------------------------------------------------


def test_compare_policies_scores_the_backbone_on_its_recorded_preprocessing(recorded):
    envs = APTPruneVectorEnv(4, model=str(recorded), dataset="synthetic", split="val")
    pv = envs.pv
    policy = APTPolicy.for_env(envs, hidden=16, qk_dim=16)
    _, rows = compare_policies(envs, policy, dataset="synthetic", episodes=1, images=32)
    dense = dict(rows)["keep all"]
    assert dense["loss"] == pytest.approx(_loss_on(pv, _expected(), 32), rel=1e-6)
    assert dense["loss"] != pytest.approx(_loss_on(pv, build_dataset("synthetic", split="val", img_size=16,
                                                                   in_chans=1), 32), rel=1e-3)  # fmt: skip


def test_train_agents_val_table_scores_the_backbone_on_its_recorded_preprocessing(recorded, monkeypatch):
    module = load_script("train_agent")
    args = module.Args(dataset="synthetic", num_envs=4, eval_episodes=1, eval_images=32)
    envs = APTPruneVectorEnv(4, model=str(recorded), dataset="synthetic")  # as train_agent.main builds it
    policy = APTPolicy.for_env(envs, hidden=16, qk_dim=16)
    seen = {}

    def compare(test_envs, *a, **kw):
        seen["envs"] = test_envs
        seen["ratios"], seen["rows"] = compare_policies(test_envs, *a, **kw)
        return seen["ratios"], seen["rows"]

    monkeypatch.setattr(module, "compare_policies", compare)
    module.report(args, envs, policy, SimpleNamespace(add_text=lambda *a: None))
    assert torch.equal(seen["envs"].data[0][0], _expected()[0][0])
    pv = load_backbone(recorded)
    assert dict(seen["rows"])["keep all"]["loss"] == pytest.approx(_loss_on(pv, _expected(), 32), rel=1e-6)


def test_a_backbones_data_config_is_saved_as_its_pretrained_cfg_and_loaded_back(tmp_path):
    pv = _tiny()
    pv.data_config = dict(CONFIG)
    path = save_backbone(tmp_path / "ckpt", pv, meta={"dataset": "synthetic"})
    config = json.loads((path / "config.json").read_text())
    assert "data_config" not in config  # one config: timm's pretrained_cfg
    assert config["pretrained_cfg"] == {**json.loads(json.dumps(CONFIG)), "num_classes": 10}
    loaded = load_backbone(path)
    assert loaded.data_config == CONFIG and loaded.with_pruning(min_keep=2).data_config == CONFIG
    timm_cfg = timm.data.resolve_data_config({}, model=timm.create_model(f"local-dir:{path}", pretrained=True))
    assert {k: timm_cfg[k] for k in CONFIG} == CONFIG  # timm reads the same preprocessing
    assert torch.equal(dataset_for(loaded, "synthetic", split="test")[3][0], _expected("test")[3][0])
    assert APTPruneVectorEnv(2, model=path, dataset="synthetic").data.info.mean == (0.9,)
    with pytest.raises(ValueError, match="data_config"):
        save_backbone(tmp_path / "other", pv, meta={"data_config": CONFIG})  # the model's, not meta's


def test_a_backbone_on_this_projects_transforms_has_no_data_config_and_keeps_them(tmp_path, recorded):
    pv = _tiny()
    assert pv.data_config is None
    path = save_backbone(tmp_path / "ckpt", pv, meta={"dataset": "synthetic", "mean": [0.2], "std": [0.3]})
    config = json.loads((path / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] == [0.2]  # what timm alone reads
    assert load_backbone(path).data_config is None
    ours = build_dataset("synthetic", split="test", img_size=16, in_chans=1)
    assert torch.equal(dataset_for(load_backbone(path), "synthetic", split="test")[5][0], ours[5][0])
    assert load_backbone(recorded).data_config == CONFIG  # the earlier layout still reads


def test_from_timm_with_pretrained_weights_carries_their_data_config(monkeypatch):
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: create(name, **kw))  # no download
    kwargs = dict(img_size=32, patch_size=8, in_chans=1, num_classes=10, depth=2, embed_dim=32, num_heads=2)
    pv = PrunableViT.from_timm("vit_tiny_patch16_224", pretrained=True, **kwargs)
    assert pv.data_config == pretrained_data_config("vit_tiny_patch16_224", img_size=32, in_chans=1)
    assert PrunableViT.from_timm("vit_tiny_patch16_224", **kwargs).data_config is None


# Digests of the first, second, 18th and last images of each split as the code before the model carried its data
# config built them for the shipped checkpoints (this project's transforms: fashion-mnist mean 0.286, std 0.353).
SHIPPED = {
    ("fashion-mnist", "test"): "b9d4fe650f51efdc",
    ("fashion-mnist", "val"): "9dac929253b1daf0",
    ("synthetic", "test"): "c2541969f6c16b47",
    ("digits", "test"): "e294fa6b950636dd",
}


def _digest(dataset) -> str:
    x = torch.stack([dataset[i][0] for i in (0, 1, 17, len(dataset) - 1)])
    return hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("checkpoint", [DEFAULT_CHECKPOINT, PLAIN_CHECKPOINT], ids=["default", "plain"])
@pytest.mark.parametrize("name, split", list(SHIPPED))
def test_the_shipped_checkpoints_are_preprocessed_as_before(checkpoint, name, split):
    pv = load_backbone(checkpoint)
    assert pv.data_config is None
    try:
        dataset = dataset_for(pv, name, split=split, download=False)
    except FileNotFoundError:
        pytest.skip(f"{name} is not installed")
    assert _digest(dataset) == SHIPPED[name, split]
    if name == "fashion-mnist":
        assert (dataset.info.mean, dataset.info.std) == ((0.286,), (0.353,))


# -- one random pruning --------------------------------------------------------------------------------------


def test_random_count_keeps_the_count_of_live_tokens_uniformly_and_reproducibly():
    live = torch.ones(4000, 10, dtype=torch.bool)
    live[:, 7:] = False  # 7 live tokens per row
    count = torch.tensor([0, 3, 7, 9]).repeat(1000)
    keep = random_count(live, count, torch.Generator().manual_seed(0))
    assert keep.dtype == torch.bool and not (keep & ~live).any()
    assert torch.equal(keep.sum(1), count.clamp(max=7))
    share = keep[count == 3].float().mean(0)[:7]  # each live token kept 3 times in 7
    assert torch.allclose(share, torch.full((7,), 3 / 7), atol=0.06)
    assert torch.equal(keep, random_count(live, count, torch.Generator().manual_seed(0)))
    assert not torch.equal(keep, random_count(live, count, torch.Generator().manual_seed(1)))
    torch.manual_seed(5)
    drawn = random_count(live, count)  # torch's global RNG
    torch.manual_seed(5)
    assert torch.equal(drawn, random_count(live, count))


def test_random_keep_and_random_at_counts_are_random_count():
    live = torch.rand(6, 16, generator=torch.Generator().manual_seed(2)) > 0.3
    obs = {"keep": live.to(torch.int8), "stage": torch.zeros(6, dtype=torch.long), "index": torch.arange(6)}
    count = torch.floor(live.sum(1) * 0.5 + 0.5).clamp(min=1).long()
    assert torch.equal(RandomKeep(0.5, seed=3).act(obs), random_count(live, count, torch.Generator().manual_seed(3)))
    masks = random_count(live, count, torch.Generator().manual_seed(9)).unsqueeze(1)  # (M, K=1, N)
    decisions = Decisions(torch.arange(6), masks)
    replayed = random_at_counts(decisions, seed=4)(obs)
    assert torch.equal(replayed, random_count(live, count, torch.Generator().manual_seed(4)))
