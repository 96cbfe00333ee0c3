"""dat-lab: the one command-line face of the toolkit.

    dat-lab profile VARIANT [--set key=value ...] [--img-size N] [--json]
    dat-lab profile --paper-tables [--json]
    dat-lab convert RELEASED.pth (--variant NAME | --official-config FILE.yaml) -o OUT.ckpt
    dat-lab train [fit|validate|test] --config experiments/X.yaml [--model.* ...] [--data.* ...] [--trainer.* ...]
    dat-lab sweep SPEC.yaml [KEY=VALUE ...] [--storage URL] [--study NAME] [--workers K] [--n-trials N] [--dry-run]
    dat-lab sweep-status STUDY [--storage URL] [--trial N]
    dat-lab analyze STUDY [--storage URL] [--baseline LEVEL] [--out DIR] [--runs-root DIR]
    dat-lab visualize CHECKPOINT [--images FILE ...] [--data digits] [--count N] [--out DIR]

Bad input ends with one line, `dat-lab: error: ...`, and exit status 2, before any work starts.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import pickle
import re
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

import yaml


def _parse_sets(items: Sequence[str], what: str = "--set") -> dict[str, Any]:
    """`key=value` pairs; values read as YAML, so `offset_range=4` and `groups=[1,2,3,6]` work."""
    from dat_lab.yaml_files import load_yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what}: {item!r} is not key=value")
        try:
            overrides[key.strip()] = load_yaml(value)
        except yaml.YAMLError as err:
            raise ValueError(f"{what}: {item!r}: the value is not YAML ({str(err).splitlines()[0]})") from None
    return overrides


def _profile(args: argparse.Namespace) -> None:
    import dat_lab
    from dat_lab.ablations import paper_rows
    from dat_lab.profile import profile_model

    if args.paper_tables:
        if args.variant or args.set or args.img_size is not None:
            raise ValueError("--paper-tables takes no VARIANT, --set or --img-size (its rows are fixed deltas of dat_tiny)")
        rows = []
        for row in paper_rows():
            p = profile_model(dat_lab.create_model(row.config()))
            rows.append({"table": row.table, "row": row.row, **p.shown(), "paper_params_m": row.paper_params_m,
                         "paper_gflops": row.paper_gflops})
    else:
        if not args.variant:
            raise ValueError("profile: give a VARIANT (one of " + ", ".join(dat_lab.VARIANTS) + ") or --paper-tables")
        sets = _parse_sets(args.set)
        if args.img_size is not None and "img_size" in sets:
            raise ValueError(f"--img-size {args.img_size} and --set img_size={sets['img_size']}: give one")
        config = dat_lab.get_config(args.variant, **sets)
        if args.img_size is not None:
            config = dat_lab.replace_config(config, img_size=args.img_size)
        try:
            p = profile_model(dat_lab.create_model(config))
        except (RuntimeError, MemoryError) as err:  # torch's OutOfMemoryError is a RuntimeError
            if not isinstance(err, MemoryError) and "memory" not in str(err):
                raise
            asked = re.search(r"allocate (\d+) bytes", str(err))  # torch's CPU allocator says how much
            asked = f"; one array alone asked for {int(asked.group(1)) / 2**30:.1f} GiB" if asked else ""
            raise ValueError(f"img_size {config.img_size}: out of memory running one image through {args.variant} "
                             f"(global attention's maps grow with the 4th power of the size{asked})") from None
        # what the counts depend on beside the variant: a sweep's cells count their data's classes and channels
        rows = [{"model": args.variant, "set": "; ".join(args.set or []) or "-", "img_size": config.img_size,
                 "in_chans": config.in_chans, "num_classes": config.num_classes, **p.shown()}]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    paper = ("paper_params_m", "paper_gflops")  # as the paper prints them: 4.60, not 4.6
    _print_table([{k: f"{v:.2f}" if k in paper else v for k, v in row.items()} for row in rows])


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for i, key in enumerate(rows[0]):  # labels (the first column, words) to the left, numbers to the right
        numbers = any(re.match(r"[-+]?\.?\d", str(row[key])) for row in rows)
        table.add_column(key, justify="right" if i and numbers else "left")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # logs: no wrapping at 80 columns


def _read_official_config(path: str) -> dict[str, Any]:
    """The model keywords of a released config YAML (MODEL: DAT: {...}) or of a flat YAML dict."""
    from dat_lab.yaml_files import read_yaml

    try:
        data = read_yaml(path, expected="the released config YAML") or {}
    except OSError as err:
        raise ValueError(f"--official-config: {path}: {err.strerror.lower()}") from None
    except ValueError as err:
        raise ValueError(f"--official-config: {err}") from None
    if isinstance(data, dict) and "MODEL" in data:
        data = data["MODEL"].get("DAT", {}) if isinstance(data["MODEL"], dict) else {}
    if not isinstance(data, dict) or not data:
        raise ValueError(f"--official-config: {path} holds no MODEL.DAT keywords")
    return {k.lower(): v for k, v in data.items()}


def _convert(args: argparse.Namespace) -> None:
    import dat_lab
    from dat_lab.models.convert import official_state_dict
    from dat_lab.outputs import check_output_file, make_folder

    if bool(args.variant) == bool(args.official_config):
        raise ValueError("convert: give exactly one of --variant NAME or --official-config FILE.yaml")
    config = (dat_lab.get_config(args.variant) if args.variant
              else dat_lab.config_from_official(_read_official_config(args.official_config)))
    if args.num_classes is not None:
        config = dataclasses.replace(config, num_classes=args.num_classes)
    output = check_output_file(args.output, option="-o", example="dat.ckpt")
    if output.resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"-o: {args.output} is the checkpoint being converted; give another file (it would be "
                         f"replaced, and a converted one is not converted again)")
    state = official_state_dict(args.checkpoint)
    model = dat_lab.load_official(dat_lab.create_model(config), state)
    make_folder(output.parent, option="-o")
    partial = output.with_name(f".{output.name}.partial")  # an existing output is replaced whole, or stays
    try:
        dat_lab.save_checkpoint(model, partial, source=str(args.checkpoint))
        os.replace(partial, output)
    except (OSError, RuntimeError) as err:  # torch.save's own errors are RuntimeErrors
        partial.unlink(missing_ok=True)
        raise ValueError(f"-o: cannot write {args.output} ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    print(f"wrote {args.output}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


def _train(argv: list[str]) -> int:
    """LightningCLI takes over: `dat-lab train [fit|validate|test] --config X.yaml [--model.* ...]`."""
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from torch.multiprocessing import ProcessRaisedException

    from dat_lab.training.cli import config_error, main as train_main, rank_error
    from dat_lab.training.module import NonFiniteLossError

    try:  # sys.argv as it is: Lightning's DDP launcher starts the other ranks with this process's command line
        train_main(argv)
    except (ValueError, ArgumentError, NonFiniteLossError) as err:  # bad config or data (DataError), diverged training
        return _fail(ValueError(config_error(err, argv)))
    except ProcessRaisedException as err:  # in a spawned rank (ddp_spawn): the first line of its exception
        return _fail(ValueError(rank_error(err)))
    except (MisconfigurationException, TypeError, ModuleNotFoundError) as err:  # the Trainer's options, before
        # the data: no GPU for `gpu`; Lightning's TypeError for devices it cannot take ("0,1" on the CPU); an
        # accelerator's package not installed (`tpu`: torch_xla). Any other TypeError or import error is a bug
        if not isinstance(err, MisconfigurationException) and not str(err).startswith(("`devices`", "Requirement ")):
            raise
        return _fail(ValueError(_trainer_error(str(err), argv)))
    return 0


def _trainer_error(text: str, argv: list[str]) -> str:
    """Lightning's refusal of the Trainer's options, named as the option given on the command line that it
    is about (`--trainer.accelerator: No supported gpu backend found!`), else as `trainer`."""
    key = "devices" if text.startswith("`devices`") else (
        "accelerator" if re.search(r"accelerator|gpu backend", text, re.IGNORECASE) else None)
    given = key is not None and any(a.split("=", 1)[0] == f"--trainer.{key}" for a in argv)
    return f"{f'--trainer.{key}' if given else 'trainer'}: {text}"


def _grows(study: str, added: str | None) -> None:
    if added:
        print(f"study {study!r} grows: {added} (cells of their own; those it has stay as they are)")


def _sweep(args: argparse.Namespace) -> None:
    from dat_lab.sweep import SpecError, open_study, parse_spec, plan
    from dat_lab.sweep.spec import STUDY_NAME_RULE, valid_study_name
    from dat_lab.metrics import check_storage_url, default_storage, shown_url, sqlite_path
    from dat_lab.outputs import check_output_file
    from dat_lab.sweep.runner import gpu_shares, make_storage, preflight, spawn_workers, visible_gpus

    overrides = _parse_sets(args.overrides, "sweep override")
    if args.n_trials is not None:
        overrides["n_trials"] = args.n_trials
    try:
        spec = parse_spec(args.spec, overrides)
    except SpecError as err:  # about the option given, not the spec's key
        if args.n_trials is None or ": n_trials: " not in str(err):
            raise
        raise ValueError(f"--n-trials: {str(err).split(': n_trials: ', 1)[1]}") from None
    study = args.study or spec.study
    if not valid_study_name(study):
        raise ValueError(f"--study: {study!r}: {STUDY_NAME_RULE}")
    storage = args.storage or spec.storage or default_storage(study)
    if args.workers < 1:
        raise ValueError(f"--workers: {args.workers} must be >= 1")
    if args.workers > 1 and storage.startswith("sqlite"):
        raise ValueError("--workers: SQLite is unsafe for parallel workers; give --storage postgresql://... "
                         "(one server shared by every worker, on this machine or many)")
    # a bad URL (or, for a real run, an unreachable database server) fails here, before planning. An existing
    # study is read (another spec's, or run folders of no trial of it, are refused); a new SQLite file is made
    # only once the checks pass (planning, the GPU split); a dry run writes nothing: it checks only the URL of
    # a database server (opening one would create Optuna's tables)
    check_storage_url(storage)
    file = sqlite_path(storage)
    if file is not None:  # trials and the study's attributes are written to it as the sweep runs
        option = "--storage" if args.storage else "storage" if spec.storage else f"--storage (default {storage})"
        check_output_file(file, option=option, example=f"{study}.db")
        if file.exists() and not os.access(file, os.W_OK):
            raise ValueError(f"{option}: {file} is not writable")
    new_file = file is not None and not file.exists()
    opened = make_storage(storage, spec.heartbeat) if not new_file and (file is not None or not args.dry_run) else None
    try:
        preflight(spec, opened, storage, study, args.runs_root)  # another spec's study: refused at once,
        other_spec = None
    except SpecError as err:
        other_spec = err
    if other_spec is not None:  # unless a cell does not build: a typo in a key reads as another spec too
        plan(spec, spec.planned_cells())  # (outside the except: its error is not read as one of this)
        raise other_spec
    planned = plan(spec, spec.planned_cells())
    if args.dry_run:
        _grows(study, preflight(spec, opened, storage, study, args.runs_root, planned))  # on other data: refused
        _print_plan(spec, planned, study, _done(spec, opened, study))
        try:  # a plan may be made on a machine other than the one to run it: said, not refused
            gpu_shares(planned, args.workers, visible_gpus())
        except ValueError as err:
            print(f"note: a real run here would be refused: {err}")
        return
    gpus = gpu_shares(planned, args.workers, visible_gpus())  # each worker's own GPUs
    if opened is None:  # a new file; by now perhaps made by a worker started beside this one
        opened = make_storage(storage, spec.heartbeat)
    _grows(study, preflight(spec, opened, storage, study, args.runs_root, planned))
    if args.workers > 1:
        open_study(spec, storage, study, planned)  # the grid's missing cells queued once (each worker queued those
        # it found missing; starting together, a rerun's workers queued its failed cells twice)
        argv = [args.spec, *args.overrides, "--storage", storage, "--study", study, "--runs-root", args.runs_root]
        if args.n_trials is not None:
            argv += ["--n-trials", str(args.n_trials)]
        code = spawn_workers(argv, args.workers, gpus)
        if code not in (0, 1):
            raise ValueError(f"a worker exited with status {code}")
        failed = "a worker exited with status 1 (a trial FAILED, or the worker crashed)" if code else ""
    else:
        n = _work_with_progress(spec, storage, study, planned, args)
        failed = f"{n} trial(s) of this run FAILED" if n else ""
    shown = shown_url(storage)
    if args.worker_id is not None:  # one of --workers N: the command that started them says where to look
        if failed:  # (its trials' failures were printed as they came)
            raise SystemExit(1)
        return
    print(f"study {study!r} in {shown}: `dat-lab sweep-status {study} --storage {shown}`; "
          f"TensorBoard: `tensorboard --logdir {args.runs_root}/{study}`")
    if failed:
        again = "running the same command again retries failed cells" if spec.is_grid else \
            "a failed trial counts towards n_trials: raise --n-trials to sample more"
        print(f"dat-lab: {failed}; `dat-lab sweep-status {study} --storage {shown}` says why; {again}",
              file=sys.stderr)
        raise SystemExit(1)


def _work_with_progress(spec, storage: str, study: str, planned, args: argparse.Namespace) -> int:
    """Run this worker with a progress bar; how many of the trials it ran FAILED."""
    from optuna.trial import TrialState
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dat_lab import metrics as M
    from dat_lab.sweep.runner import work

    label = "cells" if spec.is_grid else "trials"
    worker = f" (worker {args.worker_id})" if args.worker_id is not None else ""
    with Progress(TextColumn(f"{study}{worker}"), BarColumn(), MofNCompleteColumn(), TextColumn(label),
                  TimeElapsedColumn()) as bar:
        task = bar.add_task(study, total=len(planned) if spec.is_grid else spec.n_trials)
        failed = []

        def on_trial(trial) -> None:
            if trial.state == TrialState.FAIL:
                failed.append(trial.number)
                reason = trial.user_attrs.get(M.TRIAL_FAILURE, "no reason recorded")
                what = M.cell_shown(trial.user_attrs.get(M.TRIAL_CELL) or "") or ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
                cell = f" ({what})" if what else ""
                bar.console.print(f"trial {trial.number}{cell} FAILED: {reason}", markup=False, highlight=False,
                                  soft_wrap=True)

        try:
            work(spec, storage=storage, study_name=study, runs_root=args.runs_root, planned=planned,
                 progress=lambda done, total: bar.update(task, completed=done, total=total), on_trial=on_trial,
                 worker=args.worker_id)
        except KeyboardInterrupt:
            bar.stop()
            print(f"interrupted: finished {'cells' if spec.is_grid else 'trials'} are stored and the interrupted "
                  "trial is marked FAILED; run the same command again to resume", file=sys.stderr)
            raise SystemExit(130) from None
    return len(failed)


def _done(spec, storage: Any, study: str) -> set[str] | int:
    """What of `study` (in an opened storage; None: not opened) is done: a grid's cells that a trial
    finished; a search's count of finished trials (as the sweep counts them towards n_trials)."""
    import optuna

    from dat_lab.sweep.runner import cell_trials, study_progress

    try:
        found = optuna.load_study(study_name=study, storage=storage) if storage is not None else None
    except KeyError:  # no such study yet
        found = None
    if not spec.is_grid:
        return study_progress(found, spec, {})[0] if found else 0
    return {key for key, trials in cell_trials(found).items()
            if any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)} if found else set()


