"""Sweep specs: parsing, planning and dry runs (nothing trains); each bad spec refused in one line."""

import os
import re
from pathlib import Path

import optuna
import pytest
import yaml

import cli
import dat_lab
from dat_lab.ablations import paper_rows
from dat_lab.sweep import SpecError, parse_spec, plan
from sweep_common import BASE, DEMO, ROOT, TPE, write_spec


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
    ("delta: {model: 5}\n", "delta.model: must be a mapping of model options, got 5"),
    ("sampler: tpe\nn_trials: 2\nsearch_space: {model.lr: {type: float, low: 1.0e-4, high: 1.0e-2}, model.lrr.low: 1.0e-4}\n",
     "search_space.model.lrr.low: no search_space entry 'model.lrr' to set low of (entries: model.lr)"),
    ("budget: {max_epochs: null}\n", "budget.max_epochs: null: give a value, or leave the key out for the base config's"),
    ("storage: {sqlite:///x.db: null}\n", "storage: must be a URL, got {'sqlite:///x.db': None} (quote one that holds ': ')"),
    ("budget: {max_epochs: abc}\n", "budget.max_epochs: 'abc' is not a number: it must be >= 1, or -1 for no limit"),
    ("budget: {max_time: abc}\n", "budget.max_time: 'abc' must be DD:HH:MM:SS"),
    ("budget: {limit_val_batches: -1}\n", "budget.limit_val_batches: -1 must be a count of batches >= 0"),
    ("objective: {metrc: val/acc5}\n", "objective.metrc: unknown key; allowed: direction, metric, value"),
    ("heartbeat: {interval: 1, grac: 1}\n", "heartbeat.grac: unknown key; allowed: grace, interval"),
    ("sampler: {name: grid, seed: 1}\n", "sampler.seed: unknown key; allowed: name"),
    (TPE.replace("sampler: tpe", "sampler: {name: tpe, n_startup: 3}"), "sampler.n_startup: unknown key; allowed:"),
    ("pruner: {name: median, n_startup: 3}\n", "pruner.n_startup: unknown key; allowed: interval_steps,"),
    ("pruner: {name: median, n_startup_trials: -1}\n", "pruner.n_startup_trials: must be an integer >= 0, got -1"),
    ("pruner: {min_resource: 1}\n", "pruner: needs a name, one of hyperband, median, none"),
    # what Optuna itself takes silently
    (TPE.replace("sampler: tpe", "sampler: {name: tpe, n_startup_trials: -1}"),
     "sampler.n_startup_trials: must be an integer >= 0, got -1"),
    (TPE.replace("sampler: tpe", "sampler: {name: tpe, multivariate: maybe}"),
     "sampler.multivariate: must be true or false, got 'maybe'"),
    (TPE.replace("sampler: tpe", "sampler: {name: tpe, seed: null}"), "sampler.seed: must be an integer >= 0 (a fixed seed: the search repeats), got None"),
    (TPE.replace("sampler: tpe", "sampler: {name: tpe, seed: -3}"), "sampler.seed: must be an integer >= 0"),
    (TPE + "pruner: {name: hyperband, reduction_factor: 1}\n", "pruner.reduction_factor: must be an integer >= 2, got 1"),
    (TPE + "pruner: {name: hyperband, max_resource: all}\n", "pruner.max_resource: must be an integer >= 1 or auto, got 'all'"),
    (TPE + "pruner: {name: median, n_warmup_steps: 1.5}\n", "pruner.n_warmup_steps: must be an integer >= 0, got 1.5"),
    (TPE + "factors: {s: {path: model.overrides.offset_range, values: [1, 2]}}\n", "factors: only for sampler grid"),
    (TPE + "seeds: [0, 1]\n", "seeds: sampler tpe takes one seed, got [0, 1]"),
    (TPE.replace("1.0e-4", "1e-4"), "search_space.model.lr.low: must be a number, got '1e-4' (YAML reads 1e-4 as text: "
     "write 1.0e-4)$"),
    (TPE.replace("1.0e-2", "a"), "search_space.model.lr.high: must be a number, got 'a'$"),
    (TPE.replace("high: 1.0e-2", "high: 1.0e-2, lgo: true"), "search_space.model.lr.lgo: unknown key; allowed: high, "
     "log, low, step, type"),
    (TPE.replace("high: 1.0e-2", "high: 1.0e-2, log: 'yes'"), "search_space.model.lr.log: must be true or false, got 'yes'"),
    (TPE.replace("low: 1.0e-4", "low: 0.0").replace("high: 1.0e-2", "high: 1.0e-2, log: true"),
     "search_space.model.lr: log: true needs low > 0, got low 0.0"),
    (TPE.replace("high: 1.0e-2", "high: 1.0e-2, log: true, step: 1.0e-4"), "search_space.model.lr.step: takes no log: true"),
    (TPE.replace("high: 1.0e-2", "high: 1.0e-2, step: 0.0"), "search_space.model.lr.step: must be > 0, got 0.0"),
    (TPE.replace("{type: float, low: 1.0e-4, high: 1.0e-2}", "{type: categorical, choices: [1, 2], low: 0}"),
     "search_space.model.lr.low: unknown key; allowed: choices, type"),
    (TPE.replace("model.lr: {type: float, low: 1.0e-4, high: 1.0e-2}",
                 "model.overrides.offset_range: {type: categorical, choices: [[0, 0, 2, 2], [1, 1, 2, 2]]}"),
     "search_space.model.overrides.offset_range.choices: [0, 0, 2, 2] is not a plain value"),
    (TPE.replace("{type: float, low: 1.0e-4, high: 1.0e-2}", "{type: categorical, choices: [1, 1, 2]}"),
     "search_space.model.lr.choices: [1, 1, 2] names a choice twice"),
    (TPE.replace("model.lr:", "model:"), "search_space.model: names the whole 'model' group; give one option of it"),
    (TPE.replace("model.lr:", "seed_everything:").replace("float, low: 1.0e-4, high: 1.0e-2", "int, low: 0, high: 4"),
     "search_space.seed_everything: the sweep sets the seeds"),
    (TPE.replace("model.lr:", "trainer.max_epochs:").replace("float, low: 1.0e-4, high: 1.0e-2", "int, low: 1, high: 3")
     + "budget: {max_epochs: 1}\n", "search_space.trainer.max_epochs: budget.max_epochs sets it"),
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
    # a misspelt key over {} changed nothing, so passed unseen (and made a level the base's twin)
    ("factors: {p: {levels: {a: {}, b: {modell: {}}}}}\n", "factors.p.levels.b.modell: {} changes nothing"),
    ("delta: {model: {overrides: {}}}\n", "delta.model.overrides: {} changes nothing (a misspelt key?)"),
    # the budget was merged over the delta: 3 epochs trained, silently
    ("delta: {trainer: {max_epochs: 5}}\nbudget: {max_epochs: 3}\n",
     "delta.trainer.max_epochs: budget.max_epochs sets it too; give it in one place"),
    ("factors: {e: {path: trainer.max_epochs, values: [1, 2]}}\nbudget: {max_epochs: 3}\n",
     "factors.e: sets trainer.max_epochs, which budget.max_epochs sets too; give it in one place"),
    # the best trial would be the worst (and a trial's best value its worst epoch)
    ("objective: {metric: val/acc1, direction: minimize}\n",
     "objective.direction: minimize for val/acc1, which is better the higher: give maximize, or leave it out"),
    ("objective: {metric: val/loss, direction: maximize}\n", "val/loss, which is better the lower: give minimize"),
    ("seeds: [0, 1]\nseeds: [0]\n", "is not valid YAML (key 'seeds' given twice; give it once at line 4, column 1)"),
])
def test_bad_specs_name_the_key(tmp_path, body, message):
    anchored = message.endswith("$")  # the message ends there
    base = BASE.split("\n", 1)[1] if body.startswith("study:") else BASE  # (a key given twice is refused)
    with pytest.raises(SpecError, match=re.escape(message.removesuffix("$")) + "$" * anchored):
        parse_spec(write_spec(tmp_path, base + body))


