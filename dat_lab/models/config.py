"""Typed, frozen configuration of DAT models, and the table of named variants.

Paper: "Vision Transformer with Deformable Attention", Xia et al., CVPR 2022 (arXiv 2201.00520).
A model is a `DATConfig` holding one `StageConfig` per stage. Every ablation is a config delta:
`replace_config(cfg, offset_range=4)` (a per-stage knob given once applies to every stage; a list
gives one value per stage) or `dataclasses.replace`. Invalid values raise a one-line ValueError
naming the field and what is allowed, when the config is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..yaml_files import float_hint

BLOCK_LETTERS = ("L", "S", "D", "P")
"""L: window attention, S: shifted window, D: deformable, P: PVT spatial-reduction attention."""
POSITIONS = ("none", "relative", "fixed", "dwconv", "log_cpb")
REFERENCES = ("released", "aligned")
MLPS = ("token", "dwconv")


def _check_types(obj: Any, prefix: str) -> None:
    """Raise a one-line ValueError for a field whose value has the wrong type."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value, kind = getattr(obj, f.name), hints[f.name]
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif kind is str:
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            what = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[kind]
            raise ValueError(f"{prefix}{f.name}: {value!r} is not {what}{float_hint(value) if kind is float else ''}")


def _one_of(prefix: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{prefix}{name}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(prefix: str, **values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{prefix}{name}: {value} must be >= 1")


@dataclass(frozen=True)
class StageConfig:
    """One stage: `depth` blocks whose letters repeat the pattern `blocks` (e.g. "LD" -> L,D,L,D...)."""

    dim: int
    depth: int
    heads: int
    blocks: str = "LS"
    window: int = 7
    groups: int = 1  # G, offset groups of a D block
    offset_range: float = 2.0  # s: > 0 bounded, 0 no offset, < 0 the released "unbounded" mode
    key_downsample: int = 1  # r: key grid is ceil(H / r) x ceil(W / r)
    offsets: bool = True  # False: keys at the reference points, no offset network built
    position: str = "relative"  # position term of D blocks, one of POSITIONS
    offset_kernel: int = 3  # depthwise kernel of the offset network
    reference: str = "released"  # reference-point convention, one of REFERENCES
    mlp: str = "token"  # one of MLPS
    sr_ratio: int = 1  # spatial reduction of P blocks

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "") -> None:
        _check_types(self, prefix)
        _positive(prefix, dim=self.dim, depth=self.depth, heads=self.heads, window=self.window,
                  groups=self.groups, key_downsample=self.key_downsample, sr_ratio=self.sr_ratio)
        for letter in self.blocks:
            _one_of(prefix, "blocks", letter, BLOCK_LETTERS)
        if not self.blocks or self.depth % len(self.blocks):
            raise ValueError(f"{prefix}blocks: pattern {self.blocks!r} does not fill depth {self.depth} "
                             f"(its length must divide the depth)")
        if self.dim % self.heads:
            raise ValueError(f"{prefix}heads: {self.heads} heads do not divide dim {self.dim}")
        if "D" in self.blocks and self.heads % self.groups:  # groups serve D blocks only
            raise ValueError(f"{prefix}groups: {self.groups} offset groups do not divide {self.heads} heads")
        if self.offset_kernel < 1 or self.offset_kernel % 2 == 0:
            raise ValueError(f"{prefix}offset_kernel: {self.offset_kernel} must be an odd number >= 1")
        _one_of(prefix, "position", self.position, POSITIONS)
        _one_of(prefix, "reference", self.reference, REFERENCES)
        _one_of(prefix, "mlp", self.mlp, MLPS)

    @property
    def letters(self) -> str:
        """One letter per block."""
        return self.blocks * (self.depth // len(self.blocks))

    @property
    def has_offsets(self) -> bool:
        """Whether D blocks of this stage build and use an offset network."""
        return self.offsets and self.offset_range != 0


@dataclass(frozen=True)
class DATConfig:
    """A whole model: stem, stages, downsampling, head."""

    stages: tuple[StageConfig, ...]
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    patch_size: int = 4
    stem_dim: int = 0  # 0: the first stage's dim
    conv_patches: bool = False  # overlapping conv stem (k7, stride patch_size) and downsampling (k3 s2)
    mlp_ratio: int = 4
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0  # projection and MLP dropout
    attn_drop_rate: float = 0.0

    def __post_init__(self) -> None:
        stages = tuple(_stage(i, s) for i, s in enumerate(self.stages))
        object.__setattr__(self, "stages", stages)
        if not stages or not all(isinstance(s, StageConfig) for s in stages):
            raise ValueError("stages: must be a non-empty list of StageConfig or mappings")
        _check_types(self, "")
        _positive("", img_size=self.img_size, in_chans=self.in_chans, patch_size=self.patch_size,
                  mlp_ratio=self.mlp_ratio)
        if self.num_classes < 0:
            raise ValueError(f"num_classes: {self.num_classes} must be >= 0 (0 gives features)")
        if self.stem_dim < 0:
            raise ValueError(f"stem_dim: {self.stem_dim} must be >= 0 (0 means stages[0].dim)")
        for name in ("drop_path_rate", "drop_rate", "attn_drop_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: {getattr(self, name)} must be in [0, 1)")
        for i, ((h, w), stage) in enumerate(zip(self.stage_sizes(), stages)):
            if min(h, w) < 1:
                raise ValueError(f"img_size: {self.img_size} leaves no pixels for stage {i}")
            if "D" in stage.blocks and stage.key_downsample > min(h, w):
                raise ValueError(f"stages[{i}].key_downsample: {stage.key_downsample} is larger than the {h}x{w} "
                                 f"map of stage {i} (allowed: 1..{min(h, w)})")
            if "P" in stage.blocks and stage.sr_ratio > min(h, w):
                raise ValueError(f"stages[{i}].sr_ratio: {stage.sr_ratio} is larger than the {h}x{w} map "
                                 f"of stage {i} (allowed: 1..{min(h, w)})")

    @property
    def depth(self) -> int:
        return sum(s.depth for s in self.stages)

    def least_size(self) -> int:
        """The smallest input side that leaves every stage a pixel."""
        return next(n for n in range(1, self.patch_size * 2 ** len(self.stages) + 1) if min(self.stage_sizes(n)[-1]) >= 1)

    def stage_sizes(self, img_size: int | None = None) -> list[tuple[int, int]]:
        """Feature-map size (H, W) of every stage for a square input of `img_size`."""
        n = img_size or self.img_size
        n = math.ceil(n / self.patch_size) if self.conv_patches else n // self.patch_size
        sizes = [n]
        for _ in self.stages[1:]:
            n = math.ceil(n / 2) if self.conv_patches else n // 2
            sizes.append(n)
        return [(s, s) for s in sizes]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DATConfig":
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown DATConfig field(s) {unknown}; allowed: {_names(cls)}")
        if "stages" not in data:
            raise ValueError(f"DATConfig: no stages given; fields: {_names(cls)}")
        return cls(**data)


def _names(cls: type) -> str:
    return ", ".join(f.name for f in fields(cls))


def _stage(i: int, stage: Any) -> Any:
    """stages[i] as a StageConfig when given as a mapping; unknown or missing fields in one line."""
    if isinstance(stage, StageConfig):
        return stage
    if not isinstance(stage, Mapping):
        raise ValueError(f"stages[{i}]: {stage!r} is not a stage (a mapping of StageConfig fields: {_names(StageConfig)})")
    unknown = sorted(set(stage) - {f.name for f in fields(StageConfig)})
    if unknown:
        raise ValueError(f"stages[{i}]: unknown StageConfig field(s) {unknown}; allowed: {_names(StageConfig)}")
    try:
        return StageConfig(**stage)
    except TypeError as err:  # a required field missing
        raise ValueError(f"stages[{i}]: {err}") from None
    except ValueError as err:
        raise ValueError(f"stages[{i}].{err}") from None


MODEL_FIELDS = frozenset(f.name for f in fields(DATConfig)) - {"stages"}
STAGE_FIELDS = frozenset(f.name for f in fields(StageConfig))


def replace_config(config: DATConfig, **overrides: Any) -> DATConfig:
    """A copy of `config` with overrides: model fields, or stage fields (one value or one per stage)."""
    unknown = sorted(set(overrides) - MODEL_FIELDS - STAGE_FIELDS - {"stages"})
    if unknown:
        known = sorted(MODEL_FIELDS | STAGE_FIELDS | {"stages"})
        close = [match[0] for name in unknown if (match := difflib.get_close_matches(name, known, n=1))]
        meant = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown config field(s) {unknown}{meant}; allowed: {', '.join(sorted(MODEL_FIELDS))}, "
                         f"stages, and per-stage {', '.join(sorted(STAGE_FIELDS))}")
    if not isinstance(overrides.get("stages", config.stages), (list, tuple)):
        raise ValueError(f"stages: {overrides['stages']!r} is not a list of stages (StageConfig fields, one mapping each)")
    n = len(overrides.get("stages", config.stages))
    per_stage: list[dict[str, Any]] = [{} for _ in range(n)]
    for name in sorted(set(overrides) & STAGE_FIELDS):
        value = overrides[name]
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"{name}: {len(value)} values for {n} stages (give one value or {n})")
            for i, v in enumerate(value):
                if v is not None:
                    per_stage[i][name] = v
        else:
            for delta in per_stage:
                delta[name] = value
    stages = list(overrides.get("stages", config.stages))
    for i, delta in enumerate(per_stage):
        base = _stage(i, stages[i])
        try:
            stages[i] = dataclasses.replace(base, **delta)
        except ValueError as err:
            raise ValueError(f"stages[{i}].{err}") from None
    model = {k: v for k, v in overrides.items() if k in MODEL_FIELDS}
    return dataclasses.replace(config, stages=tuple(stages), **model)


