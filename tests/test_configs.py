"""Every file in conf/ composes, and what it describes can be instantiated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import ibq.cli.common  # noqa: F401  (registers the resolvers the configs use)
from ibq.data.shards import ShardStream
from ibq.config import build
from ibq.engine.ranks import plan_batches
from ibq.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(d.name for d in CONF.iterdir() if d.is_dir() and not d.is_symlink())


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=False)


def group_files() -> list[tuple[str, str]]:
    return [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]


def test_primary_config_composes_with_defaults():
    cfg = compose_train()
    assert cfg.quantizer._target_ == "ibq.quantizers.IBQ"
    assert cfg.quantizer.codebook_size == 1024
    assert cfg.logger.mode == "offline"
    assert OmegaConf.missing_keys(cfg) == set()


@pytest.mark.parametrize(("group", "choice"), group_files())
def test_every_group_file_composes_and_instantiates(group: str, choice: str, image_folder: Path, photo_shards: Path, tmp_path: Path):
    overrides = [f"{group}={choice}"]
    if group == "data" and choice in ("image_folder", "imagenet_val"):
        overrides.append(f"data.root={image_folder}")
    if group == "data" and choice == "coco_val":  # one class folder is a flat folder of images, as val2017 is
        overrides += [f"data.root={image_folder / 'val'}", "data.split=cat"]
    if group == "data" and choice == "shards":
        overrides.append(f"data.sources.main.urls={photo_shards}")
    if group == "data" and choice == "pretrain_mix":  # every source the same packed photos
        for source in (CONF / "data" / "source").glob("*.yaml"):
            (tmp_path / source.stem).symlink_to(photo_shards)
        overrides += [f"data.root={tmp_path}", f"data.val.root={image_folder}"]
    cfg = compose_train(*overrides)
    assert OmegaConf.missing_keys(cfg) == set(), OmegaConf.missing_keys(cfg)
    if group in ("quantizer", "model_scale"):
        with torch.device("meta"):
            tokenizer = build(cfg.model, quantizer=build(cfg.quantizer))
            build(cfg.discriminator)
        assert tokenizer.quantizer.codebook_size == cfg.quantizer.codebook_size
    elif group == "data":
        splits = build(cfg.data, seed=0)
        image, label = splits.val[0]
        assert image.shape == (3, cfg.data.resolution, cfg.data.resolution)
        assert isinstance(label, int)
        if isinstance(splits.train, ShardStream):
            images, labels = next(splits.train.batches(2, rank=0, world_size=1, state=None))
            assert images.shape == (2, 3, cfg.data.resolution, cfg.data.resolution) and labels.shape == (2,)
    elif group == "logger":
        assert cfg.logger.kind in ("wandb", "none")
    elif group == "cluster":
        assert cfg.cluster.name


def test_paper_tokenizer_has_the_papers_parameter_count():
    cfg = compose_train("model_scale=paper", "codebook_size=16384")
    with torch.device("meta"):
        tokenizer = build(cfg.model, quantizer=build(cfg.quantizer))
        discriminator = build(cfg.discriminator)
    counts = tokenizer.parameter_counts()
    assert counts["generator_total"] / 1e6 == pytest.approx(111.0, abs=0.05)
    assert counts["encoder"] / 1e6 == pytest.approx(46.75, abs=0.01)
    assert counts["decoder"] / 1e6 == pytest.approx(59.90, abs=0.01)
    assert sum(p.numel() for p in discriminator.parameters()) / 1e6 == pytest.approx(2.77, abs=0.01)
    assert tokenizer.downsample_factor == 16


@pytest.mark.parametrize(("world_size", "accumulation"), [(1, 64), (16, 4), (64, 1)])
def test_paper_tokenizer_keeps_the_global_batch_on_any_number_of_ranks(world_size: int, accumulation: int):
    cfg = compose_train("model_scale=paper")
    layout = plan_batches(cfg.train.batch_size, cfg.train.micro_batch_size, world_size)
    assert (layout.global_batch, layout.micro_batch, layout.accumulation) == (256, 4, accumulation)


@pytest.mark.parametrize("size", [256, 4096, 262144, 1048576])
def test_codebook_size_is_a_plain_key_that_takes_any_size(size: int):
    cfg = compose_train(f"codebook_size={size}")
    with torch.device("meta"):
        tokenizer = build(cfg.model, quantizer=build(cfg.quantizer))
    assert cfg.codebook_size == cfg.quantizer.codebook_size == tokenizer.quantizer.codebook_size == size


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        ({"_target_": "ibq.quantizers.NoSuchQuantizer"},
         r"^quantizer._target_='ibq.quantizers.NoSuchQuantizer' cannot be imported \(.*\): name a class or function of an installed "
         r"module, or put its package on PYTHONPATH$"),
        ({"_target_": "no_such_package.Quantizer"}, r"^quantizer._target_='no_such_package.Quantizer' cannot be imported \(No module named"),
        ({"_target_": "ibq.quantizers.VQ", "codebook_size": 16, "dim": 4, "beta_typo": 0.25},
         r"^quantizer does not fit ibq.quantizers.vq.VQ, whose keyword arguments are its keys: .*unexpected keyword argument 'beta_typo'$"),
        ({"_target_": "ibq.quantizers.VQ", "dim": 4}, r"^quantizer does not fit ibq.quantizers.vq.VQ, .*missing 1 required .*'codebook_size'$"),
    ],
)
def test_a_node_that_cannot_be_built_is_named_in_one_line(node: dict, expected: str):
    """A `_target_` that is not importable, or keys its callable does not take (a preset of the user's own)."""
    with pytest.raises(UserError, match=expected):
        build(OmegaConf.create({"quantizer": node}).quantizer)


def test_an_error_raised_inside_the_built_object_is_left_whole():
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="Error in call to target 'math.sqrt'"):
        build(OmegaConf.create({"node": {"_target_": "math.sqrt", "x": -1.0}}).node)  # ValueError: a bug, not a key


