"""Figures of what deformable attention does: sampled key positions over the images (the paper's
Figs. 5-7). Used by the training callback (TensorBoard) and by `dat-lab visualize`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor


def to_pixels(points: Tensor, map_size: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """Normalised (y, x) points on a feature map (align_corners=True) to image pixel (x, y)."""
    (h, w), (ih, iw) = map_size, image_size
    y = ((points[..., 0] + 1) / 2 * (h - 1) + 0.5) * ih / h - 0.5
    x = ((points[..., 1] + 1) / 2 * (w - 1) + 0.5) * iw / w - 0.5
    return torch.stack((x, y), dim=-1)


def stage_of(block: str) -> int:
    """The stage index in a forward_intermediates block name ("stages.2.attns.1" -> 2)."""
    return int(block.split(".")[1])


def last_block_per_stage(deformable: dict[str, Any]) -> dict[int, str]:
    """{stage index: name of its last deformable block} from forward_intermediates' names."""
    return {stage_of(name): name for name in deformable}


def save_figure(fig, out: Path, name: str) -> list[Path]:
    """`fig` as out/name.png and out/name.pdf, then closed."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    if fig.get_layout_engine() is None:  # one laid out by its maker (constrained, a legend outside) stays so
        fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths


def row_major(handles: list, labels: list[str], ncol: int) -> tuple[list, list[str]]:
    """Legend entries reordered so that they read across the rows in their order (matplotlib fills a
    legend's columns first): the last row padded with blank entries, the grid transposed."""
    from matplotlib.lines import Line2D

    nrow = -(-len(labels) // ncol)
    blank = nrow * ncol - len(labels)
    handles = handles + [Line2D([], [], linestyle="none") for _ in range(blank)]
    labels = labels + [""] * blank
    order = [r * ncol + c for c in range(ncol) for r in range(nrow)]  # column by column, as matplotlib places them
    return [handles[i] for i in order], [labels[i] for i in order]


def sampling_points_figure(images: Tensor, out: dict[str, Any], *, mean: Sequence[float], std: Sequence[float],
                           max_points: int = 400, names: Sequence[str] | None = None):
    """A matplotlib figure: one row per image (labelled with `names`, where given), one column per
    deformable stage, the keys sampled by that stage's last D block (one colour per offset group) over
    the image; references as grey dots; a legend below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = last_block_per_stage(out["deformable"])
    n, cols = images.shape[0], max(1, len(stages))
    fig, axes = plt.subplots(n, cols, figsize=(2.6 * cols, 2.6 * n + 0.4), squeeze=False, layout="constrained")
    pictures = images.detach().float().cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    if pictures.shape[1] != 3:  # RGB as it is; any other count of channels (1, 2, 4, ...) as their mean, in gray
        pictures = pictures.mean(dim=1, keepdim=True)
    pictures = pictures.clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3 or 1): matplotlib takes arrays
    size = tuple(images.shape[-2:])
    for col, (stage, name) in enumerate(sorted(stages.items())):
        info = out["deformable"][name]
        map_size = tuple(out["features"][stage].shape[-2:])
        pos = to_pixels(info["positions"].detach().float().cpu(), map_size, size).numpy()  # (B, G, Hk, Wk, 2)
        ref = to_pixels(info["references"].detach().float().cpu(), map_size, size).numpy()
        for row in range(n):
            ax = axes[row][col]
            picture = pictures[row]
            ax.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
            r = ref[row, 0].reshape(-1, 2)
            ax.scatter(r[:, 0], r[:, 1], s=3, c="lightgrey", alpha=0.6, linewidths=0, label="reference points")
            for g in range(pos.shape[1]):
                p = pos[row, g].reshape(-1, 2)[:max_points]
                ax.scatter(p[:, 0], p[:, 1], s=6, alpha=0.8, linewidths=0, label=f"group {g}")
            ax.set_xlim(-0.5, size[1] - 0.5)
            ax.set_ylim(size[0] - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"stage {stage} ({name.split('.', 2)[-1]})", fontsize=8)
            if col == 0 and names is not None:
                ax.set_ylabel(names[row], fontsize=7)
    legend = {}  # label: handle, over every panel (stages may have different numbers of groups)
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        ncol = min(len(legend), 2 * cols)
        handles, labels = row_major(list(legend.values()), list(legend.keys()), ncol)
        key = fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=7, markerscale=2.5,
                         frameon=False, title="sampled keys by offset group", title_fontsize=7)
        for handle in key.legend_handles:
            handle.set_alpha(1)
    return fig
