"""`dat-lab train`: LightningCLI wired for dat-lab.

One run directory per run, `runs/<name>/version_<n>/` (name: `--name`, else the config file's stem),
holding config.yaml, TensorBoard events and checkpoints/{last.ckpt, best-*.ckpt}. `fit --ckpt_path last`
resumes the newest version of that name in place (its config.yaml kept, the resumed run's config saved
beside it as config_resume_<k>.yaml; a checkpoint of other model options is refused in one line,
before the data are prepared: `ImageClassifier.refuse_other_models`); `validate`/`test --ckpt_path last` evaluate that version's
last.ckpt and log to a new version. The DataModule tells the model its number of classes, input size
and channels.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

from jsonargparse import Namespace
import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import TorchElasticEnvironment
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from .. import metrics as M
from ..data import DataError, ImageDataModule
from ..models.convert import read_checkpoint
from ..yaml_files import read_yaml
from .callbacks import DeformableMonitor, HparamsMetric, Throughput
from .module import ImageClassifier, check_options

SUBCOMMANDS = ("fit", "validate", "test")
DESCRIPTIONS = {"test": {"description": "Evaluate the model on the data's validation split, as validate does (dat-lab's "
                                        "data modules hold no test split of their own)."}}  # (Lightning's: "the test set")
SUBCOMMAND_HELP = {"fit": "Train the model (the default when no subcommand is given).",
                   "validate": "One evaluation epoch over the data's validation split (logged as val/*).",
                   "test": "The same as validate (dat-lab's data modules hold no test split of their own)."}
CKPT_HELP = {  # Lightning's texts speak of a fit in the same process, and of a test set
    "fit": "A checkpoint file to train on from; last: resume the newest run of --name (else the config file's stem) "
           "in its folder; best: train on from that run's newest best-*.ckpt, into a new version; hpc, registry: "
           "as Lightning's.",
    "eval": "A checkpoint file to evaluate; last, best: the newest run of --name (else the config file's stem): its "
            "last.ckpt, its newest best-*.ckpt (logged to a new version); hpc, registry: as Lightning's; null (the "
            "default): the model as built (say, from --model.weights).",
}
CKPT_ALIASES = ("last", "best", "hpc", "registry")  # what Lightning's ckpt_path takes besides a file (and registry:...)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # torch deprecation inside Lightning
# Lightning's, on a resume mid-epoch: dat-lab's data modules keep the place themselves (ImageDataModule.state_dict)
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
# Lightning's advertisements for its cloud services ("💡 Tip: ... try installing litlogger"), each run
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: not str(record.msg).startswith("💡"))


class LastCheckpoint(ModelCheckpoint):
    """last.ckpt: the state at the end of each training epoch, validated or not. Where a run stops
    mid-epoch (max_time, max_steps, a callback's stop at a batch's end), it is written at the epoch's end
    as ever (after the stop's validation, which the best checkpoint's state records), but with the
    training loops' state of the stopping batch, so that a resume trains the epoch's remaining batches
    (Lightning takes a state of the epoch's end as the epoch done, and skipped them; the data module
    leaves out those trained: ImageDataModule.state_dict). A stop inside a window of accumulated
    gradients (`accumulate_grad_batches`) comes at the window's optimizer step. A class of its own:
    its state's key is no plain ModelCheckpoint's, which a user may add (Lightning refuses two callbacks
    of one key)."""

    def __init__(self) -> None:
        super().__init__(filename=self.CHECKPOINT_NAME_LAST, enable_version_counter=False, save_on_train_epoch_end=True)
        self._stopped_at: dict | None = None  # the fit loop's and the data's states after the batch where
        self._saving = False  # the run stopped mid-epoch
        self._deferred = False  # a stop waiting for the end of a window of accumulated gradients

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stopped_at, self._deferred = None, False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        loop = trainer.fit_loop.epoch_loop
        if trainer.should_stop and trainer.fit_loop._can_stop_early or self._deferred:
            # a stop inside a window of accumulated gradients waits for the window's optimizer step (else the
            # gradients of its trained batches were lost, and resumed, its other batches stepped alone); not on
            # an epoch's last batch (it steps), nor where the strategy accumulates itself (DeepSpeed)
            self._deferred = (loop._should_accumulate() and not loop._num_ready_batches_reached()
                              and not trainer.strategy.handles_gradient_accumulation)
            trainer.should_stop = not self._deferred
        stops = trainer.should_stop and trainer.fit_loop._can_stop_early or 0 <= trainer.max_steps <= trainer.global_step
        if stops and not loop._num_ready_batches_reached():
            data = trainer.datamodule
            self._stopped_at = {"fit_loop": copy.deepcopy(trainer.fit_loop.state_dict()),
                                "data": (type(data).__qualname__, data.state_dict()) if data is not None else None}

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self._saving = True
        try:
            super()._save_checkpoint(trainer, filepath)
        finally:
            self._saving = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._saving and self._stopped_at is not None:
            checkpoint["loops"]["fit_loop"] = self._stopped_at["fit_loop"]
            if (data := self._stopped_at["data"]) is not None and data[1]:  # (where the data module keeps one)
                checkpoint[data[0]] = data[1]


def default_callbacks() -> list:
    """What every dat-lab run gets: best and last checkpoints, throughput, DAT monitors, hparams metric.
    last.ckpt is LastCheckpoint's (Lightning 2.6's `save_last` writes it only when a best one is written:
    after the best epoch it stayed a copy of that one, and a resume redid the epochs after it)."""
    return [
        ModelCheckpoint(monitor=M.VAL_ACC1, mode="max", filename="best-epoch{epoch:03d}", auto_insert_metric_name=False),
        LastCheckpoint(),
        Throughput(),
        DeformableMonitor(),
        HparamsMetric(),
    ]


def _batches(v: Any) -> bool:
    """A count of batches, or a fraction of them (Lightning reads 2.0 as 2)."""
    return v is None or v >= 0 and (isinstance(v, int) or v <= 1 or v % 1 == 0)


def _devices(v: Any) -> bool:
    """auto, a count (>= 1, or -1 for all), or device indices (a list, or a string "0,1")."""
    if isinstance(v, (list, tuple)):
        return bool(v) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
    text = str(v).strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text) == -1 or int(text) >= 1
    return text == "auto" or re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,?", text) is not None


TRAINER_RULES = {  # what Lightning would take, then fail on (some only after the run folder is made)
    "max_epochs": (lambda v: v is None or v == -1 or v >= 1, ">= 1, or -1 for no limit"),
    "max_steps": (lambda v: v == -1 or v >= 1, ">= 1, or -1 for no limit"),
    "max_time": (lambda v: not isinstance(v, str) or re.fullmatch(r"\d+:\d\d:\d\d:\d\d", v.strip()),  # Lightning's
                 "DD:HH:MM:SS, e.g. 00:12:00:00"),
    "check_val_every_n_epoch": (lambda v: v is None or v >= 1, ">= 1"),
    "accumulate_grad_batches": (lambda v: v >= 1, ">= 1"),
    "log_every_n_steps": (lambda v: v is None or v >= 0, ">= 0 (0: never)"),
    "gradient_clip_val": (lambda v: v is None or v >= 0, ">= 0, or null for none"),
    "val_check_interval": (lambda v: v is None or v > 0, "> 0 (batches, or a fraction of an epoch)"),
    "num_sanity_val_steps": (lambda v: v is None or v >= -1, ">= 0, or -1 for all"),
    "devices": (_devices, '>= 1, -1 for all, device indices (a list, or "0,1"), or auto'),
    **{f"limit_{part}_batches": (_batches, "a count of batches >= 0, or a fraction in [0.0, 1.0]")
       for part in ("train", "val", "test")},
}


def check_trainer(options: Any, prefix: str = "trainer") -> None:
    """Raise a one-line ValueError naming the first trainer option of `options` (the trainer's config,
    or a sweep's budget) out of its range."""
    check_options(options, TRAINER_RULES, prefix)
    if prefix == "trainer" and options.get("max_epochs") == -1 and options.get("max_steps", -1) == -1:
        raise ValueError("trainer.max_epochs: -1 (no limit) needs trainer.max_steps: the learning-rate schedule "
                         "is as long as the run")


def run_directory(root: str | Path, name: str, resume: bool) -> str | None:
    """The logger version to use: None (a new version_<n>) or, to resume, the newest existing one."""
    if not resume:
        return None
    versions = [p for p in _versions(Path(root, name)) if (p / "checkpoints" / "last.ckpt").exists()]
    if not versions:
        raise DataError(f"--ckpt_path last: nothing to resume, no {Path(root, name)}/version_*/checkpoints/last.ckpt")
    return versions[0].name


def _versions(folder: Path) -> list[Path]:
    """The version_<n> run folders under `folder`, newest (highest n) first."""
    found = [p for p in folder.glob("version_*") if re.fullmatch(r"version_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("version_")), reverse=True)


@contextlib.contextmanager
def argv_set_aside() -> Iterator[None]:
    """sys.argv without its arguments inside (LightningCLI given `args` reads sys.argv too: it warns of both)."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        yield
    finally:
        sys.argv = argv


class DatLabCLI(LightningCLI):
    checkpoint_file: Path | None = None  # what --ckpt_path names on this machine, checked before the data

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """LightningCLI's, but predict: a classifier's logits are what `forward` gives."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--name", type=str | None, default=None,  # checked in before_instantiate_classes
                            help="run name: runs go to <default_root_dir>/<name>/version_<n> (default: config file stem)")
        for key in ("num_classes", "img_size", "in_chans"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """LightningCLI's, with `dat-lab train --help` saying what each subcommand does here (Lightning's
        texts: a test set, and no default) (SUBCOMMAND_HELP)."""
        super()._add_subcommands(parser, **kwargs)
        action = parser._subcommands_action
        action.help, action.required = "fit when none is given", False  # (`train` puts fit in: see main)
        for choice in action._choices_actions:
            choice.help = SUBCOMMAND_HELP.get(choice.dest, choice.help)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        """LightningCLI's, with --ckpt_path's help saying what dat-lab makes of it (CKPT_HELP)."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        action = parser._option_string_actions["--ckpt_path"]
        action.help = CKPT_HELP["fit" if subcommand == "fit" else "eval"]
        for group in parser._action_groups:
            if action in group._group_actions and subcommand in DESCRIPTIONS:
                group.description = None  # Lightning's method docstring ("... over the test set")
                group.title = "evaluation"
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """LightningCLI's, sys.argv set aside while `args` are parsed (else it warns of both); the rest of
        the run keeps sys.argv whole: Lightning's DDP launcher starts the other ranks with it."""
        with argv_set_aside():
            super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the config's model options with a checkpoint file's hyper-parameters,
        silently dropping those given; here the config builds the module, as for `--ckpt_path last`,
        and a checkpoint of another model is refused in one line (`_check_checkpoint`)."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        files = config.get("config") or []
        name = config.get("name") or (Path(str(files[-1])).stem if files else "dat")
        if set(name) & {"/", "\\"} or name in ("", ".", ".."):  # a folder under default_root_dir, not a path
            raise ValueError(f"--name: {name!r} must be a folder name (no / or \\, not . or ..): runs go to "
                             f"<default_root_dir>/<name>/version_<n>")
        trainer = config.trainer
        check_trainer(trainer)
        root = trainer.default_root_dir or "runs"
        ckpt = config.get("ckpt_path")
        if ckpt == "best":  # Lightning's is the best of a fit in this same process: none in a new one
            args = _logger_args(trainer.logger)
            folder = Path(root, name) if args is None else _run_folder(args) or Path(args.save_dir, args.get("name") or "")
            ckpt = config.ckpt_path = str(best_checkpoint(folder))
        local = ckpt and ckpt not in CKPT_ALIASES and not ckpt.startswith("registry:") and "://" not in ckpt
        if local and not Path(ckpt).is_file():
            raise DataError(f"--ckpt_path: {ckpt} is not a file (give a checkpoint, or last for the newest run "
                            f"of the name)")
        self.checkpoint_file = Path(ckpt) if local else None
        if trainer.logger in (None, True):
            version = run_directory(root, name, resume=ckpt == "last")
            if version is not None:
                self.checkpoint_file = Path(root, name, version, "checkpoints", "last.ckpt")
            if version is not None and self.subcommand != "fit":  # evaluate its checkpoint; log apart
                config.ckpt_path, version = str(self.checkpoint_file), None
            elif version is not None:  # resumed in place: the run's config.yaml stays as it was
                self.save_config_kwargs = {**self.save_config_kwargs,
                                           "config_filename": _resume_config_name(Path(root, name, version))}
            trainer.logger = tensorboard_logger(root, name, version)
        elif (args := _logger_args(trainer.logger)) is not None:
            self._beside_its_run(config, args, ckpt)
        data = config.data.get("init_args") if isinstance(config.get("data"), Namespace) else None
        if data is not None and "seed" in data and data.seed is None and type(config.get("seed_everything")) is int:
            data.seed = config.seed_everything  # the data's shuffling and augmentation follow the run's seed, as saved
        if ckpt and config.model.get("weights"):  # the checkpoint's weights replace them: not read (nor needed)
            config.model.weights = None
        if config.get("weights_only") is None and "weights_only" in config:
            config.weights_only = True


    def _beside_its_run(self, config: Namespace, args: Namespace, ckpt: str | None) -> None:
        """A config whose logger names its folder (a run's own config.yaml; a sweep trial's names its
        version too): `--ckpt_path last` is that run's last.ckpt, or the newest of the folder's runs where
        it names no version; training or evaluating logs beside that run, not over its config and events;
        resuming its checkpoint keeps its folder, the config saved as config_resume_<k>.yaml."""
        name = args.get("name") or ""
        run = _run_folder(args)
        if ckpt == "last":
            run = run or Path(args.save_dir, name, run_directory(args.save_dir, name, resume=True))
            last = run / "checkpoints" / "last.ckpt"
            if not last.is_file():
                raise DataError(f"--ckpt_path last: nothing to resume, no {last}")
            self.checkpoint_file, config.ckpt_path = last, str(last)
        if run is None or not (run / "config.yaml").exists():
            return
        if self.subcommand == "fit" and self.checkpoint_file is not None and \
                run.resolve() in self.checkpoint_file.resolve().parents:
            args.version = run.name
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": _resume_config_name(run)}
        else:
            args.version = None

    def _check_checkpoint(self) -> dict[str, Any] | None:
        """Refuse a checkpoint of another model now, in one line: Lightning loads it only after the
        DataModule's prepare_data and setup (a download, every image verified). Read memory-mapped:
        only the weights' names and shapes are looked at. The checkpoint, if any."""
        if self.checkpoint_file is None:
            return None
        try:
            trusted = self.config[self.subcommand].get("weights_only") is False  # --weights_only false: any object
            checkpoint = read_checkpoint(self.checkpoint_file, mmap=True, trusted=trusted,
                                         if_trusted="if you trust the file: --weights_only false")
        except ValueError as err:  # a file cut short by a kill, or no checkpoint: Lightning's load said it in a traceback
            raise ValueError(f"--ckpt_path: {err}") from None
        self.model.refuse_other_models(checkpoint, source=str(self.checkpoint_file))
        if self.subcommand == "fit":
            self.model.refuse_changed_schedule(checkpoint, source=str(self.checkpoint_file))
        return checkpoint

    def _purge_logged_after(self, checkpoint: dict[str, Any]) -> None:
        """Resuming in the checkpoint's own run folder: TensorBoard drops the steps logged after it (a killed
        epoch's), which the resumed run logs again, so that no step shows twice. (Everything of an epoch
        the checkpoint finished is logged at steps below its global_step.)"""
        logger = self.trainer.logger
        if (isinstance(logger, TensorBoardLogger) and logger._experiment is None  # its writer not made yet
                and self.checkpoint_file.name == "last.ckpt"  # (from an earlier one, a best-*.ckpt, its later steps stay)
                and self.checkpoint_file.resolve().parent.parent == Path(logger.log_dir).resolve()):
            logger._kwargs["purge_step"] = int(checkpoint.get("global_step", 0))

    def _check_processes(self) -> None:
        """Under torchrun, a trainer of another world size than the processes it started is refused in one
        line (with fewer devices, each process trained alone, all into one run folder, and said nothing)."""
        environment = getattr(self.trainer.strategy, "cluster_environment", None)  # (a sweep trial's is its own)
        if not TorchElasticEnvironment.detect() or not isinstance(environment, (TorchElasticEnvironment, type(None))):
            return
        started, devices, nodes = int(os.environ["WORLD_SIZE"]), self.trainer.num_devices, self.trainer.num_nodes
        if started != devices * nodes:  # (a parallel strategy's world_size is torchrun's WORLD_SIZE itself)
            option = "devices" if devices != int(os.environ.get("LOCAL_WORLD_SIZE", devices)) else "num_nodes"
            raise ValueError(f"trainer.{option}: torchrun started {started} processes, and the trainer takes "
                             f"{devices * nodes} ({devices} device(s) x {nodes} node(s)); give --trainer.devices as "
                             f"torchrun's --nproc_per_node and --trainer.num_nodes as its --nnodes")

    def before_fit(self) -> None:
        self._check_processes()
        if (checkpoint := self._check_checkpoint()) is not None:
            self._purge_logged_after(checkpoint)
        _HELD.release()

    def before_validate(self) -> None:
        self._before_evaluation()

    def before_test(self) -> None:
        self._before_evaluation()

    def after_validate(self) -> None:
        self._quiet.__exit__(None, None, None)

    def after_test(self) -> None:
        self._quiet.__exit__(None, None, None)

    def _before_evaluation(self) -> None:
        self._check_processes()
        self._check_checkpoint()
        _HELD.release()
        config = self.config[self.subcommand]
        if not config.get("ckpt_path") and not config.model.get("weights") and rank_zero_only.rank == 0:
            print(f"dat-lab train {self.subcommand}: no --ckpt_path: evaluating the model as the config builds it "
                  f"(untrained weights); give a checkpoint, or last for the newest run of the name (or start from "
                  f"converted weights: --model.weights)", file=sys.stderr)
        # it logs to a new version: ModelCheckpoint would warn that the checkpoint's own folder (and best
        # score) are not taken over, which an evaluation does not need (filtered until after_validate/test)
        self._quiet = warnings.catch_warnings()
        self._quiet.__enter__()
        warnings.filterwarnings("ignore", message="The dirpath has changed from")


class _HeldLines(logging.Filter):
    """Lightning's lines as a run starts ("Seed set to 0", "GPU available: ..."), held back until its
    options and checkpoint have been checked, so that a refusal is the only line printed."""

    LOGGERS = ("lightning.fabric.utilities.seed", "lightning.pytorch.utilities.rank_zero")

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] | None = None  # None: not holding

    def filter(self, record: logging.LogRecord) -> bool:
        if self.records is None:
            return True
        self.records.append(record)
        return False

    def hold(self) -> None:
        self.records = []
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)

    def release(self) -> None:
        """Print what was held (the checks passed), and hold no more."""
        records, self.records = self.records or [], None
        for record in records:
            logging.getLogger(record.name).handle(record)

    def drop(self) -> None:
        """Hold no more, printing nothing (the run was refused, or it ended)."""
        self.records = None
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


_HELD = _HeldLines()


def _logger_args(logger: Any) -> Namespace | None:
    """The init args of a logger config that names its folder (its save_dir), else None."""
    args = logger.get("init_args") if isinstance(logger, Namespace) else None
    return args if isinstance(args, Namespace) and args.get("save_dir") is not None else None


def best_checkpoint(folder: Path) -> Path:
    """`--ckpt_path best`: a run folder's best-*.ckpt, or that of the newest run under `folder` with one."""
    runs = [folder] if (folder / "checkpoints").is_dir() else _versions(folder)
    for run in runs:
        if found := list((run / "checkpoints").glob("best-*.ckpt")):  # one, or a killed run's too: the newest
            return max(found, key=lambda p: p.stat().st_mtime)
    raise DataError(f"--ckpt_path best: no {folder}/{'' if runs == [folder] else 'version_*/'}checkpoints/best-*.ckpt")


def _run_folder(args: Namespace) -> Path | None:
    """The run folder a logger's init args name with their version (<save_dir>/<name>/<version>), else None."""
    if args.get("version") is None:
        return None
    version = args.version if isinstance(args.version, str) else f"version_{args.version}"
    return Path(args.save_dir, args.get("name") or "", version)


def _resume_config_name(run: Path) -> str:
    """config_resume_<k>.yaml, k one more than the run's resumes so far."""
    return f"config_resume_{len(list(run.glob('config_resume_*.yaml'))) + 1}.yaml"


def error_chain(err: BaseException | None) -> Iterator[BaseException]:
    """err, then what caused it, outermost first (`raise ... from None` ends the chain there)."""
    while err is not None:
        yield err
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)


