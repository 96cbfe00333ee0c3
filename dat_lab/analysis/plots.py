"""Plots of a study with seaborn, each written as PNG and PDF: bars with error bars for categorical
factors, a line with an error band for numeric ones (the paper's offset-range figure), learning
curves per cell from the trials' TensorBoard events, and Optuna's history and importances for searches."""

from __future__ import annotations

import math
import warnings

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .. import metrics as M  # noqa: E402
from .study import StudyInfo, run_here  # noqa: E402
from .tables import baseline_levels, metric_label, spread_text  # noqa: E402

BASELINE_COLOR, OTHER_COLOR = "#d62728", "#4c72b0"
X, Y = "(x)", "(y)"  # factor_plot's columns beside the factors': names no factor can take


def _numeric(levels: list[str]) -> bool:
    """Levels that are finite numbers, each its own ("1" and "1.0" stay two bars, not one point)."""
    try:
        numbers = [float(v) for v in levels]
    except ValueError:
        return False
    return all(math.isfinite(n) for n in numbers) and len(set(numbers)) == len(numbers)


def factor_plot(frame: pd.DataFrame, info: StudyInfo, factor: str, baseline: str | None = None) -> plt.Figure:
    """The objective against one factor's levels, mean and sd over seeds (and over other factors'
    levels, shown as hue when there is one other factor); the baseline level highlighted."""
    label, scale = metric_label(info.metric)
    done = frame[frame["status"] == "done"].copy()
    done[Y] = done["value"].astype(float) * scale
    levels = info.factors[factor]["levels"]
    base_levels = baseline_levels(info, baseline)
    base = base_levels[factor]
    others = [f for f in info.factors if f != factor]
    hue = others[0] if len(others) == 1 else None
    base_cell = done[(done[list(info.factors)].astype(str) == pd.Series(base_levels)).all(axis=1)]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(levels) + 2), 3.6))
    if _numeric(levels):
        done[X] = done[factor].astype(str).astype(float)
        sns.lineplot(data=done, x=X, y=Y, hue=hue, errorbar="sd", marker="o", ax=ax, color=OTHER_COLOR)
        if len(base_cell):  # the table's baseline row, not the level's mean over the other factors
            ax.scatter([float(base)], [base_cell[Y].mean()], s=140, marker="*", color=BASELINE_COLOR, zorder=5,
                       label="baseline (" + ", ".join(f"{f} = {lv}" for f, lv in base_levels.items()) + ")")
            ax.legend(fontsize=8, title=hue, title_fontsize=8)  # the hue's levels under its factor's name
        if all(float(v).is_integer() for v in levels):  # ticks at the levels, not 1.2, 1.4, ...
            ax.set_xticks([float(v) for v in levels], levels)
        ax.set_xlabel(factor)
    else:
        done[factor] = done[factor].astype(str)
        palette = None if hue else {lvl: BASELINE_COLOR if lvl == base else OTHER_COLOR for lvl in levels}
        # points, not bars: a bar's length reads as its value, and the axis spans only the values (a point or two)
        sns.pointplot(data=done, x=factor, y=Y, hue=hue or factor, order=[lv for lv in levels if lv in set(done[factor])],
                      errorbar="sd", capsize=0.1, palette=palette, legend=bool(hue), linestyle="none",
                      dodge=0.3 if hue else False, ax=ax)
        ax.set_xlabel(f"{factor} (baseline: {base})")
        ax.tick_params(axis="x", rotation=20 if max(len(str(lv)) for lv in levels) > 8 else 0, labelsize=8)
        for tick in ax.get_xticklabels():
            if tick.get_text() == base:
                tick.set_color(BASELINE_COLOR)
                tick.set_fontweight("bold")
        if len(base_cell):
            ax.axhline(base_cell[Y].mean(), color=BASELINE_COLOR, linestyle="--", linewidth=1, label="baseline cell")
    ax.set_ylabel(label)
    ax.set_title(f"{info.name}: {info.metric} by {factor} ({spread_text(info, len(others) > 1)})", fontsize=9)
    return fig


