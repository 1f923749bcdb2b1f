"""The sweep report: status, comparison tables and plots. A W&B Report (wandb-workspaces) when W&B can
be reached with credentials; in any case the same content as local Markdown and self-contained HTML."""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass
from pathlib import Path

from ibq.report.table import Table, axis_label, label, render_markdown, sampling_note

PIVOT_METRICS = ("codebook/utilization", "rfid")
QUANTIZER = "choices.quantizer"  # the quantizer choice in a run's W&B config (runs log their choices)
MEDIA_KEY = "media/reconstructions"


@dataclass
class Section:
    heading: str
    kind: str  # text | table | image | items
    content: object


AT_STEPS = "At the evaluated steps (mean ± std over the seeds there)"


def sections(title_lines: list[str], table: Table, plots: dict[str, Path], problems: list[str], heading: str = "Sweep",
             at_steps: Table | None = None) -> list[Section]:
    """`plots`: heading -> PNG; `heading` that of `title_lines`; `at_steps`: the table of the evaluations along
    training (curves.evaluations_table), where there is one."""
    parts = [Section(heading, "items", title_lines), Section("All metrics (mean ± std over seeds)", "table", (table.header, table.body(), len(table.factors)))]
    if "codebook_size" in table.factors and len(table.factors) > 1:
        for metric in PIVOT_METRICS:
            if metric in table.metrics and any(row.cell(metric).values for row in table.rows):
                header, body = table.pivot("codebook_size", metric)
                parts.append(Section(f"{label(metric)} by codebook size", "table", (header, body, len(table.factors) - 1)))
    if at_steps is not None:
        parts.append(Section(AT_STEPS, "table", (at_steps.header, at_steps.body(), len(at_steps.factors))))
    notes = measurement_notes(table)
    if notes:
        parts.append(Section("How the metrics were measured", "items", notes))
    parts += [Section(heading, "image", path) for heading, path in plots.items()]
    if problems:
        parts.append(Section("Jobs that did not complete", "items", problems))
    return parts


def measurement_notes(table: Table) -> list[str]:
    tokens = {r.results.get("codebook/tokens") for row in table.rows for r in row.runs} - {None}
    samples = {r.results.get("rfid/samples") for row in table.rows for r in row.runs} - {None, 0}
    notes = []
    if tokens:
        notes.append(
            f"Utilization counts the codes used over {', '.join(map(str, sorted(tokens)))} validation tokens; T tokens can use "
            "at most min(1, T/K) of K codes, and a uniform assignment about 1 - exp(-T/K) (column 'util. bound')."
        )
    if samples:
        notes.append(f"rFID over {', '.join(map(str, sorted(samples)))} images: comparable only between runs with the same count.")
    mixed = sampling_note(table)
    if mixed:
        notes.append(mixed + ".")
    return notes


def markdown(title: str, parts: list[Section], out_dir: Path) -> str:
    lines = [f"# {title}", ""]
    for part in parts:
        lines += [f"## {part.heading}", ""]
        if part.kind == "items":
            lines += [f"- {item}" for item in part.content]
        elif part.kind == "table":
            header, body, numeric_from = part.content
            lines.append(render_markdown(header, body, numeric_from))
        elif part.kind == "image":
            lines.append(f"![{part.heading}]({os.path.relpath(Path(part.content).resolve(), out_dir.resolve())})")
        lines.append("")
    return "\n".join(lines)


def html_cells(row: list, tag: str, numeric_from: int) -> str:
    return "".join(f"<{tag} class='{'num' if i >= numeric_from else 'txt'}'>{html.escape(str(c))}</{tag}>" for i, c in enumerate(row))


def html_page(title: str, parts: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for part in parts:
        body.append(f"<h2>{html.escape(part.heading)}</h2>")
        if part.kind == "items":
            body.append("<ul>" + "".join(f"<li>{html.escape(str(i))}</li>" for i in part.content) + "</ul>")
        elif part.kind == "table":
            header, rows, numeric_from = part.content
            body.append("<table><tr>" + html_cells(header, "th", numeric_from) + "</tr>"
                        + "".join(f"<tr>{html_cells(r, 'td', numeric_from)}</tr>" for r in rows) + "</table>")
        elif part.kind == "image":
            data = base64.b64encode(Path(part.content).read_bytes()).decode()
            body.append(f"<img alt='{html.escape(part.heading)}' src='data:image/png;base64,{data}'>")
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:.25em .6em}.num{text-align:right}.txt{text-align:left}img{max-width:100%}"
    )
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


def write_local(title: str, parts: list[Section], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(markdown(title, parts, out_dir))
    html_path.write_text(html_page(title, parts))
    return md_path, html_path


def wandb_report(title: str, description: str, table: Table, groups: list[str], project: str, entity: str | None, curves: list[str],
                 at_steps: Table | None = None):
    """The W&B Report object (not saved): the table as Markdown (and the table at the evaluated steps where there
    is one), then panels over the training runs of the sweeps' W&B groups (not their evaluations, which share the
    groups), grouped by quantizer: each final metric some run has against the codebook size (log axis), `curves`
    over the steps (mean with a std band per quantizer), and the reconstruction grids."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    group = expr.Metric("Group") == groups[0] if len(groups) == 1 else expr.Metric("Group").isin(groups)
    runset = wr.Runset(entity=entity or "", project=project, name=", ".join(groups), filters=[group, expr.Metric("JobType") == "train"],
                       groupby=[f"config.{QUANTIZER}"])
    size = wr.Config("quantizer.codebook_size")
    finals = [m for m in PIVOT_METRICS if m in table.metrics]
    panels = [wr.ScatterPlot(title=f"{label(m)} vs codebook size", x=size, y=wr.SummaryMetric(m), log_x=True) for m in finals]
    panels += [wr.LinePlot(title=f"{label(m)} during training", x="Step", y=[m], groupby=wr.Config(QUANTIZER), groupby_aggfunc="mean",
                           groupby_rangefunc="stddev", title_y=axis_label(m)) for m in curves]
    panels.append(wr.MediaBrowser(title="reconstructions (top: validation images, bottom: reconstructions)", media_keys=[MEDIA_KEY], num_columns=2))
    blocks = [wr.H1(text=title), wr.P(text=description), wr.MarkdownBlock(text=table.markdown())]
    if at_steps is not None:
        blocks += [wr.H2(text=AT_STEPS), wr.MarkdownBlock(text=at_steps.markdown())]
    blocks.append(wr.PanelGrid(runsets=[runset], panels=panels))
    options = {"entity": entity} if entity else {}
    return wr.Report(project=project, title=title[:128], description=description, blocks=blocks, **options)
