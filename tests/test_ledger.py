"""The sweep ledger: job states, tables (mean ± std over seeds), liveness of `running` runs, one-line
errors, retry of a killed job, launch that skips completed signatures, reports."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, cli_env, error_line
from ibq.cli.callbacks import SweepProgress, SweepWatch
from ibq.errors import UserError
from ibq.ledger.liveness import run_process_alive
from ibq.ledger.runs import completed_run, discover
from ibq.ledger.sweep import STATE_ORDER, load_sweep
from ibq.ledger.watch import sweep_snapshot
from ibq.report.table import build_table
from test_sweeps import IBQ_SWEEP, TINY_SWEEP, tiny_sweep_dir

HOST = socket.gethostname()


def sweep_cli(args: list[str], env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    env = env or cli_env()
    return subprocess.run(IBQ_SWEEP + args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Path:
    return tiny_sweep_dir(tmp_path_factory.getbasetemp())


def fake_run(directory: Path, status: str = "completed", results: dict | None = None, seed: int = 0, signature: str | None = None,
             error: str | None = None, host: str = HOST, command: list[str] | None = None, **choices) -> Path:
    """A run directory as the training job leaves it: run.json, results.json, .hydra/config.yaml."""
    directory.mkdir(parents=True)
    choices = {"quantizer": "ibq", "codebook_size": "1024", "model_scale": "tiny", "logger": "none", **choices}
    config = {"seed": seed, "quantizer": {"codebook_size": int(choices["codebook_size"])}, "optim": {"lr": 1e-4}, "train": {"steps": 10}}
    sig = signature or f"{choices['quantizer']}-{choices['codebook_size']}-{seed}"
    record = {"signature": sig, "status": status, "choices": choices, "overrides": [f"{k}={v}" for k, v in choices.items()],
              "error": error, "host": host, "command": command or ["/nowhere/ibq-train", "seed=12345"],
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wandb": {"group": directory.parent.name}}
    (directory / "run.json").write_text(json.dumps(record))
    (directory / ".hydra").mkdir()
    (directory / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if results is not None:
        (directory / "results.json").write_text(json.dumps({"signature": sig, "step": 10, **results}))
    return directory


def seeded_sweep(root: Path) -> Path:
    """ibq, vq x 256, 1024 x seeds 0, 1, 2; utilization = base + seed / 100."""
    base = {("ibq", "256"): 0.9, ("ibq", "1024"): 0.8, ("vq", "256"): 0.5, ("vq", "1024"): 0.2}
    for (quantizer, size), value in base.items():
        for seed in range(3):
            fake_run(root / f"{quantizer}_{size}_{seed}", seed=seed, quantizer=quantizer, codebook_size=size,
                     results={"codebook/utilization": value + seed / 100, "codebook/perplexity": 10.0, "psnr": 20.0, "rfid": None})
    return root


# -- tables ---------------------------------------------------------------------------------------------
def test_table_groups_by_the_choices_that_differ_and_averages_seeds(tmp_path):
    table = build_table(discover(seeded_sweep(tmp_path / "sweep")))
    assert table.factors == ["quantizer", "codebook_size"]
    assert [row.key for row in table.rows] == [("ibq", "256"), ("ibq", "1024"), ("vq", "256"), ("vq", "1024")]
    cell = table.rows[1].cell("codebook/utilization")
    assert cell.n == 3 and math.isclose(cell.mean, 0.81) and math.isclose(cell.std, 0.01)
    assert "0.8100 ± 0.0100" in table.terminal()
    assert table.rows[0].cell("rfid").text(2) == "–"  # reported as null: not averaged as a number

    header, body = table.pivot("codebook_size", "codebook/utilization")
    assert header == ["quantizer", "codebook_size=256", "codebook_size=1024"]
    assert body[1] == ["vq", "0.5100 ± 0.0100", "0.2100 ± 0.0100"]

    csv_lines = table.csv().splitlines()
    assert csv_lines[0].startswith("quantizer,codebook_size,runs,codebook/utilization_mean,codebook/utilization_std,codebook/utilization_n")
    assert csv_lines[1].startswith("ibq,256,3,0.91")
    assert table.markdown().splitlines()[1].startswith("| :--- | :--- | ---: |")


def test_a_plain_key_that_differs_becomes_a_factor(tmp_path):
    for lr in (1e-4, 2e-4):
        run = fake_run(tmp_path / f"lr{lr}", signature=f"lr{lr}", results={"codebook/utilization": lr * 1000})
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        config["optim"]["lr"] = lr
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    table = build_table(discover(tmp_path))
    assert table.factors == ["optim.lr"]


def test_a_job_rerun_elsewhere_counts_once(tmp_path):
    fake_run(tmp_path / "a", signature="same", results={"codebook/utilization": 0.5})
    fake_run(tmp_path / "b", signature="same", results={"codebook/utilization": 0.5})
    assert [len(row.runs) for row in build_table(discover(tmp_path)).rows] == [1]


def test_several_sweep_folders_are_compared_in_one_table(tmp_path, monkeypatch, capsys):
    """The sweep of one quantizer and the sweep of another, in one table, plot and report; a configuration both
    folders completed counts once, the run of the folder given first; what they write goes to an analysis folder
    named after both (in either order), not into either sweep."""
    from ibq.cli.sweep import main as ibq_sweep

    ibq, vq = tmp_path / "ibq_sweep", tmp_path / "vq_sweep"
    for size in ("256", "1024"):
        fake_run(ibq / size, quantizer="ibq", codebook_size=size, results={"codebook/utilization": 0.9})
        fake_run(vq / size, quantizer="vq", codebook_size=size, results={"codebook/utilization": 0.3})
    fake_run(vq / "ibq_again", quantizer="ibq", codebook_size="256", results={"codebook/utilization": 0.1})
    fake_run(vq / "4096", quantizer="vq", codebook_size="4096", status="failed", error="out of memory")

    def utilization(*folders: Path) -> dict[tuple[str, str], float]:
        result = sweep_cli(["table", *map(str, folders), "--format", "csv", "--metrics", "codebook/utilization"])
        assert result.returncode == 0, result.stderr
        header, *rows = [line.split(",") for line in result.stdout.strip().splitlines()]
        factors = header.index("runs")
        return {tuple(row[:factors]): float(row[factors + 1]) for row in rows}

    assert utilization(ibq, vq) == {("ibq", "256"): 0.9, ("ibq", "1024"): 0.9, ("vq", "256"): 0.3, ("vq", "1024"): 0.3}
    assert utilization(vq, ibq)[("ibq", "256")] == 0.1
    assert utilization(ibq) == {("256",): 0.9, ("1024",): 0.9}  # one folder: as before

    terminal = sweep_cli(["table", str(ibq), str(vq)]).stdout.splitlines()
    assert terminal[0].startswith(f"sweeps {ibq.name}, {vq.name}: 4 completed runs in 4 groups")
    assert ("note: 1 completed run(s) repeat the configuration (signature) of a run listed before them, in the same folder or one "
            "given earlier, and are not counted") in terminal
    assert f"(1 job(s) not completed and not in the table: ibq-sweep status {vq})" in terminal

    monkeypatch.chdir(tmp_path)
    for order in ((ibq, vq), (vq, ibq)):
        with pytest.raises(SystemExit) as exited:
            ibq_sweep(["plot", *map(str, order), "--wandb", "disabled", "--metric", "codebook/utilization"])
        assert exited.value.code == 0
    written = [line.removeprefix("wrote ") for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]
    assert len(written) == 2 and written[0] == written[1] and Path(written[0]).is_file()
    assert Path(written[0]).parts[:2] == ("outputs", "analysis") and Path(written[0]).parts[2].startswith("compare-2-sweeps-")
    assert not (ibq / "plots").exists() and not (vq / "plots").exists()
    with pytest.raises(SystemExit) as exited:
        ibq_sweep(["report", str(ibq), str(vq), "--offline"])
    assert exited.value.code == 0
    report = (Path(written[0]).parents[1] / "report" / "report.md").read_text()
    assert report.startswith(f"# ibq sweeps {ibq.name}, {vq.name}\n\n## Sweeps\n\n- directory: {ibq} (W&B group {ibq.name})")
    assert "- failed: quantizer=vq codebook_size=4096 model_scale=tiny logger=none (out of memory)" in report


def test_sort_puts_the_best_rows_first_by_the_metrics_direction(tmp_path):
    for quantizer, rfid, utilization in (("a", 3.0, 0.5), ("b", 1.0, 0.2), ("c", None, 0.9), ("d", 2.0, 0.7)):
        fake_run(tmp_path / quantizer, quantizer=quantizer, results={"rfid": rfid, "codebook/utilization": utilization, "step": 10})

    def order(*options: str) -> list[str]:
        result = sweep_cli(["table", str(tmp_path), "--format", "csv", *options])
        assert result.returncode == 0, result.stderr
        return [line.split(",")[0] for line in result.stdout.strip().splitlines()[1:]]

    assert order() == ["a", "b", "c", "d"]
    assert order("--sort", "rfid") == ["b", "d", "a", "c"]  # lower is better; a run without it last
    assert order("--sort", "codebook/utilization") == ["c", "d", "a", "b"]  # higher is better
    assert order("--sort", "step", "--metrics", "rfid") == ["a", "b", "c", "d"]  # no direction: ascending, ties as they were
    header = sweep_cli(["table", str(tmp_path), "--format", "csv", "--sort", "step", "--metrics", "rfid"]).stdout.splitlines()[0]
    assert header == "quantizer,runs,rfid_mean,rfid_std,rfid_n,step_mean,step_std,step_n"  # the sorting metric is shown
    line = error_line(sweep_cli(["table", str(tmp_path), "--sort", "rfid", "--columns", "quantizer"]))
    assert line == ("error: --sort rfid orders the rows of one table, and --columns quantizer makes a table per metric whose rows "
                    "are the other factors: give one of the two")
    assert error_line(sweep_cli(["table", str(tmp_path), "--sort", "fid_50k"])).startswith("error: no run reports the metric 'fid_50k'; reported: ")


def test_where_keeps_the_runs_that_take_the_values_given(tmp_path):
    seeded_sweep(tmp_path / "sweep")
    run = tmp_path / "sweep" / "vq_1024_0" / ".hydra" / "config.yaml"
    run.write_text(run.read_text().replace("lr: 0.0001", "lr: 0.0002"))

    def rows(*where: str) -> list[list[str]]:
        result = sweep_cli(["table", str(tmp_path / "sweep"), "--format", "csv", "--metrics", "codebook/utilization",
                            *[f"--where={condition}" for condition in where]])
        assert result.returncode == 0, result.stderr
        return [line.split(",")[:-3] for line in result.stdout.strip().splitlines()]

    assert rows("codebook_size=256") == [["quantizer", "runs"], ["ibq", "3"], ["vq", "3"]]
    assert rows("quantizer=vq,fsq", "codebook_size=1024") == [["optim.lr", "runs"], ["0.0001", "2"], ["0.0002", "1"]]
    assert rows("optim.lr=2e-4") == [["runs"], ["1"]]  # 2e-4 is 0.0002
    terminal = sweep_cli(["table", str(tmp_path / "sweep"), "--where", "quantizer=vq"]).stdout
    assert terminal.startswith("sweep sweep where quantizer=vq: 6 completed runs in 3 groups")
    refusals = {
        "quantiser=vq": "error: --where quantiser=vq: no run has the key 'quantiser'; give a config group, codebook_size or a config key "
                        "(e.g. quantizer, optim.lr)",
        "codebook_size=4096": "error: --where codebook_size=4096: no run has that value of codebook_size; its values: 256, 1024",
        "quantizer": "error: --where 'quantizer': give KEY=VALUE or KEY=VALUE,VALUE, e.g. --where codebook_size=1024,16384",
    }
    for condition, line in refusals.items():
        assert error_line(sweep_cli(["table", str(tmp_path / "sweep"), "--where", condition])) == line


def test_runs_of_two_apps_are_not_compared(tmp_path):
    tokenizers, generators = tmp_path / "tokenizers", tmp_path / "generators"
    for folder, kind in ((tokenizers, "tokenizer"), (generators, "generator")):
        run = fake_run(folder / "run", results={"codebook/utilization": 0.9})
        record = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**record, "kind": kind}))
    line = error_line(sweep_cli(["table", str(tokenizers), str(generators)]))
    assert line == (f"error: {generators} holds runs of ibq-train-ar and {tokenizers} runs of ibq-train: a table, plot or report "
                    f"compares runs of one app; give their folders in separate commands")


# -- states ---------------------------------------------------------------------------------------------
def test_states_and_reasons(tmp_path):
    root = tmp_path / "sweep"
    fake_run(root / "done", results={"codebook/utilization": 0.5}, quantizer="a")
    fake_run(root / "no_results", quantizer="b")
    fake_run(root / "failed", status="failed", error="RuntimeError: out of memory", quantizer="c")
    fake_run(root / "preempted", status="preempted", quantizer="d")
    fake_run(root / "killed", status="running", quantizer="e")  # this host, and no such process
    fake_run(root / "remote", status="running", host="some-other-node", quantizer="f")
    states = {s.run.name: (s.state, s.reason) for s in load_sweep(root).jobs}
    assert states["done"] == ("done", "")
    assert states["no_results"][0] == "failed" and "no results.json" in states["no_results"][1]
    assert states["failed"] == ("failed", "RuntimeError: out of memory")
    assert states["preempted"][0] == "preempted"
    assert states["killed"][0] == "interrupted" and "process is gone" in states["killed"][1]
    assert states["remote"][0] == "running" and "some-other-node" in states["remote"][1]


def test_status_names_an_unreadable_run_json(tmp_path):
    root = tmp_path / "sweep"
    fake_run(root / "done", results={"codebook/utilization": 0.5})
    (fake_run(root / "torn", quantizer="vq") / "run.json").write_text('{"signature": "vq-10')
    sweep = load_sweep(root)
    assert [s.run.name for s in sweep.jobs] == ["done"]
    assert sweep.notes == [f"{root / 'torn' / 'run.json'} cannot be read (JSONDecodeError: Unterminated string starting at: "
                           f"line 1 column 15 (char 14)): its run is not counted"]
    (root / "done" / "run.json").write_text("[]")
    with pytest.raises(UserError, match=r"holds no readable run \(2 run.json file\(s\) cannot be read, first .*run.json\)"):
        load_sweep(root)


def test_a_running_job_is_found_by_its_command_line(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "ibq.cli.train", "codebook_size=1024"])
    try:
        time.sleep(0.5)
        record = {"host": HOST, "command": ["/repo/ibq/cli/train.py", "codebook_size=1024"],
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        assert run_process_alive(record) is True
        assert run_process_alive({**record, "command": ["/repo/ibq/cli/train.py", "codebook_size=8192"]}) is False
        # a process that started after the run recorded its start is not the run's
        assert run_process_alive({**record, "started": "2000-01-01T00:00:00+0000"}) is False
        assert run_process_alive({**record, "pid": process.pid}) is True
    finally:
        process.kill()
        process.wait()
    assert run_process_alive({**record, "pid": process.pid}) is False


def test_completed_run_hook_finds_a_finished_signature_elsewhere(tmp_path):
    done = fake_run(tmp_path / "old" / "run", signature="abc", results={})
    fake_run(tmp_path / "old" / "unfinished", signature="def", status="running")
    assert completed_run("abc", [tmp_path]) == done
    assert completed_run("abc", [tmp_path], exclude=done) is None
    assert completed_run("def", [tmp_path]) is None


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`ibq-sweep table … | head -1`: the reader is gone before the table is written."""
    root = seeded_sweep(tmp_path / "sweep")
    table = subprocess.Popen(IBQ_SWEEP + ["table", str(root)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=cli_env())
    table.stdout.close()
    assert table.wait(timeout=120) == 0 and table.stderr.read() == ""


def test_status_of_a_tokenize_sweep_lists_its_jobs_outcomes(tmp_path):
    sweep = tmp_path / "tokens"
    (sweep / ".jobs").mkdir(parents=True)
    hydra = {"job": {"config_name": "tokenize"}, "overrides": {"task": ["tokenizer_run=run", "samples=16,32,64"], "hydra": []},
             "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra, "tokenizer_run": "run"}))
    records = [{"num": 0, "overrides": ["tokenizer_run=run", "samples=16"], "status": "done", "reason": "", "output_dir": "/x/samples=16"},
               {"num": 1, "overrides": ["tokenizer_run=run", "samples=32"], "status": "failed", "reason": "disk full"}]
    for record in records:
        (sweep / ".jobs" / f"{record['num']}.json").write_text(json.dumps(record))
    status = sweep_cli(["status", str(sweep)])
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines() == [
        f"sweep {sweep}: 1 of 3 jobs done, 1 failed, 1 not ended yet (pending, running, or ended without an outcome: see .submitit/)",
        "  job 1/3 (tokenizer_run=run samples=16): done: /x/samples=16",
        "  job 2/3 (tokenizer_run=run samples=32): failed: disk full",
    ]
    line = error_line(sweep_cli(["retry", str(sweep)]))
    assert line == (f"error: {sweep} is a sweep of ibq-tokenize, whose jobs leave no training runs: ibq-sweep status lists its jobs; "
                    "table, plot and report take sweeps of ibq-train, ibq-train-ar and ibq-sample, retry those of ibq-train and ibq-train-ar")


def test_a_waiting_launch_sees_its_jobs_done_failed_running_at_their_step_and_queued(tmp_path):
    sweep = tmp_path / "sweep"
    stale = fake_run(sweep / "stale", status="running", quantizer="old")  # left running by an earlier launch
    os.utime(stale / "run.json", (time.time() - 600,) * 2)
    since = time.time() - 60
    done = fake_run(sweep / "done", results={"psnr": 20.0}, quantizer="a")
    (sweep / ".jobs").mkdir()
    (sweep / ".jobs" / "0.json").write_text(json.dumps({"num": 0, "status": "done", "output_dir": str(done)}))
    (sweep / ".jobs" / "1.json").write_text(json.dumps({"num": 1, "status": "failed", "reason": "disk full"}))
    (sweep / ".jobs" / "2.json").write_text('{"num": 2, "sta')  # being written: counted at the next look
    for name, step in (("half", 30), ("started", None)):
        run = fake_run(sweep / name, status="running", quantizer=name)
        record = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**record, "total_steps": 60}))
        if step:
            (run / "metrics.jsonl").write_text(json.dumps({"step": 10}) + "\n" + json.dumps({"step": step, "loss": 1.0}) + "\n")
    fake_run(sweep / "requeued", status="requeued", quantizer="r")

    snapshot = sweep_snapshot(sweep, 8, since)
    assert (snapshot.done, snapshot.failed, snapshot.requeued) == (1, 1, 1)
    assert sorted(snapshot.running, key=str) == [(30, 60), (None, 60)]
    assert snapshot.work_done == 2.5
    assert snapshot.text() in ("1 done, 1 failed, 2 running (30/60, 0/60), 1 requeued, 3 queued",
                               "1 done, 1 failed, 2 running (0/60, 30/60), 1 requeued, 3 queued")
    assert sweep_snapshot(sweep, None, since).text().endswith("1 requeued")  # a search: no count of the queued ones


