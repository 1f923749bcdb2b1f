"""An ibq-eval run: the metrics of a trained tokenizer (reconstruction) or of generated samples (generation),
recorded in the evaluated run: merged into results.json, a metrics.jsonl line at the checkpoint's step, and a
W&B run of their own grouped with the training run (summary and a table). Everything that can be wrong with
the input (paths, a checkpoint that does not fit the config, the resolution, a required network file, a
malformed samples file) is checked before any metric is computed, so a rejected evaluation writes nothing."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

from ibq.config import build
from ibq.engine.checkpoint import CHECKPOINT, TOKENIZER_WEIGHTS, LoadedRun, checkpoint_at_step, load_run, saved_step
from ibq.engine.distributed import one_process_device
from ibq.engine.evaluate import GenerationEvaluator, ReconstructionEvaluator, real_feature_stats
from ibq.errors import UserError, check_positive_int, unset_key
from ibq.metrics.adm import AdmSampleParts, AdmSamples
from ibq.metrics.fid import FID_FEATURE_DIM
from ibq.metrics.lpips import BACKBONE_FILES
from ibq.metrics.networks import FID_NETWORKS, REQUIRABLE, EvaluationNetworks
from ibq.metrics.reference import (
    ReferenceCache,
    ReferenceStats,
    dataset_name,
    load_reference_npz,
    reference_key,
    validation_key,
)
from ibq.runs.record import MetricsLog, RunRecord, config_differences, merge_results, timestamp, without_non_result_keys
from ibq.runs.wandb_mirror import open_evaluation_mirror

log = logging.getLogger("ibq.eval")

WANDB_MODES = ("offline", "online", "disabled")
SPLITS = ("val", "train")
DEFAULT_BATCH_SIZE = 32
# Keys the command line may set on top of the run's config; a node chosen from a group replaces the run's.
MODEL_AND_DATA_NODES = ("model", "quantizer", "data")


@dataclass
class Evaluation:
    results: dict  # what was merged into the results file
    destination: Path  # that results file
    wandb_dir: str | None  # the evaluation's W&B run folder, when it has one
    reference: str | None = None  # generation: where gFID's reference statistics came from
    resolution: tuple[int, int] | None = None  # generation: the samples' height and width
    note: str | None = None  # where the results are not the run's final ones, why


# ------------------------------------------------------------------------------------------------------ settings


def check_settings(cfg: DictConfig) -> None:
    if cfg.weights not in TOKENIZER_WEIGHTS:
        raise UserError(f"weights={cfg.weights!r} is invalid; valid: {', '.join(TOKENIZER_WEIGHTS)}")
    if cfg.batch_size is not None:
        check_positive_int("batch_size", cfg.batch_size)
    if cfg.wandb_mode not in WANDB_MODES:
        raise UserError(f"wandb_mode={cfg.wandb_mode!r} is invalid; valid: {', '.join(WANDB_MODES)}")
    metrics = cfg.metrics
    if metrics.fid_network not in FID_NETWORKS:
        raise UserError(f"metrics.fid_network={metrics.fid_network!r} is invalid; valid: {', '.join(FID_NETWORKS)}")
    for net in metrics.lpips:
        if net not in BACKBONE_FILES:
            raise UserError(f"metrics.lpips contains {net!r}; valid backbones: {', '.join(BACKBONE_FILES)}")
    for name in metrics.required:
        if name not in REQUIRABLE:
            raise UserError(f"metrics.required contains {name!r}; valid: {', '.join(REQUIRABLE)}")
    check_positive_int("metrics.is_splits", metrics.is_splits)
    if cfg.reference.split not in ("auto", *SPLITS):
        raise UserError(f"reference.split={cfg.reference.split!r} is invalid; valid: auto, {', '.join(SPLITS)}")
    if cfg.reference.limit not in (None, "auto"):
        check_positive_int("reference.limit", cfg.reference.limit)
    if cfg.step is not None:
        check_positive_int("step", cfg.step)
        if cfg.samples or not cfg.run_dir:
            raise UserError(f"step={cfg.step} picks a checkpoint of run_dir=<run> to evaluate: give it with run_dir= (a checkpoint= "
                            f"file is of one step already; samples= carry the step that drew them)")
        checkpoint_at_step(cfg.run_dir, cfg.step, "run_dir", "tokenizer")


def eval_batch_size(cfg: DictConfig, train_cfg: DictConfig | None) -> int:
    """batch_size, else the run's eval.batch_size: the same batches give the run's own numbers bit for bit."""
    run_batch_size = OmegaConf.select(train_cfg, "eval.batch_size") if train_cfg is not None else None
    return cfg.batch_size or run_batch_size or DEFAULT_BATCH_SIZE


# ---------------------------------------------------------------------------------------------- the evaluated run


def evaluated_run(cfg: DictConfig) -> LoadedRun:
    """The run_dir= run, or the checkpoint= file (its run: the run directory it lies in, if any)."""
    if cfg.run_dir and cfg.checkpoint:
        raise UserError("give run_dir=<run directory> or checkpoint=<file>, not both")
    if cfg.run_dir and cfg.step is not None:
        return load_run(checkpoint_at_step(cfg.run_dir, cfg.step, "run_dir", "tokenizer"), "run_dir", outside_a_run=True)
    if cfg.run_dir:
        return load_run(cfg.run_dir, "run_dir")
    return load_run(cfg.checkpoint, "checkpoint", outside_a_run=True)


def evaluated_config(train_cfg: DictConfig, cfg: DictConfig, choices: dict) -> DictConfig:
    """The run's config with the command line's model/quantizer/data settings on top.

    A node chosen from a config group (data=image_folder, quantizer=vq) replaces the run's node, keeping the
    run's values for its ??? keys (e.g. data.resolution); single keys (model_scale=paper) are merged into the
    run's node, where ??? leaves the run's value. codebook_size=N sets the quantizer's size."""
    merged = OmegaConf.create(OmegaConf.to_container(train_cfg, resolve=False))
    if not OmegaConf.is_missing(cfg, "codebook_size"):
        merged.quantizer.codebook_size = cfg.codebook_size
    merged.codebook_size = merged.quantizer.codebook_size  # a checkpoint's resolved config holds it there only
    for node in MODEL_AND_DATA_NODES:
        if node not in cfg:
            continue
        overlay = OmegaConf.create(OmegaConf.to_container(cfg[node], resolve=False))
        if choices.get(node) and node in merged:
            for key in overlay:
                if OmegaConf.is_missing(overlay, key) and key in merged[node]:
                    overlay[key] = merged[node][key]
            merged[node] = overlay
        else:
            merged[node] = OmegaConf.merge(merged[node], overlay) if node in merged else overlay
    return merged


