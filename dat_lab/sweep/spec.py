"""Sweep specs: YAML files in sweeps/ that name a base experiment and the factors of an ablation.

    study: demo                               # default study name
    base: ../experiments/digits_quick.yaml    # training config, relative to the spec file
    delta: {trainer: {accelerator: cpu}}      # config delta for every cell (nested, merged into base); paths
                                              # in configs (data root, model.weights) from the working directory
    budget: {max_epochs: 3}                   # trainer limits: max_epochs, max_steps, max_time, limit_*_batches
    factors:                                  # every combination of levels is a cell
      position:                               # named levels, each a config delta
        levels: {none: {model: {overrides: {position: none}}}, relative: {}}
        baseline: relative                    # the row analysis compares against (default: the first)
      s:                                      # a list of values for one config path
        path: model.overrides.offset_range
        values: [0, 1, 2, 4]
      rows: {paper_table: 7}                  # the paper's rows (dat_lab.ablations) as levels
    seeds: [0, 1]                             # each cell once per seed (seed_everything, and the data's seed:
                                              # their shuffling and augmentation; not the digits' split)
    objective: {metric: val/acc1, direction: maximize, value: best}
    sampler: grid                             # or {name: tpe, seed: 0, n_startup_trials: 8, multivariate: true}
    search_space: {model.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}}   # tpe only; also step, and
                                              # {type: categorical, choices: [...]}
    n_trials: 20                              # tpe only
    pruner: none                              # tpe only: {name: median, ...} / {name: hyperband, ...}
    storage: sqlite:///runs/demo.db           # default: sqlite:///runs/<study>.db (the study run, --study included)
    heartbeat: {interval: 10, grace: 30}      # seconds; a RUNNING trial silent for `grace` is stale

A bad spec raises SpecError naming the key, before anything runs.
"""

from __future__ import annotations

import copy
import re
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import optuna

from .. import metrics as M
from ..ablations import paper_rows
from ..training.cli import check_trainer
from ..yaml_files import float_hint, read_yaml


class SpecError(ValueError):
    """A sweep spec is invalid; the message names the file and key."""


TOP_KEYS = {"study", "base", "delta", "budget", "factors", "seeds", "objective", "sampler", "search_space",
            "n_trials", "pruner", "storage", "heartbeat"}
BUDGET_KEYS = {"max_epochs", "max_steps", "max_time", "limit_train_batches", "limit_val_batches"}
# validation metrics: what a trial's result is read from at each validation (train/loss was then only
# the last batch's loss, its epoch mean not yet made)
OBJECTIVE_KEYS = {"metric", "direction", "value"}
HEARTBEAT_KEYS = {"interval", "grace"}
SAMPLERS = {"grid", "tpe"}
TPE_OPTIONS = {"seed": (0, "int", 0), "n_startup_trials": (10, "int", 0), "n_ei_candidates": (24, "int", 1),
               "multivariate": (True, "bool", None), "group": (False, "bool", None),
               "constant_liar": (True, "bool", None)}  # (default, kind, least value)
TPE_DEFAULTS = {k: default for k, (default, _, _) in TPE_OPTIONS.items()}  # optuna 5 changed them: every one explicit
PRUNER_CLASSES = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
                  "hyperband": optuna.pruners.HyperbandPruner}
# each sampler's and pruner's options: (kind, least value); Optuna takes some bad values silently
# (n_startup_trials=-1, multivariate="yes", reduction_factor=1)
OPTION_RULES: dict[str, dict[str, tuple[str, int | None]]] = {
    "grid": {}, "none": {},
    "tpe": {k: (kind, least) for k, (_, kind, least) in TPE_OPTIONS.items()},
    "median": {"n_startup_trials": ("int", 0), "n_warmup_steps": ("int", 0), "interval_steps": ("int", 1),
               "n_min_trials": ("int", 1)},
    "hyperband": {"min_resource": ("int", 1), "max_resource": ("int or auto", 1), "reduction_factor": ("int", 2),
                  "bootstrap_count": ("int", 0)},
}
COMPONENTS = {"sampler": "grid", "pruner": "none"}  # given as a name or as {name: ..., options...}; default
PRUNERS = set(PRUNER_CLASSES)
MACHINE_LOCAL = {"config.data.init_args.root", "config.data.init_args.num_workers",
                 "config.model.weights"}  # not in a fingerprint: where a file lies on this machine