def _print_plan(spec, planned, study: str, done: set[str] | int = frozenset()) -> None:
    from dat_lab import metrics as M

    rows = []
    for p in planned:
        name = p.cell.name or M.BASE_CELL
        if rows and rows[-1]["cell"] == name:
            rows[-1]["seeds"] += f",{p.cell.seed}"
            continue
        rows.append({"cell": name, "seeds": str(p.cell.seed), **p.cost.shown()})
    if spec.is_grid:
        kind, planned_text = "grid", f"{len(planned)} trial(s) planned"
        if finished := sum(p.cell.key in done for p in planned):
            planned_text += f" ({finished} done in the study, {len(planned) - finished} to train)"
    else:
        kind = (f"{_component(spec.sampler)}, {spec.n_trials} trials over {', '.join(spec.search_space)}, "
                f"pruner {_component(spec.pruner)}")
        planned_text = "the base config checked, and each search-space path at its bounds or choices"
        if done:
            planned_text += f" ({done} trial(s) done in the study, {max(spec.n_trials - done, 0)} to train)"
    print(f"{spec.path}: study {study!r}, {kind}, objective {spec.direction} {spec.metric} ({spec.value}); "
          f"{planned_text}, nothing trained (--dry-run)")
    _print_table(rows)


def _component(given: dict) -> str:
    """A spec's sampler or pruner as written: `median (n_startup_trials=3, n_warmup_steps=1)`."""
    options = ", ".join(f"{k}={v}" for k, v in given.items() if k != "name")
    return f"{given['name']} ({options})" if options else given["name"]