def check_checkpoint_fits(path: Path, state: dict[str, torch.Tensor], merged: DictConfig, trained_config: dict) -> None:
    """Compare the checkpoint's tensors with a model built (on the meta device) from the evaluated config."""
    with torch.device("meta"):
        model = build(merged.model, quantizer=build(merged.quantizer))
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state.items()}
    problem = None
    for key, shape in expected.items():
        if key not in found:
            problem = f"the checkpoint has no tensor {key}"
        elif found[key] != shape:
            problem = f"tensor {key} is {found[key]} in the checkpoint but {shape} in the model"
        if problem:
            break
    else:
        extra = sorted(set(found) - set(expected))
        if extra:
            problem = f"the checkpoint's tensor {extra[0]} has no place in the model"
    # As a checkpoint's config holds them: without the keys that leave the result as it is.
    evaluated = without_non_result_keys({node: OmegaConf.to_container(merged[node], resolve=True) for node in ("model", "quantizer")})
    trained_quantizer = trained_config.get("quantizer", {}).get("_target_")
    if problem is None and trained_quantizer and trained_quantizer != evaluated["quantizer"]["_target_"]:
        problem = f"it was trained with {trained_quantizer}, not {evaluated['quantizer']['_target_']}"
    if problem:
        changed = [
            line for node in ("model", "quantizer")
            for line in config_differences(trained_config.get(node, {}), evaluated[node], f"{node}.")
        ]
        differs = f" (checkpoint -> evaluated: {'; '.join(changed[:3])})" if changed else ""
        raise UserError(f"checkpoint {path} does not fit the config it is evaluated with{differs}: {problem}")


