"""Run a sweep on an Optuna study: every cell trained once, however often workers crash.

Grid sweeps (ablations): each cell of the spec is a WAITING trial in the study; a worker claims one
with `study.ask()` (a claim is one storage transaction, so two workers never claim the same trial),
trains it, and tells the result. Before working, every worker enqueues the cells that have no
COMPLETE, RUNNING or WAITING trial: a rerun picks up failed and never-started cells and never repeats
a finished one. Workers send heartbeats; a RUNNING trial whose worker died (kill -9, power loss) goes
stale after the grace period, Optuna marks it FAILED and queues it again (RetryHeartbeatStaleTrialCallback).
Should two workers ever hold trials of the same cell, the later trial yields (is pruned as a
duplicate) before training, so no cell ends with two COMPLETE trials.

TPE searches sample the spec's search space until the study holds `n_trials` finished (complete,
pruned or failed) trials, with Optuna's Lightning pruning callback when the spec has a pruner.

A trial trains in its worker's process; a DDP trial spawns its ranks (plan.in_worker: `ddp` becomes
`ddp_spawn`, Optuna's way, with the pruning callback's `check_pruned`), whose results Lightning brings
back. A trial trains as rank 0 of its own, whatever launched the worker (srun, torchrun): its DDP in
Lightning's own environment (in_worker), and the launcher's variables gone (as_own_rank). Workers
started together on one machine (`--workers`) split its GPUs (gpu_shares).

A study stores the fingerprint of the spec that made it (SweepSpec.fingerprint, with what planning
found of its data: an image folder's class names): a rerun with a spec, or data, that would change its
results is refused before training (preflight, and open_study for workers). A grid may grow: more seeds
or levels are cells of their own (check_fingerprint says what they add; open_study stores the new
fingerprint and queues them).
Trial numbers are never reused within a study, so a trial refuses a non-empty run folder of its number.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import optuna
import sqlalchemy.exc
from lightning.fabric.accelerators.cuda import num_cuda_devices
from lightning.fabric.utilities.rank_zero import rank_zero_only
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState
from torch.multiprocessing import ProcessRaisedException

from .. import metrics as M
from ..data import DataError
from ..metrics import check_storage_url
from ..outputs import check_output_folder
from ..profile import Profile
from ..training.callbacks import MetricTracker
from ..training.cli import config_error, error_chain, rank_error, tensorboard_logger
from ..training.cli import main as train
from .plan import (GPU_ACCELERATORS, PlannedCell, device_numbers, in_worker, model_config, model_cost,
                   parse_training_config, plan, processes)
from .spec import DATA_IDENTITY, NOT_FINGERPRINTED, SpecError, SweepSpec, build_pruner, build_sampler, deep_merge, nest

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
warnings.filterwarnings("ignore", message="The `srun` command is available")  # Lightning's, in trials without SLURM_NTASKS
DDP_PRUNED, DDP_REPORTS = "ddp_pl:pruned", "ddp_pl:intermediate_value"  # trial system attributes in which
# the DDP ranks of Optuna's Lightning pruning callback record pruning and reports
CELL = M.TRIAL_CELL  # the cell key ("factor=level, ... | seed=s"); retries inherit it
POLL_SECONDS = 2.0


def make_storage(url: str, heartbeat: tuple[int, int] = M.HEARTBEAT) -> RDBStorage:
    """An RDB storage (SQLite file or PostgreSQL) with heartbeats and retry of stale trials."""
    check_storage_url(url)
    if (file := M.sqlite_path(url)) is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
    driver = "postgresql+psycopg://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url
    interval, grace = heartbeat  # (psycopg: the driver dat-lab installs)
    try:
        return RDBStorage(driver, heartbeat_interval=interval, grace_period=grace,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                          engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as err:  # unreachable database, missing driver
        raise SpecError(M.storage_error(url, err)) from None  # (the URL as given, not the driver's)


def _fingerprint(spec: SweepSpec, planned: Iterable[PlannedCell] | None) -> dict[str, Any]:
    """The spec's fingerprint with the identity of the data its planned cells found (SweepSpec.fingerprint)."""
    return spec.fingerprint(data=(d for p in planned or () for d in p.data))


ENQUEUED = "enqueued"  # study user attribute: the creating worker has queued every cell
FINGERPRINT = "fingerprint"  # study user attribute: SweepSpec.fingerprint() of the spec that created it
RUN_DIR = re.compile(r"trial_(\d+)")
BASELINE_FIELD = re.compile(r"factors\.(?:(?!\.levels\.).)+\.baseline")  # a factor's baseline in a fingerprint