def config_error(err: BaseException, argv: list[str] | None = None) -> str:
    """One line from jsonargparse's nested errors: the innermost cause after the keys that led to it
    (`--data.batch_size: Expected a <class 'int'>. Got value: abc`), or the error's first line; an
    error raised `from None` is the innermost (its message is the one meant for the user). An option
    of the command line `argv` given no value is named as given (`--model.overrides.offset_range`,
    which argparse calls `--model.overrides`)."""
    missing = re.fullmatch(r"argument (?:-\w/)?(--[\w.]+): expected one argument", str(err).strip())
    if missing and argv:
        given = [a for i, a in enumerate(argv) if a.startswith(missing.group(1) + ".")
                 and (i + 1 == len(argv) or argv[i + 1].startswith("--"))]
        return f"{(given or [missing.group(1)])[-1]}: expected a value"
    keys, inner = [], err
    for cause in error_chain(err):
        lines = str(cause).strip().splitlines()
        key = re.fullmatch(r'Parser key "(.+)":', lines[0]) if lines else None
        if key and key.group(1) not in keys[-1:]:
            keys.append(key.group(1))
        inner = cause if lines else inner
    lines = [line.strip() for line in str(inner).strip().splitlines() if not line.strip().startswith("Parser key")]
    text = _union_error(err) or (lines[0] if lines else type(inner).__name__)
    text = f"--{'.'.join(keys)}: {text}" if keys and not isinstance(inner, DataError) else text
    gone = re.fullmatch(r"File does not exist: '(.+)'", text)
    configs = [v for i, a in enumerate(argv or ()) if a in ("-c", "--config") for v in argv[i + 1:i + 2]]
    if gone and gone.group(1) in {f(c) for c in configs for f in (os.path.abspath, lambda c: str(Path(c).absolute()))}:
        text = f"--config: {gone.group(1)} does not exist"
    if (rule := re.match(r"([a-z_]+(?:\.\w+)+): ", text)) and _given_last(f"--{rule.group(1)}", argv or []):
        text = f"--{text}"  # a range rule's error names the config's key: as the option, where that set it
    if re.match(r"--data: (module .* has no attribute|Expected a dot import path|No module named)", text):
        return f"{text} (dat-lab's: {', '.join(data_modules())}; or a LightningDataModule's dotted path)"
    if re.fullmatch(r"the following arguments are required: \w+\.data", text):  # no --config (nor --data)
        return f"{text} (give a config, e.g. --config experiments/digits_quick.yaml, or --data CLASS)"
    return text + _did_you_mean(text)


