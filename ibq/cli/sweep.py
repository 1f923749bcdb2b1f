"""`ibq-sweep`: the ledger of a sweep, before and after launch.

  ibq-sweep plan codebook_scaling model_scale=tiny     jobs, signatures, already-completed ones, device-hours
  ibq-sweep launch codebook_scaling model_scale=tiny   run the jobs that have not completed anywhere yet
  ibq-sweep status outputs/multirun/<time>             done / running / failed / preempted / interrupted per job
  ibq-sweep table  outputs/multirun/<time>             metrics by quantizer x codebook size, mean ± std over seeds
  ibq-sweep table  outputs/multirun/<A> <B>            several sweeps in one table (plot, report and status too)
  ibq-sweep table  <AR run>/samples/multirun_<time>    a sweep of ibq-sample: gFID and IS by guidance scale (plot, report too)
  ibq-sweep plot   outputs/multirun/<time>             utilization (and rFID) vs codebook size, loss curves, PNG + W&B
  ibq-sweep diff   RUN_DIR RUN_DIR [RUN_DIR ...]       config keys that differ, then the metrics side by side
  ibq-sweep retry  outputs/multirun/<time>             relaunch the failed / preempted / interrupted / missing jobs
  ibq-sweep report outputs/multirun/<time>             W&B Report when online, else report.md + report.html
"""

from __future__ import annotations

import argparse
import json
import shlex
import string
import sys
import time
from pathlib import Path

from ibq.errors import UserError

DEFAULT_RUNS = Path("outputs")
ENTRY_SCRIPTS = {"train": "ibq-train", "train_ar": "ibq-train-ar"}  # the apps whose sweeps the ledger reads (ibq.config.APPS)
# By the kind of run (run.json's `kind`): (final values against the x factor, curves over the steps where runs
# logged them at two steps or more).
PLOT_METRICS = {"tokenizer": (("codebook/utilization", "rfid"), ("loss/g", "codebook/utilization")),
                "generator": (("gfid",), ("loss",))}
SAMPLING_PLOT_METRICS = ("gfid", "is")  # of a sweep of ibq-sample, against the x factor


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def shown(overrides: list[str]) -> str:
    return " ".join(o.replace('"', "") for o in overrides)


def command_line(plan) -> str:
    """The sweep's command as a shell takes it: an override quoted for Hydra (a run directory with '=' in it) keeps
    its quotes inside the shell's."""
    return f"{ENTRY_SCRIPTS[plan.config_name]} -m {shlex.join(plan.hydra_overrides + plan.arguments)}"