def check_resolution(path: Path, merged: DictConfig, trained_resolution: int) -> None:
    resolution = merged.data.get("resolution")
    if resolution != trained_resolution:
        raise UserError(
            f"data.resolution={resolution} differs from the checkpoint's training resolution {trained_resolution} "
            f"({path}): evaluate at data.resolution={trained_resolution}"
        )


def check_data_set(data: DictConfig) -> None:
    """A ??? key of a chosen data node that the run's node could not fill (data=coco_val without data.root=)."""
    missing = sorted(OmegaConf.missing_keys(data))
    if missing:
        raise unset_key(missing[0])


# ------------------------------------------------------------------------------------------------------ results


def scalars(results: dict) -> dict:
    return {key: value for key, value in results.items() if isinstance(value, (int, float, str))}


def publish(run_dir: Path, step: int, results: dict, train_cfg: DictConfig | None, run_id: str | None, wandb_mode: str,
            job_type: str, final: bool = True) -> str | None:
    """Merge into results.json (where `final`), append to metrics.jsonl and log to the evaluation's own W&B run,
    grouped with the training run (`job_type` eval or sample); returns the W&B dir."""
    if final:
        merge_results(run_dir / "results.json", results)
    MetricsLog(run_dir / "metrics.jsonl").append(step, scalars(results))

    logger = train_cfg.get("logger") if train_cfg is not None else None
    if logger is None or logger.get("kind") != "wandb" or wandb_mode == "disabled" or run_id is None:
        return None
    mirror = open_evaluation_mirror(run_dir, OmegaConf.to_container(train_cfg, resolve=True), RunRecord(run_dir).data, run_id, job_type, step, wandb_mode)
    mirror.summarize(scalars(results))
    numbers = [[key, float(value)] for key, value in scalars(results).items() if not isinstance(value, (str, bool))]
    mirror.log_table("eval/metrics", ["metric", "value"], numbers)
    mirror.finish()
    return mirror.local_dir


def wandb_run_id(run_dir: Path, signature: str | None) -> str | None:
    """The id the training run used: recorded in run.json, otherwise its signature."""
    return (RunRecord(run_dir).data.get("wandb") or {}).get("id") or signature


def named_metrics(name: str, metrics: dict) -> dict:
    """The metrics also under <name>/ (coco/rfid, coco/images), so that the numbers of one run on several named
    sets are all kept; the unprefixed keys hold the latest evaluation's."""
    return {f"{name}/{key.removeprefix('eval/')}": value for key, value in metrics.items()}


def record(results: dict, step: int, run_dir: Path | None, train_cfg: DictConfig | None, run_id: str | None, cfg: DictConfig,
           beside: Path, job_type: str, final: bool = True) -> tuple[Path, str | None]:
    """Into the run (results.json, metrics.jsonl, W&B), or, outside a run, into `output` or a results file
    beside `beside`; returns the results file and the W&B dir. Not `final` (a checkpoint before the run's end,
    later_checkpoint_step): metrics.jsonl and W&B only, so that results.json keeps the figures of the run's end."""
    if run_dir is not None:
        return run_dir / ("results.json" if final else "metrics.jsonl"), publish(run_dir, step, results, train_cfg, run_id, cfg.wandb_mode,
                                                                                 job_type, final)
    destination = Path(cfg.output).expanduser() if cfg.output else beside.with_suffix(".results.json")
    merge_results(destination, results)
    return destination, None


