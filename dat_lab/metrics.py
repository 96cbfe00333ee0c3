"""Metric names, defined once: training logs them, sweeps optimise them, analysis reads them.

| name | what |
|---|---|
| `train/loss` | training loss (soft-target CE under Mixup/CutMix), per step and per epoch |
| `train/acc1` | training top-1 (only without Mixup/CutMix, where it means something) |
| `train/lr` | learning rate, per step |
| `train/images_per_sec` | training throughput over the epoch's steps |
| `val/loss`, `val/acc1`, `val/acc5` | validation loss, top-1 and top-5 accuracy (fractions in [0, 1]) |
| `val_ema/acc1`, `val_ema/acc5` | the same for the EMA weights, when EMA is on |
| `offsets/stage{i}/mean_cells` | mean offset length in key-grid cells over the D blocks of stage i |
| `hp/best_val_acc1` | the best `val/acc1` of the run, the TensorBoard hparams metric |
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

TRAIN_LOSS = "train/loss"
TRAIN_ACC1 = "train/acc1"
LR = "train/lr"
THROUGHPUT = "train/images_per_sec"
VAL_LOSS = "val/loss"
VAL_ACC1 = "val/acc1"
VAL_ACC5 = "val/acc5"
VAL_EMA_ACC1 = "val_ema/acc1"
VAL_EMA_ACC5 = "val_ema/acc5"
HP_METRIC = "hp/best_val_acc1"
ACCURACIES = frozenset({TRAIN_ACC1, VAL_ACC1, VAL_ACC5, VAL_EMA_ACC1, VAL_EMA_ACC5, HP_METRIC})  # fractions: shown in %
OBJECTIVES = {VAL_ACC1: "maximize", VAL_ACC5: "maximize", VAL_LOSS: "minimize", VAL_EMA_ACC1: "maximize",
              VAL_EMA_ACC5: "maximize"}  # what a sweep may optimise, and its direction unless the spec says
OFFSET_HISTOGRAM = "offsets/stage{stage}"
SAMPLING_IMAGE = "offsets/sampling_points"


def offset_mean(stage: int) -> str:
    """Scalar: mean offset length in key-grid cells of the deformable blocks of a stage."""
    return f"offsets/stage{stage}/mean_cells"


def tracked(metric: str, which: str) -> str:
    """Not logged: where MetricTracker keeps the best or the last validation's value of `metric` in a
    trainer's callback metrics."""
    return f"{metric}:{which}"


def cell_name(levels: Mapping[str, Any]) -> str:
    """A cell's levels as "factor=level, ...", in the spec's factor order."""
    return ", ".join(f"{k}={v}" for k, v in levels.items())


BASE_CELL = "(base)"  # how tables and messages name the one cell of a grid without factors


def cell_shown(key: str) -> str:
    """A cell key as tables and messages show it: that of the cell without factors (" | seed=0") named."""
    return BASE_CELL + key if key.startswith(" | ") else key


def cell_key(levels: Mapping[str, Any], seed: int) -> str:
    """The TRIAL_CELL value of a cell and seed, "factor=level, ... | seed=s": how analysis finds a cell."""
    return f"{cell_name(levels)} | seed={seed}"


# Trial user attributes a sweep writes and analysis reads (Optuna storage).
TRIAL_CELL = "cell"  # cell_key(levels, seed): unique per cell and seed
TRIAL_LEVELS = "levels"  # {factor: level}
TRIAL_SEED = "seed"
TRIAL_BEST = "best"  # best objective metric over validations
TRIAL_FINAL = "final"  # last objective metric
TRIAL_PARAMS_M = "params_m"
TRIAL_GFLOPS = "gflops"
TRIAL_IMAGES_PER_S = "images_per_s"
TRIAL_WALL_S = "wall_s"
TRIAL_RUN_DIR = "run_dir"
TRIAL_LAST_STEP = "last_step"  # the step its last validation was logged at: its learning curve ends there
TRIAL_FAILURE = "failure"
TRIAL_REPRODUCE = "reproduce"
TRIAL_WORKER = "worker"  # host:pid of the worker that ran it
TRIAL_DUPLICATE_OF = "duplicate_of"  # pruned: the trial number that runs its cell
STUDY_SPEC = "spec"  # the spec's path, as the first run gave it
# Study user attributes.
STUDY_METRIC = "metric"
STUDY_DIRECTION = "direction"
STUDY_FACTORS = "factors"  # {factor: {"levels": [...], "baseline": level, "paper_table": 6 | 7 | None}}
STUDY_SEEDS = "seeds"
STUDY_SAMPLER = "sampler"  # "grid" (cells, maybe no factors: seeds of one config) or "tpe" (a search)
STUDY_HEARTBEAT = "heartbeat"  # [interval, grace] in seconds, the spec's: a RUNNING trial silent for grace is stale
HEARTBEAT = (10, 30)  # a spec's heartbeat (interval, grace) when it names none, and a study's that recorded none
# Columns of analysis's frames and tables beside the factors' (a factor must be named otherwise).
TRIAL_COLUMNS = ("cell", "seed", "status", "trial", "value", "params_m", "gflops", "images_per_s", "run_dir",
                 "last_step", "failure")  # of a study's trials frame, besides the factors or searched parameters
TABLE_COLUMNS = ("mean", "std", "n", "diff", "baseline", "seeds", "params (M)", "FLOPs (G)", "images/s", "status")


def default_storage(study: str) -> str:
    """Where a sweep keeps a study when no storage is named (the embedded default)."""
    return f"sqlite:///runs/{study}.db"


STORAGE_SCHEMES = ("sqlite:", "postgresql:", "postgresql+", "mysql:", "mysql+")


def sqlite_path(url: str) -> Path | None:
    """The file of an sqlite:/// storage URL (without its ?options), None for a database server."""
    return Path(url.removeprefix("sqlite:///").split("?")[0]) if url.startswith("sqlite:///") else None


def shown_url(url: str) -> str:
    """A storage URL as printed: its password as *** (output and logs may be shared)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # not a URL SQLAlchemy reads: the password between : and @, as a guess
        return re.sub(r"(://[^:/@]*:).*@", r"\1***@", url)
    if "password" in parsed.query:
        parsed = parsed.update_query_dict({"password": "***"})
    return parsed.render_as_string(hide_password=True)


def check_storage_url(url: str) -> None:
    """Raise ValueError unless `url` names an SQLite file or a PostgreSQL (or MySQL) database."""
    if not url.startswith(STORAGE_SCHEMES):
        raise ValueError(f"storage: {shown_url(url)!r} is not an SQLite or PostgreSQL URL (sqlite:///runs/x.db, "
                         "postgresql://user:pass@host/db)")
    if url.split("?")[0] == "sqlite://" or str(sqlite_path(url)) in (".", ":memory:"):
        raise ValueError(f"storage: {url} is in memory: it holds a study only while its process runs; give a "
                         "file: sqlite:///runs/x.db")


def storage_error(url: str, err: BaseException) -> str:
    """One line for a storage that cannot be opened (an unreachable database, a missing driver)."""
    return f"--storage: cannot open {shown_url(url)}: {(str(err).splitlines() or [type(err).__name__])[0]}"
