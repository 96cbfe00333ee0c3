"""DataModules: synthetic, digits (scikit-learn's bundled 8x8 digits, the embedded default),
cifar10 / cifar100 (torchvision), imagefolder (the ImageNet layout, with the paper's augmentation).

Every DataModule tells the model its `num_classes`, `in_chans` and `img_size`, keeps a fixed train/val
split (seeded by `split_seed` where it draws one), and shuffles the training set by (seed, epoch) with its
own generator, so that a run resumed from a checkpoint sees the same batches as an uninterrupted one
(one saved mid-epoch too: the checkpoint holds how many batches that epoch had trained, and the resumed
epoch's order starts after them).
`seed` (the shuffling, and the loader workers' random streams: their augmentation) is the run's
`seed_everything` unless given, so that runs of other seeds (a sweep's) see other batches and
augmentations of the same split. Problems with the data
raise `DataError` (one line naming the path) before training starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """The data cannot be used: missing, empty or unreadable (the message names the path)."""


def _check_loader(*, batch_size: int = 1, num_workers: int = 0, img_size: int = 1) -> None:
    """DataError naming the first of the loader's options out of its range."""
    for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("img_size", img_size, 1)):
        if value < least:
            raise DataError(f"data.{name}: {value} must be >= {least}")


class ResumableSampler(DistributedSampler):
    """The training set's DistributedSampler (seeded, shuffled by epoch), which can start its first pass
    `skip` samples in: where a run resumed mid-epoch, after the batches that epoch had trained."""

    skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ImageDataModule(L.LightningDataModule):
    """Image data for training and validation: one of the subclasses below (--data.help NAME lists its options).

    Shared loaders. Subclasses set `num_classes`, `in_chans`, `mean`, `std`, and the datasets.

    Args:
        batch_size: images per device and step
        num_workers: DataLoader worker processes
        img_size: the side of the (square) images the model sees
        seed: of the shuffling and the loader workers' augmentation (null: the run's seed_everything)
    """

    num_classes: int
    in_chans: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __init__(self, *, batch_size: int = 64, num_workers: int = 0, img_size: int = 224,
                 seed: int | None = None) -> None:
        super().__init__()
        _check_loader(batch_size=batch_size, num_workers=num_workers, img_size=img_size)
        self.batch_size, self.num_workers, self.img_size, self.seed = batch_size, num_workers, img_size, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._resume: dict[str, int] = {}  # the epoch and the batches it had trained, of a checkpoint mid-epoch

    def state_dict(self) -> dict[str, int]:
        """Where in its epoch the training was (saved in checkpoints): the epoch and the batches it had
        trained, where the checkpoint is saved mid-epoch (at an epoch's end, stopped early or not, Lightning
        resumes with the next epoch: nothing)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        epochs, done = trainer.fit_loop.epoch_progress.current, trainer.fit_loop.epoch_loop.batch_progress.current.processed
        mid_epoch = epochs.processed < epochs.started and 0 < done < trainer.num_training_batches
        return {"epoch": trainer.current_epoch, "batches": done} if mid_epoch else {}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = dict(state_dict)

    @classmethod
    def describe(cls, **init_args) -> dict[str, int]:
        """What the model needs to know (num_classes, img_size, in_chans), from init args alone (the
        loader's checked: a sweep plans with this, before any DataModule is made)."""
        _check_loader(**{k: init_args[k] for k in ("batch_size", "num_workers", "img_size") if k in init_args})
        return {"num_classes": init_args.get("num_classes") or cls.num_classes, "img_size": init_args["img_size"],
                "in_chans": init_args.get("channels") or cls.in_chans}

    @classmethod
    def check(cls, **init_args) -> str | None:
        """Raise DataError where the data these init args name are not there (folders and file names
        only, nothing decoded): what a sweep checks before it trains. Else what tells these data from
        others that the init args leave open (a sweep's fingerprint holds it, and leaves the root out),
        or None where the init args say it all. Default: nothing to check, nothing to tell."""
        return None

    def loader_seed(self) -> int:
        """`seed`, else the run's (Lightning's seed_everything sets PL_GLOBAL_SEED; `dat-lab train` writes
        it into the config), else 0."""
        return self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        trainer, seed = self.trainer, self.loader_seed()
        ranks, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        largest, smallest = math.ceil(len(dataset) / ranks), len(dataset) // ranks  # the ranks' shares, unrepeated
        if train:
            sampler = ResumableSampler(dataset, num_replicas=ranks, rank=rank, shuffle=True, seed=seed, drop_last=True)
        elif ranks > 1 and math.ceil(largest / self.batch_size) == math.ceil(smallest / self.batch_size):
            # each image validated once (Lightning's DistributedSampler repeats some to give every rank as many:
            # their metrics counted twice), where every rank's share makes as many batches: a rank with fewer
            # would validate alone (a limit_val_batches fraction left it none)
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=ranks, rank=rank, shuffle=False)
        else:
            sampler = None
        if train and self._resume:  # resumed mid-epoch (restored before the loader is made): that
            # epoch's order, without the batches it had trained (Lightning sets the epoch only after its first batch)
            sampler.set_epoch(self._resume["epoch"])
            sampler.skip, self._resume = self._resume["batches"] * self.batch_size, {}
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=train,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def _split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, val) index split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