# ------------------------------------------------------------------------------------------------ reconstruction


def evaluate_reconstruction(cfg: DictConfig, choices: dict) -> Evaluation:
    run = evaluated_run(cfg)
    trained_config = run.state["config"]
    train_cfg = run.composed_config()
    merged = evaluated_config(train_cfg, cfg, choices)
    check_checkpoint_fits(run.checkpoint_path, run.tokenizer_weights(cfg.weights), merged, trained_config)
    trained_resolution = trained_config["data"]["resolution"]
    check_resolution(run.checkpoint_path, merged, trained_resolution)
    check_data_set(merged.data)
    device = one_process_device(cfg.device)
    networks = EvaluationNetworks(cfg.metrics, device, generation=False)

    seed = merged.get("seed", 0)
    data = build(merged.data, seed=seed)
    if len(data.val) == 0:
        raise UserError(f"the validation split of {dataset_name(OmegaConf.to_container(merged.data, resolve=True))} is empty")
    image_size = tuple(data.val[0][0].shape[-2:])
    if image_size != (trained_resolution, trained_resolution):
        raise UserError(
            f"the dataset gives {image_size[0]}x{image_size[1]} images but checkpoint {run.checkpoint_path} was trained "
            f"at {trained_resolution}x{trained_resolution}"
        )

    tokenizer = run.tokenizer(device, cfg.weights, config=merged)
    data_config = OmegaConf.to_container(merged.data, resolve=True)
    evaluator = ReconstructionEvaluator(
        DataLoader(data.val, batch_size=eval_batch_size(cfg, train_cfg), num_workers=data.num_workers),
        device,
        fid_network=networks.fid,
        lpips_models=networks.lpips,
        reference_cache=ReferenceCache(cfg.reference.cache_dir, refresh=cfg.reference.refresh),
        reference_key=validation_key(data_config, seed, networks.fid),
    )
    metrics, _ = evaluator(tokenizer, tokenizer.quantizer.codebook_size, desc=f"eval@{run.step} ({cfg.weights})")

    perceptual_net = OmegaConf.select(train_cfg, "loss.perceptual_net", default="vgg")
    metrics["lpips"] = metrics.get(f"lpips/{perceptual_net}")  # the name training reports its LPIPS under
    for net in cfg.metrics.lpips:
        metrics.setdefault(f"lpips/{net}", None)
    results = {
        **metrics,
        "lpips_available": metrics["lpips"] is not None,
        "eval/dataset": dataset_name(data_config),
        "eval/data": data_config,
        "eval/split": "val",
        "eval/weights": cfg.weights,
        "eval/checkpoint": str(run.checkpoint_path),
        "eval/step": run.step,
        "eval/reference_cached": evaluator.reference_cached,
        "eval/unavailable": networks.unavailable,
        "eval/time": timestamp(),
    }
    if data.name:
        results.update(named_metrics(data.name, metrics))
    run_id = wandb_run_id(run.run_dir, run.signature) if run.run_dir is not None else None
    end = later_checkpoint_step(run.run_dir, run.step)
    destination, wandb_dir = record(results, run.step, run.run_dir, train_cfg, run_id, cfg, run.checkpoint_path, "eval", final=end is None)
    return Evaluation(results, destination, wandb_dir, note=earlier_checkpoint_note(run.step, end))


def later_checkpoint_step(run_dir: Path | None, step: int) -> int | None:
    """The step the run ends at where the checkpoint of `step` evaluated is an earlier one (kept, keep_every):
    its last checkpoint's, or for a run still training (or stopped before its end) its total_steps, whose
    figures its results.json is for; None where the checkpoint is the run's end, or lies outside a run."""
    last = run_dir / CHECKPOINT if run_dir is not None else None
    if last is None or not last.is_file():
        return None
    end = saved_step(last)
    record = RunRecord(run_dir).data
    if record.get("status") != "completed":
        end = max(end, record.get("total_steps") or 0)
    return end if end > step else None


