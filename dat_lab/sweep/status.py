"""What a study holds: per cell, done / running / failed / pending, and how to reproduce a trial."""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from .. import metrics as M
from .runner import CELL, cell_trials


@dataclass(frozen=True)
class CellStatus:
    cell: str
    status: str  # done, running, failed, pending
    trial: int | None  # the trial that decides the status
    value: float | None
    failure: str | None
    reproduce: str | None


def _status(trials: list[FrozenTrial]) -> tuple[str, FrozenTrial | None]:
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    for state, name in ((TrialState.COMPLETE, "done"), (TrialState.RUNNING, "running"),
                        (TrialState.WAITING, "pending"), (TrialState.FAIL, "failed")):
        if by_state[state]:
            return name, by_state[state][-1]
    return "pending", trials[-1] if trials else None


def study_status(study: optuna.Study) -> list[CellStatus]:
    """One row per cell (grid) or per trial (search), in trial order."""
    groups = cell_trials(study)
    if not groups:  # a search: every trial is its own row
        groups = {f"trial {t.number}": [t] for t in study.get_trials(deepcopy=False)}
    rows = []
    for cell, trials in groups.items():
        status, t = _status(trials)
        rows.append(CellStatus(cell=cell, status=status, trial=t.number if t else None,
                               value=t.value if t is not None and t.state == TrialState.COMPLETE else None,
                               failure=t.user_attrs.get(M.TRIAL_FAILURE) if t else None,
                               reproduce=t.user_attrs.get(M.TRIAL_REPRODUCE) if t else None))
    return rows


def counts(rows: list[CellStatus]) -> dict[str, int]:
    out = {"done": 0, "running": 0, "failed": 0, "pending": 0}
    for r in rows:
        out[r.status] += 1
    return out


def trial_of(study: optuna.Study, number: int) -> FrozenTrial:
    trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not trials:
        raise ValueError(f"--trial: study {study.study_name!r} has no trial {number}")
    return trials[0]


__all__ = ["CELL", "CellStatus", "counts", "study_status", "trial_of"]
