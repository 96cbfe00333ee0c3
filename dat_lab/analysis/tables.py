"""The ablation table: per cell, mean +- std of the objective over seeds, seeds, params, FLOPs,
images/s and the difference to the baseline (the paper's "Diff" column); Markdown, CSV and LaTeX."""

from __future__ import annotations

import math
import re
from pathlib import Path
import pandas as pd

from ..ablations import paper_rows
from .. import metrics as M
from .study import AnalysisError, StudyInfo, finished


def metric_label(metric: str) -> tuple[str, float]:
    """Column label and display scale of a metric: accuracies in percent."""
    if metric in M.ACCURACIES:
        return f"{metric} (%)", 100.0
    return metric, 1.0


def metric_text(metric: str, value: float) -> str:
    """A value of `metric` as the tables show it (accuracies in percent, 2 decimals; others 4)."""
    _, scale = metric_label(metric)
    return _fmt(value * scale if value is not None else None, _digits(metric))


def spread_text(info: StudyInfo, other_factors: bool = False) -> str:
    """What a table's or plot's value and spread are over: its seeds (one: the value itself) and, where
    `other_factors`, the other factors' levels, pooled."""
    seeds = len(info.seeds) > 1
    over = (["seeds"] if seeds else []) + (["the other factors' levels"] if other_factors else [])
    if not over:
        return "one seed"
    return f"mean ± std over {' and '.join(over)}" + ("" if seeds else "; one seed")


def _digits(metric: str) -> int:
    """Decimals a metric's values are shown with: 2 in percent, else 4."""
    return 2 if metric_label(metric)[1] != 1.0 else 4


def baseline_levels(info: StudyInfo, baseline: str | None) -> dict[str, str]:
    """The baseline cell's levels: the spec's baselines, or those `baseline` names: "level" (of the one
    factor that has it), or "factor=level, factor=level" (a level may hold commas: "G=1, 1, s=0")."""
    levels = {f: d["baseline"] for f, d in info.factors.items()}
    if not baseline:
        return levels
    if not info.factors:
        raise AnalysisError(f"--baseline: study {info.name!r} has no factors ({'one config' if info.grid else 'a search'}), "
                            f"so no other baseline row")
    allowed = "; ".join(f"{f}: {', '.join(d['levels'])}" for f, d in info.factors.items())
    named: set[str] = set()
    for factor, level in _baseline_parts(baseline, list(info.factors)):
        # a level as the spec spells it, whatever the spaces after its commas ("1,1" for "1, 1")
        found = {f: lv for f, d in info.factors.items() for lv in d["levels"]
                 if (factor in (None, f)) and _spaced(lv) == _spaced(level)}
        if len(found) > 1:
            raise AnalysisError(f"--baseline: {level!r} is a level of {' and '.join(found)}: "
                                f"say which, e.g. {next(iter(found))}={level}")
        if not found:
            raise AnalysisError(f"--baseline: {baseline!r} names no level ({allowed})")
        [(owner, levels[owner])] = found.items()
        if owner in named:
            raise AnalysisError(f"--baseline: {baseline!r} names factor {owner} twice")
        named.add(owner)
    return levels


def _spaced(level: str) -> str:
    return re.sub(r"\s*,\s*", ", ", level.strip())


def _baseline_parts(baseline: str, factors: list[str]) -> list[tuple[str | None, str]]:
    """"a=1, 1, b=x" -> [("a", "1, 1"), ("b", "x")]: split where a comma is followed by a factor's
    name and "="; a part without "factor=" -> (None, part)."""
    if not factors:
        return [(None, baseline.strip())]
    names = "|".join(re.escape(f) for f in sorted(factors, key=len, reverse=True))
    parts = []
    for part in re.split(rf"\s*,\s*(?=(?:{names})\s*=)", baseline.strip()):
        named = re.fullmatch(rf"({names})\s*=\s*(.*)", part, flags=re.DOTALL)
        parts.append((named[1], named[2].strip()) if named else (None, part.strip()))
    return parts


