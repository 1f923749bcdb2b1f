"""Stage I: train a tokenizer (encoder -> quantizer -> decoder) against a PatchGAN discriminator.

One iteration, as in the released IBQ code: a discriminator step (hinge + LeCAM) on the detached
reconstruction, then a generator step (L1 + LPIPS + non-saturating GAN + the quantizer's loss) on the
same reconstruction, then the EMA update. Everything that the run needs is built and checked in
`__init__`, before anything is written to the run directory.

With several ranks (torchrun, submitit, srun) each global batch is split: rank r takes the r-th block
of it, in `accumulation` micro-batches. Without DeepSpeed the generator and the discriminator are each
wrapped in DDP; with deepspeed=zeroN each has its own DeepSpeed engine, which also saves and loads its
part of the checkpoint. Every rank takes part in checkpoints; only rank 0 writes run.json,
metrics.jsonl, results.json and W&B."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ibq.data.batches import trainable, training_batches
from ibq.data.shards import merge_states
from ibq.engine import distributed
from ibq.engine.acceleration import StepAcceleration, match_parameter_layout_
from ibq.config import build
from ibq.engine.build import resolve_precision
from ibq.engine.checkpoint import DivergenceWatch, Parent, fine_tuning_parent, foreign_checkpoint, load_checkpoint, restore_rng, rng_entries, save_checkpoint, seed_everything, stop_if_state_not_finite
from ibq.engine.ema import EMA
from ibq.engine.evaluate import ReconstructionEvaluator
from ibq.engine.job_config import check_resolution, check_training_keys
from ibq.engine.media import save_grid
from ibq.engine.preemption import RequeueSignal, checkpoint_or_leave
from ibq.engine.ranks import check_deepspeed, deepspeed_config, detect_ranks, job_layout, plan_batches
from ibq.engine.session import RunSession
from ibq.errors import UserError
from ibq.losses import LeCAM, hinge_d_loss, non_saturating_g_loss
from ibq.metrics.codebook import CodebookHistogram
from ibq.metrics.fid import load_fid_network
from ibq.metrics.lpips import try_load_lpips
from ibq.metrics.reference import ReferenceCache, validation_key
from ibq.runs.record import MetricsLog, config_differences, merge_results, result_config, signature, tokenizer_identity
from ibq.runs.usage import save_usage

log = logging.getLogger(__name__)


class TokenizerTraining:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        check_training_keys(cfg)
        cfg = tokenizer_identity(cfg)
        self.cfg, self.run_dir = cfg, run_dir
        self.ranks = detect_ranks()
        self.layout = plan_batches(cfg.train.batch_size, cfg.train.micro_batch_size, self.ranks.world_size)
        self.deepspeed_options = OmegaConf.to_container(cfg.deepspeed, resolve=True)
        check_deepspeed(self.deepspeed_options, cfg.train.precision)
        self.zero_stage = self.deepspeed_options.get("stage")
        self.device = distributed.device_for(self.ranks, cfg.train.device, "train.device")
        self.dtype = resolve_precision(cfg.train.precision, self.device, "train.precision")
        parent, self.parent = fine_tuning_parent(cfg.get("init_from"), "tokenizer", run_dir)
        self.acceleration = StepAcceleration.from_config(cfg.train, self.device)
        self.signature = signature(cfg)
        seed_everything(cfg.seed)

        self.data = build(cfg.data, seed=cfg.seed)
        trainable(self.data, cfg.data)
        self.tokenizer = build(cfg.model, quantizer=build(cfg.quantizer)).to(self.device)
        check_resolution(cfg.data.resolution, self.tokenizer.downsample_factor)
        self.discriminator = build(cfg.discriminator).to(self.device)
        self.lecam = LeCAM(cfg.loss.lecam_decay).to(self.device)
        self.lpips = try_load_lpips(cfg.loss.perceptual_net, cfg.loss.lpips_backbone_path, cfg.loss.perceptual_required)
        if self.lpips is not None:
            self.lpips.to(self.device)
        self.tokenizer.set_activation_checkpointing(self.acceleration.activation_checkpointing)
        self.acceleration.lay_out(self.tokenizer, self.discriminator, self.lpips)
        self.ema = EMA(self.tokenizer, cfg.train.ema_decay)  # copied before compilation: evaluation runs eagerly
        self.acceleration.compile_modules(self.tokenizer.encoder, self.tokenizer.decoder, self.discriminator, self.lpips)

        optim = cfg.optim
        # fused: one kernel per step instead of a dozen per tensor (on 2 CPU cores, 12% of the tiny step)
        self.opt_g = torch.optim.Adam(self.tokenizer.parameters(), lr=optim.lr, betas=tuple(optim.betas), fused=True)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=optim.lr, betas=tuple(optim.betas), fused=True)
        self.sched_g, self.sched_d = (
            torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(optim.lr_drop_steps), gamma=optim.lr_drop_factor)
            for opt in (self.opt_g, self.opt_d)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

        self.checkpoint_path = run_dir / "checkpoints" / "last.pt"
        if parent is not None:
            self._start_from(parent)
        self.deepspeed_dir = run_dir / "checkpoints" / "deepspeed"
        distributed.init_process_group(self.ranks, self.device, always=self.zero_stage is not None)
        # What the steps call: the bare modules, DDP wrappers, or DeepSpeed engines.
        self.generator, self.critic = self._wrap()
        self.stream_state = None  # a shard stream's cursors, from the checkpoint
        self.extends: dict | None = None  # the run that train.extend_from names, when this run starts from it
        self.start_step = self._resume() if self.checkpoint_path.exists() else self._extend()
        last_good = self.start_step if self.checkpoint_path.exists() else None
        self.divergence = DivergenceWatch(self.checkpoint_path, last_good, self.device)
        self.session = RunSession(run_dir, self.ranks, self.signature)

    def _wrap(self):
        if self.zero_stage is not None:
            return self._deepspeed_engines()
        if self.ranks.world_size == 1:
            return self.tokenizer, self.discriminator
        # The discriminator runs twice before its backward pass (real, then fake images). Broadcasting its
        # BatchNorm statistics before the second run would change, in place, tensors that torch 2.4's batch
        # norm keeps for the backward pass; they are left per rank instead: in training mode no output
        # depends on them, and rank 0's, the ones a broadcast would copy, are those checkpointed.
        return (distributed.data_parallel(self.tokenizer, self.device),
                distributed.data_parallel(self.discriminator, self.device, broadcast_buffers=False))

    def _deepspeed_engines(self):
        config = deepspeed_config(self.deepspeed_options, self.layout)
        generator = distributed.deepspeed_engine(self.tokenizer, self.opt_g, config)
        critic = distributed.deepspeed_engine(self.discriminator, self.opt_d, config)
        if self.zero_stage == 3:
            import deepspeed

            # ZeRO-3 gathers a module's weights around its own forward and backward, found through the
            # tensors it returns. The quantizer reads its codebook outside the embedding's forward and
            # returns a dataclass, which ZeRO-3 cannot look into: the tokenizer, which returns plain
            # tensors, gathers the quantizer's weights instead.
            for parameter in self.tokenizer.quantizer.parameters():
                deepspeed.zero.register_external_parameter(self.tokenizer, parameter)
        return generator, critic

    @property
    def total_steps(self) -> int:
        return self.cfg.train.steps

    def _start_from(self, parent: Parent) -> None:
        """The parent's weights: tokenizer, EMA and, when it has one of this shape, discriminator."""
        state = parent.run.state
        parent.check_fits(state["tokenizer"], self.tokenizer, "model")
        self.tokenizer.load_state_dict(state["tokenizer"])
        self.ema.load_state_dict(state["ema"])
        if "discriminator" in state:
            try:
                self.discriminator.load_state_dict(state["discriminator"])
            except RuntimeError:
                log.info("init_from=%s: its discriminator has another shape; this run's starts from scratch", parent.run.run_dir)

    # -- checkpoints ---------------------------------------------------------------------------
    def _state(self, step: int, tag: str | None) -> dict:
        """The checkpoint's own file (collective: ZeRO-3 gathers, RNG states of every rank)."""
        state = {
            "step": step,
            "signature": self.signature,
            "config": result_config(self.cfg),
            # Full weights even under DeepSpeed, so that evaluation and stage II read this file alone.
            "tokenizer": distributed.full_state_dict(self.tokenizer, self.zero_stage),
            "ema": self.ema.state_dict(),
            "discriminator": distributed.full_state_dict(self.discriminator, self.zero_stage),
            "lecam": self.lecam.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "sched_d": self.sched_d.state_dict(),
            **rng_entries(),
        }
        stream_state = self.batches.state()
        if stream_state is not None:
            state["data_stream"] = merge_states(distributed.gather_objects(stream_state))
        if tag is None:
            state.update(opt_g=self.opt_g.state_dict(), opt_d=self.opt_d.state_dict(), scaler=self.scaler.state_dict())
        else:
            state["deepspeed"] = {"tag": tag, "stage": self.zero_stage, "world_size": self.ranks.world_size}
        return state

    def _save(self, step: int) -> None:
        """All ranks: DeepSpeed's engines write their shards; then rank 0 commits last.pt, which names
        them, so a job killed mid-save resumes from the previous complete checkpoint."""
        self.divergence.check(step)  # never a checkpoint of weights updated from a non-finite loss
        tag = f"step{step:07d}" if self.zero_stage is not None else None
        state = self._state(step, tag)
        stop_if_state_not_finite(step, state, self.checkpoint_path, self.device)
        if tag is not None:
            distributed.save_engines(self._engines(), self.deepspeed_dir, tag)
        if self.ranks.is_main:
            save_checkpoint(self.checkpoint_path, state)
            if tag is not None:
                distributed.prune_engine_checkpoints(self.deepspeed_dir, keep=tag)
        distributed.barrier()

    def _engines(self) -> dict:
        return {"generator": self.generator, "discriminator": self.critic}

    def _resume(self) -> int:
        state = load_checkpoint(self.checkpoint_path)
        if state["signature"] != self.signature:
            changed = config_differences(state["config"], result_config(self.cfg))
            longer = all(line.startswith("train.steps: ") for line in changed) and state["step"] < self.cfg.train.steps
            raise foreign_checkpoint(self.checkpoint_path, state["signature"], self.signature, changed,
                                     extends="train.extend_from" if changed and longer else None)
        return self._restore(state, self.deepspeed_dir)

    def _extend(self) -> int:
        """train.extend_from=<run>: start from that run's checkpoint, which must be of this configuration
        but for a smaller train.steps. The step LR schedule (optim.lr_drop_steps) counts absolute steps and
        the data stream is a function of the step, so training on from it equals training this run from
        scratch: the schedules of the two lengths never mix. 0 (a fresh start) without it."""
        source = self.cfg.train.get("extend_from")
        if not source:
            return 0
        checkpoint = Path(source).expanduser() / "checkpoints" / "last.pt"
        if not checkpoint.is_file():
            raise UserError(f"train.extend_from={source} holds no checkpoint ({checkpoint}): give the run directory of an ibq-train run")
        state = load_checkpoint(checkpoint)
        changed = [c for c in config_differences(state["config"], result_config(self.cfg)) if not c.startswith("train.steps:")]
        if changed:
            raise UserError(f"train.extend_from={source} was trained with another configuration (differs in {'; '.join(changed[:3])}): "
                            f"only train.steps may differ")
        if state["step"] >= self.cfg.train.steps:
            raise UserError(f"train.extend_from={source} is at step {state['step']}: give a train.steps above it (now {self.cfg.train.steps})")
        self.extends = {"run_dir": str(Path(source).expanduser().resolve()), "signature": state["signature"], "step": state["step"]}
        return self._restore(state, checkpoint.parent / "deepspeed")

    def _restore(self, state: dict, deepspeed_dir: Path) -> int:
        if self.zero_stage is None:
            self.tokenizer.load_state_dict(state["tokenizer"])
            self.discriminator.load_state_dict(state["discriminator"])
            for optimizer, name in ((self.opt_g, "opt_g"), (self.opt_d, "opt_d")):
                optimizer.load_state_dict(state[name])
                match_parameter_layout_(optimizer)
            self.scaler.load_state_dict(state["scaler"])
        else:
            distributed.load_engines(self._engines(), deepspeed_dir, state["deepspeed"], self.ranks.world_size, self.checkpoint_path)
        self.ema.load_state_dict(state["ema"])
        self.lecam.load_state_dict(state["lecam"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        restore_rng(state, self.ranks.rank, self.ranks.world_size)
        self.stream_state = state.get("data_stream")
        return state["step"]

    # -- the run -------------------------------------------------------------------------------
    def run(self, choices: dict, overrides: list[str], group: str | None) -> dict:
        metrics = self.run_dir / "metrics.jsonl"
        if self.extends is not None and self.ranks.is_main and not metrics.exists():
            # the extended run's history up to its step, so that this run's record is complete
            history, own = MetricsLog(Path(self.extends["run_dir"]) / "metrics.jsonl"), MetricsLog(metrics)
            for line in history.read():
                if line["step"] <= self.start_step:
                    own.append(line.pop("step"), line)
        self.session.open(
            self.cfg, choices, overrides, "tokenizer", self.start_step, self.signature, group,
            distributed=job_layout(self.ranks, self.layout, self.zero_stage), parent=self.parent,
            **({"extends": self.extends} if self.extends else {}),
            acceleration=self.acceleration.record(), total_steps=self.total_steps,
        )
        return self.session.run(self._train)

    def _train(self) -> dict:
        cfg, device, layout, main = self.cfg, self.device, self.layout, self.ranks.is_main
        steps = cfg.train.steps
        self.batches = training_batches(
            self.data, layout.micro_batch, layout.global_batch, self.start_step, steps,
            self.ranks.rank, self.ranks.world_size, self.stream_state, pin_memory=device.type == "cuda",
        )
        evaluator = None
        if main:  # rank 0 evaluates alone (see _evaluate)
            fid_network = load_fid_network(device=device) if cfg.eval.rfid else None
            cache_dir = cfg.eval.get("reference_cache_dir")
            evaluator = ReconstructionEvaluator(
                DataLoader(self.data.val, batch_size=cfg.eval.batch_size, num_workers=self.data.num_workers),
                device,
                fid_network=fid_network,
                lpips_model=self.lpips,
                grid_images=cfg.eval.grid_images,
                reference_cache=ReferenceCache(cache_dir) if cache_dir else None,
                reference_key=validation_key(OmegaConf.to_container(cfg.data, resolve=True), cfg.seed, fid_network),
            )
        autocast = torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        codebook_size = self.tokenizer.quantizer.codebook_size
        window = {"data": 0.0, "total": 0.0, "images": 0}

        progress = tqdm(total=steps, initial=self.start_step, desc="train", dynamic_ncols=True, disable=not main)
        with progress, RequeueSignal(cfg.cluster.get("requeue_signal")) as requeue:
            for step in range(self.start_step + 1, steps + 1):
                started = time.perf_counter()
                micro_batches = [next(self.batches)[0].to(device, non_blocking=True, memory_format=self.acceleration.memory_format)
                                 for _ in range(layout.accumulation)]
                data_time = time.perf_counter() - started
                metrics = self._step(step, micro_batches, autocast)
                window["data"] += data_time
                window["total"] += time.perf_counter() - started
                window["images"] += layout.global_batch
                progress.update(1)

                logged = step % cfg.train.log_every == 0 or step == steps
                if logged:
                    # The step's figures are device tensors until here: the only host reads between logs.
                    self.divergence.check(step)
                    counters = self.batches.counters()
                    metrics = distributed.mean_over_ranks({**metrics, **counters}, device)
                    metrics.update({key: round(metrics[key] * self.ranks.world_size) for key in counters})  # sums over ranks
                    metrics.update({
                        "lr": self.sched_g.get_last_lr()[0],
                        "throughput/images_per_s": window["images"] / window["total"],
                        "throughput/data_wait_share": window["data"] / window["total"],
                    })
                    window = {"data": 0.0, "total": 0.0, "images": 0}
                    self.session.log(step, metrics)
                    progress.set_postfix(loss=f"{metrics['loss/g']:.3f}", use=f"{metrics.get('codebook/batch_utilization', 0):.2f}")

                if cfg.eval.every and step % cfg.eval.every == 0 and step != steps:
                    self._evaluate(evaluator, codebook_size, step)
                if checkpoint_or_leave(step, steps, cfg.train.checkpoint_every, self._save, requeue, device, self.ranks, self.session,
                                       logged, keep_every=cfg.train.keep_every):
                    self.divergence.saved(step)
        if self.start_step == steps and steps > 0 and main:
            log.info("run already trained to %d steps: evaluating its checkpoint", steps)
        # A run resumed after its final evaluation was logged evaluates again without a second line.
        logged = any(line["step"] == steps and "loss/g" not in line for line in self.session.logged())
        results = self._evaluate(evaluator, codebook_size, steps, append=not logged)
        if main:
            results.update(
                step=steps,
                signature=self.signature,
                lpips_available=self.lpips is not None,
                checkpoint=str(self.checkpoint_path.relative_to(self.run_dir)),
                weights="ema",
            )
            merge_results(self.run_dir / "results.json", results)
        return results

    def _step(self, step: int, micro_batches: list[torch.Tensor], autocast) -> dict[str, torch.Tensor]:
        """One optimizer step of each network over this rank's micro-batches; returns their mean losses
        and quantizer statistics as device tensors: nothing here waits for the device."""
        cfg = self.cfg
        accumulation = len(micro_batches)
        gan_on = step > cfg.loss.disc_start
        self.tokenizer.train()
        self.discriminator.train()
        sums: dict[str, torch.Tensor] = defaultdict(float)

        # Discriminator step, on detached reconstructions. With one micro-batch the reconstruction
        # (and its graph) is kept for the generator step; with several, the generator step
        # recomputes each, so only one micro-batch's graph is alive at a time.
        self.discriminator.requires_grad_(True)
        if self.zero_stage is None:
            self.opt_d.zero_grad(set_to_none=True)
        for index, images in enumerate(micro_batches):
            with autocast:
                if accumulation == 1:
                    reconstructions, quantized = self.generator(images)
                else:
                    with torch.no_grad():
                        reconstructions, _ = self.generator(images)
            with self._no_sync(self.critic, index, accumulation):
                with torch.set_grad_enabled(gan_on), autocast:
                    real_logits = self.critic(images)
                    fake_logits = self.critic(reconstructions.detach())
                    d_hinge = hinge_d_loss(real_logits, fake_logits)
                    d_lecam = self.lecam(real_logits, fake_logits)
                    d_loss = d_hinge + cfg.loss.lecam_weight * d_lecam
                if gan_on:
                    self.divergence.observe(step, {"loss/d": d_loss})
                    self._backward(d_loss, self.critic)
            for name, value in (("loss/d", d_loss), ("loss/d_hinge", d_hinge), ("loss/lecam", d_lecam)):
                sums[name] += value.detach().float()
        if gan_on and self.zero_stage is None:
            self.scaler.step(self.opt_d)
        # Each rank moved LeCAM's averages with its own logits; their mean is the one-process update.
        distributed.average_buffers_(self.lecam)

        # Generator step: reconstruction + perceptual + adversarial + quantizer terms. The adversarial
        # term goes through the bare discriminator: its weights are frozen here, nothing to reduce.
        self.discriminator.requires_grad_(False)
        if self.zero_stage is None:
            self.opt_g.zero_grad(set_to_none=True)
        for index, images in enumerate(micro_batches):
            with self._no_sync(self.generator, index, accumulation):
                with autocast:
                    if accumulation > 1:
                        reconstructions, quantized = self.generator(images)
                    l1 = (images - reconstructions).abs().mean()
                    perceptual = self.lpips(images, reconstructions).mean() if self.lpips is not None else l1.new_zeros(())
                    g_adv = non_saturating_g_loss(self.discriminator(reconstructions)) if gan_on else l1.new_zeros(())
                    g_loss = (
                        cfg.loss.l1_weight * l1
                        + cfg.loss.perceptual_weight * perceptual
                        + cfg.loss.generator_adv_weight * g_adv
                        + cfg.loss.quantizer_weight * quantized.loss
                    )
                self.divergence.observe(step, {"loss/g": g_loss, "loss/quantizer": quantized.loss})
                self._backward(g_loss, self.generator)
            for name, value in (("loss/g", g_loss), ("loss/l1", l1), ("loss/perceptual", perceptual),
                                ("loss/g_adv", g_adv), ("loss/quantizer", quantized.loss)):
                sums[name] += value.detach().float()
            for name, value in quantized.stats.items():
                sums[name] += value
        if self.zero_stage is None:
            self.scaler.step(self.opt_g)
            self.scaler.update()
        self.sched_g.step()
        self.sched_d.step()
        with distributed.gathered(self.tokenizer, self.zero_stage):
            self.ema.update(self.tokenizer)
        return {name: total / accumulation for name, total in sums.items()}

    def _no_sync(self, model, index: int, accumulation: int):
        """DDP reduces gradients at the last micro-batch only (DeepSpeed's engines do so themselves)."""
        if isinstance(model, DistributedDataParallel) and index < accumulation - 1:
            return model.no_sync()
        return nullcontext()

    def _backward(self, loss: torch.Tensor, model) -> None:
        if self.zero_stage is not None:
            model.backward(loss)  # scales by 1/accumulation; step() updates at the last micro-batch
            model.step()
        else:
            self.scaler.scale(loss / self.layout.accumulation).backward()

    def _evaluate(self, evaluator, codebook_size: int, step: int, append: bool = True) -> dict:
        if not self.ranks.is_main:
            # Rank 0's evaluator sums its codebook histogram over the ranks: the others add an empty one.
            CodebookHistogram(codebook_size, self.device).all_reduce()
            return {}
        metrics, grid = evaluator(self.ema.shadow, codebook_size, desc=f"eval@{step}")
        grid_path = self.run_dir / "media" / f"reconstructions_step{step:07d}.png"
        save_grid(grid, grid_path, nrow=len(grid) // 2)  # top row: validation images; bottom: their reconstructions
        save_usage(self.run_dir, step, evaluator.code_counts.numpy())
        if append:
            self.session.log(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
            self.session.mirror.log_image("media/reconstructions", grid_path, step)
            self.session.mirror.log_code_usage(evaluator.code_counts.numpy(), step)
        return {**metrics, "reconstruction_grid": str(grid_path.relative_to(self.run_dir))}
