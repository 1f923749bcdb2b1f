"""A metric against one factor (e.g. utilization vs codebook size), one line per value of the other
factors (e.g. per quantizer), error bars = std over seeds. Figures are drawn without pyplot (no global
state, any backend) and saved as PNG."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ibq.errors import UserError
from ibq.report.table import Table, label, sort_key

BOUND = "codebook/utilization_bound"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def plot_name(metric: str, x: str) -> str:
    return f"{slug(metric)}_vs_{slug(x)}.png"


def default_x(table: Table) -> str:
    if not table.factors:
        raise UserError("the runs do not differ in any config-group choice or key: nothing to plot against")
    return "codebook_size" if "codebook_size" in table.factors else table.factors[0]


def numeric(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def series(table: Table, metric: str, x: str) -> dict[str, list[tuple[str, float, float | None]]]:
    """legend label -> [(x value, mean, std)] over the rows that report the metric."""
    at = table.factors.index(x)
    others = [i for i in range(len(table.factors)) if i != at]
    lines = defaultdict(list)
    for row in table.rows:
        cell = row.cell(metric)
        if cell.mean is None:
            continue
        name = ", ".join(f"{table.factors[i]}={row.key[i]}" for i in others) or label(metric)
        lines[name].append((row.key[at], cell.mean, cell.std))
    return {name: sorted(points, key=lambda p: sort_key(p[0])) for name, points in sorted(lines.items())}


def metric_figure(table: Table, metric: str, x: str) -> Figure:
    if x not in table.factors:
        raise UserError(f"--x {x}: not a factor of these runs; factors: {', '.join(table.factors) or 'none'}")
    lines = series(table, metric, x)
    if not lines:
        raise UserError(f"no run reports the metric {metric!r}")
    all_x = sorted({p[0] for points in lines.values() for p in points}, key=sort_key)
    positions = numeric(all_x)
    log_scale = positions is not None and min(positions) > 0 and max(positions) / min(positions) >= 8
    where = dict(zip(all_x, positions)) if positions is not None else {v: i for i, v in enumerate(all_x)}

    figure = Figure(figsize=(6.4, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, points in lines.items():
        xs = [where[p[0]] for p in points]
        errors = [p[2] or 0.0 for p in points]
        axes.errorbar(xs, [p[1] for p in points], yerr=errors if any(errors) else None, marker="o", capsize=3, label=name)
    if metric == "codebook/utilization":
        bound = series(table, BOUND, x)
        if bound:
            best = max(bound.values(), key=len)
            axes.plot([where[p[0]] for p in best], [p[1] for p in best], "k--", lw=1, label="uniform-assignment bound (tokens seen)")
        axes.set_ylim(0, 1.05)
    if log_scale:
        axes.set_xscale("log", base=2)
    axes.set_xticks(list(where.values()), labels=all_x)
    axes.minorticks_off()
    axes.set_xlabel(x)
    axes.set_ylabel(label(metric))
    axes.set_title(f"{label(metric)} vs {x}" + ("  (mean ± std over seeds)" if any(len(r.runs) > 1 for r in table.rows) else ""))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def save_plot(table: Table, metric: str, x: str, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / plot_name(metric, x)
    metric_figure(table, metric, x).savefig(path)
    return path