def _given_last(option: str, argv: list[str]) -> bool:
    """Whether `option` (--data.batch_size, given so or as --data.init_args.batch_size) is on the command
    line after every --config (a config file after it may set the value again)."""
    at = [i for i, a in enumerate(argv) if a.split("=", 1)[0].replace(".init_args.", ".") == option]
    configs = [i for i, a in enumerate(argv) if a.split("=", 1)[0] in ("-c", "--config")]
    return bool(at) and at[-1] > max(configs, default=-1)


def data_modules() -> list[str]:
    """The data modules of dat_lab.data that `--data` takes by name (its base class left out)."""
    from .. import data

    return [name for name, c in vars(data).items() if isinstance(c, type) and issubclass(c, L.LightningDataModule)
            and c.__module__ == data.__name__ and c is not data.ImageDataModule]


TYPE_WORDS = {"bool": "a bool (true or false)", "int": "an int", "float": "a float", "str": "text", "NoneType": "null"}


def _union_error(err: BaseException) -> str | None:
    """For a value that fits none of an option's plain types and literal values (`--seed_everything
    abc`: bool or int; `--trainer.precision 12`), all of them (jsonargparse's innermost cause names
    only the first): "Expected a bool (true or false) or an int. Got value: abc"; None for other
    errors and other types."""
    for cause in error_chain(err):
        text = str(cause)
        subtypes = re.search(r"Subtypes: \[(.*)\]", text)
        given = re.search(r"Given value: (.*)", text)
        if "Does not validate against any of the Union subtypes" in text and subtypes and given:
            items = re.findall(r"typing\.Literal\[([^\]]*)\]|<class '(\w+)'>", subtypes.group(1))
            rest = re.sub(r"typing\.Literal\[[^\]]*\]|<class '\w+'>", "", subtypes.group(1))
            if not items or rest.strip(", ") or any(n and n not in TYPE_WORDS for _, n in items):
                return None
            values = list(dict.fromkeys(v.strip().strip("'\"") for lit, _ in items if lit for v in lit.split(",")))
            words = ([f"one of {', '.join(values)}"] if values else []) + [TYPE_WORDS[n] for _, n in items if n]
            return f"Expected {' or '.join(words)}. Got value: {given.group(1).strip()}"
    return None


