"""From a spec to checked trial configs: each cell's training config is parsed by the same
LightningCLI parser that `dat-lab train` uses (nothing instantiated, nothing trained), and its model
is profiled (params, FLOPs) from the config alone."""

from __future__ import annotations

import copy
import functools
import importlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Collection, Mapping

from lightning.fabric.accelerators.cuda import num_cuda_devices

from .. import metrics as M
from ..data import ImageDataModule
from ..models import DAT, DATConfig, get_config
from ..profile import Profile, profile_model
from ..training.cli import DatLabCLI, argv_set_aside, check_trainer, config_error
from ..training.module import ImageClassifier, check_recipe, weights_for
from .spec import Cell, SpecError, SweepSpec, deep_merge, nest


LOADER_ARGS = {"batch_size", "num_workers", "seed", "split_seed", "img_size"}  # DataModule options check() ignores
GPU_ACCELERATORS = ("auto", "gpu", "cuda")
DDP_NAMES = re.compile(r"ddp(?:_spawn|_fork|_notebook)?(_find_unused_parameters_(?:true|false))?")  # Lightning's
IN_PROCESS = re.compile(r"auto|single_device|single_xla|xla(_.*)?|([\w.]+\.)?(SingleDevice|SingleDeviceXLA|XLA)Strategy",
                        re.IGNORECASE)  # strategies that run no command line again
DDP_CLASSES = {"DDPStrategy", "lightning.pytorch.strategies.DDPStrategy", "lightning.pytorch.strategies.ddp.DDPStrategy"}
LOCAL_NAME = "LightningEnvironment"  # Lightning's own cluster environment: ranks spawned on this machine
LOCAL = {"class_path": f"lightning.pytorch.plugins.environments.{LOCAL_NAME}"}


class _Parsed(Exception):
    def __init__(self, config: Any) -> None:
        super().__init__("parsed")
        self.config = config


class _ParseOnly(DatLabCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config[self.subcommand])


def parse_training_config(config: Mapping[str, Any]) -> Any:
    """The LightningCLI namespace of a training config; a bad one raises SpecError (one line). The config
    is not changed (the parser would make the mappings in its lists namespaces)."""
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # no "Seed set" per cell
    try:
        with argv_set_aside():
            _ParseOnly(ImageClassifier, ImageDataModule, subclass_mode_data=True, args={"fit": copy.deepcopy(dict(config))},
                       parser_kwargs={"exit_on_error": False}, seed_everything_default=False)
    except _Parsed as parsed:
        return parsed.config
    except Exception as err:  # jsonargparse's ArgumentError and friends
        raise SpecError(f"training config: {config_error(err)}") from None
    raise SpecError("training config: the parser did not stop before instantiation")


def _data_class(parsed: Any) -> type[ImageDataModule]:
    module_name, _, class_name = parsed.data.class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def model_config(parsed: Any) -> DATConfig:
    """The DATConfig a parsed training config builds, with classes, size and channels of its data."""
    info = _data_class(parsed).describe(**vars(parsed.data.init_args))
    return get_config(parsed.model.variant, **{**(parsed.model.overrides or {}), **info})


def _check_validates(trainer: Any) -> None:
    """A one-line ValueError where a trial's run would never validate: its result is a validation metric."""
    why = "a trial's result is its objective, a validation metric"
    if trainer.get("limit_train_batches") == 0:
        raise ValueError(f"trainer.limit_train_batches: 0 trains nothing, so nothing validates ({why})")
    if trainer.get("limit_val_batches") == 0:
        raise ValueError(f"trainer.limit_val_batches: 0 validates nothing ({why})")
    every, epochs = trainer.get("check_val_every_n_epoch"), trainer.get("max_epochs")
    if every is not None and epochs not in (None, -1) and every > epochs:
        raise ValueError(f"trainer.check_val_every_n_epoch: {every} is more than max_epochs {epochs}, so no epoch "
                         f"validates ({why})")