def earlier_checkpoint_note(step: int, end: int | None) -> str | None:
    """Evaluation.note for the figures of a checkpoint before the run's end (later_checkpoint_step)."""
    return None if end is None else f"at step {step}; results.json keeps the figures of the run's end (step {end})"


# ---------------------------------------------------------------------------------------------------- generation


# What the parts of one ibq-sample sampling share (keys of each part's results.json).
SAMPLING_IDENTITY = ("run_signature", "step", "sampling", "seed", "batch_size", "classes", "samples_per_class", "parts")


def sample_parts(folder: Path) -> list[Path]:
    """The samples.npz of each part of one ibq-sample sampling below `folder` (part=0..parts-1, each beside its
    results.json), in part order; a missing, repeated or foreign part is refused."""
    records = {}
    for npz in sorted(folder.rglob("samples.npz")):
        record = npz.parent / "results.json"
        if not record.is_file():
            raise UserError(f"samples={folder}: {npz} has no results.json beside it; a folder holds the parts of one ibq-sample "
                            f"sampling (part=0..parts-1), a single file is given as samples=<file.npz>")
        records[npz] = json.loads(record.read_text())
    if not records:
        raise UserError(f"samples={folder} holds no samples.npz: give an ADM .npz or the folder of an ibq-sample sampling")
    kinds = {json.dumps({key: r.get(key) for key in SAMPLING_IDENTITY}, sort_keys=True) for r in records.values()}
    if len(kinds) > 1:
        raise UserError(f"samples={folder} holds samples of {len(kinds)} different samplings (runs, settings or parts): "
                        f"give the folder of one, e.g. the sweep folder of its parts")
    parts, by_part = next(iter(records.values())).get("parts", 1), {}
    for npz, record in records.items():
        part = record.get("part", 0)
        if part in by_part:
            raise UserError(f"samples={folder} holds part {part} twice: {by_part[part]} and {npz}")
        by_part[part] = npz
    missing = [str(part) for part in range(parts) if part not in by_part]
    if missing:
        raise UserError(f"samples={folder} lacks part {', '.join(missing)} of parts={parts}: run ibq-sample with part={missing[0]} "
                        f"and the same settings")
    return [by_part[part] for part in range(parts)]


def sampling_record(samples: AdmSamples | AdmSampleParts) -> dict:
    """ibq-sample's record of the samples, the results.json beside them (a part's, for a folder of parts):
    its settings and seed, and the step of the checkpoint that drew them; empty for samples from elsewhere."""
    first = samples.files[0].path if isinstance(samples, AdmSampleParts) else samples.path
    record_path = first.parent / "results.json"
    record = json.loads(record_path.read_text()) if first.name == "samples.npz" and record_path.is_file() else {}
    return record if "sampling" in record else {}  # ibq-sample's record of its samples.npz (moved or not)


def open_samples(path: Path) -> AdmSamples | AdmSampleParts:
    """samples=: an ADM .npz, or a folder of ibq-sample's parts, read in part order as one set."""
    if path.is_dir():
        return AdmSampleParts([AdmSamples(npz) for npz in sample_parts(path)], path)
    return AdmSamples(path)


def reference_data_config(cfg: DictConfig, choices: dict, train_cfg: DictConfig | None,
                          samples: AdmSamples | AdmSampleParts) -> DictConfig:
    """The real set's data config: the command line's data= choice (its ??? resolution: the samples'), or the run's."""
    if choices.get("data"):
        data = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=False))
        if OmegaConf.is_missing(data, "resolution"):
            height, width = samples.resolution
            if height != width:
                raise UserError(f"samples are {height}x{width}: set data.resolution for the reference set")
            data.resolution = height
        return data
    if train_cfg is not None and "data" in train_cfg:
        return OmegaConf.merge(train_cfg.data, cfg.data) if "data" in cfg else train_cfg.data
    raise UserError(
        "gFID needs reference statistics: reference.stats=<.npz with mu and sigma>, a real dataset "
        "(data=image_folder data.root=<folder>), or run_dir=<run> whose dataset to use"
    )


