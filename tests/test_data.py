"""DataModules: splits, shapes, and clear errors before training starts."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from dat_lab.data import (CIFAR100DataModule, DataError, DigitsDataModule, ImageFolderDataModule,
                          SyntheticDataModule)


def test_digits_split_is_fixed_and_seeded(monkeypatch):
    """The split by split_seed; the shuffling by seed, else the run's seed_everything (PL_GLOBAL_SEED)."""
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=1), DigitsDataModule(split_seed=1, img_size=16, channels=3)
    for dm in (a, b, c):
        dm.setup("fit")
    assert len(a.train_set) + len(a.val_set) == 1797 and len(a.val_set) == 359
    assert torch.equal(a.val_set.tensors[1], b.val_set.tensors[1])
    assert not torch.equal(a.val_set.tensors[1], c.val_set.tensors[1])
    first = lambda dm: next(iter(dm.train_dataloader()))[1]  # noqa: E731
    assert not torch.equal(first(a), first(b))
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    unset = DigitsDataModule()
    unset.setup("fit")
    assert unset.loader_seed() == 1 and torch.equal(first(unset), first(b))
    assert a.train_set.tensors[0].shape[1:] == (1, 32, 32) and c.train_set.tensors[0].shape[1:] == (3, 16, 16)
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (64, 1, 32, 32) and y.dtype == torch.long
    with pytest.raises(DataError, match="val_fraction: 1.5 must be in"):
        DigitsDataModule(val_fraction=1.5)


def test_synthetic_any_size():
    dm = SyntheticDataModule(num_classes=3, channels=2, img_size=40, train_samples=10, val_samples=4, batch_size=5)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 2, 40, 40) and int(y.max()) < 3


def _image_folder(root, classes=("cat", "dog"), per_class=2):
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (40, 30), color=(i * 50, 10, 200)).save(root / split / c / f"{i}.jpg")


def test_imagefolder_reads_the_imagenet_layout(tmp_path):
    _image_folder(tmp_path)
    dm = ImageFolderDataModule(root=str(tmp_path), img_size=32, batch_size=2, num_workers=0)
    assert dm.num_classes == 2
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 32, 32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32)


def test_imagefolder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'none' / 'train'}: no such folder"):
        ImageFolderDataModule(root=str(tmp_path / "none"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="train: no class folders in it"):
        ImageFolderDataModule(root=str(tmp_path / "empty"))
    _image_folder(tmp_path / "a")
    (tmp_path / "a" / "val" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "val" / "bird" / "0.png")
    with pytest.raises(DataError, match=r"val: class folders differ from .*train's \(bird only in val\)$"):
        ImageFolderDataModule(root=str(tmp_path / "a"))
    _image_folder(tmp_path / "b")
    for f in (tmp_path / "b" / "train" / "dog").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"train/dog: no images in it"):
        ImageFolderDataModule(root=str(tmp_path / "b"))
    _image_folder(tmp_path / "c")
    bad = tmp_path / "c" / "val" / "cat" / "1.jpg"
    bad.write_bytes(b"not a jpeg")
    dm = ImageFolderDataModule(root=str(tmp_path / "c"), img_size=32)
    with pytest.raises(DataError, match=f"{bad}: unreadable image"):
        dm.setup("fit")


def test_cifar_without_files_or_network_is_one_clear_error(tmp_path):
    dm = CIFAR100DataModule(root=str(tmp_path), download=False)
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert str(tmp_path) in message and "cifar-100-python.tar.gz" in message and "\n" not in message
    with pytest.raises(DataError, match=f"no cifar-100-python under {tmp_path} and download is off"):
        CIFAR100DataModule.check(root=str(tmp_path), download=False)  # what a sweep checks before training
    CIFAR100DataModule.check(root=str(tmp_path), download=True)  # may download: not known before prepare_data
    (tmp_path / "cifar-100-python").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'cifar-100-python'}: no train in it"):
        CIFAR100DataModule.check(root=str(tmp_path), download=False)
    for name in ("train", "test"):
        (tmp_path / "cifar-100-python" / name).touch()
    CIFAR100DataModule.check(root=str(tmp_path), download=False)


def test_a_failed_cifar_download_leaves_no_empty_folder_it_made(tmp_path, monkeypatch):
    """Offline: the root torchvision made for the download goes if it is empty; one with files in it
    (another process's download, say) or that was there stays as it is."""
    from urllib.error import URLError

    from torchvision import datasets

    def offline(root, train, transform=None, download=False):
        Path(root).mkdir(parents=True, exist_ok=True)
        if Path(root).name == "shared":  # another process downloads into it meanwhile
            (Path(root) / "cifar-100-python.tar.gz").write_bytes(b"theirs")
        raise URLError("no network")

    monkeypatch.setattr(datasets, "CIFAR100", offline)
    for root in (tmp_path / "new" / "data", tmp_path / "shared", tmp_path):
        with pytest.raises(DataError, match=f"no dataset under {root} and no download .URLError."):
            CIFAR100DataModule(root=str(root), download=True).prepare_data()
    assert not (tmp_path / "new" / "data").exists() and (tmp_path / "new").is_dir()
    assert (tmp_path / "shared" / "cifar-100-python.tar.gz").read_bytes() == b"theirs"


def test_imagefolder_check_is_the_layout_check_of_its_constructor(tmp_path):
    _image_folder(tmp_path / "ok")
    ImageFolderDataModule.check(root=str(tmp_path / "ok"), num_classes=2)
    with pytest.raises(DataError, match="2 class folders, but num_classes is 3"):
        ImageFolderDataModule.check(root=str(tmp_path / "ok"), num_classes=3)
    with pytest.raises(DataError, match=f"{tmp_path / 'none' / 'train'}: no such folder"):
        ImageFolderDataModule.check(root=str(tmp_path / "none"))


def test_under_ddp_each_validation_image_is_seen_once():
    """Lightning's DistributedSampler gives every rank as many images, repeating some: those were counted
    twice in the metrics. Each rank now validates its share, none repeated, where the shares make as many
    batches on every rank (else Lightning's sampler stays: a rank with fewer batches validated alone)."""
    dm = SyntheticDataModule(img_size=8, train_samples=12, val_samples=7, batch_size=2)
    dm.setup()
    seen = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        seen += list(dm.val_dataloader().sampler)
        assert len(list(dm.train_dataloader().sampler)) == 6  # training: equal shares, as before
    assert sorted(seen) == list(range(7))
    for ranks in (8, 3):  # a rank with no image; ranks of 2 batches and of 1
        dm.trainer = SimpleNamespace(world_size=ranks, global_rank=0)
        assert dm.val_dataloader().sampler.__class__.__name__ == "SequentialSampler"  # (Lightning's then)
