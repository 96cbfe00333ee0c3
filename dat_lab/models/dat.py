"""DAT: Vision Transformer with Deformable Attention (Xia et al., CVPR 2022, arXiv 2201.00520).

Reads top down: MLPs, the stage, the model, the factory, the timm registry. Attention blocks are in
`attention.py`, geometry in `geometry.py`, configs in `config.py`. Module names match the released
checkpoints, so official weights load without renaming (see `convert.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import register_model
from torch import Tensor, nn

from .attention import BLOCKS, LayerNorm2d
from .config import VARIANTS, DATConfig, StageConfig, get_config


class TokenMlp(nn.Module):
    """Per-token MLP: Linear(C, rC), GELU, Dropout, Linear(rC, C), Dropout on a channels-last map."""

    def __init__(self, *, dim: int, ratio: int, drop: float) -> None:
        super().__init__()
        self.chunk = nn.Sequential()
        self.chunk.add_module("linear1", nn.Linear(dim, dim * ratio))
        self.chunk.add_module("act", nn.GELU())
        self.chunk.add_module("drop1", nn.Dropout(drop))
        self.chunk.add_module("linear2", nn.Linear(dim * ratio, dim))
        self.chunk.add_module("drop2", nn.Dropout(drop))

    def forward(self, x: Tensor) -> Tensor:
        return self.chunk(x)


class DwConvMlp(nn.Module):
    """1x1 conv C->rC, depthwise 3x3 conv, GELU, dropout, 1x1 conv rC->C, dropout (`use_dwc_mlps`)."""

    def __init__(self, *, dim: int, ratio: int, drop: float) -> None:
        super().__init__()
        hidden = dim * ratio
        self.linear1 = nn.Conv2d(dim, hidden, 1)
        self.dwc = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.linear2 = nn.Conv2d(hidden, dim, 1)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:  # channels-last in and out, convolutions channel-first
        x = self.drop1(self.act(self.dwc(self.linear1(x.permute(0, 3, 1, 2)))))
        return self.drop2(self.linear2(x)).permute(0, 2, 3, 1)


MLPS = {"token": TokenMlp, "dwconv": DwConvMlp}


class Stage(nn.Module):
    """`depth` pre-norm blocks: x + DropPath(attn(LN(x))), then x + DropPath(MLP(LN(x))).
    Takes and gives (B, C, H, W); the blocks run on one channels-last copy (B, H, W, C)."""

    def __init__(self, *, stage: StageConfig, in_dim: int, q_size: tuple[int, int], config: DATConfig,
                 drop_path: list[float]) -> None:
        super().__init__()
        dim = stage.dim
        self.letters = stage.letters
        self.proj = nn.Conv2d(in_dim, dim, 1) if in_dim != dim else nn.Identity()
        self.layer_norms = nn.ModuleList(LayerNorm2d(dim=dim) for _ in range(2 * stage.depth))
        self.attns = nn.ModuleList(
            BLOCKS[c](stage=stage, q_size=q_size, attn_drop=config.attn_drop_rate, proj_drop=config.drop_rate)
            for c in self.letters
        )
        self.mlps = nn.ModuleList(MLPS[stage.mlp](dim=dim, ratio=config.mlp_ratio, drop=config.drop_rate)
                                  for _ in self.letters)
        self.drop_path = nn.ModuleList(DropPath(p) if p > 0 else nn.Identity() for p in drop_path)

    def forward(self, x: Tensor, *, infos: dict[str, Any] | None = None, prefix: str = "",
                return_attention: bool = False) -> Tensor:
        x = self.proj(x).permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)
        norms = self.layer_norms
        for d, (attn, mlp, drop) in enumerate(zip(self.attns, self.mlps, self.drop_path)):
            y, info = attn(norms[2 * d].norm(x), return_attention=return_attention)
            x = x + drop(y)
            x = x + drop(mlp(norms[2 * d + 1].norm(x)))
            if infos is not None and info is not None:
                infos[f"{prefix}attns.{d}"] = info
        return x.permute(0, 3, 1, 2)  # (B, C, H, W) in channels_last memory format


def _stem(config: DATConfig, out_dim: int) -> nn.Sequential:
    if config.conv_patches:
        conv = nn.Conv2d(config.in_chans, out_dim, 7, stride=config.patch_size, padding=3)  # as released
    else:
        conv = nn.Conv2d(config.in_chans, out_dim, config.patch_size, stride=config.patch_size)
    return nn.Sequential(conv, LayerNorm2d(dim=out_dim))


def _downsample(config: DATConfig, in_dim: int, out_dim: int) -> nn.Sequential:
    if config.conv_patches:
        conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, bias=False)
    else:
        conv = nn.Conv2d(in_dim, out_dim, 2, stride=2, bias=False)
    return nn.Sequential(conv, LayerNorm2d(dim=out_dim))


class DAT(nn.Module):
    """The DAT classifier. `forward` gives logits; `forward_intermediates` what analysis reads."""

    def __init__(self, *, config: DATConfig) -> None:
        super().__init__()
        self.config = config
        stages = config.stages
        stem_dim = config.stem_dim or stages[0].dim
        self.patch_proj = _stem(config, stem_dim)
        rates = torch.linspace(0, config.drop_path_rate, config.depth).tolist()
        starts = [sum(s.depth for s in stages[:i]) for i in range(len(stages))]
        sizes = config.stage_sizes()
        in_dims = [stem_dim] + [s.dim for s in stages[1:]]
        self.stages = nn.ModuleList(
            Stage(stage=s, in_dim=in_dims[i], q_size=sizes[i], config=config,
                  drop_path=rates[starts[i]:starts[i] + s.depth])
            for i, s in enumerate(stages)
        )
        self.down_projs = nn.ModuleList(_downsample(config, a.dim, b.dim) for a, b in zip(stages, stages[1:]))
        self.num_features = stages[-1].dim
        self.least_size = config.least_size()
        self.cls_norm = LayerNorm2d(dim=self.num_features)
        self.cls_head = nn.Linear(self.num_features, config.num_classes) if config.num_classes else nn.Identity()
        self.apply(_init_weights)
        self.pretrained_cfg = self.default_cfg = {
            "input_size": (config.in_chans, config.img_size, config.img_size), "num_classes": config.num_classes,
            "interpolation": "bicubic", "crop_pct": 0.875, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_proj.0", "classifier": "cls_head",
        }

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def _run(self, x: Tensor, infos: dict[str, Any] | None, return_attention: bool) -> tuple[Tensor, list[Tensor]]:
        if min(x.shape[-2:]) < self.least_size:  # else a conv deep inside says so, in its words
            raise ValueError(f"input {x.shape[-2]}x{x.shape[-1]}: too small for {len(self.stages)} stages "
                             f"(at least {self.least_size} pixels a side)")
        x = self.patch_proj(x)
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x, infos=infos, prefix=f"stages.{i}.", return_attention=return_attention)
            features.append(x)
            if i < len(self.down_projs):
                x = self.down_projs[i](x)
        return self.cls_norm(x), features

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised last feature map (B, C, H, W)."""
        return self._run(x, None, False)[0]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3))  # global average pool (a mean, not adaptive pooling: deterministic on CUDA)
        return x if pre_logits else self.cls_head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, *, return_attention: bool = False) -> dict[str, Any]:
        """Logits, per-stage features, and per deformable block (named like its module,
        e.g. "stages.2.attns.1") sampling `positions` and `references` (B, G, Hk, Wk, 2) in normalised
        (y, x), plus `attention` (B, heads, H*W, Ns) when asked."""
        infos: dict[str, Any] = {}
        feats, stage_features = self._run(x, infos, return_attention)
        return {"logits": self.forward_head(feats), "features": stage_features, "deformable": infos}

    def no_weight_decay(self) -> set[str]:
        """fnmatch patterns of parameters without weight decay (timm's create_optimizer_v2 honours them)."""
        return {"*rpe_table*", "*relative_position_bias_table", "*.bias", "*norm.weight"}

    def get_classifier(self) -> nn.Module:
        return self.cls_head

    def reset_classifier(self, num_classes: int) -> None:
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        self.cls_head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg["num_classes"] = num_classes


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def create_model(name_or_config: str | DATConfig, **overrides: Any) -> DAT:
    """A DAT from a variant name (see `VARIANTS`) or a config, with config overrides.

    Overrides are `DATConfig` fields or per-stage `StageConfig` fields (one value for every stage,
    or a list with one value per stage); an unknown name raises ValueError.
    """
    return DAT(config=get_config(name_or_config, **overrides))


# --- timm registry ----------------------------------------------------------------------------------

_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only")


def _register(name: str) -> None:
    def entry(pretrained: bool = False, **kwargs: Any) -> DAT:
        if pretrained:
            raise ValueError(f"{name}: no hub weights here; use dat_lab.load_official with released weights")
        return create_model(name, **{k: v for k, v in kwargs.items() if k not in _TIMM_ONLY})

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"DAT variant {name!r} (see dat_lab.models.config.VARIANTS)."
    register_model(entry)


for _name in VARIANTS:
    _register(_name)
