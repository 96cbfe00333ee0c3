"""`dat-lab analyze`: a study to its table (Markdown, CSV, LaTeX), plots (PNG, PDF) and report.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import metrics as M
from ..figures import save_figure
from ..outputs import check_output_folder, make_folder
from . import plots
from .study import (AnalysisError, counts_text, finished, found_runs, load, run_here, status_counts,
                    trials_frame)
from .tables import display_search, markdown, search_csv, spread_text, summarize, write_tables


@dataclass
class Report:
    path: Path
    table: pd.DataFrame  # as displayed
    paper: pd.DataFrame | None
    plots: list[Path] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    tables: tuple[str, ...] = ()  # the table files written
    notes: tuple[str, ...] = ()  # what was left out, and why


def analyze(study_name: str, storage: str | None, out: str | Path, baseline: str | None = None,
            runs_root: str | Path = "runs") -> Report:
    out = check_output_folder(out, option="--out")
    study, info = load(study_name, storage)
    if baseline and not info.grid:  # before anything is written
        raise AnalysisError(f"--baseline: study {study_name!r} is a search "
                            f"({study.user_attrs.get(M.STUDY_SAMPLER, 'tpe')}): it has no baseline row")
    frame = found_runs(trials_frame(study, info), runs_root)
    counts = status_counts(frame)
    if not info.grid:  # a search: history and importances, trials as the table
        finished(frame, study_name)
        _clear_earlier(out)
        done = frame[frame["status"].isin(["done", "pruned"])]  # the pruned after the finished, so marked
        make_folder(out, option="--out")
        search_csv(done, info).to_csv(out / "table.csv", index=False)
        shown = display_search(done, info)
        (out / "table.md").write_text(markdown(shown) + "\n")
        paths = [p for name, fig in plots.search_plots(study, info).items() for p in save_figure(fig, out, name)]
        return _write_report(Report(out / "report.md", shown, None, paths, counts, tables=("table.md", "table.csv")), info)
    table = summarize(frame, info, baseline)
    _clear_earlier(out)
    shown, paper, tables = write_tables(table, info, make_folder(out, option="--out"))
    paths = []
    for factor in info.factors:
        paths += save_figure(plots.factor_plot(frame, info, factor, baseline), out, f"factor_{_slug(factor)}")
    curves = plots.learning_curves(frame, info)
    if curves is not None:
        paths += save_figure(curves, out, "learning_curves")
    report = Report(out / "report.md", shown, paper, paths, counts, tables, notes=_missing_runs(frame))
    return _write_report(report, info)


EARLIER = ("report.md", "table.md", "table.csv", "table.tex", "paper_table.md", "learning_curves.png",
           "learning_curves.pdf", "factor_*.png", "factor_*.pdf", "history.png", "history.pdf", "importances.png",
           "importances.pdf")  # what analyze writes (factor_<name>: a factor's plot)


def _clear_earlier(out: Path) -> None:
    """An earlier analysis's files in `out`, before this one writes its own: one it does not write now
    (the learning curves of runs no longer here, a factor since renamed) would read as this one's."""
    for pattern in EARLIER:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()


def _missing_runs(frame: pd.DataFrame) -> tuple[str, ...]:
    """A note where finished trials' run folders (their TensorBoard events) are not on this machine."""
    runs = frame.loc[frame["status"] == "done", "run_dir"]
    gone = [r for r in runs if not run_here(r)]
    if not gone:
        return ()
    where = next((f" (e.g. {r}: moved, or on another machine: --runs-root names where runs/ is now)"
                  for r in gone if isinstance(r, str)), "")
    if len(gone) == len(runs):
        return (f"learning curves: no finished trial's run folder is here{where}; none are drawn",)
    return (f"learning curves: {len(gone)} of {len(runs)} finished trials' run folders are not here{where}; "
            "their curves are left out",)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


IMAGES_PER_S_NOTE = ("images/s: training throughput as each trial measured it, on a machine shared with whatever "
                     "else ran there (other workers, other jobs): compare it only between trials run alone on one "
                     "machine, and measure speed for a paper apart, on an idle one.")


def _write_report(report: Report, info) -> Report:
    lines = [f"# Study `{info.name}`", "",
             f"Objective: `{info.metric}` ({info.direction}). Trials: {counts_text(report.counts)}.", ""]
    if report.paper is not None:
        lines += ["## As in the paper", "", markdown(report.paper, left=1), ""]
    table = markdown(report.table, left=len(info.factors))
    lines += [f"## Table ({spread_text(info)}; diff: to the baseline)" if info.grid else "## Trials", "",
              table, "",
              "Also as [CSV](table.csv)" + (" and [LaTeX](table.tex)." if info.grid else "."), "",
              IMAGES_PER_S_NOTE, "", "## Plots", ""]
    for png in [p for p in report.plots if p.suffix == ".png"]:
        lines += [f"![{png.stem}]({png.name})", "", f"([PDF]({png.stem}.pdf))", ""]
    lines += [line for note in report.notes for line in (f"Note: {note}.", "")]
    report.path.write_text("\n".join(lines))
    return report