def test_the_discriminator_is_refused_only_for_a_resolution_its_convolutions_cannot_take():
    from ibq.engine.job_config import check_discriminator_input
    from ibq.errors import UserError
    from ibq.models import PatchDiscriminator

    class NoMeta(torch.nn.Module):  # a discriminator of one's own that the meta device cannot run, at any size
        def forward(self, images):
            return images.tolist()

    cfg = OmegaConf.create({"data": {"resolution": 16}, "discriminator": {"n_layers": 3}})
    with torch.device("meta"):
        deep, shallow = PatchDiscriminator(ndf=8, n_layers=3), PatchDiscriminator(ndf=8, n_layers=1)
    with pytest.raises(UserError, match=r"n_layers=3\) cannot take data.resolution=16 images: .* at least 24 px"):
        check_discriminator_input(cfg, deep)
    check_discriminator_input(OmegaConf.merge(cfg, {"data": {"resolution": 24}}), deep)
    check_discriminator_input(cfg, shallow)
    check_discriminator_input(cfg, NoMeta())  # no size works: not the images' size, so not refused as such


def test_an_objective_the_run_did_not_measure_is_named_with_the_numbers_it_has():
    """A search over rfid without the FID network's weights: the trial's results hold rfid as null."""
    from ibq.cli.common import objective_values
    from ibq.errors import UserError

    cfg = OmegaConf.create({"objectives": ["codebook/utilization", "rfid"]})
    with pytest.raises(UserError, match=r"objectives: rfid not measured by this run \(a metric switched off, or whose network weights are missing, "
                                        r"is left out\); "
                                        r"its numeric results: codebook/utilization, psnr$"):
        objective_values(cfg, {"codebook/utilization": 0.5, "rfid": None, "psnr": 20.0, "rfid/network": "x", "lpips_available": False})
    assert objective_values(cfg, {"codebook/utilization": 0.5, "rfid": 3.0}) == [0.5, 3.0]
    # One objective is returned as the number: Optuna's sweeper takes float(value) for a study of one direction.
    assert objective_values(OmegaConf.create({"objectives": ["gfid"]}), {"gfid": 9.5, "is": 2.0}) == 9.5
    assert objective_values(OmegaConf.create({}), {"gfid": 9.5}) is None


