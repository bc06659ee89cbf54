"""Datasets by name: real files only (Debian's Fashion-MNIST, tiny CIFAR folders and PNGs made here)."""

from __future__ import annotations

import gzip
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import SequentialSampler

from apt_env import data
from apt_env.data import DATASETS, build_dataset, dataset_info, make_loader


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


def write_cifar(root: Path, name: str, *, per_file: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write a tiny dataset in CIFAR's own python-pickle format; return ``{split: (images NCHW, labels)}``."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, num_classes, label_key = root / "cifar-10-batches-py", 10, b"labels"
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        meta = ("batches.meta", {b"label_names": [f"c10_{i}".encode() for i in range(10)]})
    else:
        folder, num_classes, label_key = root / "cifar-100-python", 100, b"fine_labels"
        files = {"train": ["train"], "test": ["test"]}
        meta = ("meta", {b"fine_label_names": [f"c100_{i}".encode() for i in range(100)]})
    folder.mkdir(parents=True)
    out = {}
    for split, names in files.items():
        images, labels = [], []
        for file_name in names:
            batch = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
            batch_labels = rng.integers(0, num_classes, per_file).tolist()
            entry = {
                b"batch_label": file_name.encode(),
                b"data": batch.reshape(per_file, -1),
                label_key: batch_labels,
            }
            (folder / file_name).write_bytes(pickle.dumps(entry))
            images.append(batch)
            labels += batch_labels
        out[split] = (np.concatenate(images), labels)
    (folder / meta[0]).write_bytes(pickle.dumps(meta[1]))
    return out


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_own_format(tmp_path: Path, name: str) -> None:
    written = write_cifar(tmp_path, name)
    train, val = (build_dataset(name, split=s, root=tmp_path, download=False) for s in ("train", "val"))
    assert len(train) + len(val) == len(written["train"][1])
    assert sorted(train.targets.tolist() + val.targets.tolist()) == sorted(written["train"][1])
    for split, n in (("test", 3),):
        ds = build_dataset(name, split=split, root=tmp_path, download=False)
        images, labels = written[split]
        assert len(ds) == n
        assert ds.targets.tolist() == labels
        assert ds.classes[1] == ("c10_1" if name == "cifar10" else "c100_1")
        x, y = ds[n - 1]
        assert x.shape == (3, 32, 32) and y == labels[-1]
        expected = torch.from_numpy(images[-1]).float() / 255  # R, G, B planes in this order
        assert torch.allclose(denormalize(x, ds.info), expected, atol=1e-5)

    gray = build_dataset(name, split="test", img_size=16, in_chans=1, root=tmp_path, download=False)
    assert gray[0][0].shape == (1, 16, 16) and gray.info.in_chans == 1


def test_cifar_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=True") as err:
        build_dataset("cifar10", root=tmp_path, download=False)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)


def test_cifar_bad_batch(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar100")
    bad = {b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}
    (tmp_path / "cifar-100-python" / "test").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match=r"cifar-100-python/test: 'data' must be uint8 of shape \(N, 3072\)"):
        build_dataset("cifar100", split="test", root=tmp_path, download=False)
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable CIFAR pickle"):
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
    assert denormalize(x, test.info).mean().item() == pytest.approx(1 / 3, abs=1e-5)  # green averaged


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


def test_bad_names_and_arguments() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'") as err:
        build_dataset("mnist")
    assert all(name in str(err.value) for name in DATASETS)
    with pytest.raises(ValueError, match="split"):
        build_dataset("synthetic", split="validation")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in_chans can be 3 or 1"):
        build_dataset("cifar10", in_chans=2, download=False)
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
