import json
import random

import numpy as np
import pytest
import safetensors.torch
import torch

from apt_env.models import checkpoint
from apt_env.models.backbone import DEFAULT_MODEL_KWARGS, DEFAULT_MODEL_NAME, PrunableViT
from apt_env.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_backbone, save_backbone
from apt_env.train.state import get_rng_state, load_train_state, resume_state, save_train_state, set_rng_state

META = {"dataset": "fashion-mnist", "num_classes": 10, "img_size": 28, "in_chans": 1}


def _tiny(seed: int = 0, **extra) -> PrunableViT:
    torch.manual_seed(seed)
    return PrunableViT.from_timm(DEFAULT_MODEL_NAME, **{**DEFAULT_MODEL_KWARGS, "depth": 2, **extra}).eval()


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_round_trip_gives_identical_logits(tmp_path):
    pv = _tiny(prune_layers=(1,), min_keep=3)
    folder = save_backbone(tmp_path / "ckpt", pv, meta=META)
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["architecture"] == DEFAULT_MODEL_NAME and config["model_args"]["depth"] == 2  # timm's layout
    assert config["prune_layers"] == [1] and config["min_keep"] == 3 and config["dataset"] == "fashion-mnist"

    loaded = load_backbone(
        folder, expect={"num_classes": 10, "in_chans": 1, "img_size": 28, "dataset": "fashion-mnist"}
    )
    assert not loaded.training and loaded.prune_layers == (1,) and loaded.min_keep == 3
    assert loaded.timm_name == pv.timm_name and loaded.timm_kwargs == pv.timm_kwargs
    x = _images()
    masks = [torch.rand(3, pv.num_patches, generator=torch.Generator().manual_seed(2)) < 0.5]
    with torch.no_grad():
        assert torch.equal(loaded(x), pv(x))
        assert torch.equal(loaded(x, masks, layout="gathered"), pv(x, masks, layout="gathered"))


def test_overwrite_replaces_and_leaves_no_temp(tmp_path):
    save_backbone(tmp_path / "ckpt", _tiny(seed=0))
    second = _tiny(seed=1)
    save_backbone(tmp_path / "ckpt", second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with torch.no_grad():
        assert torch.equal(load_backbone(tmp_path / "ckpt")(_images()), second(_images()))


def test_truncated_weights_are_a_clear_error(tmp_path):
    folder = save_backbone(tmp_path / "ckpt", _tiny())
    weights = folder / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"checkpoint .*ckpt is corrupt: {WEIGHTS_FILE}"):
        load_backbone(folder)


def test_corrupt_config_is_a_clear_error(tmp_path):
    folder = save_backbone(tmp_path / "ckpt", _tiny())
    (folder / CONFIG_FILE).write_text('{"format": "apt-backb')
    with pytest.raises(ValueError, match=f"checkpoint .*ckpt is corrupt: {CONFIG_FILE}"):
        load_backbone(folder)


def test_missing_folder_and_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_backbone(tmp_path / "nowhere")
    folder = save_backbone(tmp_path / "ckpt", _tiny())
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"ckpt has no {WEIGHTS_FILE}"):
        load_backbone(folder)


def test_expect_mismatch_names_both_values(tmp_path):
    folder = save_backbone(tmp_path / "ckpt", _tiny(), meta=META)
    with pytest.raises(ValueError, match="num_classes = 10, expected 100"):
        load_backbone(folder, expect={"num_classes": 100})
    with pytest.raises(ValueError, match="dataset = 'fashion-mnist', expected 'cifar10'"):
        load_backbone(folder, expect={"dataset": "cifar10"})
    with pytest.raises(ValueError, match="records no 'accuracy'"):
        load_backbone(folder, expect={"accuracy": 0.9})


def test_weights_that_do_not_match_the_config(tmp_path):
    folder = save_backbone(tmp_path / "ckpt", _tiny())
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in _tiny(depth=3).model.state_dict().items()}, str(folder / WEIGHTS_FILE)
    )
    with pytest.raises(ValueError, match=f"weights in {WEIGHTS_FILE} do not match the model in {CONFIG_FILE}"):
        load_backbone(folder)


