"""Analysis of studies built with known values (Optuna create_trial): tables, plots, report."""

import math
import os
import re
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image

import cli
import dat_lab
from dat_lab import metrics as M
from dat_lab.ablations import paper_rows
from dat_lab.analysis import AnalysisError, analyze
from dat_lab.analysis.study import StudyInfo, load, trials_frame
from dat_lab.analysis.tables import baseline_levels, paper_layout, summarize
from dat_lab.analysis.visualize import _from_files, visualize

ROOT = Path(__file__).resolve().parents[1]

VALUES = {("none", "0"): [0.90, 0.92], ("none", "2"): [0.94, 0.96],
          ("relative", "0"): [0.91, 0.93], ("relative", "2"): [0.97, 0.99]}


def _study(storage, name="known", values=VALUES, factors=None, seeds=(0, 1), states=None, sampler=None):
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    if sampler:
        study.set_user_attr(M.STUDY_SAMPLER, sampler)
    factors = factors if factors is not None else {"position": {"levels": ["relative", "none"], "baseline": "relative", "paper_table": None},
                          "s": {"levels": ["0", "2"], "baseline": "2", "paper_table": None}}
    study.set_user_attr(M.STUDY_METRIC, M.VAL_ACC1)
    study.set_user_attr(M.STUDY_DIRECTION, "maximize")
    study.set_user_attr(M.STUDY_FACTORS, factors)
    study.set_user_attr(M.STUDY_SEEDS, list(seeds))
    names = list(factors)
    for levels, vals in values.items():
        for seed, value in zip(seeds, vals):
            lv = dict(zip(names, levels))
            cell = M.cell_key(lv, seed)
            state = (states or {}).get((levels, seed), TrialState.COMPLETE)
            study.add_trial(create_trial(
                state=state, value=value if state == TrialState.COMPLETE else None,
                user_attrs={M.TRIAL_CELL: cell, M.TRIAL_LEVELS: lv, M.TRIAL_SEED: seed, M.TRIAL_PARAMS_M: 0.58,
                            M.TRIAL_GFLOPS: 0.0074, M.TRIAL_IMAGES_PER_S: 100.0 + seed}))
    return study


