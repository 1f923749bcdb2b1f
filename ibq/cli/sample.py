"""`ibq-sample`: class-conditional samples of a trained ibq-train-ar run, as a PNG grid and the ADM evaluator's
.npz, handed to ibq-eval for gFID (and IS) against the run's training images."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from ibq.cli.common import entry_point, guarded, objective_values, save_hydra_files
from ibq.cli.eval import generation_lines
from ibq.config import CONF_DIR, shell_override
from ibq.errors import UserError, check_positive_int
from ibq.runs.lock import RunLock
from ibq.runs.record import atomic_write, write_json

if TYPE_CHECKING:
    from ibq.engine.train_ar import ARRun


def sampling_settings(cfg: DictConfig, run: ARRun) -> dict:
    """The run's sampling settings, with those given on the command line replacing them."""
    from ibq.generation.sampling import check_sampling_args

    settings = OmegaConf.to_container(run.config.sampling)
    settings.update({key: value for key, value in OmegaConf.to_container(cfg.sampling).items() if value is not None})
    check_sampling_args(**settings)
    return settings


def scored(cfg: DictConfig) -> bool:
    """Whether the job scores its samples: a part of a split sampling leaves that to ibq-eval over all parts."""
    return cfg.parts == 1 and (cfg.metrics.fid or cfg.metrics.inception_weights_path is not None)


def eval_config(cfg: DictConfig, run_dir: Path, samples: Path) -> DictConfig:
    """ibq-eval's settings (conf/eval.yaml) for these samples and this run, with ours on top."""
    from ibq.engine.evaluation_run import check_settings

    base = OmegaConf.load(CONF_DIR / "eval.yaml")
    for key in ("defaults", "hydra"):
        base.pop(key)
    ours = {node: {k: v for k, v in OmegaConf.to_container(cfg[node]).items() if v is not None} for node in ("metrics", "reference")}
    ours["reference"]["limit"] = cfg.reference.limit  # null here too: every image of the split
    ours["metrics"]["is"] = cfg.metrics.inception_weights_path is not None
    eval_cfg = OmegaConf.merge(base, ours, {"samples": str(samples), "run_dir": str(run_dir), "device": cfg.device, "wandb_mode": cfg.wandb_mode})
    check_settings(eval_cfg)
    return eval_cfg


def check_sample_job(cfg: DictConfig) -> None:
    """What the job refuses from its config alone (checks.JOB_CHECKS: before a sweep is submitted, and when the job
    starts); the classes and the run's own sampling settings are checked against the run once it is loaded."""
    from ibq.engine.build import check_precision
    from ibq.engine.checkpoint import checkpoint_at_step
    from ibq.generation.sampling import check_sampling_args

    for key in ("samples_per_class", "batch_size", "parts"):
        check_positive_int(key, cfg[key])
    if cfg.step is not None:
        check_positive_int("step", cfg.step)
        if not OmegaConf.is_missing(cfg, "run_dir"):
            checkpoint_at_step(cfg.run_dir, cfg.step, "run_dir", "generator")
    if isinstance(cfg.part, bool) or not isinstance(cfg.part, int) or not 0 <= cfg.part < cfg.parts:
        raise UserError(f"part={cfg.part!r} is invalid: with parts={cfg.parts} it must be an integer in 0..{cfg.parts - 1}")
    if cfg.classes is not None and (not OmegaConf.is_list(cfg.classes) or len(cfg.classes) == 0):
        raise UserError(f"classes={cfg.classes!r} is invalid: give a list of class indices, e.g. [0,5,9] (null: every class)")
    check_precision(cfg.precision, "precision")
    check_sampling_args(**{key: value for key, value in OmegaConf.to_container(cfg.sampling).items() if value is not None})
    if scored(cfg) and not OmegaConf.is_missing(cfg, "run_dir"):
        eval_config(cfg, Path(cfg.run_dir), Path("samples.npz"))


def write_adm_npz(images_npy: Path, path: Path) -> None:
    """Wrap a .npy of uint8 N x H x W x 3 as `arr_0` of an uncompressed .npz, streamed (never all in memory)."""
    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            archive.write(images_npy, "arr_0.npy")

    atomic_write(path, write)
    images_npy.unlink()