def _sweep_status(args: argparse.Namespace) -> None:
    import pandas as pd

    from dat_lab import metrics as M
    from dat_lab.analysis.study import STALE, counts_text, found_run, load, run_here, status_counts, trials_frame
    from dat_lab.analysis.tables import metric_label, metric_text

    study, info = load(args.study, args.storage)
    if args.trial is not None:
        trial = next((t for t in study.get_trials(deepcopy=False) if t.number == args.trial), None)
        if trial is None:
            raise ValueError(f"--trial: study {args.study!r} has no trial {args.trial}")
        if M.TRIAL_REPRODUCE not in trial.user_attrs:  # waiting to start, or failed before its run began
            why = trial.user_attrs.get(M.TRIAL_FAILURE)
            if (first := trial.user_attrs.get(M.TRIAL_DUPLICATE_OF)) is not None:
                why = f"a duplicate of trial {first}, which trained its cell: --trial {first}"
            raise ValueError(f"--trial: trial {args.trial} of study {args.study!r} has no training run to reproduce "
                             f"(it is {trial.state.name}{': ' + why if why else ''})")
        recorded = trial.user_attrs.get(M.TRIAL_RUN_DIR)
        run_dir = found_run(recorded, args.runs_root)  # runs/ moved: <runs-root>/<study>/trial_<n>, if there
        if isinstance(run_dir, str) and not run_here(run_dir):
            raise ValueError(f"--trial: trial {args.trial}'s run folder {run_dir} (its config.yaml) is not here, nor "
                             f"under --runs-root {args.runs_root}: give --runs-root where runs/ is now")
        if run_dir == recorded:
            print(trial.user_attrs[M.TRIAL_REPRODUCE])
        else:
            from dat_lab.sweep.runner import reproduce_command

            print(reproduce_command(Path(run_dir)))
        return
    rows = trials_frame(study, info)
    print(f"study {args.study!r}: {counts_text(status_counts(rows))}")
    if rows.empty:
        return
    label, _ = metric_label(info.metric)  # in analyze's units
    searched = [c for c in rows.columns if c not in M.TRIAL_COLUMNS] if not info.grid else []
    _print_table([({"cell": M.cell_shown(r["cell"])} if info.grid else {})  # a search's trial is its own cell
                  | {"trial": "-" if pd.isna(r["trial"]) else int(r["trial"])}
                  | {name: f"{r[name]:.4g}" if isinstance(r[name], float) else str(r[name]) for name in searched}
                  | {"status": r["status"], label: metric_text(info.metric, r["value"])}
                  for _, r in rows.iterrows()])
    unrecorded = "no reason recorded: its worker stopped before it could record one (killed or crashed)"

    def which(r) -> str:  # a search's trial is its own cell: named once
        name = f"trial {int(r.trial)}"
        return name if r.cell == name else f"{name} ({M.cell_shown(r.cell)})"

    for r in rows[rows["status"] == "failed"].itertuples():
        print(f"failed: {which(r)}: {r.failure if isinstance(r.failure, str) else unrecorded}")
    for r in rows[rows["status"] == STALE].itertuples():
        print(f"stale: {which(r)}: RUNNING, but its worker stopped sending heartbeats "
              f"(none for over {info.heartbeat[1]} s: killed or crashed); the next `dat-lab sweep` of the study "
              f"fails it and queues it again")
    print("reproduce a trial: dat-lab sweep-status", args.study, "--trial N")