# --- named variants ---------------------------------------------------------------------------------

OFFSET_KERNELS = (9, 7, 5, 3)
"""v1 fixes the offset-network kernel by stage index."""


def _dat(*, dims, depths, heads, groups, drop_path_rate: float, img_size: int = 224,
         window: int = 7, patch_size: int = 4, in_chans: int = 3) -> DATConfig:
    """Released layout: stages 0-1 L,S pairs; stages 2-3 L,D pairs with s = 2 and relative bias."""
    stages = tuple(
        StageConfig(dim=d, depth=n, heads=h, blocks="LS" if i < 2 else "LD", window=window, groups=g,
                    offset_range=2.0, position="relative", offset_kernel=OFFSET_KERNELS[i])
        for i, (d, n, h, g) in enumerate(zip(dims, depths, heads, groups))
    )
    return DATConfig(stages=stages, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                     drop_path_rate=drop_path_rate)


VARIANTS: dict[str, DATConfig] = {
    "dat_tiny": _dat(dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), heads=(3, 6, 12, 24),
                     groups=(1, 1, 3, 6), drop_path_rate=0.2),
    "dat_small": _dat(dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), heads=(3, 6, 12, 24),
                      groups=(1, 1, 3, 6), drop_path_rate=0.3),
    "dat_base": _dat(dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), heads=(4, 8, 16, 32),
                     groups=(1, 1, 4, 8), drop_path_rate=0.5),
    "dat_base_384": _dat(dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), heads=(4, 8, 16, 32),
                         groups=(1, 1, 4, 8), drop_path_rate=0.5, img_size=384, window=12),
    # 32x32 inputs (CIFAR size): patch 2 gives 16, 8, 4, 2 maps; windows of 4.
    "dat_nano": _dat(dims=(48, 96, 192, 384), depths=(2, 2, 6, 2), heads=(2, 4, 8, 16),
                     groups=(1, 1, 2, 4), drop_path_rate=0.1, img_size=32, window=4, patch_size=2),
    # Small enough to train on the upsampled 8x8 digits in well under a minute on 2 CPU cores.
    "dat_pico": _dat(dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), heads=(1, 2, 4, 8),
                     groups=(1, 1, 2, 4), drop_path_rate=0.0, img_size=32, window=4, patch_size=2),
}


def get_config(name_or_config: str | DATConfig, **overrides: Any) -> DATConfig:
    """A named variant (or a given config) with overrides applied."""
    if isinstance(name_or_config, DATConfig):
        config = name_or_config
    elif name_or_config in VARIANTS:
        config = VARIANTS[name_or_config]
    else:
        raise ValueError(f"unknown model {name_or_config!r}; allowed: {', '.join(VARIANTS)}")
    return replace_config(config, **overrides) if overrides else config
