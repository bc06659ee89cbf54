"""Datasets by name, each giving ``(image, label)`` with the transform the model needs.

Every dataset yields ``image``: float32 ``(in_chans, img_size, img_size)`` normalized with the dataset's
mean/std (the model's with a ``data_config``), and ``label``: int. Names (see ``DATASETS``):

- ``fashion-mnist`` (default): offline from Debian's ``dataset-fashion-mnist`` (``FASHION_MNIST_DIR``),
  else torchvision's download into ``root``.
- ``cluttered-fashion-mnist`` (and its ``translated`` and ``scaled`` variants, options after a colon): a garment at a
  random place on a 56 px canvas among fragments of other garments (``apt_env.data.cluttered``), with Fashion-MNIST's
  statistics, so that a model trained on the centered garments sees the same pixel scale.
- ``cifar10``, ``cifar100``: torchvision's ``CIFAR10`` / ``CIFAR100`` in ``root`` (downloaded when asked).
- ``digits``: scikit-learn's 8x8 digits, a fixed stratified 80/20 split.
- ``synthetic``: seeded images whose class is the location of a bright patch; for tests.
- ``imagefolder:PATH``: torchvision ``ImageFolder`` on ``PATH/train`` and ``PATH/val`` (or ``test``). A folder with
  no split subfolders (``PATH/<class>/<image>``) holds out a fixed, seeded, stratified ``TEST_FRACTION`` of every
  class as ``test`` (logged when built); ``train`` and ``val`` share the rest.

Fixed-size datasets are kept as one uint8 tensor in memory and transformed per item by torchvision's
transforms v2 (``apt_env.data.transforms.build_transform``).

A backbone carries its preprocessing (``apt_env.data.config``): ``dataset_for(pv, name, split)`` builds a dataset as
that backbone sees it; every script reads its data through it.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST, ImageFolder
from torchvision.datasets.folder import find_classes

from apt_env.data.cluttered import ClutteredDataset, ClutterSpec, parse_cluttered
from apt_env.data.config import apt_env_data_config
from apt_env.data.splits import TEST_FRACTION, TEST_SEED, holdout_indices, stratified_holdout
from apt_env.data.transforms import CHANNELS, build_transform, timm_eval_transform

if TYPE_CHECKING:  # a type only: the backbone imports this module
    from apt_env.models.backbone import PrunableViT


__all__ = [
    "DATASETS",
    "DatasetInfo",
    "FASHION_MNIST_DIR",
    "FolderImageDataset",
    "TensorImageDataset",
    "build_dataset",
    "dataset_data_config",
    "dataset_for",
    "dataset_info",
    "make_loader",
]

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = (
    "fashion-mnist",
    "cluttered-fashion-mnist",
    "translated-fashion-mnist",
    "scaled-cluttered-fashion-mnist",
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
_DIGITS_SEED = 0
_SYNTHETIC_SEEDS = {"train": 0, "test": 1}
_SYNTHETIC_SIZES = {"train": 512, "test": 128}
_SYNTHETIC_GRID = 4  # patch positions on a 4x4 grid: room for the 10 classes
_NO_HFLIP = frozenset({"digits", "synthetic"})  # a mirrored digit or patch location changes the class
_LUMA = (0.2989, 0.587, 0.114)  # v2.Grayscale's weights of R, G, B (ITU-R 601-2)


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


def dataset_data_config(name: str, *, img_size: int, in_chans: int, root: str | Path = "data") -> dict[str, Any]:
    """The data config of a backbone trained from scratch on ``name``: this module's transform with the dataset's
    statistics, converted to the model's channels (``build_dataset`` without a data config)."""
    info = _converted_info(dataset_info(name, root), img_size=img_size, in_chans=in_chans)
    return apt_env_data_config((in_chans, img_size, img_size), mean=info.mean, std=info.std)


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
        transform: Callable[[Tensor], Tensor],
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

    def __init__(
        self, root: Path, *, classes: list[str], transform: Callable[[Image.Image], Tensor], info: DatasetInfo
    ) -> None:
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
    spec = parse_cluttered(name)
    if spec is not None:  # the garments' statistics, at the canvas size
        return replace(_NATIVE["fashion-mnist"], name=name, img_size=spec.canvas)
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
    data_config: Mapping[str, Any] | None = None,
) -> Dataset[tuple[Tensor, int]]:
    """A dataset of ``(image, label)``: float32 ``(in_chans, img_size, img_size)`` normalized, int.

    The returned dataset has ``info`` (a ``DatasetInfo`` of the transformed samples, with the mean and
    std actually used), ``classes`` and ``targets``.

    Args:
        name: one of ``DATASETS`` (``imagefolder:PATH`` with a real path).
        split: ``"train"``, ``"val"`` or ``"test"``. ``val`` is a fixed, seeded, stratified ``VAL_FRACTION``
            of the original train split, and ``train`` is the rest: tune on ``val``, report on ``test``.
        img_size: output side in pixels; default the native one (or the data config's). Other sizes are
            resized (bilinear, antialias). ``synthetic`` is generated at this size instead.
        in_chans: output channels, 1 or 3; default the native ones (or the data config's). Gray is
            repeated to RGB, RGB turned to gray by luma (``v2.Grayscale``).
        augment: light training augmentation: random crop with padding, plus a horizontal flip except
            for ``digits`` and ``synthetic``. Randomness comes from torch's RNG.
        root: folder for torchvision datasets (``cifar10``, ``cifar100``, the ``fashion-mnist`` fallback).
        download: let torchvision download a dataset missing from ``root`` (needs internet).
        data_config: a backbone's data config (``PrunableViT.data_config``; ``dataset_for`` passes it), or timm's
            data config of a model, ``timm.data.resolve_data_config(model=model)`` (``preprocessing`` then reads as
            ``"timm"``). The size, channels, mean and std then come from it, and without ``augment`` a ``"timm"``
            config's transform is timm's own eval transform (``timm.data.create_transform``: its resize,
            interpolation and crop). None: the dataset's own statistics, at ``img_size`` and ``in_chans``.

    Returns:
        The dataset.

    Raises:
        ValueError: unknown name, bad split, size, channels or data config, or a corrupt data file.
        FileNotFoundError: the data is not on disk and could not be downloaded.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    native = dataset_info(name, root)
    if data_config is None:
        info = _converted_info(native, img_size=img_size, in_chans=in_chans)
    else:
        info = _data_config_info(native, data_config, img_size=img_size, in_chans=in_chans)
    source = "test" if split == "test" else "train"
    if name.startswith(_IMAGEFOLDER_PREFIX):
        transform = _dataset_transform(info, augment=augment, data_config=data_config)
        return _build_imagefolder(_imagefolder_path(name), split=split, transform=transform, info=info)
    spec = parse_cluttered(name)
    if spec is not None:
        return _build_cluttered(name, spec, split, info=info, augment=augment, root=Path(root), download=download)

    images, targets, classes = _load_tensors(name, source, root=Path(root), download=download, img_size=info.img_size)
    if len(classes) != native.num_classes:
        raise ValueError(f"{name}: expected {native.num_classes} class names, got {len(classes)}")
    if split != "test":
        index = torch.from_numpy(holdout_indices(targets, split))
        images, targets = images[index], targets[index]
    logger.info("%s/%s: %d images %s", name, split, len(images), tuple(images.shape[1:]))
    transform = _dataset_transform(info, augment=augment, data_config=data_config, input_shape=tuple(images.shape[1:]))
    return TensorImageDataset(images, targets, classes=classes, transform=transform, info=info)


def _load_tensors(
    name: str, source: str, *, root: Path, download: bool, img_size: int
) -> tuple[Tensor, Tensor, list[str]]:
    """A named dataset's ``source`` split (``train`` or ``test``) as uint8 images, labels and class names."""
    if name == "fashion-mnist":
        return _load_fashion_mnist(source, root=root, download=download)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, source, root=root, download=download)
    if name == "digits":
        return _load_digits(source)
    return _make_synthetic(source, img_size=img_size)


