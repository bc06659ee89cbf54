"""Datasets by name: real files only (Debian's Fashion-MNIST, tiny CIFAR folders and PNGs made here)."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import SequentialSampler
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.transforms import v2

from apt_env.data import datasets as data
from apt_env.data.config import model_data_config
from apt_env.data.datasets import DATASETS, build_dataset, dataset_info, make_loader


def denormalize(x: torch.Tensor, info: data.DatasetInfo) -> torch.Tensor:
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    return x * std + mean


def write_idx(path: Path, array: np.ndarray, *, dims: tuple[int, ...] | None = None) -> None:
    """Write ``array`` (uint8) as a gzipped idx file; ``dims`` overrides the header's shape."""
    dims = array.shape if dims is None else dims
    header = struct.pack(f">{1 + len(dims)}I", 0x0800 | len(dims), *dims)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


# ---- fashion-mnist ----


def test_fashion_mnist_from_debian_files(tmp_path: Path) -> None:
    train = build_dataset("fashion-mnist", split="train", root=tmp_path, download=False)
    val = build_dataset("fashion-mnist", split="val", root=tmp_path, download=False)
    test = build_dataset("fashion-mnist", split="test", root=tmp_path, download=False)
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    assert train.info == dataset_info("fashion-mnist")
    assert torch.bincount(train.targets).tolist() == [5500] * 10  # val is stratified: 500 of each class
    assert torch.bincount(val.targets).tolist() == [500] * 10
    keys = lambda ds: {img.numpy().tobytes() for img in ds.images[:2000]}  # noqa: E731
    assert not keys(train) & {img.numpy().tobytes() for img in val.images}  # held out: no overlap
    assert torch.bincount(test.targets).tolist() == [1000] * 10

    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
    assert isinstance(y, int) and y == int(train.targets[0])
    assert torch.allclose(denormalize(x, train.info), train.images[0].float() / 255, atol=1e-6)
    batch = torch.stack([test[i][0] for i in range(256)])
    (mean,), (std,) = train.info.mean, train.info.std
    assert batch.min().item() == pytest.approx(-mean / std, abs=1e-5)  # black background
    assert batch.max().item() <= (1 - mean) / std + 1e-5
    assert abs(batch.mean().item()) < 0.2 and 0.8 < batch.std().item() < 1.2


def test_fashion_mnist_resized_to_rgb(tmp_path: Path) -> None:
    ds = build_dataset("fashion-mnist", split="test", img_size=32, in_chans=3, root=tmp_path, download=False)
    x, _ = ds[3]
    assert x.shape == (3, 32, 32)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert ds.info.img_size == 32 and ds.info.in_chans == 3 and len(ds.info.mean) == 3