def draw_samples(run, labels, settings: dict, cfg: DictConfig, images_npy: Path, samples_path: Path, device, dtype):
    """Draws the images of `labels` into `images_npy` as they come (50k at 256 px: 9.8 GB, gone if the job
    stops early), then writes them to samples_path as the ADM evaluator's .npz; returns the grid's images."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from ibq.engine.train_ar import sample_images
    from ibq.metrics.adm import to_adm_array

    side = run.config.data.resolution
    try:
        images = np.lib.format.open_memmap(images_npy, mode="w+", dtype=np.uint8, shape=(len(labels), side, side, 3))
        generator = torch.Generator(device).manual_seed(cfg.seed * cfg.parts + cfg.part)
        for start in tqdm(range(0, len(labels), cfg.batch_size), desc="sample", dynamic_ncols=True):
            batch = labels[start : start + cfg.batch_size].to(device)
            images[start : start + len(batch)] = to_adm_array(sample_images(run.model, run.tokenizer_run, batch, settings, generator, dtype))
        grid = torch.from_numpy(np.array(images[: cfg.grid_samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
        images.flush()
        del images
    except BaseException:
        images_npy.unlink(missing_ok=True)
        raise
    write_adm_npz(images_npy, samples_path)
    return grid


@hydra.main(config_path=str(CONF_DIR), config_name="sample", version_base="1.3")
@guarded
def main(cfg: DictConfig, out_dir: Path) -> list[float] | float | None:
    # The engine and torch are imported here, not with the module: completion and --help start without them.
    import torch

    from ibq.engine.build import resolve_precision
    from ibq.engine.distributed import one_process_device
    from ibq.engine.evaluation_run import evaluate_generation
    from ibq.engine.media import save_grid
    from ibq.engine.train_ar import load_ar_run
    from ibq.generation.sampling import check_labels, hold_linear_weights_in

    device = one_process_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device, "precision")
    run = load_ar_run(None if OmegaConf.is_missing(cfg, "run_dir") else cfg.run_dir, device, cfg.step)
    hold_linear_weights_in(run.model, dtype)  # the model only samples, under autocast to `dtype`
    settings = sampling_settings(cfg, run)
    classes = torch.arange(run.model.num_classes) if cfg.classes is None else torch.tensor(list(cfg.classes), dtype=torch.long)
    check_labels(classes, run.model.num_classes)
    every_label = classes.repeat_interleave(cfg.samples_per_class)
    labels = every_label.tensor_split(cfg.parts)[cfg.part]
    if len(labels) == 0:
        raise UserError(f"part={cfg.part} of parts={cfg.parts} holds no sample: the sampling has {len(every_label)} in all")
    samples_path = out_dir / "samples.npz"
    eval_cfg = eval_config(cfg, run.run_dir, samples_path) if scored(cfg) else None

    with RunLock(out_dir):  # one job per samples folder: a second would draw into the same .samples.npy
        save_hydra_files(cfg, out_dir)
        grid = draw_samples(run, labels, settings, cfg, out_dir / ".samples.npy", samples_path, device, dtype)
        save_grid(grid, out_dir / "grid.png", nrow=min(cfg.samples_per_class, 16))

        results = {
            "run_dir": str(run.run_dir),
            "run_signature": run.signature,
            "step": run.step,
            "checkpoint": str(run.checkpoint),
            "sampling": settings,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "part": cfg.part,
            "parts": cfg.parts,
            "samples": len(labels),
            "classes": classes.tolist(),
            "samples_per_class": cfg.samples_per_class,
            "npz": str(samples_path),
            "grid": str(out_dir / "grid.png"),
        }
        checkpoint = "" if run.checkpoint.name == "last.pt" else f", {run.checkpoint.name}"
        print(f"\nibq-sample: {len(labels)} samples of {run.run_dir} (step {run.step}{checkpoint}), "
              + ", ".join(f"{k}={v}" for k, v in settings.items()))
        print(f"  samples (ADM .npz)    {samples_path}")
        print(f"  grid                  {out_dir / 'grid.png'}")
        if cfg.parts > 1:
            print(f"  {f'part {cfg.part} of {cfg.parts}':<22}once every part is drawn: ibq-eval "
                  f"{shell_override('samples', out_dir.parent)} {shell_override('run_dir', run.run_dir)}")
        if eval_cfg is not None:
            evaluation = evaluate_generation(eval_cfg, choices={}, job_type="sample", sampling={**settings, "seed": cfg.seed}, step=run.step)
            print("\n".join(generation_lines(evaluation, eval_cfg)))
            # This job's scores, as merged into the AR run: the run's file may hold another job's by now.
            results.update({key: value for key, value in evaluation.results.items() if key.split("/")[0] in ("gfid", "is", "eval")})
        write_json(out_dir / "results.json", results)
    return objective_values(cfg, results)


cli = entry_point(main)

if __name__ == "__main__":
    cli()