def _analyze(args: argparse.Namespace) -> None:
    from dat_lab.analysis import analyze
    from dat_lab.analysis.study import counts_text

    out = args.out or f"{args.runs_root}/{args.study}/analysis"
    report = analyze(args.study, args.storage, out, baseline=args.baseline, runs_root=args.runs_root)
    print(f"study {args.study!r}: {counts_text(report.counts)}")
    if report.paper is not None:
        print("As in the paper:")
        _print_table(report.paper.to_dict(orient="records"))
        print("Every cell:")
    _print_table(report.table.astype(str).to_dict(orient="records"))
    print(f"report: {report.path} (tables: {' '.join(report.tables)}; plots: " +
          ", ".join(p.name for p in report.plots if p.suffix == ".png") + ", each also as PDF)")
    for note in report.notes:
        print(f"note: {note}")


def _visualize(args: argparse.Namespace) -> None:
    from dat_lab.analysis.visualize import visualize

    paths, replaced = visualize(args.checkpoint, args.out, images=args.images, data=args.data, count=args.count)
    print(("replaced " if replaced else "wrote ") + ", ".join(map(str, paths)))


class _Parser(argparse.ArgumentParser):
    """argparse's errors in one line, as the others (its usage block before them named every option)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"dat-lab: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dat-lab", description="Ablations of Deformable Attention Transformers.")
    parser.add_argument("--version", action="version", version=f"dat-lab {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", add_help=False,
                   help="train with LightningCLI: dat-lab train [fit|validate|test] --config experiments/X.yaml "
                        "(its options: dat-lab train fit --help)")

    p = sub.add_parser("profile", help="parameters and GFLOPs (paper convention) of a model or the paper's rows")
    p.add_argument("variant", nargs="?", help="a named variant, e.g. dat_tiny")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable; per-stage knobs take one value or a list, e.g. groups=[1,2,3,6]")
    p.add_argument("--img-size", type=int, help="input size (default: the variant's)")
    p.add_argument("--paper-tables", action="store_true", help="every row of the paper's Tables 6 and 7")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_profile)

    c = sub.add_parser("convert", help="released DAT weights to a dat-lab checkpoint")
    c.add_argument("checkpoint", help="released .pth (a dict with a `model` key, or a bare state dict)")
    c.add_argument("--variant", help="the variant the weights belong to, e.g. dat_tiny")
    c.add_argument("--official-config", help="the released config YAML the weights were trained with")
    c.add_argument("--num-classes", type=int, help="classes of the weights' head, where fine-tuned (default: the config's)")
    c.add_argument("-o", "--output", required=True, help="where to write the converted checkpoint (its folder is made)")
    c.set_defaults(run=_convert)

    w = sub.add_parser("sweep", help="run (or resume) an ablation sweep on an Optuna study")
    w.add_argument("spec", help="a sweep spec, e.g. sweeps/demo.yaml")
    w.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="spec overrides, each setting the value at KEY (a mapping replaces the spec's whole), "
                        "e.g. budget.max_epochs=1 seeds=[0,1,2]")
    w.add_argument("--storage", help="Optuna storage URL (default: the spec's, else sqlite:///runs/<study>.db)")
    w.add_argument("--study", help="study name (default: the spec's)")
    w.add_argument("--workers", type=int, default=1,
                   help="worker processes on this machine (needs PostgreSQL); its GPUs, or for CPU trials its cores "
                        "(OMP_NUM_THREADS), are split evenly among them; a Ctrl-C or kill is passed on to each")
    w.add_argument("--n-trials", type=int, help="trials of a TPE search (default: the spec's)")
    w.add_argument("--dry-run", action="store_true", help="print the cells with params and FLOPs; train nothing")
    w.add_argument("--runs-root", default="runs", help="where trials write runs/<study>/trial_<n> (default: runs)")
    w.add_argument("--worker-id", type=int, help=argparse.SUPPRESS)
    w.set_defaults(run=_sweep)

    st = _study_parser(sub, "sweep-status", "cells done, running, failed and pending, with their values as analyze "
                                            "shows them; how to reproduce a trial")
    st.add_argument("--trial", type=int, help="print the `dat-lab train` command that reproduces trial N")
    st.set_defaults(run=_sweep_status)

    a = _study_parser(sub, "analyze", "table (Markdown, CSV, LaTeX), plots (PNG, PDF) and report.md of a study")
    a.add_argument("--baseline", help="the row to compare against: a level, or factor=level, factor=level (default: the spec's)")
    a.add_argument("--out", help="output folder (default: <runs-root>/<study>/analysis)")
    a.set_defaults(run=_analyze)

    v = sub.add_parser("visualize", help="sampled key positions of a checkpoint on a few images (Figs. 5-7)")
    v.add_argument("checkpoint", help="a dat-lab checkpoint (training run or `dat-lab convert` output)")
    v.add_argument("--images", nargs="+", help="image files (default: validation images of --data)")
    v.add_argument("--data", help="digits or synthetic, when no --images (default: digits)")
    v.add_argument("--count", type=int, help="how many validation images, at most 32, when no --images (default: 4)")
    v.add_argument("--out", help="output folder (default: runs/visualize/<the checkpoint's path, / as _>, e.g. "
                                 "runs/visualize/demo_trial_0003_checkpoints_last for runs/demo/trial_0003/checkpoints/last.ckpt)")
    v.set_defaults(run=_visualize)
    return parser


def _study_parser(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand that reads a study: its name and storage."""
    parser = sub.add_parser(name, help=help)
    parser.add_argument("study", help="the study's name (the spec's study: or the sweep's --study), e.g. demo")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///runs/<study>.db)")
    parser.add_argument("--runs-root", default="runs", help="where trials' run folders are (<study>/trial_<n>) when "
                        "not where they were recorded: runs/ moved, or copied from another machine (default: runs)")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dat-lab")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """The `dat-lab` command; `argv` (tests, scripts) instead of the command line. A Ctrl-C is one line
    and status 130; on the command line by dying of SIGINT (also 130 to the shell), so that a shell
    loop over dat-lab commands stops too (a process that exits 130 itself tells it the interrupt was
    handled, and the loop goes on)."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # before a command's own handling (imports, planning): no traceback
        print("dat-lab: interrupted", file=sys.stderr)
    except SystemExit as exit_:  # a command's own handling of Ctrl-C (the sweep's) exits 130
        if exit_.code != 130:
            raise
    if argv is None:  # as Python ends on an uncaught KeyboardInterrupt: exit handlers, then SIGINT. Done here, by
        # hand: once torch._dynamo is imported, an uncaught KeyboardInterrupt ends Python with status 1 (torch 2.14)
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return 130