def test_a_search_returns_one_objective_per_direction_or_is_refused_before_its_first_trial():
    """Optuna learns of a mismatch, or of no trial to run, only after the launch, in a traceback."""
    from ibq.cli.checks import check_objectives, check_trial_counts
    from ibq.errors import UserError

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        plain, search, grid = (compose("train", overrides=overrides, return_hydra_config=True)
                               for overrides in (["hydra/sweeper=optuna"], ["sweep=lr_entropy_search"], []))
    with pytest.raises(UserError, match=r"^hydra.sweeper.direction=\[minimize\]: a search needs what each trial returns, .* "
                                        r"e.g. \+objectives=\[rfid\]$"):
        check_objectives(plain)  # its direction is the sweeper's enum, not a string
    check_objectives(search)
    search.objectives = ["rfid"]
    with pytest.raises(UserError, match=r"^objectives=\[rfid\] are 1 but hydra.sweeper.direction=\[maximize,minimize\] are 2: "):
        check_objectives(search)
    check_objectives(grid)  # the grid sweeper returns nothing to anyone

    check_trial_counts(search)
    for key in ("n_trials", "n_jobs"):  # Optuna's traceback after the launch, or a division by zero
        counted = search.copy()
        counted.hydra.sweeper[key] = 0
        with pytest.raises(UserError, match=rf"^hydra.sweeper.{key}=0: a search needs at least 1; give hydra.sweeper.{key}=1 or more$"):
            check_trial_counts(counted)


def test_a_stored_search_continues_with_a_new_sampler_seed_and_refuses_one_used_before(tmp_path: Path):
    """A seeded sampler draws the same points on every launch: continuing a stored study with a seed it
    has seen would train its first trials again. Also: Optuna's storage opens at all (SQLAlchemy < 2)."""
    import optuna

    from ibq.cli.checks import SAMPLER_SEEDS, check_continued_study, record_sampler_seed
    from ibq.errors import UserError

    storage = f"sqlite:///{tmp_path / 'searches' / 'search.db'}"  # its folder made at the launch
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        search = compose("train", overrides=["sweep=lr_entropy_search", f"hydra.sweeper.storage={storage}"], return_hydra_config=True)
    check_continued_study(search)  # no study yet: nothing is opened, nothing created
    assert not (tmp_path / "searches").exists()
    record_sampler_seed(search)  # the launch goes ahead
    study = optuna.load_study(study_name="lr_entropy", storage=storage)
    assert study.user_attrs[SAMPLER_SEEDS] == [0] and [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]

    with pytest.raises(UserError, match=rf"^hydra.sweeper.storage={storage} holds study lr_entropy \(0 trials\), which this search "
                                        r"continues; its launches used hydra.sweeper.sampler.seed=0, and a seed used before draws the same "
                                        r"points again: give another, e.g. hydra.sweeper.sampler.seed=1$"):
        check_continued_study(search)
    search.hydra.sweeper.sampler.seed = 1
    check_continued_study(search)
    record_sampler_seed(search)
    assert optuna.load_study(study_name="lr_entropy", storage=storage).user_attrs[SAMPLER_SEEDS] == [0, 1]

    search.hydra.sweeper.storage = "postgresql://nowhere/db"  # its driver is not installed
    with pytest.raises(UserError, match=r"^hydra.sweeper.storage=postgresql://nowhere/db cannot be opened \(ImportError: .*\): "
                                        r"give an Optuna storage URL, e.g. hydra.sweeper.storage=sqlite:///search.db$"):
        check_continued_study(search)


def test_a_defect_in_the_checks_stops_the_launch_rather_than_becoming_hydras_warning(capsys):
    from ibq.cli.checks import exit_if_refused

    def broken(config):
        return len(config)  # a TypeError on None, as a check with a defect raises

    with pytest.raises(SystemExit) as stopped:
        exit_if_refused(broken, None)
    assert stopped.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):" and lines[-1] == (
        "error: the checks before the job failed (TypeError: object of type 'NoneType' has no len()): nothing was started; "
        "the traceback above shows where")


def test_a_search_on_rfid_with_rfid_switched_off_is_refused_before_any_trial():
    from ibq.engine.job_config import check_training_keys
    from ibq.errors import UserError

    search = compose_train("sweep=lr_entropy_search")
    check_training_keys(search)
    search.eval.rfid = False
    with pytest.raises(UserError, match=r"^objectives=\[…, rfid\] needs rFID, which eval.rfid=false leaves out: set eval.rfid=true"):
        check_training_keys(search)
    search.objectives = ["codebook/utilization"]
    check_training_keys(search)
