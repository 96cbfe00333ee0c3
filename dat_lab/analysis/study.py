"""Read a study: its trials as a pandas DataFrame, and what the sweep recorded about its factors.

Analysis reads only what sweeps wrote (Optuna storage, run directories); it never trains.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import optuna
import pandas as pd
import sqlalchemy
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from .. import metrics as M


class AnalysisError(ValueError):
    """The study cannot be analysed (missing, empty); one line saying why."""


@dataclass(frozen=True)
class StudyInfo:
    name: str
    metric: str
    direction: str
    factors: dict[str, dict[str, Any]]  # {factor: {"levels", "baseline", "paper_table"}}
    seeds: list[int]
    grid: bool = True  # cells (factors' levels x seeds; no factors: one config's seeds), else a search
    heartbeat: tuple[int, int] = M.HEARTBEAT  # the sweep's (interval, grace) in seconds


def existing_storage(storage: str | None, study: str) -> str:
    """The storage URL to read `study` from (default: the sweep's default), checked without creating
    anything: a missing SQLite file or a malformed URL is an AnalysisError."""
    given, storage = storage, storage or M.default_storage(study)
    try:
        M.check_storage_url(storage)
    except ValueError as err:
        raise AnalysisError(f"--{err}") from None
    if (file := M.sqlite_path(storage)) is not None and not file.exists():
        if given is None:  # the user named no storage: say which one was looked for, and why there
            raise AnalysisError(f"study {study!r}: no {file} (a sweep's default storage); run the sweep first, "
                                f"or give --storage URL where the study is")
        raise AnalysisError(f"--storage: {storage} does not exist (run the sweep first, or name its storage)")
    return storage


def _read_only(url: str) -> RDBStorage:
    """The Optuna storage at url, opened without creating its tables (Optuna's default would write them
    into whatever database --storage names, a mistyped one too); AnalysisError where url cannot be
    opened or holds no Optuna storage."""
    try:
        engine = sqlalchemy.create_engine(url)
        try:
            tables = set(sqlalchemy.inspect(engine).get_table_names())
        finally:
            engine.dispose()
        if not {"studies", "version_info"} <= tables:
            raise AnalysisError(f"--storage: {M.shown_url(url)} holds no Optuna storage (no studies table); "
                                f"name the storage a sweep wrote")
        return RDBStorage(url, skip_table_creation=True)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, RuntimeError) as err:  # unreachable database, missing
        raise AnalysisError(M.storage_error(url, err)) from None  # driver; a schema older than this Optuna's


def load(study_name: str, storage: str | None = None) -> tuple[optuna.Study, StudyInfo]:
    """A study and what analysis needs of it, from `storage` (default: the sweep's default) as
    existing_storage checks it, read without writing; AnalysisError where there is none."""
    url = existing_storage(storage, study_name)
    storage = _read_only(url)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage=storage)]
        raise AnalysisError(f"no study {study_name!r} in {M.shown_url(url)}; it holds: {', '.join(names) or 'none'}") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
        raise AnalysisError(M.storage_error(url, err)) from None
    a = study.user_attrs
    info = StudyInfo(name=study_name, metric=a.get(M.STUDY_METRIC, M.VAL_ACC1),
                     direction=a.get(M.STUDY_DIRECTION, study.direction.name.lower()),
                     factors=a.get(M.STUDY_FACTORS, {}),
                     seeds=a.get(M.STUDY_SEEDS, [0]), grid=_is_grid(study),
                     heartbeat=tuple(a.get(M.STUDY_HEARTBEAT, M.HEARTBEAT)))
    return study, info


def _is_grid(study: optuna.Study) -> bool:
    """Whether a study's trials are a grid's cells: as the sweep recorded it, or (studies from before it
    did) it has factors, or trials of cells."""
    a = study.user_attrs
    if M.STUDY_SAMPLER in a:
        return a[M.STUDY_SAMPLER] == "grid"
    return bool(a.get(M.STUDY_FACTORS)) or any(M.TRIAL_CELL in t.user_attrs for t in study.get_trials(deepcopy=False))


STATUS = {TrialState.COMPLETE: "done", TrialState.RUNNING: "running", TrialState.WAITING: "pending",
          TrialState.FAIL: "failed", TrialState.PRUNED: "pruned"}
STALE = "stale"  # the status of a RUNNING trial whose worker has sent no heartbeat for the grace period
COUNTED = ("done", "running", "failed", "pending")  # always counted, in this order; other statuses after them


def counts_text(statuses: Mapping[str, int]) -> str:
    """How many rows of each status, as sweep-status, analyze and report.md say it:
    "1 done, 1 running, 0 failed, 6 pending" (then stale, missing, pruned, where there are any)."""
    return ", ".join([f"{statuses.get(k, 0)} {k}" for k in COUNTED]
                     + [f"{n} {k}" for k, n in statuses.items() if k not in COUNTED])


def status_counts(frame: pd.DataFrame) -> dict[str, int]:
    """Rows of a trials_frame by status."""
    return frame["status"].value_counts().to_dict() if not frame.empty else {}


def finished(frame: pd.DataFrame, study_name: str) -> pd.DataFrame:
    """The done rows of a trials_frame; AnalysisError, with the counts, where there are none."""
    done = frame[frame["status"] == "done"] if not frame.empty else frame
    if done.empty:
        raise AnalysisError(f"study {study_name!r} has no finished trials yet ({counts_text(status_counts(frame))})")
    return done


def stale_trials(study: optuna.Study, heartbeat: tuple[int, int]) -> set[int]:
    """Numbers of the RUNNING trials whose worker has sent no heartbeat for the grace period (killed or
    crashed), as a worker finds them before it fails them; read only."""
    storage = getattr(study._storage, "_backend", study._storage)  # Optuna's cache around its RDBStorage
    if not isinstance(storage, RDBStorage):
        return set()
    storage.heartbeat_interval, storage.grace_period = heartbeat  # this reader's own storage, which runs no trial
    ids = set(storage._get_stale_trial_ids(study._study_id))
    return {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t._trial_id in ids}


def run_here(run_dir: Any) -> bool:
    """Whether a trial's recorded run folder (its TensorBoard events) is on this machine."""
    return isinstance(run_dir, str) and Path(run_dir).is_dir()


def found_run(run_dir: Any, runs_root: str | Path) -> Any:
    """A trial's recorded run folder, or where it is not here (runs/ moved, or copied from the machine
    the sweep ran on) runs_root/<study>/trial_<n> if that is here."""
    if not isinstance(run_dir, str) or run_here(run_dir):
        return run_dir
    there = Path(runs_root, Path(run_dir).parent.name, Path(run_dir).name)
    return str(there.absolute()) if there.is_dir() else run_dir


def found_runs(frame: pd.DataFrame, runs_root: str | Path) -> pd.DataFrame:
    """The frame with each run folder as found_run finds it."""
    return frame.assign(run_dir=frame["run_dir"].map(lambda r: found_run(r, runs_root))) if "run_dir" in frame else frame


def trials_frame(study: optuna.Study, info: StudyInfo) -> pd.DataFrame:
    """One row per cell and seed of a grid (its deciding trial, or 'missing'), or per trial of a search
    (a pruned one's value: the last it reported before it was stopped).

    Columns: one per factor (grid) or per searched parameter, and metrics.TRIAL_COLUMNS.
    """
    rows = []
    stale = stale_trials(study, info.heartbeat)
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if info.grid and M.TRIAL_CELL not in a:
            continue
        row = dict(a.get(M.TRIAL_LEVELS) or {}) if info.grid else dict(t.params)
        row.update(cell=a.get(M.TRIAL_CELL, f"trial {t.number}"), seed=a.get(M.TRIAL_SEED), status=STALE if t.number in stale else STATUS[t.state],
                   trial=t.number, value=t.value if t.state == TrialState.COMPLETE else None,
                   params_m=a.get(M.TRIAL_PARAMS_M), gflops=a.get(M.TRIAL_GFLOPS),
                   images_per_s=a.get(M.TRIAL_IMAGES_PER_S), run_dir=a.get(M.TRIAL_RUN_DIR),
                   last_step=a.get(M.TRIAL_LAST_STEP), failure=a.get(M.TRIAL_FAILURE))
        if not info.grid and t.state == TrialState.PRUNED and t.intermediate_values:  # what it reached: its last report
            row["value"] = t.intermediate_values[max(t.intermediate_values)]
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not info.grid:
        return frame
    if not frame.empty:  # levels are missing on never-started retries: take them from the cell key
        frame = _deciding_trials(frame)
    return _with_missing_cells(frame, info)


def _deciding_trials(frame: pd.DataFrame) -> pd.DataFrame:
    """Per cell: its first COMPLETE trial, else its latest trial (running, stale, pending or failed)."""
    rank = frame["status"].map({"done": 0, "running": 1, STALE: 1, "pending": 2, "failed": 3, "pruned": 4})
    order = frame["trial"].where(rank == 0, -frame["trial"])  # the first COMPLETE; otherwise the latest
    frame = frame.assign(**{"(rank)": rank, "(order)": order}).sort_values(["(rank)", "(order)"])
    frame = frame[frame["status"] != "pruned"].groupby("cell", sort=False).head(1)
    return frame.drop(columns=["(rank)", "(order)"])


def _with_missing_cells(frame: pd.DataFrame, info: StudyInfo) -> pd.DataFrame:
    names = list(info.factors)
    expected = []
    for combo in itertools.product(*(info.factors[f]["levels"] for f in names)):
        for seed in info.seeds:
            levels = dict(zip(names, combo))
            expected.append({**levels, "seed": seed, "cell": M.cell_key(levels, seed)})
    grid = pd.DataFrame(expected)
    found = frame.drop(columns=[c for c in names + ["seed"] if c in frame.columns]) if not frame.empty else None
    merged = grid.merge(found, on="cell", how="left") if found is not None else grid
    merged["status"] = merged.get("status", pd.Series(index=merged.index, dtype=object)).fillna("missing")
    for factor in names:  # keep the spec's level order
        merged[factor] = pd.Categorical(merged[factor], categories=info.factors[factor]["levels"], ordered=True)
    return merged