def _level_of(spec: SweepSpec, key: str) -> tuple[str, str] | None:
    """(factor, level) of a fingerprint field `factors.<factor>.levels.<level>[.<path>]` of spec's
    factors (the longest level name that fits: "0.5" before "0"), else None."""
    fits = [(f.name, level) for f in spec.factors for level in f.levels
            if key == (at := f"factors.{f.name}.levels.{level}") or key.startswith(at + ".")]
    return max(fits, key=lambda fit: len(fit[1]), default=None)


def _extension(spec: SweepSpec, stored: dict[str, Any], current: dict[str, Any], differ: list[str]) -> str | None:
    """Where the fields that differ only add seeds, or levels to the grid's factors (cells of their own,
    leaving those of the study as they were): what they add ("seeds 2; s levels 4"; "" for the seeds in
    another order); else None."""
    if not spec.is_grid:
        return None
    seeds, levels, stored_levels = [], {}, {_level_of(spec, k) for k in stored}
    for key in differ:
        if key == "seeds":
            old, new = stored.get(key), current.get(key)
            if not (isinstance(old, list) and isinstance(new, list) and set(old) <= set(new)):
                return None
            seeds = [s for s in new if s not in old]
        elif key in stored or (found := _level_of(spec, key)) is None:  # changed or gone, or no level's
            return None
        elif found in stored_levels or not any(
                k.startswith(f"factors.{found[0]}.levels.") for k in stored):  # a level changed, or a new factor
            return None
        elif found[1] not in (names := levels.setdefault(found[0], [])):  # (a level's fields come one by one)
            names.append(found[1])
    return "; ".join(([f"seeds {', '.join(map(str, seeds))}"] if seeds else [])
                     + [f"{factor} levels {', '.join(names)}" for factor, names in levels.items()])


def check_fingerprint(spec: SweepSpec, stored: dict[str, Any] | None, name: str, storage: str,
                      planned: Iterable[PlannedCell] | None = None) -> str | None:
    """Raise SpecError, naming the first fields that differ, unless `spec` (whose `planned` cells found
    their data; None: not looked at yet, the data not compared) defines the same results as the spec
    that created study `name` (its stored fingerprint; a study from before fingerprints passes), or
    extends its grid by seeds or levels (_extension): then what it adds."""
    if stored is None:
        return None
    # fingerprints stored before NOT_FINGERPRINTED, or before baselines were left out, hold them
    stored = {k: v for k, v in stored.items() if k not in NOT_FINGERPRINTED and not BASELINE_FIELD.fullmatch(k)}
    current = _fingerprint(spec, planned)
    if planned is None or DATA_IDENTITY not in stored:  # stored before fingerprints held the data's identity
        current.pop(DATA_IDENTITY, None)
        stored.pop(DATA_IDENTITY, None)
    differ = [k for k in [*current, *(k for k in stored if k not in current)] if current.get(k) != stored.get(k)]
    if differ and (added := _extension(spec, stored, current, differ)) is not None:
        return added  # ("": the seeds in another order)
    if differ:  # what an extension could not do first (a seed or level added beside it is no fault)
        differ.sort(key=lambda k: _extension(spec, stored, current, [k]) is not None)
        shown = list(dict.fromkeys(_change(k, stored, current) for k in differ))  # a factor's fields as one
        fields, more = "; ".join(shown[:3]), f" (and {len(shown) - 3} more)" if len(shown) > 3 else ""
        made = "on other data" if differ == [DATA_IDENTITY] else "by another spec"
        raise SpecError(f"study {name!r} in {M.shown_url(storage)} was made {made}, its results would mix: {fields}{more}; "
                        f"use --study NEW_NAME for a new study, or the original spec and options to resume it")


def _change(key: str, stored: dict[str, Any], current: dict[str, Any]) -> str:
    """A fingerprint field's change as a refusal names it; a field of a factor, or of a level, only one
    side has: the factor, or the level, new or gone."""
    if factor := re.match(r"factors\.(.+?)\.levels\.", key):
        at = f"factors.{factor.group(1)}.levels."
        for side, word in ((stored, "new"), (current, "gone")):
            if not any(k.startswith(at) for k in side):
                return f"factor {factor.group(1)}: {word}"
        level = _level_name(key.removeprefix(at))
        has = [any(_level_name(k.removeprefix(at)) == level for k in side if k.startswith(at)) for side in (stored, current)]
        if has[0] != has[1]:
            return f"factor {factor.group(1)}: level {level} {'gone' if has[0] else 'new'}"
    return f"{key}: {stored.get(key, '(unset)')!r} -> {current.get(key, '(unset)')!r}"


