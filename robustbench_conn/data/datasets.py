"""Datasets by name: CIFAR-10/100 and SVHN (torchvision), npz arrays, ImageFolder, and the embedded digits.

Small datasets are held in memory as one uint8 NHWC tensor (:class:`ArrayDataset`), so a training step indexes a
batch directly instead of collating 512 single images; ImageFolder (ImageNet layout) stays on disk.
"""
from __future__ import annotations

import glob
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["DataError", "ArrayDataset", "get_dataset", "load_npz", "DATASETS", "check_num_classes"]

DATASETS = ("cifar10", "cifar100", "svhn", "npz", "imagefolder", "digits")
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "digits": 10}


class DataError(ValueError):
    """Data that cannot be used; the message names the file and what is wrong."""


@dataclass
class ArrayDataset(Dataset):
    """Images as a uint8 tensor (N, H, W, C) with int64 labels; items are float CHW in [0, 1]."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].permute(2, 0, 1).float().div_(255), int(self.labels[index])

    def batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch as float NCHW in [0, 1] and int64 labels, without per-item collation."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[idx].permute(0, 3, 1, 2).float().div_(255)
        return images.contiguous(), self.labels[idx]

    def subset(self, indices: torch.Tensor | Sequence[int]) -> "ArrayDataset":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ArrayDataset(self.images[idx], self.labels[idx], self.num_classes, self.source)

    @staticmethod
    def concat(parts: Sequence["ArrayDataset"], source: str | None = None) -> "ArrayDataset":
        shapes = {tuple(p.images.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise DataError(f"cannot mix images of shapes {sorted(shapes)} ({', '.join(p.source for p in parts)}).")
        return ArrayDataset(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                            max(p.num_classes for p in parts), source or "+".join(p.source for p in parts))


def check_num_classes(dataset, num_classes: int) -> None:
    """Refuse a dataset whose classes do not fit a model with ``num_classes`` outputs."""
    have = getattr(dataset, "num_classes", None)
    if have is not None and have != num_classes:
        raise DataError(f"{getattr(dataset, 'source', 'the dataset')} has {have} classes but the model has "
                        f"{num_classes} outputs: build the model with num_classes={have}.")


def _describe_bad_file(path: Path) -> str | None:
    if not path.exists():
        return f"{path} does not exist"
    if path.is_dir():
        return f"{path} is a directory, not an npz file"
    size = path.stat().st_size
    if size == 0:
        return f"{path} is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return f"{path} is an HTML page, not an npz file (a failed download?)"
    if not zipfile.is_zipfile(path):
        return f"{path} is not an npz archive (truncated or not an npz file?)"
    return None


def load_npz(path: str | os.PathLike, num_classes: int | None = None) -> ArrayDataset:
    """Load an npz with ``image`` (uint8 N x H x W x C, C = 1 or 3) and ``label`` (integer N) arrays.

    This is the layout of the published generated-data sets for adversarial training. ``num_classes`` defaults to
    ``max(label) + 1``; labels must lie in ``[0, num_classes)``.
    """
    path = Path(path)
    problem = _describe_bad_file(path)
    if problem:
        raise DataError(problem + ".")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            if not {"image", "label"} <= keys:
                raise DataError(f"{path} holds arrays {sorted(keys)}; expected 'image' (uint8 N x H x W x C) "
                                "and 'label' (integer N).")
            image, label = archive["image"], archive["label"]
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path} could not be read as npz (truncated?): {err}.") from None
    if image.dtype != np.uint8:
        raise DataError(f"{path}: 'image' has dtype {image.dtype}; expected uint8 pixels in 0..255.")
    if image.ndim != 4 or image.shape[-1] not in (1, 3):
        raise DataError(f"{path}: 'image' has shape {image.shape}; expected N x H x W x C with C = 1 or 3 (HWC).")
    if not np.issubdtype(label.dtype, np.integer):
        raise DataError(f"{path}: 'label' has dtype {label.dtype}; expected integer class indices.")
    if label.ndim != 1 or len(label) != len(image):
        raise DataError(f"{path}: 'label' has shape {label.shape} for {len(image)} images; expected ({len(image)},).")
    if len(image) == 0:
        raise DataError(f"{path} holds no images.")
    low, high = int(label.min()), int(label.max())
    classes = num_classes if num_classes is not None else high + 1
    if low < 0 or high >= classes:
        raise DataError(f"{path}: labels span {low}..{high}, outside 0..{classes - 1} for {classes} classes.")
    images = torch.from_numpy(np.ascontiguousarray(image))
    if images.shape[-1] == 1:
        images = images.expand(-1, -1, -1, 3).contiguous()
    return ArrayDataset(images, torch.from_numpy(label.astype(np.int64)), classes, str(path))


def _npz_files(data_dir: str, split: str) -> list[Path]:
    """A file, a comma-separated list of files, or a directory whose ``{split}*.npz`` files are taken in order."""
    if "," in data_dir:
        return [Path(p) for p in data_dir.split(",") if p]
    path = Path(data_dir)
    if path.is_dir():
        files = sorted(Path(p) for p in glob.glob(str(path / f"{split}*.npz")))
        if not files:
            raise DataError(f"no {split}*.npz files in {path}: name them {split}.npz / {split}_0.npz, ... "
                            "or pass the file itself.")
        return files
    return [path]


def _digits(split: str) -> ArrayDataset:
    """scikit-learn's 8x8 digits upsampled to 32x32 RGB; a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16).unsqueeze(1)  # N,1,8,8 in [0,1]
    images = torch.nn.functional.interpolate(images, size=32, mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).expand(-1, -1, -1, 3)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(images))
    idx = order[:cut] if split == "train" else order[cut:]
    return ArrayDataset(images[idx].contiguous(), torch.from_numpy(digits.target).long()[idx], 10, f"digits/{split}")