def dataset_for(
    pv: PrunableViT,
    name: str,
    split: Literal["train", "val", "test"] = "train",
    *,
    augment: bool = False,
    root: str | Path = "data",
    download: bool = True,
) -> Dataset[tuple[Tensor, int]]:
    """``build_dataset`` as backbone ``pv`` sees it: at its size and channels, with its own preprocessing
    (``pv.data_config``), so that no caller can leave it out.

    Args:
        pv: the backbone.
        name, split, augment, root, download: as for ``build_dataset``.
    """
    return build_dataset(name, split=split, augment=augment, root=root, download=download, data_config=pv.data_config)


def _dataset_transform(
    info: DatasetInfo,
    *,
    augment: bool,
    data_config: Mapping[str, Any] | None,
    input_shape: tuple[int, ...] | None = None,
) -> Callable[[Tensor | Image.Image], Tensor]:
    """timm's eval transform for a ``"timm"`` data config, else ``build_transform``."""
    if data_config is not None and data_config.get("preprocessing", "timm") == "timm" and not augment:
        return timm_eval_transform(data_config, in_chans=info.in_chans)
    return build_transform(
        img_size=info.img_size,
        in_chans=info.in_chans,
        mean=info.mean,
        std=info.std,
        augment=augment,
        hflip=info.name not in _NO_HFLIP,
        input_shape=input_shape,
    )