def test_the_watch_writes_the_sweeps_progress_and_its_last_state_and_stays_out_of_pickled_jobs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    (sweep / ".jobs").mkdir(parents=True)
    watch = SweepWatch(sweep, 2, "slurm jobs", poll_s=0.05)
    watch.start()
    progress = SweepProgress()  # submitit pickles the callbacks with every job while the watch runs
    assert vars(pickle.loads(pickle.dumps(progress))) == vars(progress)
    time.sleep(0.3)
    (sweep / ".jobs" / "0.json").write_text(json.dumps({"num": 0, "status": "done"}))
    (sweep / ".jobs" / "1.json").write_text(json.dumps({"num": 1, "status": "failed", "reason": "x"}))
    SweepWatch.stop_all()
    assert not watch.is_alive() and not SweepWatch.running
    shown = capsys.readouterr().err.replace("\r", "\n")
    assert "slurm jobs:   0%" in shown and "2 queued" in shown
    assert shown.rstrip().splitlines()[-1].startswith("slurm jobs: 100%") and shown.rstrip().endswith("1 done, 1 failed")


# -- one-line errors --------------------------------------------------------------------------------------
def no_wandb_env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    return {**env, "HOME": str(tmp_path), "WANDB_SILENT": "true", **extra}


def test_unknown_sweep_is_one_line():
    line = error_line(sweep_cli(["plan", "no_such_sweep"]))
    assert "unknown sweep 'no_such_sweep'" in line and "codebook_scaling" in line
    line = error_line(sweep_cli(["plan", "sweep=no_such_sweep"]))
    assert "sweep=no_such_sweep is not a config" in line