def test_known_means_stds_and_differences(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _study(storage)
    study, info = load("known", storage)
    table = summarize(trials_frame(study, info), info).set_index(["position", "s"])
    row = table.loc[("none", "2")]
    assert row["mean"] == pytest.approx(95.0) and row["std"] == pytest.approx(math.sqrt(2.0)) and row["n"] == 2
    assert table.loc[("relative", "2"), "diff"] == 0 and table.loc[("relative", "2"), "baseline"]
    assert table.loc[("none", "0"), "diff"] == pytest.approx(91.0 - 98.0)
    assert row["images_per_s"] == pytest.approx(100.5) and row["params_m"] == 0.58
    assert list(table.index) == [("relative", "0"), ("relative", "2"), ("none", "0"), ("none", "2")]  # spec order
    other = summarize(trials_frame(study, info), info, baseline="position=none, s=0").set_index(["position", "s"])
    assert other.loc[("relative", "2"), "diff"] == pytest.approx(98.0 - 91.0)
    with pytest.raises(AnalysisError, match="--baseline: 'sparse' names no level"):
        summarize(trials_frame(study, info), info, baseline="sparse")


def test_baseline_names_levels_with_commas_and_of_any_factor():
    info = StudyInfo(name="g", metric=M.VAL_ACC1, direction="maximize", seeds=[0],
                     factors={"G": {"levels": ["1, 1", "3, 6"], "baseline": "3, 6", "paper_table": None},
                              "s": {"levels": ["0", "2"], "baseline": "2", "paper_table": None}})
    assert baseline_levels(info, None) == {"G": "3, 6", "s": "2"}
    assert baseline_levels(info, "1, 1") == {"G": "1, 1", "s": "2"}
    assert baseline_levels(info, "0") == {"G": "3, 6", "s": "0"}  # a level of the second factor
    assert baseline_levels(info, "G=1, 1, s=0") == baseline_levels(info, "s = 0,G=1,1") == {"G": "1, 1", "s": "0"}
    with pytest.raises(AnalysisError, match="--baseline: 's=0, s=2' names factor s twice"):
        baseline_levels(info, "s=0, s=2")
    with pytest.raises(AnalysisError, match=r"--baseline: 'G=2, 2' names no level \(G: 1, 1, 3, 6; s: 0, 2\)"):
        baseline_levels(info, "G=2, 2")
    both = StudyInfo(name="b", metric=M.VAL_ACC1, direction="maximize", seeds=[0],
                     factors={"a": {"levels": ["1", "2"], "baseline": "1", "paper_table": None},
                              "b": {"levels": ["1", "3"], "baseline": "3", "paper_table": None}})
    with pytest.raises(AnalysisError, match="--baseline: '1' is a level of a and b: say which, e.g. a=1"):
        baseline_levels(both, "1")
    assert baseline_levels(both, "b=1") == {"a": "1", "b": "1"}
    search = StudyInfo(name="lr", metric=M.VAL_ACC1, direction="maximize", seeds=[0], factors={})
    with pytest.raises(AnalysisError, match="--baseline: study 'lr' has no factors"):
        baseline_levels(search, "x")


def test_the_baseline_star_of_a_numeric_factor_is_the_baseline_cell(tmp_path):
    from dat_lab.analysis import plots

    storage = f"sqlite:///{tmp_path / 's.db'}"
    _study(storage)
    study, info = load("known", storage)
    fig = plots.factor_plot(trials_frame(study, info), info, "s")
    [star] = [c for c in fig.axes[0].collections if c.get_label().startswith("baseline")]
    assert star.get_label() == "baseline (position = relative, s = 2)"
    assert star.get_offsets()[0].tolist() == pytest.approx([2.0, 98.0])  # relative at s=2, not s=2's mean 96.5


def test_analyze_writes_every_output(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _study(storage)
    (tmp_path / "out").mkdir()
    for earlier in ("learning_curves.png", "factor_old.pdf", "notes.txt"):  # an earlier analysis's, and the user's
        (tmp_path / "out" / earlier).write_text("earlier")
    report = analyze("known", storage, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.read_bytes() == b"earlier") == ["notes.txt"]
    for name in ("report.md", "table.md", "table.csv", "table.tex", "factor_position.png", "factor_position.pdf",
                 "factor_s.png", "factor_s.pdf"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    for png in (tmp_path / "out").glob("*.png"):
        with Image.open(png) as image:
            image.verify()
    assert all(p.read_bytes().startswith(b"%PDF") for p in (tmp_path / "out").glob("*.pdf"))
    text = report.path.read_text()
    assert "95.00 ± 1.41" in text and "baseline" in text and "![factor_s](factor_s.png)" in text
    assert "images/s: training throughput as each trial measured it" in text  # what it is worth
    tex = (tmp_path / "out" / "table.tex").read_text()
    assert r"\toprule" in tex and r"95.00 $\pm$ 1.41" in tex and r"val/acc1 (\%)" in tex
    assert r"\begin{tabular}{llrrrrrr}" in tex  # the two factors left, the numbers right
    assert "-7.00" in (tmp_path / "out" / "table.md").read_text()


def test_sweep_status_shows_values_as_analyze_does(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _study(storage, values={k: v for k, v in VALUES.items() if k != ("none", "0")})  # a cell never queued
    assert cli.main(["sweep-status", "known", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert "val/acc1 (%)" in out and "99.00" in out and "0.99" not in out  # percent, as in the table
    assert [line.split("│")[-2].strip() for line in out.splitlines() if "none" in line and "s=0" in line] == ["-", "-"]  # per seed
    _study(storage, name="started", values={("none", "0"): [0.9]}, seeds=(0,),  # nothing finished yet
           states={(("none", "0"), 0): TrialState.RUNNING})
    assert cli.main(["sweep-status", "started", "--storage", storage]) == 0
    assert "1 running" in capsys.readouterr().out


def _heartbeat(storage, trial, age_s):
    """Record the heartbeat of RUNNING `trial` as `age_s` seconds old, as a worker last sent it."""
    rdb = optuna.storages.RDBStorage(storage)
    rdb.record_heartbeat(trial._trial_id)
    with sqlite3.connect(M.sqlite_path(storage)) as db:
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, ?) WHERE trial_id = ?",
                   (f"-{age_s} seconds", trial._trial_id))
    rdb.remove_session()


def test_a_running_trial_whose_worker_stopped_sending_heartbeats_shows_stale_without_a_worker(tmp_path, capsys):
    """kill -9 leaves a trial RUNNING: status and analysis say it is stale once its heartbeat is older than
    the study's grace, and read the storage only."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = _study(storage, states={(("none", "2"), 0): TrialState.RUNNING, (("none", "2"), 1): TrialState.RUNNING})
    running = study.get_trials(states=(TrialState.RUNNING,))
    _heartbeat(storage, running[0], 120)  # killed two minutes ago; the default grace is 30 s
    _heartbeat(storage, running[1], 5)  # alive
    before = (tmp_path / "s.db").read_bytes()
    assert cli.main(["sweep-status", "known", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert "6 done, 1 running, 0 failed, 0 pending, 1 stale" in out
    assert (f"stale: trial {running[0].number} (position=none, s=2 | seed=0): RUNNING, but its worker stopped sending "
            "heartbeats (none for over 30 s: killed or crashed); the next `dat-lab sweep` of the study fails it "
            "and queues it again") in out
    assert (tmp_path / "s.db").read_bytes() == before  # nothing written
    report = analyze("known", storage, tmp_path / "out")
    status = dict(zip(zip(report.table["position"], report.table["s"]), report.table["status"]))
    assert status[("none", "2")] == "0/2 done; running, stale" and report.counts["stale"] == 1
    study.set_user_attr(M.STUDY_HEARTBEAT, [60, 300])  # the grace is the study's: two minutes is not stale
    assert cli.main(["sweep-status", "known", "--storage", storage]) == 0
    assert "6 done, 2 running, 0 failed, 0 pending\n" in capsys.readouterr().out
    # a worker failed it as stale (Optuna records no reason); a search's trial is named once
    _study(storage, name="reaped", states={(("none", "2"), 0): TrialState.FAIL})
    search = optuna.create_study(storage=storage, study_name="search", direction="maximize")
    search.set_user_attr(M.STUDY_SAMPLER, "tpe")
    search.add_trial(create_trial(state=TrialState.FAIL, params={"lr": 0.1}, user_attrs={M.TRIAL_FAILURE: "boom"},
                                  distributions={"lr": optuna.distributions.FloatDistribution(0.01, 1.0)}))
    assert cli.main(["sweep-status", "reaped", "--storage", storage]) == 0
    assert cli.main(["sweep-status", "search", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert ("failed: trial 2 (position=none, s=2 | seed=0): no reason recorded: its worker stopped before it could "
            "record one (killed or crashed)\n") in out and "failed: trial 0: boom\n" in out
    assert "┃ trial ┃  lr ┃ status ┃ val/acc1 (%) ┃" in out and "│ 0     │ 0.1 │ failed │" in out  # its parameters
    # a trial that failed before its training run began has no command to reproduce it
    assert cli.main(["sweep-status", "search", "--storage", storage, "--trial", "0"]) == 2
    assert capsys.readouterr().err == ("dat-lab: error: --trial: trial 0 of study 'search' has no training run to "
                                       "reproduce (it is FAIL: boom)\n")
    search.add_trial(create_trial(state=TrialState.PRUNED, params={"lr": 0.1}, user_attrs={M.TRIAL_DUPLICATE_OF: 0},
                                  distributions={"lr": optuna.distributions.FloatDistribution(0.01, 1.0)}))
    assert cli.main(["sweep-status", "search", "--storage", storage, "--trial", "1"]) == 2
    assert capsys.readouterr().err.endswith("(it is PRUNED: a duplicate of trial 0, which trained its cell: --trial 0)\n")


def test_partial_and_empty_studies(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    values = {k: v for k, v in VALUES.items() if k != ("none", "0")}  # a cell never queued
    _study(storage, values=values, states={(("none", "2"), 1): TrialState.RUNNING})
    report = analyze("known", storage, tmp_path / "out")
    status = dict(zip(zip(report.table["position"], report.table["s"]), report.table["status"]))
    assert status[("none", "0")] == "0/2 done; missing" and status[("none", "2")] == "1/2 done; running"
    # counted as sweep-status counts: done, running, failed, pending always, in that order, then the others
    assert "Trials: 5 done, 1 running, 0 failed, 0 pending, 2 missing." in report.path.read_text()
    assert "## Table (mean ± std over seeds; diff: to the baseline)" in report.path.read_text()
    assert cli.main(["analyze", "known", "--storage", storage, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("study 'known': 5 done, 1 running, 0 failed, 0 pending, 2 missing\n")
    # these trials record no run folder: no learning curves, and said so, not left out silently
    assert out.endswith("note: learning curves: no finished trial's run folder is here; none are drawn\n")
    assert "Note: learning curves: no finished trial's run folder is here" in report.path.read_text()
    optuna.create_study(storage=storage, study_name="empty")
    with pytest.raises(AnalysisError, match="study 'empty' has no finished trials yet"):
        analyze("empty", storage, tmp_path / "empty")
    assert cli.main(["analyze", "empty", "--storage", storage]) == 2
    assert "no finished trials yet" in capsys.readouterr().err
    assert cli.main(["analyze", "nope", "--storage", storage]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("storage,message", [
    ("foo://bar", "--storage: 'foo://bar' is not an SQLite or PostgreSQL URL"),
    ("sqlite:///:memory:", "--storage: sqlite:///:memory: is in memory: it holds a study only while its process runs; give a file"),
    ("sqlite:///{tmp}/none.db", "--storage: sqlite:///{tmp}/none.db does not exist"),
    ("postgresql://u:p@127.0.0.1:1/db", "--storage: cannot open postgresql://u:***@127.0.0.1:1/db: "),
])
def test_a_bad_storage_is_one_line_and_creates_nothing(storage, message, tmp_path, capsys):
    storage, message = storage.format(tmp=tmp_path), message.format(tmp=tmp_path)
    for command in ("analyze", "sweep-status"):
        assert cli.main([command, "s", "--storage", storage]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dat-lab: error: {message}") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_levels_with_latex_and_markdown_characters_are_shown_as_named(tmp_path):
    """table.tex escapes every LaTeX special character of a level or factor name (`%` would end the row,
    `&` add a column), table.md the pipe; each row keeps its number of cells."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    levels = ["10% & more", "a_b #1", "x|y {~^$}", "back\\slash"]
    factors = {"drop_rate": {"levels": levels, "baseline": levels[0], "paper_table": None}}
    _study(storage, factors=factors, seeds=(0,), values={(level,): [0.9 + i / 100] for i, level in enumerate(levels)})
    analyze("known", storage, tmp_path / "out")
    tex = (tmp_path / "out" / "table.tex").read_text()
    for escaped in (r"10\% \& more", r"a\_b \#1", r"x\textbar{}y \{\textasciitilde{}\textasciicircum{}\$\}",
                    r"back\textbackslash{}slash", r"drop\_rate"):
        assert escaped in tex, escaped
    rows = [line for line in tex.splitlines() if line.endswith(r"\\")]
    assert len(rows) == 5 and {row.replace(r"\&", "").count("&") for row in rows} == {rows[0].count("&")}
    md = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert r"x\|y {~^$}" in "\n".join(md)
    assert len({line.replace(r"\|", "").count("|") for line in md}) == 1


@pytest.mark.parametrize("tables", [[], ["users"]], ids=["empty_file", "another_programs"])
def test_a_database_that_is_not_optunas_is_refused_and_left_as_it_was(tables, tmp_path, capsys):
    """A read-only command pointed at an SQLite file that holds no study (a mistyped --storage) says so and
    writes nothing into it (Optuna's load_study alone would create its tables there)."""
    file = tmp_path / "other.db"
    with sqlite3.connect(file) as db:
        for table in tables:
            db.execute(f"CREATE TABLE {table} (id INTEGER)")
    before = file.read_bytes()
    for command in ("analyze", "sweep-status"):
        out = ["--out", str(tmp_path / "out")] if command == "analyze" else []
        assert cli.main([command, "s", "--storage", f"sqlite:///{file}", *out]) == 2
        err = capsys.readouterr().err
        assert err == f"dat-lab: error: --storage: sqlite:///{file} holds no Optuna storage (no studies table); " \
                      "name the storage a sweep wrote\n", err
    assert file.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


@pytest.mark.parametrize("script", sorted((ROOT / "analysis").glob("*.py")), ids=lambda p: p.name)
def test_analysis_scripts_run(script, tmp_path):
    """Each script starts (its imports hold) and refuses a study that is not there, creating nothing."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, str(script), "--help"], env=env, cwd=tmp_path, capture_output=True).returncode == 0
    done = subprocess.run([sys.executable, str(script), "nosuch"], env=env, cwd=tmp_path, capture_output=True, text=True)
    refusal = {"visualize_offsets.py": "nosuch: no such checkpoint"}.get(
        script.name, "study 'nosuch': no runs/nosuch.db (a sweep's default storage); run the sweep first, or give "
                     "--storage URL where the study is")
    assert done.returncode == 2 and done.stderr.endswith(refusal + "\n") and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_missing_input_file_is_refused_before_torch_is_imported_in_the_librarys_words(tmp_path, monkeypatch):
    """`dat-lab sweep/convert/visualize/analyze/sweep-status` with a file that is not there: the one line the
    library would print, without the seconds its imports take (torch is not imported)."""
    from dat_lab.analysis.study import existing_storage
    from dat_lab.models.convert import read_checkpoint
    from dat_lab.sweep import SpecError, parse_spec

    monkeypatch.chdir(tmp_path)
    cases = [(["sweep", "none.yaml"], SpecError, lambda: parse_spec("none.yaml")),
             (["convert", "none.pth", "--variant", "dat_tiny", "-o", "x.ckpt"], ValueError, lambda: read_checkpoint("none.pth")),
             (["visualize", "none.ckpt"], AnalysisError, lambda: visualize("none.ckpt", "out")),
             (["analyze", "nosuch"], AnalysisError, lambda: existing_storage(None, "nosuch")),
             (["sweep-status", "nosuch"], AnalysisError, lambda: existing_storage(None, "nosuch"))]
    for argv, error, library in cases:
        with pytest.raises(error) as refused:
            library()
        code = f"import sys, cli; code = cli.main({argv!r}); sys.exit(3 if 'torch' in sys.modules else code)"
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True)
        assert (done.returncode, done.stderr) == (2, f"dat-lab: error: {refused.value}\n"), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_paper_layout_of_table7(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 't7.db'}"
    rows = paper_rows(7)
    factors = {"stages": {"levels": [r.row for r in rows], "baseline": "- - D D (DAT-T)", "paper_table": 7}}
    _study(storage, name="t7", factors=factors, seeds=(0,),
           values={(r.row,): [0.5 + i / 100] for i, r in enumerate(rows)})
    assert cli.main(["analyze", "t7", "--storage", storage, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "As in the paper:" in out and "tables: table.md table.csv table.tex paper_table.md;" in out
    layout = (tmp_path / "out" / "paper_table.md").read_text()
    positions = [layout.index(r.row) for r in rows]
    assert positions == sorted(positions)
    assert "4.64" in layout and "81.7" in layout and "±" not in layout  # one seed: no spread
    cells = {c.strip() for c in layout.replace("\n", "|").split("|")}
    assert {"4.60", "82.0", "52.00"} <= cells  # as written: not 4.6, 82, 52
    assert pd.read_csv(tmp_path / "out" / "table.csv")["std"].isna().all()  # nor a std of 0 in the CSV
    script = subprocess.run([sys.executable, str(ROOT / "analysis" / "paper_tables.py"), "t7", "--storage", storage],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True)
    assert script.stdout == layout  # the paper's script prints what analyze writes
    assert out.index("study 't7': 5 done") < out.index("As in the paper:") < out.index("Every cell:")
    assert "status" not in layout  # all done
    _study(storage, name="t7_running", factors=factors, seeds=(0,), states={((rows[1].row,), 0): TrialState.RUNNING},
           values={(r.row,): [0.5 + i / 100] for i, r in enumerate(rows)})
    study, info = load("t7_running", storage)
    running = paper_layout(summarize(trials_frame(study, info), info), info)
    assert list(running["status"]) == ["done", "0/1 done; running", "done", "done", "done"]  # as in table.md
    assert running.loc[1, "val/acc1 (%)"] == "-"


def test_search_study_plots(tmp_path, capsys):
    from dat_lab.analysis import plots

    storage = f"sqlite:///{tmp_path / 'search.db'}"
    study = optuna.create_study(storage=storage, study_name="lr", direction="maximize")
    study.set_user_attr(M.STUDY_METRIC, M.VAL_ACC1)
    for i, lr in enumerate([1e-4, 1e-3, 3e-3, 1e-2]):
        study.add_trial(create_trial(params={"model.lr": lr}, distributions={"model.lr": FloatDistribution(1e-5, 1e-1, log=True)},
                                     value=0.8 + i / 100, user_attrs={M.TRIAL_SEED: 0}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", optuna.exceptions.ExperimentalWarning)  # not printed to the user
        report = analyze("lr", storage, tmp_path / "out")
    assert (tmp_path / "out" / "history.png").stat().st_size > 0 and (tmp_path / "out" / "importances.pdf").exists()
    assert report.table["val/acc1 (%)"].tolist() == ["83.00", "82.00", "81.00", "80.00"]  # best first, in percent
    assert report.table["model.lr"].tolist() == ["0.01", "0.003", "0.001", "0.0001"] and "failure" not in report.table
    assert "|          83.00 |" in (tmp_path / "out" / "table.md").read_text()  # as written: not 83
    assert report.tables == ("table.md", "table.csv") and not (tmp_path / "out" / "table.tex").exists()
    table = pd.read_csv(tmp_path / "out" / "table.csv")  # best first and in percent too, as table.md
    assert table["trial"].tolist() == [3, 2, 1, 0] and table["val/acc1 (%)"].tolist() == pytest.approx([83, 82, 81, 80])
    assert "value" not in table and {"params_m", "gflops", "images_per_s"} <= set(table.columns)  # as a grid's CSV
    assert cli.main(["analyze", "lr", "--storage", storage, "--baseline", "x", "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == "dat-lab: error: --baseline: study 'lr' is a search (tpe): it has no baseline row\n"
    assert not (tmp_path / "b").exists()  # refused before anything is written
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"model.lr": 0.05}, intermediate_values={0: 0.7, 1: 0.79},
                                 distributions={"model.lr": FloatDistribution(1e-5, 1e-1, log=True)}))
    pruned = analyze("lr", storage, tmp_path / "pruned").table  # after the finished, at the last value it reported
    assert pruned["trial"].tolist() == ["3", "2", "1", "0", "4"] and pruned["val/acc1 (%)"].tolist()[-1] == "79.00"
    assert pruned["status"].tolist() == ["done"] * 4 + ["pruned (its last value)"]
    figures = plots.search_plots(study, load("lr", storage)[1])
    history = figures["history"].axes[0]
    assert history.get_ylabel() == "val/acc1 (%)" and history.get_title() == "lr: val/acc1 (%) by trial (4 finished of 5)"
    figures["history"].canvas.draw()
    ticks = [t.get_text() for t in history.get_yticklabels()]
    assert len({len(t.split(".")[-1]) for t in ticks if "." in t}) <= 1 and all(79 <= float(t) <= 84 for t in ticks)
    assert all(float(t.get_text().replace("\u2212", "-")).is_integer() for t in history.get_xticklabels())  # trials
    importances = figures["importances"].axes[0]
    assert "from 4 finished trials" in importances.get_title() and importances.get_title(loc="left") == ""  # not two
    assert history.get_legend() is not None and importances.get_legend() is None  # "Objective Value" said nothing
    tied = optuna.create_study(storage=storage, study_name="tied", direction="maximize")
    tied.set_user_attr(M.STUDY_SAMPLER, "tpe")
    for lr in (0.01, 0.02, 0.03, 0.04):
        tied.add_trial(create_trial(value=0.8, params={"model.lr": lr},
                                    distributions={"model.lr": FloatDistribution(1e-5, 1e-1, log=True)}))
    with warnings.catch_warnings(record=True) as caught:  # Optuna's warning of the tie: on the plot, not printed
        warnings.simplefilter("always")
        title = plots.search_plots(tied, load("tied", storage)[1])["importances"].axes[0].get_title()
    assert title.endswith("(their values tie: no parameter stands out)") and not [
        w for w in caught if "quantiles" in str(w.message)]
    done = subprocess.run([sys.executable, str(ROOT / "analysis" / "offset_range_plot.py"), "lr", "--storage", storage,
                           "--out", str(tmp_path / "o")], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True)
    assert (done.returncode, done.stderr.split("error: ")[-1]) == (2, "study 'lr' is a search: it has no factors (plot a "
                                                                     "grid over the offset range, e.g. sweeps/offset_range.yaml)\n")


def test_a_grid_without_factors_is_one_row_over_its_seeds(tmp_path, capsys):
    """A spec of seeds alone (one config repeated) is a grid of one cell, not a search."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _study(storage, name="seeds", values={(): [0.90, 0.92, 0.94]}, factors={}, seeds=(0, 1, 2), sampler="grid")
    assert cli.main(["analyze", "seeds", "--storage", storage, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "92.00 ± 2.00" in out and "tables: table.md table.csv table.tex;" in out and "history" not in out
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert len(table) == 1 and table.loc[0, "n"] == 3 and table.loc[0, "mean"] == pytest.approx(92.0)
    assert cli.main(["sweep-status", "seeds", "--storage", storage]) == 0
    assert "(base) | seed=2" in capsys.readouterr().out
    _study(storage, name="older", values={(): [0.90, 0.92]}, factors={}, seeds=(0, 1))  # made before STUDY_SAMPLER
    assert len(analyze("older", storage, tmp_path / "older").table) == 1  # its trials are cells: a grid


def test_sampling_points_figure_shows_images_on_a_fixed_scale():
    """Grey stays grey: pixel values map to [0, 1] as they are, not stretched to each image's range."""
    from dat_lab.figures import sampling_points_figure

    model = dat_lab.create_model("dat_pico", in_chans=1).eval()
    x = torch.zeros(2, 1, 32, 32)  # normalised zeros: the mean grey
    with torch.no_grad():
        out = model.forward_intermediates(x)
    fig = sampling_points_figure(x, out, mean=(0.5,), std=(0.25,))
    assert len(fig.axes) == 2 * 2  # 2 images x 2 deformable stages
    (legend,) = fig.legends  # one for the figure, every group of either stage once (stage 3 has 4)
    assert _reading_order(legend) == ["reference points", "group 0", "group 1", "group 2", "group 3"]
    image = fig.axes[0].images[0]
    assert image.get_clim() == (0, 1) and image.get_array().min() == image.get_array().max() == 0.5
    for channels in (2, 4):  # not RGB: their mean, in gray (2 failed in matplotlib; 4 was drawn as RGBA)
        model = dat_lab.create_model("dat_pico", in_chans=channels).eval()
        x = torch.zeros(1, channels, 32, 32)
        x[:, 0] = 1.0  # one channel brighter: the mean of (0.75, 0.5, ...)
        with torch.no_grad():
            fig = sampling_points_figure(x, model.forward_intermediates(x), mean=(0.5,) * channels, std=(0.25,) * channels)
        shown = fig.axes[0].images[0].get_array()
        assert shown.ndim == 2 and float(shown.mean()) == pytest.approx((0.75 + 0.5 * (channels - 1)) / channels)


def test_visualize_a_checkpoint(tmp_path):
    model = dat_lab.create_model("dat_pico", in_chans=1, num_classes=10)
    dat_lab.save_checkpoint(model, tmp_path / "m.ckpt")
    paths, replaced = visualize(str(tmp_path / "m.ckpt"), tmp_path / "vis", count=2)
    with Image.open(paths[0]) as image:
        assert image.size[0] > 100 and not replaced
    Image.new("L", (40, 30), color=128).save(tmp_path / "a.png")  # image files: timm's eval transform
    assert visualize(str(tmp_path / "m.ckpt"), tmp_path / "files", images=[str(tmp_path / "a.png")])[0][0].exists()
    x, mean, std = _from_files([str(tmp_path / "a.png")], model)  # resized, cropped, normalised with 1 channel
    assert x.shape == (1, 1, 32, 32) and mean == (0.485,)
    torch.testing.assert_close(x, torch.full_like(x, (128 / 255 - 0.485) / 0.229), atol=1e-3, rtol=0)
    for many, message in (({"count": 33}, "--count: 33 must be in [1, 32]"),
                          ({"images": ["a.png"] * 33}, "--images: 33 files; at most 32 in one figure"),
                          ({"images": ["a.png"], "count": 2}, "--count: only without --images (the figure shows"),
                          ({"images": ["a.png"], "data": "digits"}, "--data: only without --images")):
        with pytest.raises(AnalysisError, match=re.escape(message)):  # a figure of a row an image: 100000 rows
            visualize(str(tmp_path / "m.ckpt"), tmp_path / "many", **many)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(AnalysisError, match="bad.png: unreadable image"):
        visualize(str(tmp_path / "m.ckpt"), tmp_path / "files", images=[str(tmp_path / "bad.png")])
    swin = dat_lab.create_model("dat_pico", blocks="LS")
    dat_lab.save_checkpoint(swin, tmp_path / "swin.ckpt")
    with pytest.raises(AnalysisError, match=re.escape("--count: 0 must be in [1, 32]")):
        visualize(str(tmp_path / "m.ckpt"), tmp_path / "vis", count=0)
    with pytest.raises(AnalysisError, match="no deformable"):
        visualize(str(tmp_path / "swin.ckpt"), tmp_path / "vis", data="synthetic")


def test_visualize_labels_each_row_with_its_image_and_what_the_model_took_it_for(tmp_path, monkeypatch):
    import dat_lab.analysis.visualize as vis

    model = dat_lab.create_model("dat_pico", in_chans=1, num_classes=10).eval()
    dat_lab.save_checkpoint(model, tmp_path / "m.ckpt")
    figures = []
    monkeypatch.setattr(vis, "save_figure", lambda fig, out, name: figures.append(fig) or [])
    visualize(str(tmp_path / "m.ckpt"), tmp_path / "vis", count=2)
    dm = vis.DigitsDataModule(img_size=32, channels=1)
    dm.setup("validate")
    x = torch.stack([dm.val_set[i][0] for i in range(2)])
    with torch.no_grad():
        predicted = model(x).argmax(-1)
    rows = [ax.get_ylabel() for ax in figures[0].axes[::2]]  # the first of each row's two stages
    assert rows == [f"digits val {i}: class {int(dm.val_set[i][1])}, predicted {int(predicted[i])}" for i in range(2)]
    Image.new("L", (40, 30), color=128).save(tmp_path / "a.png")
    visualize(str(tmp_path / "m.ckpt"), tmp_path / "files", images=[str(tmp_path / "a.png")])
    assert figures[1].axes[0].get_ylabel().startswith("a.png, predicted ")
    headless = dat_lab.create_model("dat_pico", in_chans=1, num_classes=0)  # its "logits" are features: no prediction
    dat_lab.save_checkpoint(headless, tmp_path / "features.ckpt")
    visualize(str(tmp_path / "features.ckpt"), tmp_path / "vis", count=2)
    assert [ax.get_ylabel() for ax in figures[2].axes[::2]] == [f"digits val {i}: class {int(dm.val_set[i][1])}" for i in range(2)]
    with pytest.raises(AnalysisError, match=f"^{re.escape(str(tmp_path))} is a folder; give a checkpoint file, e.g. "):
        visualize(str(tmp_path), tmp_path / "vis")


def test_visualize_writes_a_folder_per_checkpoint_and_says_what_it_replaced(tmp_path, monkeypatch, capsys):
    """Two checkpoints' figures by default in two folders (one replaced the other); the same one again says
    `replaced`; a run folder is answered with the checkpoint in it; a bad --data before loading anything."""
    import dat_lab.analysis.visualize as vis

    monkeypatch.chdir(tmp_path)
    model = dat_lab.create_model("dat_pico", in_chans=1, num_classes=10)
    for trial in ("trial_0000", "trial_0001"):
        (tmp_path / "runs" / "demo" / trial / "checkpoints").mkdir(parents=True)
        dat_lab.save_checkpoint(model, tmp_path / "runs" / "demo" / trial / "checkpoints" / "last.ckpt")
    first = "runs/demo/trial_0000/checkpoints/last.ckpt"
    assert cli.main(["visualize", first, "--count", "1"]) == 0
    assert cli.main(["visualize", "runs/demo/trial_0001/checkpoints/last.ckpt", "--count", "1"]) == 0
    assert cli.main(["visualize", str(tmp_path / first), "--count", "1"]) == 0  # the same file, named otherwise
    out = capsys.readouterr().out.splitlines()
    folders = [Path("runs/visualize") / f"demo_{t}_checkpoints_last" for t in ("trial_0000", "trial_0001", "trial_0000")]
    assert out == [f"{verb} {folder / 'sampling_points.png'}, {folder / 'sampling_points.pdf'}"
                   for verb, folder in zip(("wrote", "wrote", "replaced"), folders)]
    with pytest.raises(AnalysisError, match=re.escape(f"runs/demo/trial_0000 is a folder; give a checkpoint file, e.g. "
                                                      f"{Path(first)}")):
        visualize("runs/demo/trial_0000")
    monkeypatch.setattr(vis, "load_checkpoint", lambda path: pytest.fail("loaded before the options were checked"))
    with pytest.raises(AnalysisError, match=r"^--data: 'cifar' is not one of digits, synthetic \(or give --images"):
        visualize(first, data="cifar")


def test_learning_curves_put_each_validation_at_its_epoch(tmp_path):
    """Validation every second epoch: the points are epochs 2 and 4, not the 1st and 2nd validation."""
    from torch.utils.tensorboard import SummaryWriter

    from dat_lab.analysis.plots import learning_curves

    with SummaryWriter(str(tmp_path / "run")) as writer:
        for step, epoch, value in ((6, 1, 0.5), (12, 3, 0.7)):  # Lightning logs the epoch (from 0) beside each metric
            writer.add_scalar("epoch", epoch, step)
            writer.add_scalar(M.VAL_ACC1, value, step)
    frame = pd.DataFrame([{"status": "done", "run_dir": str(tmp_path / "run"), "cell": " | seed=0"}])
    fig = learning_curves(frame, StudyInfo(name="s", metric=M.VAL_ACC1, direction="maximize", factors={}, seeds=[0]))
    [line] = [line for line in fig.axes[0].lines if len(line.get_xdata()) == 2]
    assert list(line.get_xdata()) == [2, 4] and list(line.get_ydata()) == pytest.approx([50.0, 70.0])
    assert list(fig.axes[0].get_xticks()) == [2, 4] and fig.axes[0].get_title() == "s: learning curves (one seed)"


def test_params_and_flops_show_three_significant_digits_at_any_scale():
    """The paper's scale keeps its 2 and 3 decimals; dat_pico's cells differ in the third digit."""
    from dat_lab.analysis.tables import display

    info = StudyInfo(name="s", metric=M.VAL_ACC1, direction="maximize", seeds=[0],
                     factors={"p": {"levels": ["a", "b"], "baseline": "a", "paper_table": None}})

    def shown(params, gflops):
        table = pd.DataFrame({"p": ["a", "b"], "mean": [90.0, 91.0], "std": [math.nan] * 2, "n": [1, 1],
                              "params_m": params, "gflops": gflops, "images_per_s": [100.0] * 2,
                              "status": ["done"] * 2, "diff": [0.0, 1.0], "baseline": [True, False]})
        out = display(table, info)
        return out["params (M)"].tolist(), out["FLOPs (G)"].tolist()

    assert shown([0.5751, 0.5798], [0.0074, 0.0074]) == (["0.575", "0.580"], ["0.00740", "0.00740"])
    assert shown([28.3191, 49.7], [4.5889, 8.9]) == (["28.32", "49.70"], ["4.589", "8.900"])


def test_a_difference_that_rounds_to_zero_shows_no_sign_of_its_own():
    """(-3e-6, a float's error in a mean, showed -0.00 beside another row's +0.00.)"""
    from dat_lab.analysis.tables import display

    info = StudyInfo(name="s", metric=M.VAL_ACC1, direction="maximize", seeds=[0],
                     factors={"p": {"levels": ["a", "b", "c", "d"], "baseline": "a", "paper_table": None}})
    table = pd.DataFrame({"p": list("abcd"), "mean": [90.0] * 4, "std": [math.nan] * 4, "n": [1] * 4,
                          "params_m": [1.0] * 4, "gflops": [1.0] * 4, "images_per_s": [100.0] * 4,
                          "status": ["done"] * 4, "diff": [0.0, -3e-6, 3e-6, -0.25], "baseline": [True] + [False] * 3})
    assert display(table, info)["diff"].tolist() == ["baseline", "+0.00", "+0.00", "-0.25"]


def test_a_numeric_factors_plot_names_the_other_factor_and_ticks_its_levels():
    from dat_lab.analysis.plots import factor_plot

    rows = [{"r": r, "G": g, "status": "done", "seed": seed, "value": 0.8 + seed / 100}
            for r in ("1", "2") for g in ("1", "2") for seed in (0, 1)]
    levels = {"levels": ["1", "2"], "baseline": "1", "paper_table": None}
    info = StudyInfo(name="t", metric=M.VAL_ACC1, direction="maximize", seeds=[0, 1], factors={"r": levels, "G": levels})
    ax = factor_plot(pd.DataFrame(rows), info, "r").axes[0]
    assert ax.get_legend().get_title().get_text() == "G"  # the hue's levels 1 and 2 say of what
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2"]  # not 1.0, 1.2, ... 2.0
    # factors named as the plot's own columns were (x, y), or as two names of one number
    named = {"x": levels, "y": {**levels, "levels": ["1", "1.0"]}}
    rows = [{"x": a, "y": b, "status": "done", "seed": 0, "value": 0.8} for a in ("1", "2") for b in ("1", "1.0")]
    shown = {}
    for factor in named:
        ax = factor_plot(pd.DataFrame(rows), StudyInfo(name="t", metric=M.VAL_ACC1, direction="maximize", seeds=[0],
                                                       factors=named), factor).axes[0]
        legend = ax.get_legend()
        shown[factor] = ([t.get_text() for t in ax.get_xticklabels()], legend.get_title().get_text(),
                         [t.get_text() for t in legend.get_texts()][:2])
    assert shown == {"x": (["1", "2"], "y", ["1", "1.0"]), "y": (["1", "1.0"], "x", ["1", "2"])}  # 1, 1.0: two bars


def test_titles_say_what_the_spread_is_over():
    from dat_lab.analysis.tables import spread_text

    one, two = (StudyInfo(name="s", metric=M.VAL_ACC1, direction="maximize", factors={}, seeds=s) for s in ([0], [0, 1]))
    assert (spread_text(one), spread_text(two)) == ("one seed", "mean ± std over seeds")
    assert spread_text(one, other_factors=True) == "mean ± std over the other factors' levels; one seed"
    assert spread_text(two, other_factors=True) == "mean ± std over seeds and the other factors' levels"


def test_a_plot_of_levels_draws_points_and_error_bars_on_an_axis_that_spans_them():
    """Not bars: on an axis that spans the values (the figures' differences are a point or two), a bar's
    length would overstate them; not 0 to 100 either."""
    from dat_lab.analysis.plots import factor_plot

    rows = [{"p": p, "status": "done", "seed": s, "value": v} for p, (a, b) in (("a", (0.92, 0.94)), ("b", (0.95, 0.96)))
            for s, v in enumerate((a, b))]
    info = StudyInfo(name="t", metric=M.VAL_ACC1, direction="maximize", seeds=[0, 1],
                     factors={"p": {"levels": ["a", "b"], "baseline": "a", "paper_table": None}})
    ax = factor_plot(pd.DataFrame(rows), info, "p").axes[0]
    assert not ax.patches  # no bars
    points = sorted(float(y) for line in ax.lines if line.get_marker() not in (None, "None", "")
                    for y in line.get_ydata() if math.isfinite(float(y)))
    assert points == pytest.approx([93.0, 95.5])  # the means
    low, high = ax.get_ylim()
    assert 85 < low < 93 - 1.414 and 95.5 + 0.707 < high < 100  # the error bars: sd over the two seeds


def test_a_legend_reads_across_its_rows_in_order():
    import matplotlib.pyplot as plt

    from dat_lab.figures import row_major

    fig, ax = plt.subplots()
    labels = ["reference points", *(f"group {g}" for g in range(6))]
    handles = [ax.scatter([0], [0]) for _ in labels]
    legend = fig.legend(*row_major(handles, labels, 4), ncol=4)
    assert _reading_order(legend) == labels  # top row left to right, then the next
    plt.close(fig)


def _reading_order(legend) -> list[str]:
    """A drawn legend's texts as one reads them: row by row, left to right (blank padding left out)."""
    legend.figure.canvas.draw()
    placed = sorted((-round(t.get_window_extent().y0), t.get_window_extent().x0, t.get_text()) for t in legend.get_texts())
    return [text for *_, text in placed if text]


def test_run_folders_not_here_are_noted(tmp_path):
    """Analysis on another machine, or after runs/ moved: the curves it cannot draw are named, not dropped silently."""
    from dat_lab.analysis.report import _missing_runs

    frame = pd.DataFrame({"status": ["done", "done", "failed"], "run_dir": [str(tmp_path), str(tmp_path / "gone"), None]})
    assert _missing_runs(frame) == (f"learning curves: 1 of 2 finished trials' run folders are not here (e.g. "
                                    f"{tmp_path / 'gone'}: moved, or on another machine: --runs-root names where runs/ "
                                    "is now); their curves are left out",)
    assert _missing_runs(frame.iloc[:1]) == ()


def test_run_folders_moved_are_found_under_runs_root(tmp_path, monkeypatch):
    """runs/ copied from the machine the sweep ran on (or moved): a trial's run folder not where it was
    recorded is taken from <runs-root>/<study>/trial_<n>; one found nowhere stays as recorded."""
    from dat_lab.analysis.study import found_runs

    (tmp_path / "copy" / "demo" / "trial_0001").mkdir(parents=True)
    (tmp_path / "here").mkdir()
    recorded = [str(tmp_path / "here"), "/scratch/u/runs/demo/trial_0001", "/scratch/u/runs/demo/trial_0002", None]
    frame = pd.DataFrame({"status": ["done"] * 4, "run_dir": recorded})
    moved = found_runs(frame, tmp_path / "copy")["run_dir"].tolist()
    assert moved[:3] == [recorded[0], str(tmp_path / "copy" / "demo" / "trial_0001"), recorded[2]] and pd.isna(moved[3])
    monkeypatch.chdir(tmp_path / "copy" / "..")
    assert found_runs(frame, "copy")["run_dir"].tolist()[1] == str(tmp_path / "copy" / "demo" / "trial_0001")
    assert frame["run_dir"].tolist()[:3] == recorded[:3]  # (a new frame)
