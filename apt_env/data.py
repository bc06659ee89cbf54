"""Datasets by name, each giving ``(image, label)`` with the transform the model needs.

Every dataset yields ``image``: float32 ``(in_chans, img_size, img_size)`` normalized with the dataset's
mean/std, and ``label``: int. Names (see ``DATASETS``):

- ``fashion-mnist`` (default): offline from Debian's ``dataset-fashion-mnist`` (``FASHION_MNIST_DIR``),
  else torchvision's download into ``root``.
- ``cifar10``, ``cifar100``: CIFAR's python-pickle folders in ``root`` (torchvision downloads them).
- ``digits``: scikit-learn's 8x8 digits, a fixed stratified 80/20 split.
- ``synthetic``: seeded images whose class is the location of a bright patch; for tests.
- ``imagefolder:PATH``: torchvision ``ImageFolder`` on ``PATH/train`` and ``PATH/val`` (or ``test``).

Fixed-size datasets are kept as one uint8 tensor in memory and transformed per item with tensor ops.
"""

from __future__ import annotations

import gzip
import logging
import math
import pickle
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST, ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.transforms import Compose, PILToTensor

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "DatasetInfo",
    "FolderImageDataset",
    "ImageTransform",
    "TensorImageDataset",
    "build_dataset",
    "dataset_info",
    "make_loader",
]

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = (
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "digits",
    "synthetic",
    "imagefolder:PATH",
)
"""Valid dataset names; ``imagefolder:PATH`` stands for any folder path after the colon."""

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` puts the original gzipped idx files."""

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_IMAGEFOLDER_PREFIX = "imagefolder:"
_SPLITS = ("train", "val", "test")
VAL_FRACTION = 1 / 12
"""Share of the original train split held out as ``val`` (5,000 of Fashion-MNIST's 60,000 images): tuning and
model selection happen there, never on ``test``."""
_VAL_SEED = 0
_DIGITS_SEED = 0
_SYNTHETIC_SEEDS = {"train": 0, "test": 1}
_SYNTHETIC_SIZES = {"train": 512, "test": 128}
_SYNTHETIC_GRID = 4  # patch positions on a 4x4 grid: room for the 10 classes
_NO_HFLIP = frozenset({"digits", "synthetic"})  # a mirrored digit or patch location changes the class


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    Args:
        name: dataset name as passed to ``build_dataset``.
        num_classes: number of classes; labels are ``0 .. num_classes - 1``.
        img_size: side of the square images, in pixels.
        in_chans: image channels.
        mean: per-channel mean used for normalization (``in_chans`` values, on the 0..1 scale).
        std: per-channel standard deviation used for normalization.
    """

    name: str
    num_classes: int
    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# Native size, channels and normalization of each named dataset (statistics of the train split).
_NATIVE = {
    info.name: info
    for info in (
        DatasetInfo("fashion-mnist", 10, 28, 1, (0.2860,), (0.3530,)),
        DatasetInfo("cifar10", 10, 32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        DatasetInfo("cifar100", 100, 32, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        DatasetInfo("digits", 10, 8, 1, (0.3054,), (0.3760,)),
        DatasetInfo("synthetic", 10, 28, 1, (0.2380,), (0.1748,)),
    )
}
# timm's IMAGENET_DEFAULT_MEAN / STD (not imported: importing timm here would slow every data import).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageTransform:
    """uint8 image ``(C, H, W)`` -> normalized float32 ``(in_chans, img_size, img_size)``.

    Channels: gray is repeated to ``in_chans``, RGB is averaged to 1 channel. Size: the short side is
    resized to ``img_size`` (bilinear, antialias) and the center cropped to a square. Augmentation
    (random crop with zero padding of ``img_size // 8``, optional horizontal flip) draws from torch's
    global RNG, which DataLoader workers seed from the loader's generator.

    Args:
        img_size: output side in pixels.
        in_chans: output channels.
        mean: per-channel mean of the output channels, 0..1 scale.
        std: per-channel standard deviation of the output channels.
        augment: add the random crop (and flip when ``hflip``).
        hflip: allow the horizontal flip when augmenting.
    """

    def __init__(
        self,
        *,
        img_size: int,
        in_chans: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = False,
        hflip: bool = True,
    ) -> None:
        self.img_size = img_size
        self.in_chans = in_chans
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment
        self.hflip = hflip
        self.pad = max(1, img_size // 8)

    def __call__(self, img: Tensor) -> Tensor:
        x = img.float().div_(255)  # (C, H, W)
        if x.shape[0] > self.in_chans:  # average before resizing: less work
            x = x.mean(0, keepdim=True)
        x = _resize_square(x, self.img_size)
        if self.augment:
            x = self._augment(x)
        x = x.expand(self.in_chans, -1, -1)
        return (x - self.mean) / self.std

    def _augment(self, x: Tensor) -> Tensor:
        size, pad = self.img_size, self.pad
        x = F.pad(x, (pad, pad, pad, pad))
        top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        x = x[:, top : top + size, left : left + size]
        if self.hflip and torch.rand(()).item() < 0.5:
            x = x.flip(-1)
        return x

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(img_size={self.img_size}, in_chans={self.in_chans}, "
            f"augment={self.augment}, hflip={self.hflip})"
        )


def _resize_square(x: Tensor, size: int) -> Tensor:
    """Resize ``x`` (C, H, W) so its short side is ``size``, then center-crop to ``size x size``."""
    h, w = x.shape[-2:]
    if h == w == size:
        return x
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[:, top : top + size, left : left + size]


class TensorImageDataset(Dataset[tuple[Tensor, int]]):
    """Images held in memory as one uint8 tensor, transformed per item.

    Args:
        images: ``(N, C, H, W)`` uint8 images.
        targets: ``(N,)`` integer labels in ``0 .. len(classes) - 1``.
        classes: class names, indexed by label.
        transform: maps one uint8 ``(C, H, W)`` image to the model's input.
        info: what the transformed samples look like (size, channels, normalization).
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        *,
        classes: list[str],
        transform: ImageTransform,
        info: DatasetInfo,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if targets.shape != (len(images),):
            raise ValueError(f"{len(images)} images but targets of shape {tuple(targets.shape)}")
        if len(targets) and not (0 <= int(targets.min()) and int(targets.max()) < len(classes)):
            raise ValueError(
                f"labels must lie in 0..{len(classes) - 1}, got {int(targets.min())}..{int(targets.max())}"
            )
        self.images = images
        self.targets = targets.long()
        self.classes = classes
        self.transform = transform
        self.info = info

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(self.images[index]), int(self.targets[index])


class FolderImageDataset(ImageFolder):
    """``ImageFolder`` whose class list is fixed by the caller, so train and test labels agree.

    Args:
        root: folder with one subfolder per class.
        classes: the class names (sorted) that define the label indices; missing ones may be empty.
        transform: maps a PIL image to the model's input.
        info: what the transformed samples look like (size, channels, normalization).
    """

    def __init__(self, root: Path, *, classes: list[str], transform: Compose, info: DatasetInfo) -> None:
        self._fixed_classes = classes
        super().__init__(str(root), transform=transform, allow_empty=True)
        self.info = info

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return self._fixed_classes, {name: i for i, name in enumerate(self._fixed_classes)}


def dataset_info(name: str, root: str | Path = "data") -> DatasetInfo:
    """Native size, channels, classes and normalization of a dataset.

    Args:
        name: one of ``DATASETS``; for ``imagefolder:PATH`` the classes are read from the folder
            (``PATH/train`` if present), the size is 224 px and the channels 3 (ImageNet statistics).
        root: data root; unused by the names above, accepted so that both functions take the same
            arguments.

    Returns:
        The dataset's ``DatasetInfo``.
    """
    if name.startswith(_IMAGEFOLDER_PREFIX):
        classes = _imagefolder_classes(_imagefolder_path(name))
        return DatasetInfo(name, len(classes), 224, 3, _IMAGENET_MEAN, _IMAGENET_STD)
    if name not in _NATIVE:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return _NATIVE[name]


def build_dataset(
    name: str,
    *,
    split: Literal["train", "val", "test"] = "train",
    img_size: int | None = None,
    in_chans: int | None = None,
    augment: bool = False,
    root: str | Path = "data",
    download: bool = True,
) -> Dataset[tuple[Tensor, int]]:
    """A dataset of ``(image, label)``: float32 ``(in_chans, img_size, img_size)`` normalized, int.

    The returned dataset has ``info`` (a ``DatasetInfo`` of the transformed samples, with the mean and
    std actually used), ``classes`` and ``targets``.

    Args:
        name: one of ``DATASETS`` (``imagefolder:PATH`` with a real path).
        split: ``"train"``, ``"val"`` or ``"test"``. ``val`` is a fixed, seeded, stratified ``VAL_FRACTION``
            of the original train split, and ``train`` is the rest: tune on ``val``, report on ``test``.
        img_size: output side in pixels; default the native one. Other sizes are resized (bilinear,
            antialias). ``synthetic`` is generated at this size instead.
        in_chans: output channels; default the native ones. Gray is repeated, RGB averaged to 1.
        augment: light training augmentation: random crop with padding, plus a horizontal flip except
            for ``digits`` and ``synthetic``. Randomness comes from torch's RNG.
        root: folder for torchvision datasets (``cifar10``, ``cifar100``, the ``fashion-mnist`` fallback).
        download: let torchvision download a dataset missing from ``root`` (needs internet).

    Returns:
        The dataset.

    Raises:
        ValueError: unknown name, bad split, size or channels, or a corrupt data file.
        FileNotFoundError: the data is not on disk and could not be downloaded.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    native = dataset_info(name, root)
    img_size = native.img_size if img_size is None else img_size
    in_chans = native.in_chans if in_chans is None else in_chans
    if img_size < 1 or in_chans < 1:
        raise ValueError(f"img_size and in_chans must be positive, got {img_size} and {in_chans}")
    info = _converted_info(native, img_size=img_size, in_chans=in_chans)
    transform = ImageTransform(
        img_size=img_size,
        in_chans=in_chans,
        mean=info.mean,
        std=info.std,
        augment=augment,
        hflip=name not in _NO_HFLIP,
    )
    source = "test" if split == "test" else "train"
    if name.startswith(_IMAGEFOLDER_PREFIX):
        dataset = _build_imagefolder(_imagefolder_path(name), split=source, transform=transform, info=info)
        if split == "test":
            return dataset
        return _Subset(dataset, holdout_indices(dataset.targets, split))

    if name == "fashion-mnist":
        images, targets, classes = _load_fashion_mnist(source, root=Path(root), download=download)
    elif name in ("cifar10", "cifar100"):
        images, targets, classes = _load_cifar(name, source, root=Path(root), download=download)
    elif name == "digits":
        images, targets, classes = _load_digits(source)
    else:
        images, targets, classes = _make_synthetic(source, img_size=img_size)
    if len(classes) != native.num_classes:
        raise ValueError(f"{name}: expected {native.num_classes} class names, got {len(classes)}")
    if split != "test":
        index = torch.from_numpy(holdout_indices(targets, split))
        images, targets = images[index], targets[index]
    logger.info("%s/%s: %d images %s", name, split, len(images), tuple(images.shape[1:]))
    return TensorImageDataset(images, targets, classes=classes, transform=transform, info=info)


def holdout_indices(targets: Tensor | list[int], split: str) -> np.ndarray:
    """Sorted indices of ``split`` (``train`` or ``val``) within an original train split of ``targets``.

    A stratified ``VAL_FRACTION`` of every class (at least one image where a class has two or more) goes to
    ``val``, drawn with a fixed seed, so the same images are held out in every run and on every machine.
    """
    labels = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng(_VAL_SEED)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, round(len(members) * VAL_FRACTION)) if len(members) > 1 else 0
        val.append(rng.permutation(members)[:count])
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[np.concatenate(val) if val else []] = True
    return np.flatnonzero(is_val if split == "val" else ~is_val)


class _Subset(torch.utils.data.Subset):
    """``Subset`` that keeps the dataset's ``info``, ``classes`` and ``targets``."""

    def __init__(self, dataset: FolderImageDataset, indices: np.ndarray) -> None:
        super().__init__(dataset, indices.tolist())
        self.info = dataset.info
        self.classes = dataset.classes
        self.targets = [dataset.targets[i] for i in self.indices]


def make_loader(
    dataset: Dataset[tuple[Tensor, int]],
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
    num_workers: int = 0,
    sampler: Sampler[int] | None = None,
) -> DataLoader[tuple[Tensor, int]]:
    """A DataLoader whose order is reproducible from ``seed``.

    The seeded generator fixes the shuffle order and the workers' torch seeds (hence augmentation
    with ``num_workers > 0``); with ``num_workers=0`` augmentation draws from the global torch RNG,
    so seed it with ``torch.manual_seed`` too.

    Args:
        dataset: the dataset.
        batch_size: samples per batch.
        shuffle: shuffle every epoch; must be False with a ``sampler`` (shuffle in the sampler).
        seed: seed of the loader's generator.
        drop_last: drop the last incomplete batch.
        num_workers: worker processes; 0 loads in the main process.
        sampler: optional sampler, e.g. a ``DistributedSampler``.

    Returns:
        The DataLoader.
    """
    if sampler is not None and shuffle:
        raise ValueError(
            "pass shuffle=False with a sampler; let the sampler shuffle (e.g. DistributedSampler)"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def _converted_info(native: DatasetInfo, *, img_size: int, in_chans: int) -> DatasetInfo:
    """``native`` with the size, channels and normalization after channel conversion."""
    mean, std = native.mean, native.std
    if in_chans != native.in_chans:
        if native.in_chans == 1:
            mean, std = mean * in_chans, std * in_chans
        elif in_chans == 1:
            # The mean of the averaged channel is exact; the averaged std is an upper bound, close enough.
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        else:
            raise ValueError(
                f"{native.name} has {native.in_chans} channels; in_chans can be {native.in_chans} or 1, "
                f"got {in_chans}"
            )
    return replace(native, img_size=img_size, in_chans=in_chans, mean=mean, std=std)


# ---- fashion-mnist ----


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Read a gzipped idx file of unsigned bytes with ``ndim`` dimensions, checking magic and size."""
    try:
        with gzip.open(path, "rb") as f:
            raw = bytearray(f.read())  # writable, so torch.from_numpy does not warn
    except (OSError, EOFError) as err:
        raise ValueError(
            f"{path} is truncated or corrupt (gzip: {err}); reinstall or re-download it"
        ) from err
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise ValueError(f"{path} is truncated or corrupt: {len(raw)} bytes, shorter than its header")
    magic, *dims = struct.unpack(f">{1 + ndim}I", raw[:header])
    if magic != 0x0800 | ndim:  # 0x08: unsigned byte data, then the number of dimensions
        raise ValueError(f"{path} is not an idx file of {ndim}-d unsigned bytes (magic {magic:#010x})")
    if len(raw) != header + math.prod(dims):
        raise ValueError(
            f"{path} is truncated or corrupt: shape {tuple(dims)} needs {header + math.prod(dims)} bytes, "
            f"the file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_fashion_mnist(split: str, *, root: Path, download: bool) -> tuple[Tensor, Tensor, list[str]]:
    image_path, label_path = (FASHION_MNIST_DIR / f for f in _FASHION_MNIST_FILES[split])
    if image_path.is_file() and label_path.is_file():
        images, labels = _read_idx(image_path, ndim=3), _read_idx(label_path, ndim=1)
        if len(images) != len(labels):
            raise ValueError(
                f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels"
            )
        return (
            torch.from_numpy(images)[:, None],
            torch.from_numpy(labels).long(),
            list(_FASHION_MNIST_CLASSES),
        )

    logger.info("Fashion-MNIST not in %s, trying torchvision in %s", FASHION_MNIST_DIR, root)
    try:
        tv = FashionMNIST(str(root), train=split == "train", download=download)
    except (RuntimeError, OSError) as err:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} split not found. Tried {image_path}, {label_path} and "
            f"{root / 'FashionMNIST' / 'raw'} (download={download}: {err}). Install Debian's package with "
            "`apt-get install dataset-fashion-mnist`, or go online and pass download=True."
        ) from err
    return tv.data[:, None], tv.targets.long(), list(tv.classes)


# ---- cifar10 / cifar100 ----

_CIFAR = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def _load_cifar(name: str, split: str, *, root: Path, download: bool) -> tuple[Tensor, Tensor, list[str]]:
    """Read CIFAR's python-pickle batches ourselves: torchvision's loader insists on the md5 of the
    official files, which would reject a user-prepared folder in the same format."""
    tv_cls = _CIFAR[name]  # torchvision's file names, URL and checksum of the archive
    folder = root / tv_cls.base_folder
    batch_files = [folder / f for f, _md5 in (tv_cls.train_list if split == "train" else tv_cls.test_list)]
    meta_file = folder / tv_cls.meta["filename"]
    needed = [*batch_files, meta_file]
    missing = [p for p in needed if not p.is_file()]
    expected = (
        f"expected the folder {folder} with {', '.join(p.name for p in needed)} in CIFAR's python format "
        f"(the extracted {tv_cls.filename})"
    )
    if missing and download:
        logger.info("%s not found in %s, downloading %s", name, folder, tv_cls.url)
        try:
            download_and_extract_archive(tv_cls.url, str(root), filename=tv_cls.filename, md5=tv_cls.tgz_md5)
        except (OSError, RuntimeError) as err:
            raise FileNotFoundError(f"{name} not found: {expected}; the download failed: {err}") from err
        missing = [p for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name} not found: {expected}; missing {', '.join(p.name for p in missing)}. "
            "Pass download=True to fetch it (needs internet), or put the extracted files there."
        )

    data, labels = [], []
    for path in batch_files:
        entry = _unpickle(path)
        batch = np.asarray(entry.get("data"))
        batch_labels = entry.get("labels", entry.get("fine_labels"))
        if batch.dtype != np.uint8 or batch.ndim != 2 or batch.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{path}: 'data' must be uint8 of shape (N, 3072), got {batch.dtype} {batch.shape}"
            )
        if batch_labels is None or len(batch_labels) != len(batch):
            raise ValueError(f"{path}: needs 'labels' or 'fine_labels' with one label per row of 'data'")
        data.append(batch)
        labels.extend(batch_labels)
    names = _unpickle(meta_file).get(tv_cls.meta["key"])
    if names is None:
        raise ValueError(f"{meta_file}: missing {tv_cls.meta['key']!r}")
    classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    images = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))  # rows are R, G, B planes
    return images, torch.tensor(labels, dtype=torch.long), classes


def _unpickle(path: Path) -> dict[str, object]:
    """Load one CIFAR pickle (trusted files only: pickle runs code) with its keys as ``str``."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")  # latin1 reads the original Python 2 pickles
    except Exception as err:  # pickle raises many types on bad input
        raise ValueError(f"{path} is not a readable CIFAR pickle ({type(err).__name__}: {err})") from err
    if not isinstance(entry, dict):
        raise ValueError(f"{path} must hold a dict, got {type(entry).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


# ---- digits / synthetic ----


def _load_digits(split: str) -> tuple[Tensor, Tensor, list[str]]:
    # Imported here: scikit-learn is slow to import and only this dataset needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_index, test_index = train_test_split(
        index, test_size=0.2, stratify=digits.target, random_state=_DIGITS_SEED
    )
    index = np.sort(train_index if split == "train" else test_index)
    images = np.rint(digits.images[index] * (255 / 16)).astype(np.uint8)  # 0..16 gray levels -> 0..255
    images = torch.from_numpy(images)[:, None]
    return images, torch.from_numpy(digits.target[index]).long(), [str(d) for d in range(10)]


def _make_synthetic(split: str, *, img_size: int) -> tuple[Tensor, Tensor, list[str]]:
    """Noisy dark images with a bright square whose grid cell is the class."""
    grid, num_classes = _SYNTHETIC_GRID, _NATIVE["synthetic"].num_classes
    if img_size < grid:
        raise ValueError(f"synthetic images need img_size >= {grid}, got {img_size}")
    n, cell = _SYNTHETIC_SIZES[split], img_size // grid
    g = torch.Generator().manual_seed(_SYNTHETIC_SEEDS[split])
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    pixels = torch.arange(img_size)
    top, left = (labels // grid * cell)[:, None], (labels % grid * cell)[:, None]
    rows = (pixels >= top) & (pixels < top + cell)  # (n, S)
    cols = (pixels >= left) & (pixels < left + cell)  # (n, S)
    patch = (rows[:, :, None] & cols[:, None, :]).float()  # (n, S, S)
    x = 0.2 + 0.6 * patch + 0.1 * torch.randn(n, img_size, img_size, generator=g)
    images = x.clamp_(0, 1).mul_(255).round_().to(torch.uint8)[:, None]
    return images, labels, [f"cell_{c}" for c in range(num_classes)]


# ---- imagefolder ----


def _imagefolder_path(name: str) -> Path:
    if not name[len(_IMAGEFOLDER_PREFIX) :]:
        raise ValueError("imagefolder needs a path: imagefolder:PATH")
    path = Path(name[len(_IMAGEFOLDER_PREFIX) :]).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"imagefolder path {path} does not exist or is not a folder; expected PATH/<class>/<image> "
            "or PATH/train/<class>/<image> with PATH/val (or PATH/test) alongside"
        )
    return path


def _imagefolder_split_dir(path: Path, split: str) -> Path:
    """``PATH/train`` or ``PATH/val|test`` when the folder has split subfolders, else ``PATH`` itself."""
    candidates = ("train",) if split == "train" else ("val", "test")
    for sub in candidates:
        if (path / sub).is_dir():
            return path / sub
    if any((path / sub).is_dir() for sub in ("train", "val", "test")):
        raise FileNotFoundError(
            f"{path} has split subfolders but no {' or '.join(candidates)} for split={split!r}"
        )
    logger.warning("%s has no train/val/test subfolders: train and test are the same images", path)
    return path


def _imagefolder_classes(path: Path) -> list[str]:
    classes, _ = find_classes(_imagefolder_split_dir(path, "train"))
    return classes


def _build_imagefolder(
    path: Path, *, split: str, transform: ImageTransform, info: DatasetInfo
) -> FolderImageDataset:
    classes = _imagefolder_classes(path)
    split_dir = _imagefolder_split_dir(path, split)
    extra = sorted(set(find_classes(split_dir)[0]) - set(classes))
    if extra:
        raise ValueError(f"{split_dir} has classes missing from the train folder: {', '.join(extra)}")
    dataset = FolderImageDataset(
        split_dir, classes=classes, transform=Compose([PILToTensor(), transform]), info=info
    )
    logger.info("%s/%s: %d images in %d classes", info.name, split, len(dataset), len(classes))
    return dataset
