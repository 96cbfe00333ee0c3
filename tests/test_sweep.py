"""Sweeps on Optuna: specs, dry runs, a real grid, crashes and concurrent workers."""

import contextlib
import os
import re
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
from dat_lab.ablations import paper_rows
from dat_lab.data import DataError
from dat_lab.sweep import SpecError, parse_spec, plan
from dat_lab.sweep import runner
from dat_lab.sweep.runner import CELL, FINGERPRINT, open_study, work

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "sweeps" / "demo.yaml")
SMALL = ["budget.max_epochs=1", "budget.limit_train_batches=3", "budget.limit_val_batches=2"]


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


BASE = f"study: t\nbase: {ROOT / 'experiments' / 'digits_quick.yaml'}\n"
TPE = "sampler: tpe\nn_trials: 2\nsearch_space: {model.lr: {type: float, low: 1.0e-4, high: 1.0e-2}}\n"


@pytest.mark.parametrize("body,message", [
    ("stduy: x\n", "stduy: unknown key; allowed:"),
    ("factors: {s: {path: model.overrides.offset_range, values: []}}\n", "factors.s.values: must be a non-empty list"),
    ("factors: {s: {values: [1, 2]}}\n", "factors.s.path: a dotted config path is needed"),
    ("factors: {s: {path: model.lr, valuse: [1, 2]}}\n", "factors.s.valuse: unknown key; allowed: baseline, levels, "
     "paper_table, path, values"),
    ("factors: {s: {levels: {a: {}}, baseline: b}}\n", "factors.s.baseline: 'b' is not one of a"),
    ("factors: {t: {paper_table: 8}}\n", "factors.t.paper_table: table: 8 is not one of 6, 7"),
    ("seeds: [0, 0]\n", "seeds: must be a non-empty list of distinct integers"),
    ("objective: {metric: val/acc7}\n", "objective.metric: 'val/acc7' is not one of"),
    ("objective: {metric: train/loss}\n", "objective.metric: 'train/loss' is not one of val/acc1, val/acc5, "
     "val/loss, val_ema/acc1, val_ema/acc5"),
    ("sampler: random\n", "sampler: 'random' is not one of grid, tpe"),
    ("sampler: tpe\nn_trials: 3\n", "search_space: is required for sampler tpe"),
    ("budget: {epochs: 3}\n", "budget.epochs: unknown key"),
    ("budget: {max_epochs: 0}\n", "budget.max_epochs: 0 must be >= 1, or -1 for no limit"),
    ("budget: {max_epochs: abc}\n", "budget.max_epochs: 'abc' is not a number: it must be >= 1, or -1 for no limit"),
    ("budget: {max_time: abc}\n", "budget.max_time: 'abc' must be DD:HH:MM:SS"),
    ("budget: {limit_val_batches: -1}\n", "budget.limit_val_batches: -1 must be a count of batches >= 0"),
    ("objective: {metrc: val/acc5}\n", "objective.metrc: unknown key; allowed: direction, metric, value"),
    ("heartbeat: {interval: 1, grac: 1}\n", "heartbeat.grac: unknown key; allowed: grace, interval"),
    ("sampler: {name: grid, seed: 1}\n", "sampler.seed: unknown key; allowed: name"),
    (TPE.replace("sampler: tpe", "sampler: {name: tpe, n_startup: 3}"), "sampler.n_startup: unknown key; allowed:"),
    ("pruner: {name: median, n_startup: 3}\n", "pruner.n_startup: unknown key; allowed: interval_steps,"),
    ("pruner: {name: median, n_startup_trials: -1}\n", "pruner: median: Number of startup trials cannot be negative"),
    (TPE + "factors: {s: {path: model.overrides.offset_range, values: [1, 2]}}\n", "factors: only for sampler grid"),
    (TPE + "seeds: [0, 1]\n", "seeds: sampler tpe takes one seed, got [0, 1]"),
    (TPE.replace("1.0e-4", "1e-4"), "search_space.model.lr.low: must be a number, got '1e-4' (YAML reads 1e-4 as text: "
     "write 1.0e-4)$"),
    (TPE.replace("1.0e-2", "a"), "search_space.model.lr.high: must be a number, got 'a'$"),
    ("sampler: tpe\nn_trials: 2\nsearch_space: {model.lr: {type: categorical, choices: 3}}\n",
     "search_space.model.lr.choices: must be a non-empty list, got 3"),
    ("factors:\n  a: {path: model.lr, values: [0.1]}\n  b: {path: model.lr, values: [0.2]}\n",
     "factors.b: sets model.lr, which factor a sets too"),
    ("study: ../up\n", "study: '../up': use letters, digits, _, - and ."),
    ("factors: {s: {path: model.overrides.offset_range, values: [2, '2']}}\n",
     "factors.s.values: [2, '2'] names a level twice; give each value once"),
    ("factors: {s: {path: model.overrides.offset_range, values: [2, 2.0]}}\n",
     "factors.s.values: [2, 2.0] names a level twice; give each value once"),
    ("heartbeat: {interval: true, grace: 30}\n", "heartbeat: interval True and grace 30 must be integers"),
    # analysis would read the level as the objective (value), or fail (seed)
    ("factors: {value: {path: model.lr, values: [0.1, 0.2]}}\n", "factors.value: 'value' names a column of the analysis"),
    ("factors: {seed: {path: data.init_args.seed, values: [0, 1]}}\n", "factors.seed: 'seed' names a column"),
    ("factors: {a=b: {path: model.lr, values: [0.1]}}\n", "factors.a=b: a factor's name is a letter or _"),
    ("factors: {p: {levels: {a: {}, b: {}}}}\n", "factors.p.levels: a and b are the same delta"),
    ("pruner: median\n", "pruner: median: only for sampler tpe (a grid trains every cell to the end"),
])
def test_bad_specs_name_the_key(tmp_path, body, message):
    anchored = message.endswith("$")  # the message ends there
    with pytest.raises(SpecError, match=re.escape(message.removesuffix("$")) + "$" * anchored):
        parse_spec(_write(tmp_path, BASE + body))