CONFIG_GROUPS = {"model", "data", "trainer", "seed_everything", "optimizer", "lr_scheduler", "ckpt_path"}


def _level_name(field: str) -> str:
    """The level of a fingerprint field below `factors.<factor>.levels.`: "0.5.model.lr" -> "0.5" (a
    level's name may hold dots; what follows it is a training config's path, or nothing for an empty level)."""
    parts = field.split(".")
    return next((".".join(parts[:n]) for n in range(1, len(parts)) if parts[n] in CONFIG_GROUPS), field)


def run_dirs(runs_root: str, name: str) -> dict[int, Path]:
    """The non-empty runs/<study>/trial_<n> folders, by trial number."""
    root = Path(runs_root) / name
    found = ((RUN_DIR.fullmatch(d.name), d) for d in (sorted(root.iterdir()) if root.is_dir() else []))
    return {int(m.group(1)): d for m, d in found if m and d.is_dir() and any(d.iterdir())}


def preflight(spec: SweepSpec, storage: RDBStorage | None, url: str, name: str, runs_root: str,
              planned: Iterable[PlannedCell] | None = None) -> str | None:
    """Before any training (a dry run too: this only reads): refuse a study of this name made by another
    spec, and run folders of no trial of this study, which its trials would write into (the study name
    was used in another storage, or its storage was deleted). Trial numbers are never reused within a
    study (a re-queued cell is a new trial), so a resume finds only its own trials' folders. `storage`
    None: the storage does not exist yet. What this spec adds to the study's grid (check_fingerprint), if any."""
    check_output_folder(Path(runs_root) / name, option="--runs-root")  # trials write into runs_root/<study>/
    known = storage is not None or M.sqlite_path(url) is not None  # else a database server not opened (a dry run)
    dirs = run_dirs(runs_root, name) if known else {}  # listed before the trials are read: a running worker's
    # trial is known; a server's trials unknown, no folder is called a stray
    numbers: set[int] = set()
    try:
        study_id = storage.get_study_id_from_name(name) if storage is not None else None
    except KeyError:  # a new study
        study_id = None
    added = None
    if study_id is not None:
        added = check_fingerprint(spec, storage.get_study_user_attrs(study_id).get(FINGERPRINT), name, url, planned)
        numbers = {t.number for t in storage.get_all_trials(study_id, deepcopy=False)}
    stray = [d for n, d in dirs.items() if n not in numbers]
    if stray:
        more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
        raise SpecError(f"--runs-root: {stray[0]}{more} holds a run that is no trial of study {name!r} in {M.shown_url(url)} "
                        f"(the same study name in another storage?); use another --study name or move "
                        f"{stray[0].parent} away")
    return added