def test_meta_that_contradicts_the_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="meta\\['num_classes'\\] = 100 but the model has num_classes = 10"):
        save_backbone(tmp_path / "ckpt", _tiny(), meta={"num_classes": 100})
    assert not (tmp_path / "ckpt").exists()


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "events.out").write_text("x")
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        save_backbone(tmp_path / "run", _tiny())
    assert (tmp_path / "run" / "events.out").exists()


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = _tiny(seed=0)
    save_backbone(tmp_path / "ckpt", first, meta={"epoch": 1})
    real_save = safetensors.torch.save_file

    def half_then_crash(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.safetensors.torch, "save_file", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_backbone(tmp_path / "ckpt", _tiny(seed=1), meta={"epoch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded = load_backbone(tmp_path / "ckpt", expect={"epoch": 1})
    with torch.no_grad():
        assert torch.equal(loaded(_images()), first(_images()))


def test_interrupted_swap_is_repaired_by_next_read_or_save(tmp_path):
    save_backbone(tmp_path / "ckpt", _tiny(seed=0), meta={"epoch": 1})
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")  # as if killed between the two renames
    assert load_backbone(tmp_path / "ckpt", expect={"epoch": 1}) is not None  # a resume finds it again
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")
    (tmp_path / ".ckpt.tmp-stale").mkdir()
    save_backbone(tmp_path / "ckpt", _tiny(seed=1), meta={"epoch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_backbone(tmp_path / "ckpt", expect={"epoch": 2}) is not None


def test_killed_train_state_save_leaves_no_temp_files_behind(tmp_path):
    (tmp_path / ".train_state.pt.tmp-abc").write_bytes(b"half")  # as if killed while writing
    save_train_state(tmp_path / "train_state.pt", {"epoch": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_state.pt"]


def test_save_needs_a_model_built_by_from_timm(tmp_path):
    pv = PrunableViT(_tiny().model)
    with pytest.raises(ValueError, match="from_timm"):
        save_backbone(tmp_path / "ckpt", pv)


def test_train_state_round_trip_and_rng(tmp_path):
    path = tmp_path / "train_state.pt"
    assert load_train_state(path) is None
    pv = _tiny()
    opt = torch.optim.AdamW(pv.parameters(), lr=1e-3)
    pv(_images()).sum().backward()
    opt.step()
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    save_train_state(path, {"optimizer": opt.state_dict(), "epoch": 4, "rng": get_rng_state()})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    state = load_train_state(path)
    assert state["epoch"] == 4
    set_rng_state(state["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    opt2 = torch.optim.AdamW(pv.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert [p.name for p in tmp_path.iterdir()] == ["train_state.pt"]


def test_corrupt_train_state_is_a_clear_error(tmp_path):
    path = save_train_state(tmp_path / "train_state.pt", {"epoch": 1, "w": torch.zeros(1000)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="train_state.pt is corrupt"):
        load_train_state(path)


def test_resume_state_gives_each_process_its_own_share_and_restores_its_rng(tmp_path, caplog):
    assert resume_state(None) is None  # a new run
    assert resume_state(tmp_path) is None and "no training state yet" in caplog.text  # nothing saved yet
    shares = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        shares.append({"rng": get_rng_state(), "step": seed})
    save_train_state(tmp_path / "train_state.pt", {"ranks": shares, "epoch": 3})
    resumed = resume_state(tmp_path, rank=1, world_size=2)
    assert resumed.state["epoch"] == 3 and resumed.own["step"] == 2
    torch.manual_seed(2)
    expected = torch.rand(3)
    torch.manual_seed(0)
    resumed.restore_rng()
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(ValueError, match="trained on 2 processes; resume it on as many, not 1"):
        resume_state(tmp_path)
    save_train_state(tmp_path / "train_state.pt", shares[0])  # one process's state is its own share
    assert resume_state(tmp_path).own["step"] == 1


def test_timm_alone_loads_a_saved_backbone_from_its_folder(tmp_path):
    import timm

    torch.manual_seed(0)
    pv = PrunableViT.from_timm(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=5, depth=2, embed_dim=32,
        num_heads=2,
    )  # fmt: skip
    pv.data_config = {**pv.data_config, "mean": (0.2,), "std": (0.3,)}
    path = save_backbone(tmp_path / "ckpt", pv, meta={"dataset": "synthetic"})
    model = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), pv.eval().model(x))
    cfg = timm.data.resolve_data_config({}, model=model)
    assert tuple(cfg["input_size"]) == (1, 16, 16) and tuple(cfg["mean"]) == (0.2,) and tuple(cfg["std"]) == (0.3,)
    assert load_backbone(path).timm_name == "vit_tiny_patch16_224"  # and ours reads it back