def test_directory_without_runs_is_one_line(tmp_path):
    for command in ("status", "table", "plot", "report"):
        line = error_line(sweep_cli([command, str(tmp_path)]))
        assert "holds no runs" in line


def test_metric_no_run_reports_is_one_line(tmp_path):
    root = seeded_sweep(tmp_path / "sweep")
    line = error_line(sweep_cli(["table", str(root), "--metrics", "codebook/utilization,fid_50k"]))
    assert "no run reports the metric 'fid_50k'" in line and "codebook/utilization" in line
    line = error_line(sweep_cli(["plot", str(root), "--metric", "lpips", "--wandb", "disabled"]))
    assert "no run reports the metric 'lpips'" in line


def test_wandb_source_merges_each_evaluation_into_its_training_run():
    from types import SimpleNamespace

    from ibq.ledger.wandb_source import grouped_runs

    def api_run(run_id, config, summary):
        return SimpleNamespace(id=run_id, name=run_id, entity="e", project="ibq", group="g", state="finished", config=config, summary=summary)

    trained = api_run("abc", {"choices": {"quantizer": "ibq"}, "seed": 0}, {"psnr": 20.0, "rfid": 9.0})
    evaluations = [api_run("abc-eval-8", {"train_run_id": "abc", "evaluated_step": 8}, {"rfid": 5.0, "coco/rfid": 7.0}),
                   api_run("abc-eval-4", {"train_run_id": "abc", "evaluated_step": 4}, {"rfid": 6.0})]
    (run,) = grouped_runs([evaluations[0], trained, evaluations[1]])
    assert run.signature == "abc" and run.choices == {"quantizer": "ibq"}
    assert run.results == {"psnr": 20.0, "rfid": 5.0, "coco/rfid": 7.0}  # the latest step's evaluation last


