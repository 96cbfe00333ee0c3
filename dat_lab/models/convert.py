"""Released checkpoints: the official keyword dict to a config, official weights into a model, and
dat-lab's own checkpoint format (weights plus the model config that rebuilds them).

The model's parameter names are the released ones, so loading is strict name-for-name matching;
derived buffers of the released code (`relative_position_index`, `attn_mask`) are dropped and
rebuilt by the model.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .config import OFFSET_KERNELS, DATConfig, StageConfig

DERIVED_BUFFERS = ("relative_position_index", "attn_mask")

_PER_STAGE = ("dims", "depths", "heads", "window_sizes", "groups", "use_pes", "dwc_pes", "fixed_pes", "no_offs",
              "strides", "offset_range_factor", "sr_ratios", "use_dwc_mlps", "stage_spec", "ksizes", "log_cpbs")
_MODEL = ("use_conv_patches", "dim_stem", "patch_size", "img_size", "expansion", "drop_path_rate", "drop_rate",
          "attn_drop_rate", "num_classes")
_REQUIRED = ("dims", "depths", "heads", "stage_spec")
_DAT_PLUS_PLUS = ("nat_ksizes", "use_lpus", "lower_lr_kvs", "layer_scale_values")  # DAT++'s own keywords


def config_from_official(kwargs: Mapping[str, Any]) -> DATConfig:
    """A DATConfig from the released model's keyword dict (DAT_SPEC section 3; -1 = unused here)."""
    unknown = sorted(set(kwargs) - set(_PER_STAGE) - set(_MODEL))
    if set(unknown) & set(_DAT_PLUS_PLUS):
        raise ValueError(f"a DAT++ config (its keys {sorted(set(unknown) & set(_DAT_PLUS_PLUS))}): dat-lab builds "
                         f"DAT (CVPR 2022), the released code's dat.py configs, not DAT++")
    if unknown:
        raise ValueError(f"unknown official key(s) {unknown}; allowed: {', '.join(_PER_STAGE + _MODEL)}")
    missing = [k for k in _REQUIRED if k not in kwargs]
    if missing:
        raise ValueError(f"official config lacks {missing}")
    for key in _PER_STAGE:
        if key in kwargs and not isinstance(kwargs[key], (list, tuple)):
            raise ValueError(f"{key}: {kwargs[key]!r} is not a list (one value per stage)")
    n = len(kwargs["dims"])
    for key in _PER_STAGE:
        if key in kwargs and len(kwargs[key]) != n:
            raise ValueError(f"{key}: {len(kwargs[key])} values for {n} stages")

    def get(key: str, i: int, default: Any) -> Any:
        value = kwargs[key][i] if key in kwargs else default
        return default if value == -1 else value

    stages = []
    for i in range(n):
        letters = "".join(kwargs["stage_spec"][i])
        if len(letters) != kwargs["depths"][i]:
            raise ValueError(f"stage_spec[{i}]: {len(letters)} letters for depth {kwargs['depths'][i]}")
        stage = dict(dim=kwargs["dims"][i], depth=kwargs["depths"][i], heads=kwargs["heads"][i],
                     blocks=_shortest_pattern(letters), window=get("window_sizes", i, 7),
                     mlp="dwconv" if get("use_dwc_mlps", i, False) else "token",
                     offset_kernel=get("ksizes", i, OFFSET_KERNELS[i] if i < len(OFFSET_KERNELS) else 3))
        if "D" in letters:
            stage.update(groups=get("groups", i, 1), key_downsample=get("strides", i, 1),
                         offset_range=float(kwargs["offset_range_factor"][i]) if "offset_range_factor" in kwargs else 2.0,
                         offsets=not get("no_offs", i, False), position=_position(kwargs, i))
        if "P" in letters:
            stage.update(sr_ratio=get("sr_ratios", i, 1))
        stages.append(StageConfig(**stage))
    model = dict(img_size=kwargs.get("img_size", 224), patch_size=kwargs.get("patch_size", 4),
                 num_classes=kwargs.get("num_classes", 1000), mlp_ratio=kwargs.get("expansion", 4),
                 conv_patches=bool(kwargs.get("use_conv_patches", False)),
                 stem_dim=0 if kwargs.get("dim_stem", kwargs["dims"][0]) == kwargs["dims"][0] else kwargs["dim_stem"],
                 drop_path_rate=float(kwargs.get("drop_path_rate", 0.0)), drop_rate=float(kwargs.get("drop_rate", 0.0)),
                 attn_drop_rate=float(kwargs.get("attn_drop_rate", 0.0)))
    return DATConfig(stages=tuple(stages), **model)


