"""Stage II: train the class-conditional transformer on the tokens of a frozen tokenizer run.

One step, as in the released code: the VAR schedule sets this step's LR and weight decay; the mean next-token
cross-entropy of the batch (labels dropped to the null class inside the model, for classifier-free guidance)
is backpropagated, over micro-batches when the batch does not fit at once; the gradient norm is clipped to
ar_optim.grad_clip; AdamW steps. Tokens come from token shards (ibq-tokenize) or from the frozen tokenizer, batch
by batch. Everything is built and checked in `__init__`, before anything is written to the run directory.

Several ranks work as in stage I: rank r takes the r-th block of each global batch; the model is wrapped in
DDP, or in a DeepSpeed engine (deepspeed=zeroN) that clips and checkpoints its shards itself; every rank
checkpoints, only rank 0 writes the run's records; the requeue signal stops all ranks at a step boundary."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ibq.data.batches import indexed_train
from ibq.data.positions import PositionSampler
from ibq.data.splits import data_identity
from ibq.engine import distributed
from ibq.engine.ar_schedule import apply_schedule, var_schedule
from ibq.config import build, shell_override
from ibq.engine.build import resolve_precision
from ibq.engine.checkpoint import CHECKPOINT, DivergenceWatch, Parent, checkpoint_at_step, fine_tuning_parent, foreign_checkpoint, load_checkpoint, load_run, restore_rng, rng_entries, save_checkpoint, seed_everything, stop_if_state_not_finite
from ibq.engine.job_config import check_ar_keys
from ibq.engine.media import save_grid
from ibq.engine.preemption import RequeueSignal, checkpoint_or_leave
from ibq.engine.ranks import check_deepspeed, deepspeed_config, detect_ranks, job_layout, plan_batches
from ibq.engine.session import RunSession
from ibq.engine.tokens import TokenizerRun, TokenShards, check_shards, load_tokenizer_run, read_manifest
from ibq.errors import UserError
from ibq.generation.sampling import sample
from ibq.models.transformer import Transformer, next_token_loss
from ibq.runs.record import AR_REPORTING_KEYS, config_differences, merge_results, result_config, signature, sized_transformer, stage_two_config

CLASS_TABLE = "class_embed.weight"  # the transformer's class embeddings, one row per class, then CFG's null class


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings (dim >= 2); none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


@torch.no_grad()
def sample_images(
    model: Transformer, tokenizer_run: TokenizerRun, labels: Tensor, sampling: dict, generator: torch.Generator, dtype: torch.dtype
) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] of the classes `labels`: KV-cached sampling, decoded by the frozen tokenizer."""
    device = model.head.weight.device
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        tokens = sample(model, labels, generator=generator, **sampling)
    return tokenizer_run.decode(tokens)


@dataclass
class ARRun:
    """A trained stage-II run, ready to sample."""

    run_dir: Path
    checkpoint: Path  # last.pt, or the one kept at an earlier step
    model: Transformer
    config: DictConfig  # the run's own config (stage-I keys left out)
    step: int
    signature: str
    tokenizer_run: TokenizerRun


def load_ar_run(run_dir: str | Path | None, device: torch.device, step: int | None = None) -> ARRun:
    """The run's last checkpoint, or that of `step` (checkpoint_at_step)."""
    if step is None:
        run = load_run(run_dir, "run_dir", "generator")
    else:
        run = load_run(checkpoint_at_step(run_dir, step, "run_dir", "generator"), "run_dir", "generator", outside_a_run=True)
    model = build(run.config.transformer)
    model.load_state_dict(run.state["model"])
    model = model.to(device).eval().requires_grad_(False)
    tokenizer_run = load_tokenizer_run(run.config.tokenizer_run, device)
    if tokenizer_run.describe() != OmegaConf.to_container(run.config.tokenizer):
        raise UserError(
            f"tokenizer_run={tokenizer_run.run_dir} changed since run_dir={run.run_dir} was trained on it "
            f"(then {OmegaConf.to_container(run.config.tokenizer)}, now {tokenizer_run.describe()})"
        )
    return ARRun(run.run_dir, run.checkpoint_path, model, run.config, run.step, run.signature, tokenizer_run)


