"""Comparing runs: curves from metrics.jsonl, code-usage histograms (files, W&B, overlay), the W&B
config/tags/group of a run, LaTeX tables, `ibq-sweep diff`, the W&B Report object, and the plots' axes.
One 2-job sweep with evaluations at steps 2 and 4 serves every end-to-end test."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import IBQ_TRAIN, error_line, read_jsonl, run_cli, wandb_records
from ibq.cli.sweep import make_plots
from ibq.ledger.runs import discover
from ibq.report.table import build_table
from ibq.runs.record import sweep_group
from test_ledger import fake_run, seeded_sweep, sweep_cli
from test_official import AR, AR_CONFIG, ibq_import

EVALUATED_SWEEP = ["quantizer=ibq,vq", "codebook_size=256", "train.steps=4", "train.log_every=1", "train.checkpoint_every=4",
                   "eval.every=2", "data.val_crops_per_photo=1", "eval.rfid=false", "logger=wandb"]


@pytest.fixture(scope="session")
def evaluated_sweep(tmp_path_factory) -> Path:
    """ibq and vq at 256 codes, 4 steps, evaluated at steps 2 and 4, W&B offline."""
    sweep_dir = tmp_path_factory.mktemp("evaluated") / "sweep"
    result = run_cli(IBQ_TRAIN + ["-m", *EVALUATED_SWEEP, f"hydra.sweep.dir={sweep_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def run_of(sweep_dir: Path, quantizer: str) -> Path:
    return next(p.parent for p in sweep_dir.glob(f"*quantizer={quantizer}*/run.json"))


# -- end to end on the 2-job sweep -----------------------------------------------------------------------
@pytest.mark.slow
def test_curves_and_code_usage_of_a_sweep(evaluated_sweep, tmp_path):
    for quantizer in ("ibq", "vq"):
        usage = sorted(p.name for p in (run_of(evaluated_sweep, quantizer) / "usage").iterdir())
        assert usage == ["codes_step0000002.npy", "codes_step0000004.npy"]  # one histogram per evaluation
        counts = np.load(run_of(evaluated_sweep, quantizer) / "usage" / usage[-1])
        results = json.loads((run_of(evaluated_sweep, quantizer) / "results.json").read_text())
        assert counts.shape == (256,) and counts.sum() == results["codebook/tokens"]
        assert (counts > 0).sum() == round(results["codebook/utilization"] * 256)

    out = tmp_path / "plots"
    result = sweep_cli(["plot", str(evaluated_sweep), "--metric", "loss/g", "--usage", "--wandb", "disabled", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("curve_loss_g.png", "code_usage_sorted.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from ibq.report.curves import curve_series

    series = curve_series(build_table(discover(evaluated_sweep)), "loss/g")
    assert sorted(series) == ["quantizer=ibq", "quantizer=vq"] and all(steps == [1, 2, 3, 4] for steps, _, _ in series.values())


@pytest.mark.slow
def test_offline_wandb_run_holds_the_usage_histogram_and_the_git_state(evaluated_sweep):
    records = wandb_records(run_of(evaluated_sweep, "vq"))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    git = json.loads((run_of(evaluated_sweep, "vq") / "run.json").read_text())["git"]
    assert config["git"] == {"commit": git["sha"], "dirty": git["dirty"]} and len(git["sha"]) == 40
    assert run.job_type == "train" and run.run_group == sweep_group(evaluated_sweep)
    assert sorted(run.tags) == ["codebook_size:256", "quantizer:vq"]  # not logger:wandb, cluster:local

    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history[items["_step"]] = items
    assert set(history[2]) >= {"codebook/usage/_type", "codebook/usage_sorted_table/_type", "media/reconstructions/_type"}
    assert history[4]["codebook/usage/_type"] == "histogram" and sum(history[4]["codebook/usage/values"]) == 18 * 64


@pytest.mark.slow
def test_latex_table_and_diff_of_two_runs(evaluated_sweep):
    result = sweep_cli(["table", str(evaluated_sweep), "--format", "latex"])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == r"\begin{tabular}{lrrrrrr}" and lines[1] == r"\toprule" and lines[3] == r"\midrule"
    assert lines[-2:] == [r"\bottomrule", r"\end{tabular}"]
    assert lines[2].startswith("quantizer & runs & utilization $\\uparrow$")
    for row in lines[2:3] + lines[4:-2]:  # header and body: 7 cells each, ended by \\
        assert row.endswith(r" \\") and row.count(" & ") == 6

    result = sweep_cli(["diff", str(run_of(evaluated_sweep, "ibq")), str(run_of(evaluated_sweep, "vq"))])
    assert result.returncode == 0, result.stderr[-3000:]
    config_part, metrics_part = result.stdout.split("config key(s) differ:")[1].split("metrics (results.json):")
    assert "quantizer (choice)" in config_part and "ibq.quantizers.IBQ" in config_part and "codebook_size" not in config_part
    assert "utilization" in metrics_part and "B - A" in metrics_part


@pytest.mark.slow
def test_a_table_at_steps_holds_each_evaluation_along_training(evaluated_sweep):
    result = sweep_cli(["table", str(evaluated_sweep), "--steps", "all", "--metrics", "codebook/utilization", "--format", "csv"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(",") for line in result.stdout.splitlines()]
    assert rows[0] == ["quantizer", "step", "runs", "codebook/utilization_mean", "codebook/utilization_std", "codebook/utilization_n"]
    assert [row[:3] for row in rows[1:]] == [["ibq", "2", "1"], ["ibq", "4", "1"], ["vq", "2", "1"], ["vq", "4", "1"]]
    for row in rows[1:]:
        if row[1] == "4":  # the final evaluation is the run's results.json
            results = json.loads((run_of(evaluated_sweep, row[0]) / "results.json").read_text())
            assert float(row[3]) == results["codebook/utilization"]


# -- units ----------------------------------------------------------------------------------------------
def runs_evaluated_along_training(root: Path) -> Path:
    """ibq and vq over seeds 0 and 1, evaluated at steps 50 and 100 (rFID 100 / step + base + seed) and logging
    the loss at steps 10, 50 and 100; a third ibq seed failed after its evaluation at step 50."""
    for quantizer, base in (("ibq", 5.0), ("vq", 9.0)):
        for seed in (0, 1, 2) if quantizer == "ibq" else (0, 1):
            status = "failed" if seed == 2 else "completed"
            run = fake_run(root / f"{quantizer}_{seed}", status=status, seed=seed, quantizer=quantizer, results={"rfid": base + 1 + seed})
            lines = [{"step": 10, "loss/g": 0.9}]
            for step in (50, 100) if seed < 2 else (50,):
                lines += [{"step": step, "loss/g": 0.5}, {"step": step, "rfid": 100 / step + base + seed, "psnr": step / 10}]
            (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def test_a_table_at_steps_averages_the_seeds_at_each_evaluated_step_and_counts_a_run_at_the_steps_it_reached(tmp_path):
    from ibq.report.curves import runs_at_steps

    runs, metrics = runs_at_steps(discover(runs_evaluated_along_training(tmp_path / "sweep")), None, None)
    assert metrics == ["rfid", "psnr"]  # the evaluation's figures, not the losses logged between
    table = build_table(runs, metrics, at_steps=True)
    assert table.factors == ["quantizer", "step"]
    assert [(row.key, len(row.runs)) for row in table.rows] == [(("ibq", "50"), 3), (("ibq", "100"), 2), (("vq", "50"), 2), (("vq", "100"), 2)]
    assert table.rows[0].cell("rfid").values == [7.0, 8.0, 9.0]  # the failed seed's evaluation at 50 counts
    assert table.rows[3].cell("rfid").text(2) == "10.50 ± 0.71"
    header, body = table.pivot("step", "rfid")
    assert header == ["quantizer", "step=50", "step=100"] and body[1] == ["vq", "11.50 ± 0.71", "10.50 ± 0.71"]

    one_step = build_table(*runs_at_steps(discover(tmp_path / "sweep"), ["psnr"], [100]), at_steps=True)
    assert one_step.factors == ["quantizer", "step"] and [row.key for row in one_step.rows] == [("ibq", "100"), ("vq", "100")]
    losses = build_table(*runs_at_steps(discover(tmp_path / "sweep"), ["loss/g"], None), at_steps=True)
    assert [row.key[1] for row in losses.rows] == ["10", "50", "100", "10", "50", "100"]
    assert build_table(discover(tmp_path / "sweep")).rows[0].cell("rfid").values == [6.0, 7.0]  # without steps: completed runs' results.json


def test_a_table_at_steps_refuses_in_one_line_what_the_runs_did_not_log(tmp_path):
    sweep = runs_evaluated_along_training(tmp_path / "sweep")
    result = sweep_cli(["table", str(sweep), "--steps", "50,100", "--columns", "step", "--metrics", "rfid"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == ("sweep sweep: 5 runs at 2 evaluated step(s) in 4 rows (mean ± std over the runs of a row: "
                                             "its seeds; a run still training or stopped counts at the steps it reached)")
    assert [re.split(r"\s{2,}", line.strip()) for line in result.stdout.splitlines()[-2:]] == [
        ["ibq", "8.00 ± 1.00", "6.50 ± 0.71"], ["vq", "11.50 ± 0.71", "10.50 ± 0.71"]]
    assert error_line(sweep_cli(["table", str(sweep), "--steps", "75"])) == (
        "error: --steps 75: no run logged rFID, PSNR at that step; they did at steps 50, 100")
    assert error_line(sweep_cli(["table", str(sweep), "--steps", "50k"])) == (
        "error: --steps 50k: give all (every evaluated step) or steps as integers, e.g. --steps 50000,100000")
    assert error_line(sweep_cli(["table", str(sweep), "--steps", "all", "--metrics", "gfid"])) == (
        "error: no run logs the metric 'gfid' in its metrics.jsonl; logged: loss/g, psnr, rfid")
    assert error_line(sweep_cli(["table", str(sweep), "--steps", "all", "--source", "wandb"])) == (
        "error: --steps reads the runs' metrics.jsonl: leave out --source wandb")


def test_latex_bolds_the_best_value_by_each_metrics_direction(tmp_path):
    root = tmp_path / "sweep"
    for quantizer, size, rfid in (("ibq", "256", 5.0), ("vq", "256", 9.0), ("ibq", "1024", 4.0), ("vq", "1024", 12.0)):
        fake_run(root / f"{quantizer}{size}", quantizer=quantizer, codebook_size=size,
                 results={"codebook/utilization": 0.1 if quantizer == "vq" else 0.9, "rfid": rfid, "psnr": 20.0, "lpips": None})
    table = build_table(discover(root))
    assert "LPIPS" not in table.header  # no run has it
    body = table.latex().splitlines()[4:-2]
    assert body[0] == r"ibq & 256 & 1 & $\mathbf{0.9000}$ & $5.00$ & $20.00$ \\"  # rFID: lower is better
    assert body[1] == r"ibq & 1024 & 1 & $\mathbf{0.9000}$ & $\mathbf{4.00}$ & $20.00$ \\"  # PSNR: all alike, none bold
    per_size = table.pivot_latex("codebook_size", "rfid").splitlines()
    assert per_size[2] == r"quantizer & codebook\_size=256 $\downarrow$ & codebook\_size=1024 $\downarrow$ \\"
    assert per_size[4] == r"ibq & $\mathbf{5.00}$ & $\mathbf{4.00}$ \\"


def test_a_searchs_sampled_values_read_to_4_digits_unless_two_would_read_alike_and_csv_keeps_them_whole(tmp_path):
    root = tmp_path / "search"
    for index, (lr, weight) in enumerate([("0.0012520653814999472", "0.12345678901"), ("0.0026938830192854116", "0.12345678902")]):
        trial = fake_run(root / f"trial{index}", signature=f"trial{index}", **{"optim.lr": lr, "quantizer.entropy_weight": weight},
                         results={"rfid": 3.0 - index, "psnr": 20.0 + index})
        config = yaml.safe_load((trial / ".hydra" / "config.yaml").read_text())
        (trial / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**config, "objectives": ["psnr"]}))
    table = build_table(discover(root))
    assert table.factors == ["optim.lr", "quantizer.entropy_weight"]
    assert [row[:2] for row in table.body()] == [["0.001252", "0.12345678901"], ["0.002694", "0.12345678902"]]  # 0.1235 twice
    assert table.latex().splitlines()[4].startswith("0.001252 & 0.12345678901 & 1 &")
    assert table.pivot("optim.lr", "rfid")[0] == ["quantizer.entropy_weight", "optim.lr=0.001252", "optim.lr=0.002694"]
    assert table.csv().splitlines()[1].startswith("0.0012520653814999472,0.12345678901,1,")
    # The search's objective is drawn too, though no default plot has PSNR; its ticks read as the table does.
    plots = make_plots(table, None, "optim.lr", tmp_path / "plots")
    assert "PSNR vs optim.lr" in plots and plots["PSNR vs optim.lr"].is_file()


def test_a_folder_of_a_stored_search_says_what_its_study_holds_now_every_launch_included(tmp_path, monkeypatch):
    """optimization_results.yaml is the best when that launch ended; a later launch of the study may have found better."""
    import optuna

    from ibq.ledger.sweep import search_outcome

    study = optuna.create_study(study_name="lr", storage=f"sqlite:///{tmp_path / 'search.db'}", direction="minimize")
    for lr, loss in ((0.002, 4.0), (0.001, 3.5), (0.003, 3.0)):  # the third from a later launch, in another folder
        study.add_trial(optuna.trial.create_trial(params={"optim.lr": lr}, distributions={"optim.lr": optuna.distributions.LogUniformDistribution(1e-4, 1e-2)},
                                                  value=loss))
    job = tmp_path / "first" / "job0" / ".hydra"
    job.mkdir(parents=True)
    (job / "config.yaml").write_text(yaml.safe_dump({"objectives": ["loss"]}))
    (job / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {"storage": "sqlite:///search.db", "study_name": "lr"},
                                                              "runtime": {"cwd": str(tmp_path)}}}))  # relative to the launch's folder
    (tmp_path / "first" / "optimization_results.yaml").write_text(yaml.safe_dump({"name": "optuna", "best_params": {"optim.lr": 0.001},
                                                                                   "best_value": 3.5}))
    monkeypatch.chdir(tmp_path / "first")  # ibq-sweep table, run from elsewhere
    study_line = f"search study: lr in sqlite:///{tmp_path / 'search.db'}: 3 trials"
    assert search_outcome([tmp_path / "first"]) == [
        "search best: loss 3.5 at optim.lr=0.001", f"{study_line}, 1 of them in this folder; best of all: loss 3 at optim.lr=0.003"]
    shutil.copytree(tmp_path / "first", tmp_path / "second")  # the later launch: the study is told once, for both folders
    (tmp_path / "second" / "optimization_results.yaml").write_text(yaml.safe_dump({"best_params": {"optim.lr": 0.003}, "best_value": 3.0}))
    assert search_outcome([tmp_path / "first", tmp_path / "second"]) == [
        f"{tmp_path / 'first'}: search best: loss 3.5 at optim.lr=0.001", f"{tmp_path / 'second'}: search best: loss 3 at optim.lr=0.003",
        f"{study_line}, 2 of them in these folders; best of all: loss 3 at optim.lr=0.003"]
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, params={"optim.lr": 0.004},  # a launch interrupted
                                              distributions={"optim.lr": optuna.distributions.LogUniformDistribution(1e-4, 1e-2)}))
    assert search_outcome([tmp_path / "first"])[1].startswith(
        f"search study: lr in sqlite:///{tmp_path / 'search.db'}: 4 trials, 1 of them in this folder; 3 complete, 1 running (a launch "
        f"still at work, or one interrupted); best of all: loss 3 at")
    (tmp_path / "search.db").rename(tmp_path / "moved.db")
    assert search_outcome([tmp_path / "first"])[1].endswith(": cannot be read here (no such file)")
    assert not (tmp_path / "search.db").exists()  # a table reads; it makes no empty storage


def test_the_report_holds_the_table_at_the_evaluated_steps_local_and_on_wandb(tmp_path):
    from ibq.report.curves import evaluations_table
    from ibq.report.report import AT_STEPS, wandb_report

    sweep = runs_evaluated_along_training(tmp_path / "sweep")
    result = sweep_cli(["report", str(sweep), "--offline", "--out", str(tmp_path / "report")])
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "report" / "report.md").read_text()
    at_steps = report.split(f"## {AT_STEPS}\n\n")[1].split("\n\n")[0].splitlines()
    assert at_steps[0] == "| quantizer | step | runs | rFID | PSNR |" and len(at_steps) == 6
    assert at_steps[2] == "| ibq | 50 | 3 | 8.00 ± 1.00 | 5.00 ± 0.00 |"  # the failed seed counts where it was evaluated

    table = evaluations_table(discover(sweep))
    blocks = wandb_report("ibq sweep", "a test", build_table(discover(sweep)), ["sweep"], "ibq", "fake-entity", [], at_steps=table).blocks
    assert blocks[3].text == AT_STEPS and blocks[4].text == table.markdown()
    for run in ("ibq_0", "vq_0", "vq_1"):
        shutil.rmtree(sweep / run)
    for run in ("ibq_1", "ibq_2"):  # evaluated at step 50 only: no table along training
        (sweep / run / "metrics.jsonl").write_text(json.dumps({"step": 50, "rfid": 8.0}) + "\n")
    assert evaluations_table(discover(sweep)) is None


def test_columns_are_honoured_in_csv(tmp_path):
    table = build_table(discover(seeded_sweep(tmp_path / "sweep")))
    lines = table.pivot_csv("codebook_size").splitlines()
    assert lines[0] == ("metric,quantizer,codebook_size=256_mean,codebook_size=256_std,codebook_size=256_n,"
                        "codebook_size=1024_mean,codebook_size=1024_std,codebook_size=1024_n")
    assert lines[1].startswith("codebook/utilization,ibq,0.91") and lines[1].endswith(",3")


def test_wandb_report_groups_by_quantizer_with_curves_and_media(tmp_path):
    from ibq.report.report import wandb_report

    table = build_table(discover(seeded_sweep(tmp_path / "sweep")))  # no run reports rFID
    report = wandb_report("ibq sweep g", "a test", table, groups=["g-1a2b3c"], project="ibq", entity="fake-entity", curves=["loss/g"])
    assert report.entity == "fake-entity"
    grid = report.blocks[-1]
    assert grid.runsets[0].groupby == ["config.choices.quantizer"] and grid.runsets[0].name == "g-1a2b3c"
    assert grid.runsets[0].filters == 'Metric("Group") == \'g-1a2b3c\' and Metric("JobType") == \'train\''  # not the evaluations
    kinds = [type(panel).__name__ for panel in grid.panels]
    assert kinds == ["ScatterPlot", "LinePlot", "MediaBrowser"]  # utilization vs size; no rFID panel
    scatter, line, media = grid.panels
    assert scatter.log_x and scatter.y.name == "codebook/utilization"
    assert line.y == ["loss/g"] and line.groupby.name == "choices.quantizer" and line.groupby_rangefunc == "stddev"
    assert media.media_keys == ["media/reconstructions"]
    assert "| quantizer | codebook_size |" in report.blocks[2].text
    two_sweeps = wandb_report("ibq sweeps g, h", "a test", table, groups=["g-1a2b3c", "h-4d5e6f"], project="ibq", entity="fake-entity", curves=[])
    assert two_sweeps.blocks[-1].runsets[0].filters == 'Metric("Group") in [\'g-1a2b3c\', \'h-4d5e6f\'] and Metric("JobType") == \'train\''


def test_tags_name_only_the_choices_that_were_set_and_sync_lists_every_folder(tmp_path):
    from ibq.runs.wandb_mirror import offline_folders, varied_choices

    choices = {"quantizer": "vq", "codebook_size": "256", "logger": "wandb", "cluster": "slurm", "data": "photos", "experiment": None}
    overrides = ["quantizer=vq", "codebook_size=256", "cluster=slurm", "train.steps=4", "+experiment=x"]
    assert varied_choices(choices, overrides) == {"codebook_size": "256", "quantizer": "vq"}
    for stamp in ("20260101_000000", "20260102_000000"):  # a resumed run: two folders, one id
        (tmp_path / "wandb" / f"offline-run-{stamp}-abc123").mkdir(parents=True)
    (tmp_path / "wandb" / "offline-run-20260101_000000-other").mkdir()
    assert [p.name for p in offline_folders(tmp_path, "abc123")] == ["offline-run-20260101_000000-abc123", "offline-run-20260102_000000-abc123"]


def test_an_evaluation_is_its_own_wandb_run_grouped_with_its_training_run(tmp_path):
    from ibq.runs.wandb_mirror import open_evaluation_mirror

    record = {"choices": {"quantizer": "vq", "logger": "wandb"}, "overrides": ["quantizer=vq", "logger=wandb"],
              "git": {"sha": "f" * 40, "dirty": True}, "wandb": {"id": "abc123", "group": "sweep-1a2b3c"}}
    train_config = {"logger": {"kind": "wandb", "mode": "offline", "project": "ibq", "entity": None, "group": None, "tags": [],
                               "name": None, "base_url": None}, "seed": 3}
    mirror = open_evaluation_mirror(tmp_path, train_config, record, "abc123", "sample", 12, "offline")
    mirror.summarize({"gfid": 10.0})
    mirror.finish()
    assert mirror.run_id == "abc123-sample-12"  # the same for every scoring of step 12: W&B resumes the run
    records = wandb_records(tmp_path)  # complete once finish() returns: from the run record to the exit record
    assert records[-1].WhichOneof("record_type") == "exit"
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert run.job_type == "sample" and run.run_group == "sweep-1a2b3c" and run.display_name == f"{tmp_path.name}-sample-12"
    assert list(run.tags) == ["quantizer:vq"] and run.project == "ibq"
    assert config["train_run_id"] == "abc123" and config["seed"] == 3 and config["git"] == {"commit": "f" * 40, "dirty": True}


def test_two_sweeps_in_folders_of_the_same_name_get_two_groups(tmp_path):
    first, second = sweep_group(tmp_path / "a" / "sweep"), sweep_group(tmp_path / "b" / "sweep")
    assert first != second and first.startswith("sweep-") and second.startswith("sweep-")
    assert sweep_group(tmp_path / "a" / "sweep") == first


def test_plot_axes_log2_sizes_categorical_points_natural_order_units(tmp_path):
    from ibq.report.plot import metric_figure

    root = tmp_path / "sweep"
    for quantizer in ("ibq", "vq"):
        for size in ("256", "512", "1024"):
            fake_run(root / f"{quantizer}{size}", quantizer=quantizer, codebook_size=size, results={"psnr": 20.0 + len(size)})
    table = build_table(discover(root))
    axes = metric_figure(table, "psnr", "codebook_size").axes[0]
    assert axes.get_xscale() == "log" and axes.get_ylabel() == "PSNR (dB)"  # log2 though 1024/256 < 8
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["quantizer=ibq", "quantizer=vq"]

    axes = metric_figure(table, "psnr", "quantizer").axes[0]
    assert axes.get_xscale() == "linear" and [t.get_text() for t in axes.get_xticklabels()] == ["ibq", "vq"]
    legend = [t.get_text() for t in axes.get_legend().get_texts()]
    assert legend == ["codebook_size=256", "codebook_size=512", "codebook_size=1024"]  # natural order
    assert [c.lines[0].get_linestyle() for c in axes.containers] == ["None"] * 3  # points side by side, not lines


def test_factors_that_take_one_value_per_x_value_follow_it_instead_of_splitting_the_series(tmp_path):
    from ibq.report.plot import metric_figure

    root = tmp_path / "sweep"  # stage II over two tokenizer runs and two learning rates; the vocabulary follows the run
    for run, vocab_size in (("a", "1024"), ("b", "16384")):
        for lr in ("1e-4", "3e-4"):
            fake_run(root / f"{run}{lr}", signature=f"{run}{lr}", tokenizer_run=run, **{"transformer.vocab_size": vocab_size, "ar_optim.lr": lr},
                     results={"psnr": 20.0 + float(lr) * 1e4 + len(vocab_size)})
    table = build_table(discover(root))
    assert set(table.factors) == {"tokenizer_run", "transformer.vocab_size", "ar_optim.lr"}
    axes = metric_figure(table, "psnr", "tokenizer_run").axes[0]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["ar_optim.lr=1e-4", "ar_optim.lr=3e-4"]
    assert [len(c.lines[0].get_xdata()) for c in axes.containers] == [2, 2]
    assert axes.get_xlabel() == "tokenizer_run (under it: transformer.vocab_size)"
    assert [t.get_text() for t in axes.get_xticklabels()] == ["a\n1024", "b\n16384"]
    axes = metric_figure(table, "psnr", "ar_optim.lr").axes[0]  # the learning rate is no function of the run's
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["tokenizer_run=a, transformer.vocab_size=1024",
                                                                     "tokenizer_run=b, transformer.vocab_size=16384"]


def test_a_table_whose_gfids_were_scored_at_different_settings_says_so(tmp_path):
    from ibq.report.report import measurement_notes
    from ibq.report.table import sampling_note

    def scored(name: str, cfg_scale: float, seed: int, **choices) -> None:
        sampling = {"cfg_scale": cfg_scale, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": seed}
        fake_run(tmp_path / name, signature=name, results={"gfid": 10.0 + cfg_scale, "eval/sampling": sampling}, **choices)

    scored("a", 2.0, seed=0, quantizer="ibq")
    scored("b", 2.0, seed=1, quantizer="vq")  # another sampling seed: the same settings
    assert sampling_note(build_table(discover(tmp_path))) is None
    scored("c", 1.5, seed=0, quantizer="lfq")
    note = sampling_note(build_table(discover(tmp_path)))
    assert note.startswith("gFID and IS were scored at different sampling settings: cfg_scale=1.5 (1 run); cfg_scale=2.0 (2 runs); ")
    assert measurement_notes(build_table(discover(tmp_path)))[-1] == note + "."  # in report.md
    table = run_cli([sys.executable, "-m", "ibq.cli.sweep", "table", str(tmp_path)])
    assert table.returncode == 0 and f"note: {note}" in table.stdout


def test_diff_of_a_folder_without_a_run_is_one_line(tmp_path):
    fake_run(tmp_path / "a", results={"psnr": 20.0})
    line = error_line(run_cli([sys.executable, "-m", "ibq.cli.sweep", "diff", str(tmp_path / "a"), str(tmp_path)]))
    assert f"{tmp_path}: not a run directory" in line
    line = error_line(sweep_cli(["diff", str(tmp_path / "a")]))
    assert line == "error: diff takes 2 to 26 run directories (1 given); ibq-sweep table compares the runs of whole folders"


def test_diff_of_three_runs_sets_each_against_the_first(tmp_path):
    for name, quantizer, psnr in (("a", "ibq", 20.0), ("b", "vq", 19.5), ("c", "vq", None)):
        fake_run(tmp_path / name, quantizer=quantizer, signature=name, results={"psnr": psnr})
    result = sweep_cli(["diff", *(str(tmp_path / name) for name in "abc")])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"A: {tmp_path / 'a'}  (completed, signature a,") and lines[2].startswith(f"C: {tmp_path / 'c'}")
    assert "1 config key(s) differ:" in lines and ["quantizer", "(choice)", "ibq", "vq", "vq"] in [line.split() for line in lines]
    metrics = lines[lines.index("metrics (results.json):") + 1:]
    assert metrics[0].split() == ["metric", "A", "B", "C", "B", "-", "A", "C", "-", "A"]
    assert metrics[2].split() == ["PSNR", "20.00", "19.50", "–", "-0.50"]  # C has no PSNR: no difference



# -- cluster presets and cost estimates ------------------------------------------------------------------
def test_gpu_preset_gives_the_sbatch_lines_of_a_real_cluster():
    from ibq.ledger.sbatch import sweep_sbatch

    lines = sweep_sbatch(["cluster=slurm_gpu", "cluster.partition=gpu", "cluster.account=proj", "cluster.constraint=h100",
                          "quantizer=ibq,vq", "hydra.sweep.dir=/sweeps/s"], "train", jobs=2).splitlines()
    for line in ("--array=0-1%2", "--partition=gpu", "--account=proj", "--constraint=h100", "--exclusive", "--gpus-per-node=8",
                 "--ntasks-per-node=8", "--cpus-per-task=8", "--mem-per-gpu=64G", "--time=1440", "--signal=USR2@300",
                 "--output=/sweeps/s/.submitit/%A_%a/%A_%a_0_log.out"):
        assert f"#SBATCH {line}" in lines
    assert not any(line.startswith("#SBATCH --mem=") for line in lines)  # memory per GPU instead
    with pytest.raises(Exception, match="cluster=local does not submit to Slurm"):
        sweep_sbatch(["quantizer=ibq"], "train", jobs=1)


def test_estimates_come_from_measured_throughput_and_do_not_depend_on_the_devices_given(tmp_path):
    from ibq.ledger.cost import measured_throughput
    from ibq.ledger.plan import expand

    run = fake_run(tmp_path / "runs" / "a", results={"psnr": 20.0})
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "kind": "tokenizer", "distributed": {"world_size": 2}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "throughput/images_per_s": r}) + "\n" for s, r in ((1, 90.0), (2, 100.0), (3, 110.0))))
    measured = measured_throughput([tmp_path / "runs"])
    assert measured[("tokenizer", "tiny")].device_seconds_per_image == pytest.approx(2 / 100)
    estimate = expand(["model_scale=tiny", "train.steps=1000", "train.batch_size=8"], measured=measured).jobs[0].estimate
    assert estimate.device_hours == pytest.approx(1000 * 8 * 0.02 / 3600) and estimate.source.startswith("measured: 50.0 images/s per device")

    local, gpu = (expand(["model_scale=paper", *cluster]).jobs[0].estimate for cluster in ([], ["cluster=slurm_gpu"]))
    assert local.device_hours == pytest.approx(gpu.device_hours) and (local.devices, gpu.devices) == (64, 8)


@pytest.mark.slow
def test_a_sweep_of_samplings_is_compared_by_the_scores_of_its_jobs(tmp_path):
    """ibq-sample over guidance scales and seeds, two jobs at a time as on a cluster: gFID by scale as mean ±
    std over the sampling seeds, gFID drawn against the scale, and a report, all from the jobs' folders."""
    ibq_import([str(AR), "--config", str(AR_CONFIG), "-o", str(tmp_path / "ar"), "logger=none"])
    sweep_dir, ar_run = tmp_path / "cfg", tmp_path / "ar" / "ar"
    sampled = run_cli([sys.executable, "-m", "ibq.cli.sample", "-m", "cluster=local_parallel", f"run_dir={ar_run}", "sampling.cfg_scale=1.0,3.0",
                       "seed=0,1", "samples_per_class=1", "reference.limit=16", f"reference.cache_dir={tmp_path / 'fid'}",
                       f"hydra.sweep.dir={sweep_dir}"])
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    # Each job scored into the AR run while another may have: the run logged all four, and each job kept its own.
    logged = {line["eval/samples_file"]: line["gfid"] for line in read_jsonl(ar_run / "metrics.jsonl") if "gfid" in line}
    scores = {}
    for path in sweep_dir.glob("*/results.json"):
        result = json.loads(path.read_text())
        assert result["gfid"] == logged.pop(result["npz"])
        scores.setdefault(result["sampling"]["cfg_scale"], []).append(result["gfid"])
    assert sorted(scores) == [1.0, 3.0] and all(len(gfids) == 2 for gfids in scores.values()) and not logged
    scored_last = json.loads((ar_run / "results.json").read_text())  # with the settings it was drawn at
    assert scored_last["eval/sampling"] in [{**result["sampling"], "seed": result["seed"]}
                                            for result in map(json.loads, map(Path.read_text, sweep_dir.glob("*/results.json")))]

    table = sweep_cli(["table", str(sweep_dir), "--format", "csv"])
    assert table.returncode == 0, table.stderr
    header, *rows = [line.split(",") for line in table.stdout.strip().splitlines()]
    assert header == ["sampling.cfg_scale", "runs", "gfid_mean", "gfid_std", "gfid_n"]
    for row in rows:
        gfids = scores[float(row[0])]
        assert row[1] == row[4] == "2" and float(row[2]) == pytest.approx(np.mean(gfids)) and float(row[3]) == pytest.approx(np.std(gfids, ddof=1))
    assert [row[0] for row in rows] == ["1.0", "3.0"]
    terminal = sweep_cli(["table", str(sweep_dir)])
    assert "4 scored samplings in 2 groups" in terminal.stdout
    assert error_line(sweep_cli(["table", str(sweep_dir), "--steps", "all"])) == (
        f"error: --steps follows training runs along their metrics.jsonl, and {sweep_dir} holds samplings of ibq-sample: a sampling "
        f"sweep over step= is a table by step without it")

    plot = sweep_cli(["plot", str(sweep_dir), "--wandb", "disabled"])
    assert plot.returncode == 0, plot.stderr
    png = sweep_dir / "plots" / "gfid_vs_sampling_cfg_scale.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "loss" not in plot.stdout  # no training metric is looked for
    report = sweep_cli(["report", str(sweep_dir), "--offline"])
    assert report.returncode == 0, report.stderr
    assert "| sampling.cfg_scale | runs | gFID |" in (sweep_dir / "report" / "report.md").read_text()


