"""Sweeps on Optuna: a real grid and searches, crashes, resumes, fingerprints and concurrent workers."""

import contextlib
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import cli
import dat_lab
from dat_lab import metrics as M
from dat_lab.data import DataError
from dat_lab.sweep import SpecError, parse_spec, plan
from dat_lab.sweep import runner
from dat_lab.sweep.runner import CELL, FINGERPRINT, open_study, work
from commands import run_command
from sweep_common import BASE, DEMO, ROOT, SMALL, TPE, write_spec


def test_a_trial_whose_data_went_away_after_planning_fails_with_the_data_error(tmp_path):
    import shutil

    from PIL import Image

    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / c / "0.jpg")
    spec = parse_spec(write_spec(tmp_path, f"study: t\nbase: {ROOT / 'experiments' / 'dat_tiny_imagenet.yaml'}\n"
                             f"delta: {{data: {{init_args: {{root: {root}, num_classes: 2}}}}, trainer: "
                             "{accelerator: cpu, devices: 1, strategy: auto, precision: 32-true}}\n"))
    planned = plan(spec)  # the data are there
    shutil.rmtree(root / "train")  # and are gone when the trial starts (an unmounted disk)
    study = work(spec, storage=f"sqlite:///{tmp_path / 's.db'}", study_name="t", runs_root=str(tmp_path / "runs"),
                 planned=planned)
    [trial] = study.get_trials()
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["failure"] == f"ValueError: {root / 'train'}: no such folder (expected class folders of images)"


def test_a_failure_reason_is_the_errors_own_first_line_unless_a_data_error_lies_under_it():
    try:
        try:
            {}["lr"]
        except KeyError:
            raise ValueError("Expected a float\nsecond line")
    except ValueError as err:
        assert runner._failure(err) == "ValueError: Expected a float"
    try:
        raise ValueError("Does not validate against any of the Union subtypes") from DataError("/x/train: no such folder")
    except ValueError as err:
        assert runner._failure(err) == "ValueError: /x/train: no such folder"


def test_a_failure_in_a_spawned_rank_is_the_first_line_of_its_exception():
    from torch.multiprocessing import ProcessRaisedException

    err = ProcessRaisedException("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent "
                                 "call last):\n  File \"x.py\", line 1, in f\n    g()\n  File \"y.py\", line 9, in g\n"
                                 "    raise OutOfMemoryError(text)\ntorch.OutOfMemoryError: CUDA out of memory. "
                                 "Tried to allocate 2.00 GiB\nIf reserved but unallocated memory is large ...\n", 1, 99)
    assert runner._failure(err) == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_a_trial_whose_objective_is_nan_fails_with_its_reason(tmp_path, monkeypatch):
    """Optuna fails a trial that returns NaN, saying so only in a warning (which workers do not show)."""
    from types import SimpleNamespace

    from dat_lab.training.callbacks import MetricTracker

    spec = parse_spec(write_spec(tmp_path, BASE + "objective: {metric: val/loss, direction: minimize}\n"))
    trainer = SimpleNamespace(callback_metrics={})
    monkeypatch.setattr(runner, "train", lambda args, extra_callbacks: SimpleNamespace(trainer=trainer))
    monkeypatch.setattr(MetricTracker, "results", lambda self, trainer: (float("nan"), float("nan"), 3))
    study = work(spec, storage=f"sqlite:///{tmp_path / 'n.db'}", study_name="t", runs_root=str(tmp_path / "runs"))
    [trial] = study.get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs["failure"] == "RuntimeError: val/loss (best) is nan"


def test_a_ctrl_c_that_python_swallows_still_stops_the_sweep(tmp_path, monkeypatch):
    """A SIGINT that lands in a __del__ or a garbage-collection callback (the sweep collects after each
    trial) raises a KeyboardInterrupt that Python prints as "Exception ignored" and drops: the sweep
    stops after the trial it hit, the finished one stored, the others still queued."""
    from types import SimpleNamespace

    from dat_lab.training.callbacks import MetricTracker

    class Collected:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (`make &` ignores SIGINT; conftest restores)
    spec = parse_spec(write_spec(tmp_path, BASE + "seeds: [0, 1, 2]\n"))
    monkeypatch.setattr(runner, "train", lambda args, extra_callbacks: SimpleNamespace(
        trainer=SimpleNamespace(callback_metrics={})))
    monkeypatch.setattr(MetricTracker, "results", lambda self, trainer: (0.5, 0.5, 3))
    with pytest.raises(KeyboardInterrupt):
        work(spec, storage=f"sqlite:///{tmp_path / 'c.db'}", study_name="t", runs_root=str(tmp_path / "runs"),
             on_trial=lambda trial: Collected())  # made and dropped at once: its __del__ runs then
    states = [t.state for t in optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'c.db'}").trials]
    assert states == [TrialState.COMPLETE, TrialState.WAITING, TrialState.WAITING]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own again
    # a Ctrl-C before the trial's training began: its reason is recorded all the same (not "killed or crashed")
    monkeypatch.setattr(runner, "_run_trial", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        work(spec, storage=f"sqlite:///{tmp_path / 'c.db'}", study_name="t", runs_root=str(tmp_path / "runs"))
    trial = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'c.db'}").trials[1]
    assert (trial.state, trial.user_attrs[M.TRIAL_FAILURE]) == (TrialState.FAIL, "interrupted")


def test_an_sqlite_url_with_options_names_its_file():
    from dat_lab.metrics import sqlite_path

    assert sqlite_path("sqlite:////runs/x.db?timeout=30") == Path("/runs/x.db") and sqlite_path("postgresql://h/d") is None


def test_a_sweep_refused_after_planning_writes_no_storage(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "visible_gpus", lambda: [])  # a machine without GPUs, as CI's
    db = tmp_path / "new.db"
    code = cli.main(["sweep", DEMO, *SMALL, "delta.trainer.accelerator=gpu", "--storage", f"sqlite:///{db}",
                     "--runs-root", str(tmp_path / "runs")])
    assert code == 2 and "this machine has no GPU" in capsys.readouterr().err
    assert not db.exists() and not (tmp_path / "runs").exists()
    code = cli.main(["sweep", DEMO, *SMALL, "delta.trainer.accelerator=gpu", "--storage", f"sqlite:///{db}",
                     "--runs-root", str(tmp_path / "runs"), "--dry-run"])  # a plan made elsewhere: said, not refused
    assert code == 0 and "note: a real run here would be refused: trainer.accelerator: gpu, and this machine has no " \
                         "GPU" in capsys.readouterr().out