def open_study(spec: SweepSpec, storage: str, name: str, planned: list[PlannedCell] | None = None,
               wait_s: float | None = None) -> optuna.Study:
    """Create the study (and queue its cells) or load it. Creation is one storage transaction, so of
    workers starting together exactly one creates; the others wait until it has queued the grid (up to
    `wait_s`, default 120 s, 15 s for SQLite, where no workers start together: a creator killed left it)."""
    wait_s = wait_s if wait_s is not None else 15.0 if M.sqlite_path(storage) is not None else 120.0
    kwargs = dict(storage=make_storage(storage, spec.heartbeat), study_name=name, direction=spec.direction,
                  sampler=build_sampler(spec.sampler), pruner=build_pruner(spec.pruner))
    try:
        study = optuna.create_study(**kwargs)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**{k: v for k, v in kwargs.items() if k != "direction"})
        check_fingerprint(spec, study.user_attrs.get(FINGERPRINT), name, storage, planned)  # at once, if stored yet
        deadline = time.time() + wait_s
        # a study being created has no user attribute until its creator stores the fingerprint (its first);
        # a grid's workers also wait until the creator has queued the cells
        def unmade(attrs: dict[str, Any]) -> bool:
            return not attrs or spec.is_grid and ENQUEUED not in attrs

        if wait_s > 0 and unmade(study.user_attrs):
            what = "no fingerprint" if not study.user_attrs else "no cells queued"
            print(f"study {name!r} has {what} yet: waiting up to {wait_s:.0f} s for the worker creating it (if it "
                  f"was killed, this one finishes making it)", file=sys.stderr)
        while unmade(study.user_attrs) and time.time() < deadline:
            time.sleep(POLL_SECONDS / 4)
        if check_fingerprint(spec, stored := study.user_attrs.get(FINGERPRINT), name, storage, planned):  # once stored
            ours = _fingerprint(spec, planned)  # (and queued); more seeds or levels: the grid grows, guarded as it is now
            if DATA_IDENTITY in stored and DATA_IDENTITY not in ours:  # (a worker that did not plan compares no data)
                ours[DATA_IDENTITY] = stored[DATA_IDENTITY]
            _store_fingerprint(study, ours, spec, name, storage, planned)  # another grown spec stored at once?
            study.set_user_attr(M.STUDY_SEEDS, list(spec.seeds))
        if M.STUDY_SAMPLER not in study.user_attrs:  # made before studies recorded it (analysis reads it)
            study.set_user_attr(M.STUDY_SAMPLER, spec.sampler["name"])
        if study.user_attrs.get(M.STUDY_HEARTBEAT) != list(spec.heartbeat):  # it may change: status reads the latest
            study.set_user_attr(M.STUDY_HEARTBEAT, list(spec.heartbeat))
        if FINGERPRINT not in study.user_attrs:  # from before fingerprints, or its creator died: guarded from now on
            _store_fingerprint(study, _fingerprint(spec, planned), spec, name, storage, planned)  # two adopting at once?
        elif DATA_IDENTITY not in study.user_attrs[FINGERPRINT]:  # stored before it held the data (else the same):
            if DATA_IDENTITY in (ours := _fingerprint(spec, planned)):  # the data are guarded from now on
                study.set_user_attr(FINGERPRINT, ours)
        if study.user_attrs.get(M.STUDY_FACTORS) != (factors := _factors(spec)):  # baselines may change: analysis's
            study.set_user_attr(M.STUDY_FACTORS, factors)
    else:
        study.set_user_attr(FINGERPRINT, _fingerprint(spec, planned))  # first: what a loading worker checks
        study.set_user_attr(M.STUDY_SPEC, str(spec.path))
        study.set_user_attr(M.STUDY_METRIC, spec.metric)
        study.set_user_attr(M.STUDY_DIRECTION, spec.direction)
        study.set_user_attr(M.STUDY_SEEDS, list(spec.seeds))
        study.set_user_attr(M.STUDY_SAMPLER, spec.sampler["name"])
        study.set_user_attr(M.STUDY_HEARTBEAT, list(spec.heartbeat))
        study.set_user_attr(M.STUDY_FACTORS, _factors(spec))
    if spec.is_grid and planned is not None:
        enqueue_missing(study, planned)
        study.set_user_attr(ENQUEUED, True)
    return study


def _store_fingerprint(study: optuna.Study, fingerprint: dict[str, Any], spec: SweepSpec, name: str, storage: str,
                       planned: list[PlannedCell] | None) -> None:
    """Store `fingerprint` as the study's, then check it again: of two workers storing theirs at once,
    the one stored last holds, and the other stops here (SpecError) unless they agree."""
    study.set_user_attr(FINGERPRINT, fingerprint)
    time.sleep(POLL_SECONDS / 4)
    check_fingerprint(spec, study.user_attrs.get(FINGERPRINT), name, storage, planned)


def _factors(spec: SweepSpec) -> dict[str, dict[str, Any]]:
    """The study's record of its factors, which analysis reads (M.STUDY_FACTORS)."""
    return {f.name: {"levels": list(f.levels), "baseline": f.baseline, "paper_table": f.paper_table}
            for f in spec.factors}