class _Subset(torch.utils.data.Subset):
    """``Subset`` that keeps the dataset's ``info``, ``classes`` and ``targets``."""

    def __init__(self, dataset: FolderImageDataset, indices: np.ndarray) -> None:  # indices: sorted
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
        raise ValueError("pass shuffle=False with a sampler; let the sampler shuffle (e.g. DistributedSampler)")
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


def _converted_info(native: DatasetInfo, *, img_size: int | None, in_chans: int | None) -> DatasetInfo:
    """``native`` with the size, channels and normalization after channel conversion."""
    img_size = native.img_size if img_size is None else img_size
    in_chans = native.in_chans if in_chans is None else in_chans
    if img_size < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    if in_chans not in CHANNELS:
        raise ValueError(
            f"{native.name} has {native.in_chans} channel(s); in_chans can be 1 (gray) or 3 (RGB), got {in_chans}"
        )
    mean, std = native.mean, native.std
    if in_chans > native.in_chans:
        mean, std = mean * in_chans, std * in_chans
    elif in_chans < native.in_chans:
        # The mean of the luma channel is exact; its std is an upper bound (triangle inequality), close enough.
        mean = (sum(w * m for w, m in zip(_LUMA, mean)),)
        std = (sum(w * s for w, s in zip(_LUMA, std)),)
    return replace(native, img_size=img_size, in_chans=in_chans, mean=mean, std=std)


def _data_config_info(
    native: DatasetInfo, data_config: Mapping[str, Any], *, img_size: int | None, in_chans: int | None
) -> DatasetInfo:
    """``native`` with the size, channels and normalization of a timm data config."""
    try:
        chans, height, width = data_config["input_size"]
        mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            "data_config must be timm's data config of the model, timm.data.resolve_data_config(model=model), "
            f"with input_size (C, H, W), mean and std; got {data_config!r}"
        ) from err
    input_size = (chans, height, width)
    if height != width or chans not in CHANNELS:
        raise ValueError(f"the data config's input_size must be square, gray or RGB (1 or 3, S, S); got {input_size}")
    if len(mean) != chans or len(std) != chans:
        raise ValueError(
            f"the data config has input_size {input_size} but {len(mean)} mean and {len(std)} std values. timm "
            "keeps a model's pretrained config when it is built with other in_chans: pass data_config only for "
            "a model that has pretrained weights"
        )
    if img_size not in (None, width) or in_chans not in (None, chans):
        raise ValueError(
            f"img_size={img_size}, in_chans={in_chans} disagree with the data config's input_size {input_size}; "
            "leave them None to take the config's, or resolve it at the model's size: "
            "timm.data.resolve_data_config({'input_size': (C, S, S)}, model=model)"
        )
    return replace(native, img_size=width, in_chans=chans, mean=mean, std=std)


# ---- fashion-mnist ----


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Read a gzipped idx file of unsigned bytes with ``ndim`` dimensions, checking magic and size."""
    try:
        with gzip.open(path, "rb") as f:
            raw = bytearray(f.read())  # writable, so torch.from_numpy does not warn
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} is truncated or corrupt (gzip: {err}); reinstall or re-download it") from err
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
            raise ValueError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
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


def _build_cluttered(
    name: str, spec: ClutterSpec, split: str, *, info: DatasetInfo, augment: bool, root: Path, download: bool
) -> ClutteredDataset:
    """The cluttered task on ``split``'s garments (train and val: the same holdout as ``fashion-mnist``)."""
    if info.img_size != spec.canvas:
        raise ValueError(
            f"{name}: the canvas is {spec.canvas} px but the model takes {info.img_size} px images; pass "
            f"{name.partition(':')[0]}:canvas={info.img_size} or a model of {spec.canvas} px"
        )
    if info.in_chans != 1:
        raise ValueError(f"{name} is gray: the model must take 1 channel, not {info.in_chans}")
    images, targets, classes = _load_fashion_mnist("test" if split == "test" else "train", root=root, download=download)
    if split != "test":
        index = torch.from_numpy(holdout_indices(targets, split))
        images, targets = images[index], targets[index]
    transform = build_transform(
        img_size=spec.canvas, in_chans=1, mean=info.mean, std=info.std, input_shape=(1, spec.canvas, spec.canvas)
    )  # no crop or flip: the placement is the augmentation, and the box stays true
    logger.info("%s/%s: %d images of %d px, %s", name, split, len(images), spec.canvas, spec)
    return ClutteredDataset(
        images, targets, classes=classes, spec=spec, split=split, redraw=augment and split == "train",
        transform=transform, info=info,
    )  # fmt: skip