def _sweep(tmp_path, storage, *extra, study="s"):
    return [sys.executable, "-m", "cli", "sweep", DEMO, *SMALL, "--storage", storage, "--study", study,
            "--runs-root", str(tmp_path / "runs"), *extra]


def _run(argv, env):
    done = run_command(argv, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _assert_every_cell_once(storage, study="s", cells=8):
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    complete = [t.user_attrs[CELL] for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == cells and len(set(complete)) == cells, complete
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)
                and t.user_attrs.get(CELL) not in complete]
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    return trials


def test_demo_sweep_end_to_end_and_status(tmp_path, capsys, monkeypatch):
    storage = f"sqlite:///{tmp_path / 'demo.db'}"
    monkeypatch.chdir(tmp_path)  # a relative --runs-root: trials record absolute run folders (analysis may run elsewhere)
    assert cli.main(["sweep", DEMO, *SMALL, "--storage", storage, "--study", "s", "--runs-root", "runs"]) == 0
    trials = _assert_every_cell_once(storage)
    assert optuna.load_study(study_name="s", storage=storage).user_attrs[M.STUDY_SAMPLER] == "grid"  # analysis reads it
    t = next(t for t in trials if t.state == TrialState.COMPLETE)
    for attr in ("levels", "seed", "best", "final", "params_m", "gflops", "images_per_s", "wall_s", "run_dir"):
        assert t.user_attrs.get(attr) is not None, attr
    assert (Path(t.user_attrs["run_dir"]) / "config.yaml").exists() and Path(t.user_attrs["run_dir"]).is_absolute()
    logger = yaml.safe_load((Path(t.user_attrs["run_dir"]) / "config.yaml").read_text())["trainer"]["logger"]
    assert Path(logger["init_args"]["save_dir"]).is_absolute()  # its config names its folder from any directory
    for trial in trials:  # the data's shuffling follows the trial's seed; the split stays
        data = yaml.safe_load((Path(trial.user_attrs["run_dir"]) / "config.yaml").read_text())["data"]["init_args"]
        assert (data["seed"], data["split_seed"]) == (trial.user_attrs["seed"], 0)
    planned = {p.cell.key: p for p in plan(parse_spec(DEMO))}[t.user_attrs["cell"]]  # not rounded to 0.0074
    gflops = t.user_attrs["gflops"]
    assert gflops == pytest.approx(planned.cost.gflops, rel=1e-5) and gflops != round(gflops, 4)
    assert list(Path(t.user_attrs["run_dir"]).glob("events.out.tfevents.*"))
    capsys.readouterr()
    # rerunning the same command trains nothing again
    assert cli.main(["sweep", DEMO, *SMALL, "--storage", storage, "--study", "s", "--runs-root", "runs"]) == 0
    assert len(optuna.load_study(study_name="s", storage=storage).get_trials()) == len(trials)
    assert cli.main(["sweep-status", "s", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert "8 done, 0 running, 0 failed, 0 pending" in out
    assert cli.main(["sweep-status", "s", "--storage", storage, "--trial", str(t.number)]) == 0
    assert capsys.readouterr().out.strip() == (f"dat-lab train --config {t.user_attrs['run_dir']}/config.yaml "
                                               f"--trainer.logger true --trainer.enable_progress_bar true --name s_trial_{t.number:04d}_again")
    # resumed in its folder for another epoch: analysis draws the trial's own validations, as the table does
    from dat_lab.analysis.plots import learning_curves
    from dat_lab.analysis.study import load, trials_frame
    from dat_lab.training.cli import main as train

    run = Path(t.user_attrs["run_dir"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "2"])
    assert not [w for w in caught if "callbacks used to create the checkpoint" in str(w.message)]  # the sweep's own
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars(M.VAL_ACC1)]
    assert len(steps) == 2 and steps[0] == t.user_attrs[M.TRIAL_LAST_STEP] < steps[1]
    study, info = load("s", storage)
    frame = trials_frame(study, info)
    fig = learning_curves(frame[frame["cell"] == t.user_attrs["cell"]], info)
    [line] = [line for line in fig.axes[0].lines if len(line.get_xdata())]
    assert list(line.get_xdata()) == [1]
    # runs/ moved (or copied from the machine the sweep ran on): found under --runs-root, else said so
    (tmp_path / "runs").rename(tmp_path / "moved")
    capsys.readouterr()
    assert cli.main(["sweep-status", "s", "--storage", storage, "--trial", str(t.number)]) == 2
    assert capsys.readouterr().err == (f"dat-lab: error: --trial: trial {t.number}'s run folder {run} (its config.yaml) "
                                       "is not here, nor under --runs-root runs: give --runs-root where runs/ is now\n")
    assert cli.main(["sweep-status", "s", "--storage", storage, "--trial", str(t.number), "--runs-root", "moved"]) == 0
    assert capsys.readouterr().out.startswith(f"dat-lab train --config {tmp_path / 'moved' / 's' / run.name}/config.yaml ")
    assert cli.main(["analyze", "s", "--storage", storage, "--runs-root", "moved"]) == 0
    assert (tmp_path / "moved" / "s" / "analysis" / "learning_curves.png").exists()  # its default --out there too


def test_cells_not_run_yet_show_their_params_and_flops(tmp_path):
    from dat_lab.analysis import analyze

    spec = parse_spec(DEMO)
    study = open_study(spec, f"sqlite:///{tmp_path / 'p.db'}", "p", plan(spec))
    study.tell(study.ask(), 0.9)  # one cell done (analysis needs one), the others queued
    table = analyze("p", f"sqlite:///{tmp_path / 'p.db'}", tmp_path / "out").table
    assert list(table["params (M)"]) == ["0.575", "0.576", "0.574", "0.576"]  # as in the README's demo table
    assert list(table["FLOPs (G)"]) == ["0.00738", "0.00742", "0.00737", "0.00741"]


def test_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path, capfd):
    storage = f"sqlite:///{tmp_path / 'f.db'}"
    spec = write_spec(tmp_path, BASE + "budget: {max_epochs: 1, limit_train_batches: 6, limit_val_batches: 1}\n"
                  "factors: {lr: {path: model.lr, values: [1.0e+30, 1.0e-3]}}\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sweep", str(spec), "--storage", storage, "--runs-root", str(tmp_path / "runs")])
    assert exit_.value.code == 1  # after the summary line, and a line saying how many trials FAILED
    captured = capfd.readouterr()
    assert f"study 't' in {storage}" in captured.out and "1 trial(s) of this run FAILED" in captured.err
    # one line as it failed, no traceback (Optuna's warning had one for each failed trial)
    assert "trial 0 (lr=1e+30 | seed=0) FAILED: NonFiniteLossError: non-finite training loss" in captured.out
    assert "Traceback" not in captured.out + captured.err
    assert cli.main(["sweep-status", "t", "--storage", storage]) == 0
    out = capfd.readouterr().out
    assert "1 done, 0 running, 1 failed" in out and "NonFiniteLossError: non-finite training loss" in out


