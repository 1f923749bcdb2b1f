"""What a run's directory holds beyond its final results, across runs: any `metrics.jsonl` key over the
training steps (one line per group of the comparison table, mean ± std band over its runs: the seeds), the
figures of the evaluations along training as rows of a table (`ibq-sweep table --steps`), and the sorted code
usage of the last evaluation (rank vs share of the tokens, log-log), the picture of codebook collapse."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ibq.errors import UserError, steps_text
from ibq.ledger.runs import Run
from ibq.report.plot import new_figure, save_figure, slug
from ibq.report.table import DEFAULT_METRICS, STEP, Row, Table, axis_label, build_table, label, number
from ibq.runs.record import MetricsLog
from ibq.runs.usage import sorted_frequencies, usage_steps

USAGE_PLOT = "code_usage_sorted.png"
# A table at steps shows the evaluations' figures by default: stage II's training loss is logged at every log step.
STEP_METRICS = [metric for metric in DEFAULT_METRICS if metric != "loss"]


def curve_name(metric: str) -> str:
    return f"curve_{slug(metric)}.png"


def row_label(table: Table, row: Row) -> str:
    return ", ".join(f"{factor}={value}" for factor, value in zip(table.factors, row.key)) or "all runs"


def on_disk_runs(runs: list[Run]) -> list[Run]:
    if any(run.path is None for run in runs):
        raise UserError("curves, figures at steps and code usage are read from the run directories: leave out --source wandb")
    return runs


def on_disk(table: Table) -> list[Run]:
    return on_disk_runs([run for row in table.rows for run in row.runs])


def logged_steps(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the numbers a run's metrics.jsonl holds at that step, its lines merged (the training log's, the
    evaluation's, ibq-eval's on another set), a later line's number winning."""
    steps: dict[int, dict[str, float]] = defaultdict(dict)
    for line in MetricsLog(run_dir / "metrics.jsonl").read():
        steps[line["step"]].update((key, value) for key, value in line.items() if key != STEP and number(value) is not None)
    return dict(steps)


def run_curve(run_dir: Path, metric: str) -> dict[int, float]:
    """step -> value of `metric` in a run's metrics.jsonl."""
    return {step: line[metric] for step, line in logged_steps(run_dir).items() if metric in line}


def runs_at_steps(runs: list[Run], metrics: list[str] | None, steps: list[int] | None) -> tuple[list[Run], list[str]]:
    """(a run for each run and step at which its metrics.jsonl holds one of `metrics`, with the figures of that step
    as its results and the step as a config key: the rows of build_table(at_steps=True); the metrics). `metrics`
    None: those of STEP_METRICS that some run logged. `steps` None: every such step, else each must be one."""
    lines = [(run, logged_steps(run.path)) for run in on_disk_runs(runs)]
    logged = sorted({key for _, by_step in lines for line in by_step.values() for key in line})
    if metrics is None:
        metrics = [metric for metric in STEP_METRICS if metric in logged]
        if not metrics:
            raise UserError(f"no run logs an evaluation in its metrics.jsonl ({', '.join(map(label, STEP_METRICS))}); "
                            f"--metrics names others (logged: {', '.join(logged) or 'none'})")
    for metric in metrics:
        if metric not in logged:
            raise UserError(f"no run logs the metric {metric!r} in its metrics.jsonl; logged: {', '.join(logged) or 'none'}")
    evaluated = sorted({step for _, by_step in lines for step, line in by_step.items() if any(m in line for m in metrics)})
    for step in steps or []:
        if step not in evaluated:
            raise UserError(f"--steps {step}: no run logged {', '.join(map(label, metrics))} at that step; they did at steps "
                            f"{steps_text(evaluated)}")
    return [replace(run, config={**run.config, STEP: step}, results=line, signature=run.signature and f"{run.signature}@{step}")
            for run, by_step in lines for step, line in sorted(by_step.items())
            if (steps is None or step in steps) and any(metric in line for metric in metrics)], metrics