def check_parent_tokenizer(parent: Parent, tokenizer_run: TokenizerRun) -> None:
    """A generator fine-tunes on the tokens of the tokenizer it was trained on: another's codes mean other patches."""
    trained_on, given = OmegaConf.to_container(parent.run.config.tokenizer), tokenizer_run.describe()
    if trained_on != given:
        def weights(tokenizer: dict) -> str:
            return f"signature {tokenizer['signature']}, step {tokenizer['step']}, {tokenizer['codebook_size']} codes"

        raise UserError(
            f"init_from={parent.run.run_dir} was trained on the tokens of another tokenizer ({weights(trained_on)}) than "
            f"tokenizer_run={tokenizer_run.run_dir} ({weights(given)}): give its own, "
            f"{shell_override('tokenizer_run', parent.run.config.tokenizer_run)}"
        )


def start_from(parent: Parent, model: Transformer, classes: str) -> int:
    """Loads the parent's transformer weights into `model`. With classes=fresh, for a label set of the run's
    own (of any size), the class rows start as a new model's; the null class of CFG, the table's last row,
    is no label of either set and comes from the parent. Returns the parent's number of classes."""
    weights = dict(parent.run.state["model"])
    table = weights[CLASS_TABLE]
    if classes == "fresh":  # only its width must fit
        weights[CLASS_TABLE] = table.new_empty((model.num_classes + 1, table.shape[1]), device="meta")
    elif table.shape[0] != model.num_classes + 1:
        raise UserError(
            f"init_from={parent.run.run_dir} has {table.shape[0] - 1} classes and this run {model.num_classes} "
            f"(transformer.num_classes={model.num_classes}): give its number for the same labels (transformer.num_classes="
            f"{table.shape[0] - 1}), or init_from_classes=fresh to start the class embeddings anew for a label set of this run's own"
        )
    parent.check_fits(weights, model, "transformer")
    if classes == "fresh":
        weights[CLASS_TABLE] = torch.cat([model.class_embed.weight.detach()[:-1].to(table), table[-1:]])
    model.load_state_dict(weights)
    return table.shape[0] - 1