def test_kill_9_during_a_trial_then_resume(tmp_path):
    storage = f"sqlite:///{tmp_path / 'k.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_sweep(tmp_path, storage, "seeds=[0]"), cwd=ROOT, env=env, start_new_session=True,
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
    _run(_sweep(tmp_path, storage, "seeds=[0]"), env)  # one seed: 4 cells (the same spec as the first run)
    trials = _assert_every_cell_once(storage, cells=4)
    assert any(t.state == TrialState.FAIL for t in trials)  # the killed trial, marked stale and run again


def test_n_trials_errors_name_the_option(tmp_path, capsys):
    """(They named the spec's key n_trials, which the user had not written.)"""
    search = write_spec(tmp_path, BASE + TPE)
    for spec, count, says in ((DEMO, "3", "--n-trials: only for sampler tpe (a grid runs every cell)"),
                              (search, "0", "--n-trials: must be a positive integer for sampler tpe, got 0")):
        assert cli.main(["sweep", str(spec), "--n-trials", count, "--dry-run", "--runs-root", str(tmp_path)]) == 2
        assert capsys.readouterr().err == f"dat-lab: error: {says}\n"


def test_a_search_dry_run_says_how_many_trials_the_study_has_done(tmp_path, capsys):
    """(A grid's said how many of its cells were done; a search's said nothing of its trials.)"""
    storage, spec = f"sqlite:///{tmp_path / 's.db'}", write_spec(tmp_path, BASE + TPE.replace("n_trials: 2", "n_trials: 3"))
    study = open_study(parse_spec(spec), storage, "t")
    for value in (0.5, 0.6):
        study.tell(study.ask(), value)
    assert _dry_run(spec, storage, tmp_path) == 0
    assert "(2 trial(s) done in the study, 1 to train), nothing trained (--dry-run)" in capsys.readouterr().out


