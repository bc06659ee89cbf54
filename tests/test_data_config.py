"""The backbone carries its preprocessing (``PrunableViT.data_config``): every reader of a checkpoint's data (the env,
the agents' comparison table, train_agent.py's val table) normalises as the checkpoint records; and an image folder
without split subfolders holds out a fixed test part."""

import json
from pathlib import Path

import pytest
import torch
from helpers import SMALL, TINY_VIT, load_script
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import Subset
from torch.utils.tensorboard import SummaryWriter

from agents.compare import compare_policies
from agents.policy import APTPolicy
from apt_env.data.datasets import build_dataset, make_loader
from apt_env.envs.env import APTPruneVectorEnv
from apt_env.eval.evaluate import evaluate
from apt_env.models.backbone import PrunableViT
from apt_env.models.checkpoint import save_backbone

RECORDED = {"input_size": [1, 16, 16], "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
            "mean": [0.9], "std": [0.05]}  # fmt: skip
"""A data config far from the synthetic images' own statistics (mean 0.238, std 0.175)."""


@pytest.fixture
def pretrained_like(tmp_path) -> Path:
    """The tiny ViT's checkpoint as ``train_backbone.py --pretrained`` wrote it before the backbone carried its data
    config: timm's weights' data config in a ``data_config`` key, beside a hard-coded ``pretrained_cfg``."""
    torch.manual_seed(0)
    path = save_backbone(tmp_path / "old", PrunableViT.from_timm("vit_tiny_patch16_224", **TINY_VIT))
    config = json.loads((path / "config.json").read_text())
    config.pop("preprocessing", None)
    config["pretrained_cfg"] = {"input_size": [1, 16, 16], "interpolation": "bilinear", "crop_pct": 1.0,
                                "num_classes": 10}  # fmt: skip
    config.update(dataset="synthetic", data_config=RECORDED)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def _loss_on(pv: PrunableViT, dataset, images: int = 32) -> float:
    loader = make_loader(Subset(dataset, range(images)), batch_size=256, shuffle=False, seed=0)
    return evaluate(pv, loader)["loss"]


def test_the_recorded_preprocessing_changes_the_loss(pretrained_like):
    """What the tests below tell apart: the recorded normalisation and the dataset's own give other losses."""
    envs = APTPruneVectorEnv(2, model=pretrained_like, dataset="synthetic", split="val")
    assert envs.data.info.mean == (0.9,) and envs.data.info.std == (0.05,)
    own = build_dataset("synthetic", split="val", img_size=16, in_chans=1)
    assert _loss_on(envs.pv, envs.data) != pytest.approx(_loss_on(envs.pv, own), rel=1e-3)


def test_the_comparison_table_scores_a_checkpoint_on_its_recorded_preprocessing(pretrained_like):
    envs = APTPruneVectorEnv(4, model=pretrained_like, dataset="synthetic", split="val")
    policy = APTPolicy.for_env(envs, **SMALL)
    _, rows = compare_policies(envs, policy, dataset="synthetic", episodes=1, images=32)
    assert dict(rows)["keep all"]["loss"] == pytest.approx(_loss_on(envs.pv, envs.data), rel=1e-6)


def test_train_agents_val_table_scores_a_checkpoint_on_its_recorded_preprocessing(pretrained_like, tmp_path):
    module = load_script("train_agent")
    args = module.Args(model=str(pretrained_like), dataset="synthetic", num_envs=4, val_episodes=1, val_images=32)
    envs = APTPruneVectorEnv(4, model=pretrained_like, dataset="synthetic")
    writer = SummaryWriter(str(tmp_path / "tb"))
    module.report(args, envs, APTPolicy.for_env(envs, **SMALL), writer)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    keep_all = json.loads(events.Tensors("eval/keep all/text_summary")[0].tensor_proto.string_val[0])
    val = APTPruneVectorEnv(2, model=pretrained_like, dataset="synthetic", split="val").data
    assert keep_all["loss"] == pytest.approx(_loss_on(envs.pv, val), rel=1e-6)