class SyntheticDataModule(ImageDataModule):
    """Random images and labels of any size, for tests and throughput runs.

    Args:
        num_classes: labels drawn from range(num_classes)
        channels: image channels
        train_samples: training images
        val_samples: validation images
        split_seed: of the images and labels drawn
    """

    def __init__(self, *, num_classes: int = 10, channels: int = 3, train_samples: int = 256, val_samples: int = 64,
                 batch_size: int = 32, num_workers: int = 0, img_size: int = 224, seed: int | None = None,
                 split_seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, img_size=img_size, seed=seed)
        self.num_classes, self.in_chans, self.split_seed = num_classes, channels, split_seed
        self.mean, self.std = (0.0,) * channels, (1.0,) * channels
        self.sizes = (train_samples, val_samples)

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(self.split_seed)
        n = sum(self.sizes)
        x = torch.randn(n, self.in_chans, self.img_size, self.img_size, generator=g)
        y = torch.randint(0, self.num_classes, (n,), generator=g)
        self.train_set = TensorDataset(x[: self.sizes[0]], y[: self.sizes[0]])
        self.val_set = TensorDataset(x[self.sizes[0]:], y[self.sizes[0]:])


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled 8x8 handwritten digits: 1,797 real images, 10 classes, no download.

    Upsampled bilinearly to img_size, with a fixed seeded train/val split.

    Args:
        val_fraction: share of the images held out for validation, in (0, 1)
        channels: the gray image repeated over this many channels
        split_seed: of the train/val split (the same for every run seed: a sweep's seeds validate alike)
    """

    num_classes = 10

    def __init__(self, *, val_fraction: float = 0.2, channels: int = 1, batch_size: int = 64, num_workers: int = 0,
                 img_size: int = 32, seed: int | None = None, split_seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, img_size=img_size, seed=seed)
        self.val_fraction, self.in_chans, self.split_seed = val_fraction, channels, split_seed
        self.mean, self.std = (0.3,) * channels, (0.4,) * channels
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction: {val_fraction} must be in (0, 1)")

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
        x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        x = ((x - self.mean[0]) / self.std[0]).expand(-1, self.in_chans, -1, -1).contiguous()
        y = torch.tensor(digits.target, dtype=torch.long)
        train, val = _split(len(y), self.val_fraction, self.split_seed)
        self.train_set, self.val_set = TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 through torchvision, downloaded in prepare_data when the machine is online.

    Args:
        root: folder holding the dataset (or the archive, extracted there)
        download: download into root when missing
    """

    num_classes = 10
    archive, folder = "cifar-10-python.tar.gz", "cifar-10-batches-py"
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def __init__(self, *, root: str = "data", download: bool = True, batch_size: int = 128, num_workers: int = 2,
                 img_size: int = 32, seed: int | None = None) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, img_size=img_size, seed=seed)
        self.root, self.download = root, download

    @classmethod
    def _torchvision(cls) -> type:
        from torchvision import datasets

        return datasets.CIFAR10 if cls.num_classes == 10 else datasets.CIFAR100

    def _dataset(self, train: bool, transform=None, download: bool = False):
        return self._torchvision()(self.root, train=train, transform=transform, download=download)

    @classmethod
    def check(cls, **init_args) -> str | None:
        root, dataset = init_args.get("root", "data"), cls._torchvision()
        if init_args.get("download", True):  # may download: known only in prepare_data
            return None
        folder = Path(os.path.abspath(root), cls.folder)
        if not folder.is_dir():
            raise DataError(f"{cls.__name__}: no {cls.folder} under {folder.parent} and download is off: "
                            f"put the extracted {cls.archive} there, or set download: true")
        missing = [name for name, _ in dataset.train_list + dataset.test_list if not (folder / name).is_file()]
        if missing:
            raise DataError(f"{folder}: no {missing[0]} in it (a partial extraction of {cls.archive}?)")
        return None  # the class says which dataset

    def prepare_data(self) -> None:
        made = not os.path.lexists(self.root)
        try:
            for train in (True, False):
                self._dataset(train, download=self.download)
        except (OSError, RuntimeError) as err:  # offline (URLError is an OSError) or not found
            if made:  # the folder torchvision made for the download, if empty (another process may fill it)
                with contextlib.suppress(OSError):
                    os.rmdir(self.root)
            raise DataError(f"{type(self).__name__}: no dataset under {os.path.abspath(self.root)} and no download "
                            f"({type(err).__name__}): put {self.archive} there, or its extracted folder") from None

    def setup(self, stage: str | None = None) -> None:
        from torchvision import transforms as T

        resize = [T.Resize(self.img_size)] if self.img_size != 32 else []
        normalize = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        train_tf = T.Compose(resize + [T.RandomCrop(self.img_size, padding=self.img_size // 8),
                                       T.RandomHorizontalFlip()] + normalize)
        self.train_set = self._dataset(True, train_tf)
        self.val_set = self._dataset(False, T.Compose(resize + normalize))


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 through torchvision."""

    num_classes = 100
    archive, folder = "cifar-100-python.tar.gz", "cifar-100-python"
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class ImageFolderDataModule(ImageDataModule):
    """The ImageNet layout: root/train/<class>/*.jpg and root/val/<class>/*.jpg.

    With the paper's augmentation through timm's create_transform (RandAugment, random erasing;
    bicubic eval crop).

    Args:
        root: folder holding train/ and val/
        num_classes: expected number of class folders (null: count them)
        auto_augment: timm's auto-augment policy (null: none)
        color_jitter: timm's color jitter strength
        re_prob: random-erasing probability
        crop_pct: evaluation center-crop fraction
        interpolation: resize interpolation
        verify_images: open every image before training, naming the first unreadable one
    """

    def __init__(self, *, root: str, num_classes: int | None = None, batch_size: int = 128, num_workers: int = 8,
                 img_size: int = 224,
                 seed: int | None = None, auto_augment: str | None = "rand-m9-mstd0.5-inc1", color_jitter: float = 0.4,
                 re_prob: float = 0.25, crop_pct: float = 0.875, interpolation: str = "bicubic",
                 verify_images: bool = True) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, img_size=img_size, seed=seed)
        self.root = Path(root)
        self.classes = _layout(self.root, num_classes)
        self.num_classes = len(self.classes)
        self.transform_args = dict(auto_augment=auto_augment, color_jitter=color_jitter, re_prob=re_prob,
                                   crop_pct=crop_pct, interpolation=interpolation)
        self.verify_images = verify_images

    @classmethod
    def describe(cls, **init_args) -> dict[str, int]:
        if not init_args.get("num_classes"):  # count the class folders
            init_args["num_classes"] = len(_class_folders(Path(init_args["root"]) / "train"))
        return super().describe(**init_args)

    @classmethod
    def check(cls, **init_args) -> str | None:
        """The layout checked; the class folders' count, first and last names and a hash of all names."""
        if init_args.get("root") is None:  # (a subclass may name its folder otherwise)
            return None
        classes = _layout(Path(init_args["root"]), init_args.get("num_classes"))
        digest = hashlib.sha256("\n".join(classes).encode("utf-8", "surrogateescape")).hexdigest()[:16]  # any name
        return f"{len(classes)} class folders {classes[0]}..{classes[-1]}, names sha256 {digest}"

    def setup(self, stage: str | None = None) -> None:
        from timm.data import create_transform
        from torchvision.datasets import ImageFolder

        a = self.transform_args
        train_tf = create_transform(self.img_size, is_training=True, auto_augment=a["auto_augment"],
                                    color_jitter=a["color_jitter"], re_prob=a["re_prob"], re_mode="pixel",
                                    interpolation=a["interpolation"], mean=self.mean, std=self.std)
        val_tf = create_transform(self.img_size, is_training=False, crop_pct=a["crop_pct"],
                                  interpolation=a["interpolation"], mean=self.mean, std=self.std)
        self.train_set = ImageFolder(str(self.root / "train"), transform=train_tf, loader=_load_image)
        self.val_set = ImageFolder(str(self.root / "val"), transform=val_tf, loader=_load_image)
        if self.verify_images:
            _verify([p for p, _ in self.train_set.samples + self.val_set.samples], self.num_workers)


def _layout(root: Path, num_classes: int | None) -> list[str]:
    """The class names of an ImageNet-layout root: train and val with the same class folders, each with
    images, as many as num_classes (when given); else DataError naming the path (absolute)."""
    root = Path(os.path.abspath(root))
    classes = _class_folders(root / "train")
    if (val := _class_folders(root / "val")) != classes:
        only = lambda a, b, where: [f"{c} only in {where}" for c in sorted(set(a) - set(b))]  # noqa: E731
        differ = only(val, classes, "val") + only(classes, val, "train")
        raise DataError(f"{root / 'val'}: class folders differ from {root / 'train'}'s ({', '.join(differ[:3])}"
                        f"{f', {len(differ) - 3} more' if len(differ) > 3 else ''})")
    if num_classes is not None and num_classes != len(classes):
        raise DataError(f"{root / 'train'}: {len(classes)} class folders, but num_classes is {num_classes}")
    return classes


def _class_folders(path: Path) -> list[str]:
    if not path.is_dir():
        raise DataError(f"{path}: no such folder (expected class folders of images)")
    classes = sorted(d.name for d in os.scandir(path) if d.is_dir())
    if not classes:
        raise DataError(f"{path}: no class folders in it")
    for c in classes:
        if not any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(path / c)):
            raise DataError(f"{path / c}: no images in it (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return classes


def _load_image(path: str):
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except OSError as err:
        raise DataError(f"{path}: unreadable image ({err})") from None


def _verify(paths: list[str], workers: int) -> None:
    """Raise DataError naming the first image PIL cannot read."""
    from PIL import Image

    def check(path: str) -> str | None:
        try:
            with Image.open(path) as image:
                image.verify()
            return None
        except Exception as err:  # PIL raises many kinds
            return f"{path}: unreadable image ({err})"

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for problem in pool.map(check, paths, chunksize=64):
            if problem:
                raise DataError(problem)

