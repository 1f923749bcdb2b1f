"""A metric against one factor (e.g. utilization vs codebook size), one series per value of the other
factors (e.g. per quantizer), error bars = std over seeds: lines over a numeric factor (codebook sizes on
a log2 axis), grouped points over a categorical one. Figures are drawn without pyplot (no global state,
any backend) and saved as PNG."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ibq.errors import UserError
from ibq.report.table import Table, axis_label, label, natural_key, readable, sort_key

BOUND = "codebook/utilization_bound"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def plot_name(metric: str, x: str) -> str:
    return f"{slug(metric)}_vs_{slug(x)}.png"


# The x axes of the paper's figures, where a table has them: utilization against the codebook's size, gFID
# against the guidance scale.
PREFERRED_X = ("codebook_size", "sampling.cfg_scale")


def default_x(table: Table) -> str:
    if not table.factors:
        raise UserError("the runs do not differ in any config-group choice or key: nothing to plot against")
    return next((x for x in PREFERRED_X if x in table.factors), table.factors[0])


def numeric(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def followers(table: Table, x: str) -> list[int]:
    """The other factors that take one value at each value of x (a stage-II sweep over tokenizer runs: the
    sizes `auto` derives from each run): they follow x along its axis rather than split it into series."""
    at = table.factors.index(x)
    values = defaultdict(set)
    for row in table.rows:
        for i, value in enumerate(row.key):
            values[i, row.key[at]].add(value)
    return [i for i in range(len(table.factors)) if i != at and all(len(values[i, row.key[at]]) == 1 for row in table.rows)]


def series(table: Table, metric: str, x: str) -> dict[str, list[tuple[str, float, float | None]]]:
    """legend label -> [(x value, mean, std)] over the rows that report the metric."""
    at, following = table.factors.index(x), followers(table, x)
    others = [i for i in range(len(table.factors)) if i != at and i not in following]
    lines = defaultdict(list)
    for row in table.rows:
        cell = row.cell(metric)
        if cell.mean is None:
            continue
        name = ", ".join(f"{table.factors[i]}={row.key[i]}" for i in others) or label(metric)
        lines[name].append((row.key[at], cell.mean, cell.std))
    return {name: sorted(points, key=lambda p: sort_key(p[0])) for name, points in sorted(lines.items(), key=lambda kv: natural_key(kv[0]))}


# A tick at each value of the factor up to this many; more (a search's sampled values) take matplotlib's ticks.
MOST_VALUE_TICKS = 10


def new_figure() -> tuple[Figure, object]:
    figure = Figure(figsize=(6.4, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def metric_figure(table: Table, metric: str, x: str) -> Figure:
    if x not in table.factors:
        raise UserError(f"--x {x}: not a factor of these runs; factors: {', '.join(table.factors) or 'none'}")
    lines = series(table, metric, x)
    if not lines:
        raise UserError(f"no run reports the metric {metric!r}")
    all_x = sorted({p[0] for points in lines.values() for p in points}, key=sort_key)
    positions = numeric(all_x)
    categorical = positions is None
    log_scale = not categorical and min(positions) > 0 and (x.endswith("codebook_size") or max(positions) / min(positions) >= 8)
    where = {v: i for i, v in enumerate(all_x)} if categorical else dict(zip(all_x, positions))

    figure, axes = new_figure()
    for index, (name, points) in enumerate(lines.items()):
        # categories: points side by side within each category, not joined by lines
        shift = 0.6 * (index / max(len(lines) - 1, 1) - 0.5) if categorical and len(lines) > 1 else 0.0
        xs = [where[p[0]] + shift for p in points]
        errors = [p[2] or 0.0 for p in points]
        axes.errorbar(xs, [p[1] for p in points], yerr=errors if any(errors) else None, marker="o", capsize=3, label=name,
                      linestyle="none" if categorical else "-")
    if metric == "codebook/utilization":
        bound = series(table, BOUND, x)
        if bound:
            best = max(bound.values(), key=len)
            axes.plot([where[p[0]] for p in best], [p[1] for p in best], "k--" if not categorical else "k_", lw=1, markersize=20,
                      label="uniform-assignment bound (tokens seen)")
        axes.set_ylim(0, 1.05)
    if log_scale:
        axes.set_xscale("log", base=2)
    following = followers(table, x)
    at_x = {row.key[table.factors.index(x)]: [row.key[i] for i in following] for row in table.rows}
    if categorical or following or len(all_x) <= MOST_VALUE_TICKS:
        shown = readable(all_x)
        axes.set_xticks(list(where.values()), labels=["\n".join([shown[value], *at_x[value]]) for value in all_x])
        axes.minorticks_off()
    if categorical:
        axes.set_xlim(-0.6, len(all_x) - 0.4)
    below = f" (under it: {', '.join(table.factors[i] for i in following)})" if following else ""
    axes.set_xlabel(x + below + (" (log2 scale)" if log_scale else ""))
    axes.set_ylabel(axis_label(metric))
    axes.set_title(f"{label(metric)} vs {x}" + ("  (mean ± std over seeds)" if any(len(r.runs) > 1 for r in table.rows) else ""))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def save_figure(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def save_plot(table: Table, metric: str, x: str, out_dir: Path) -> Path:
    return save_figure(metric_figure(table, metric, x), out_dir / plot_name(metric, x))