def summarize(frame: pd.DataFrame, info: StudyInfo, baseline: str | None = None) -> pd.DataFrame:
    """One row per cell (levels): mean, std, n, params_m, gflops, images_per_s, diff, status."""
    factors = list(info.factors)
    finished(frame, info.name)
    _, scale = metric_label(info.metric)
    rows = []
    for levels, group in frame.groupby(factors, observed=True, sort=True) if factors else [((), frame)]:
        levels = levels if isinstance(levels, tuple) else (levels,)
        done = group[group["status"] == "done"]
        values = done["value"].astype(float) * scale
        pending = sorted(set(group["status"]) - {"done"})
        rows.append({**dict(zip(factors, levels)), "mean": values.mean() if len(values) else math.nan,
                     "std": values.std(ddof=1) if len(values) > 1 else math.nan,  # one seed: no spread measured
                     "n": len(values), "params_m": _first(group["params_m"]), "gflops": _first(group["gflops"]),
                     "images_per_s": done["images_per_s"].astype(float).mean() if len(done) else math.nan,
                     "status": "done" if not pending else f"{len(done)}/{len(group)} done; " + ", ".join(pending)})
    table = pd.DataFrame(rows)
    is_base = (table[factors] == pd.Series(baseline_levels(info, baseline))).all(axis=1)
    base_mean = table.loc[is_base, "mean"].iloc[0] if is_base.any() else math.nan
    table["diff"] = table["mean"] - base_mean
    table["baseline"] = is_base
    return table


def _first(series: pd.Series) -> float:
    values = series.dropna()
    return float(values.iloc[0]) if len(values) else math.nan


def _fmt(value: float, digits: int = 2, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    value = 0.0 if round(value, digits) == 0 else value  # (a -3e-6 showed as -0.00)
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                 "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "|": r"\textbar{}"}


def latex_text(text: str) -> str:
    """text as LaTeX shows it literally: its special characters escaped (a level named `10% & more`)."""
    return "".join(LATEX_SPECIAL.get(c, c) for c in text)


def display(table: pd.DataFrame, info: StudyInfo, *, latex: bool = False) -> pd.DataFrame:
    """The table as strings, ready for Markdown, LaTeX or the terminal."""
    label, _ = metric_label(info.metric)
    pm = r"$\pm$" if latex else "±"
    out = table[list(info.factors)].astype(str)
    if latex:
        out = out.map(latex_text)
    d = _digits(info.metric)
    out[label] = [_fmt(m, d) if n < 2 else f"{_fmt(m, d)} {pm} {_fmt(s, d)}"  # one seed: no spread to show
                  for m, s, n in zip(table["mean"], table["std"], table["n"])]
    out["seeds"] = table["n"].astype(str)
    _cost_columns(out, table)
    out["diff"] = ["baseline" if b else _fmt(x, d, sign=True) for x, b in zip(table["diff"], table["baseline"])]
    if (table["status"] != "done").any():
        out["status"] = table["status"]
    return out


def _cost_columns(out: pd.DataFrame, frame: pd.DataFrame) -> None:
    """Add params (M), FLOPs (G) and images/s of `frame` to `out`, as strings: params with 2 decimals and
    FLOPs with 3 (the paper's scale), or more where the smallest has fewer than 3 significant digits."""
    for column, name, least in (("params_m", "params (M)", 2), ("gflops", "FLOPs (G)", 3)):
        digits = _decimals(frame[column], least)
        out[name] = frame[column].map(lambda v: _fmt(v, digits))
    out["images/s"] = frame["images_per_s"].map(lambda v: _fmt(v, 0))


def _decimals(values: pd.Series, least: int, significant: int = 3) -> int:
    """Decimals that show the column's smallest nonzero magnitude with `significant` digits, at least `least`."""
    magnitudes = values.dropna().astype(float).abs()
    smallest = magnitudes[magnitudes > 0].min() if (magnitudes > 0).any() else None
    return least if smallest is None else max(least, significant - 1 - math.floor(math.log10(smallest)))


def best_first(done: pd.DataFrame, info: StudyInfo) -> pd.DataFrame:
    """A search's finished trials, best first; then its pruned ones (by the last value they reported)."""
    order = done.assign(**{"(pruned)": done["status"] != "done"})
    order = order.sort_values(["(pruned)", "value"], ascending=[True, info.direction == "minimize"], kind="stable")
    return order.drop(columns=["(pruned)"])


def search_csv(done: pd.DataFrame, info: StudyInfo) -> pd.DataFrame:
    """A search's finished trials for table.csv, best first as in table.md, the objective in the tables'
    units under their label (`val/acc1 (%)`), unrounded."""
    label, scale = metric_label(info.metric)
    done = best_first(done, info)
    return done.drop(columns=["run_dir", "last_step", "cell"]).assign(value=done["value"] * scale).rename(columns={"value": label})


def display_search(done: pd.DataFrame, info: StudyInfo) -> pd.DataFrame:
    """A search's finished trials as strings, best first (then its pruned ones, marked): trial, the sampled
    parameters (4 significant digits), the objective in the tables' units, params, FLOPs and images/s."""
    done = best_first(done, info)
    label, _ = metric_label(info.metric)
    out = pd.DataFrame({"trial": done["trial"].astype(int).astype(str)})
    for name in [c for c in done.columns if c not in M.TRIAL_COLUMNS]:
        out[name] = done[name].map(lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))
    out[label] = done["value"].map(lambda v: metric_text(info.metric, v))
    _cost_columns(out, done)
    if (done["status"] != "done").any():  # a pruned trial's value: the last it reported
        out["status"] = done["status"].map(lambda s: "pruned (its last value)" if s == "pruned" else s)
    return out