def learning_curves(frame: pd.DataFrame, info: StudyInfo, tag: str | None = None) -> plt.Figure | None:
    """Validation metric per epoch, one line per cell: mean and sd band over seeds, from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tag = tag or info.metric
    label, scale = metric_label(tag)
    rows = []
    factors = list(info.factors)
    for _, trial in frame[frame["status"] == "done"].iterrows():
        run = trial.get("run_dir")
        if not run_here(run):
            continue
        events = EventAccumulator(run, size_guidance={"scalars": 0})
        events.Reload()
        if tag not in events.Tags()["scalars"]:
            continue
        cell = (", ".join(str(trial[f]) for f in factors) or M.BASE_CELL) if info.grid else trial["cell"]
        # the epoch Lightning logged at the same step (validation need not run every epoch), counted from 1
        epochs = {e.step: e.value for e in events.Scalars("epoch")} if "epoch" in events.Tags()["scalars"] else {}
        end = trial.get("last_step")  # the trial's last validation: a run resumed in its folder logs on after it
        for i, event in enumerate(events.Scalars(tag)):
            if pd.isna(end) or event.step <= end:  # (None too)
                rows.append({"epoch": int(epochs.get(event.step, i)) + 1, "y": event.value * scale, "cell": cell})
    if not rows:
        return None
    data = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    sns.lineplot(data=data, x="epoch", y="y", hue="cell", errorbar="sd", marker="o", ax=ax)
    ax.set_xlabel("epoch")
    epochs = sorted(data["epoch"].unique())
    if len(epochs) <= 12:  # a tick at each epoch (one epoch alone got ticks at 0.95, 1.0, 1.05)
        ax.set_xticks(epochs)
    else:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(label)
    ax.set_title(f"{info.name}: learning curves ({spread_text(info)})", fontsize=9)
    ax.legend(fontsize=7, title=", ".join(factors) or None, title_fontsize=7)
    return fig


TIES = "Target and region quantiles select the same set of trials"  # Optuna's PED-ANOVA warning


def search_plots(study: optuna.Study, info: StudyInfo) -> dict[str, plt.Figure]:
    """Optuna's optimisation history, its objective in the tables' units, and (with two or more finished
    trials) parameter importances."""
    from optuna.visualization import matplotlib as ovm

    label, scale = metric_label(info.metric)
    with warnings.catch_warnings():  # Optuna's matplotlib plots are "experimental": a warning on every call
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        history = ovm.plot_optimization_history(study, target_name=label)
        history.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_scaled_ticks(history.yaxis, scale)))
        history.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # trials: no 0.5
        finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        history.set_title(f"{info.name}: {label} by trial ({len(finished)} finished of {len(study.trials)})", fontsize=9)
        figures = {"history": history.figure}
        if len(finished) >= 2 and finished[0].params:
            with warnings.catch_warnings(record=True) as caught:  # what the filters let through, recorded
                warnings.filterwarnings("always", message=TIES)
                importances = ovm.plot_param_importances(study)
            # PED-ANOVA's warning where the best trials' values tie with the rest: said on the plot, not printed
            ties = [w for w in caught if str(w.message).startswith(TIES)]
            for w in caught:
                if w not in ties:  # anything else shown as it would have been
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            importances.set_title(f"{info.name}: parameter importances from {len(finished)} finished trials"
                                  + (" (their values tie: no parameter stands out)" if ties else ""), fontsize=9)
            figures["importances"] = importances.figure
    for ax in (fig.axes[0] for fig in figures.values()):  # as the other figures: white, the legend inside
        ax.set_title("", loc="left")  # Optuna's own title, beside ours
        ax.set_facecolor("white")
        ax.grid(True, color="0.9")
        if ax is history:
            ax.legend(loc="best", fontsize=8)
        elif ax.get_legend() is not None:  # the importances' "Objective Value" says nothing
            ax.get_legend().remove()
    return figures


def _scaled_ticks(axis, scale: float):
    """Tick labels of values shown times `scale`, all with the decimals their spacing needs (not 2.1
    beside 2.08)."""
    def label(value: float, _) -> str:
        ticks = axis.get_majorticklocs()
        step = abs(ticks[1] - ticks[0]) * scale if len(ticks) > 1 else 1.0
        decimals = next((d for d in range(7) if abs(step * 10**d - round(step * 10**d)) < 1e-6 * 10**d), 6)
        return f"{value * scale:.{decimals}f}"
    return label