class ARTraining:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        check_ar_keys(cfg)
        ar = cfg.ar_train
        self.run_dir = run_dir
        self.ranks = detect_ranks()
        self.layout = plan_batches(ar.batch_size, ar.micro_batch_size, self.ranks.world_size, section="ar_train")
        self.deepspeed_options = OmegaConf.to_container(cfg.deepspeed, resolve=True)
        check_deepspeed(self.deepspeed_options, ar.precision, section="ar_train")
        self.zero_stage = self.deepspeed_options.get("stage")
        self.device = distributed.device_for(self.ranks, ar.device, "ar_train.device")
        self.dtype = resolve_precision(ar.precision, self.device, "ar_train.precision")
        seed_everything(cfg.seed)

        self.tokenizer_run = load_tokenizer_run(cfg.tokenizer_run, self.device)
        parent, self.parent = fine_tuning_parent(cfg.get("init_from"), "generator", run_dir)
        if parent is not None:
            check_parent_tokenizer(parent, self.tokenizer_run)
        tokenizer = self.tokenizer_run.tokenizer
        cfg.transformer = sized_transformer(cfg, tokenizer.quantizer.codebook_size, tokenizer.downsample_factor, self.tokenizer_run.run_dir)

        self.num_classes = cfg.transformer.num_classes
        data = data_identity(cfg.data)
        if cfg.tokens is not None:
            manifest = read_manifest(cfg.tokens)
            check_shards(manifest, cfg.tokens, self.tokenizer_run, data)
            self.train_set, self.num_workers, self.tokenize = TokenShards(cfg.tokens, cfg.seed), 0, False
            self._check_classes(manifest["num_classes"] - 1, f"tokens={cfg.tokens}")
        else:
            splits = build(cfg.data, seed=cfg.seed)
            self.train_set, self.num_workers, self.tokenize = indexed_train(splits, cfg.data, "ibq-train-ar"), splits.num_workers, True
            if splits.num_classes is not None:  # else checked batch by batch
                self._check_classes(splits.num_classes - 1, "the training data")

        self.model = build(cfg.transformer).to(self.device)
        self.parameter_count = self.model.parameter_counts()["total"]
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, cfg.ar_optim.weight_decay), lr=cfg.ar_optim.lr, betas=tuple(cfg.ar_optim.betas), fused=True
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.schedule = self._schedule(cfg)

        self.cfg, self.identity = stage_two_config(cfg, self.tokenizer_run.run_dir, self.tokenizer_run.describe())
        self.signature = signature(self.identity)

        self.checkpoint_path = run_dir / CHECKPOINT
        if parent is not None:
            parent_classes = start_from(parent, self.model, cfg.init_from_classes)  # optimizer and schedule start afresh
            if cfg.init_from_classes == "fresh":
                self.parent["fresh_classes"] = {"run": self.num_classes, "parent": parent_classes}
        self.deepspeed_dir = self.checkpoint_path.parent / "deepspeed"
        distributed.init_process_group(self.ranks, self.device, always=self.zero_stage is not None)
        self.trainee = self._wrap()  # what the step calls: the model, its DDP wrapper, or its DeepSpeed engine
        self.start_step = self._resume() if self.checkpoint_path.exists() else 0
        last_good = self.start_step if self.checkpoint_path.exists() else None
        self.divergence = DivergenceWatch(self.checkpoint_path, last_good, self.device)
        self.session = RunSession(run_dir, self.ranks, self.signature)

    def _wrap(self):
        if self.zero_stage is not None:
            config = deepspeed_config(self.deepspeed_options, self.layout, gradient_clipping=self.cfg.ar_optim.grad_clip)
            return distributed.deepspeed_engine(self.model, self.optimizer, config)
        if self.ranks.world_size == 1:
            return self.model
        return distributed.data_parallel(self.model, self.device)

    def _check_classes(self, highest: int, source: str) -> None:
        if highest >= self.num_classes:
            raise UserError(
                f"{source} has class index {highest}, outside the model's classes 0..{self.num_classes - 1}: "
                f"set transformer.num_classes={highest + 1} or more"
            )

    def _schedule(self, cfg: DictConfig) -> dict:
        ar = cfg.ar_train
        if ar.steps is None:
            steps_per_epoch = len(self.train_set) // ar.batch_size
            if steps_per_epoch == 0:
                raise UserError(f"the training set has {len(self.train_set)} items, fewer than one batch of ar_train.batch_size={ar.batch_size}")
            total = ar.epochs * steps_per_epoch
        else:
            total = ar.steps
        warmup = round(total * ar.warmup_epochs / ar.epochs)  # the warm-up keeps its share of training
        if total < 2:
            raise UserError(f"ar_train.steps={total} is too short: the schedule needs at least 2 steps")
        schedule = dict(
            peak_lr=cfg.ar_optim.lr,
            warmup_steps=min(warmup, total - 2),
            total_steps=total,
            final_lr_ratio=ar.final_lr_ratio,
            weight_decay=cfg.ar_optim.weight_decay,
            final_weight_decay=ar.final_weight_decay,
        )
        var_schedule(0, **schedule)  # checks the lengths
        return schedule

    @property
    def total_steps(self) -> int:
        return self.schedule["total_steps"]

    # -- checkpoints ---------------------------------------------------------------------------
    def _save(self, step: int) -> None:
        """All ranks: DeepSpeed's engine writes its shards; then rank 0 commits last.pt, which holds the
        full weights (what ibq-sample reads) and names the shards."""
        self.divergence.check(step)  # never a checkpoint of weights updated from a non-finite loss
        tag = f"step{step:07d}" if self.zero_stage is not None else None
        state = {
            "step": step,
            "signature": self.signature,
            "config": OmegaConf.to_container(self.cfg),
            "model": distributed.full_state_dict(self.model, self.zero_stage),
            **rng_entries(),
        }
        if tag is None:
            state.update(optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict())
        else:
            state["deepspeed"] = {"tag": tag, "stage": self.zero_stage, "world_size": self.ranks.world_size}
        stop_if_state_not_finite(step, state, self.checkpoint_path, self.device)
        if tag is not None:
            distributed.save_engines({"transformer": self.trainee}, self.deepspeed_dir, tag)
        if self.ranks.is_main:
            save_checkpoint(self.checkpoint_path, state)
            if tag is not None:
                distributed.prune_engine_checkpoints(self.deepspeed_dir, keep=tag)
        distributed.barrier()

    def _resume(self) -> int:
        state = load_checkpoint(self.checkpoint_path)
        if state["signature"] != self.signature:
            saved = OmegaConf.create(state["config"])
            for key in AR_REPORTING_KEYS:
                saved.ar_train.pop(key, None)
            changed = config_differences(result_config(saved), result_config(self.identity))
            raise foreign_checkpoint(self.checkpoint_path, state["signature"], self.signature, changed)
        if self.zero_stage is None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        else:
            engines = {"transformer": self.trainee}
            distributed.load_engines(engines, self.deepspeed_dir, state["deepspeed"], self.ranks.world_size, self.checkpoint_path)
        restore_rng(state, self.ranks.rank, self.ranks.world_size)
        return state["step"]

    # -- the run -------------------------------------------------------------------------------
    def run(self, choices: dict, overrides: list[str], group: str | None) -> dict:
        self.session.open(
            self.identity, choices, overrides, "generator", self.start_step, self.signature, group,
            tokenizer={"run_dir": str(self.tokenizer_run.run_dir), **self.tokenizer_run.describe()},
            tokens=self.cfg.tokens,
            distributed=job_layout(self.ranks, self.layout, self.zero_stage),
            total_steps=self.total_steps,  # ar_train.steps, or what its epochs come to over the data
            parent=self.parent,
        )
        return self.session.run(self._train)

    def _batches(self):
        """This rank's (tokens, labels) on the device, micro-batch by micro-batch, from the resumed step on."""
        layout = self.layout
        loader = DataLoader(
            self.train_set,
            batch_size=layout.micro_batch,
            sampler=PositionSampler(
                self.start_step * layout.global_batch, self.total_steps * layout.global_batch,
                self.ranks.rank, self.ranks.world_size, layout.global_batch,
            ),
            num_workers=self.num_workers,
            generator=torch.Generator(),  # the loader's base seed must not draw from the training RNG
            pin_memory=self.device.type == "cuda",  # see ibq.data.batches.training_batches
        )
        for items, labels in loader:
            if self.tokenize:
                self._check_classes(int(labels.max()), "the training data")
                items = self.tokenizer_run.encode(items.to(self.device, non_blocking=True))
            yield items.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _train(self) -> dict:
        cfg, device, layout, main = self.cfg, self.device, self.layout, self.ranks.is_main
        steps = self.total_steps
        autocast = torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        window = {"data": 0.0, "total": 0.0, "images": 0}
        batches = self._batches()
        progress = tqdm(total=steps, initial=self.start_step, desc="train_ar", dynamic_ncols=True, disable=not main)
        self.model.train()
        with progress, RequeueSignal(cfg.cluster.get("requeue_signal")) as requeue:
            for step in range(self.start_step + 1, steps + 1):
                started = time.perf_counter()
                values = var_schedule(step - 1, **self.schedule)
                apply_schedule(self.optimizer, values, cfg.ar_optim.decay_all_groups)
                loss, grad_norm, data_time = self._step(step, batches, autocast)
                window["data"] += data_time
                window["total"] += time.perf_counter() - started
                window["images"] += layout.global_batch
                progress.update(1)

                logged = step % cfg.ar_train.log_every == 0 or step == steps
                if logged:
                    # The step's loss and gradient norm are device tensors until here: the only host reads between logs.
                    self.divergence.check(step)
                    metrics = distributed.mean_over_ranks({"loss": loss, "throughput/data_wait_share": window["data"] / window["total"]}, device)
                    metrics.update({
                        "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                        "lr": values.lr,
                        "weight_decay": values.weight_decay,
                        "throughput/images_per_s": window["images"] / window["total"],
                        "throughput/tokens_per_s": window["images"] * cfg.transformer.block_size / window["total"],
                    })
                    window = {"data": 0.0, "total": 0.0, "images": 0}
                    self.session.log(step, metrics)
                    progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{values.lr:.2e}")
                if checkpoint_or_leave(step, steps, cfg.ar_train.checkpoint_every, self._save, requeue, device, self.ranks, self.session,
                                       logged, keep_every=cfg.ar_train.keep_every):
                    self.divergence.saved(step)

        if not main:
            return {}
        results = {
            "step": steps,
            "signature": self.signature,
            "loss": next((line["loss"] for line in reversed(self.session.logged()) if "loss" in line), None),
            "parameters": self.parameter_count,
            "checkpoint": str(self.checkpoint_path.relative_to(self.run_dir)),
            "tokenizer": self.tokenizer_run.describe(),
        }
        if cfg.ar_train.grid_classes:
            results["sample_grid"] = self._sample_grid(steps)
        merge_results(self.run_dir / "results.json", results)
        return results

    def _step(self, step: int, batches, autocast) -> tuple[Tensor, Tensor | float | None, float]:
        """One optimizer step over this rank's micro-batches: (mean loss, gradient norm, seconds waiting for
        data), the loss and the norm as device tensors (DeepSpeed's norm as its engine gives it): nothing
        here waits for the device."""
        trainee, accumulation = self.trainee, self.layout.accumulation
        loss, data_time = torch.zeros((), device=self.device), 0.0
        for index in range(accumulation):
            fetch_started = time.perf_counter()
            tokens, labels = next(batches)
            data_time += time.perf_counter() - fetch_started
            # DDP reduces gradients at the last micro-batch only; DeepSpeed's engine does so itself.
            sync = trainee.no_sync() if isinstance(trainee, DistributedDataParallel) and index < accumulation - 1 else nullcontext()
            with sync:
                with autocast:
                    micro_loss = next_token_loss(trainee(tokens, labels), tokens)
                self.divergence.observe(step, {"loss": micro_loss})
                if self.zero_stage is not None:
                    trainee.backward(micro_loss)  # scales by 1/accumulation; step() updates at the last micro-batch
                    trainee.step()
                else:
                    self.scaler.scale(micro_loss / accumulation).backward()
            loss += micro_loss.detach() / accumulation
        if self.zero_stage is not None:
            return loss, trainee.get_global_grad_norm(), data_time  # clipped to ar_optim.grad_clip inside the engine
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.ar_optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, data_time

    def _sample_grid(self, step: int) -> str:
        """Rank 0: one sample for each of the first grid_classes classes, with the run's sampling settings."""
        model = self.model
        if self.zero_stage == 3:  # this rank holds a shard of each weight; last.pt has them whole
            model = build(self.cfg.transformer).to(self.device)
            model.load_state_dict(load_checkpoint(self.checkpoint_path)["model"])
        labels = torch.arange(min(self.cfg.ar_train.grid_classes, self.num_classes), device=self.device)
        generator = torch.Generator(self.device).manual_seed(self.cfg.seed)
        images = sample_images(model.eval(), self.tokenizer_run, labels, OmegaConf.to_container(self.cfg.sampling), generator, self.dtype)
        path = self.run_dir / "media" / f"samples_step{step:07d}.png"
        save_grid(images.cpu(), path, nrow=len(labels))
        self.session.mirror.log_image("media/samples", path, step)
        return str(path.relative_to(self.run_dir))
