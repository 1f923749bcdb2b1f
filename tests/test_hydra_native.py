"""ibq as a Hydra user meets it: a wheel that runs from any directory with its own configs and the
user's presets, Hydra's command line (completion, dict overrides), and value checks told in one line."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import IBQ_TRAIN, REPO, cli_env, error_line, require_slow_mark, run_cli
from ibq.config import APPS, CONF_DIR, check_values, hydra_value, shell_override
from ibq.errors import UserError
from ibq.runs.record import run_dirname

# What a wheel is built from: the working tree without its environment, outputs and caches.
NOT_PACKAGED = (".venv", ".git", "outputs", "multirun", "build", "*.egg-info", "__pycache__", ".pytest_cache", "wandb")
MY_QUANTIZER = "defaults:\n  - ibq\n  - _self_\nentropy_weight: 0.05\n"


@pytest.mark.slow
def test_the_wheel_runs_from_another_directory_with_a_user_preset(tmp_path: Path):
    shutil.copytree(REPO, tmp_path / "src", symlinks=True, ignore=shutil.ignore_patterns(*NOT_PACKAGED))
    pip = [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "wheel", tmp_path / "src"], check=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("ibq-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp_path / "site", wheel], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "myconf" / "quantizer").mkdir(parents=True)
    (elsewhere / "myconf" / "quantizer" / "myq.yaml").write_text(MY_QUANTIZER)
    env = cli_env(PYTHONPATH=str(tmp_path / "site"))

    def app(name: str, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, tmp_path / "site" / "bin" / name, *args], cwd=elsewhere, env={**env, **extra_env},
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    where = subprocess.run([sys.executable, "-c", "import ibq.config as c; print(c.__file__, c.CONF_DIR)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(path).is_relative_to(tmp_path / "site") for path in where)
    assert len(list(Path(where[1]).rglob("*.yaml"))) >= len(list((REPO / "conf").rglob("*.yaml")))
    assert "quantizer:" in app("ibq-train", "--cfg", "job").stdout
    # A Slurm job's dry run on a machine without Slurm.
    assert "generator_total" in app("ibq-train", "model_scale=paper", "cluster=slurm", "dry_run=true", PATH="/nonexistent").stdout
    assert "8 jobs" in app("ibq-sweep", "plan", "codebook_scaling").stdout
    app("ibq-train", "--config-dir", "myconf", "quantizer=myq", "train.steps=2", "train.log_every=1", "logger=none",
        "eval.rfid=false", "data.val_crops_per_photo=1", "hydra.run.dir=run")
    record = json.loads((elsewhere / "run" / "run.json").read_text())
    assert record["status"] == "completed" and record["choices"]["quantizer"] == "myq"
    assert record["git"] == {"sha": None, "dirty": None, "repository": "not a git checkout"}
    assert OmegaConf.load(elsewhere / "run" / ".hydra" / "config.yaml").quantizer.entropy_weight == 0.05


MY_QUANTIZER_CLASS = """from ibq.quantizers import VQ