def _main(argv: list[str]) -> int:
    if argv[:1] == ["train"]:
        return _train(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):  # KEY=VALUE overrides after options too (`--study x seeds=[0]`)
        late = [a for a in extra if re.match(r"[A-Za-z_][\w.]*=", a)]
        args.overrides, extra = args.overrides + late, [a for a in extra if a not in late]
    if extra:
        parser.exit(2, f"dat-lab: error: unrecognized arguments: {' '.join(extra)} (see dat-lab {args.command} --help)\n")
    try:
        _check_named_files(args)
        args.run(args)
        sys.stdout.flush()  # a reader gone fails here, not at exit
    except BrokenPipeError:  # its reader went away (`| head`): nothing more to say (Python's own recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError, pickle.UnpicklingError) as err:
        return _fail(err)
    return 0


def _check_named_files(args: argparse.Namespace) -> None:
    """A file the command is named to read that is not there, refused in one line before the command's
    imports (torch, timm, Lightning: seconds), with the library's own words for it (a test compares)."""
    if args.command == "sweep" and not Path(args.spec).is_file():
        raise ValueError(f"{args.spec}: no such sweep spec")
    if args.command in ("convert", "visualize") and not Path(args.checkpoint).exists():
        raise ValueError(f"{args.checkpoint}: no such checkpoint")
    if args.command in ("analyze", "sweep-status") and args.storage is None:
        file = Path("runs", f"{args.study}.db")  # metrics.default_storage's file
        if not file.exists():
            raise ValueError(f"study {args.study!r}: no {file} (a sweep's default storage); run the sweep first, "
                             f"or give --storage URL where the study is")


def _fail(err: Exception) -> int:
    """The one-line error (the message's first line, or the exception's name) and exit status 2."""
    print(f"dat-lab: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