def test_workers_need_a_shared_server(tmp_path, capsys):
    assert cli.main(["sweep", DEMO, "--workers", "2", "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    assert "SQLite is unsafe for parallel workers" in capsys.readouterr().err


def test_two_workers_on_postgres_run_each_cell_once(tmp_path, postgres_url):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = _run(_sweep(tmp_path, postgres_url, "seeds=[0]", "--workers", "2", study="pg"), env)
    trials = _assert_every_cell_once(postgres_url, study="pg", cells=4)
    workers = {t.user_attrs[M.TRIAL_WORKER] for t in trials if t.state == TrialState.COMPLETE}
    assert len(workers) == 2, workers
    assert done.stdout.count("study 'pg' in ") == 1, done.stdout  # the command's closing line, not each worker's


def test_ctrl_c_before_training_is_one_line(monkeypatch, capsys):
    """Ctrl-C while torch imports or the cells are planned: no traceback, the shell's status 130."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_sweep", interrupted)
    assert cli.main(["sweep", DEMO, "--dry-run"]) == 130
    assert capsys.readouterr().err == "dat-lab: interrupted\n"
    # on the command line it dies of SIGINT (still 130 to the shell), so that a shell loop over commands
    # stops: the Ctrl-C reaches the shell too, which goes on when the command says it handled it (exit 130)
    command = ("import os, signal, sys, time, cli\n"
               "def interrupted(args):\n"
               "    os.killpg(0, signal.SIGINT)  # as a terminal's Ctrl-C: to the shell and to dat-lab\n"
               "    time.sleep(5)\n"
               "cli._sweep = interrupted\n"
               "sys.exit(cli.main())")
    loop = f'for i in 1 2; do "{sys.executable}" -c "$COMMAND" sweep {DEMO}; echo "went on after $i"; done'
    done = subprocess.run(["bash", "-c", loop], env={**os.environ, "PYTHONPATH": str(ROOT), "COMMAND": command},
                          start_new_session=True, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (make & ignores it)
    assert done.returncode in (130, -signal.SIGINT) and "went on" not in done.stdout, done.stdout  # the loop stopped
    assert done.stderr.count("dat-lab: interrupted") == 1, done.stderr


def test_ctrl_c_leaves_the_storage_consistent(tmp_path):
    storage = f"sqlite:///{tmp_path / 'c.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "cli", "sweep", DEMO, "budget.max_epochs=2", "--storage", storage, "--study", "s",
            "--runs-root", str(tmp_path / "runs")]  # trials of several seconds: the signal lands in one
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline, running = time.time() + 240, False
    while not running and time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
        try:
            running = any(t.state == TrialState.RUNNING for t in optuna.load_study(study_name="s", storage=storage).trials)
        except Exception:  # not created yet
            continue
    assert running, "no trial was seen running"
    time.sleep(1.0)  # inside the trial's ~5 s
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT and "run the same command again to resume" in err  # 130 to a shell
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert [t.user_attrs.get(M.TRIAL_FAILURE) for t in trials if t.state == TrialState.FAIL] == ["interrupted"]


def _dry_run(spec, storage, tmp_path, *extra):
    return cli.main(["sweep", str(spec), *extra, "--dry-run", "--storage", storage, "--runs-root", str(tmp_path / "runs")])


def test_a_study_made_by_another_spec_is_refused_before_training(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'r.db'}"
    spec = write_spec(tmp_path, BASE + "budget: {max_epochs: 1}\nseeds: [0, 1]\n")
    open_study(parse_spec(spec), storage, "t")  # the study as a first run made it (nothing trained)
    assert _dry_run(spec, storage, tmp_path, "heartbeat.grace=60") == 0  # run-time options may change
    capsys.readouterr()
    for override, field in [("seeds=[0]", "seeds: [0, 1] -> [0]"), ("seeds=[1,2]", "seeds: [0, 1] -> [1, 2]"),
                            ("budget.max_epochs=2", "config.trainer.max_epochs: 1 -> 2"),
                            ("objective.value=last", "objective.value: 'best' -> 'last'")]:
        assert _dry_run(spec, storage, tmp_path, override) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"study 't' in {storage} was made by another spec" in err, err
        assert field in err and "use --study NEW_NAME" in err, err
    # a typo in a key differs from the study's spec too: the typo is what is said
    assert _dry_run(spec, storage, tmp_path, "delta.model.lrr=0.1") == 2
    assert "does not accept option 'model.lrr' (did you mean model.lr?)" in capsys.readouterr().err
    argv = ["sweep", str(spec), "seeds=[5]", "--storage", storage, "--runs-root", str(tmp_path / "runs")]
    assert cli.main(argv) == 2  # a real run too, before any trial
    assert optuna.load_study(study_name="t", storage=storage).get_trials() == []
    optuna.create_study(study_name="old", storage=storage)  # a study from before fingerprints: accepted
    assert _dry_run(spec, storage, tmp_path, "seeds=[0,1,2]", "--study", "old") == 0
    with pytest.raises(SpecError, match="was made by another spec"):  # the worker API checks too
        open_study(parse_spec(spec, {"seeds": [5]}), storage, "t")
    assert FINGERPRINT not in optuna.load_study(study_name="old", storage=storage).user_attrs  # a dry run wrote nothing


def test_a_study_its_creator_left_unqueued_is_finished_by_the_next_run(tmp_path, capsys):
    """A run killed between storing the fingerprint and queueing the cells: the next one says it waits
    (it waited 120 s in silence, for SQLite too), then queues them."""
    storage = f"sqlite:///{tmp_path / 'k.db'}"
    spec = parse_spec(write_spec(tmp_path, BASE + "budget: {max_epochs: 1}\nseeds: [0, 1]\n"))
    planned = plan(spec, spec.planned_cells())
    made = optuna.create_study(study_name="t", storage=storage, direction="maximize")
    made.set_user_attr(FINGERPRINT, runner._fingerprint(spec, planned))  # where the killed run stopped
    study = open_study(spec, storage, "t", planned, wait_s=0.2)
    assert "study 't' has no cells queued yet: waiting up to 0 s for the worker creating it" in capsys.readouterr().err
    assert [t.state for t in study.get_trials()].count(TrialState.WAITING) == 2 and study.user_attrs[runner.ENQUEUED]


def test_a_storage_that_cannot_be_written_is_refused_before_planning(tmp_path, capsys, monkeypatch):
    spec = write_spec(tmp_path, BASE + "budget: {max_epochs: 1}\n")
    assert _dry_run(spec, "sqlite:////proc/dat-lab/x.db", tmp_path) == 2  # (os.access says yes to root there)
    assert capsys.readouterr().err == "dat-lab: error: --storage: /proc/dat-lab/x.db: /proc is not writable\n"
    open_study(parse_spec(spec), storage := f"sqlite:///{tmp_path / 'ro.db'}", "t")
    monkeypatch.setattr("cli.os.access", lambda path, mode: Path(path) != tmp_path / "ro.db")  # a read-only file
    assert cli.main(["sweep", str(spec), "--storage", storage, "--runs-root", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err == f"dat-lab: error: --storage: {tmp_path / 'ro.db'} is not writable\n"
    monkeypatch.undo()
    monkeypatch.chdir("/proc")  # no --storage given: the default is named as such
    assert cli.main(["sweep", str(spec), "--dry-run", "--runs-root", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err == ("dat-lab: error: --storage (default sqlite:///runs/t.db): runs/t.db: /proc is "
                                       "not writable\n")


def test_a_refusal_names_a_level_gone_or_new_and_a_field_of_a_level_kept():
    at = "factors.f.levels."
    stored = {at + "a.model.lr": 1, at + "a.model.weight_decay": 2, at + "0.5.model.lr": 3, at + "c": {}}
    current = {at + "a.model.lr": 1, at + "0.model.lr": 3, at + "c": {}}
    assert [runner._change(at + k, stored, current) for k in ("a.model.weight_decay", "0.5.model.lr", "0.model.lr")] \
        == ["factors.f.levels.a.model.weight_decay: 2 -> '(unset)'", "factor f: level 0.5 gone", "factor f: level 0 new"]


def test_a_grid_grows_by_seeds_and_levels_its_cells_kept(tmp_path, capsys):
    """More seeds, or more levels of its factors, add cells of their own to a grid study (those it has
    stay as trained); anything else that differs is still refused, and the spec it grew from too."""
    from dat_lab.sweep.runner import check_fingerprint

    storage = f"sqlite:///{tmp_path / 'g.db'}"
    levels = "a: {}, b: {model: {lr: 0.001}}, '0': {model: {lr: 0.002}}"
    path = write_spec(tmp_path, BASE + "factors: {f: {levels: {%s}, baseline: a}}\nseeds: [0]\n" % levels)
    first = parse_spec(path)
    open_study(first, storage, "t", plan(first, first.planned_cells()))
    more = {"factors.f.levels": yaml.safe_load("{%s, c: {model: {lr: 0.003}}, '0.5': {model: {lr: 0.004}}}" % levels)}
    grown = parse_spec(path, {"seeds": [0, 1], **more})
    assert check_fingerprint(grown, first.fingerprint(), "t", "s") == "seeds 1; f levels c, 0.5"
    assert check_fingerprint(parse_spec(path, {"seeds": [1, 0], **more}), grown.fingerprint(), "t", "s") == ""  # order
    with pytest.raises(SpecError, match=r"mix: config.trainer.max_epochs: .* -> 2; seeds: \[0\] -> \[0, 1\]"):
        check_fingerprint(parse_spec(path, {"seeds": [0, 1], "budget.max_epochs": 2}), first.fingerprint(), "t", "s")
    made = optuna.load_study(study_name="t", storage=storage)
    made.tell(made.ask(), 0.5)  # one cell trained
    assert _dry_run(path, storage, tmp_path, "seeds=[0,1]") == 0
    out = capsys.readouterr().out
    assert "study 't' grows: seeds 1 (cells of their own; those it has stay as they are)" in out
    assert "6 trial(s) planned (1 done in the study, 5 to train), nothing trained (--dry-run)" in out
    study = open_study(grown, storage, "t", plan(grown, grown.planned_cells()), wait_s=0)
    cells = [t.user_attrs[CELL] for t in study.get_trials()]
    assert len(cells) == len(set(cells)) == 10 and set(cells) == {c.key for c in grown.planned_cells()}
    assert [t.state for t in study.get_trials()].count(TrialState.COMPLETE) == 1  # (not queued again)
    assert study.user_attrs[FINGERPRINT] == grown.fingerprint() and study.user_attrs[M.STUDY_SEEDS] == [0, 1]
    assert list(study.user_attrs[M.STUDY_FACTORS]["f"]["levels"]) == ["a", "b", "0", "c", "0.5"]
    for other, field in [(first, "seeds: [0, 1] -> [0]; factor f: level c gone; factor f: level 0.5 gone"),  # fewer cells
                         (parse_spec(path, {"seeds": [0, 1], "factors.f.levels": {
                             **more["factors.f.levels"], "b": {"model": {"lr": 0.01}}}}),
                          "factors.f.levels.b.model.lr: 0.001 -> 0.01"),  # a level changed
                         (parse_spec(path, {"seeds": [0, 1], **more, "factors.g": {
                             "values": [1, 2], "baseline": "1", "path": "model.overrides.offset_range"}}),
                          "factor g: new")]:  # a new factor: every cell changes
        with pytest.raises(SpecError, match="was made by another spec") as err:
            open_study(other, storage, "t", wait_s=0)
        assert field in str(err.value)
    study = optuna.load_study(study_name="t", storage=storage)
    rival = parse_spec(path, {"seeds": [0, 1, 3], **more})  # another growth stored at once, last: it holds

    def rival_stores(seconds):
        study.set_user_attr(FINGERPRINT, rival.fingerprint())

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(runner.time, "sleep", rival_stores)
        with pytest.raises(SpecError, match=r"seeds: \[0, 1, 3\] -> \[0, 1, 2\]"):
            open_study(parse_spec(path, {"seeds": [0, 1, 2], **more}), storage, "t", wait_s=0)
    assert not [t for t in study.get_trials() if t.user_attrs[CELL].endswith("seed=2")]  # none of its cells queued
    search = parse_spec(write_spec(tmp_path, BASE + TPE))  # a search has one seed: no grid to grow
    with pytest.raises(SpecError, match="seeds: .0. -> .1."):
        check_fingerprint(parse_spec(write_spec(tmp_path, BASE + TPE + "seeds: [1]\n")), search.fingerprint(), "t", "s")


def test_a_worker_of_the_spec_a_study_grew_from_leaves_the_new_cells(tmp_path):
    """A worker still running the older spec when a rerun grew the study stops before claiming a new cell,
    and a new cell it claimed anyway (a race) is queued again, not lost."""
    from dat_lab.sweep.runner import _next_round, run_trial

    storage = f"sqlite:///{tmp_path / 'g.db'}"
    path = write_spec(tmp_path, BASE + "factors: {f: {levels: {a: {}, b: {model: {lr: 0.001}}}}}\nseeds: [0]\n")
    first = parse_spec(path)
    by_key = {p.cell.key: p for p in plan(first, first.planned_cells())}
    old = open_study(first, storage, "t", list(by_key.values()))
    running = [old.ask(), old.ask()]  # both of its cells claimed (by two workers)
    grown = parse_spec(path, {"seeds": [0, 1]})
    open_study(grown, storage, "t", plan(grown, grown.planned_cells()), wait_s=0)
    old.tell(running[0], 0.5)  # one finishes; the other still runs: the older worker goes on
    with pytest.raises(SpecError, match=r"study 't' grew since this worker started \(cell f=a \| seed=1 \(and 1 "
                                        r"more\) is not in its spec\): this worker stops"):
        _next_round(old, first, by_key, lambda trial: pytest.fail("claimed"), None, None)
    claimed = old.ask()  # (had it claimed one first)
    with pytest.raises(optuna.TrialPruned, match="is not in this worker's spec .* queued again"):
        run_trial(old, claimed, first, by_key, str(tmp_path / "runs"))
    waiting = [t.user_attrs[CELL] for t in old.get_trials(states=(TrialState.WAITING,))]
    assert sorted(waiting) == ["f=a | seed=1", "f=b | seed=1"]


def test_a_rerun_may_change_a_factors_baseline_which_analysis_alone_reads(tmp_path):
    storage = f"sqlite:///{tmp_path / 'b.db'}"
    factor = "factors: {f: {levels: {a: {}, b: {model: {lr: 0.001}}}, baseline: %s}}\n"
    first, second = (parse_spec(write_spec(tmp_path, BASE + factor % level)) for level in ("a", "b"))
    open_study(first, storage, "t")  # (no cells queued: the loads below need not wait for them)
    assert open_study(second, storage, "t", wait_s=0).user_attrs[M.STUDY_FACTORS]["f"]["baseline"] == "b"
    study = optuna.load_study(study_name="t", storage=storage)  # fingerprints stored with the baseline: accepted
    study.set_user_attr(FINGERPRINT, {**first.fingerprint(), "factors.f.baseline": "a"})
    assert open_study(first, storage, "t", wait_s=0).user_attrs[M.STUDY_FACTORS]["f"]["baseline"] == "a"


def test_a_worker_that_loads_a_study_being_created_waits_for_its_fingerprint(tmp_path, monkeypatch, capsys):
    storage = f"sqlite:///{tmp_path / 'r.db'}"
    search = parse_spec(write_spec(tmp_path, BASE + TPE))
    other = parse_spec(write_spec(tmp_path, BASE + TPE.replace("n_trials: 2", "n_trials: 2\nseeds: [7]")))
    optuna.create_study(study_name="new", storage=storage)  # created, its fingerprint not stored yet
    stored_while = []  # the creator stores its fingerprint while this worker waits (not before it looked)

    def creator_writes(seconds):
        stored_while.append(seconds)
        optuna.load_study(study_name="new", storage=storage).set_user_attr(FINGERPRINT, other.fingerprint())

    monkeypatch.setattr(runner.time, "sleep", creator_writes)
    with pytest.raises(SpecError, match="study 'new' .* was made by another spec.*seeds: \\[7\\] -> \\[0\\]"):
        open_study(search, storage, "new", wait_s=60)  # a TPE worker, which has no grid to wait for
    assert stored_while and "study 'new' has no fingerprint yet: waiting up to 60 s" in capsys.readouterr().err
    # a study from before fingerprints (attributes, none of them a fingerprint) takes the spec's at once
    optuna.create_study(study_name="old", storage=storage).set_user_attr(M.STUDY_SPEC, "sweeps/x.yaml")
    old = optuna.load_study(study_name="old", storage=storage)
    monkeypatch.setattr(runner.time, "sleep", lambda s: FINGERPRINT in old.user_attrs or pytest.fail(
        "waited for a fingerprint of an old study"))  # only after storing its own (two adopting at once)
    study = open_study(search, storage, "old", wait_s=60)
    assert study.user_attrs[FINGERPRINT] == search.fingerprint()
    with pytest.raises(SpecError, match="study 'old' .* was made by another spec"):
        open_study(other, storage, "old")  # and is guarded from then on
    optuna.create_study(study_name="dead", storage=storage)  # its creator died before storing anything
    dead = optuna.load_study(study_name="dead", storage=storage)

    def rival_adopts(seconds):  # once this worker has adopted its fingerprint, a rival's lands last
        if FINGERPRINT in dead.user_attrs:
            dead.set_user_attr(FINGERPRINT, other.fingerprint())

    monkeypatch.setattr(runner.time, "sleep", rival_adopts)
    with pytest.raises(SpecError, match="study 'dead' .* was made by another spec"):
        open_study(search, storage, "dead", wait_s=0)


def test_where_the_data_lie_how_many_loader_workers_and_logging_are_no_part_of_a_fingerprint(tmp_path):
    from dat_lab.sweep.runner import check_fingerprint

    path = write_spec(tmp_path, BASE)
    spec, elsewhere = parse_spec(path), parse_spec(path, {"delta.data.init_args.num_workers": 3})
    assert "config.data.init_args.num_workers" not in spec.fingerprint()
    check_fingerprint(elsewhere, spec.fingerprint(), "t", "s")  # another machine, another worker count
    logs_more = parse_spec(path, {"delta.trainer.log_every_n_steps": 1, "delta.trainer.enable_progress_bar": False})
    check_fingerprint(logs_more, spec.fingerprint(), "t", "s")  # how often it logs: not what it trains
    check_fingerprint(spec, {**spec.fingerprint(), "config.data.init_args.root": "/mnt/a"}, "t", "s")  # stored before
    with pytest.raises(SpecError, match="config.data.init_args.img_size: 32 -> 16"):
        check_fingerprint(parse_spec(path, {"delta.data.init_args.img_size": 16}), spec.fingerprint(), "t", "s")
    imagenet = write_spec(tmp_path, f"study: t\nbase: {ROOT / 'experiments' / 'dat_tiny_imagenet.yaml'}\n")
    here, there = parse_spec(imagenet), parse_spec(imagenet, {"delta.data.init_args.root": "/mnt/imagenet"})
    assert there.base_config()["data"]["init_args"]["root"] == "/mnt/imagenet"
    check_fingerprint(there, here.fingerprint(), "t", "s")


def _layout(root: Path, classes: list[str]) -> str:
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            (root / split / c / "0.jpg").touch()
    return str(root)


def test_a_study_resumed_on_other_images_with_as_many_classes_is_refused(tmp_path, capsys):
    from dat_lab.sweep.runner import check_fingerprint
    from dat_lab.sweep.spec import DATA_IDENTITY

    spec = write_spec(tmp_path, f"study: t\nbase: {ROOT / 'experiments' / 'dat_tiny_imagenet.yaml'}\n"
                            "delta: {model: {variant: dat_pico}, data: {init_args: {num_classes: 3, img_size: 32}}}\n")
    here = _layout(tmp_path / "here", ["cat", "dog", "eel"])
    there = _layout(tmp_path / "there", ["cat", "dog", "eel"])  # the same dataset, mounted elsewhere
    other = _layout(tmp_path / "other", ["cat", "dog", "emu"])  # another one, of as many classes
    storage = f"sqlite:///{tmp_path / 'r.db'}"
    made = parse_spec(spec, {"delta.data.init_args.root": here})
    open_study(made, storage, "t", plan(made, made.planned_cells()))  # as a first run made it
    assert _dry_run(spec, storage, tmp_path, f"delta.data.init_args.root={there}") == 0
    capsys.readouterr()
    assert _dry_run(spec, storage, tmp_path, f"delta.data.init_args.root={other}") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "study 't' in" in err and "was made on other data, its results would mix: " \
        "data: ['3 class folders cat..eel, names sha256 " in err and "-> ['3 class folders cat..emu, names sha256 " in err
    stored = optuna.load_study(study_name="t", storage=storage).user_attrs[FINGERPRINT]
    elsewhere = parse_spec(spec, {"delta.data.init_args.root": other})
    on_other = plan(elsewhere, elsewhere.planned_cells())
    open_study(elsewhere, storage, "t")  # a worker that did not plan (the API's default) compares no data
    optuna.create_study(study_name="old", storage=storage).set_user_attr(
        FINGERPRINT, {k: v for k, v in stored.items() if k != DATA_IDENTITY})  # stored before it held the data:
    check_fingerprint(elsewhere, stored, "t", "s", None)
    open_study(made, storage, "old", plan(made, made.planned_cells()), wait_s=0)  # accepted; its data guarded from now on
    with pytest.raises(SpecError, match="study 'old' .* was made on other data"):
        open_study(elsewhere, storage, "old", on_other)
    # a search whose space chooses the data: each choice's data in the fingerprint
    search = parse_spec(spec, {"delta.data.init_args.root": here, "sampler": "tpe", "n_trials": 2,
                               "search_space": {"data.init_args.root": {"type": "categorical", "choices": [here, other]}}})
    [base] = plan(search, search.planned_cells())
    assert len(base.data) == 2 and {d.split(",")[0] for d in base.data} == {"3 class folders cat..eel",
                                                                            "3 class folders cat..emu"}


def _trial_dir(tmp_path, study, number):
    run_dir = tmp_path / "runs" / study / f"trial_{number:04d}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("from another storage\n")
    return run_dir


def test_run_folders_of_another_storage_are_refused(tmp_path, capsys):
    spec = write_spec(tmp_path, BASE)
    _trial_dir(tmp_path, "t", 0)
    assert _dry_run(spec, f"sqlite:///{tmp_path / 'new.db'}", tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'runs' / 't' / 'trial_0000'} holds a run that is no trial of study 't'" in err
    assert "use another --study name or move" in err
    # a resume finds its own trials' folders: not refused
    storage = f"sqlite:///{tmp_path / 'own.db'}"
    study = open_study(parse_spec(spec), storage, "t")
    study.enqueue_trial({})
    study.ask()
    assert _dry_run(spec, storage, tmp_path) == 0


def test_each_trial_refuses_a_run_folder_that_is_not_its_own(tmp_path):
    """What preflight cannot see (a worker started before the folder appeared, the `work` API): the trial
    FAILS before training, naming the folder; a TPE search whose trials all fail ends at n_trials."""
    for text, cells in [("", 1), (TPE, 2)]:  # a tiny budget: should a trial train after all, briefly
        spec = parse_spec(write_spec(tmp_path, BASE + text), {"budget": {"max_epochs": 1, "limit_train_batches": 1,
                                                                     "limit_val_batches": 1}})
        name = "grid" if spec.is_grid else "tpe"
        dirs = [_trial_dir(tmp_path, name, n) for n in range(cells)]
        calls = []

        def progress(done, total):
            calls.append(done)
            assert len(calls) < 10, "the sweep does not end"

        study = work(spec, storage=f"sqlite:///{tmp_path / name}.db", study_name=name, runs_root=str(tmp_path / "runs"),
                     progress=progress)
        trials = study.get_trials()
        assert [t.state for t in trials] == [TrialState.FAIL] * cells
        assert [t.user_attrs["failure"].startswith(f"run directory {d} already holds another run")
                for t, d in zip(trials, dirs)] == [True] * cells
        assert [(d / "config.yaml").read_text() for d in dirs] == ["from another storage\n"] * cells


def test_the_tpe_sampler_takes_the_spec_options_without_deprecation_warnings():
    import warnings

    from dat_lab.sweep.spec import build_sampler

    spec = parse_spec(ROOT / "sweeps" / "lr_search.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # optuna 5 warns for each deprecated option passed
        sampler = build_sampler(spec.sampler)
    assert (sampler._n_startup_trials, sampler._n_ei_candidates, sampler._multivariate, sampler._group,
            sampler._constant_liar) == (5, 24, True, False, True)
    prior = sampler._parzen_estimator_parameters
    assert (prior.prior_weight, prior.consider_magic_clip, prior.consider_endpoints) == (1.0, True, False)


def test_a_tpe_search_whose_trials_all_fail_ends_and_exits_1(tmp_path, capsys, monkeypatch):
    finished = runner.study_progress
    calls = []

    def bounded(*args):
        calls.append(1)
        assert len(calls) < 10, "the search does not end"
        return finished(*args)

    monkeypatch.setattr(runner, "study_progress", bounded)
    spec = write_spec(tmp_path, BASE + "sampler: tpe\nn_trials: 2\nbudget: {max_epochs: 1, limit_train_batches: 6, "
                  "limit_val_batches: 1}\nsearch_space: {model.lr: {type: categorical, choices: [1.0e+30]}}\n")
    storage = f"sqlite:///{tmp_path / 'tpe.db'}"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sweep", str(spec), "--storage", storage, "--runs-root", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "2 trial(s) of this run FAILED" in err and "raise --n-trials to sample more" in err
    trials = optuna.load_study(study_name="t", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert "non-finite training loss" in trials[0].user_attrs["failure"]


def test_a_trial_failing_before_training_records_why_and_a_search_still_ends(tmp_path, monkeypatch):
    finished, calls = runner.study_progress, []

    def bounded(*args):
        calls.append(1)
        assert len(calls) < 10, "the search does not end"
        return finished(*args)

    def broken(config):
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "study_progress", bounded)
    monkeypatch.setattr(runner, "in_worker", broken)
    spec = parse_spec(write_spec(tmp_path, BASE + TPE))
    study = work(spec, storage=f"sqlite:///{tmp_path / 'b.db'}", study_name="t", runs_root=str(tmp_path / "runs"),
                 planned=plan(spec, spec.planned_cells()))
    assert [(t.state, t.user_attrs["failure"]) for t in study.get_trials()] == [(TrialState.FAIL, "RuntimeError: boom")] * 2


def test_a_search_trial_that_does_not_finish_has_its_models_params_and_flops(tmp_path, monkeypatch):
    """Recorded before training, of the model the trial's sample builds (a search may choose it): a
    pruned or failed trial has them too (analysis shows them beside its last value)."""
    from dat_lab.models import get_config
    from dat_lab.profile import profile_model
    from dat_lab.sweep.plan import model_cost

    def pruned(config, extra_callbacks=()):
        raise optuna.TrialPruned("pruned at epoch 1")

    monkeypatch.setattr(runner, "train", pruned)
    spec = parse_spec(write_spec(tmp_path, BASE + "sampler: tpe\nn_trials: 4\n"
                                 "search_space: {model.variant: {type: categorical, choices: [dat_pico, dat_nano]}}\n"))
    study = work(spec, storage=f"sqlite:///{tmp_path / 's.db'}", study_name="t", runs_root=str(tmp_path / "runs"),
                 planned=plan(spec, spec.planned_cells()))
    trials = study.get_trials()
    assert len(trials) == 4 and {t.state for t in trials} == {TrialState.PRUNED}
    for t in trials:
        model = get_config(t.params["model.variant"], num_classes=10, img_size=32, in_chans=1)
        assert t.user_attrs["params_m"] == profile_model(dat_lab.create_model(model)).shown()["params_m"], t.params
        assert t.user_attrs["gflops"] == model_cost(model).shown()["gflops"]


def test_a_resumed_search_and_its_workers_draw_points_of_their_own(tmp_path, monkeypatch):
    """More trials of a search, or a search resumed, sample new points (one sampler seed drew the first
    ones again); two workers asking at once draw different ones; from scratch, the same again."""
    from dat_lab.sweep.runner import _sampler_for_next_trial

    def pruned(config, extra_callbacks=()):
        raise optuna.TrialPruned("pruned")

    monkeypatch.setattr(runner, "train", pruned)
    text = BASE + "sampler: tpe\nn_trials: 3\nsearch_space: {model.lr: {type: float, low: 1.0e-4, high: 1.0e-2}}\n"
    spec = parse_spec(write_spec(tmp_path, text))
    runs = []
    for name in ("a", "b"):  # twice from scratch
        storage = f"sqlite:///{tmp_path / (name + '.db')}"
        work(spec, storage=storage, study_name="t", runs_root=str(tmp_path / name), planned=plan(spec, spec.planned_cells()))
        more = parse_spec(write_spec(tmp_path, text.replace("n_trials: 3", "n_trials: 6")))
        study = work(more, storage=storage, study_name="t", runs_root=str(tmp_path / name),
                     planned=plan(more, more.planned_cells()))
        runs.append([t.params["model.lr"] for t in study.get_trials()])
    assert len(runs[0]) == len(set(runs[0])) == 6  # the resumed trials 3-5 did not draw trials 0-2's again
    assert runs[0] == runs[1]  # one worker from scratch: the same points
    study = optuna.load_study(study_name="t", storage=storage)
    first, second = (_sampler_for_next_trial(spec, study, worker) for worker in (0, 1))
    assert first.sample_independent(study, study.ask(), "x", optuna.distributions.FloatDistribution(0, 1)) != \
        second.sample_independent(study, study.ask(), "x", optuna.distributions.FloatDistribution(0, 1))


def test_several_workers_find_the_grids_missing_cells_queued_once(tmp_path, postgres_url, monkeypatch):
    """The sweep queues the cells no trial has finished before it starts its workers (each queued those
    it found missing: starting together, a rerun's workers queued its failed cells twice)."""
    argv = ["sweep", DEMO, "--workers", "2", "--storage", postgres_url, "--study", "queued", "--runs-root",
            str(tmp_path / "runs")]
    queued = []
    waiting = lambda: [t for t in optuna.load_study(study_name="queued", storage=postgres_url).get_trials()  # noqa: E731
                       if t.state == TrialState.WAITING]
    monkeypatch.setattr(runner, "spawn_workers", lambda argv, workers, gpus: queued.append(len(waiting())) or 0)
    assert cli.main(argv) == 0
    study = optuna.load_study(study_name="queued", storage=postgres_url)
    for trial in study.get_trials()[:3]:  # three cells failed: a rerun queues each once more, before its workers start
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    assert cli.main(argv) == 0
    assert queued == [8, 8] and len(study.get_trials()) == 11


def test_the_worst_worker_status_is_the_sweeps(tmp_path, postgres_url, monkeypatch, capsys):
    argv = ["sweep", DEMO, "--workers", "2", "--storage", postgres_url, "--study", "statuses",
            "--runs-root", str(tmp_path / "runs")]
    for status, code, message in [(1, 1, "dat-lab: a worker exited with status 1 (a trial FAILED, or the worker "
                                         "crashed); `dat-lab sweep-status statuses"),
                                  (-9, 2, "dat-lab: error: a worker exited with status -9")]:
        monkeypatch.setattr(runner, "spawn_workers", lambda argv, workers, gpus: status)
        with pytest.raises(SystemExit) if code == 1 else contextlib.nullcontext() as exit_:
            assert cli.main(argv) == code
        assert code == 2 or exit_.value.code == 1
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_failed_trial_in_any_of_several_workers_makes_the_sweep_exit_1(tmp_path, postgres_url):
    spec = write_spec(tmp_path, BASE + "sampler: tpe\nn_trials: 2\nbudget: {max_epochs: 1, limit_train_batches: 6, "
                  "limit_val_batches: 1}\nsearch_space: {model.lr: {type: categorical, choices: [1.0e+30]}}\n")
    argv = [sys.executable, "-m", "cli", "sweep", str(spec), "--workers", "2", "--storage", postgres_url,
            "--study", "fails", "--runs-root", str(tmp_path / "runs")]
    done = run_command(argv, cwd=ROOT, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "dat-lab: a worker exited with status 1 (a trial FAILED, or the worker crashed)" in done.stderr
    trials = optuna.load_study(study_name="fails", storage=postgres_url).get_trials()
    assert len(trials) >= 2 and {t.state for t in trials} == {TrialState.FAIL}


def test_a_tpe_search_counts_failed_trials_but_not_interrupted_or_stale_ones(tmp_path):
    """A trial that failed in training is finished (a search whose trials all fail ends); one interrupted
    (Ctrl-C) or failed as stale (its worker died, no reason recorded) is sampled again by a rerun."""
    spec = parse_spec(write_spec(tmp_path, BASE + TPE.replace("n_trials: 2", "n_trials: 1")))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="t")
    for attrs in ({"failure": "interrupted"}, {}):
        study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs=attrs))
        assert runner.study_progress(study, spec, {}) == (0, 1, True)
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"failure": "ValueError: bad"}))
    assert runner.study_progress(study, spec, {}) == (1, 1, False)
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.5))  # n_trials lowered since
    assert runner.study_progress(study, spec, {}) == (2, 2, False)