def test_a_study_name_that_is_no_folder_name_is_refused(tmp_path, capsys):
    assert cli.main(["sweep", DEMO, "--study", "a/b", "--dry-run", "--runs-root", str(tmp_path)]) == 2
    assert "--study: 'a/b': use letters" in capsys.readouterr().err


def test_a_runs_root_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    storage = f"sqlite:///{tmp_path / 'r.db'}"
    assert cli.main(["sweep", DEMO, "--storage", storage, "--runs-root", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err == (f"dat-lab: error: --runs-root: {tmp_path / 'afile'} is a file, not a folder "
                                       f"(trials write into {tmp_path / 'afile'}/demo/)\n")
    assert not (tmp_path / "r.db").exists()


def test_a_spec_or_base_that_is_not_text_or_yaml_is_one_line(tmp_path):
    binary = tmp_path / "weights.pth"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(SpecError, match=f"^{re.escape(str(binary))} is not a text file \\(give a sweep spec YAML"):
        parse_spec(binary)
    spec = parse_spec(_write(tmp_path, f"study: t\nbase: {binary}\n"))
    with pytest.raises(SpecError, match=f"base: {re.escape(str(binary))} is not a text file"):
        plan(spec)
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epochs: [1\n")
    with pytest.raises(SpecError, match=f"^{re.escape(str(bad))} is not valid YAML \\(.* at line 3, column 1\\)$"):
        parse_spec(bad)
    spec = parse_spec(_write(tmp_path, f"study: t\nbase: {bad}\n"))
    with pytest.raises(SpecError, match=f"^{re.escape(str(tmp_path / 'spec.yaml'))}: base: {re.escape(str(bad))} is not "
                                        f"valid YAML \\(.* at line 3, column 1\\)$"):
        plan(spec)


def test_bad_cell_configs_fail_before_anything_runs(tmp_path):
    spec = parse_spec(_write(tmp_path, BASE + "factors: {g: {path: model.overrides.groups, values: [3]}}\n"))
    with pytest.raises(SpecError, match=r"cell 'g=3': .*groups: 3 offset groups do not divide \d+ heads"):
        plan(spec)
    spec = parse_spec(_write(tmp_path, BASE + "objective: {metric: val_ema/acc1}\n"))  # would train, then fail
    with pytest.raises(SpecError, match=r"cell '\(base\)': objective val_ema/acc1 is logged only with EMA weights"):
        plan(spec)
    ema_search = BASE + "objective: {metric: val_ema/acc1}\n" + TPE.replace("model.lr: {type: float, low: 1.0e-4, high: 1.0e-2}",
                                                                           "model.ema_decay: {type: float, low: 0.99, high: 0.999}")
    assert len(plan(parse_spec(_write(tmp_path, ema_search)))) == 1  # not refused: each trial samples an EMA decay
    with pytest.raises(SpecError, match=r"search_space.model.ema_decay = 0.0: objective val_ema/acc1 is logged only"):
        plan(parse_spec(_write(tmp_path, ema_search.replace("low: 0.99", "low: 0.0"))))
    spec = parse_spec(_write(tmp_path, BASE + "factors: {x: {path: model.learning_rate, values: [1]}}\n"))
    with pytest.raises(SpecError, match=r"cell 'x=1': training config: .*model.learning_rate' \(model options: "
                                        r"variant, overrides, .*, weights\)$"):
        plan(spec)
    for delta, meant in (("{trainer: {max_epochz: 1}}", "trainer.max_epochs"), ("{modell: {lr: 1}}", "model"),
                         ("{data: {init_args: {batch_sizee: 8}}}", "batch_size")):
        with pytest.raises(SpecError, match=re.escape(f"(did you mean {meant}?)")):
            plan(parse_spec(_write(tmp_path, BASE + f"delta: {delta}\n")))
    from dat_lab.training.cli import _did_you_mean  # inside a known group's option: not "did you mean trainer?"
    assert _did_you_mean("Subcommand 'fit' does not accept option 'trainer.logger.save_dirr'") == ""
    # a search: each search-space path at its bounds and choices, before any trial samples it
    spec = parse_spec(_write(tmp_path, BASE + TPE.replace("model.lr:", "model.lrr:")))
    with pytest.raises(SpecError, match=r"search_space.model.lrr = 0.0001: training config: .*model.lrr"):
        plan(spec)
    spec = parse_spec(_write(tmp_path, BASE + TPE.replace("1.0e-4", "-1.0e-4")))
    with pytest.raises(SpecError, match=r"search_space.model.lr = -0.0001: model.lr: -0.0001 must be > 0"):
        plan(spec)
    weights = tmp_path / "w.ckpt"
    dat_lab.save_checkpoint(dat_lab.create_model("dat_pico", num_classes=10, img_size=32, in_chans=1), weights)
    spec = parse_spec(_write(tmp_path, BASE + f"delta: {{model: {{weights: {weights}}}}}\n"
                             "factors: {s: {path: model.overrides.offset_range, values: [2, 4]}}\n"))
    with pytest.raises(SpecError, match=r"cell 's=4': model.weights: .* holds another model \(stages\[0\].offset_range"):
        plan(spec)  # trials start from these weights: they must be there, and of each cell's model
    spec = parse_spec(_write(tmp_path, BASE + f"delta: {{model: {{weights: {tmp_path / 'none.ckpt'}}}}}\n"))
    with pytest.raises(SpecError, match=r"cell '\(base\)': model.weights: .*none.ckpt: no such checkpoint"):
        plan(spec)
    for delta, message in (("{trainer: {check_val_every_n_epoch: 0}}", "trainer.check_val_every_n_epoch: 0 must be >= 1"),
                           ("{data: {init_args: {batch_size: 0}}}", "batch_size 0, num_workers 0, img_size 32: need")):
        spec = parse_spec(_write(tmp_path, BASE + f"delta: {delta}\n"))  # would fail in every trial
        with pytest.raises(SpecError, match=re.escape(f"cell '(base)': {message}")):
            plan(spec)
    spec = parse_spec(_write(tmp_path, BASE + "sampler: tpe\nn_trials: 2\n"
                             "search_space: {model.overrides.groups: {type: categorical, choices: [2, 3]}}\n"))
    with pytest.raises(SpecError, match=r"search_space.model.overrides.groups = 3: .*groups: 3 offset groups"):
        plan(spec)
    with pytest.raises(SpecError, match="no such sweep spec"):
        parse_spec(tmp_path / "missing.yaml")


def test_grid_cells_are_the_product_times_seeds():
    spec = parse_spec(DEMO)
    cells = spec.cells()
    assert len(cells) == 2 * 2 * 2 and len({c.key for c in cells}) == 8
    assert cells[0].levels == {"position": "relative", "s": "0"}
    assert spec.trial_config(cells[-1].delta, 1)["model"]["overrides"] == {"position": "none", "offset_range": 2}


def test_a_trials_seed_is_its_datas_too_over_a_base_that_names_one(tmp_path):
    """A run's config.yaml names its data's seed: as a spec's base, each seed still sees its own batches;
    a factor (or the spec's delta) on the data's seed is taken as given."""
    run = yaml.safe_load((ROOT / "experiments" / "digits_quick.yaml").read_text())
    run["data"]["init_args"]["seed"] = 0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(run))
    spec = parse_spec(_write(tmp_path, f"study: t\nbase: {tmp_path / 'config.yaml'}\nseeds: [0, 1]\n"))
    assert [spec.trial_config(c.delta, c.seed)["data"]["init_args"]["seed"] for c in spec.cells()] == [0, 1]
    spec = parse_spec(_write(tmp_path, f"study: t\nbase: {tmp_path / 'config.yaml'}\nseeds: [0, 1]\n"
                                       "factors: {d: {path: data.init_args.seed, values: [5]}}\n"))
    assert [spec.trial_config(c.delta, c.seed)["data"]["init_args"]["seed"] for c in spec.cells()] == [5, 5]


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> str:
    """An ImageNet layout of 1000 classes, one (empty) image file each: what a sweep's data check reads."""
    root = tmp_path_factory.mktemp("imagenet")
    for split in ("train", "val"):
        for c in range(1000):
            (root / split / f"n{c:08d}").mkdir(parents=True)
            (root / split / f"n{c:08d}" / "0.JPEG").touch()
    return str(root)


def _data_root(path: Path, imagenet_root: str) -> list[str]:
    """The override that points an ImageNet spec at the fake layout (the others need none)."""
    return [f"delta.data.init_args.root={imagenet_root}"] if "imagenet" in path.read_text() else []


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_dry_run_of_every_spec(path, capsys, tmp_path, imagenet_root):
    storage = tmp_path / "dry.db"
    assert cli.main(["sweep", str(path), *_data_root(path, imagenet_root), "--dry-run", "--storage",
                     f"sqlite:///{storage}", "--study", "named",
                     "--runs-root", str(tmp_path / "runs")]) == 0  # not ./runs: its folders are another storage's
    assert not storage.exists()  # a dry run writes nothing
    out = capsys.readouterr().out
    assert "nothing trained (--dry-run)" in out and f"{path}: study 'named', " in out


def test_overrides_may_follow_the_options(tmp_path, capsys):
    assert cli.main(["sweep", DEMO, "--dry-run", "--storage", f"sqlite:///{tmp_path / 'd.db'}", "--runs-root",
                     str(tmp_path), "seeds=[0]", "budget.max_epochs=1"]) == 0  # not ./runs/demo.db: make demo's
    out = capsys.readouterr().out
    assert "4 trial(s) planned" in out and "│  0.0073751 │" in out  # GFLOPs as trials keep them (not 0.0074)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sweep", DEMO, "--dry-run", "--stduy", "x"])
    assert exit_.value.code == 2 and "unrecognized arguments: --stduy x" in capsys.readouterr().err


def test_a_sweep_over_data_that_is_not_there_stops_before_planning_dry_run_too(tmp_path, capsys, imagenet_root):
    spec = str(ROOT / "sweeps" / "offset_groups.yaml")
    missing = tmp_path / "nowhere"
    for extra in ([], ["--dry-run"]):
        assert cli.main(["sweep", spec, f"delta.data.init_args.root={missing}", *extra, "--storage",
                         f"sqlite:///{tmp_path / 's.db'}", "--runs-root", str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"offset_groups.yaml: cell 'G=1, 1': {missing / 'train'}: no such folder "
                            "(expected class folders of images)") and "\n" not in err
    assert not (tmp_path / "runs").exists()
    assert optuna.get_all_study_names(storage=f"sqlite:///{tmp_path / 's.db'}") == []  # no study made
    classes = sorted(os.listdir(Path(imagenet_root) / "train"))  # 999 classes where 1000 are asked for
    fewer = tmp_path / "fewer"
    for split in ("train", "val"):
        for c in classes[:-1]:
            (fewer / split / c).mkdir(parents=True)
            (fewer / split / c / "0.jpg").touch()
    assert cli.main(["sweep", spec, f"delta.data.init_args.root={fewer}", "--dry-run"]) == 2
    assert f"{fewer / 'train'}: 999 class folders, but num_classes is 1000" in capsys.readouterr().err


def test_a_trial_whose_data_went_away_after_planning_fails_with_the_data_error(tmp_path):
    import shutil

    from PIL import Image

    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / c / "0.jpg")
    spec = parse_spec(_write(tmp_path, f"study: t\nbase: {ROOT / 'experiments' / 'dat_tiny_imagenet.yaml'}\n"
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


@pytest.mark.parametrize("trainer,strategy", [
    ({"accelerator": "gpu", "devices": 8, "strategy": "ddp"}, "ddp_spawn"),
    ({"devices": 2, "strategy": "ddp_find_unused_parameters_true"}, "ddp_spawn_find_unused_parameters_true"),
    ({"accelerator": "cpu", "devices": 2}, "ddp_spawn"),  # auto on several devices is ddp
    ({"devices": "0,1"}, "ddp_spawn"),
    ({"devices": [0, 1], "strategy": "auto"}, "ddp_spawn"),
    ({"accelerator": "cpu", "devices": 1}, None),  # one device: no strategy set
    ({"devices": 2, "strategy": "ddp_fork"}, "ddp_spawn"),  # forked ranks fail once the worker has used CUDA
    ({"devices": 2, "strategy": "DDP_notebook_find_unused_parameters_true"}, "ddp_spawn_find_unused_parameters_true"),
    ({"accelerator": "tpu", "devices": 8}, None),  # auto is XLA's own there
    ({"accelerator": "tpu", "devices": 8, "strategy": "xla"}, "xla"),
    ({"devices": 1, "strategy": {"class_path": "lightning.pytorch.strategies.SingleDeviceStrategy"}},
     {"class_path": "lightning.pytorch.strategies.SingleDeviceStrategy"}),
    ({"accelerator": "tpu", "devices": 8, "strategy": {"class_path": "lightning.pytorch.strategies.xla.XLAStrategy"}},
     {"class_path": "lightning.pytorch.strategies.xla.XLAStrategy"}),
    ({"devices": 2, "strategy": {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                                 "init_args": {"static_graph": True}}},
     {"class_path": "lightning.pytorch.strategies.DDPStrategy", "init_args": {"static_graph": True,
                                                                              "start_method": "spawn"}}),
])
def test_ddp_in_a_trial_spawns_its_ranks_instead_of_running_the_command_again(trainer, strategy):
    from dat_lab.sweep.plan import in_worker

    config = {"trainer": trainer, "model": {"lr": 1.0}}
    out = in_worker(config)
    assert out["trainer"].get("strategy") == strategy and out["model"] == {"lr": 1.0}
    assert config["trainer"] == trainer  # not changed in place


@pytest.mark.parametrize("trainer,message", [
    ({"devices": 8, "num_nodes": 2, "strategy": "ddp"}, "trainer.num_nodes: 2; a sweep's trial trains on its "
                                                        "worker's machine"),
    ({"devices": 2, "strategy": "fsdp"}, "trainer.strategy: 'fsdp' on 2 devices starts its processes by running "
                                         "the command line again"),
    ({"devices": 2, "strategy": {"class_path": "lightning.pytorch.strategies.FSDPStrategy"}},
     "trainer.strategy: 'lightning.pytorch.strategies.FSDPStrategy' on 2 devices starts its processes"),
    ({"plugins": [{"class_path": "lightning.pytorch.plugins.environments.SLURMEnvironment"}]},
     "trainer.plugins: 'lightning.pytorch.plugins.environments.SLURMEnvironment' is a cluster environment; "),
    ({"devices": 2, "strategy": {"class_path": "lightning.pytorch.strategies.DDPStrategy", "init_args": {
        "cluster_environment": {"class_path": "lightning.pytorch.plugins.environments.SLURMEnvironment"}}}},
     "trainer.strategy: 'lightning.pytorch.plugins.environments.SLURMEnvironment' is a cluster environment; "),
])
def test_what_a_trial_cannot_run_inside_its_worker_is_refused_at_planning(tmp_path, capsys, trainer, message):
    import yaml

    spec = _write(tmp_path, BASE + "delta: " + yaml.safe_dump({"trainer": trainer}, default_flow_style=True))
    assert cli.main(["sweep", str(spec), "--dry-run", "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dat-lab: error: {spec}: cell '(base)': {message}") and err.count("\n") == 1, err


def test_a_search_space_that_sets_trainer_options_is_checked_at_planning_too(tmp_path, capsys):
    spec = _write(tmp_path, BASE + "sampler: tpe\nn_trials: 1\n"
                  "search_space: {trainer.num_nodes: {type: categorical, choices: [1, 2]}}\n")
    assert cli.main(["sweep", str(spec), "--dry-run", "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dat-lab: error: {spec}: search_space.trainer.num_nodes = 2: trainer.num_nodes: 2; ")


def test_the_tracked_values_come_back_from_a_spawned_run_as_callback_metrics():
    from types import SimpleNamespace

    import torch

    from dat_lab.training.callbacks import MetricTracker

    ranks, parent = MetricTracker(metric="train/loss", direction="minimize"), MetricTracker(metric="train/loss", direction="minimize")
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={},
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0)))
    for step, value in ((3, 2.0), (5, 1.0), (7, 1.5)):  # validations; then training goes on and logs another train/loss
        trainer.fit_loop.epoch_loop._batches_that_stepped = step
        trainer.callback_metrics["train/loss"] = torch.tensor(value)
        ranks.on_validation_epoch_end(trainer, None)
    trainer.callback_metrics["train/loss"] = torch.tensor(1.7)
    assert ranks.results(trainer) == (1.0, 1.5, 7) == parent.results(trainer)  # the parent read them from the metrics
    assert MetricTracker().results(SimpleNamespace(callback_metrics={})) == (None, None, None)


def test_a_trial_its_ddp_ranks_pruned_ends_pruned_and_a_retry_starts_unpruned(tmp_path, monkeypatch):
    """What Optuna's Lightning callback does on rank 0 of a DDP trial (its system attributes), then
    `check_pruned` in the worker; a retried trial inherits those attributes from the try it retries."""
    from optuna_integration.pytorch_lightning.pytorch_lightning import _EPOCH_KEY, _INTERMEDIATE_VALUE, _PRUNED_KEY

    spec = parse_spec(_write(tmp_path, BASE + TPE + "pruner: {name: median}\nn_trials: 1\n"))
    suggest, seen = runner._suggest, []

    def inherited(trial, *args):  # as RetryFailedTrialCallback copies them
        trial.storage.set_trial_system_attr(trial._trial_id, _PRUNED_KEY, True)
        trial.storage.set_trial_system_attr(trial._trial_id, _INTERMEDIATE_VALUE, {0: 0.9})
        return suggest(trial, *args)

    def ranks(args, extra_callbacks):
        [pruning] = [c for c in extra_callbacks if type(c).__name__ == "PyTorchLightningPruningCallback"]
        trial = pruning._trial
        attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
        seen.append((attrs[_PRUNED_KEY], attrs[_INTERMEDIATE_VALUE]))
        for key, value in ((_INTERMEDIATE_VALUE, {0: 0.25}), (_PRUNED_KEY, True), (_EPOCH_KEY, 0)):
            trial.storage.set_trial_system_attr(trial._trial_id, key, value)

    monkeypatch.setattr(runner, "_suggest", inherited)
    monkeypatch.setattr(runner, "train", ranks)
    study = work(spec, storage=f"sqlite:///{tmp_path / 'p.db'}", study_name="t", runs_root=str(tmp_path / "runs"))
    [trial] = study.get_trials()
    assert seen == [(False, None)] and trial.state == TrialState.PRUNED and trial.intermediate_values == {0: 0.25}


def test_a_trial_whose_objective_is_nan_fails_with_its_reason(tmp_path, monkeypatch):
    """Optuna fails a trial that returns NaN, saying so only in a warning (which workers do not show)."""
    from types import SimpleNamespace

    from dat_lab.training.callbacks import MetricTracker

    spec = parse_spec(_write(tmp_path, BASE + "objective: {metric: val/loss, direction: minimize}\n"))
    trainer = SimpleNamespace(callback_metrics={})
    monkeypatch.setattr(runner, "train", lambda args, extra_callbacks: SimpleNamespace(trainer=trainer))
    monkeypatch.setattr(MetricTracker, "results", lambda self, trainer: (float("nan"), float("nan"), 3))
    study = work(spec, storage=f"sqlite:///{tmp_path / 'n.db'}", study_name="t", runs_root=str(tmp_path / "runs"))
    [trial] = study.get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs["failure"] == "RuntimeError: val/loss (best) is nan"


def test_a_searched_trial_on_one_device_of_a_base_on_two_trains_in_its_worker(tmp_path, monkeypatch):
    spec = parse_spec(_write(tmp_path, BASE + "sampler: tpe\nn_trials: 1\ndelta: {trainer: {devices: 2}}\n"
                             "search_space: {trainer.devices: {type: categorical, choices: [1]}}\n"))
    strategies = []

    def train(args, extra_callbacks):
        strategies.append(args["fit"]["trainer"].get("strategy"))
        raise RuntimeError("stop")

    monkeypatch.setattr(runner, "train", train)
    planned = plan(spec, spec.planned_cells())
    assert planned[0].config["trainer"]["strategy"] == "ddp_spawn"  # the base alone: two devices
    work(spec, storage=f"sqlite:///{tmp_path / 'd.db'}", study_name="t", runs_root=str(tmp_path / "runs"), planned=planned)
    assert strategies == [None]  # not ddp_spawn for one device


def _planned(*trainers):
    from types import SimpleNamespace

    return [SimpleNamespace(config={"trainer": t}) for t in trainers]


@pytest.mark.parametrize("trainers,workers,gpus,shares", [
    ([{"accelerator": "gpu", "devices": 2}], 4, list("01234567"), ["0,1", "2,3", "4,5", "6,7"]),
    ([{"devices": "auto"}], 3, list("01234567"), ["0,1", "2,3", "4,5"]),  # each worker's auto: its share
    ([{"accelerator": "gpu", "devices": 1}], 2, ["3", "5"], ["3", "5"]),  # as CUDA_VISIBLE_DEVICES names them
    ([{"accelerator": "gpu", "devices": 8}], 1, list("01234567"), None),  # one worker: all it sees
    ([{"accelerator": "cpu", "devices": 2}], 4, list("01"), None),  # trials on the CPU
    ([{"devices": "auto"}], 2, [], None),  # auto on a CPU machine
])
def test_workers_on_a_gpu_machine_get_gpus_of_their_own(trainers, workers, gpus, shares):
    assert runner.gpu_shares(_planned(*trainers), workers, gpus) == shares


@pytest.mark.parametrize("trainers,workers,gpus,message", [
    ([{"accelerator": "gpu", "devices": 8}], 4, list("01234567"),
     "trainer.devices: a trial trains on 8 GPUs and each of 4 workers gets 2 of this machine's 8; use "
     "--workers 1, or delta.trainer.devices=2"),
    ([{"accelerator": "gpu", "devices": 8}], 1, list("01"),
     "trainer.devices: a trial trains on 8 GPUs and this machine has 2; use delta.trainer.devices=2"),
    ([{"accelerator": "gpu", "devices": 1}], 3, list("01"), "--workers: 3 workers would share this machine's 2 GPU(s)"),
    ([{"accelerator": "cuda", "devices": 1}], 1, [], "trainer.accelerator: cuda, and this machine has no GPU"),
    ([{"accelerator": "gpu", "devices": [6, 7]}], 4, list("01234567"),
     "trainer.devices: [6, 7] names GPUs by number, and each of 4 workers gets 2 of this machine's 8, numbered "
     "from 0; give a count instead (delta.trainer.devices=2)"),
    ([{"accelerator": "gpu", "devices": "0,2"}], 1, list("01"), "trainer.devices: '0,2' names GPUs by number"),
])
def test_gpus_a_worker_does_not_have_are_refused_before_training(trainers, workers, gpus, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        runner.gpu_shares(_planned(*trainers), workers, gpus)


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


def test_each_worker_process_sees_its_own_gpus(monkeypatch):
    started = []

    class Proc:
        def __init__(self, argv, env=None):
            started.append((argv[-1], (env or {}).get("CUDA_VISIBLE_DEVICES")))

        def wait(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", Proc)
    assert runner.spawn_workers(["spec.yaml"], 2, ["0,1", "2,3"]) == 0
    assert started == [("0", "0,1"), ("1", "2,3")]
    for statuses, worst in (([0, 1], 1), ([1, -9], -9), ([-9, 0], -9), ([0, 0], 0)):  # a kill (<0) is the worst
        waits = iter(statuses)
        monkeypatch.setattr(Proc, "wait", lambda self: next(waits))
        assert runner.spawn_workers(["spec.yaml"], 2) == worst
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    monkeypatch.setattr(runner, "num_cuda_devices", lambda: 2)
    assert runner.visible_gpus() == ["4", "6"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert runner.visible_gpus() == ["0", "1"]


# what srun gives the one task of a job on one node (the worker)
SLURM_TASK = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
              "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "sweep",
              "SLURM_NODELIST": "localhost"}


# and what torchrun gives a process it starts (with an agent that serves the rendezvous store)
TORCHRUN = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
            "ROLE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_RUN_ID": "none"}


def test_a_trial_is_rank_0_of_its_own_whatever_launched_the_worker(monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    for name, value in {**SLURM_TASK, **TORCHRUN, "SLURM_PROCID": "3", "NODE_RANK": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(rank_zero_only, "rank", 3)  # as Lightning read SLURM_PROCID or RANK on import
    monkeypatch.setenv("STANDALONE_PORT", "29600")  # a user's choice for Lightning, not a launcher's
    runner.as_own_rank()
    assert rank_zero_only.rank == 0 and not [n for n in TORCHRUN if n in os.environ] and "NODE_RANK" not in os.environ
    assert "SLURM_NTASKS" not in os.environ and os.environ["STANDALONE_PORT"] == "29600"  # no SLURM environment
    assert all(os.environ[n] == v for n, v in SLURM_TASK.items() if n not in ("SLURM_PROCID", "SLURM_NTASKS"))


def test_a_ddp_trial_trains_in_lightnings_own_environment():
    from dat_lab.sweep.plan import LOCAL, in_worker

    out = in_worker({"trainer": {"devices": 2, "strategy": "ddp", "plugins": {"class_path": "x.MyPrecision"}}})
    assert out["trainer"]["plugins"] == [{"class_path": "x.MyPrecision"}, LOCAL]
    assert in_worker({"trainer": {"devices": 2, "strategy": "ddp_spawn"}})["trainer"]["plugins"] == [LOCAL]
    assert "plugins" not in in_worker({"trainer": {"devices": 1}})["trainer"]  # one device: as given
    again = {"trainer": {"devices": 2, "strategy": "ddp", "plugins": [{"class_path": "LightningEnvironment"}]}}
    assert in_worker(again)["trainer"]["plugins"] == again["trainer"]["plugins"]  # a trial's config.yaml as a base
    own = {"class_path": "DDPStrategy", "init_args": {"cluster_environment": LOCAL}}  # Lightning takes one, not two
    assert "plugins" not in in_worker({"trainer": {"devices": 2, "strategy": own}})["trainer"]


def test_a_trial_trains_as_two_ddp_processes_with_pruning_and_its_results_come_back(tmp_path):
    """The base config's `ddp` would start the other rank by running `dat-lab sweep` again (a second
    worker, and the run killed); the trial spawns its ranks, and what rank 0 found reaches the study.
    The worker runs as an srun task: Lightning's SLURM environment made the two ranks two unconnected
    trainings of world size 1 (SLURM_NTASKS) into one run folder; and with torchrun's variables, the ranks
    waited for a rendezvous store that torchrun's agent was to serve, forever."""
    spec = _write(tmp_path, BASE + "sampler: {name: tpe, seed: 0}\nn_trials: 1\n"
                  "search_space: {model.lr: {type: float, low: 1.0e-3, high: 3.0e-3}}\n"
                  "pruner: {name: median}\nbudget: {max_epochs: 1, limit_train_batches: 3, limit_val_batches: 2}\n"
                  "delta: {trainer: {accelerator: cpu, devices: 2, strategy: ddp}}\n")
    storage = f"sqlite:///{tmp_path / 'ddp.db'}"
    done = subprocess.run([sys.executable, "-m", "cli", "sweep", str(spec), "--storage", storage,
                           "--runs-root", str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **SLURM_TASK, **TORCHRUN})
    assert done.returncode == 0 and "MEMBER: 2/2" in done.stdout + done.stderr, done.stderr[-3000:]
    [trial] = optuna.load_study(study_name="t", storage=storage).get_trials()
    assert trial.state == TrialState.COMPLETE and trial.value == trial.user_attrs["best"] > 0
    assert trial.intermediate_values == {0: trial.value}  # reported by the pruning callback on rank 0
    assert trial.user_attrs["final"] == trial.value and trial.user_attrs["images_per_s"] > 0
    assert trial.user_attrs[M.TRIAL_LAST_STEP] == 2  # 3 batches; Lightning logs the epoch's validation at step 2
    run = Path(trial.user_attrs["run_dir"])
    assert [d.name for d in run.parent.iterdir()] == [run.name]
    assert "strategy: ddp_spawn" in (run / "config.yaml").read_text()


def test_a_sweep_in_a_jobs_second_srun_task_trains_and_logs_its_trials(tmp_path):
    """A worker started as task 1 of `#SBATCH --nodes=2 --ntasks=2`: Lightning's SLURM environment refused
    the job's `--ntasks` (no `--ntasks-per-node`), would resume a trial from a `runs/hpc_ckpt_*.ckpt`
    in the working directory, and made SLURM_PROCID the rank, so that the trial's TensorBoard logger
    (rank-zero-only) wrote nothing. (Lightning reads RANK and LOCAL_RANK first: none here.)"""
    spec = _write(tmp_path, BASE + "budget: {max_epochs: 1, limit_train_batches: 2, limit_val_batches: 1}\n")
    slurm = {**SLURM_TASK, "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_PROCID": "1", "SLURM_NODEID": "1"}
    del slurm["SLURM_NTASKS_PER_NODE"]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "hpc_ckpt_1.ckpt").write_text("another run's")  # what SLURM's auto-requeue leaves
    env = {n: v for n, v in os.environ.items() if not runner.LAUNCHER_VARIABLES.fullmatch(n)}
    done = subprocess.run([sys.executable, "-m", "cli", "sweep", str(spec), "--storage", f"sqlite:///{tmp_path / 'x.db'}",
                           "--runs-root", str(tmp_path / "runs")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**env, **slurm, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "t" / "trial_0000"
    assert list(run.glob("events.out.tfevents.*")) and (run / "hparams.yaml").is_file(), sorted(run.iterdir())


def test_table6_dry_run_matches_profile_paper_tables(imagenet_root):
    planned = plan(parse_spec(ROOT / "sweeps" / "table6_geometry.yaml", {"delta.data.init_args.root": imagenet_root}))
    rows = paper_rows(6)
    from dat_lab.profile import profile_model
    import dat_lab

    assert [p.cell.levels["geometry"] for p in planned] == [r.row for r in rows] == [  # the paper's Table 6, in order
        "S / no offsets / none", "S / no offsets / relative", "S / offsets / none", "S / offsets / fixed",
        "S / offsets / dwconv", "P / offsets / relative", "S / offsets / relative (DAT-T)"]
    for p, row in zip(planned, rows):
        expected = profile_model(dat_lab.create_model(row.config()))
        assert p.cost == expected


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
    spec = _write(tmp_path, BASE + "budget: {max_epochs: 1, limit_train_batches: 6, limit_val_batches: 1}\n"
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


def test_workers_need_a_shared_server(tmp_path, capsys):
    assert cli.main(["sweep", DEMO, "--workers", "2", "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    assert "SQLite is unsafe for parallel workers" in capsys.readouterr().err


def test_two_workers_on_postgres_run_each_cell_once(tmp_path, postgres_url):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    _run(_sweep(tmp_path, postgres_url, "seeds=[0]", "--workers", "2", study="pg"), env)
    trials = _assert_every_cell_once(postgres_url, study="pg", cells=4)
    workers = {t.user_attrs[M.TRIAL_WORKER] for t in trials if t.state == TrialState.COMPLETE}
    assert len(workers) == 2, workers


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
    loop = f'for i in 1 2; do "{sys.executable}" -c "$COMMAND" sweep x.yaml; echo "went on after $i"; done'
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
    spec = _write(tmp_path, BASE + "budget: {max_epochs: 1}\nseeds: [0, 1]\n")
    open_study(parse_spec(spec), storage, "t")  # the study as a first run made it (nothing trained)
    assert _dry_run(spec, storage, tmp_path, "heartbeat.grace=60") == 0  # run-time options may change
    capsys.readouterr()
    for override, field in [("seeds=[0,1,2]", "seeds: [0, 1] -> [0, 1, 2]"),
                            ("budget.max_epochs=2", "config.trainer.max_epochs: 1 -> 2"),
                            ("objective.direction=minimize", "objective.direction: 'maximize' -> 'minimize'")]:
        assert _dry_run(spec, storage, tmp_path, override) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"study 't' in {storage} was made by another spec" in err, err
        assert field in err and "use --study NEW_NAME" in err, err
    # a typo in a key differs from the study's spec too: the typo is what is said
    assert _dry_run(spec, storage, tmp_path, "delta.model.lrr=0.1") == 2
    assert "does not accept option 'model.lrr' (did you mean model.lr?)" in capsys.readouterr().err
    argv = ["sweep", str(spec), "seeds=[0,1,2]", "--storage", storage, "--runs-root", str(tmp_path / "runs")]
    assert cli.main(argv) == 2  # a real run too, before any trial
    assert optuna.load_study(study_name="t", storage=storage).get_trials() == []
    optuna.create_study(study_name="old", storage=storage)  # a study from before fingerprints: accepted
    assert _dry_run(spec, storage, tmp_path, "seeds=[0,1,2]", "--study", "old") == 0
    with pytest.raises(SpecError, match="was made by another spec"):  # the worker API checks too
        open_study(parse_spec(spec, {"seeds": [5]}), storage, "t")
    assert FINGERPRINT not in optuna.load_study(study_name="old", storage=storage).user_attrs  # a dry run wrote nothing


def test_a_rerun_may_change_a_factors_baseline_which_analysis_alone_reads(tmp_path):
    storage = f"sqlite:///{tmp_path / 'b.db'}"
    factor = "factors: {f: {levels: {a: {}, b: {model: {lr: 0.001}}}, baseline: %s}}\n"
    first, second = (parse_spec(_write(tmp_path, BASE + factor % level)) for level in ("a", "b"))
    open_study(first, storage, "t")  # (no cells queued: the loads below need not wait for them)
    assert open_study(second, storage, "t", wait_s=0).user_attrs[M.STUDY_FACTORS]["f"]["baseline"] == "b"
    study = optuna.load_study(study_name="t", storage=storage)  # fingerprints stored with the baseline: accepted
    study.set_user_attr(FINGERPRINT, {**first.fingerprint(), "factors.f.baseline": "a"})
    assert open_study(first, storage, "t", wait_s=0).user_attrs[M.STUDY_FACTORS]["f"]["baseline"] == "a"


def test_a_worker_that_loads_a_study_being_created_waits_for_its_fingerprint(tmp_path, monkeypatch, capsys):
    storage = f"sqlite:///{tmp_path / 'r.db'}"
    search = parse_spec(_write(tmp_path, BASE + TPE))
    other = parse_spec(_write(tmp_path, BASE + TPE.replace("n_trials: 2", "n_trials: 2\nseeds: [7]")))
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


def test_where_the_data_lie_and_how_many_loader_workers_are_no_part_of_a_fingerprint(tmp_path):
    from dat_lab.sweep.runner import check_fingerprint

    path = _write(tmp_path, BASE)
    spec, elsewhere = parse_spec(path), parse_spec(path, {"delta.data.init_args.num_workers": 3})
    assert "config.data.init_args.num_workers" not in spec.fingerprint()
    check_fingerprint(elsewhere, spec.fingerprint(), "t", "s")  # another machine, another worker count
    check_fingerprint(spec, {**spec.fingerprint(), "config.data.init_args.root": "/mnt/a"}, "t", "s")  # stored before
    with pytest.raises(SpecError, match="config.data.init_args.img_size: 32 -> 16"):
        check_fingerprint(parse_spec(path, {"delta.data.init_args.img_size": 16}), spec.fingerprint(), "t", "s")
    imagenet = _write(tmp_path, f"study: t\nbase: {ROOT / 'experiments' / 'dat_tiny_imagenet.yaml'}\n")
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

    spec = _write(tmp_path, f"study: t\nbase: {ROOT / 'experiments' / 'dat_tiny_imagenet.yaml'}\n"
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
    spec = _write(tmp_path, BASE)
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
        spec = parse_spec(_write(tmp_path, BASE + text), {"budget": {"max_epochs": 1, "limit_train_batches": 1,
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
    finished = runner._finished
    calls = []

    def bounded(*args):
        calls.append(1)
        assert len(calls) < 10, "the search does not end"
        return finished(*args)

    monkeypatch.setattr(runner, "_finished", bounded)
    spec = _write(tmp_path, BASE + "sampler: tpe\nn_trials: 2\nbudget: {max_epochs: 1, limit_train_batches: 6, "
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
    finished, calls = runner._finished, []

    def bounded(*args):
        calls.append(1)
        assert len(calls) < 10, "the search does not end"
        return finished(*args)

    def broken(config):
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "_finished", bounded)
    monkeypatch.setattr(runner, "in_worker", broken)
    spec = parse_spec(_write(tmp_path, BASE + TPE))
    study = work(spec, storage=f"sqlite:///{tmp_path / 'b.db'}", study_name="t", runs_root=str(tmp_path / "runs"),
                 planned=plan(spec, spec.planned_cells()))
    assert [(t.state, t.user_attrs["failure"]) for t in study.get_trials()] == [(TrialState.FAIL, "RuntimeError: boom")] * 2


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
    spec = _write(tmp_path, BASE + "sampler: tpe\nn_trials: 2\nbudget: {max_epochs: 1, limit_train_batches: 6, "
                  "limit_val_batches: 1}\nsearch_space: {model.lr: {type: categorical, choices: [1.0e+30]}}\n")
    argv = [sys.executable, "-m", "cli", "sweep", str(spec), "--workers", "2", "--storage", postgres_url,
            "--study", "fails", "--runs-root", str(tmp_path / "runs")]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "dat-lab: a worker exited with status 1 (a trial FAILED, or the worker crashed)" in done.stderr
    trials = optuna.load_study(study_name="fails", storage=postgres_url).get_trials()
    assert len(trials) >= 2 and {t.state for t in trials} == {TrialState.FAIL}


def test_a_tpe_search_counts_failed_trials_but_not_interrupted_or_stale_ones(tmp_path):
    """A trial that failed in training is finished (a search whose trials all fail ends); one interrupted
    (Ctrl-C) or failed as stale (its worker died, no reason recorded) is sampled again by a rerun."""
    spec = parse_spec(_write(tmp_path, BASE + TPE.replace("n_trials: 2", "n_trials: 1")))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="t")
    for attrs in ({"failure": "interrupted"}, {}):
        study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs=attrs))
        assert runner._finished(study, spec, {}) == (0, 1, True)
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"failure": "ValueError: bad"}))
    assert runner._finished(study, spec, {}) == (1, 1, False)
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.5))  # n_trials lowered since
    assert runner._finished(study, spec, {}) == (2, 2, False)


def test_a_database_that_cannot_be_opened_is_one_line_and_a_dry_run_writes_nothing(tmp_path, capsys):
    server = "postgresql://u:secret@127.0.0.1:1/db"  # nothing listens there
    assert cli.main(["sweep", DEMO, "--storage", server, "--runs-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err  # the password is not printed (output and logs may be shared)
    assert err.startswith(f"dat-lab: error: --storage: cannot open postgresql+psycopg://u:***@127.0.0.1:1/db: ") \
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