def _init_args(cls: type) -> list[str]:
    return [n for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _did_you_mean(text: str) -> str:
    """For an option jsonargparse does not know (`model.lrr` in a config, `--model.lrr` on the command
    line, `batch_sizee` of --data): the options it may have meant, or (of the model) those there are."""
    from lightning.pytorch import Trainer  # (imported by LightningCLI already)

    found = re.search(r"does not accept option '([\w.]+)'|unrecognized arguments: --([\w.]+)", text)
    data = re.match(r"--data: Option '(\w+)' is not accepted", text)
    if data:
        group, name = "data.init_args", data.group(1)
    elif found:
        group, _, name = (found.group(1) or found.group(2)).rpartition(".")
    else:
        return ""
    groups = {"": ["model", "data", "trainer", "seed_everything", "ckpt_path", "name"],
              "model": [n for n in _init_args(ImageClassifier) if n != "model_config"],  # (checkpoints set it)
              "trainer": _init_args(Trainer), "data.init_args": sorted({n for c in _data_classes() for n in _init_args(c)})}
    if group not in groups:  # the group itself (`modell.lr`), not an option inside a known one's (`trainer.logger.x`)
        if group.partition(".")[0] in groups:
            return ""
        group, name = "", group.partition(".")[0]
    if group == "data.init_args" and name in groups[group]:  # another DataModule's option: none of this one's
        return ""
    prefix = f"{group}." if group in ("model", "trainer") else ""  # data: --data.X on a command line, init_args.X in a file
    if close := difflib.get_close_matches(name, groups[group], n=2, cutoff=0.75):
        return f" (did you mean {' or '.join(prefix + c for c in close)}?)"
    return f" (model options: {', '.join(groups[group])})" if group == "model" else ""


def _data_classes() -> list[type]:
    from .. import data

    return [c for c in vars(data).values() if isinstance(c, type) and issubclass(c, ImageDataModule)]


def rank_error(err: BaseException) -> str:
    """What failed in a spawned rank (torch's ProcessRaisedException holds its traceback as text): the
    first line of the exception that ended the traceback, its class without its module
    ("NonFiniteLossError: ...")."""
    lines = str(err).strip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    after = [line for line in lines[frames[-1] + 1:] if line and not line[0].isspace()] if frames else []
    first = (after or lines[-1:] or [type(err).__name__])[0]
    return re.sub(r"^(?:\w+\.)+(?=\w+(?::|$))", "", first)


def _check_yaml(path: str) -> None:
    """A --config file that is there but no YAML, in one line naming it and where (jsonargparse's own
    error names neither: "while parsing a block mapping")."""
    try:
        read_yaml(path, expected="a YAML training config")
    except OSError:  # not there: jsonargparse says so
        return
    except ValueError as err:
        raise ValueError(f"--config: {err}") from None


def tensorboard_logger(save_dir: str, name: str, version: str | int) -> Namespace:
    """The run's logger as a config: TensorBoard events under <save_dir>/<name>/<version>, no hp_metric
    placeholder (HparamsMetric writes the real one)."""
    return Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                     init_args=Namespace(save_dir=save_dir, name=name, version=version, default_hp_metric=False))