def test_wandb_source_without_credentials_or_network_is_one_line_and_quick(tmp_path):
    root = seeded_sweep(tmp_path / "sweep")
    result = sweep_cli(["table", str(root), "--source", "wandb"], env=no_wandb_env(tmp_path))
    assert "no W&B credentials" in error_line(result)
    with_key = {"WANDB_API_KEY": "x" * 40}
    result = sweep_cli(["table", str(root), "--source", "wandb"], env=no_wandb_env(tmp_path, **with_key, WANDB_BASE_URL="http://127.0.0.1:9"))
    assert "W&B at http://127.0.0.1:9 cannot be reached" in error_line(result)
    # an address something answers for, but not W&B (sandboxes and proxies accept any connection)
    started = time.perf_counter()
    env = no_wandb_env(tmp_path, **with_key, WANDB_BASE_URL="http://10.255.255.1:81")
    line = error_line(sweep_cli(["table", str(root), "--source", "wandb"], env=env, timeout=60))
    assert line.startswith("error: --source wandb: W&B at http://10.255.255.1:81 ")
    assert time.perf_counter() - started < 30


# -- a killed job, retried ------------------------------------------------------------------------------
@pytest.mark.slow
def test_retry_reruns_the_killed_job_alone(tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "ibq.cli.train", "-m", "quantizer=ibq,vq", "codebook_size=256", "train.steps=20",
               "train.log_every=1", "train.checkpoint_every=5", "data.val_crops_per_photo=1", "eval.rfid=false",
               "logger=none", f"hydra.sweep.dir={sweep_dir}"]
    process = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    second = None
    deadline = time.time() + 600
    while time.time() < deadline:  # kill the sweep once the second job has a checkpoint
        second = next((d for d in sweep_dir.glob("*quantizer=vq*") if (d / "checkpoints" / "last.pt").exists()), None)
        if second is not None:
            break
        time.sleep(0.5)
    assert second is not None, "the second job never wrote a checkpoint"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    first = next(sweep_dir.glob("*quantizer=ibq*"))
    first_record = (first / "run.json").read_text()
    multirun = (sweep_dir / "multirun.yaml").read_text()
    status = sweep_cli(["status", str(sweep_dir)])
    assert status.returncode == 0, status.stderr
    rows = [line.split() for line in status.stdout.splitlines()]
    states = {row[0]: row[1] for row in rows if len(row) > 1 and row[0].isdigit() and row[1] in STATE_ORDER}
    assert states == {"0": "done", "1": "interrupted"}, status.stdout

    retry = sweep_cli(["retry", str(sweep_dir)])
    assert retry.returncode == 0, retry.stdout[-2000:] + retry.stderr[-3000:]
    assert "relaunching 1 job(s)" in retry.stdout
    assert (first / "run.json").read_text() == first_record  # untouched
    record = json.loads((second / "run.json").read_text())
    assert record["status"] == "completed" and record["resumes"] and record["resumes"][0]["step"] >= 5
    assert (second / "results.json").exists()
    assert (sweep_dir / "multirun.yaml").read_text() == multirun  # the sweep's own record is kept
    assert json.loads((sweep_dir / "sweep.json").read_text())["plan"]["jobs"][1]["subdir"] == second.name
    assert "nothing to retry" in sweep_cli(["retry", str(sweep_dir)]).stdout