# reference.limit=auto on a run's own data: gFID's real images by the run's model_scale. At the CPU scale, the fewest
# that give the 2048 features a full-rank covariance (their pass through the FID network takes minutes on a CPU,
# not half an hour).
AUTO_REFERENCE_IMAGES = {"tiny": 2048}
DEFAULT_REFERENCE_IMAGES = 10000


def auto_reference_images(run_dir: Path) -> int:
    try:
        choices = RunRecord(run_dir).data.get("choices") or {}
    except (OSError, ValueError):  # no readable run.json: the run's own check says so
        choices = {}
    return AUTO_REFERENCE_IMAGES.get(choices.get("model_scale"), DEFAULT_REFERENCE_IMAGES)


def reference_selection(reference: DictConfig, own_data: bool, run_dir: Path | None) -> tuple[str, int | None]:
    """reference.split and .limit, `auto` resolved: on the run's own data, its training images up to
    auto_reference_images (as ibq-sample scores, so that both give one gFID for one sampling); on a data= set
    (an evaluation set may have no other split), all of its val split."""
    split = reference.split if reference.split != "auto" else "train" if own_data else "val"
    limit = reference.limit
    if limit == "auto":
        limit = auto_reference_images(run_dir) if own_data and run_dir is not None else None
    return split, limit


def reference_stats(cfg: DictConfig, choices: dict, train_cfg: DictConfig | None, run_dir: Path | None,
                    samples: AdmSamples | AdmSampleParts, network, device: torch.device, seed: int,
                    batch_size: int) -> tuple[ReferenceStats, bool | None]:
    """From reference.stats, or computed on the real set and cached; also whether the cache had them."""
    if cfg.reference.stats:
        return load_reference_npz(cfg.reference.stats, FID_FEATURE_DIM), None
    data_cfg = reference_data_config(cfg, choices, train_cfg, samples)
    check_data_set(data_cfg)
    data_config = OmegaConf.to_container(data_cfg, resolve=True)
    if tuple(samples.resolution) != (data_config["resolution"],) * 2:
        log.warning("samples are %sx%s but the reference set is at %s px", *samples.resolution, data_config["resolution"])
    split, limit = reference_selection(cfg.reference, own_data=not choices.get("data"), run_dir=run_dir)
    cache = ReferenceCache(cfg.reference.cache_dir, refresh=cfg.reference.refresh)
    key = reference_key(data_config, split, limit, seed, network.sha1)

    def compute():
        data = build(data_cfg, seed=seed)
        images = data.val if split == "val" else data.train
        if images is None:
            raise UserError(f"reference.split={split}: {dataset_name(data_config)} has no such split; valid: val")
        if limit is not None:
            images = Subset(images, range(min(limit, len(images))))
        loader = DataLoader(images, batch_size=batch_size, num_workers=data.num_workers)
        return real_feature_stats(loader, network, device, desc=f"reference ({split})")

    stats, cached = cache.get_or_compute(key, compute)
    if stats.count < 2:
        raise UserError(f"the reference set ({dataset_name(data_config)} {split}) has {stats.count} image(s): FID needs 2 or more")
    return ReferenceStats.from_feature_stats(stats, f"{dataset_name(data_config)} {split} ({cache.path(key)})"), cached