def _torchvision(name: str, split: str, root: str, download: bool) -> ArrayDataset:
    import torchvision

    names = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN"}
    try:
        if name == "svhn":
            ds = torchvision.datasets.SVHN(root, split=split, download=download)
            images, labels = torch.from_numpy(ds.data).permute(0, 2, 3, 1), torch.from_numpy(ds.labels)
        else:
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            ds = cls(root, train=split == "train", download=download)
            images, labels = torch.from_numpy(ds.data), torch.tensor(ds.targets)
    except Exception as err:  # torchvision raises RuntimeError offline/missing, URLError etc. on a failed download
        how = "the download failed (no network?)" if download else "downloading is off"
        raise DataError(f"{names[name]} was not found under {os.path.abspath(root)} and {how}: put the "
                        f"torchvision files there or pass --data-dir DIR that holds them ({type(err).__name__}).") \
            from None
    return ArrayDataset(images.contiguous(), labels.long(), _NUM_CLASSES[name], f"{name}/{split}")


def _imagefolder(root: str, split: str, image_size: int):
    from torchvision import datasets, transforms

    # ImageNet layouts name the held-out split val/ or test/: the test split takes either.
    names = (split, "val") if split == "test" else (split,)
    found = [Path(root) / name for name in names if (Path(root) / name).is_dir()]
    path = found[0] if found else Path(root)
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist: pass --data-dir with {split}/CLASS/IMAGE files.")
    tf = transforms.Compose([transforms.Resize(int(image_size * 256 / 224)), transforms.CenterCrop(image_size),
                             transforms.ToTensor()])
    try:
        ds = datasets.ImageFolder(str(path), transform=tf)
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"image folder {path} holds no images in CLASS/IMAGE subfolders ({err}).") from None
    ds.num_classes = len(ds.classes)
    ds.source = str(path)
    return ds


def get_dataset(name: str, split: str = "train", data_dir: str | None = None, *, download: bool = True,
                num_classes: int | None = None, image_size: int = 224):
    """A dataset by name for the ``train`` or ``test`` split.

    name: ``cifar10``, ``cifar100``, ``svhn`` (torchvision; downloaded into ``data_dir`` on demand), ``npz``
        (``data_dir`` is a file, comma-separated files, or a folder of ``{split}*.npz``; several files concatenate),
        ``imagefolder`` (``data_dir/{split}/CLASS/IMAGE``; the test split also reads ``data_dir/val``) or
        ``digits`` (embedded, no download).
    Returns an :class:`ArrayDataset` (everything but imagefolder) with ``num_classes`` and ``source``.
    """
    if name not in DATASETS:
        raise DataError(f"dataset {name!r} is unknown: use one of {', '.join(DATASETS)}.")
    if split not in ("train", "test"):
        raise DataError(f"split {split!r} is unknown: use 'train' or 'test'.")
    if name == "digits":
        return _digits(split)
    if data_dir is None:
        if name in ("npz", "imagefolder"):
            raise DataError(f"dataset {name!r} needs --data-dir (a file or folder).")
        data_dir = os.path.join(os.path.expanduser("~"), ".cache", "robustbench_conn", name)
    if name == "npz":
        parts = [load_npz(f, num_classes) for f in _npz_files(data_dir, split)]
        if num_classes is None:  # files of one set may not each hold every class
            classes = max(p.num_classes for p in parts)
            for p in parts:
                p.num_classes = classes
        return parts[0] if len(parts) == 1 else ArrayDataset.concat(parts, source=data_dir)
    if name == "imagefolder":
        return _imagefolder(data_dir, split, image_size)
    return _torchvision(name, split, data_dir, download)
