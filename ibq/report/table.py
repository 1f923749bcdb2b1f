"""Comparison tables: completed runs grouped by what distinguishes them, metrics as mean ± std over
the runs of a group (the seeds).

What distinguishes runs (the factors) is found from the runs themselves, so that disk and W&B runs
are handled alike: the config-group choices that differ between runs (quantizer, codebook_size, ...),
then any config key that differs between runs with the same choices (e.g. optim.lr), except `seed`,
over which the table averages, and keys that do not change results (logging, paths, launcher)."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

from ibq.errors import UserError
from ibq.ledger.runs import Run
from ibq.runs.record import LAUNCH_CHOICES, NON_RESULT_KEYS

# results.json key -> (column label, decimals, direction: 1 higher is better, -1 lower is better, 0 neither)
METRICS = {
    "codebook/utilization": ("utilization", 4, 1),
    "codebook/utilization_bound": ("util. bound", 4, 0),
    "codebook/perplexity": ("perplexity", 1, 1),
    "rfid": ("rFID", 2, -1),
    "psnr": ("PSNR", 2, 1),
    "ssim": ("SSIM", 4, 1),
    "lpips": ("LPIPS", 4, -1),
    "gfid": ("gFID", 2, -1),
    "is": ("IS", 1, 1),
    "loss": ("loss", 4, -1),  # stage II's training loss at its last step
}
# Each shown where some run of the table reports it: stage I's, then stage II's (gFID and IS once ibq-eval
# has scored a run's samples).
DEFAULT_METRICS = ["codebook/utilization", "codebook/utilization_bound", "codebook/perplexity", "rfid", "psnr", "ssim", "lpips",
                   "gfid", "is", "loss"]
UNITS = {"psnr": "dB", "throughput/images_per_s": "images/s", "throughput/data_wait_share": "share of step time"}
AVERAGED = "seed"
STEP = "step"
FACTOR_ORDER = ("quantizer", "codebook_size", "model_scale", "data", "experiment")


def column_format(metric: str) -> tuple[str, int, int]:
    """(label, decimals, direction). A metric that ibq-eval recorded under a set's name (coco/rfid) is formatted
    as the metric itself, its label led by the name (coco rFID)."""
    if metric in METRICS:
        return METRICS[metric]
    dataset, _, base = metric.partition("/")
    if base in METRICS:
        base_label, digits, direction = METRICS[base]
        return f"{dataset} {base_label}", digits, direction
    return metric, 4, 0


def label(metric: str) -> str:
    return column_format(metric)[0]


def decimals(metric: str) -> int:
    return column_format(metric)[1]


def direction(metric: str) -> int:
    return column_format(metric)[2]


def unit(metric: str) -> str | None:
    return UNITS.get(metric) or UNITS.get(metric.partition("/")[2])


def axis_label(metric: str) -> str:
    """The metric's label with its unit, for plots: PSNR (dB)."""
    return f"{label(metric)} ({unit(metric)})" if unit(metric) else label(metric)


def natural_key(text: str) -> list:
    """Numbers inside text in numeric order: 'codebook_size=256' before 'codebook_size=1024'."""
    return [(0, float(part), "") if part.isdigit() else (1, 0.0, part) for part in re.split(r"(\d+)", str(text)) if part]