def main(args: list[str] | dict[str, Any] | None = None, extra_callbacks: list | None = None) -> DatLabCLI:
    """Run `dat-lab train [fit|validate|test] ...` (fit when no subcommand is given). `args` may also
    be {"fit": config dict}; `extra_callbacks` join the default ones (sweeps add theirs)."""
    if not isinstance(args, dict):
        args = list(args or [])
        if not args or args[0].startswith("-") and args[0] not in ("-h", "--help"):
            args = ["fit", *args]
        # a config file where a subcommand or an option belongs (`train x.yaml`, `train fit x.yaml`)
        word = args[1] if args[0] in SUBCOMMANDS and len(args) > 1 else args[0]
        if word not in SUBCOMMANDS + ("-h", "--help") and Path(word).suffix in (".yaml", ".yml", ".json"):
            raise ValueError(f"{word}: give a config file as --config {word} (the first word, if any, is "
                             f"one of {', '.join(SUBCOMMANDS)})")
        for before, word in zip(args, args[1:]):
            if before == "--config":
                _check_yaml(word)
    # sys.argv whole for a command line (see DatLabCLI.parse_arguments); a sweep's trial has none of its
    # own (its DDP spawns its ranks: sweep.plan.in_worker)
    _HELD.hold()
    try:
        with argv_set_aside() if isinstance(args, dict) else contextlib.nullcontext():
            # seed 0 unless given (Lightning's default, True, also comes to 0 where no seed was set, with a warning)
            return DatLabCLI(ImageClassifier, ImageDataModule, subclass_mode_data=True, args=args,
                             seed_everything_default=0, trainer_defaults={
                                 "default_root_dir": "runs", "callbacks": default_callbacks() + list(extra_callbacks or [])},
                             save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                             parser_kwargs={name: {"exit_on_error": False, **DESCRIPTIONS.get(name, {})} for name in SUBCOMMANDS}
                             | {"exit_on_error": False, "prog": "dat-lab train"})
    finally:
        _HELD.drop()