class ScaledVQ(VQ):
    \"\"\"VQ of the encoder's output scaled by a fixed factor.\"\"\"

    def __init__(self, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def forward(self, z):
        return super().forward(z * self.scale)
"""
MY_QUANTIZER_PRESET = "_target_: myquant.ScaledVQ\ncodebook_size: ${codebook_size}\ndim: ${model.embed_dim}\nbeta: 0.25\nscale: 0.5\n"


@pytest.mark.slow
def test_a_quantizer_class_of_the_users_own_trains_and_is_evaluated_through_its_preset(tmp_path: Path):
    """The quantizer contract is the API: a class outside ibq, named by a preset in --config-dir, trains and
    is evaluated like ibq's own; evaluated where its package cannot be imported, the run is named in one line."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "myquant.py").write_text(MY_QUANTIZER_CLASS)
    (tmp_path / "myconf" / "quantizer").mkdir(parents=True)
    (tmp_path / "myconf" / "quantizer" / "scaled_vq.yaml").write_text(MY_QUANTIZER_PRESET)

    def app(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", f"ibq.cli.{module}", *args]
        require_slow_mark(command)
        return subprocess.run(command, cwd=tmp_path, env=cli_env(**env), capture_output=True, text=True, timeout=600)

    trained = app("train", "--config-dir", "myconf", "quantizer=scaled_vq", "train.steps=2", "logger=none", "eval.rfid=false",
                  "data.val_crops_per_photo=1", "hydra.run.dir=run", PYTHONPATH=str(tmp_path / "pkg"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "completed" and record["choices"]["quantizer"] == "scaled_vq"
    evaluated = app("eval", "run_dir=run", "metrics.fid=false", PYTHONPATH=str(tmp_path / "pkg"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = (tmp_path / "run" / "results.json").read_text()
    assert json.loads(results)["codebook/utilization"] > 0

    elsewhere = app("eval", "run_dir=run", "metrics.fid=false")
    assert elsewhere.returncode == 2
    assert error_line(elsewhere) == ("error: quantizer._target_='myquant.ScaledVQ' cannot be imported (No module named 'myquant'): "
                                     "name a class or function of an installed module, or put its package on PYTHONPATH")
    assert (tmp_path / "run" / "results.json").read_text() == results


@pytest.mark.slow
def test_shell_completion_answers_with_the_groups():
    query = subprocess.run(IBQ_TRAIN + ["-sc", "query=bash"], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**cli_env(), "COMP_LINE": "ibq-train quantizer="})
    assert query.returncode == 0, query.stderr[-2000:]
    assert {"quantizer=ibq", "quantizer=vq", "quantizer=lfq"} <= set(query.stdout.split())


@pytest.mark.slow
@pytest.mark.parametrize(("module", "app"), [("train", "ibq-train"), ("train_ar", "ibq-train-ar"), ("tokenize", "ibq-tokenize"),
                                             ("sample", "ibq-sample"), ("eval", "ibq-eval")])
def test_help_says_what_the_app_does_then_lists_hydras_groups_and_config(module: str, app: str):
    result = run_cli([sys.executable, "-m", f"ibq.cli.{module}", "--help"], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    about, groups = result.stdout.split("\n\n== Configuration groups ==\n", 1)
    assert about.startswith(f"{app}: ") and f"\n  {app} " in about  # a description, then examples
    assert "\ncluster: local, local_parallel, slurm, slurm_gpu, slurm_multinode\n" in groups
    listed = groups.split("\n== Config ==\n")[0].splitlines()[2:]  # only groups a user picks from, not plumbing
    assert {line.split(":")[0] for line in listed if line} <= {"cluster", "data", "data/source", "deepspeed", "experiment", "logger",
                                                               "model_scale", "quantizer", "sweep"}
    assert "\n== Config ==\n" in groups and "Use --hydra-help to view Hydra specific help" in groups


def loaded_after(code: str, modules: tuple[str, ...]) -> tuple[str, list[str]]:
    """`code` run in a fresh process: (what it printed, those of `modules` it loaded)."""
    code += f"\nimport sys; print(' '.join(m for m in {modules!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=cli_env())
    assert result.returncode == 0, result.stderr[-2000:]
    *printed, loaded = result.stdout.splitlines()
    return "\n".join(printed), loaded.split()


@pytest.mark.parametrize("app", ["ibq.cli.train", "ibq.cli.train_ar", "ibq.cli.eval", "ibq.cli.sample", "ibq.cli.tokenize"])
def test_an_app_loads_without_torch_so_completion_and_help_answer_at_once(app: str):
    """Completion, --help and --cfg load the app's module and compose its config, nothing more: torch,
    which takes seconds to import, is loaded by the job that uses it."""
    _, loaded = loaded_after(f"import {app}", ("torch", "scipy", "deepspeed", "wandb"))
    assert loaded == [], f"importing {app} loads {' '.join(loaded)}"


@pytest.mark.parametrize(("config_name", "missing_run"), [("train", "init_from"), ("train_ar", "tokenizer_run"),
                                                         ("tokenize", "tokenizer_run"), ("sample", "run_dir"), ("eval", "run_dir")])
def test_a_job_refused_by_its_checks_loads_no_evaluation_or_image_library(config_name: str, missing_run: str):
    """`ibq-sample run_dir=<typo>` answers after loading what its checks need: torch, not scikit-image's
    metrics (which load scipy.stats) or torchvision, seconds more of every such answer."""
    refusal, loaded = loaded_after(f"""
from hydra import compose, initialize_config_dir
from ibq.cli.checks import check_job
from ibq.errors import UserError
with initialize_config_dir({str(CONF_DIR)!r}, version_base=None):
    cfg = compose({config_name!r}, overrides=[{missing_run!r} + "=/no/such/run"])
try:
    check_job(cfg, {config_name!r})
except UserError as error:
    print(error)""", ("scipy", "skimage", "torchvision"))
    assert refusal.startswith(f"{missing_run}=/no/such/run does not exist"), refusal
    assert loaded == [], f"the checks of {APPS[config_name]} load {' '.join(loaded)}"


@pytest.mark.parametrize("value", ["outputs/multirun/2026-12-01_10-00-00/codebook_size=1024,seed=0", "/runs/my run", 'a"b', "it's",
                                   "C:\\runs\\", 'q\\"x', "x[1]", "plain/run-1.2_x"])
def test_a_printed_override_reads_back_as_its_value_in_a_shell_and_in_hydra(value: str):
    """The commands ibq prints for the next step (tokenize, sample, extend a run) name run folders, which are
    named after their overrides: copied into a shell, they must give Hydra the folder's name."""
    parser = OverridesParser.create()
    assert parser.parse_override(f"run_dir={hydra_value(value)}").value() == value
    (argument,) = shlex.split(shell_override("run_dir", value))
    assert parser.parse_override(argument).value() == value
    assert shell_override("run_dir", "plain/run-1.2_x") == "run_dir=plain/run-1.2_x"  # left as typed


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"seed": "abc"}, "seed='abc' is invalid: it must be an integer"),
        ({"seed": ""}, "seed='' is invalid"),
        ({"optim": {"lr": float("nan")}}, "optim.lr=nan is invalid: it must be a finite number > 0"),
        ({"optim": {"lr": float("inf")}}, "optim.lr=inf is invalid"),
        ({"optim": {"lr": 1e-4, "betas": [0.5]}}, "optim.betas=[0.5] is invalid: it must be two numbers in [0, 1)"),
        ({"data": {"num_workers": -1}}, "data.num_workers=-1 is invalid: it must be an integer >= 0"),
        ({"train": {"ema_decay": 5}}, "train.ema_decay=5 is invalid: it must be a number in [0, 1)"),
        ({"train": {"keep_every": -1}}, "train.keep_every=-1 is invalid: it must be an integer >= 0 (0: keep checkpoints/last.pt only)"),
        ({"ar_train": {"keep_every": 2.5}}, "ar_train.keep_every=2.5 is invalid: it must be an integer >= 0 (0: keep checkpoints/last.pt only)"),
        ({"codebook_size": 0}, "codebook_size=0 is invalid: it must be a positive integer"),
        ({"codebook_size": 1024.0}, "codebook_size=1024.0 is invalid: it must be a positive integer"),
        ({"codebook_size": "1024"}, "codebook_size='1024' is invalid: it must be a positive integer"),
        ({"codebook_size": 256, "quantizer": {"codebook_size": 512}}, "codebook_size=256 and quantizer.codebook_size=512 disagree"),
    ],
)
def test_values_no_run_can_use_are_refused(values: dict, expected: str):
    with pytest.raises(UserError) as refused:
        check_values(OmegaConf.create(values))
    assert expected in str(refused.value)


def test_values_a_run_can_use_pass():
    check_values(OmegaConf.create({"seed": 3, "optim": {"lr": 1e-4, "betas": [0.5, 0.9]}, "data": {"num_workers": 0},
                                   "train": {"ema_decay": 0.0, "keep_every": 0}, "ar_train": {"keep_every": 500}, "codebook_size": 262144, "quantizer": {"codebook_size": "${codebook_size}"}}))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        # Hydra would launch no job and end with status 0.
        ("quantizer=glob(nope*)", "quantizer=glob(nope*) matches no config of quantizer; valid: ema_vq, fsq, ibq, l2_vq, lfq, simvq, vq"),
        # Hydra's grid sweeper would raise its traceback.
        ("codebook_size=int(interval(1,5))", "codebook_size=int(interval(1,5)): a search space, not a list, takes a search sweeper"),
    ],
)
def test_a_sweep_the_grid_cannot_run_is_one_line_before_anything_is_written(tmp_path: Path, sweep: str, expected: str):
    result = run_cli(IBQ_TRAIN + ["-m", sweep, f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert result.returncode == 2
    assert error_line(result).startswith(f"error: {expected}")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_bad_value_in_a_sweep_is_one_line_before_anything_is_written(tmp_path: Path):
    result = run_cli(IBQ_TRAIN + ["-m", "quantizer=glob(*vq)", "seed=0,1,abc", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert error_line(result) == "error: seed='abc' is invalid: it must be an integer"
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
@pytest.mark.parametrize("swept", ["train.compile=none,default", "logger=none,wandb", "data.num_workers=0,2"])
def test_a_sweep_whose_jobs_would_share_a_run_directory_is_refused_up_front(tmp_path: Path, swept: str):
    """Keys that do not name a run (how the step uses the device, where it logs, loader workers) swept alone
    would send every job into one run directory: the second would resume or re-evaluate the first's run."""
    key = swept.split("=")[0]
    result = run_cli(IBQ_TRAIN + ["-m", swept, "train.steps=2", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert error_line(result).startswith(f"error: {swept}: these jobs would share one run directory, since {key} does not name runs")
    assert "hydra.sweep.subdir" in error_line(result) and result.returncode == 2
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_sweep_subdir_may_interpolate_the_job_number(tmp_path: Path):
    """Hydra's own way to name a sweep's folders, which also separates jobs that differ in keys that do not
    name runs: the override's interpolation belongs to each job, not to the checks made before them."""
    result = run_cli(IBQ_TRAIN + ["-m", "dry_run=true", "train.compile=none,default", "hydra.sweep.subdir=job${hydra.job.num}",
                                  f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 of 2 jobs done" in result.stdout


@pytest.mark.parametrize(("config_name", "swept", "refused"), [
    ("train_ar", "tokenizer_run=runs/ibq,runs/vq", None),  # outputs/multirun_ar/<time>/ibq/..., .../vq/...
    ("tokenize", "tokenizer_run=runs/ibq,runs/vq", None),
    ("train_ar", "tokenizer_run=a/run,b/run,c/vq", "tokenizer_run=a/run,b/run: these jobs would share one run directory, "
                                                   "since hydra.sweep.subdir names each of them 'run/…'"),
    ("sample", "run_dir=a,b", "run_dir=a,b: these jobs would share one run directory, since run_dir does not name runs"),
])
def test_a_sweep_over_input_runs_gives_each_run_its_folder_where_their_names_differ(config_name: str, swept: str, refused: str | None):
    """Stage II across tokenizers (-m tokenizer_run=a,b): a job's folder is named by its tokenizer run, as a
    single run's is (outputs/train_ar/<run>/<overrides>). ibq-sample names its folders by its settings alone."""
    from ibq.cli.checks import check_distinct_run_dirs

    told = sweep_check(check_distinct_run_dirs, config_name, [swept])
    assert told is None if refused is None else told.startswith(refused) and "hydra.sweep.subdir=job${hydra.job.num}" in told


@pytest.mark.parametrize(("overrides", "refused"), [
    (["run_dir=a,b"], "run_dir=a,b: hydra.sweep.dir (${oc.select:run_dir,outputs}/samples/multirun_${now:%Y-%m-%d_%H-%M-%S}) "
                      "depends on run_dir, so these jobs would each get a sweep folder of their own"),
    (["run_dir=a,b", "hydra.sweep.dir=compared"], None),  # one folder: the sweep's record of its jobs is in it
    (["run_dir=a", "part=0,1"], None),  # the parts of one run's sampling, in <run_dir>/samples/multirun_<time>
])
def test_a_sweep_whose_folder_follows_a_swept_key_is_refused(overrides: list[str], refused: str | None):
    """ibq-sample -m run_dir=a,b: Hydra resolves each job's hydra.sweep.dir with its own run_dir."""
    from ibq.cli.checks import check_one_sweep_dir

    told = sweep_check(check_one_sweep_dir, "sample", overrides)
    assert told is None if refused is None else told.startswith(refused) and "'hydra.sweep.subdir=job${hydra.job.num}'" in told


def sweep_check(check, config_name: str, overrides: list[str]) -> str | None:
    """What `check`, one of ibq.cli.checks' sweep checks, refuses of `config_name -m <overrides>`; None: nothing."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ibq.cli.checks import sweep_lines

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=[o for o in overrides if o.startswith("hydra.")], return_hydra_config=True)
        cfg.hydra.overrides.task = [o for o in overrides if not o.startswith("hydra.")]
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        try:
            check(cfg, parser.parse_overrides(sweep_lines(cfg)))
        except UserError as error:
            return str(error)
    return None


def test_the_keys_that_do_not_name_a_tokenizer_run_are_those_its_signature_leaves_out():
    """A key in one list only would either send runs of different signatures into one directory (refused as
    another configuration) or start a new run where the same one should resume."""
    from ibq.runs.record import NON_RESULT_KEYS

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    placement = ("cluster", "logger")  # every key under them, in both
    unnamed = {key for key in cfg.hydra.job.config.override_dirname.exclude_keys if key.split(".")[0] not in placement}
    unsigned = {key for key in NON_RESULT_KEYS if key.split(".")[0] not in placement}
    assert unnamed - {"hydra.run.dir"} == unsigned - {"run_dir"}  # where Hydra puts a run; ibq-eval's input run


def test_an_experiment_names_its_run_directory():
    """So that a sweep over presets (-m experiment=ibq_1024,ibq_8192) gives each its own run."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=ibq_1024", "data.root=/imagenet"], return_hydra_config=True)
    assert cfg.hydra.job.override_dirname == "data.root=/imagenet,experiment=ibq_1024"


def test_a_run_named_after_more_overrides_than_a_file_name_holds_gets_a_name_that_fits():
    """A fine-tuning run repeats its parent's model overrides (ibq-import lists about 20): Hydra's name for it
    would pass the file system's 255 bytes and end in a traceback."""
    overrides = ["model_scale=tiny", "codebook_size=64", "model.embed_dim=32", "model.encoder.ch=32", "model.encoder.ch_mult=[1,1]",
                 "model.encoder.num_res_blocks=1", "model.encoder.attn_levels=[1]", "model.encoder.z_channels=32",
                 "data.resolution=16", "quantizer.codebook_weight=0.25", "quantizer.entropy_temperature=0.01",
                 "quantizer.sample_entropy_weight=1.0", "quantizer.codebook_entropy_weight=1.0", "quantizer.entropy_weight=0.05",
                 "loss.generator_adv_weight=0.1", "loss.lecam_weight=0.05", "discriminator.n_layers=1", "train.steps=20"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        names = [Path(compose("train", overrides=given, return_hydra_config=True).hydra.run.dir).name
                 for given in (overrides, overrides[::-1], overrides[:-1] + ["train.steps=40"])]
    assert len(names[0].encode()) <= 255 and names[0] == names[1]  # the same run, however the overrides are ordered
    assert names[0] != names[2]  # another run: the hash of all of them tells them apart
    assert names[0].startswith("codebook_size=64,data.resolution=16,discriminator.n_layers=1,")
    kept = [override for override in overrides if f"{override}," in names[0]]
    assert names[0].endswith(f",+{len(overrides) - len(kept)}_more-{names[0][-10:]}")
    assert run_dirname("data.root=/" + "x" * 300).startswith("data.root=_xxx") and len(run_dirname("d=" + "é" * 200).encode()) <= 255


@pytest.mark.slow
def test_an_optuna_search_runs_its_trials_through_submitit_and_lists_them_like_grid_jobs(tmp_path: Path):
    sweep = tmp_path / "search"  # trials as submitit jobs, two at a time (cluster=local_parallel)
    result = run_cli(IBQ_TRAIN + ["-m", "sweep=lr_entropy_search", "cluster=local_parallel", "hydra.sweeper.n_trials=3", "train.steps=2", "train.log_every=1",
                                  "logger=none", "eval.rfid=false", "data.val_crops_per_photo=1", "objectives=[codebook/utilization,psnr]",
                                  "hydra.sweeper.direction=[maximize,maximize]", "codebook_size=choice(256,512)",
                                  f"hydra.sweep.dir={sweep}"])
    assert result.returncode == 0, result.stderr[-3000:]
    bar = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()][-1].rstrip()
    assert bar.startswith("local_parallel jobs: 100%|") and bar.endswith(", 3 done"), bar  # n_trials is the whole
    trials = [path.parent for path in sweep.glob("*/results.json")]
    assert len(trials) == 3
    configs = [OmegaConf.load(trial / ".hydra" / "config.yaml") for trial in trials]
    learning_rates = {cfg.optim.lr for cfg in configs}
    assert len(learning_rates) == 3 and all(1e-5 <= lr <= 1e-3 for lr in learning_rates)  # sampled from the interval
    for trial, cfg in zip(trials, configs):  # a plain key searched as integers, recorded as a choice
        assert cfg.codebook_size in (256, 512) and json.loads((trial / "run.json").read_text())["choices"]["codebook_size"] == str(cfg.codebook_size)
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.name == "optuna" and len(best.solutions[0]["values"]) == 2
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 3
    status = subprocess.run([sys.executable, "-m", "ibq.cli.sweep", "status", str(sweep)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=cli_env())
    assert "3 jobs: 3 done" in status.stdout, status.stdout + status.stderr
    table = subprocess.run([sys.executable, "-m", "ibq.cli.sweep", "table", str(sweep)], cwd=REPO, capture_output=True, text=True,
                           timeout=300, env=cli_env())
    front = [line for line in table.stdout.splitlines() if line.startswith("search Pareto front: ")]
    assert len(front) == len(best.solutions) and all(re.fullmatch(
        r"search Pareto front: codebook/utilization [\d.e+-]+, psnr [\d.e+-]+ at optim.lr=[\d.e+-]+ "
        r"quantizer.entropy_weight=[\d.e+-]+ codebook_size=(256|512)", line) for line in front), table.stdout


@pytest.mark.parametrize(("overrides", "sweeper", "batch_key", "batch"), [
    ([], "BasicSweeper", "max_batch_size", 3),
    (["sweep=lr_entropy_search"], "OptunaSweeper", "n_jobs", 3),
    (["hydra/sweeper=optuna"], "OptunaSweeper", "n_jobs", 2),  # the sweeper's own default
])
def test_local_parallel_batches_a_grid_sweep_and_a_search(overrides: list[str], sweeper: str, batch_key: str, batch: int):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["cluster=local_parallel", "cluster.max_parallel_jobs=3", *overrides], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith(sweeper) and cfg.hydra.sweeper[batch_key] == batch


def test_a_search_has_no_plan_ahead():
    from ibq.ledger.plan import expand

    with pytest.raises(UserError, match="this sweep is a search .OptunaSweeper.: its trials are chosen as it runs"):
        expand(["sweep=lr_entropy_search"])


@pytest.mark.parametrize(("config_name", "overrides"), [
    ("train", ["seed=3"]),
    ("train_ar", ["seed=3", "tokenizer_run=x"]),
    ("tokenize", ["seed=3", "tokenizer_run=x"]),
    ("sample", ["seed=3", "run_dir=x"]),
])
def test_where_a_run_runs_or_logs_does_not_name_its_directory(config_name: str, overrides: list[str]):
    """A job resubmitted with a longer time limit or another partition resumes the same run directory."""
    placement = ["cluster=slurm", "cluster.time_min=2880", "cluster.partition=gpu", "cluster.sbatch={exclusive: true}",
                 "+cluster.sbatch.mail-type=END", "~cluster.mem_gb"]
    logging = ["logger.mode=online", "logger.tags=[a,b]"] if config_name.startswith("train") else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=[*placement, *logging, *overrides], return_hydra_config=True)
    assert cfg.hydra.job.override_dirname == "seed=3"


@pytest.mark.parametrize("config_name", ["sample", "eval"])
def test_an_app_of_one_process_refuses_a_job_of_several(config_name: str):
    from ibq.cli.checks import check_layout

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=["cluster=local_parallel", "cluster.tasks_per_node=2"])
    app = {"sample": "ibq-sample", "eval": "ibq-eval"}[config_name]
    with pytest.raises(UserError, match=rf"^cluster=local_parallel gives each job 2 processes, but {app} runs in one: use cluster.nodes=1 cluster.tasks_per_node=1"):
        check_layout(cfg, config_name, submitting=False)


def test_tokenizing_takes_a_job_of_several_ranks():
    from ibq.cli.checks import check_layout

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("tokenize", overrides=["cluster=slurm_gpu"])  # 8 ranks, one per GPU
    check_layout(cfg, "tokenize", submitting=False)


def test_a_run_directory_named_after_its_overrides_is_told_the_quotes_it_needs(monkeypatch, capsys):
    from ibq.cli import eval as eval_app

    run_dir = "outputs/multirun/2026-11-30_10-00-00/codebook_size=1024,quantizer=vq"
    monkeypatch.setattr(sys, "argv", ["ibq-eval", f"run_dir={run_dir}"])
    with pytest.raises(SystemExit) as exited:
        eval_app.cli()
    assert exited.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: cannot parse the override 'run_dir={run_dir}': mismatched input '='")
    assert line.endswith(f"""a value with '=' in it must be quoted: 'run_dir="{run_dir}"' (several: 'run_dir="<first>","<second>"')""")

    quoted = subprocess.run([sys.executable, "-m", "ibq.cli.sweep", "plan", f'init_from="{run_dir}"'], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=cli_env())
    assert quoted.returncode == 0 and f"every job: init_from={run_dir}\n" in quoted.stdout, quoted.stderr  # one path, one job
    assert f"""plan: ibq-train -m 'init_from="{run_dir}"'\n""" in quoted.stdout  # a command to copy, quotes and all


@pytest.mark.parametrize(("config_name", "overrides", "expected"), [
    ("sample", ["sampling.top_p=2"], "sampling.top_p=2 is invalid: it must be in (0, 1] (1: off)"),
    ("sample", ["sampling.temperature=0"], "sampling.temperature=0 is invalid: it must be > 0"),
    ("sample", ["precision=fp8"], "precision='fp8' is invalid; valid: auto, fp32, bf16, fp16"),
    ("sample", ["samples_per_class=0"], "samples_per_class=0 is invalid: it must be a positive integer"),
    ("sample", ["parts=4", "part=4"], "part=4 is invalid: with parts=4 it must be an integer in 0..3"),
    ("sample", ["classes=[]"], "classes=[] is invalid: give a list of class indices, e.g. [0,5,9] (null: every class)"),
    ("sample", ["classes=3"], "classes=3 is invalid: give a list of class indices, e.g. [0,5,9] (null: every class)"),
    ("sample", ["run_dir=x", "reference.split=nope"], "reference.split='nope' is invalid; valid: auto, val, train"),  # of the scoring ibq-eval
    ("eval", ["weights=both"], "weights='both' is invalid; valid: ema, live"),
    ("eval", ["metrics.lpips=[vgg,squeeze]"], "metrics.lpips contains 'squeeze'; valid backbones: vgg, alex"),
    ("tokenize", ["shard_size=0"], "shard_size=0 is invalid: it must be a positive integer"),
])
def test_what_a_job_of_one_process_refuses_is_refused_before_it_runs(config_name: str, overrides: list[str], expected: str):
    from ibq.cli.checks import check_job

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    with pytest.raises(UserError) as refused:
        check_job(cfg, config_name)  # before the runs it reads are looked for
    assert str(refused.value) == expected


def test_cfg_hydra_resolve_says_which_job_key_it_cannot_show(monkeypatch, capsys):
    from ibq.cli import train as train_app

    monkeypatch.setattr(sys, "argv", ["ibq-train", "cluster=slurm", "--cfg", "hydra", "--resolve"])
    with pytest.raises(SystemExit) as exited:
        train_app.cli()
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --cfg hydra --resolve: Hydra's config refers to cluster.time_min, a key of the job's config, which --cfg hydra "
        "leaves out; --cfg all --resolve shows both resolved")
    monkeypatch.setattr(sys, "argv", ["ibq-train", "cluster=slurm", "--cfg", "all", "--resolve"])
    train_app.cli()
    assert OmegaConf.create(capsys.readouterr().out).hydra.launcher.timeout_min == 60