LOGGING_ONLY = {f"config.trainer.{k}" for k in ("log_every_n_steps", "enable_progress_bar", "enable_model_summary")}
NOT_FINGERPRINTED = MACHINE_LOCAL | LOGGING_ONLY  # nor what a run prints and logs, not what it trains
DATA_IDENTITY = "data"  # the fingerprint's field of what planning found to tell the data apart
SPACE_TYPES = {"float", "int", "categorical"}
SPACE_KEYS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
              "categorical": {"type", "choices"}}
SEED_PATHS = ("seed_everything", "data.init_args.seed")  # what the spec's seeds set
FACTOR_NAME = re.compile(r"[A-Za-z_][\w.-]*")
RESERVED_NAMES = tuple(n for n in dict.fromkeys(M.TRIAL_COLUMNS + M.TABLE_COLUMNS) if FACTOR_NAME.fullmatch(n))
"""Not factor names: columns of the analysis tables."""


def deep_merge(base: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `delta` merged in: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in delta.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_override(raw: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """`raw` (a spec) with the value at the dotted spec key `key` set to `value`: a mapping given whole
    replaces the one there, as an option given again does (`pruner={name: hyperband}`), a deeper key
    changes that key alone (`budget.max_epochs=1`). A search_space path holds dots itself: the longest
    run of parts that names a key there is that key (`search_space.model.lr.low=1.0e-4`), and a new
    one takes the rest (`search_space.model.lr={type: float, ...}`)."""
    out = copy.deepcopy(dict(raw))
    node, parts, dotted = out, key.split("."), False
    while True:
        n = next((n for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in node), len(parts) if dotted else 1)
        head = ".".join(parts[:n])
        if n == len(parts):
            node[head] = copy.deepcopy(value)
            return out
        if not isinstance(node.get(head), dict):
            node[head] = {}
        node, parts, dotted = node[head], parts[n:], node is out and head == "search_space"


def nest(path: str, value: Any) -> dict[str, Any]:
    """"a.b.c", v -> {"a": {"b": {"c": v}}}."""
    out: Any = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; an empty mapping, a list or a scalar is a leaf."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(_flatten(value, path + ".") if isinstance(value, Mapping) and value else {path: value})
    return out


@dataclass(frozen=True)
class Factor:
    name: str
    levels: dict[str, dict[str, Any]]  # level name -> config delta
    baseline: str
    paper_table: int | None = None  # levels are the rows of this paper table


@dataclass(frozen=True)
class Cell:
    """One combination of levels and a seed: what one trial trains."""

    levels: dict[str, str]
    seed: int
    delta: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return M.cell_name(self.levels)

    @property
    def key(self) -> str:
        """Unique within a study: the cell name and the seed."""
        return M.cell_key(self.levels, self.seed)


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    study: str
    base: Path
    delta: dict[str, Any]
    factors: tuple[Factor, ...]
    seeds: tuple[int, ...]
    metric: str
    direction: str
    value: str
    sampler: dict[str, Any]
    search_space: dict[str, dict[str, Any]]
    n_trials: int | None
    pruner: dict[str, Any]
    storage: str | None  # None: sqlite:///runs/<study>.db of the study actually run
    heartbeat: tuple[int, int]
    base_file: dict[str, Any] = field(repr=False)  # read once: every trial of this run trains the same base

    @property
    def is_grid(self) -> bool:
        return self.sampler["name"] == "grid"

    def cells(self) -> list[Cell]:
        """Every combination of factor levels, times every seed, in spec order."""
        names = [f.name for f in self.factors]
        combos = itertools.product(*(f.levels.items() for f in self.factors)) if self.factors else [()]
        out = []
        for combo in combos:
            delta: dict[str, Any] = {}
            for _, level_delta in combo:
                delta = deep_merge(delta, level_delta)
            for seed in self.seeds:
                out.append(Cell(levels=dict(zip(names, (lvl for lvl, _ in combo))), seed=seed, delta=delta))
        return out

    def planned_cells(self) -> list[Cell]:
        """What to plan before running: every cell of a grid; for a search, its one base cell."""
        cells = self.cells()
        return cells if self.is_grid else cells[:1]

    def base_config(self) -> dict[str, Any]:
        """The base training config with the spec's delta (and budget) merged in."""
        return deep_merge(self.base_file, self.delta)

    def trial_config(self, delta: Mapping[str, Any], seed: int) -> dict[str, Any]:
        """The full training config of a trial: base, spec delta, cell delta, seed. The seed is the data's
        too (their shuffling and augmentation), over a base that names one (a run's config.yaml does): only
        the spec's delta or a factor may set the data's seed otherwise."""
        base = self.base_file
        if isinstance(data := base.get("data"), Mapping) and "class_path" in data:
            base = deep_merge(base, {"data": {"init_args": {"seed": seed}}})
        return deep_merge(deep_merge(deep_merge(base, self.delta), delta), {"seed_everything": seed})

    def fingerprint(self, data: Iterable[str] = ()) -> dict[str, Any]:
        """What defines a study's results, as {dotted field: value} (JSON values): objective, sampler, seeds,
        factors, search space and the resolved training config (base, delta, budget). Not the run-time
        options (storage, heartbeat, workers, n_trials, pruner) or the factors' baselines (which analysis
        alone reads: a rerun may change them), nor where the files are (MACHINE_LOCAL:
        workers on several machines may find the data elsewhere, and load them with other worker counts),
        nor how often a run logs and what it prints (LOGGING_ONLY).
        `data`: what planning found to tell the cells' data apart from others (PlannedCell.data), the
        same wherever they lie (an ImageFolder's class names): a DATA_IDENTITY field where there is any."""
        tree = {"objective": {"metric": self.metric, "direction": self.direction, "value": self.value},
                "sampler": {**TPE_DEFAULTS, **self.sampler} if self.sampler["name"] == "tpe" else self.sampler,
                "seeds": list(self.seeds),
                "factors": {f.name: {"levels": f.levels} for f in self.factors},
                "search_space": self.search_space, "config": self.base_config()}
        if identities := sorted({d for d in data if d}):
            tree[DATA_IDENTITY] = identities
        flat = json.loads(json.dumps(_flatten(tree), default=str))
        return {k: v for k, v in flat.items() if k not in NOT_FINGERPRINTED}


def build_sampler(sampler: Mapping[str, Any]) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of a spec's `sampler` (a grid's cells are enqueued, never sampled)."""
    if sampler["name"] == "tpe":
        options = {**TPE_DEFAULTS, **{k: v for k, v in sampler.items() if k != "name"}}
        # the prior options (consider_prior, prior_weight, consider_magic_clip, consider_endpoints) are
        # deprecated in optuna 5 and fixed at True, 1.0, True, False: passing them only warns
        return optuna.samplers.TPESampler(**options)
    return optuna.samplers.RandomSampler(seed=0)


def build_pruner(pruner: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    """The Optuna pruner of a spec's `pruner`."""
    return PRUNER_CLASSES[pruner["name"]](**{k: v for k, v in pruner.items() if k != "name"})


STUDY_NAME_RULE = "use letters, digits, _, - and . (- and . not first): it names runs/<study>/ and runs/<study>.db"


def valid_study_name(name: str) -> bool:
    """Whether `name` can name a study's folder and default storage (no path separators, no '..')."""
    return re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) is not None