def _shortest_pattern(letters: str) -> str:
    """The shortest pattern whose repeats give `letters` ("LDLDLD" -> "LD")."""
    n = len(letters)
    return next(letters[:p] for p in range(1, n + 1) if n % p == 0 and letters[:p] * (n // p) == letters)


def _position(kwargs: Mapping[str, Any], i: int) -> str:
    flag = lambda key: key in kwargs and kwargs[key][i] not in (-1, False, 0)  # noqa: E731
    if not flag("use_pes"):
        return "none"
    return "dwconv" if flag("dwc_pes") else "fixed" if flag("fixed_pes") else "log_cpb" if flag("log_cpbs") else "relative"


def _read(checkpoint: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    return read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint


RELEASED_TRUST = ("such as the training config the released code saves; if you trust the file, keep its weights "
                  "alone: torch.save(torch.load(FILE, weights_only=False)['model'], 'weights.pth')")


def read_checkpoint(checkpoint: str | os.PathLike, *, mmap: bool = False, trusted: bool = False,
                    if_trusted: str = RELEASED_TRUST) -> Mapping[str, Any]:
    """What the file `checkpoint` holds, read by torch.load(weights_only=True) (memory-mapped with `mmap`,
    where its format allows; any object, where the user `trusted` the file); a one-line ValueError where
    it is missing, unreadable or no checkpoint (`if_trusted`: what to do if its objects are trusted)."""
    load = lambda **kw: torch.load(checkpoint, map_location="cpu", weights_only=not trusted, **kw)  # noqa: E731
    try:
        try:
            data = load(mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            data = load()  # torch's legacy format: no mmap
    except FileNotFoundError:
        raise ValueError(f"{checkpoint}: no such checkpoint") from None
    except IsADirectoryError:
        raise ValueError(f"{checkpoint}: a folder, not a checkpoint file") from None
    except OSError as err:  # unreadable
        raise ValueError(f"{checkpoint}: {(err.strerror or str(err)).lower()}") from None
    except Exception as err:  # not a checkpoint (the unpickler fails in many ways), or one with foreign objects
        found = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), "")
        what = found.split("Unsupported global: ")[-1].split(". ")[0]
        detail = f" ({what}: objects besides weights, {if_trusted})" if found else ""
        raise ValueError(f"{checkpoint}: not a checkpoint that torch.load(weights_only=True) reads{detail}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{checkpoint}: holds a {type(data).__name__}, not a checkpoint (a dict of weights)")
    return data


def official_state_dict(checkpoint: str | os.PathLike | Mapping[str, Any]) -> dict[str, Tensor]:
    """The weights of a released checkpoint (a dict with a `model` key, or a bare state dict)."""
    data = _read(checkpoint)
    if "model_config" in data or "model_config" in (data.get("hyper_parameters") or {}):
        where = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else "checkpoint"
        raise ValueError(f"{where}: a dat-lab checkpoint already (it carries its model config): load_checkpoint "
                         "and `dat-lab visualize` read it as it is; convert takes the released code's checkpoints")
    state = data["model"] if "model" in data and isinstance(data["model"], Mapping) else data
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in DERIVED_BUFFERS}


def load_official(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any]) -> nn.Module:
    """Load released weights into `model`; raise listing missing, unexpected and mis-shaped names."""
    state = official_state_dict(checkpoint)
    own = model.state_dict()
    if not any(k.startswith("cls_head.") for k in own):  # a model without a head (num_classes 0): features only
        state = {k: v for k, v in state.items() if not k.startswith("cls_head.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                       for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or misshaped:
        head = state.get("cls_head.weight")
        other_head = not missing and not unexpected and all(m.startswith("cls_head.") for m in misshaped)
        hint = (f" (its head has {head.shape[0]} classes: give num_classes={head.shape[0]}, or `dat-lab convert "
                f"--num-classes {head.shape[0]}`)") if other_head else ""
        raise ValueError(f"checkpoint does not fit the model: missing {_some(missing)}; unexpected "
                         f"{_some(unexpected)}; mis-shaped {_some(misshaped)}{hint}")
    model.load_state_dict(state, strict=True)
    return model


def _some(names: list[str], shown: int = 5) -> str:
    """The first `shown` names, and how many more (another model's checkpoint differs in hundreds)."""
    return f"{names}" if len(names) <= shown else f"{names[:shown]} and {len(names) - shown} more"


# --- dat-lab's own checkpoint -----------------------------------------------------------------------

def save_checkpoint(model: nn.Module, path: str | os.PathLike, **extra: Any) -> None:
    """Weights with the config that rebuilds the model: {"model_config", "state_dict", ...extra}."""
    torch.save({"model_config": model.config.to_dict(), "state_dict": model.state_dict(), **extra}, path)


def config_from_checkpoint(data: Mapping[str, Any], source: str = "checkpoint") -> DATConfig:
    """The model config a dat-lab (or Lightning, via its hyper-parameters) checkpoint carries; `source`
    names the file in the error where there is none."""
    config = data.get("model_config") or data.get("hyper_parameters", {}).get("model_config")
    if config is None:
        raise ValueError(f"{source}: carries no model_config (released weights?); convert them with `dat-lab convert`")
    return config if isinstance(config, DATConfig) else DATConfig.from_dict(config)


def load_checkpoint(path: str | os.PathLike) -> nn.Module:
    """Rebuild a DAT from a dat-lab checkpoint (`dat-lab convert` output or a training checkpoint)."""
    from .dat import DAT

    data = _read(path)
    model = DAT(config=config_from_checkpoint(data, source=str(path)))
    state = data["state_dict"]
    if "hyper_parameters" in data:  # a Lightning checkpoint: the network is the `model` attribute
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    return model