def test_a_study_name_that_is_no_folder_name_is_refused(tmp_path, capsys):
    assert cli.main(["sweep", DEMO, "--study", "a/b", "--dry-run", "--runs-root", str(tmp_path)]) == 2
    assert "--study: 'a/b': use letters" in capsys.readouterr().err


def test_a_runs_root_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    storage = f"sqlite:///{tmp_path / 'r.db'}"
    assert cli.main(["sweep", DEMO, "--storage", storage, "--runs-root", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err == (f"dat-lab: error: --runs-root: {tmp_path / 'afile' / 'demo'}: "
                                       f"{tmp_path / 'afile'} is a file, not a folder\n")
    assert not (tmp_path / "r.db").exists()


def test_a_spec_or_base_that_is_not_text_or_yaml_is_one_line(tmp_path):
    binary = tmp_path / "weights.pth"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(SpecError, match=f"^{re.escape(str(binary))} is not a text file \\(give a sweep spec YAML"):
        parse_spec(binary)
    with pytest.raises(SpecError, match=f"base: {re.escape(str(binary))} is not a text file"):
        parse_spec(write_spec(tmp_path, f"study: t\nbase: {binary}\n"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epochs: [1\n")
    with pytest.raises(SpecError, match=f"^{re.escape(str(bad))} is not valid YAML \\(.* at line 3, column 1\\)$"):
        parse_spec(bad)
    with pytest.raises(SpecError, match=f"^{re.escape(str(tmp_path / 'spec.yaml'))}: base: {re.escape(str(bad))} is not "
                                        f"valid YAML \\(.* at line 3, column 1\\)$"):
        parse_spec(write_spec(tmp_path, f"study: t\nbase: {bad}\n"))
    bad.write_text("- a list\n")
    with pytest.raises(SpecError, match=f"base: {re.escape(str(bad))} is not a training config"):
        parse_spec(write_spec(tmp_path, f"study: t\nbase: {bad}\n"))


def test_the_base_is_read_once(tmp_path):
    """A base file edited while a sweep runs does not change the trials still to come."""
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  lr: 0.1\n")
    spec = parse_spec(write_spec(tmp_path, f"study: t\nbase: {base}\n"))
    base.write_text("model:\n  lr: 0.5\n")
    assert spec.trial_config({}, 0)["model"]["lr"] == spec.base_config()["model"]["lr"] == 0.1


def test_bad_cell_configs_fail_before_anything_runs(tmp_path):
    spec = parse_spec(write_spec(tmp_path, BASE + "factors: {g: {path: model.overrides.groups, values: [3]}}\n"))
    with pytest.raises(SpecError, match=r"cell 'g=3': .*groups: 3 offset groups do not divide \d+ heads"):
        plan(spec)
    spec = parse_spec(write_spec(tmp_path, BASE + "objective: {metric: val_ema/acc1}\n"))  # would train, then fail
    with pytest.raises(SpecError, match=r"cell '\(base\)': objective val_ema/acc1 is logged only with EMA weights"):
        plan(spec)
    ema_search = BASE + "objective: {metric: val_ema/acc1}\n" + TPE.replace("model.lr: {type: float, low: 1.0e-4, high: 1.0e-2}",
                                                                           "model.ema_decay: {type: float, low: 0.99, high: 0.999}")
    assert len(plan(parse_spec(write_spec(tmp_path, ema_search)))) == 1  # not refused: each trial samples an EMA decay
    with pytest.raises(SpecError, match=r"search_space.model.ema_decay = 0.0: objective val_ema/acc1 is logged only"):
        plan(parse_spec(write_spec(tmp_path, ema_search.replace("low: 0.99", "low: 0.0"))))
    spec = parse_spec(write_spec(tmp_path, BASE + "factors: {x: {path: model.learning_rate, values: [1]}}\n"))
    with pytest.raises(SpecError, match=r"cell 'x=1': training config: .*model.learning_rate' \(model options: "
                                        r"variant, overrides, .*, weights\)$"):
        plan(spec)
    for delta, meant in (("{trainer: {max_epochz: 1}}", "trainer.max_epochs"), ("{modell: {lr: 1}}", "model"),
                         ("{data: {init_args: {batch_sizee: 8}}}", "batch_size")):
        with pytest.raises(SpecError, match=re.escape(f"(did you mean {meant}?)")):
            plan(parse_spec(write_spec(tmp_path, BASE + f"delta: {delta}\n")))
    from dat_lab.training.cli import _did_you_mean  # inside a known group's option: not "did you mean trainer?"
    assert _did_you_mean("Subcommand 'fit' does not accept option 'trainer.logger.save_dirr'") == ""
    # a search: each search-space path at its bounds and choices, before any trial samples it
    spec = parse_spec(write_spec(tmp_path, BASE + TPE.replace("model.lr:", "model.lrr:")))
    with pytest.raises(SpecError, match=r"search_space.model.lrr = 0.0001: training config: .*model.lrr"):
        plan(spec)
    spec = parse_spec(write_spec(tmp_path, BASE + TPE.replace("1.0e-4", "-1.0e-4")))
    with pytest.raises(SpecError, match=r"search_space.model.lr = -0.0001: model.lr: -0.0001 must be > 0"):
        plan(spec)
    weights = tmp_path / "w.ckpt"
    dat_lab.save_checkpoint(dat_lab.create_model("dat_pico", num_classes=10, img_size=32, in_chans=1), weights)
    spec = parse_spec(write_spec(tmp_path, BASE + f"delta: {{model: {{weights: {weights}}}}}\n"
                             "factors: {s: {path: model.overrides.offset_range, values: [2, 4]}}\n"))
    with pytest.raises(SpecError, match=r"cell 's=4': model.weights: .* holds another model \(stages\[0\].offset_range"):
        plan(spec)  # trials start from these weights: they must be there, and of each cell's model
    spec = parse_spec(write_spec(tmp_path, BASE + f"delta: {{model: {{weights: {tmp_path / 'none.ckpt'}}}}}\n"))
    with pytest.raises(SpecError, match=r"cell '\(base\)': model.weights: .*none.ckpt: no such checkpoint"):
        plan(spec)
    for delta, message in (("{trainer: {check_val_every_n_epoch: 0}}", "trainer.check_val_every_n_epoch: 0 must be >= 1"),
                           ("{data: {init_args: {batch_size: 0}}}", "data.batch_size: 0 must be >= 1"),
                           # runs that never validate: each trial would train, then fail for want of its result
                           ("{trainer: {limit_val_batches: 0}}", "trainer.limit_val_batches: 0 validates nothing"),
                           ("{trainer: {limit_train_batches: 0.0}}", "trainer.limit_train_batches: 0 trains nothing"),
                           ("{trainer: {check_val_every_n_epoch: 3, max_epochs: 2}}",
                            "trainer.check_val_every_n_epoch: 3 is more than max_epochs 2, so no epoch validates")):
        spec = parse_spec(write_spec(tmp_path, BASE + f"delta: {delta}\n"))  # would fail in every trial
        with pytest.raises(SpecError, match=re.escape(f"cell '(base)': {message}")):
            plan(spec)
    spec = parse_spec(write_spec(tmp_path, BASE + "sampler: tpe\nn_trials: 2\n"
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
    spec = parse_spec(write_spec(tmp_path, f"study: t\nbase: {tmp_path / 'config.yaml'}\nseeds: [0, 1]\n"))
    assert [spec.trial_config(c.delta, c.seed)["data"]["init_args"]["seed"] for c in spec.cells()] == [0, 1]
    spec = parse_spec(write_spec(tmp_path, f"study: t\nbase: {tmp_path / 'config.yaml'}\nseeds: [0, 1]\n"
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


def test_an_override_sets_the_value_at_its_key(tmp_path):
    """A mapping given whole replaces the spec's (as an option given again does); a deeper key changes
    that key alone; a search_space path, dots and all, is one key."""
    spec = write_spec(tmp_path, BASE + TPE.replace("high: 1.0e-2", "high: 1.0e-2, log: true")
                      + "pruner: {name: median, n_startup_trials: 2}\n")
    hyperband = parse_spec(spec, {"pruner": {"name": "hyperband", "min_resource": 1}})
    assert hyperband.pruner == {"name": "hyperband", "min_resource": 1}  # not median's n_startup_trials too
    for overrides in ({"pruner.name": "hyperband", "pruner.min_resource": 1},  # the spec's options were median's
                      {"pruner.min_resource": 1, "pruner.name": "hyperband"},
                      {"pruner": "hyperband", "pruner.min_resource": 1}):  # a name alone, then an option of it
        assert parse_spec(spec, overrides).pruner == {"name": "hyperband", "min_resource": 1}, overrides
    assert parse_spec(spec, {"pruner.name": "median", "pruner.n_warmup_steps": 1}).pruner == {
        "name": "median", "n_startup_trials": 2, "n_warmup_steps": 1}  # the same name keeps the spec's options
    assert parse_spec(spec, {"search_space.model.lr.low": 1.0e-3}).search_space == {
        "model.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}}
    assert parse_spec(spec, {"search_space.model.lr": {"type": "float", "low": 0.1, "high": 0.2}}).search_space == {
        "model.lr": {"type": "float", "low": 0.1, "high": 0.2}}
    space = parse_spec(spec, {"search_space.model.weight_decay": {"type": "float", "low": 0.0, "high": 0.1}}).search_space
    assert list(space) == ["model.lr", "model.weight_decay"]
    assert list(parse_spec(spec, {"search_space": {"model.weight_decay": {"type": "float", "low": 0.0, "high": 0.1}}})
                .search_space) == ["model.weight_decay"]


def test_overrides_may_follow_the_options(tmp_path, capsys):
    assert cli.main(["sweep", DEMO, "--dry-run", "--storage", f"sqlite:///{tmp_path / 'd.db'}", "--runs-root",
                     str(tmp_path), "seeds=[0]", "budget.max_epochs=1"]) == 0  # not ./runs/demo.db: make demo's
    out = capsys.readouterr().out
    assert "4 trial(s) planned" in out and "│  0.0073751 │" in out  # GFLOPs as trials keep them (not 0.0074)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sweep", DEMO, "--dry-run", "--stduy", "x"])
    assert exit_.value.code == 2 and capsys.readouterr().err == \
        "dat-lab: error: unrecognized arguments: --stduy x (see dat-lab sweep --help)\n"  # one line: no usage block


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

    spec = write_spec(tmp_path, BASE + "delta: " + yaml.safe_dump({"trainer": trainer}, default_flow_style=True))
    assert cli.main(["sweep", str(spec), "--dry-run", "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dat-lab: error: {spec}: cell '(base)': {message}") and err.count("\n") == 1, err


def test_a_search_space_that_sets_trainer_options_is_checked_at_planning_too(tmp_path, capsys):
    spec = write_spec(tmp_path, BASE + "sampler: tpe\nn_trials: 1\n"
                  "search_space: {trainer.num_nodes: {type: categorical, choices: [1, 2]}}\n")
    assert cli.main(["sweep", str(spec), "--dry-run", "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dat-lab: error: {spec}: search_space.trainer.num_nodes = 2: trainer.num_nodes: 2; ")


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