def _checked_model(spec: SweepSpec, what: str, config: dict[str, Any], data_checked: dict[str, str | None],
                   sampled: Collection[str] = ()) -> tuple[DATConfig, str | None]:
    """The model config a trial config builds, and its data's identity (ImageDataModule.check);
    SpecError naming `what` when it does not parse or build, or when its data are not there (each data
    config checked once: `data_checked` holds the identities of those done). `sampled`: the config
    paths a search sets in each trial (not yet in `config`)."""
    try:
        parsed = parse_training_config(config)
        check_recipe(**vars(parsed.model))
        check_trainer(parsed.trainer)
        _check_validates(parsed.trainer)
        in_worker(config)
        ema = parsed.model.ema_decay or "model.ema_decay" in sampled
        if spec.metric in (M.VAL_EMA_ACC1, M.VAL_EMA_ACC5) and not ema:
            raise ValueError(f"objective {spec.metric} is logged only with EMA weights: set model.ema_decay "
                             f"(e.g. 0.9999), or take {M.VAL_ACC1}")
        args = vars(parsed.data.init_args)
        data = repr((parsed.data.class_path, {k: v for k, v in args.items() if k not in LOADER_ARGS}))
        if data not in data_checked:
            data_checked[data] = _data_class(parsed).check(**args)
        model = model_config(parsed)
        if parsed.model.get("weights"):  # a run starts from them: there, and of this model
            weights_for(parsed.model.weights, model)
        return model, data_checked[data]
    except (SpecError, ValueError, OSError) as err:  # OSError: a data folder that cannot be listed
        raise SpecError(f"{spec.path}: {what}: {err}") from None


def device_numbers(devices: Any) -> list[int] | None:
    """The device numbers `devices` names (a list, or "0,1"), as Lightning reads them; None for a count."""
    if isinstance(devices, (list, tuple)):
        return [int(d) for d in devices]
    return [int(d) for d in str(devices).split(",") if d.strip()] if "," in str(devices) else None


def processes(accelerator: Any, devices: Any) -> int:
    """How many processes a trainer with these options runs on one machine, as Lightning reads them."""
    if (numbers := device_numbers(devices)) is not None:
        return len(numbers)
    if (text := str(devices).strip()) not in ("auto", "-1"):
        return int(text)
    return (num_cuda_devices() if str(accelerator) in GPU_ACCELERATORS else 0) or 1


def plugins(trainer: Mapping[str, Any]) -> list[Any]:
    """A trainer config's plugins as a list (Lightning takes one or a list)."""
    given = trainer.get("plugins") or []
    return list(given) if isinstance(given, list) else [given]


def class_name(item: Any) -> str:
    """The class a config entry names: its class_path, or the entry itself (a name such as "ddp"); "" for None."""
    return str(item.get("class_path", "")) if isinstance(item, Mapping) else str(item or "")