def test_fashion_mnist_truncated_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = data._FASHION_MNIST_FILES["test"]
    raw = (data.FASHION_MNIST_DIR / images).read_bytes()
    (tmp_path / images).write_bytes(raw[: len(raw) // 2])
    shutil.copy(data.FASHION_MNIST_DIR / labels, tmp_path / labels)
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz is truncated or corrupt"):
        build_dataset("fashion-mnist", split="test", root=tmp_path, download=False)


def test_fashion_mnist_idx_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    images_name, labels_name = data._FASHION_MNIST_FILES["test"]
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / labels_name, np.arange(5) % 10)

    write_idx(tmp_path / images_name, images)
    ds = build_dataset("fashion-mnist", split="test", download=False, root=tmp_path)
    assert len(ds) == 5 and torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.targets.tolist() == [0, 1, 2, 3, 4]

    write_idx(tmp_path / images_name, images, dims=(6, 28, 28))  # header promises more than the payload
    with pytest.raises(ValueError, match=r"t10k-images.*shape \(6, 28, 28\) needs"):
        build_dataset("fashion-mnist", split="test", download=False, root=tmp_path)

    write_idx(tmp_path / images_name, images.reshape(5, -1))  # 2-d, not 3-d
    with pytest.raises(ValueError, match="not an idx file"):
        build_dataset("fashion-mnist", split="test", download=False, root=tmp_path)

    write_idx(tmp_path / images_name, images[:4])
    with pytest.raises(ValueError, match="4 images but .* 5 labels"):
        build_dataset("fashion-mnist", split="test", download=False, root=tmp_path)


def test_fashion_mnist_missing_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        build_dataset("fashion-mnist", root=tmp_path, download=False)
    assert str(tmp_path / "nowhere" / "train-images-idx3-ubyte.gz") in str(err.value)
    assert str(tmp_path / "FashionMNIST") in str(err.value)


# ---- cifar ----


def write_cifar(
    root: Path, name: str, monkeypatch: pytest.MonkeyPatch, *, per_file: int = 3
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write a tiny dataset in CIFAR's python-pickle layout and make torchvision's md5 check expect its files
    (as it expects the official ones); return ``{split: (images NCHW, labels)}``."""
    rng = np.random.default_rng(0)
    tv_cls = {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]
    folder, num_classes = root / tv_cls.base_folder, 10 if name == "cifar10" else 100
    label_key = "labels" if name == "cifar10" else "fine_labels"
    folder.mkdir(parents=True)
    md5 = lambda path: hashlib.md5(path.read_bytes()).hexdigest()  # noqa: E731
    out = {}
    for split in ("train", "test"):
        images, labels, files = [], [], []
        for file_name, _md5 in tv_cls.train_list if split == "train" else tv_cls.test_list:
            batch = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
            batch_labels = rng.integers(0, num_classes, per_file).tolist()
            # str keys: what pickle.load(encoding="latin1") gives for the official Python 2 pickles
            entry = {"batch_label": file_name, "data": batch.reshape(per_file, -1), label_key: batch_labels}
            (folder / file_name).write_bytes(pickle.dumps(entry))
            images.append(batch)
            labels += batch_labels
            files.append([file_name, md5(folder / file_name)])
        monkeypatch.setattr(tv_cls, f"{split}_list", files)
        out[split] = (np.concatenate(images), labels)
    names = [f"c{num_classes}_{i}" for i in range(num_classes)]
    meta_path = folder / tv_cls.meta["filename"]
    meta_path.write_bytes(pickle.dumps({tv_cls.meta["key"]: names}))
    monkeypatch.setattr(tv_cls, "meta", {**tv_cls.meta, "md5": md5(meta_path)})
    return out


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_through_torchvision(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_cifar(tmp_path, name, monkeypatch)
    train, val = (build_dataset(name, split=s, root=tmp_path, download=False) for s in ("train", "val"))
    assert len(train) + len(val) == len(written["train"][1])
    assert sorted(train.targets.tolist() + val.targets.tolist()) == sorted(written["train"][1])
    ds = build_dataset(name, split="test", root=tmp_path, download=False)
    images, labels = written["test"]
    assert len(ds) == 3 and ds.targets.tolist() == labels
    assert ds.classes[1] == ("c10_1" if name == "cifar10" else "c100_1")
    x, y = ds[2]
    assert x.shape == (3, 32, 32) and y == labels[-1]
    rgb = torch.from_numpy(images[-1]).float() / 255  # R, G, B planes in this order
    assert torch.allclose(denormalize(x, ds.info), rgb, atol=1e-5)

    gray = build_dataset(name, split="test", in_chans=1, root=tmp_path, download=False)
    luma = 0.2989 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]  # v2.Grayscale's weights
    assert torch.allclose(denormalize(gray[2][0], gray.info), luma[None], atol=1e-5)
    assert gray.info.mean[0] == pytest.approx(sum(w * m for w, m in zip((0.2989, 0.587, 0.114), ds.info.mean)))
    small = build_dataset(name, split="test", img_size=16, in_chans=1, root=tmp_path, download=False)
    assert small[0][0].shape == (1, 16, 16) and small.info.in_chans == 1


def test_cifar_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=True") as err:
        build_dataset("cifar10", root=tmp_path, download=False)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)
    assert "missing data_batch_1" in str(err.value)


def test_cifar_corrupt_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar(tmp_path, "cifar100", monkeypatch)
    build_dataset("cifar100", split="test", root=tmp_path, download=False)
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:-1] + b"\0")  # torchvision checks every file's md5, whatever the split
    with pytest.raises(ValueError, match=r"cifar-100-python fails torchvision's md5 check"):
        build_dataset("cifar100", split="test", root=tmp_path, download=False)


# ---- imagefolder ----


def write_png(path: Path, color: tuple[int, int, int], size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagefolder(tmp_path: Path) -> None:
    red, green = (255, 0, 0), (0, 255, 0)
    write_png(tmp_path / "train" / "cat" / "a.png", red, (40, 30))
    write_png(tmp_path / "train" / "cat" / "b.png", red, (20, 20))
    write_png(tmp_path / "train" / "dog" / "a.png", green, (30, 50))
    write_png(tmp_path / "val" / "dog" / "a.png", green, (64, 64))  # val lacks "cat": dog stays label 1
    name = f"imagefolder:{tmp_path}"

    info = dataset_info(name)
    assert (info.num_classes, info.img_size, info.in_chans) == (2, 224, 3)
    train, val = build_dataset(name, split="train"), build_dataset(name, split="val")
    assert (len(train), len(val)) == (2, 1) and train.classes == ["cat", "dog"]  # one of the two cats held out
    x, y = train[0]
    assert x.shape == (3, 224, 224) and y == 0 and train.targets == [0, 1]
    assert torch.allclose(denormalize(x, train.info)[:, 100, 100], torch.tensor([1.0, 0.0, 0.0]), atol=1e-5)

    test = build_dataset(name, split="test", img_size=32, in_chans=1)
    x, y = test[0]
    assert len(test) == 1 and x.shape == (1, 32, 32) and y == 1
    assert denormalize(x, test.info).mean().item() == pytest.approx(0.587, abs=1e-5)  # green's luma weight


def test_imagefolder_with_a_pretrained_model_uses_timms_eval_transform(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = [tmp_path / "val" / "cat" / "a.png", tmp_path / "val" / "dog" / "b.png"]
    for path, size in zip(paths, [(300, 260), (180, 240)]):  # not square, not 224: resize and crop matter
        path.parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
    shutil.copytree(tmp_path / "val", tmp_path / "train")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # has its pretrained_cfg, no download
    cfg = timm.data.resolve_data_config(model=model)
    assert (cfg["interpolation"], cfg["crop_pct"]) == ("bicubic", 0.9)

    test = build_dataset(f"imagefolder:{tmp_path}", split="test", data_config=cfg)
    assert (test.info.img_size, test.info.in_chans) == (224, 3)
    assert (test.info.mean, test.info.std) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    timm_eval = timm.data.create_transform(**cfg)
    for i, path in enumerate(paths):
        assert torch.equal(test[i][0], timm_eval(Image.open(path).convert("RGB")))

    train = build_dataset(f"imagefolder:{tmp_path}", split="train", augment=True, data_config=cfg)
    assert train[0][0].shape == (3, 224, 224) and train.info == test.info  # our augmentation, the model's mean

    tiny = timm.create_model("vit_tiny_patch16_224", img_size=16, in_chans=1, depth=1)  # no pretrained weights
    tiny_cfg = timm.data.resolve_data_config(model=tiny)
    with pytest.raises(ValueError, match="disagree with the data config's input_size"):
        build_dataset("synthetic", img_size=16, in_chans=1, data_config=tiny_cfg)
    with pytest.raises(ValueError, match="1 mean and 1 std values"):
        build_dataset("synthetic", data_config={**cfg, "mean": (0.5,), "std": (0.5,)})


def test_our_backbones_data_config_gives_our_eval_transform() -> None:
    import apt_env  # noqa: F401  (registers vit_apt_tiny_patch4_28)

    cfg = timm.data.resolve_data_config(model=timm.create_model("vit_apt_tiny_patch4_28"))
    ours = build_dataset("fashion-mnist", split="test", download=False)
    timms = build_dataset("fashion-mnist", split="test", download=False, data_config=cfg)
    assert timms.info == ours.info
    assert all(torch.equal(ours[i][0], timms[i][0]) for i in range(0, 10000, 997))  # PIL and tensor paths agree


def test_a_pretrained_models_data_config_is_timms_at_the_models_size() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # timm's config, no download
    cfg = model_data_config(model.pretrained_cfg, input_size=(3, 224, 224), pretrained=True)
    assert cfg == {**timm.data.resolve_data_config(model=model), "preprocessing": "timm"}
    gray = model_data_config(model.pretrained_cfg, input_size=(1, 32, 32), pretrained=True)  # adapted to gray
    assert gray["input_size"] == (1, 32, 32) and len(gray["mean"]) == len(gray["std"]) == 1
    digits = build_dataset("digits", split="test", data_config=gray)
    assert digits[0][0].shape == (1, 32, 32) and digits.info.mean == gray["mean"]
    untrained = model_data_config(model.pretrained_cfg, input_size=(1, 32, 32), pretrained=False)
    assert untrained == {**gray, "interpolation": "bilinear", "crop_pct": 1.0, "preprocessing": "apt_env"}


def test_imagefolder_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(f"imagefolder:{tmp_path / 'nope'}")


# ---- digits / synthetic ----


def test_digits_split() -> None:
    train, test = build_dataset("digits", split="train"), build_dataset("digits", split="test")
    val = build_dataset("digits", split="val")
    assert (len(train) + len(val), len(test)) == (1437, 360) and 110 <= len(val) <= 130
    assert train[0][0].shape == (1, 8, 8)
    keys = lambda ds: {img.numpy().tobytes() for img in ds.images}  # noqa: E731  (digits has no duplicates)
    assert not keys(train) & keys(test)
    assert len(keys(train) | keys(val) | keys(test)) == 1797
    assert torch.bincount(test.targets).min() >= 35  # stratified: about 36 of each class
    again = build_dataset("digits", split="test")
    assert torch.equal(again.images, test.images) and torch.equal(again.targets, test.targets)


def test_synthetic_deterministic_and_learnable() -> None:
    train, test = build_dataset("synthetic", split="train"), build_dataset("synthetic", split="test")
    assert (len(train) + len(build_dataset("synthetic", split="val")), len(test)) == (512, 128)
    assert train[0][0].shape == (1, 28, 28) and train.info == dataset_info("synthetic")
    again = build_dataset("synthetic", split="train")
    assert torch.equal(again.images, train.images) and torch.equal(again.targets, train.targets)
    assert not torch.equal(train.images[:128], test.images)

    # nearest class mean on the train split classifies the test split: the class is in the image
    x_train, x_test = train.images.flatten(1).float(), test.images.flatten(1).float()
    centroids = torch.stack([x_train[train.targets == c].mean(0) for c in range(10)])
    predicted = torch.cdist(x_test, centroids).argmin(1)
    assert (predicted == test.targets).float().mean().item() > 0.95

    small = build_dataset("synthetic", img_size=16, in_chans=1)
    assert small[0][0].shape == (1, 16, 16)


def test_augment_is_random_but_seeded() -> None:
    plain = build_dataset("synthetic", split="test")
    aug = build_dataset("synthetic", split="test", augment=True)

    def epoch() -> torch.Tensor:
        return torch.stack([aug[i][0] for i in range(32)])

    torch.manual_seed(0)
    first = epoch()
    torch.manual_seed(0)
    assert torch.equal(first, epoch())
    assert first.shape == (32, 1, 28, 28)
    assert not torch.equal(first, torch.stack([plain[i][0] for i in range(32)]))
    steps = lambda ds: [type(t) for t in ds.transform.transforms]  # noqa: E731
    assert v2.RandomCrop in steps(aug) and v2.RandomHorizontalFlip not in steps(aug)  # a mirror moves the class
    fashion = build_dataset("fashion-mnist", split="test", augment=True, download=False)
    assert {v2.RandomCrop, v2.RandomHorizontalFlip} <= set(steps(fashion))


def test_bad_names_and_arguments() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'") as err:
        build_dataset("mnist")
    assert all(name in str(err.value) for name in DATASETS)
    with pytest.raises(ValueError, match="split"):
        build_dataset("synthetic", split="validation")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"in_chans can be 1 \(gray\) or 3 \(RGB\), got 2"):
        build_dataset("cifar10", in_chans=2, download=False)
    with pytest.raises(ValueError, match="img_size must be positive"):
        build_dataset("synthetic", img_size=0)
    with pytest.raises(ValueError, match="imagefolder needs a path"):
        dataset_info("imagefolder:")


# ---- loader ----


def test_make_loader_seeded_order() -> None:
    ds = build_dataset("synthetic", split="test")

    def labels(seed: int) -> list[int]:
        loader = make_loader(ds, batch_size=16, shuffle=True, seed=seed)
        return [y for _ in range(2) for _, batch in loader for y in batch.tolist()]

    assert labels(0) == labels(0)
    assert labels(0) != labels(1)
    assert sorted(labels(0)[:128]) == sorted(ds.targets.tolist())
    with pytest.raises(ValueError, match="shuffle=False with a sampler"):
        make_loader(ds, batch_size=4, shuffle=True, seed=0, sampler=SequentialSampler(ds))


def test_make_loader_augmentation_reproducible_across_workers() -> None:
    ds = build_dataset("synthetic", split="test", augment=True)

    def images(seed: int) -> torch.Tensor:
        loader = make_loader(ds, batch_size=32, shuffle=True, seed=seed, num_workers=2)
        return torch.cat([x for x, _ in loader])

    first = images(0)
    assert torch.equal(first, images(0))  # the workers' seeds come from the loader's generator
    assert not torch.equal(first, images(1))