# ---- cifar10 / cifar100 ----

_CIFAR = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def _load_cifar(name: str, split: str, *, root: Path, download: bool) -> tuple[Tensor, Tensor, list[str]]:
    tv_cls = _CIFAR[name]
    folder = root / tv_cls.base_folder
    try:
        tv = tv_cls(str(root), train=split == "train", download=download)
    except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found or corrupted", or a failed download
        needed = [f for f, _md5 in tv_cls.train_list + tv_cls.test_list] + [tv_cls.meta["filename"]]
        missing = [f for f in needed if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{name} not found: expected the folder {folder} with {', '.join(needed)} (the extracted "
                f"{tv_cls.filename}); missing {', '.join(missing)} (download={download}: {err}). Pass "
                "download=True to fetch it (needs internet), or put the extracted files there."
            ) from err
        raise ValueError(
            f"{folder} fails torchvision's md5 check: a file is corrupt or not from the official "
            f"{tv_cls.filename}. Delete the folder and pass download=True, or extract the archive again."
        ) from err
    images = torch.from_numpy(tv.data).permute(0, 3, 1, 2).contiguous()  # torchvision keeps (N, H, W, C)
    return images, torch.tensor(tv.targets, dtype=torch.long), list(tv.classes)


# ---- digits / synthetic ----


def _load_digits(split: str) -> tuple[Tensor, Tensor, list[str]]:
    # Imported here: scikit-learn is slow to import and only this dataset needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_index, test_index = train_test_split(index, test_size=0.2, stratify=digits.target, random_state=_DIGITS_SEED)
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


def _imagefolder_split_dir(path: Path, split: str) -> Path | None:
    """``PATH/train`` or ``PATH/val|test`` when the folder has split subfolders, else None (no splits)."""
    candidates = ("train",) if split == "train" else ("val", "test")
    for sub in candidates:
        if (path / sub).is_dir():
            return path / sub
    if any((path / sub).is_dir() for sub in _SPLITS):
        raise FileNotFoundError(f"{path} has split subfolders but no {' or '.join(candidates)} for split={split!r}")
    return None


def _imagefolder_classes(path: Path) -> list[str]:
    classes, _ = find_classes(_imagefolder_split_dir(path, "train") or path)
    return classes


def _build_imagefolder(
    path: Path, *, split: str, transform: Callable[[Image.Image], Tensor], info: DatasetInfo
) -> FolderImageDataset | _Subset:
    """``split`` of an image folder: its split subfolder (``val`` held out of ``train``), or held out of the folder
    itself when it has none (``_held_out_of_folder``)."""
    classes = _imagefolder_classes(path)
    split_dir = _imagefolder_split_dir(path, "test" if split == "test" else "train")
    if split_dir is None:
        dataset = FolderImageDataset(path, classes=classes, transform=transform, info=info)
        return _held_out_of_folder(dataset, split)
    extra = sorted(set(find_classes(split_dir)[0]) - set(classes))
    if extra:
        raise ValueError(f"{split_dir} has classes missing from the train folder: {', '.join(extra)}")
    dataset = FolderImageDataset(split_dir, classes=classes, transform=transform, info=info)
    logger.info("%s/%s: %d images in %d classes", info.name, split, len(dataset), len(classes))
    if split == "test":
        return dataset
    return _Subset(dataset, holdout_indices(dataset.targets, split))


def _held_out_of_folder(dataset: FolderImageDataset, split: str) -> _Subset:
    """A folder without split subfolders: a fixed stratified ``TEST_FRACTION`` of it is ``test`` (so that nothing is
    scored on its training images), and ``train`` / ``val`` split the rest as an original train split."""
    is_test = stratified_holdout(dataset.targets, TEST_FRACTION, seed=TEST_SEED)
    if split == "test":
        index = np.flatnonzero(is_test)
        per_class = np.bincount(np.asarray(dataset.targets)[index], minlength=len(dataset.classes))
        logger.info(
            "%s has no train/val/test subfolders: held out %d of its %d images as test (%.0f%% of every class, "
            "seed %d; per class %s)",
            dataset.root, len(index), len(dataset), 100 * TEST_FRACTION, TEST_SEED, per_class.tolist(),
        )  # fmt: skip
        logger.debug("held out as test: %s", [dataset.samples[i][0] for i in index])
    else:
        rest = np.flatnonzero(~is_test)
        index = rest[holdout_indices([dataset.targets[i] for i in rest], split)]
        logger.info("%s/%s: %d images of the folder's %d not held out as test", dataset.root, split, len(index),
                    len(dataset))  # fmt: skip
    return _Subset(dataset, index)