def in_worker(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's training config as it runs inside its sweep worker's process. DDP that Lightning starts
    by running the command line again (`ddp`, and `auto` on several CPU or CUDA devices) would start
    copies of the sweep, each a worker; forked ranks fail once a trial has used CUDA in the worker. So
    every DDP trial spawns its ranks (`ddp_spawn`, Optuna's way for DDP trials), in Lightning's own
    environment (LightningEnvironment), whatever started the worker: under srun, Lightning's SLURM
    environment made a trial on two devices two unconnected copies of world size 1 (runner.as_own_rank
    takes the launcher's variables away too). A trial spans one machine: SpecError for
    several nodes, another strategy of several processes (FSDP, DeepSpeed), or a cluster environment
    of its own (among its plugins, or its DDP strategy's)."""
    trainer = dict(config.get("trainer") or {})
    if (nodes := int(trainer.get("num_nodes") or 1)) > 1:
        raise SpecError(f"trainer.num_nodes: {nodes}; a sweep's trial trains on its worker's machine (num_nodes 1): "
                        f"scale a sweep over machines by workers sharing a database")
    strategy = trainer.get("strategy", "auto")
    given_plugins = plugins(trainer)
    given_env = (strategy.get("init_args") or {}).get("cluster_environment") if isinstance(strategy, Mapping) else None
    named = [*(("trainer.plugins", class_name(p)) for p in given_plugins), ("trainer.strategy", class_name(given_env))]
    environments = [(where, name) for where, name in named if name.endswith("Environment")]  # Lightning's names
    for where, name in environments:
        if not name.endswith(LOCAL_NAME):  # SLURMEnvironment, ...
            raise SpecError(f"{where}: {name!r} is a cluster environment; a sweep's trial trains on its worker's "
                            f"machine alone (its DDP ranks spawned there, in Lightning's own environment)")
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    several = (count := processes(accelerator, trainer.get("devices", "auto"))) > 1
    name = class_name(strategy)
    if name in DDP_CLASSES:
        strategy = {**strategy, "init_args": {**(strategy.get("init_args") or {}), "start_method": "spawn"}}
    elif ddp := DDP_NAMES.fullmatch(name.lower()):
        strategy = "ddp_spawn" + (ddp.group(1) or "")
    elif name.lower() == "auto" and several and accelerator in ("cpu", *GPU_ACCELERATORS):
        strategy = "ddp_spawn"  # what auto is on several such devices, spawned
    elif several and not IN_PROCESS.fullmatch(name):
        raise SpecError(f"trainer.strategy: {name!r} on {count} devices starts its processes by running the command "
                        f"line again, which in a sweep starts more workers; a sweep's trial takes ddp (its ranks "
                        f"spawned) or ddp_spawn")
    else:  # in the worker's process: as given
        return dict(config)
    if environments:  # LightningEnvironment given already, the only one left (Lightning takes one)
        return deep_merge(config, {"trainer": {"strategy": strategy}})
    return deep_merge(config, {"trainer": {"strategy": strategy, "plugins": [*given_plugins, LOCAL]}})


@dataclass(frozen=True)
class PlannedCell:
    cell: Cell
    config: dict[str, Any]
    model: DATConfig
    cost: Profile  # the model's params and FLOPs
    data: tuple[str, ...] = ()  # what tells its data from others beyond the config (ImageDataModule.check)


@functools.lru_cache(maxsize=64)
def model_cost(model: DATConfig) -> Profile:
    """The params and FLOPs of a model config, profiled once (cells, and a search's trials, share models)."""
    return profile_model(DAT(config=model))


def plan(spec: SweepSpec, cells: list[Cell] | None = None) -> list[PlannedCell]:
    """Every cell with its checked config and its model's params and FLOPs; raises SpecError naming
    the cell whose config does not parse, whose model config is invalid or whose data are not there
    (for a search, also each search-space path at its bounds, or at each of its choices)."""
    out, models, data_checked = [], {}, {}
    for cell in cells if cells is not None else spec.cells():
        config = spec.trial_config(cell.delta, cell.seed)
        if cell.name not in models:  # a cell's seeds differ in their seeds only (run's, data's): parsed once per cell
            model, data = _checked_model(spec, f"cell {cell.name or M.BASE_CELL!r}", config, data_checked,
                                         sampled=spec.search_space)
            found = {data}  # and the data of each search-space choice (a search may choose among datasets)
            for path, dist in spec.search_space.items():
                for value in dist["choices"] if dist["type"] == "categorical" else (dist["low"], dist["high"]):
                    found.add(_checked_model(spec, f"search_space.{path} = {value!r}",
                                             deep_merge(config, nest(path, value)), data_checked)[1])
            models[cell.name] = model, tuple(sorted(d for d in found if d))
        model, data = models[cell.name]
        config = in_worker(config)  # checked with the cell's first seed
        out.append(PlannedCell(cell=cell, config=config, model=model, cost=model_cost(model), data=data))
    return out