def markdown(shown: pd.DataFrame, left: int = 0) -> str:
    """A displayed table (strings) in Markdown as written (tabulate would read numbers and reformat
    them: 4.60 as 4.6, 52.00 as 52), its first `left` columns aligned left, the others right."""
    align = ["left"] * left + ["right"] * (shown.shape[1] - left)
    escaped = shown.map(lambda s: s.replace("|", r"\|") if isinstance(s, str) else s)  # a level `a|b` would split its cell
    escaped.columns = [c.replace("|", r"\|") for c in shown.columns]
    return escaped.to_markdown(index=False, disable_numparse=True, colalign=align)


def paper_layout(table: pd.DataFrame, info: StudyInfo) -> pd.DataFrame | None:
    """For a factor made of a paper table's rows: the rows in the paper's order, the paper's FLOPs,
    params and top-1 beside this study's numbers (and each row's status while any is not done). None
    for other studies."""
    tables = [(f, d["paper_table"]) for f, d in info.factors.items() if d.get("paper_table")]
    if len(info.factors) != 1 or not tables:
        return None
    factor, number = tables[0]
    label, _ = metric_label(info.metric)
    shown = display(table, info).set_index(factor)
    rows = []
    for row in paper_rows(number):
        ours = shown.loc[row.row] if row.row in shown.index else None
        rows.append({f"Table {number}": row.row, "paper FLOPs (G)": f"{row.paper_gflops:.2f}",
                     "paper params (M)": f"{row.paper_params_m:.2f}", "paper top-1 (%)": f"{row.paper_top1:.1f}",
                     "FLOPs (G)": ours["FLOPs (G)"] if ours is not None else "-",
                     "params (M)": ours["params (M)"] if ours is not None else "-",
                     label: ours[label] if ours is not None else "-",
                     "diff": ours["diff"] if ours is not None else "-"})
        if "status" in shown.columns:  # a study not finished: which rows wait, as in table.md
            rows[-1]["status"] = ours["status"] if ours is not None else "-"
    return pd.DataFrame(rows)


def write_tables(table: pd.DataFrame, info: StudyInfo,
                 out: Path) -> tuple[pd.DataFrame, pd.DataFrame | None, tuple[str, ...]]:
    """Write table.md, table.csv, table.tex (booktabs), and paper_table.md when the study is a paper
    table; return the displayed table, the paper layout (or None) and the names of the files written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "table.md", "csv": out / "table.csv", "tex": out / "table.tex"}
    shown = display(table, info)
    paths["md"].write_text(markdown(shown, left=len(info.factors)) + "\n")
    table.drop(columns=["baseline"]).to_csv(paths["csv"], index=False)
    tex = display(table, info, latex=True)
    tex.columns = [latex_text(c) for c in tex.columns]
    left = len(info.factors)  # the factors' levels left, the numbers right, as in table.md
    paths["tex"].write_text(tex.to_latex(index=False, escape=False, column_format="l" * left + "r" * (tex.shape[1] - left)))
    paper = paper_layout(table, info)
    if paper is not None:
        paths["paper"] = out / "paper_table.md"
        paths["paper"].write_text(markdown(paper, left=1) + "\n")
    return shown, paper, tuple(p.name for p in paths.values())