def test_a_database_that_cannot_be_opened_is_one_line_and_a_dry_run_writes_nothing(tmp_path, capsys):
    server = "postgresql://u:secret@127.0.0.1:1/db"  # nothing listens there
    assert cli.main(["sweep", DEMO, "--storage", server, "--runs-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err  # the password is not printed (output and logs may be shared)
    assert err.startswith("dat-lab: error: --storage: cannot open postgresql://u:***@127.0.0.1:1/db: ") \
        and err.count("\n") == 1, err
    for command in ("sweep-status", "analyze"):
        assert cli.main([command, "x", "--storage", server]) == 2
        err = capsys.readouterr().err
        assert "u:***@127.0.0.1:1/db" in err and "secret" not in err, err
    for url in ("postgresql://u:se/cret@h/db", "postgresql://h/db?password=secret"):  # as SQLAlchemy reads them
        assert "secret" not in M.shown_url(url)
    assert cli.main(["sweep", DEMO, "--storage", server, "--dry-run", "--runs-root", str(tmp_path)]) == 0  # URL only
    (tmp_path / "demo" / "trial_0000").mkdir(parents=True)  # a trial of the server's study, perhaps: not known
    (tmp_path / "demo" / "trial_0000" / "config.yaml").write_text("")  # without opening it, so not refused
    assert cli.main(["sweep", DEMO, "--storage", server, "--dry-run", "--runs-root", str(tmp_path)]) == 0
