"""What a training job refuses in its config alone, wherever it runs: its keys, its precision and step
switches, and the models the config describes, built on the meta device (no memory, no data).

cli.checks runs these before a run's folder is made and before a sweep is submitted, so that a bad value
is one line on the submitting machine rather than a failed job on the cluster. The module loads torch and
the models only, not the engine's data, metrics or DeepSpeed: a refusal takes seconds."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from ibq.config import build
from ibq.engine.acceleration import StepAcceleration
from ibq.engine.build import check_precision
from ibq.engine.checkpoint import load_run
from ibq.errors import UserError, check_positive_int, unset_key
from ibq.models.transformer import Transformer
from ibq.runs.record import FOLLOWS_TOKENIZER, sized_transformer


def unset_keys(node: DictConfig | ListConfig, path: str) -> Iterator[str]:
    """The ??? keys under `node`, in config order, without resolving interpolations."""
    for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
        full = f"{path}.{key}" if isinstance(node, DictConfig) else f"{path}[{key}]"
        if OmegaConf.is_missing(node, key):
            yield full
        elif not OmegaConf.is_interpolation(node, key) and OmegaConf.is_config(node[key]):
            yield from unset_keys(node[key], full)


def check_set(cfg: DictConfig, roots: tuple[str, ...]) -> None:
    """The first ??? key under the config nodes that the job reads, as one line naming it (building a
    model from the node would name the key that refers to it instead)."""
    for root in roots:
        first = next(unset_keys(cfg[root], root), None) if root in cfg else None
        if first is not None:
            raise unset_key(first)


# -- stage I: ibq-train ------------------------------------------------------------------------------------
def check_training_keys(cfg: DictConfig) -> None:
    for key in ("train.steps", "train.batch_size", "train.log_every", "train.checkpoint_every", "eval.batch_size"):
        check_positive_int(key, OmegaConf.select(cfg, key))
    if not isinstance(cfg.eval.every, int) or cfg.eval.every < 0:
        raise UserError(f"eval.every={cfg.eval.every!r} is invalid: it must be 0 (only at the end) or a positive integer")
    cache_dir = cfg.eval.get("reference_cache_dir")
    if cache_dir is not None and (not isinstance(cache_dir, str) or not cache_dir):
        raise UserError(f"eval.reference_cache_dir={cache_dir!r} is invalid: give a folder, or null to keep no statistics")
    if not isinstance(cfg.optim.lr, (int, float)) or cfg.optim.lr <= 0:
        raise UserError(f"optim.lr={cfg.optim.lr!r} is invalid: it must be a positive number")
    if not cfg.eval.rfid and "rfid" in (cfg.get("objectives") or []):  # a search would run every trial for nothing
        raise UserError("objectives=[…, rfid] needs rFID, which eval.rfid=false leaves out: set eval.rfid=true, "
                        "or search on other objectives")


def check_resolution(resolution: int, downsample_factor: int) -> None:
    if resolution % downsample_factor:
        raise UserError(f"data.resolution={resolution} must be a multiple of the tokenizer's downsampling factor {downsample_factor}")


def takes_images(discriminator: nn.Module, resolution: int) -> bool:
    try:
        logits = discriminator(torch.empty(2, 3, resolution, resolution, device="meta"))
    except (RuntimeError, ValueError):
        return False
    return not (isinstance(logits, torch.Tensor) and logits.numel() == 0)  # older torch: an empty output, not an error


def check_discriminator_input(cfg: DictConfig, discriminator: nn.Module) -> None:
    """The discriminator (on the meta device) over a batch of data.resolution images: a stack of convolutions
    too deep for them is one line here, not a failed first step."""
    resolution = cfg.data.resolution
    discriminator.eval()  # shapes only: BatchNorm's training-mode batch check aside
    if takes_images(discriminator, resolution):
        return
    smallest = next((size for size in range(resolution + 1, 8 * resolution + 64) if takes_images(discriminator, size)), None)
    if smallest is None:  # no size: not a matter of size (a discriminator of one's own that the meta device cannot run)
        return
    layers = OmegaConf.select(cfg, "discriminator.n_layers", default=None)
    named = f"the discriminator (discriminator.n_layers={layers})" if layers is not None else "the discriminator"
    raise UserError(f"{named} cannot take data.resolution={resolution} images: its convolutions need images of at least "
                    f"{smallest} px; give fewer layers{' (discriminator.n_layers)' if layers is not None else ''} or a larger data.resolution")


def meta_tokenizer(cfg: DictConfig) -> nn.Module:
    """The tokenizer the config describes (model and quantizer), on the meta device."""
    with torch.device("meta"):
        return build(cfg.model, quantizer=build(cfg.quantizer))


def meta_models(cfg: DictConfig) -> tuple[nn.Module, nn.Module]:
    """The tokenizer and the discriminator the config describes, on the meta device."""
    with torch.device("meta"):
        return meta_tokenizer(cfg), build(cfg.discriminator)


def check_tokenizer_job(cfg: DictConfig) -> None:
    check_set(cfg, ("model", "quantizer", "discriminator", "train", "eval", "optim", "data"))
    check_training_keys(cfg)
    check_precision(cfg.train.precision, "train.precision")
    StepAcceleration.from_config(cfg.train, torch.device("meta"))  # the values; `auto` is resolved on the job's device
    tokenizer, discriminator = meta_models(cfg)
    check_resolution(cfg.data.resolution, tokenizer.downsample_factor)
    check_discriminator_input(cfg, discriminator)


# -- stage II: ibq-train-ar --------------------------------------------------------------------------------
def check_ar_keys(cfg: DictConfig) -> None:
    if "transformer" not in cfg:
        raise UserError("this model_scale has no stage-II transformer: choose model_scale=tiny, B, L, XL or XXL")
    if cfg.get("init_from_classes") == "fresh" and cfg.get("init_from") is None:
        raise UserError("init_from_classes=fresh starts a fine-tuning run's class embeddings anew, but init_from is not given: "
                        "give init_from=<generator run>, or leave init_from_classes out")
    ar = cfg.ar_train
    for key in ("batch_size", "log_every", "checkpoint_every", "epochs"):
        check_positive_int(f"ar_train.{key}", ar[key])
    if ar.steps is not None:
        check_positive_int("ar_train.steps", ar.steps)
    if not isinstance(ar.grid_classes, int) or ar.grid_classes < 0:
        raise UserError(f"ar_train.grid_classes={ar.grid_classes!r} is invalid: it must be an integer >= 0 (0: no sample grid)")
    if not 0 <= ar.warmup_epochs < ar.epochs:
        raise UserError(f"ar_train.warmup_epochs={ar.warmup_epochs} is invalid: it must be in [0, ar_train.epochs={ar.epochs})")
    if not 0 <= ar.final_lr_ratio <= 1:
        raise UserError(f"ar_train.final_lr_ratio={ar.final_lr_ratio} is invalid: it must be in [0, 1]")
    for key in ("lr", "grad_clip"):
        if not isinstance(cfg.ar_optim[key], (int, float)) or cfg.ar_optim[key] <= 0:
            raise UserError(f"ar_optim.{key}={cfg.ar_optim[key]!r} is invalid: it must be a positive number")


def meta_transformer(cfg: DictConfig) -> Transformer:
    """The transformer the config describes, on the meta device, with its sizes checked against (or, where
    `auto`, taken from) the config of tokenizer_run, whose weights are not read; a dry run reads that
    config only for sizes it does not give."""
    auto = [key for key in FOLLOWS_TOKENIZER if cfg.transformer[key] == "auto"]
    if auto and cfg.get("tokenizer_run") is None:
        raise UserError(f"transformer.{auto[0]}=auto follows tokenizer_run, which is not given: give tokenizer_run=<an "
                        f"ibq-train run> or a number")
    model = None if auto else build_on_meta(cfg.transformer)  # its own errors before those of the run it reads
    if auto or (cfg.get("tokenizer_run") is not None and not cfg.get("dry_run")):
        run = load_run(cfg.tokenizer_run, "tokenizer_run", "tokenizer")
        tokenizer = meta_tokenizer(run.config)
        sized = sized_transformer(cfg, tokenizer.quantizer.codebook_size, tokenizer.downsample_factor, run.run_dir)
        model = model or build_on_meta(sized)
    return model


def build_on_meta(transformer: DictConfig) -> Transformer:
    with torch.device("meta"):
        return build(transformer)


def check_ar_job(cfg: DictConfig) -> None:
    check_set(cfg, ("transformer", "ar_train", "ar_optim"))
    check_ar_keys(cfg)
    check_precision(cfg.ar_train.precision, "ar_train.precision")
    meta_transformer(cfg)