# -- launch skips what completed, tables include it -------------------------------------------------------
@pytest.mark.slow
def test_launch_runs_only_signatures_not_completed_anywhere(tiny_sweep, tmp_path):
    new_dir = tmp_path / "relaunch"
    overrides = [a for a in TINY_SWEEP if not a.startswith("sweep=")] + ["quantizer=ibq,vq,fsq"]
    result = sweep_cli(["launch", "codebook_scaling", *overrides, "--runs", str(tiny_sweep), "--dir", str(new_dir)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "6 jobs: 4 already completed, 2 to run" in result.stdout
    assert sorted(json.loads(p.read_text())["choices"]["quantizer"] for p in new_dir.glob("*/run.json")) == ["fsq", "fsq"]
    table = sweep_cli(["table", str(new_dir), "--runs", str(tiny_sweep)])
    assert table.returncode == 0, table.stderr
    assert [line.split()[0] for line in table.stdout.splitlines() if line.split()[:1] in (["fsq"], ["ibq"], ["vq"])] == ["fsq"] * 2 + ["ibq"] * 2 + ["vq"] * 2


# -- plots and reports --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_plot_is_logged_to_wandb_offline(tiny_sweep, tmp_path):
    out = tmp_path / "plots"
    result = sweep_cli(["plot", str(tiny_sweep), "--out", str(out)], env=no_wandb_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "codebook_utilization_vs_codebook_size.png").exists()
    wandb_run = Path(result.stdout.split("W&B (offline): ")[1].split()[0])
    assert wandb_run.parent == tiny_sweep / "analysis" / "wandb" and wandb_run.name.startswith("offline-run-")
    assert list(wandb_run.glob("*.wandb"))


@pytest.mark.slow
def test_report_falls_back_to_local_files_without_wandb(tiny_sweep, tmp_path):
    out = tmp_path / "report"
    result = sweep_cli(["report", str(tiny_sweep), "--out", str(out)], env=no_wandb_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "W&B Report not created (no W&B credentials" in result.stdout
    markdown = (out / "report.md").read_text()
    assert "| quantizer | codebook_size |" in markdown and "codebook_utilization_vs_codebook_size.png" in markdown
    assert "utilization by codebook size" in markdown
    page = (out / "report.html").read_text()
    assert "<table>" in page and "data:image/png;base64," in page


def test_wandb_report_is_built_from_the_table(tmp_path):
    from ibq.report.report import wandb_report

    table = build_table(discover(seeded_sweep(tmp_path / "sweep")))
    report = wandb_report("ibq sweep g", "a test", table, groups=["g"], project="ibq", entity="someone", curves=["loss/g"])
    assert report.entity == "someone" and len(report.blocks) == 4
    assert "| quantizer | codebook_size |" in report.blocks[2].text
