"""Sweeps on Optuna: specs, dry runs, a real grid, crashes and concurrent workers."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import cli
from dat_lab.ablations import paper_rows
from dat_lab.sweep import SpecError, parse_spec, plan
from dat_lab.sweep.runner import CELL

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "sweeps" / "demo.yaml")
SMALL = ["budget.max_epochs=1", "budget.limit_train_batches=3", "budget.limit_val_batches=2"]


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


BASE = f"study: t\nbase: {ROOT / 'experiments' / 'digits_quick.yaml'}\n"


@pytest.mark.parametrize("body,message", [
    ("stduy: x\n", "stduy: unknown key; allowed:"),
    ("factors: {s: {path: model.overrides.offset_range, values: []}}\n", "factors.s.values: must be a non-empty list"),
    ("factors: {s: {values: [1, 2]}}\n", "factors.s.path: a dotted config path is needed"),
    ("factors: {s: {levels: {a: {}}, baseline: b}}\n", "factors.s.baseline: 'b' is not one of a"),
    ("factors: {t: {paper_table: 8}}\n", "factors.t.paper_table: table: 8 is not one of 6, 7"),
    ("seeds: [0, 0]\n", "seeds: must be a non-empty list of distinct integers"),
    ("objective: {metric: val/acc7}\n", "objective.metric: 'val/acc7' is not one of"),
    ("sampler: random\n", "sampler: 'random' is not one of grid, tpe"),
    ("sampler: tpe\nn_trials: 3\n", "search_space: is required for sampler tpe"),
    ("budget: {epochs: 3}\n", "budget.epochs: unknown key"),
    ("factors:\n  a: {path: model.lr, values: [0.1]}\n  b: {path: model.lr, values: [0.2]}\n",
     "factors.b: sets model.lr, which factor a sets too"),
])
def test_bad_specs_name_the_key(tmp_path, body, message):
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_spec(_write(tmp_path, BASE + body))


def test_bad_cell_configs_fail_before_anything_runs(tmp_path):
    spec = parse_spec(_write(tmp_path, BASE + "factors: {g: {path: model.overrides.groups, values: [3]}}\n"))
    with pytest.raises(SpecError, match=r"cell 'g=3': .*groups: 3 offset groups do not divide 1 heads"):
        plan(spec)
    spec = parse_spec(_write(tmp_path, BASE + "factors: {x: {path: model.learning_rate, values: [1]}}\n"))
    with pytest.raises(SpecError, match=r"cell 'x=1': training config: .*model.learning_rate"):
        plan(spec)
    with pytest.raises(SpecError, match="no such sweep spec"):
        parse_spec(tmp_path / "missing.yaml")


def test_grid_cells_are_the_product_times_seeds():
    spec = parse_spec(DEMO)
    cells = spec.cells()
    assert len(cells) == 2 * 2 * 2 and len({c.key for c in cells}) == 8
    assert cells[0].levels == {"position": "relative", "s": "0"}
    assert spec.trial_config(cells[-1].delta, 1)["model"]["overrides"] == {"position": "none", "offset_range": 2}


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_dry_run_of_every_spec(path, capsys, tmp_path):
    storage = tmp_path / "dry.db"
    assert cli.main(["sweep", str(path), "--dry-run", "--storage", f"sqlite:///{storage}"]) == 0
    assert not storage.exists()  # a dry run writes nothing
    out = capsys.readouterr().out
    assert "nothing trained (--dry-run)" in out


def test_table6_dry_run_matches_profile_paper_tables():
    planned = plan(parse_spec(ROOT / "sweeps" / "table6_geometry.yaml"))
    rows = paper_rows(6)
    from dat_lab.profile import profile_model
    import dat_lab

    assert [p.cell.levels["geometry"] for p in planned] == [r.row for r in rows]
    for p, row in zip(planned, rows):
        expected = profile_model(dat_lab.create_model(row.config()))
        assert (round(p.params_m, 4), round(p.gflops, 4)) == (round(expected.params_m, 4), round(expected.gflops, 4))


def _sweep(tmp_path, storage, *extra, study="s"):
    return [sys.executable, "-m", "cli", "sweep", DEMO, *SMALL, "--storage", storage, "--study", study,
            "--runs-root", str(tmp_path / "runs"), *extra]


def _run(argv, env):
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _assert_every_cell_once(storage, study="s", cells=8):
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    complete = [t.user_attrs[CELL] for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == cells and len(set(complete)) == cells, complete
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)
                and t.user_attrs.get(CELL) not in complete]
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    return trials


def test_demo_sweep_end_to_end_and_status(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'demo.db'}"
    assert cli.main(["sweep", DEMO, *SMALL, "--storage", storage, "--study", "s",
                     "--runs-root", str(tmp_path / "runs")]) == 0
    trials = _assert_every_cell_once(storage)
    t = next(t for t in trials if t.state == TrialState.COMPLETE)
    for attr in ("levels", "seed", "best", "final", "params_m", "gflops", "images_per_s", "wall_s", "run_dir"):
        assert t.user_attrs.get(attr) is not None, attr
    assert (Path(t.user_attrs["run_dir"]) / "config.yaml").exists()
    assert list(Path(t.user_attrs["run_dir"]).glob("events.out.tfevents.*"))
    capsys.readouterr()
    # rerunning the same command trains nothing again
    assert cli.main(["sweep", DEMO, *SMALL, "--storage", storage, "--study", "s",
                     "--runs-root", str(tmp_path / "runs")]) == 0
    assert len(optuna.load_study(study_name="s", storage=storage).get_trials()) == len(trials)
    assert cli.main(["sweep-status", "s", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert "8 done, 0 running, 0 failed, 0 pending" in out
    assert cli.main(["sweep-status", "s", "--storage", storage, "--trial", str(t.number)]) == 0
    assert capsys.readouterr().out.startswith(f"dat-lab train --config {t.user_attrs['run_dir']}/config.yaml")


def test_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'f.db'}"
    spec = _write(tmp_path, BASE + "budget: {max_epochs: 1, limit_train_batches: 6, limit_val_batches: 1}\n"
                  "factors: {lr: {path: model.lr, values: [1.0e+30, 1.0e-3]}}\n")
    assert cli.main(["sweep", str(spec), "--storage", storage, "--runs-root", str(tmp_path / "runs")]) == 0
    assert cli.main(["sweep-status", "t", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert "1 done, 0 running, 1 failed" in out and "NonFiniteLossError: non-finite training loss" in out


def test_kill_9_during_a_trial_then_resume(tmp_path):
    storage = f"sqlite:///{tmp_path / 'k.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_sweep(tmp_path, storage), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            trials = optuna.load_study(study_name="s", storage=storage).get_trials()
        except Exception:  # not created yet
            continue
        if any(t.state == TrialState.COMPLETE for t in trials) and any(t.state == TrialState.RUNNING for t in trials):
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    states = [t.state for t in optuna.load_study(study_name="s", storage=storage).get_trials()]
    assert TrialState.RUNNING in states, "no trial was running when killed"
    _run(_sweep(tmp_path, storage), env)
    trials = _assert_every_cell_once(storage)
    assert any(t.state == TrialState.FAIL for t in trials)  # the killed trial, marked stale and run again


def test_workers_need_a_shared_server(tmp_path, capsys):
    assert cli.main(["sweep", DEMO, "--workers", "2", "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    assert "SQLite is unsafe for parallel workers" in capsys.readouterr().err


def test_two_workers_on_postgres_run_each_cell_once(tmp_path, postgres_url):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    _run(_sweep(tmp_path, postgres_url, "--workers", "2", study="pg"), env)
    trials = _assert_every_cell_once(postgres_url, study="pg")
    workers = {t.user_attrs["worker"] for t in trials if t.state == TrialState.COMPLETE}
    assert len(workers) == 2, workers


def test_ctrl_c_leaves_the_storage_consistent(tmp_path):
    storage = f"sqlite:///{tmp_path / 'c.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "cli", "sweep", DEMO, "budget.max_epochs=2", "--storage", storage, "--study", "s",
            "--runs-root", str(tmp_path / "runs")]  # trials of several seconds: the signal lands in one
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            if any(t.state == TrialState.RUNNING for t in optuna.load_study(study_name="s", storage=storage).trials):
                break
        except Exception:  # not created yet
            continue
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "run the same command again to resume" in err
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert [t.user_attrs.get("failure") for t in trials if t.state == TrialState.FAIL] in (["interrupted"], [])
