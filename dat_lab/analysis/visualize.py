"""Sampled key positions of a trained DAT on a few images, per deformable stage (the paper's
Figs. 5-7): a checkpoint and images (files, or the digits / synthetic validation set) to PNG and PDF."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import IMAGENET_MEAN, IMAGENET_STD, DigitsDataModule, SyntheticDataModule
from ..figures import sampling_points_figure, save_figure
from ..models import load_checkpoint
from ..outputs import check_output_folder
from .study import AnalysisError

DATASETS = {"digits": DigitsDataModule, "synthetic": SyntheticDataModule}
MAX_COUNT = 32  # images in one figure, a row each


def _from_files(paths: list[str], model: torch.nn.Module) -> tuple[torch.Tensor, tuple, tuple]:
    """Image files through timm's evaluation transform with the model's default crop_pct and
    interpolation (its pretrained_cfg), normalised with ImageNet's mean and std per channel."""
    from PIL import Image
    from timm.data import create_transform

    channels, cfg = model.config.in_chans, model.pretrained_cfg
    mean, std = IMAGENET_MEAN[:channels], IMAGENET_STD[:channels]
    tf = create_transform(model.config.img_size, is_training=False, crop_pct=cfg["crop_pct"],
                          interpolation=cfg["interpolation"], mean=mean, std=std)
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(tf(image.convert("RGB" if channels == 3 else "L")))
        except OSError as err:
            raise AnalysisError(f"{path}: unreadable image ({err})") from None
    return torch.stack(images), mean, std


def default_out(checkpoint: str | Path) -> Path:
    """runs/visualize/<the checkpoint's path, its folders joined by _, without runs/ and its suffix>: a
    folder per checkpoint, so that one checkpoint's figure does not replace another's."""
    path = Path(checkpoint).resolve().with_suffix("")
    parts = path.relative_to(Path.cwd()).parts if path.is_relative_to(Path.cwd()) else path.parts[1:]
    return Path("runs", "visualize", "_".join(parts[1:] if parts[:1] == ("runs",) else parts))


def _checkpoint_file(checkpoint: str) -> None:
    """AnalysisError unless checkpoint is a file; for a folder, naming a checkpoint found in it."""
    path = Path(checkpoint)
    if path.is_dir():
        found = sorted(path.rglob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", len(p.parts), p))
        hint = f"e.g. {found[0]}" if found else "it holds no .ckpt file"
        raise AnalysisError(f"{checkpoint} is a folder; give a checkpoint file, {hint}")
    if not path.is_file():
        raise AnalysisError(f"{checkpoint}: no such checkpoint")


def visualize(checkpoint: str, out: str | Path | None = None, *, images: list[str] | None = None,
              data: str | None = None, count: int | None = None) -> tuple[list[Path], bool]:
    """Write sampling_points.png/.pdf under `out` (default: `default_out(checkpoint)`); return their
    paths and whether they replaced earlier ones. The images: `images`, or the first `count` (default
    4) validation images of `data` (default digits)."""
    _checkpoint_file(checkpoint)
    out = check_output_folder(default_out(checkpoint) if out is None else out, option="--out")
    if images and (data is not None or count is not None):
        raise AnalysisError(f"--{'data' if data is not None else 'count'}: only without --images (the figure shows "
                            "the images given)")
    data, count = data or "digits", 4 if count is None else count
    if not images and data not in DATASETS:
        raise AnalysisError(f"--data: {data!r} is not one of {', '.join(DATASETS)} (or give --images FILE ...)")
    if not 1 <= count <= MAX_COUNT:  # a row of panels an image: more would make a figure no one can open
        raise AnalysisError(f"--count: {count} must be in [1, {MAX_COUNT}]")
    if images and len(images) > MAX_COUNT:
        raise AnalysisError(f"--images: {len(images)} files; at most {MAX_COUNT} in one figure")
    model = load_checkpoint(checkpoint).eval()
    cfg = model.config
    if images:
        x, mean, std = _from_files(images, model)
        names = [Path(p).name for p in images]
    else:
        dm = DATASETS[data](img_size=cfg.img_size, channels=cfg.in_chans)
        dm.setup("validate")
        samples = [dm.val_set[i] for i in range(min(count, len(dm.val_set)))]
        x = torch.stack([image for image, _ in samples])
        names = [f"{data} val {i}: class {int(label)}" for i, (_, label) in enumerate(samples)]
        mean, std = dm.mean, dm.std
    with torch.no_grad():
        result = model.forward_intermediates(x)
    if not result["deformable"]:
        raise AnalysisError(f"{checkpoint}: the model has no deformable (D) blocks to show")
    if cfg.num_classes:  # a head: what the model took each image for (without one, "logits" are its features)
        names = [f"{n}, predicted {int(c)}" for n, c in zip(names, result["logits"].argmax(-1))]
    replaced = (out / "sampling_points.png").exists()
    return save_figure(sampling_points_figure(x, result, mean=mean, std=std, names=names), out, "sampling_points"), replaced