def cell_trials(study: optuna.Study) -> dict[str, list[FrozenTrial]]:
    """Trials by cell key."""
    out: dict[str, list[FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        if CELL in t.user_attrs:
            out.setdefault(t.user_attrs[CELL], []).append(t)
    return out


def enqueue_missing(study: optuna.Study, planned: list[PlannedCell]) -> int:
    """Queue every cell with no COMPLETE, RUNNING or WAITING trial, with its params and FLOPs (analysis shows
    them for cells not run yet); how many were queued."""
    by_cell = cell_trials(study)
    queued = 0
    for p in planned:
        states = {t.state for t in by_cell.get(p.cell.key, [])}
        if not states & {TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING}:
            study.enqueue_trial({}, user_attrs={CELL: p.cell.key, **_cost_attrs(p.cost)})
            queued += 1
    return queued


def _failure(err: BaseException) -> str:
    """A trial's failure reason, one line: a data error as `dat-lab train` words it (jsonargparse wraps
    the DataError raised while it builds the DataModule in a Union error), else the error's first line."""
    cause = next((e for e in error_chain(err) if isinstance(e, DataError)), None)
    if cause is None and isinstance(err, ProcessRaisedException):  # in a spawned rank
        return rank_error(err)
    text = config_error(cause) if cause is not None else (str(err).splitlines() or [""])[0]
    return f"{type(err).__name__}: {text}"


def _cost_attrs(profile: Profile) -> dict[str, float]:
    """The model's params (M) and FLOPs (G) as trial attributes, to 6 significant digits."""
    shown = profile.shown()
    return {M.TRIAL_PARAMS_M: shown["params_m"], M.TRIAL_GFLOPS: shown["gflops"]}


def _record_cost(trial: optuna.Trial, profile: Profile) -> None:
    for name, value in _cost_attrs(profile).items():
        trial.set_user_attr(name, value)


def reproduce_command(run_dir: Path) -> str:
    """The command that trains a trial again, into runs/<study>_trial_<nnnn>_again/version_<n>/."""
    name = f"{run_dir.parent.name}_{run_dir.name}_again"
    return (f"dat-lab train --config {run_dir / 'config.yaml'} --trainer.logger true --trainer.enable_progress_bar true "
            f"--name {name}")


LAUNCHER_VARIABLES = re.compile(r"TORCHELASTIC_\w+|(LOCAL_|GROUP_|ROLE_)?RANK|(LOCAL_|GROUP_|ROLE_)?WORLD_SIZE|"
                                r"ROLE_NAME|NODE_RANK|MASTER_ADDR|MASTER_PORT|SLURM_NTASKS")


def as_own_rank() -> None:
    """Make this worker rank 0 of a trial of its own: without the variables a launcher (torchrun, srun, a
    Kubernetes job) gave it, which Lightning and torch read as the trial's, and with Lightning's
    rank-zero-only calls on. Under torchrun a DDP trial's ranks waited forever for a store torchrun's
    agent was to serve; under srun (SLURM_NTASKS: Lightning's SLURM environment) a single-device trial
    failed on `--ntasks` without `--ntasks-per-node`, and resumed from any `runs/hpc_ckpt_*.ckpt` in the
    working directory; in a job's second srun task (Lightning read SLURM_PROCID) trials wrote no
    TensorBoard logs. The job's other variables (SLURM_JOB_ID, SLURM_PROCID, ...) stay."""
    for name in [n for n in os.environ if LAUNCHER_VARIABLES.fullmatch(n)]:
        del os.environ[name]
    rank_zero_only.rank = 0


def run_trial(study: optuna.Study, trial: optuna.Trial, spec: SweepSpec, planned: dict[str, PlannedCell],
              runs_root: str) -> float:
    """Train one trial (a grid cell, or a TPE sample); record what analysis needs as user attributes,
    and whatever failed it as its failure reason (a FAIL without one reads as interrupted: run again)."""
    try:
        return _run_trial(study, trial, spec, planned, runs_root)
    except optuna.TrialPruned:
        raise
    except (Exception, KeyboardInterrupt) as err:  # Ctrl-C before its training began too
        if M.TRIAL_FAILURE not in trial.user_attrs:
            trial.set_user_attr(M.TRIAL_FAILURE, "interrupted" if isinstance(err, KeyboardInterrupt) else _failure(err))
        raise


def _run_trial(study: optuna.Study, trial: optuna.Trial, spec: SweepSpec, planned: dict[str, PlannedCell],
               runs_root: str) -> float:
    key = trial.user_attrs.get(CELL)
    if spec.is_grid:
        if key is not None and key not in planned:  # the study grew since this worker's spec was read (more
            study.enqueue_trial({}, user_attrs=dict(trial.user_attrs))  # seeds or levels): queued again for the
            raise optuna.TrialPruned(f"cell {key} is not in this worker's spec (the study grew since it started): "
                                     "queued again")  # grown spec's workers; _next_round stops this one
        if key not in planned:
            raise optuna.TrialPruned("no queued cell for this trial (another worker took the last one)")
        others = [t for t in cell_trials(study).get(key, []) if t.number != trial.number]
        first = next((t for t in others if t.state == TrialState.COMPLETE
                      or (t.state == TrialState.RUNNING and t.number < trial.number)), None)
        if first is not None:
            trial.set_user_attr(M.TRIAL_DUPLICATE_OF, first.number)
            raise optuna.TrialPruned(f"duplicate: cell {key!r} is trial {first.number}'s")
        p = planned[key]
        config, seed = p.config, p.cell.seed
        trial.set_user_attr(M.TRIAL_LEVELS, p.cell.levels)
    else:
        p = next(iter(planned.values()))
        config, seed = spec.trial_config(p.cell.delta, p.cell.seed), p.cell.seed  # as given: in_worker below
        for path, dist in spec.search_space.items():
            config = deep_merge(config, nest(path, _suggest(trial, path, dist)))
        cost = model_cost(model_config(parse_training_config(config)))  # (a search may choose the model)
        config = in_worker(config)  # a search space may set trainer options (plan checked each choice alone)
    run_dir = (Path(runs_root) / study.study_name / f"trial_{trial.number:04d}").absolute()  # any working dir
    if run_dir.is_dir() and any(run_dir.iterdir()):  # trial numbers are never reused within a study
        reason = (f"run directory {run_dir} already holds another run (the same study name in another storage?); "
                  f"use another --study name or move {run_dir.parent} away")
        trial.set_user_attr(M.TRIAL_FAILURE, reason)
        raise RuntimeError(reason)
    config = deep_merge(config, {"trainer": {
        "logger": tensorboard_logger(str(run_dir.parent.parent), study.study_name, run_dir.name).as_dict(),  # any cwd
        "enable_progress_bar": False, "enable_model_summary": False}})
    trial.set_user_attr(M.TRIAL_SEED, seed)
    trial.set_user_attr(M.TRIAL_WORKER, f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr(M.TRIAL_RUN_DIR, str(run_dir))
    trial.set_user_attr(M.TRIAL_REPRODUCE, reproduce_command(run_dir))
    _record_cost(trial, p.cost if spec.is_grid else cost)  # before training: a pruned or failed trial has them too
    tracker = MetricTracker(metric=spec.metric, direction=spec.direction)
    pruning = None
    if spec.pruner["name"] != "none":
        from optuna_integration import PyTorchLightningPruningCallback

        pruning = PyTorchLightningPruningCallback(trial, monitor=spec.metric)
        if trial.storage.get_trial_system_attrs(trial._trial_id).get(DDP_PRUNED):  # a retry inherits them
            trial.storage.set_trial_system_attr(trial._trial_id, DDP_PRUNED, False)
            trial.storage.set_trial_system_attr(trial._trial_id, DDP_REPORTS, None)
    start = time.time()
    as_own_rank()
    try:
        cli = train({"fit": config}, extra_callbacks=[tracker, *([pruning] if pruning else [])])
        if pruning is not None:
            pruning.check_pruned()  # DDP: ranks stop and record it, the process that asked raises (Optuna's way)
    except optuna.TrialPruned:
        raise
    except (KeyboardInterrupt, SystemExit) as err:  # Lightning turns Ctrl-C into SystemExit
        trial.set_user_attr(M.TRIAL_FAILURE, "interrupted")
        raise KeyboardInterrupt from err
    finally:
        trial.set_user_attr(M.TRIAL_WALL_S, round(time.time() - start, 2))
    throughput = cli.trainer.callback_metrics.get(M.THROUGHPUT)
    trial.set_user_attr(M.TRIAL_IMAGES_PER_S, round(float(throughput), 2) if throughput is not None else None)
    best, last, step = tracker.results(cli.trainer)
    if best is None:
        raise RuntimeError(f"no {spec.metric} was logged: does the run validate?")
    trial.set_user_attr(M.TRIAL_BEST, best)
    trial.set_user_attr(M.TRIAL_FINAL, last)
    trial.set_user_attr(M.TRIAL_LAST_STEP, step)
    value = best if spec.value == "best" else last
    if not math.isfinite(value):  # Optuna would fail the trial with no reason recorded
        raise RuntimeError(f"{spec.metric} ({spec.value}) is {value}")
    return value


def _suggest(trial: optuna.Trial, name: str, dist: dict[str, Any]) -> Any:
    if dist["type"] == "float":
        return trial.suggest_float(name, dist["low"], dist["high"], log=dist.get("log", False), step=dist.get("step"))
    if dist["type"] == "int":
        return trial.suggest_int(name, dist["low"], dist["high"], log=dist.get("log", False), step=dist.get("step", 1))
    return trial.suggest_categorical(name, dist["choices"])


def study_progress(study: optuna.Study, spec: SweepSpec, planned: dict[str, PlannedCell]) -> tuple[int, int, bool]:
    """(done, total, whether anything is still to run or running)."""
    if spec.is_grid:
        by_cell = cell_trials(study)
        states = {k: {t.state for t in by_cell.get(k, [])} for k in planned}
        done = sum(TrialState.COMPLETE in s for s in states.values())
        active = any(s & {TrialState.WAITING, TrialState.RUNNING} and TrialState.COMPLETE not in s
                     for s in states.values())
        return done, len(planned), active
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    # a trial that failed in training is finished too (else a search whose trials all fail never ends); one
    # interrupted or left stale by a dead worker (no reason recorded) is not: a rerun samples it again
    trials = [t for t in trials if t.state != TrialState.FAIL
              or t.user_attrs.get(M.TRIAL_FAILURE, "interrupted") != "interrupted"]
    # a rerun with a lower n_trials than the study already holds: all done, not "4/2"
    return len(trials), max(spec.n_trials, len(trials)), len(trials) < spec.n_trials


def work(spec: SweepSpec, *, storage: str, study_name: str, runs_root: str = "runs",
         planned: list[PlannedCell] | None = None, progress: Callable[[int, int], None] | None = None,
         on_trial: Callable[[FrozenTrial], None] | None = None, worker: int | None = None) -> optuna.Study:
    """One worker (`worker`: its number among those started on this machine together): claim and train
    trials until the sweep has nothing left to run; `on_trial` gets each trial this worker ran, as it
    ended (COMPLETE, PRUNED or FAIL)."""
    # the progress bar says how it goes, on_trial what failed; Optuna's warnings would add a traceback for
    # every failed or interrupted trial, whose reason is stored (sweep-status) and whose run can be reproduced
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("timm.scheduler.cosine_lr").setLevel(logging.ERROR)  # "no effect" on every 1-epoch trial
    planned_list = planned if planned is not None else plan(spec, spec.planned_cells())
    by_key = {p.cell.key: p for p in planned_list}
    study = open_study(spec, storage, study_name, planned_list)
    objective = lambda trial: run_trial(study, trial, spec, by_key, runs_root)  # noqa: E731
    with _interrupts_seen() as interrupted:
        while True:
            if interrupted:  # a Ctrl-C that Python swallowed (see _interrupts_seen): stop after the trial it hit
                raise KeyboardInterrupt
            if _next_round(study, spec, by_key, objective, progress, on_trial, worker):
                return study


def _sampler_for_next_trial(spec: SweepSpec, study: optuna.Study, worker: int | None) -> optuna.samplers.BaseSampler:
    """A search's sampler for the trial this worker asks for next, seeded from the spec's seed, the number
    of trials the study has, this machine and this worker: a resumed search, and workers asking at once
    (on one machine or several), draw points of their own (one seed drew a resumed search's first points
    again, and the same points in every worker); one worker from scratch on one machine draws the same
    points each time."""
    key = f"{spec.sampler.get('seed', 0)}:{len(study.get_trials(deepcopy=False))}:{socket.gethostname()}:{worker}"
    return build_sampler({**spec.sampler, "seed": int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")})


def _next_round(study: optuna.Study, spec: SweepSpec, by_key: dict[str, PlannedCell], objective: Callable,
                progress: Callable[[int, int], None] | None, on_trial: Callable[[FrozenTrial], None] | None,
                worker: int | None = None) -> bool:
    """One turn of a worker's loop: stale trials failed (and queued again), then a trial claimed and run,
    or a wait for other workers' trials; whether the sweep has nothing left to run."""
    fail_stale_trials(study)  # stale RUNNING -> FAILED, and queued again by the retry callback
    done, total, active = study_progress(study, spec, by_key)
    if progress:
        progress(done, total)
    if not active:
        return True
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    unknown = sorted({k for t in waiting if (k := t.user_attrs.get(CELL)) is not None and k not in by_key})
    if spec.is_grid and unknown:  # left for the workers of the spec it grew to (this one would prune them)
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise SpecError(f"study {study.study_name!r} grew since this worker started (cell {unknown[0]}{more} is not in "
                        "its spec): this worker stops; run the spec it grew to")
    if spec.is_grid and not waiting:
        time.sleep(POLL_SECONDS)  # cells run elsewhere; wait in case their worker dies
        return False
    if not spec.is_grid:
        study.sampler = _sampler_for_next_trial(spec, study, worker)
    study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True,
                   callbacks=[lambda _, trial: on_trial(trial)] if on_trial else None)
    return False


@contextlib.contextmanager
def _interrupts_seen() -> Iterator[list[int]]:
    """SIGINT noted as well as raised: Python swallows a KeyboardInterrupt raised inside a garbage
    collection callback or a __del__ ("Exception ignored in ..."), as after each trial (gc_after_trial),
    and the sweep would go on. Outside the main thread (no signals there), nothing is noted."""
    seen: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield seen
        return

    def note(signum: int, frame: Any) -> None:
        seen.append(signum)
        previous(signum, frame)  # Python's own: raises KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def visible_gpus() -> list[str]:
    """This machine's GPUs, named as CUDA_VISIBLE_DEVICES names them."""
    count = num_cuda_devices()
    named = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return named[:count] if len(named) >= count else [str(i) for i in range(count)]


def gpu_shares(planned: Iterable[PlannedCell], workers: int, gpus: list[str]) -> list[str] | None:
    """Each worker's CUDA_VISIBLE_DEVICES, where trials train on `gpus` (this machine's): an even split,
    so that no two workers' trials share a GPU; None where there is nothing to split. ValueError, before
    anything runs, when a trial asks for GPUs on a machine with none, or for more than a worker gets."""
    trainers = [p.config.get("trainer") or {} for p in planned]
    asked = [(str(t.get("accelerator", "auto")), t.get("devices", "auto")) for t in trainers]
    if not gpus:
        if named := next((acc for acc, _ in asked if acc in GPU_ACCELERATORS and acc != "auto"), None):
            raise ValueError(f"trainer.accelerator: {named}, and this machine has no GPU; run the sweep where "
                             f"there are GPUs, or give delta.trainer.accelerator=cpu")
        return None
    need = max((1 if str(dev) in ("auto", "-1") else processes(acc, dev) for acc, dev in asked
                if acc in GPU_ACCELERATORS), default=0)  # devices "auto": what the worker gets
    if need == 0:  # every trial on the CPU
        return None
    share = len(gpus) // workers
    if share == 0:
        raise ValueError(f"--workers: {workers} workers would share this machine's {len(gpus)} GPU(s); "
                         f"use --workers {len(gpus)} or fewer")
    have = (f"each of {workers} workers gets {share} of this machine's {len(gpus)}" if workers > 1
            else f"this machine has {len(gpus)}")
    named = [(dev, numbers) for acc, dev in asked if acc in GPU_ACCELERATORS and (numbers := device_numbers(dev))]
    if any(max(numbers) >= share for _, numbers in named):
        raise ValueError(f"trainer.devices: {named[0][0]!r} names GPUs by number, and {have}, numbered from 0; "
                         f"give a count instead (delta.trainer.devices={max(share, 1)})")
    if need > share:
        fewer = f"--workers {len(gpus) // need}, or " if workers > 1 and len(gpus) >= need else ""
        raise ValueError(f"trainer.devices: a trial trains on {need} GPUs and {have}; use {fewer}"
                         f"delta.trainer.devices={max(share, 1)}")
    return [",".join(gpus[i * share:(i + 1) * share]) for i in range(workers)] if workers > 1 else None


def spawn_workers(argv: list[str], workers: int, gpus: list[str] | None = None) -> int:
    """Run `workers` copies of this sweep command as processes (each with --workers 1), worker i on the
    GPUs gpus[i] (CUDA_VISIBLE_DEVICES) where given, else on its share of the CPU cores (OMP_NUM_THREADS,
    unless set); the worst exit code. Each worker is a session of its own, and a Ctrl-C (SIGINT), SIGTERM
    or SIGHUP to this process is passed on to each (a terminal's reaches this process alone; a kill of it
    left the workers training; one this process ignores, as nohup's SIGHUP, the workers ignore too); this
    process waits for them, then ends as interrupted (SIGINT) or exits 128 + the signal's number."""
    if gpus:
        env = lambda i: {**os.environ, "CUDA_VISIBLE_DEVICES": gpus[i]}  # noqa: E731
    else:  # trials on the CPU: its cores shared out (torch takes them all, in each worker: N times too many threads)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = str(max(1, cores // workers))
        env = lambda i: {"OMP_NUM_THREADS": threads, **os.environ}  # noqa: E731  (one the user set holds)
    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum: int, frame: Any = None) -> None:
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    handled = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, forward) for s in handled}
    try:
        for i in range(workers):
            procs.append(subprocess.Popen([sys.executable, "-m", "cli", "sweep", *argv, "--workers", "1",
                                           "--worker-id", str(i)], env=env(i), start_new_session=True))
            if received:  # while the workers started: this one's too
                procs[-1].send_signal(received[-1])
        worst = max((p.wait() for p in procs), key=abs)  # a worker killed by a signal has a negative status
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received and received[0] == signal.SIGINT:
        raise KeyboardInterrupt
    if received:
        print(f"dat-lab: {signal.Signals(received[0]).name}: the workers were stopped; finished cells are stored, "
              "and the same command resumes", file=sys.stderr)
        raise SystemExit(128 + received[0])
    return worst