@pytest.mark.slow
def test_a_search_over_the_guidance_scale_returns_gfid_to_optuna_and_is_compared_like_a_grid(tmp_path):
    """ibq-sample under Optuna: each trial's gFID is its one objective, the best is the lowest, and the sweep
    folder (no multirun.yaml: a search sweeper writes none) is listed, tabled and plotted from its jobs."""

    ibq_import([str(AR), "--config", str(AR_CONFIG), "-o", str(tmp_path / "ar"), "logger=none"])
    sweep_dir, storage = tmp_path / "search", f"sqlite:///{tmp_path / 'search.db'}"

    def search(*overrides: str):  # its study kept in a storage, so that a later launch continues it
        return run_cli([sys.executable, "-m", "ibq.cli.sample", "-m", f"run_dir={tmp_path / 'ar' / 'ar'}", "hydra/sweeper=optuna",
                        "+objectives=[gfid]", "hydra.sweeper.direction=minimize", "sampling.cfg_scale=interval(1.0,4.0)",
                        "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1", "samples_per_class=1", "reference.limit=16",
                        f"reference.cache_dir={tmp_path / 'fid'}", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=cfg",
                        *overrides])

    searched = search("hydra.sweeper.sampler.seed=0", f"hydra.sweep.dir={sweep_dir}")
    assert searched.returncode == 0, searched.stderr[-3000:]
    gfids = {json.loads(path.read_text())["sampling"]["cfg_scale"]: json.loads(path.read_text())["gfid"]
             for path in sweep_dir.glob("*/results.json")}
    assert len(gfids) == 2 and not any("objectives" in path.parent.name for path in sweep_dir.glob("*/results.json"))
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(gfids.values()))
    assert best["best_params"]["sampling.cfg_scale"] == pytest.approx(min(gfids, key=gfids.get))
    import optuna

    stored = optuna.load_study(study_name="cfg", storage=storage).trials
    assert {trial.params["sampling.cfg_scale"]: trial.value for trial in stored} == pytest.approx(gfids)
    again = search("hydra.sweeper.sampler.seed=0", f"hydra.sweep.dir={tmp_path / 'again'}")  # would draw the same two scales
    assert again.returncode == 2 and error_line(again).endswith("give another, e.g. hydra.sweeper.sampler.seed=1")
    assert not (tmp_path / "again").exists()

    status = sweep_cli(["status", str(sweep_dir)])
    assert status.returncode == 0 and "2 of 2 jobs done, 0 failed" in status.stdout, status.stderr
    table = sweep_cli(["table", str(sweep_dir), "--format", "csv"])
    assert table.returncode == 0, table.stderr
    rows = [line.split(",") for line in table.stdout.strip().splitlines()[1:]]
    assert {float(row[0]): float(row[2]) for row in rows} == pytest.approx(gfids)
    plot = sweep_cli(["plot", str(sweep_dir), "--wandb", "disabled"])
    assert plot.returncode == 0 and (sweep_dir / "plots" / "gfid_vs_sampling_cfg_scale.png").is_file(), plot.stderr
    terminal = sweep_cli(["table", str(sweep_dir)])
    best_scale = min(gfids, key=gfids.get)
    best = f"gfid {gfids[best_scale]:.4g} at sampling.cfg_scale={best_scale:.4g}"
    assert f"search best: {best}" in terminal.stdout.splitlines()
    assert f"search study: cfg in {storage}: 2 trials, 2 of them in this folder; best of all: {best}" in terminal.stdout.splitlines()