def evaluations_table(runs: list[Run]) -> Table | None:
    """The table at steps (evaluation figures, runs in any state) where the runs were evaluated at two steps or
    more; None where they were evaluated once or never."""
    try:
        step_runs, metrics = runs_at_steps(runs, None, None)
    except UserError:  # no evaluation in any metrics.jsonl
        return None
    table = build_table(step_runs, metrics, at_steps=True)
    return table if len({row.key[-1] for row in table.rows}) > 1 else None


def curve_series(table: Table, metric: str) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """group label -> (steps, mean, std) over the runs of the group, at the steps every one of them logged;
    only groups with at least two such steps."""
    on_disk(table)
    series = {}
    for row in table.rows:
        curves = [run_curve(run.path, metric) for run in row.runs]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if len(steps) < 2:
            continue
        means = [statistics.fmean(c[s] for c in curves) for s in steps]
        stds = [statistics.stdev(c[s] for c in curves) if len(curves) > 1 else 0.0 for s in steps]
        series[row_label(table, row)] = (steps, means, stds)
    return series


def curve_figure(table: Table, metric: str) -> Figure:
    series = curve_series(table, metric)
    if not series:
        raise UserError(f"no run logs the metric {metric!r} at two steps or more in its metrics.jsonl")
    figure, axes = new_figure()
    for name, (steps, means, stds) in series.items():
        (line,) = axes.plot(steps, means, label=name, marker="o" if len(steps) <= 20 else None, markersize=3)  # sparse: show the points
        if any(stds):
            lower, upper = np.subtract(means, stds), np.add(means, stds)
            axes.fill_between(steps, lower, upper, color=line.get_color(), alpha=0.2, linewidth=0)
    seeded = any(len(row.runs) > 1 for row in table.rows)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("step")
    axes.set_ylabel(axis_label(metric))
    axes.set_title(f"{label(metric)} during training" + ("  (mean ± std over seeds)" if seeded else ""))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def usage_figure(table: Table) -> Figure:
    """The last evaluation's sorted code usage of every run, coloured by group; the dotted line of each
    codebook size is the uniform share 1/K."""
    figure, axes = new_figure()
    drawn, sizes = 0, set()
    for index, row in enumerate(table.rows):
        color = f"C{index % 10}"
        for n, run in enumerate(row.runs):
            steps = usage_steps(run.path)
            if not steps:
                continue
            step, path = next(reversed(steps.items()))
            counts = np.load(path)
            shares = sorted_frequencies(counts)
            sizes.add(len(counts))
            name = f"{row_label(table, row)} (step {step}, {len(shares)}/{len(counts)} codes used)" if n == 0 else None
            axes.loglog(np.arange(1, len(shares) + 1), shares, color=color, label=name, alpha=0.9)
            drawn += 1
    if not drawn:
        raise UserError("no run holds a code-usage histogram (usage/codes_step*.npy, written at each evaluation)")
    for size in sorted(sizes):
        axes.axhline(1 / size, color="gray", linestyle=":", linewidth=1)
        axes.annotate(f"uniform 1/{size}", (1, 1 / size), textcoords="offset points", xytext=(2, 2), fontsize="x-small", color="gray")
    axes.set_xlabel("code rank (most used first, log scale)")
    axes.set_ylabel("share of the tokens (log scale)")
    axes.set_title("sorted code usage at the last evaluation")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="x-small")
    return figure


def has_usage(table: Table) -> bool:
    return any(usage_steps(run.path) for run in on_disk(table))


def logged_metrics(table: Table) -> set[str]:
    """Every numeric key some run's metrics.jsonl holds."""
    return {key for run in on_disk(table) for line in logged_steps(run.path).values() for key in line}


def save_curve(table: Table, metric: str, out_dir: Path) -> Path:
    return save_figure(curve_figure(table, metric), out_dir / curve_name(metric))


def save_usage_plot(table: Table, out_dir: Path) -> Path:
    return save_figure(usage_figure(table), out_dir / USAGE_PLOT)