def _check_keys(path: Path, key: str, raw: Mapping[str, Any], allowed: set[str]) -> None:
    """Raise SpecError naming the first key of `raw` (at `key`; "" the top level) not in `allowed`."""
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _error(path, f"{key}.{unknown[0]}" if key else unknown[0],
                     f"unknown key; allowed: {', '.join(sorted(allowed)) or 'none'}")


def _error(path: Path, key: str, message: str) -> SpecError:
    return SpecError(f"{path}: {key}: {message}")


def _as_mapping(component: Any) -> Any:
    """A sampler or pruner given by its name alone as {"name": name}, so that an override can add options."""
    return {"name": component} if isinstance(component, str) else component


def _mapping(path: Path, key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _error(path, key, f"must be a mapping, got {value!r}")
    return dict(value)


def _budget_option(config_path: str, budget: Mapping[str, Any]) -> str | None:
    """The budget's option that a dotted config path sets (trainer.max_epochs -> max_epochs), else None."""
    group, _, rest = config_path.partition(".")
    return option if group == "trainer" and (option := rest.split(".")[0]) in budget else None


def _check_no_empty(path: Path, key: str, delta: Mapping[str, Any]) -> None:
    """A SpecError naming the first empty mapping inside `delta` (`{modell: {}}`): merged, it changes
    nothing, so a misspelt key there would pass unseen (an empty delta itself is the base config)."""
    for name, value in delta.items():
        if isinstance(value, Mapping):
            if not value:
                raise _error(path, f"{key}.{name}", "{} changes nothing (a misspelt key?); leave it out")
            _check_no_empty(path, f"{key}.{name}", value)


def _factor(path: Path, name: str, raw: Any) -> Factor:
    key = f"factors.{name}"
    if not isinstance(name, str) or not FACTOR_NAME.fullmatch(name):
        raise _error(path, key, "a factor's name is a letter or _, then letters, digits, _, - and . (it heads a "
                                "table column and names factor=level in --baseline)")
    if name in RESERVED_NAMES:
        raise _error(path, key, f"{name!r} names a column of the analysis tables; call the factor otherwise "
                                f"(taken: {', '.join(RESERVED_NAMES)})")
    raw = _mapping(path, key, raw)
    forms = [k for k in ("levels", "values", "paper_table") if k in raw]
    if not forms:  # a misspelt key (valuse: [0, 2]) is named, not just the missing form
        _check_keys(path, key, raw, {"levels", "path", "values", "paper_table", "baseline"})
    if len(forms) != 1:
        raise _error(path, key, "give exactly one of levels (named deltas), path + values, or paper_table (6 or 7)")
    allowed = {"levels", "baseline"} if forms[0] == "levels" else {"path", "values", "baseline"} \
        if forms[0] == "values" else {"paper_table", "baseline"}
    _check_keys(path, key, raw, allowed)
    if forms[0] == "levels":
        levels = _mapping(path, f"{key}.levels", raw["levels"])
        levels = {str(k): _mapping(path, f"{key}.levels.{k}", v) for k, v in levels.items()}
        for level, delta in levels.items():
            _check_no_empty(path, f"{key}.levels.{level}", delta)
        names = list(levels)
        twice = next(((a, b) for i, a in enumerate(names) for b in names[i + 1:] if levels[a] == levels[b]), None)
        if twice:
            raise _error(path, f"{key}.levels", f"{twice[0]} and {twice[1]} are the same delta (one config trained "
                                                 f"twice); give each level its own")
    elif forms[0] == "values":
        if not isinstance(raw.get("path"), str) or not raw["path"]:
            raise _error(path, f"{key}.path", "a dotted config path is needed with values, e.g. model.overrides.offset_range")
        values = raw["values"]
        if not isinstance(values, list) or not values:
            raise _error(path, f"{key}.values", f"must be a non-empty list, got {values!r}")
        levels = {str(v): nest(raw["path"], v) for v in values}
        if len(levels) < len(values) or any(v == w for i, v in enumerate(values) for w in values[i + 1:]):
            # levels are named by str(value): 2 and "2" would be one level, 2 and 2.0 one config twice
            raise _error(path, f"{key}.values", f"{values!r} names a level twice; give each value once")
    else:
        try:
            rows = paper_rows(raw["paper_table"])
        except ValueError as err:
            raise _error(path, f"{key}.paper_table", str(err)) from None
        levels = {row.row: {"model": {"overrides": row.delta}} if row.delta else {} for row in rows}
    if not levels:
        raise _error(path, key, "has no levels")
    baseline = str(raw.get("baseline", next(iter(levels))))
    if baseline not in levels:
        raise _error(path, f"{key}.baseline", f"{baseline!r} is not one of {', '.join(levels)}")
    return Factor(name=str(name), levels=levels, baseline=baseline, paper_table=raw.get("paper_table"))


def _named(path: Path, key: str, raw: Any, names: set[str], build: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """A component given as a name or as {name: ..., options...}, one of `names`, its options checked by
    OPTION_RULES; `build` makes the Optuna object now, so that whatever else Optuna refuses fails here."""
    spec = _mapping(path, key, _as_mapping(COMPONENTS[key] if raw is None else raw))
    if "name" not in spec:
        raise _error(path, key, f"needs a name, one of {', '.join(sorted(names))}")
    if spec["name"] not in names:
        raise _error(path, key, f"{spec['name']!r} is not one of {', '.join(sorted(names))}")
    rules = OPTION_RULES[spec["name"]]
    _check_keys(path, key, spec, set(rules) | {"name"})
    for option, value in spec.items():
        if option != "name":
            _option(path, f"{key}.{option}", value, *rules[option])
    try:
        build(spec)
    except (TypeError, ValueError) as err:
        raise _error(path, key, f"{spec['name']}: {str(err).splitlines()[0]}") from None
    return spec


def _option(path: Path, key: str, value: Any, kind: str, least: int | None) -> None:
    """Raise SpecError unless `value` is of `kind` ("int", "int or auto", "bool") and at least `least`."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise _error(path, key, f"must be true or false, got {value!r}")
        return
    if kind == "int or auto" and value == "auto":
        return
    if not isinstance(value, int) or isinstance(value, bool) or (least is not None and value < least):
        wanted = "an integer" + (f" >= {least}" if least is not None else "") + (" or auto" if "auto" in kind else "")
        why = " (a fixed seed: the search repeats)" if key == "sampler.seed" else ""
        raise _error(path, key, f"must be {wanted}{why}, got {value!r}")


def _number(path: Path, key: str, value: Any, kind: str) -> int | float:
    """`value` if it is a number of the search space's type."""
    ok = isinstance(value, int) if kind == "int" else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise _error(path, key, f"must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}"
                                f"{float_hint(value) if kind != 'int' else ''}")
    return value


def _search_space(path: Path, raw: Any, budget: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    space = _mapping(path, "search_space", raw)
    for name, dist in space.items():
        key = f"search_space.{name}"
        entry, _, option = name.rpartition(".")
        if entry and not isinstance(dist, Mapping) and option in SPACE_KEYS["float"] | SPACE_KEYS["categorical"]:
            raise _error(path, key, f"no search_space entry {entry!r} to set {option} of (entries: "
                                    f"{', '.join(k for k in space if isinstance(space[k], Mapping)) or 'none'})")
        dist = _mapping(path, key, dist)
        if dist.get("type") not in SPACE_TYPES:
            raise _error(path, f"{key}.type", f"{dist.get('type')!r} is not one of {', '.join(sorted(SPACE_TYPES))}")
        _check_keys(path, key, dist, SPACE_KEYS[dist["type"]])
        if name in SEED_PATHS:
            raise _error(path, key, "the sweep sets the seeds (the spec's seeds: a search's one seed); not a search parameter")
        if "." not in name:
            raise _error(path, key, f"names the whole {name!r} group; give one option of it, e.g. model.lr")
        if (option := _budget_option(name, budget)) is not None:
            raise _error(path, key, f"budget.{option} sets it; search it with no budget for it")
        for k in ("choices",) if dist["type"] == "categorical" else ("low", "high"):
            if k not in dist:
                raise _error(path, f"{key}.{k}", "is missing")
        if dist["type"] == "categorical":
            _choices(path, f"{key}.choices", dist["choices"])
            continue
        low, high = (_number(path, f"{key}.{k}", dist[k], dist["type"]) for k in ("low", "high"))
        if not low < high:
            raise _error(path, key, f"low {low} must be below high {high}")
        log = dist.get("log", False)
        _option(path, f"{key}.log", log, "bool", None)
        if log and low <= 0:
            raise _error(path, key, f"log: true needs low > 0, got low {low}")
        if "step" in dist:
            if log:
                raise _error(path, f"{key}.step", "takes no log: true (a log scale has no fixed step)")
            if _number(path, f"{key}.step", dist["step"], dist["type"]) <= 0:
                raise _error(path, f"{key}.step", f"must be > 0, got {dist['step']}")
    return space


def _choices(path: Path, key: str, choices: Any) -> None:
    """A categorical's choices: a non-empty list of distinct plain values (what Optuna stores and analysis
    groups by: none, true/false, numbers, text)."""
    if not isinstance(choices, list) or not choices:
        raise _error(path, key, f"must be a non-empty list, got {choices!r}")
    for choice in choices:
        if choice is not None and not isinstance(choice, (bool, int, float, str)):
            raise _error(path, key, f"{choice!r} is not a plain value (null, true/false, a number or text); a list "
                                    "of values is a factor's level in a grid")
    if len({(type(c), c) for c in choices}) < len(choices):
        raise _error(path, key, f"{choices!r} names a choice twice")


def parse_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read and validate a spec; `overrides` are dotted spec keys (e.g. {"budget.max_epochs": 1})."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such sweep spec")
    try:
        raw = read_yaml(path, expected="a sweep spec YAML, e.g. sweeps/demo.yaml") or {}
    except ValueError as err:
        raise SpecError(str(err)) from None
    raw = _mapping(path, "(top level)", raw)
    overrides = dict(overrides or {})
    for key in COMPONENTS:  # the spec's options were another component's: `pruner.name=hyperband` drops median's
        given = _as_mapping(raw.get(key))
        if f"{key}.name" in overrides and not (isinstance(given, Mapping) and given.get("name") == overrides[f"{key}.name"]):
            raw[key] = {}
    for key, value in overrides.items():
        raw = set_override({k: _as_mapping(v) if k in COMPONENTS else v for k, v in raw.items()}, key, value)
    _check_keys(path, "", raw, TOP_KEYS)
    for key in ("study", "base"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise _error(path, key, "is required (a string)")
    if not valid_study_name(raw["study"]):
        raise _error(path, "study", f"{raw['study']!r}: {STUDY_NAME_RULE}")
    base = (path.parent / raw["base"]).resolve()
    if not base.is_file():
        raise _error(path, "base", f"{raw['base']} does not exist (relative to {path.parent})")
    budget = _mapping(path, "budget", raw.get("budget"))
    _check_keys(path, "budget", budget, BUDGET_KEYS)
    if (unset := next((k for k, v in budget.items() if v is None), None)) is not None:  # Lightning's default then
        raise _error(path, f"budget.{unset}", "null: give a value, or leave the key out for the base config's")
    try:  # what the trainer would refuse, or fail on, in every trial
        check_trainer(budget, "budget")
    except ValueError as err:
        raise SpecError(f"{path}: {err}") from None
    delta = _mapping(path, "delta", raw.get("delta"))
    for group in ("model", "data", "trainer"):  # a value there would replace the base's whole group
        if group in delta and not isinstance(delta[group], Mapping):
            raise _error(path, f"delta.{group}", f"must be a mapping of {group} options, got {delta[group]!r}")
    _check_no_empty(path, "delta", delta)
    if (both := next((k for k in _flatten(delta) if _budget_option(k, budget)), None)) is not None:
        raise _error(path, f"delta.{both}", f"budget.{_budget_option(both, budget)} sets it too; give it in one place "
                                            f"(budget: the trainer's limits)")
    delta = deep_merge(delta, {"trainer": budget} if budget else {})
    factors = tuple(_factor(path, name, f) for name, f in _mapping(path, "factors", raw.get("factors")).items())
    for factor in factors:  # (a level would win over the budget, silently)
        if (key := next((k for d in factor.levels.values() for k in _flatten(d) if _budget_option(k, budget)),
                        None)) is not None:
            raise _error(path, f"factors.{factor.name}", f"sets {key}, which budget.{_budget_option(key, budget)} "
                                                         f"sets too; give it in one place")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise _error(path, "seeds", f"must be a non-empty list of distinct integers, got {seeds!r}")
    objective = _mapping(path, "objective", raw.get("objective"))
    _check_keys(path, "objective", objective, OBJECTIVE_KEYS)
    metric = objective.get("metric", M.VAL_ACC1)
    if metric not in M.OBJECTIVES:
        raise _error(path, "objective.metric", f"{metric!r} is not one of {', '.join(sorted(M.OBJECTIVES))}")
    direction = objective.get("direction", M.OBJECTIVES[metric])
    if direction not in ("maximize", "minimize"):
        raise _error(path, "objective.direction", f"{direction!r} is not one of maximize, minimize")
    if direction != M.OBJECTIVES[metric]:  # the best trial, the pruner and a trial's best value would be the worst
        raise _error(path, "objective.direction", f"{direction} for {metric}, which is better the "
                                                  f"{'higher' if M.OBJECTIVES[metric] == 'maximize' else 'lower'}: "
                                                  f"give {M.OBJECTIVES[metric]}, or leave it out")
    value = objective.get("value", "best")
    if value not in ("best", "last"):
        raise _error(path, "objective.value", f"{value!r} is not one of best, last")
    sampler = _named(path, "sampler", raw.get("sampler"), SAMPLERS, build_sampler)
    pruner = _named(path, "pruner", raw.get("pruner"), PRUNERS, build_pruner)
    space = _search_space(path, raw.get("search_space"), budget)
    n_trials = raw.get("n_trials")
    if sampler["name"] == "grid":
        if space or n_trials is not None:
            raise _error(path, "search_space" if space else "n_trials", "only for sampler tpe (a grid runs every cell)")
        if pruner["name"] != "none":
            raise _error(path, "pruner", f"{pruner['name']}: only for sampler tpe (a grid trains every cell to the "
                                         f"end, to compare them); give pruner: none")
    else:
        if not space:
            raise _error(path, "search_space", "is required for sampler tpe")
        if not isinstance(n_trials, int) or n_trials < 1:
            raise _error(path, "n_trials", f"must be a positive integer for sampler tpe, got {n_trials!r}")
        if factors:  # a search trains the base config (with its search space), not cells
            raise _error(path, "factors", "only for sampler grid (a tpe search samples search_space instead)")
        if len(seeds) > 1:
            raise _error(path, "seeds", f"sampler tpe takes one seed, got {seeds!r} (run a study per seed)")
    if raw.get("storage") is not None and not isinstance(raw["storage"], str):
        raise _error(path, "storage", f"must be a URL, got {raw['storage']!r} (quote one that holds ': ')")
    heartbeat = _mapping(path, "heartbeat", raw.get("heartbeat"))
    _check_keys(path, "heartbeat", heartbeat, HEARTBEAT_KEYS)
    interval, grace = heartbeat.get("interval", M.HEARTBEAT[0]), heartbeat.get("grace", M.HEARTBEAT[1])
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (interval, grace)) or not 0 < interval < grace:
        raise _error(path, "heartbeat", f"interval {interval!r} and grace {grace!r} must be integers, 0 < interval < grace")
    study = raw["study"]
    spec = SweepSpec(path=path, study=study, base=base, delta=delta, factors=factors, seeds=tuple(seeds),
                     metric=metric, direction=direction, value=value, sampler=sampler, search_space=space,
                     n_trials=n_trials, pruner=pruner, storage=raw.get("storage") or None,
                     heartbeat=(interval, grace), base_file=_read_base(path, base))
    _check_conflicts(spec)
    return spec


def _read_base(path: Path, base: Path) -> dict[str, Any]:
    """The base training config file of the spec at `path`, as a mapping."""
    try:
        config = read_yaml(base, expected="a training config, e.g. experiments/digits_quick.yaml") or {}
    except ValueError as err:
        raise SpecError(f"{path}: base: {err}") from None
    if not isinstance(config, dict):
        raise SpecError(f"{path}: base: {base} is not a training config (a mapping of trainer, model, data)")
    return config


def _check_conflicts(spec: SweepSpec) -> None:
    """Two factors (or a factor and the search space) must not set the same config path."""
    owners: dict[str, str] = {}
    for factor in spec.factors:
        paths = set().union(*(_flatten(d) for d in factor.levels.values()))
        for p in paths:
            if p in owners and owners[p] != factor.name:
                raise _error(spec.path, f"factors.{factor.name}", f"sets {p}, which factor {owners[p]} sets too")
            owners[p] = factor.name
    for p in spec.search_space:
        if p in owners:
            raise _error(spec.path, f"search_space.{p}", f"factor {owners[p]} sets it too")