def test_samplings_of_several_ar_runs_are_told_apart_by_their_run(tmp_path):
    """Each run named by its path below the folder the runs share; what a sampling takes from its run (step,
    classes, counts, gFID's reference) is a factor only where samplings of one run differ in it."""
    from ibq.ledger.sweep import load_sampling_sweep

    def sampling(job: int, run: str, cfg_scale: float, step: int, gfid: float) -> None:
        folder = tmp_path / "sweep" / f"job{job}"
        folder.mkdir(parents=True)
        (folder / "samples.npz").write_bytes(b"")
        (folder / "results.json").write_text(json.dumps({
            "run_dir": str(tmp_path / "runs" / run), "step": step, "seed": 0, "classes": list(range(4 if run == "a" else 10)),
            "samples_per_class": 2, "samples": 8 if run == "a" else 20, "npz": str(folder / "samples.npz"),
            "sampling": {"cfg_scale": cfg_scale, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
            "gfid": gfid, "gfid/samples": 8, "gfid/reference": f"photos train ({run})", "gfid/reference_samples": 16}))

    for job, (run, cfg_scale, gfid) in enumerate([("a", 1.0, 30.0), ("a", 3.0, 20.0), ("b/x", 1.0, 50.0), ("b/x", 3.0, 40.0)]):
        sampling(job, run, cfg_scale, 100, gfid)
    table = build_table([status.run for status in load_sampling_sweep(tmp_path / "sweep").jobs])
    assert table.factors == ["ar_run", "sampling.cfg_scale"]
    assert [(row.key, row.cell("gfid").mean) for row in table.rows] == [
        (("a", "1.0"), 30.0), (("a", "3.0"), 20.0), (("b/x", "1.0"), 50.0), (("b/x", "3.0"), 40.0)]

    sampling(4, "a", 1.0, 200, 25.0)  # run a sampled again after more training: its step tells the two apart
    table = build_table([status.run for status in load_sampling_sweep(tmp_path / "sweep").jobs])
    assert table.factors == ["ar_run", "sampling.cfg_scale", "step"]


def test_sampling_sweeps_of_two_ar_runs_compare_in_one_table(tmp_path):
    """Each folder samples one run, whose path alone names nothing: together the runs are told apart by their
    paths below the folder they share, as in one sweep over both; a training sweep is no sampling sweep."""
    from ibq.errors import UserError
    from ibq.ledger.sweep import load_comparison

    for run, gfid in (("a", 30.0), ("b/x", 40.0)):
        folder = tmp_path / f"sweep_{run[0]}" / "job0"
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    config_name: sample\n")  # what says it is ibq-sample's
        (folder / "samples.npz").write_bytes(b"")
        (folder / "results.json").write_text(json.dumps({
            "run_dir": str(tmp_path / "runs" / run), "step": 100, "seed": 0, "samples": 8, "npz": str(folder / "samples.npz"),
            "sampling": {"cfg_scale": 2.0}, "gfid": gfid}))
    comparison = load_comparison([tmp_path / "sweep_a", tmp_path / "sweep_b"])
    assert comparison.samplings and [sweep.group for sweep in comparison.sweeps] == [sweep_group(tmp_path / "sweep_a"), sweep_group(tmp_path / "sweep_b")]
    table = build_table(comparison.runs)
    assert [(row.key, row.cell("gfid").mean) for row in table.rows] == [(("a",), 30.0), (("b/x",), 40.0)]
    assert table.factors == ["ar_run"]

    fake_run(tmp_path / "tokenizers" / "run", results={"codebook/utilization": 0.9})
    with pytest.raises(UserError, match=f"^{tmp_path / 'tokenizers'} holds training runs and {tmp_path / 'sweep_a'} samplings of ibq-sample: "):
        load_comparison([tmp_path / "sweep_a", tmp_path / "tokenizers"])