def hours(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def print_table(header: list[str], body: list[list[str]], numeric: set[int] = frozenset()) -> None:
    widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths]] + body:
        print("  ".join(str(c).rjust(w) if i in numeric else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())


# -- plan / launch -------------------------------------------------------------------------------------
def plan_arguments(items: list[str], config_name: str) -> list[str]:
    from ibq.ledger.plan import sweep_arguments

    if items and "=" not in items[0] and not items[0].startswith("~"):  # a sweep's name, not an override (~key deletes)
        return sweep_arguments(items[0], config_name) + items[1:]
    if not items:
        raise UserError("nothing to plan: name a sweep (e.g. codebook_scaling) and/or give overrides")
    return items


def search_roots(args) -> list[Path]:
    return [DEFAULT_RUNS, *map(Path, args.runs or [])]


def show_plan(plan, completed: dict) -> None:
    new = [j for j in plan.jobs if j.signature not in completed]
    print(f"plan: {command_line(plan)}")
    print(f"  {len(plan.jobs)} jobs: {len(plan.jobs) - len(new)} already completed, {len(new)} to run")
    common = plan.common_overrides()
    if common:
        print(f"  every job: {shown(common)}")
    estimates = [j.estimate for j in new if j.estimate]
    known = [e for e in estimates if e.device_hours is not None]
    if estimates:
        unknown = len(estimates) - len(known)
        print(f"  estimate for the jobs to run: {hours(sum(e.device_hours for e in known))} device-hours"
              + (f" ({unknown} job(s) without a known step cost not included)" if unknown else ""))
        for source in dict.fromkeys(e.source for e in known):
            print(f"    from: {source}")
        walls = {(round(e.device_hours / e.devices * 60), e.time_limit_min) for e in known if e.time_limit_min and e.devices}
        for wall_min, limit in sorted(walls):
            if wall_min > limit:
                print(f"  a job needs ~{wall_min:,.0f} min of wall time: {wall_min / limit:.1f} allocations of the {limit} min limit (requeues)")
    body = []
    for job in plan.jobs:
        done_at = completed.get(job.signature)
        own = [o for o in job.overrides if o not in common]
        est = job.estimate.device_hours if job.estimate and not done_at else None
        body.append([str(job.index), "done" if done_at else "new", job.signature or "at start", hours(est), shown(own) + (f"  -> {done_at}" if done_at else "")])
    print_table(["#", "state", "signature", "device-h", "overrides"], body, numeric={0, 3})


def cmd_plan(args) -> int:
    from ibq.ledger.cost import measured_throughput
    from ibq.ledger.plan import expand
    from ibq.ledger.runs import completed_runs

    started = time.perf_counter()
    plan = expand(plan_arguments(args.items, args.config), config_name=args.config, measured=measured_throughput(search_roots(args)))
    completed = {sig: str(path) for sig, path in completed_runs(search_roots(args)).items()}
    show_plan(plan, completed)
    print(f"(planned in {time.perf_counter() - started:.1f} s; completed runs searched in {', '.join(map(str, search_roots(args)))})")
    if args.sbatch:
        from ibq.ledger.sbatch import sweep_sbatch

        print(f"the job array's sbatch options (Slurm is not asked):\n{sweep_sbatch(plan_arguments(args.items, args.config), args.config, len(plan.jobs))}")
    return 0


def cmd_launch(args) -> int:
    from ibq.ledger.cost import measured_throughput
    from ibq.ledger.launch import relaunch
    from ibq.ledger.plan import expand
    from ibq.ledger.runs import completed_runs
    from ibq.ledger.sweep import LEDGER_FILE, JobStatus, Sweep

    plan = expand(plan_arguments(args.items, args.config), config_name=args.config, measured=measured_throughput(search_roots(args)))
    completed = {sig: str(path) for sig, path in completed_runs(search_roots(args)).items()}
    show_plan(plan, completed)
    directory = Path(args.dir or plan.sweep_dir)
    if (directory / LEDGER_FILE).exists() or (directory / "multirun.yaml").exists():
        raise UserError(f"{directory} already holds a sweep: `ibq-sweep retry {directory}` completes it")
    todo = [JobStatus(job, None, "missing") for job in plan.jobs if job.signature not in completed]
    plan.sweep_dir = str(directory)
    reused = {job.signature: completed[job.signature] for job in plan.jobs if job.signature in completed}
    if args.dry_run:
        print(f"dry run: would run {len(todo)} job(s) into {directory}")
        return 0
    directory.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(directory, plan, [], todo, reused)
    if not todo:
        sweep.save_ledger()  # the sweep directory then lists (and tables) the completed runs it reuses
        print(f"nothing to run: every job has completed; the sweep's ledger: {directory / LEDGER_FILE}")
        return 0
    print(f"launching {len(todo)} job(s) into {directory}")
    return report_launch(relaunch(sweep, todo), directory)


def report_launch(results, directory: Path) -> int:
    failed = [status for status, code in results if code != 0]
    print(f"{len(results) - len(failed)} of {len(results)} job(s) finished; `ibq-sweep status {directory}` for details")
    return 1 if failed else 0


# -- status / retry ------------------------------------------------------------------------------------
def load(directory: str, args):
    from ibq.ledger.sweep import load_sweep

    return load_sweep(Path(directory), search_roots(args))


def cmd_status(args) -> int:
    if args.source == "wandb":
        return wandb_status(args)
    for i, directory in enumerate(args.sweep_dirs):
        if i:
            print()
        sweep_status(directory, args)
    return 0


def sweep_status(directory: str, args) -> None:
    from ibq.ledger.sweep import RETRYABLE, OtherAppSweep, progress

    try:
        sweep = load(directory, args)
    except OtherAppSweep as other:
        other_app_status(other.directory)
        return
    counts = ", ".join(f"{n} {state}" for state, n in sweep.counts().items())
    print(f"sweep {sweep.directory} (W&B group {sweep.group}): {len(sweep.jobs)} jobs: {counts}")
    for note in sweep.notes:
        print(f"  note: {note}")
    common = sweep.plan.common_overrides() if sweep.plan else []
    if common:
        print(f"  every job: {shown(common)}")
    body = []
    for status in sweep.jobs:
        index = str(status.job.index) if status.job else "-"
        own = [o for o in status.overrides if o not in common]
        body.append([index, status.state, progress(status), status.signature or "", shown(own), status.reason])
    print_table(["#", "state", "progress", "signature", "overrides", "note"], body, numeric={0, 2})
    retryable = [s for s in sweep.jobs if s.state in RETRYABLE]
    if retryable:
        print(f"{len(retryable)} job(s) can be relaunched: ibq-sweep retry {sweep.directory}")


def other_app_status(directory: Path) -> None:
    """A sweep of ibq-tokenize, ibq-sample or ibq-eval: the outcome each job recorded as it ended (cli.callbacks)."""
    from omegaconf import OmegaConf

    from ibq.cli.callbacks import count_jobs, outcome_lines
    from ibq.runs.record import job_records

    records, multirun = job_records(directory), directory / "multirun.yaml"  # none from a search sweeper
    total = (count_jobs(OmegaConf.load(multirun)) if multirun.is_file() else None) or len(records)
    print("\n".join(outcome_lines(directory, records, total, "not ended yet (pending, running, or ended without an outcome: see .submitit/)")))


def wandb_status(args) -> int:
    from ibq.ledger.wandb_source import wandb_runs

    for i, group in enumerate(wandb_groups(args)):
        runs = wandb_runs(group, args.project or "ibq", args.entity)
        print(("\n" if i else "") + f"W&B group {group}: {len(runs)} runs")
        body = [[run.name, run.status, run.signature or "", " ".join(f"{k}={v}" for k, v in sorted(run.choices.items()))] for run in runs]
        print_table(["run", "state", "id", "choices"], body)
    return 0


def cmd_retry(args) -> int:
    from ibq.ledger.launch import relaunch
    from ibq.ledger.sweep import RETRYABLE

    sweep = load(args.sweep_dir, args)
    targets = [s for s in sweep.jobs if s.state in RETRYABLE]
    if not targets:
        print(f"nothing to retry in {sweep.directory}: " + ", ".join(f"{n} {state}" for state, n in sweep.counts().items()))
        return 0
    for status in targets:
        print(f"  {status.state:<11} {shown(status.overrides)}" + (f"  ({status.reason})" if status.reason else ""))
    if args.dry_run:
        print(f"dry run: would relaunch {len(targets)} job(s)")
        return 0
    print(f"relaunching {len(targets)} job(s) into {sweep.directory}")
    return report_launch(relaunch(sweep, targets), sweep.directory)


# -- table / plot / report -----------------------------------------------------------------------------
def wandb_groups(args) -> list[str]:
    """The W&B groups named on the command line: a sweep folder stands for its runs' group."""
    from ibq.ledger.sweep import load_sweep
    from ibq.ledger.wandb_source import require_online

    require_online("--source wandb")
    return list(dict.fromkeys(load_sweep(Path(target)).group if Path(target).is_dir() else target for target in args.sweep_dirs))


def compared_runs(args):
    """(runs, comparison or None, groups): the runs of the sweep folders, or with --source wandb of the W&B groups,
    completed or not; `comparison` holds the folders' sweeps (None for W&B)."""
    from ibq.report.table import selected

    if args.source == "wandb":
        from ibq.ledger.wandb_source import wandb_runs

        groups = wandb_groups(args)
        return selected([run for group in groups for run in wandb_runs(group, args.project or "ibq", args.entity)], args.where or []), None, groups
    from ibq.ledger.sweep import load_comparison

    comparison = load_comparison([Path(d) for d in args.sweep_dirs], search_roots(args))
    comparison.runs = selected(comparison.runs, args.where or [])
    return comparison.runs, comparison, comparison.groups


def sweeps_text(groups: list[str]) -> str:
    """'sweep g', 'sweeps g, h', or for many '12 sweeps (g, …, z)'."""
    if len(groups) > 3:
        return f"{len(groups)} sweeps ({groups[0]}, …, {groups[-1]})"
    return f"sweep{'s' * (len(groups) > 1)} {', '.join(groups)}"


def repeats_text(repeats: int) -> str:
    return (f"{repeats} completed run(s) repeat the configuration (signature) of a run listed before them, in the same folder or one "
            f"given earlier, and are not counted")


def metric_list(text: str | None) -> list[str] | None:
    return [m.strip() for m in text.split(",") if m.strip()] if text else None


def step_list(text: str) -> list[int] | None:
    """--steps: None for every evaluated step (all), else the steps given."""
    if text == "all":
        return None
    try:
        return [int(step) for step in text.split(",")]
    except ValueError:
        raise UserError(f"--steps {text}: give all (every evaluated step) or steps as integers, e.g. --steps 50000,100000") from None


def cmd_table(args) -> int:
    from ibq.ledger.sweep import search_outcome
    from ibq.report.table import build_table, render_markdown, render_terminal, sampling_note

    at_steps = args.steps is not None
    if at_steps:
        steps = step_list(args.steps)
        if args.source == "wandb":
            raise UserError("--steps reads the runs' metrics.jsonl: leave out --source wandb")
    runs, comparison, groups = compared_runs(args)
    if at_steps:
        from ibq.report.curves import runs_at_steps

        if comparison.samplings:
            raise UserError(f"--steps follows training runs along their metrics.jsonl, and {comparison.sweeps[0].directory} holds samplings of "
                            f"ibq-sample: a sampling sweep over step= is a table by step without it")
        runs, metrics = runs_at_steps(runs, metric_list(args.metrics), steps)
    else:
        metrics = metric_list(args.metrics)
    table = build_table(runs, metrics, at_steps)
    if args.sort:
        if args.columns:
            raise UserError(f"--sort {args.sort} orders the rows of one table, and --columns {args.columns} makes a table per metric "
                            f"whose rows are the other factors: give one of the two")
        if args.sort not in table.metrics:  # shown too, so that the order can be read
            table = build_table(runs, table.metrics + [args.sort], at_steps)
        table = table.sorted_by(args.sort)
    if args.columns and args.format == "csv":
        text = table.pivot_csv(args.columns)
    elif args.columns and args.format == "latex":
        text = "\n\n".join(f"% {metric}\n{table.pivot_latex(args.columns, metric)}" for metric in table.metrics)
    elif args.columns:
        render = render_markdown if args.format == "markdown" else render_terminal
        text = "\n\n".join(f"{metric}\n{render(*table.pivot(args.columns, metric), numeric_from=len(table.factors) - 1)}" for metric in table.metrics)
    else:
        text = {"terminal": table.terminal, "markdown": table.markdown, "csv": table.csv, "latex": table.latex}[args.format]()
    if args.output:
        Path(args.output).write_text(text if text.endswith("\n") else text + "\n")
        print(f"wrote {args.output}")
        return 0
    if args.format == "terminal":
        runs_done = len({run.location for row in table.rows for run in row.runs})
        compared = ("run" if at_steps else "scored sampling" if comparison is not None and comparison.samplings else "completed run")
        rows = len(table.rows)
        where = f" where {' '.join(args.where)}" if args.where else ""
        grouped = (f"at {len({row.key[-1] for row in table.rows})} evaluated step(s) in {rows} row{'s' * (rows != 1)} (mean ± std over "
                   f"the runs of a row: its seeds; a run still training or stopped counts at the steps it reached)" if at_steps else
                   f"in {rows} group{'s' * (rows != 1)} (mean ± std over the runs of a group: its seeds)")
        print(f"{sweeps_text(groups)}{where}: {runs_done} {compared}{'s' * (runs_done != 1)} {grouped}")
    print(text.rstrip("\n"))  # csv ends in a newline: no empty last line
    if args.format != "terminal":
        return 0
    if mixed := sampling_note(table):
        print(f"note: {mixed}")
    if comparison is not None and comparison.repeats:
        print(f"note: {repeats_text(comparison.repeats)}")
    sweeps = comparison.sweeps if comparison is not None else []
    for line in search_outcome([sweep.directory for sweep in sweeps]):
        print(line)
    for sweep in sweeps if not at_steps else []:
        unfinished = [s for s in sweep.jobs if s.state != "done"]
        if unfinished:
            print(f"({len(unfinished)} job(s) not completed and not in the table: ibq-sweep status {sweep.directory})")
    return 0


def output_dir(comparison, groups: list[str], name: str, chosen: str | None = None) -> Path:
    """`chosen` (--out), else <sweep dir>/<name> for one sweep folder, else outputs/analysis/<analysis group>/<name>
    (several folders, or runs from W&B)."""
    from ibq.ledger.sweep import analysis_group

    if chosen:
        return Path(chosen)
    if comparison is not None and len(comparison.sweeps) == 1:
        return comparison.sweeps[0].directory / name
    return DEFAULT_RUNS / "analysis" / analysis_group(groups) / name


def wandb_project(runs) -> str:
    for run in runs:
        project = run.config.get("logger.project")
        if project:
            return str(project)
    return "ibq"


def default_plot_metrics(table) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(final, curve) metrics drawn by default: those of the kinds of run in the table (all where a run's kind is
    unknown, as for runs read from W&B), so that a tokenizer sweep is not told it has no gFID."""
    kinds = {run.record.get("kind") for row in table.rows for run in row.runs}
    chosen = [PLOT_METRICS[kind] for kind in PLOT_METRICS if kind in kinds] if kinds <= PLOT_METRICS.keys() else PLOT_METRICS.values()
    return tuple(m for final, _ in chosen for m in final), tuple(dict.fromkeys(m for _, curves in chosen for m in curves))


def search_objectives(table) -> tuple[str, ...]:
    """What a search's trials returned to its sweeper (their `objectives`): drawn against x by default too."""
    names: dict[str, None] = {}
    for row in table.rows:
        for run in row.runs:
            names.update(dict.fromkeys(json.loads(run.config.get("objectives") or "[]")))
    return tuple(names)


def make_plots(table, metrics: list[str] | None, x: str | None, out: Path, usage: bool = False, samplings: bool = False) -> dict[str, Path]:
    """Final values against `x` for the metrics runs report in results.json, curves over the steps for those
    they logged in metrics.jsonl (both where both), and with `usage` the sorted code usage. `metrics` None:
    the defaults (of training runs, or with `samplings` gFID and IS), each drawn where some run has it; a
    metric asked for must be somewhere. Returns heading -> PNG."""
    from ibq.report.curves import curve_series, logged_metrics, save_curve, save_usage_plot
    from ibq.report.plot import default_x, save_plot
    from ibq.report.table import label, number

    on_disk = all(run.path is not None for row in table.rows for run in row.runs)
    logged = logged_metrics(table) if on_disk else set()
    paths = {}
    final_metrics, curve_metrics = (SAMPLING_PLOT_METRICS, ()) if samplings else default_plot_metrics(table)
    final_metrics = tuple(dict.fromkeys(final_metrics + search_objectives(table)))
    for metric in metrics or dict.fromkeys(final_metrics + curve_metrics):
        final = (bool(metrics) or metric in final_metrics) and any(row.cell(metric).values for row in table.rows)
        curve = (bool(metrics) or metric in curve_metrics) and metric in logged and bool(curve_series(table, metric))
        if final and table.factors:
            paths[f"{label(metric)} vs {x or default_x(table)}"] = save_plot(table, metric, x or default_x(table), out)
        if curve:
            paths[f"{label(metric)} during training"] = save_curve(table, metric, out)
        if not (final or curve):
            if metrics:
                reported = sorted({k for row in table.rows for r in row.runs for k, v in (r.results or {}).items() if number(v) is not None}
                                  - {"step"} | logged)
                raise UserError(f"no run reports the metric {metric!r} in results.json or (at two steps or more) in metrics.jsonl; "
                                f"reported: {', '.join(reported)}")
            print(f"{metric}: no run reports it; no plot")
    if usage:
        if not on_disk:
            raise UserError("--usage reads the run directories: leave out --source wandb")
        paths["sorted code usage at the last evaluation"] = save_usage_plot(table, out)
    return paths


def cmd_plot(args) -> int:
    from ibq.ledger.sweep import analysis_group
    from ibq.report.table import build_table
    from ibq.report.wandb_log import log_analysis

    runs, comparison, groups = compared_runs(args)
    table = build_table(runs)
    paths = make_plots(table, args.metric, args.x, output_dir(comparison, groups, "plots", args.out), usage=args.usage,
                       samplings=comparison is not None and comparison.samplings)
    for path in paths.values():
        print(f"wrote {path}")
    where = log_analysis(table, list(paths.values()), analysis_group(groups), args.project or wandb_project(runs), args.entity,
                         output_dir(comparison, groups, "analysis"), args.wandb)
    if where:
        print(f"W&B ({args.wandb}): {where}")
    return 0


def cmd_report(args) -> int:
    from ibq.config import one_line
    from ibq.ledger.wandb_source import online_problem
    from ibq.report.curves import evaluations_table, has_usage, logged_metrics
    from ibq.ledger.sweep import search_outcome
    from ibq.report.report import sections, wandb_report, write_local
    from ibq.report.table import build_table

    runs, comparison, groups = compared_runs(args)
    table = build_table(runs)
    out = output_dir(comparison, groups, "report", args.out)
    on_disk = comparison is not None
    samplings = on_disk and comparison.samplings
    plots = make_plots(table, None, None, out / "plots", usage=on_disk and has_usage(table), samplings=samplings)
    title = f"ibq {sweeps_text(groups)}"
    lines, problems = [], []
    for sweep in comparison.sweeps if on_disk else []:
        lines.append(f"directory: {sweep.directory}" + (f" (W&B group {sweep.group})" if len(comparison.sweeps) > 1 else ""))
        if sweep.plan:
            lines.append(f"command: {command_line(sweep.plan)}")
        lines.append("jobs: " + ", ".join(f"{n} {state}" for state, n in sweep.counts().items()))
        problems += [f"{s.state}: {shown(s.overrides)}" + (f" ({s.reason})" if s.reason else "") for s in sweep.jobs if s.state != "done"]
    if on_disk:
        lines += search_outcome([sweep.directory for sweep in comparison.sweeps])
    if not on_disk or len(comparison.sweeps) == 1:
        lines.append(f"W&B group: {', '.join(groups)}")
    if args.where:
        lines.append(f"runs where {' '.join(args.where)}")
    lines.append(f"factors: {', '.join(table.factors) or 'none'}")
    if on_disk and comparison.repeats:
        lines.append(repeats_text(comparison.repeats))
    at_steps = evaluations_table(runs) if on_disk and not samplings else None
    parts = sections(lines, table, plots, problems, heading=f"Sweep{'s' * (len(groups) > 1)}", at_steps=at_steps)
    md_path, html_path = write_local(title, parts, out)
    print(f"wrote {md_path}\nwrote {html_path}")
    problem = "--offline" if args.offline else online_problem()
    if samplings and not problem:
        problem = "the jobs of ibq-sample have no W&B runs of their own: each logs its scores to its AR run's"
    if problem:
        print(f"W&B Report not created ({problem}); the local report above has the same content")
        return 0
    try:
        curves = [m for m in default_plot_metrics(table)[1] if not on_disk or m in logged_metrics(table)]
        report = wandb_report(title, "; ".join(lines), table, groups, args.project or wandb_project(runs), args.entity, curves, at_steps)
        report.save()
    except Exception as error:  # the Reports API (public preview) raises many types
        print(f"W&B Report not created ({type(error).__name__}: {one_line(str(error))}); "
              "the local report above has the same content")
        return 0
    print(f"W&B Report: {report.url}")
    return 0


def cmd_diff(args) -> int:
    from ibq.ledger.runs import load_run
    from ibq.report.table import decimals, label, number

    if not 2 <= len(args.run_dirs) <= len(string.ascii_uppercase):
        raise UserError(f"diff takes 2 to {len(string.ascii_uppercase)} run directories ({len(args.run_dirs)} given); "
                        f"ibq-sweep table compares the runs of whole folders")
    runs = []
    for directory in args.run_dirs:
        run = load_run(Path(directory)) if Path(directory).is_dir() else None
        if run is None:
            raise UserError(f"{directory}: not a run directory (no readable run.json); give folders that ibq-train or ibq-train-ar wrote")
        runs.append(run)
    names = list(string.ascii_uppercase[: len(runs)])
    for name, run in zip(names, runs):
        git = run.record.get("git") or {}
        commit = f"git {str(git.get('sha'))[:10]}{' (dirty)' if git.get('dirty') else ''}" if git.get("sha") else "git unknown"
        print(f"{name}: {run.location}  ({run.status}, signature {run.signature}, {commit})")

    def differing(values_of) -> list[str]:
        keys = sorted(set().union(*(values_of(run) for run in runs)))
        return [k for k in keys if len({values_of(run).get(k, "<absent>") for run in runs}) > 1]  # flattened: hashable

    body = [[f"{k} (choice)", *(run.choices.get(k, "<absent>") for run in runs)] for k in differing(lambda run: run.choices)]
    chosen = set().union(*(run.choices for run in runs))  # codebook_size: shown as a choice
    body += [[k, *(str(run.config.get(k, "<absent>")) for run in runs)] for k in differing(lambda run: run.config) if k not in chosen]
    if body:
        print(f"\n{len(body)} config key(s) differ:")
        print_table(["key", *names], body)
    else:
        print("\nthe configs are the same")
    results = [run.results or {} for run in runs]
    metrics = sorted(k for k in set().union(*results) if any(number(r.get(k)) is not None for r in results))
    if not metrics:
        print(f"\n{'neither run' if len(runs) == 2 else 'no run'} has results.json")
        return 0

    def shown_value(value, digits: int) -> str:
        return "–" if number(value) is None else str(value) if isinstance(value, int) else f"{value:.{digits}f}"

    body = []
    for metric in metrics:
        values = [r.get(metric) for r in results]
        digits = 0 if all(isinstance(v, int) for v in values) else decimals(metric)
        base = number(values[0])
        deltas = [f"{number(v) - base:+.{digits}f}" if base is not None and number(v) is not None else "" for v in values[1:]]
        body.append([label(metric), *(shown_value(v, digits) for v in values), *deltas])
    print("\nmetrics (results.json):")
    print_table(["metric", *names, *(f"{name} - A" for name in names[1:])], body, numeric=set(range(1, 2 * len(runs))))
    return 0


# -- entry point ---------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ibq-sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def runs_option(sp):
        sp.add_argument("--runs", action="append", metavar="DIR", help=f"also count completed runs below DIR (always: {DEFAULT_RUNS}/)")

    def source_options(sp):
        sp.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="sweep directories (outputs/multirun/<time>; several are "
                        "compared together, each configuration counted once), or with --source wandb W&B groups")
        sp.add_argument("--source", choices=("disk", "wandb"), default="disk", help="read the runs from their directories (default) or from the W&B API")
        sp.add_argument("--project", help="W&B project (default: the runs' logger.project, else ibq)")
        sp.add_argument("--entity", help="W&B entity (default: your default entity)")
        runs_option(sp)

    def where_option(sp):
        sp.add_argument("--where", action="append", metavar="KEY=VALUE[,VALUE]", help="only the runs whose KEY (a config group, "
                        "codebook_size, or a config key such as optim.lr) takes one of the values; repeatable, all must hold")

    for name, help_text in (("plan", "list a sweep's jobs without running anything"), ("launch", "run the jobs of a sweep that have not completed anywhere")):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("items", nargs="*", metavar="SWEEP|OVERRIDE", help="a sweep name (sweeps/<name>.yaml) and/or ibq-train overrides")
        sp.add_argument("--config", choices=tuple(ENTRY_SCRIPTS), default="train", help="primary config: train (stage I) or train_ar (stage II)")
        runs_option(sp)
        if name == "plan":
            sp.add_argument("--sbatch", action="store_true", help="also print the #SBATCH lines of the Slurm job array (cluster=slurm...)")
        if name == "launch":
            sp.add_argument("--dir", help="sweep directory (default: the config's hydra.sweep.dir)")
            sp.add_argument("--dry-run", action="store_true", help="plan only")

    sp = sub.add_parser("status", help="state of every job of a sweep directory")
    source_options(sp)

    sp = sub.add_parser("table", help="metrics by config-group choices, mean ± std over seeds")
    source_options(sp)
    where_option(sp)
    sp.add_argument("--metrics", help="comma-separated results keys (default: those of utilization, bound, perplexity, rFID, PSNR, SSIM, "
                                      "LPIPS that some run reports)")
    sp.add_argument("--columns", metavar="FACTOR", help="one table per metric with the values of FACTOR as columns (e.g. codebook_size)")
    sp.add_argument("--sort", metavar="METRIC", help="rows best first by METRIC's mean (higher utilization, PSNR, SSIM, IS first; lower "
                                                     "rFID, LPIPS, gFID, loss first; ascending for others), e.g. a search's trials by its objective")
    sp.add_argument("--format", choices=("terminal", "markdown", "csv", "latex"), default="terminal",
                    help="csv: one line per group with <metric>_mean/_std/_n; latex: a booktabs tabular, the best value per column in bold")
    sp.add_argument("--output", help="write to this file instead of the terminal")
    sp.add_argument("--steps", metavar="all|STEP[,STEP]",
                    help="a row per step at which the runs were evaluated (their metrics.jsonl: training's evaluations, ibq-eval "
                         "step=N), whatever their state: all such steps, or those given (e.g. 50000,100000); --columns step "
                         "puts the steps side by side")

    sp = sub.add_parser("plot", help="PNG plots of a metric against a factor, also logged to W&B")
    source_options(sp)
    where_option(sp)
    sp.add_argument("--metric", action="append", help="key to plot (repeatable): its final value from results.json against --x, its curve "
                                                      "over the steps from metrics.jsonl (e.g. loss/g); default: utilization and rFID, and the "
                                                      "loss/g and utilization curves where logged")
    sp.add_argument("--usage", action="store_true", help="also overlay the sorted code usage of every run's last evaluation (log-log)")
    sp.add_argument("--x", help="factor on the x axis (default: codebook_size, else sampling.cfg_scale, else the first factor)")
    sp.add_argument("--out", help="folder for the PNGs (default: <sweep dir>/plots)")
    sp.add_argument("--wandb", choices=("offline", "online", "disabled"), default="offline", help="log the plots as a W&B analysis run in the sweep's group")

    sp = sub.add_parser("diff", help="two runs or more: the config keys that differ, then their metrics side by side (each against the first)")
    sp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")

    sp = sub.add_parser("retry", help="relaunch failed, preempted, interrupted and never-started jobs")
    sp.add_argument("sweep_dir")
    sp.add_argument("--dry-run", action="store_true", help="list them only")
    runs_option(sp)

    sp = sub.add_parser("report", help="W&B Report when online; report.md and report.html in any case")
    source_options(sp)
    where_option(sp)
    sp.add_argument("--out", help="folder for the local report (default: <sweep dir>/report)")
    sp.add_argument("--offline", action="store_true", help="do not try to create a W&B Report")
    return p


COMMANDS = {"plan": cmd_plan, "launch": cmd_launch, "status": cmd_status, "table": cmd_table, "plot": cmd_plot, "retry": cmd_retry, "report": cmd_report, "diff": cmd_diff}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
    except UserError as error:
        fail(str(error))
    except BrokenPipeError:  # `ibq-sweep table … | head`: the reader has what it wanted
        from ibq.config import reader_gone

        reader_gone(0)
    sys.exit(code)


if __name__ == "__main__":
    main()