def sort_key(value) -> tuple:
    """Numbers in numeric order (256 < 1024), before text."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def ignored_key(key: str) -> bool:
    return key == AVERAGED or any(key == k or key.startswith(k + ".") for k in NON_RESULT_KEYS) or key.startswith("hydra.")


def factors_of(runs: list[Run]) -> list[str]:
    """A key missing from some runs (a run older than a config group or key) only counts where present. The
    choices first, then config keys, `step` (a sampling's checkpoint, a row of a table at steps) last."""
    choice_keys = {k for run in runs for k in run.choices} - set(LAUNCH_CHOICES)
    varying = [k for k in choice_keys if len({run.choices[k] for run in runs if k in run.choices}) > 1]
    varying.sort(key=lambda k: (FACTOR_ORDER.index(k) if k in FACTOR_ORDER else len(FACTOR_ORDER), k))
    same_choices = defaultdict(list)
    for run in runs:
        same_choices[tuple(run.choices.get(k) for k in sorted(choice_keys))].append(run)
    keys = set()
    for members in same_choices.values():
        for key in set().union(*(m.config for m in members)):
            if not ignored_key(key) and len({repr(m.config[key]) for m in members if key in m.config}) > 1:
                keys.add(key)
    return varying + sorted(keys, key=lambda key: (key == STEP, key))


def factor_value(run: Run, factor: str) -> str:
    value = run.choices[factor] if factor in run.choices else run.config.get(factor)
    return str(value)


def same_value(value, given: str) -> bool:
    """A run's value as a command line gives it: 1e-4 is 0.0001, true is True."""
    if str(value).lower() == given.lower():
        return True
    try:
        return math.isclose(float(value), float(given), rel_tol=1e-9)
    except ValueError:  # not a number
        return False


def selected(runs: list[Run], conditions: list[str]) -> list[Run]:
    """The runs whose value of each condition's key (KEY=VALUE or KEY=VALUE,VALUE: a config-group choice,
    codebook_size, or a config key such as optim.lr) is one of its values."""
    for condition in conditions:
        key, _, values = condition.partition("=")
        if not key or not values:
            raise UserError(f"--where {condition!r}: give KEY=VALUE or KEY=VALUE,VALUE, e.g. --where codebook_size=1024,16384")
        having = [run for run in runs if key in run.choices or key in run.config]
        if not having:
            raise UserError(f"--where {condition}: no run has the key {key!r}; give a config group, codebook_size or a config key "
                            f"(e.g. quantizer, optim.lr)")
        kept = [run for run in having if any(same_value(factor_value(run, key), given) for given in values.split(","))]
        if not kept:
            found = sorted({factor_value(run, key) for run in having}, key=sort_key)
            raise UserError(f"--where {condition}: no run has that value of {key}; its values: {', '.join(found)}")
        runs = kept
    return runs


def readable(values) -> dict[str, str]:
    """Each of a factor's values as a table or a plot shows it: a search's sampled numbers (0.0012520653814999472)
    to 4 significant digits, unless two of them would then read alike. CSV keeps them whole."""
    def short(value: str) -> str:
        try:
            number = float(value)
        except ValueError:
            return value
        return value if len(value) <= 8 else f"{number:.4g}"

    shown = {value: short(value) for value in set(values)}
    return shown if len(set(shown.values())) == len(shown) else {value: value for value in shown}


@dataclass
class Cell:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def text(self, digits: int) -> str:
        if not self.values:
            return "–"
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass
class Row:
    key: tuple[str, ...]
    runs: list[Run] = field(default_factory=list)

    def cell(self, metric: str) -> Cell:
        return Cell([v for v in (number((run.results or {}).get(metric)) for run in self.runs) if v is not None])


@dataclass
class Table:
    factors: list[str]
    metrics: list[str]
    rows: list[Row]

    @property
    def header(self) -> list[str]:
        return self.factors + ["runs"] + [label(m) for m in self.metrics]

    @cached_property
    def shown(self) -> dict[str, dict[str, str]]:
        """Each factor's values as read (`readable`)."""
        return {factor: readable(row.key[at] for row in self.rows) for at, factor in enumerate(self.factors)}

    def shown_key(self, key: tuple[str, ...], factors: list[str] | None = None) -> list[str]:
        """A row's (or a pivot's row's) factor values as read."""
        factors = self.factors if factors is None else factors
        return [self.shown[factor][value] for factor, value in zip(factors, key)]

    def sorted_by(self, metric: str) -> Table:
        """The rows best first by `metric`'s mean (by its direction; ascending where it has none), rows without
        it last; ties keep their order."""
        sign = -1 if direction(metric) > 0 else 1

        def rank(row: Row) -> tuple[bool, float]:
            mean = row.cell(metric).mean
            return mean is None, 0.0 if mean is None else sign * mean

        return Table(self.factors, self.metrics, sorted(self.rows, key=rank))

    def body(self) -> list[list[str]]:
        return [self.shown_key(row.key) + [str(len(row.runs))] + [row.cell(m).text(decimals(m)) for m in self.metrics] for row in self.rows]

    def terminal(self) -> str:
        return render_terminal(self.header, self.body(), numeric_from=len(self.factors))

    def markdown(self) -> str:
        return render_markdown(self.header, self.body(), numeric_from=len(self.factors))

    def csv(self) -> str:
        """One line per group: factors, runs, then <metric>_mean, <metric>_std, <metric>_n for every metric."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.factors + ["runs"] + [f"{m}_{s}" for m in self.metrics for s in ("mean", "std", "n")])
        for row in self.rows:
            cells = [row.cell(m) for m in self.metrics]
            writer.writerow(list(row.key) + [len(row.runs)] + [v for c in cells for v in (fmt_csv(c.mean), fmt_csv(c.std), c.n)])
        return out.getvalue()

    def pivot_cells(self, column: str, metric: str) -> tuple[list[str], list[str], list[tuple[tuple, dict[str, Cell]]]]:
        """(row factors, values of `column`, [(row key, {column value: cell})]) for `metric`."""
        if column not in self.factors:
            raise UserError(f"--columns {column}: not a factor of these runs; factors: {', '.join(self.factors) or 'none (all runs alike)'}")
        at = self.factors.index(column)
        columns = sorted({row.key[at] for row in self.rows}, key=sort_key)
        grid: dict[tuple, dict[str, Cell]] = defaultdict(dict)
        for row in self.rows:
            grid[row.key[:at] + row.key[at + 1 :]][row.key[at]] = row.cell(metric)
        ordered = sorted(grid.items(), key=lambda kv: [sort_key(v) for v in kv[0]])
        return [f for f in self.factors if f != column], columns, ordered

    def pivot(self, column: str, metric: str) -> tuple[list[str], list[list[str]]]:
        """`metric` with the values of the factor `column` as columns and the other factors as rows."""
        row_factors, columns, grid = self.pivot_cells(column, metric)
        header = (row_factors or [""]) + [f"{column}={self.shown[column][c]}" for c in columns]
        empty = Cell([])
        body = [(self.shown_key(key, row_factors) or ["all"]) + [cells.get(c, empty).text(decimals(metric)) for c in columns] for key, cells in grid]
        return header, body

    def pivot_csv(self, column: str) -> str:
        """Every metric pivoted on `column`: one line per metric and row, <value>_mean/_std/_n per column value."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        for index, metric in enumerate(self.metrics):
            row_factors, columns, grid = self.pivot_cells(column, metric)
            if index == 0:
                writer.writerow(["metric"] + row_factors + [f"{column}={c}_{s}" for c in columns for s in ("mean", "std", "n")])
            for key, cells in grid:
                values = [cells.get(c, Cell([])) for c in columns]
                writer.writerow([metric, *key] + [v for cell in values for v in (fmt_csv(cell.mean), fmt_csv(cell.std), cell.n)])
        return out.getvalue()

    def latex(self) -> str:
        """A booktabs tabular: mean ± std per metric, the best value of each column in bold."""
        keys = [self.shown_key(row.key) + [str(len(row.runs))] for row in self.rows]
        cells = [[row.cell(m) for m in self.metrics] for row in self.rows]
        return render_latex(self.factors + ["runs"], [label(m) for m in self.metrics], keys, cells, self.metrics, text_columns=len(self.factors))

    def pivot_latex(self, column: str, metric: str) -> str:
        row_factors, columns, grid = self.pivot_cells(column, metric)
        cells = [[row.get(c, Cell([])) for c in columns] for _, row in grid]
        return render_latex(row_factors or [""], [f"{column}={self.shown[column][c]}" for c in columns],
                            [self.shown_key(key, row_factors) or ["all"] for key, _ in grid],
                            cells, [metric] * len(columns), text_columns=max(1, len(row_factors)))


LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {"~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def latex_text(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(c, c) for c in str(text))


def latex_cell(cell: Cell, digits: int, best: bool) -> str:
    if not cell.values:
        return "--"
    value = f"{cell.mean:.{digits}f}" + (f" \\pm {cell.std:.{digits}f}" if cell.std is not None else "")
    return f"$\\mathbf{{{value}}}$" if best else f"${value}$"


def render_latex(key_header: list[str], metric_header: list[str], keys: list[list[str]], cells: list[list[Cell]],
                 metrics: list[str], text_columns: int) -> str:
    """A booktabs `tabular` (needs \\usepackage{booktabs}): key columns, then one column of mean ± std per
    metric; in each metric column the best mean is bold, higher or lower by the metric's direction (none for
    a metric without one, such as the utilization bound, or where all values are alike). Arrows in the header say which way is better."""
    arrows = {1: " $\\uparrow$", -1: " $\\downarrow$", 0: ""}
    best = []
    for j, metric in enumerate(metrics):
        means = [row[j].mean for row in cells if row[j].mean is not None]
        # none when the values are all alike: bold then says nothing
        best.append(max(direction(metric) * m for m in means) if len(set(means)) > 1 and direction(metric) else None)
    spec = "l" * text_columns + "r" * (len(key_header) - text_columns + len(metric_header))
    header = [latex_text(h) for h in key_header] + [latex_text(h) + arrows[direction(m)] for h, m in zip(metric_header, metrics)]
    lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule", " & ".join(header) + " \\\\", "\\midrule"]
    for key, row in zip(keys, cells):
        texts = [latex_text(k) for k in key]
        for j, cell in enumerate(row):
            is_best = best[j] is not None and cell.mean is not None and direction(metrics[j]) * cell.mean == best[j]
            texts.append(latex_cell(cell, decimals(metrics[j]), is_best))
        lines.append(" & ".join(texts) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines)


def fmt_csv(value: float | None) -> str:
    return "" if value is None else repr(value)


def sampling_note(table: Table) -> str | None:
    """Where the table's gFID or IS were scored at different sampling settings (each run's eval/sampling, seed
    aside), a line saying which: its rows then compare the settings as much as the runs."""
    scored = [run for row in table.rows for run in row.runs
              if any(metric in table.metrics and number(run.results.get(metric)) is not None for metric in ("gfid", "is"))]
    settings = [{k: v for k, v in (run.results.get("eval/sampling") or {}).items() if k != "seed"} for run in scored]
    kinds = {json.dumps(s, sort_keys=True) for s in settings}
    if len(kinds) < 2:
        return None
    differing = sorted({key for s in settings for key in s if len({json.dumps(t.get(key)) for t in settings}) > 1})
    counts = defaultdict(int)
    for s in settings:
        counts[", ".join(f"{key}={s[key]}" for key in differing if key in s) or "not recorded"] += 1
    told = "; ".join(f"{text} ({n} run{'s' if n > 1 else ''})" for text, n in sorted(counts.items(), key=lambda kv: natural_key(kv[0])))
    return (f"gFID and IS were scored at different sampling settings: {told}; compare settings on one run with a sweep of "
            f"ibq-sample (ibq-sweep table <its folder>)")


def build_table(runs: list[Run], metrics: list[str] | None = None, at_steps: bool = False) -> Table:
    """Completed runs only; `metrics`: None for the defaults that some run reports, else each must be reported
    by some run. `at_steps`: the runs are a run at each step it was evaluated (curves.runs_at_steps), in any
    state (the figures of a step stand whatever became of the run after it), and the step is a factor even
    where it is one for all."""
    done = dedupe([run for run in runs if run.completed or (at_steps and run.results is not None)])
    if not done:
        raise UserError("no completed run with results.json to compare (see `ibq-sweep status`)")
    if metrics is None:  # the defaults that some run reports: no all-empty column
        metrics = [m for m in DEFAULT_METRICS if any(number(run.results.get(m)) is not None for run in done)]
    else:
        reported = sorted({k for run in done for k, v in run.results.items() if number(v) is not None})
        for metric in metrics:
            if not any(number(run.results.get(metric)) is not None for run in done):
                raise UserError(f"no run reports the metric {metric!r}; reported: {', '.join(reported)}")
    factors = factors_of(done)
    if at_steps and STEP not in factors:
        factors.append(STEP)
    rows: dict[tuple[str, ...], Row] = {}
    for run in done:
        key = tuple(factor_value(run, f) for f in factors)
        rows.setdefault(key, Row(key)).runs.append(run)
    ordered = sorted(rows.values(), key=lambda row: [sort_key(v) for v in row.key])
    return Table(factors, list(metrics), ordered)


def dedupe(runs: list[Run]) -> list[Run]:
    """One run per signature (a job re-run elsewhere must not count twice in the mean)."""
    seen, unique = set(), []
    for run in runs:
        if run.signature:
            if run.signature in seen:
                continue
            seen.add(run.signature)
        unique.append(run)
    return unique


def render_terminal(header: list[str], body: list[list[str]], numeric_from: int = 0) -> str:
    widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i >= numeric_from else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body])


def render_markdown(header: list[str], body: list[list[str]], numeric_from: int = 0) -> str:
    align = ["---:" if i >= numeric_from else ":---" for i in range(len(header))]
    rows = [header, align] + body
    return "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows)