def test_a_backbone_carries_its_data_config_through_its_checkpoint_as_one_pretrained_cfg(tmp_path):
    import timm

    from apt_env.data.datasets import dataset_for
    from apt_env.models.checkpoint import load_backbone

    pv = PrunableViT.from_timm("vit_tiny_patch16_224", **TINY_VIT)
    assert pv.data_config["input_size"] == (1, 16, 16) and pv.data_config["preprocessing"] == "apt_env"
    pv.data_config = {**RECORDED, "preprocessing": "timm"}
    path = save_backbone(tmp_path / "new", pv, meta={"dataset": "synthetic"})
    config = json.loads((path / "config.json").read_text())
    assert "data_config" not in config and config["pretrained_cfg"]["mean"] == [0.9]
    assert load_backbone(path).data_config == pv.data_config
    assert pv.with_pruning(min_keep=2).data_config == pv.data_config
    model = timm.create_model(f"local-dir:{path}", pretrained=True)  # timm reads the same config
    assert tuple(timm.data.resolve_data_config({}, model=model)["mean"]) == (0.9,)
    assert dataset_for(load_backbone(path), "synthetic", "val").info.mean == (0.9,)
    with pytest.raises(ValueError, match="input_size"):
        pv.data_config = {**RECORDED, "input_size": (1, 28, 28)}


def test_a_shipped_checkpoint_loads_with_its_recorded_statistics():
    from apt_env.defaults import DEFAULT_CHECKPOINT
    from apt_env.models.checkpoint import load_backbone

    config = load_backbone(DEFAULT_CHECKPOINT).data_config
    assert (config["mean"], config["std"], config["preprocessing"]) == ((0.286,), (0.353,), "apt_env")


def _image_folder(root: Path, per_class: int = 20) -> Path:
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (10 * c, i, 0)).save(root / f"class{c}" / f"{i:02d}.png")
    return root


def _files(dataset) -> set[str]:
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    return {base.samples[i][0] for i in (dataset.indices if isinstance(dataset, Subset) else range(len(base)))}


def test_an_image_folder_without_splits_holds_out_a_fixed_stratified_test_part(tmp_path, caplog):
    name = f"imagefolder:{_image_folder(tmp_path / 'images')}"
    with caplog.at_level("INFO", logger="apt_env.data"):
        test = build_dataset(name, split="test")
    assert "held out" in caplog.text
    train, val = build_dataset(name, split="train"), build_dataset(name, split="val")
    parts = [_files(d) for d in (train, val, test)]
    assert sum(map(len, parts)) == 60 and len(set.union(*parts)) == 60  # disjoint, all images used
    assert sorted(test.targets) == [0, 0, 1, 1, 2, 2]  # 10% of every class
    assert _files(build_dataset(name, split="test")) == parts[2]  # the same images every time


def test_a_backbone_built_untrained_takes_the_statistics_of_the_data_it_meets():
    from apt_env.data.datasets import dataset_info
    from apt_env.models.resample import resample_into

    synthetic = ((0.2380,), (0.1748,))
    envs = APTPruneVectorEnv(2, model=("vit_tiny_patch16_224", TINY_VIT), dataset="synthetic")
    assert (envs.pv.data_config["mean"], envs.pv.data_config["std"]) == synthetic
    assert (envs.data.info.mean, envs.data.info.std) == synthetic
    module = load_script("train_backbone")
    args = module.Args(dataset="synthetic", model_name="vit_tiny_patch16_224", model_kwargs=json.dumps(TINY_VIT))
    pv = module.fresh_model(args, dataset_info("synthetic"))
    assert (pv.data_config["mean"], pv.data_config["std"]) == synthetic
    source = PrunableViT.from_timm("vit_tiny_patch16_224", **TINY_VIT)
    source.data_config = {**RECORDED, "preprocessing": "timm"}
    target = resample_into(source, PrunableViT.from_timm("vit_tiny_patch16_224", **{**TINY_VIT, "patch_size": 2}))
    assert target.data_config == source.data_config