def evaluate_generation(cfg: DictConfig, choices: dict, job_type: str = "eval", sampling: dict | None = None,
                        step: int | None = None) -> Evaluation:
    """`job_type`: `sample` when ibq-sample scores its own samples, passing how it drew them (`sampling`:
    its settings and seed; `step`: its checkpoint's; otherwise they are read beside the samples). They are
    recorded with the scores (`eval/sampling`), since gFID and IS are comparable only at the same settings.
    Samples of a checkpoint before the run's end are scored into its metrics.jsonl at their step, as an
    earlier checkpoint's reconstruction is."""
    if cfg.checkpoint:
        raise UserError("checkpoint= is for reconstruction; generation takes samples= (and run_dir= to record into a run)")
    samples = open_samples(Path(cfg.samples).expanduser())
    run_dir = Path(cfg.run_dir).expanduser() if cfg.run_dir else None
    if run_dir is not None and not run_dir.is_dir():
        raise UserError(f"run_dir={run_dir} does not exist: point it at the run directory whose samples these are")
    config_file = run_dir / ".hydra" / "config.yaml" if run_dir is not None else None
    train_cfg = OmegaConf.load(config_file) if config_file is not None and config_file.is_file() else None
    device = one_process_device(cfg.device)
    networks = EvaluationNetworks(cfg.metrics, device, generation=True)
    if networks.fid is None and networks.inception is None:
        why = "; ".join(networks.unavailable.values()) or "metrics.fid=false, metrics.is=false"
        raise UserError(f"nothing to compute: gFID and IS are off or unavailable ({why})")
    if networks.fid is not None and len(samples) < 2:
        raise UserError(f"{samples.path} holds {len(samples)} image: FID needs at least 2")
    if networks.inception is not None and len(samples) < cfg.metrics.is_splits:
        raise UserError(
            f"metrics.is_splits={cfg.metrics.is_splits} needs at least as many samples; {samples.path} holds {len(samples)}"
        )

    batch_size = eval_batch_size(cfg, train_cfg)
    seed = train_cfg.get("seed", 0) if train_cfg is not None else 0
    reference, cached = (None, None)
    if networks.fid is not None:
        reference, cached = reference_stats(cfg, choices, train_cfg, run_dir, samples, networks.fid, device, seed, batch_size)
    evaluator = GenerationEvaluator(device, networks.fid, networks.inception, cfg.metrics.is_splits, cfg.metrics.is_shuffle)
    metrics = evaluator(samples.batches(batch_size), reference, total=samples.batch_count(batch_size))
    drawn = sampling_record(samples)
    if sampling is None and drawn:
        sampling = {**drawn["sampling"], "seed": drawn.get("seed")}
    results = {
        **{key: None for key in ("gfid", "is")},
        **metrics,
        "eval/samples_file": str(samples.path),
        "eval/samples": len(samples),
        "eval/sampling": sampling,
        "eval/reference_cached": cached,
        "eval/unavailable": networks.unavailable,
        "eval/time": timestamp(),
    }
    drawn_at, run_id, end = step if step is not None else drawn.get("step"), None, None
    if run_dir is not None:
        results_path = run_dir / "results.json"
        if drawn_at is None:  # samples from elsewhere: of the run's end
            drawn_at = json.loads(results_path.read_text()).get("step", 0) if results_path.is_file() else 0
        end = later_checkpoint_step(run_dir, drawn_at)
        run_id = wandb_run_id(run_dir, None)
    destination, wandb_dir = record(results, drawn_at or 0, run_dir, train_cfg, run_id, cfg, samples.path, job_type, final=end is None)
    return Evaluation(results, destination, wandb_dir, reference.source if reference is not None else None, tuple(samples.resolution),
                      note=earlier_checkpoint_note(drawn_at, end))


def evaluate(cfg: DictConfig, choices: dict) -> Evaluation:
    check_settings(cfg)
    if cfg.samples:
        return evaluate_generation(cfg, choices)
    if cfg.run_dir or cfg.checkpoint:
        return evaluate_reconstruction(cfg, choices)
    raise UserError("nothing to evaluate: give run_dir=<training run> (reconstruction) or samples=<samples.npz> (generation)")
