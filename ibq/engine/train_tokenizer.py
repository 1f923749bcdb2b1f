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
import os
import shutil
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ibq.data.positions import PositionSampler
from ibq.engine import distributed
from ibq.engine.build import build, resolve_precision
from ibq.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from ibq.engine.ema import EMA
from ibq.engine.evaluate import ReconstructionEvaluator
from ibq.engine.preemption import RequeueRefused, RequeueSignal, StoppedAtCheckpoint
from ibq.errors import TrainingDiverged, UserError, check_positive_int
from ibq.losses import LeCAM, hinge_d_loss, non_saturating_g_loss
from ibq.metrics.codebook import CodebookHistogram
from ibq.metrics.fid import load_fid_network
from ibq.metrics.lpips import try_load_lpips
from ibq.runs.record import MetricsLog, RunRecord, config_differences, result_config, signature, write_json
from ibq.runs.wandb_mirror import NullMirror, WandbMirror

log = logging.getLogger(__name__)


def check_training_keys(cfg: DictConfig) -> None:
    for key in ("train.steps", "train.batch_size", "train.log_every", "train.checkpoint_every", "eval.batch_size"):
        check_positive_int(key, OmegaConf.select(cfg, key))
    if not isinstance(cfg.eval.every, int) or cfg.eval.every < 0:
        raise UserError(f"eval.every={cfg.eval.every!r} is invalid: it must be 0 (only at the end) or a positive integer")
    if not isinstance(cfg.optim.lr, (int, float)) or cfg.optim.lr <= 0:
        raise UserError(f"optim.lr={cfg.optim.lr!r} is invalid: it must be a positive number")


class TokenizerTraining:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        check_training_keys(cfg)
        self.ranks = distributed.detect_ranks()
        self.layout = distributed.plan_batches(cfg.train.batch_size, cfg.train.micro_batch_size, self.ranks.world_size)
        self.deepspeed_options = OmegaConf.to_container(cfg.deepspeed, resolve=True)
        distributed.check_deepspeed(self.deepspeed_options, cfg.train.precision)
        self.zero_stage = self.deepspeed_options.get("stage")
        self.device = distributed.device_for(self.ranks, cfg.train.device)
        self.dtype = resolve_precision(cfg.train.precision, self.device)
        self.signature = signature(cfg)
        seed_everything(cfg.seed)

        self.data = build(cfg.data, seed=cfg.seed)
        self.tokenizer = build(cfg.model, quantizer=build(cfg.quantizer)).to(self.device)
        factor = self.tokenizer.downsample_factor
        if cfg.data.resolution % factor:
            raise UserError(f"data.resolution={cfg.data.resolution} must be a multiple of the tokenizer's downsampling factor {factor}")
        self.discriminator = build(cfg.discriminator).to(self.device)
        self.lecam = LeCAM(cfg.loss.lecam_decay).to(self.device)
        self.lpips = try_load_lpips(cfg.loss.perceptual_net, cfg.loss.lpips_backbone_path, cfg.loss.perceptual_required)
        if self.lpips is not None:
            self.lpips.to(self.device)
        self.ema = EMA(self.tokenizer, cfg.train.ema_decay)

        optim = cfg.optim
        self.opt_g = torch.optim.Adam(self.tokenizer.parameters(), lr=optim.lr, betas=tuple(optim.betas))
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=optim.lr, betas=tuple(optim.betas))
        self.sched_g, self.sched_d = (
            torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(optim.lr_drop_steps), gamma=optim.lr_drop_factor)
            for opt in (self.opt_g, self.opt_d)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

        self.checkpoint_path = run_dir / "checkpoints" / "last.pt"
        self.deepspeed_dir = run_dir / "checkpoints" / "deepspeed"
        distributed.init_process_group(self.ranks, self.device, always=self.zero_stage is not None)
        # What the steps call: the bare modules, DDP wrappers, or DeepSpeed engines.
        self.generator, self.critic = self._wrap()
        self.start_step = self._resume() if self.checkpoint_path.exists() else 0
        self.record: RunRecord | None = None
        self.metrics_log: MetricsLog | None = None
        self.mirror = NullMirror()

    def _wrap(self):
        if self.zero_stage is not None:
            return self._deepspeed_engines()
        if self.ranks.world_size == 1:
            return self.tokenizer, self.discriminator
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return (
            DistributedDataParallel(self.tokenizer, device_ids=device_ids),
            DistributedDataParallel(self.discriminator, device_ids=device_ids),
        )

    def _deepspeed_engines(self):
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        import deepspeed
        from deepspeed.utils import logger as deepspeed_logger

        deepspeed_logger.setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        config = distributed.deepspeed_config(self.deepspeed_options, self.layout)
        generator, *_ = deepspeed.initialize(model=self.tokenizer, optimizer=self.opt_g, config=config)
        critic, *_ = deepspeed.initialize(model=self.discriminator, optimizer=self.opt_d, config=config)
        if self.zero_stage == 3:
            # ZeRO-3 gathers a module's weights around its own forward and backward, found through the
            # tensors it returns. The quantizer reads its codebook outside the embedding's forward and
            # returns a dataclass, which ZeRO-3 cannot look into: the tokenizer, which returns plain
            # tensors, gathers the quantizer's weights instead.
            for parameter in self.tokenizer.quantizer.parameters():
                deepspeed.zero.register_external_parameter(self.tokenizer, parameter)
        return generator, critic

    def _gathered(self, module: torch.nn.Module):
        """ZeRO-3 keeps a shard of each parameter per rank: gather them to read the whole module."""
        if self.zero_stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)

    # -- checkpoints ---------------------------------------------------------------------------
    def _full_state_dict(self, module: torch.nn.Module) -> dict:
        with self._gathered(module):
            return {key: value.detach().clone() for key, value in module.state_dict().items()}

    def _state(self, step: int, tag: str | None) -> dict:
        """The checkpoint's own file (collective: ZeRO-3 gathers, RNG states of every rank)."""
        rngs = distributed.gather_objects(rng_state())
        state = {
            "step": step,
            "signature": self.signature,
            "config": result_config(self.cfg),
            # Full weights even under DeepSpeed, so that evaluation and stage II read this file alone.
            "tokenizer": self._full_state_dict(self.tokenizer),
            "ema": self.ema.state_dict(),
            "discriminator": self._full_state_dict(self.discriminator),
            "lecam": self.lecam.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "sched_d": self.sched_d.state_dict(),
            "rng": rngs[0],
        }
        if len(rngs) > 1:
            state["rng_by_rank"] = rngs
        if tag is None:
            state.update(opt_g=self.opt_g.state_dict(), opt_d=self.opt_d.state_dict(), scaler=self.scaler.state_dict())
        else:
            state["deepspeed"] = {"tag": tag, "stage": self.zero_stage, "world_size": self.ranks.world_size}
        return state

    def _save(self, step: int) -> None:
        """All ranks: DeepSpeed's engines write their shards; then rank 0 commits last.pt, which names
        them, so a job killed mid-save resumes from the previous complete checkpoint."""
        tag = None
        if self.zero_stage is not None:
            tag = f"step{step:07d}"
            for engine, name in ((self.generator, "generator"), (self.critic, "discriminator")):
                engine.save_checkpoint(str(self.deepspeed_dir / name), tag=tag, save_latest=False)
        state = self._state(step, tag)
        if self.ranks.is_main:
            save_checkpoint(self.checkpoint_path, state)
            if tag is not None:
                for stale in self.deepspeed_dir.glob("*/step*"):
                    if stale.name != tag:
                        shutil.rmtree(stale, ignore_errors=True)
        distributed.barrier()

    def _resume(self) -> int:
        state = load_checkpoint(self.checkpoint_path)
        if state["signature"] != self.signature:
            changed = config_differences(state["config"], result_config(self.cfg))
            raise UserError(
                f"{self.checkpoint_path} belongs to another configuration (signature {state['signature']}, "
                f"this run {self.signature}; differs in {'; '.join(changed[:3]) or 'unknown keys'}): "
                f"use a new run_dir or the original overrides"
            )
        if self.zero_stage is None:
            self.tokenizer.load_state_dict(state["tokenizer"])
            self.discriminator.load_state_dict(state["discriminator"])
            self.opt_g.load_state_dict(state["opt_g"])
            self.opt_d.load_state_dict(state["opt_d"])
            self.scaler.load_state_dict(state["scaler"])
        else:
            saved = state["deepspeed"]
            if saved["world_size"] != self.ranks.world_size:
                raise UserError(
                    f"{self.checkpoint_path} was written by {saved['world_size']} ranks under deepspeed=zero{saved['stage']} and "
                    f"this job has {self.ranks.world_size}: ZeRO's shards load only into as many ranks "
                    f"(cluster.nodes x cluster.tasks_per_node)"
                )
            for engine, name in ((self.generator, "generator"), (self.critic, "discriminator")):
                path, _ = engine.load_checkpoint(str(self.deepspeed_dir / name), tag=saved["tag"], load_lr_scheduler_states=False)
                if path is None:
                    raise RuntimeError(f"DeepSpeed found no {name} checkpoint {saved['tag']} under {self.deepspeed_dir}")
        self.ema.load_state_dict(state["ema"])
        self.lecam.load_state_dict(state["lecam"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        by_rank = state.get("rng_by_rank")
        set_rng_state(by_rank[self.ranks.rank] if by_rank and len(by_rank) == self.ranks.world_size else state["rng"])
        return state["step"]

    # -- the run -------------------------------------------------------------------------------
    def run(self, choices: dict, overrides: list[str], group: str | None) -> dict:
        cfg = self.cfg
        if self.ranks.is_main:
            (self.run_dir / "media").mkdir(parents=True, exist_ok=True)
            self.record = RunRecord(self.run_dir)
            self.record.start(cfg, choices, overrides, kind="tokenizer", resumed_from_step=self.start_step or None)
            self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl")
            self.metrics_log.truncate_after(self.start_step)
            self.mirror = self._mirror(choices, group)
            mirror = self.mirror
            self.record.update(
                wandb={"id": mirror.run_id, "url": mirror.url, "dir": mirror.local_dir, "mode": mirror.mode, "group": mirror.group},
                distributed={
                    "world_size": self.ranks.world_size,
                    "launcher": self.ranks.launcher,
                    "micro_batch_size": self.layout.micro_batch,
                    "accumulation": self.layout.accumulation,
                    "deepspeed_stage": self.zero_stage,
                },
            )
        try:
            results = self._train()
        except (StoppedAtCheckpoint, RequeueRefused):
            raise  # recorded where it happened
        except TrainingDiverged as error:
            self._failed(str(error))
            raise
        except BaseException as error:
            self._failed(f"{type(error).__name__}: {error}")
            raise
        if self.ranks.is_main:
            self.record.finish("completed")
            self.mirror.summarize(results)
            self.mirror.finish()
        distributed.shutdown()
        return results

    def _failed(self, message: str) -> None:
        if self.ranks.is_main:
            self.record.finish("failed", message)
            self.mirror.finish(exit_code=1)

    def _mirror(self, choices: dict, group: str | None):
        logger = self.cfg.logger
        if logger.kind == "none":
            return NullMirror()
        return WandbMirror(
            run_dir=self.run_dir,
            run_id=self.signature,
            config={**OmegaConf.to_container(self.cfg, resolve=True), "choices": choices},
            project=logger.project,
            entity=logger.entity,
            group=logger.group or group,
            tags=list(logger.tags or []) + [f"{k}:{v}" for k, v in sorted(choices.items()) if v is not None],
            name=logger.name or self.run_dir.name,
            mode=logger.mode,
            base_url=logger.base_url,
        )

    def _log(self, step: int, metrics: dict) -> None:
        if self.ranks.is_main:
            self.metrics_log.append(step, metrics)
            self.mirror.log(metrics, step)

    def _train(self) -> dict:
        cfg, device, layout, main = self.cfg, self.device, self.layout, self.ranks.is_main
        steps = cfg.train.steps
        loader = DataLoader(
            self.data.train,
            batch_size=layout.micro_batch,
            sampler=PositionSampler(
                self.start_step * layout.global_batch, steps * layout.global_batch,
                self.ranks.rank, self.ranks.world_size, layout.global_batch,
            ),
            num_workers=self.data.num_workers,
            drop_last=True,
        )
        evaluator = None
        if main:  # rank 0 evaluates alone (see _evaluate)
            evaluator = ReconstructionEvaluator(
                DataLoader(self.data.val, batch_size=cfg.eval.batch_size, num_workers=self.data.num_workers),
                device,
                fid_network=load_fid_network(device=device) if cfg.eval.rfid else None,
                lpips_model=self.lpips,
                grid_images=cfg.eval.grid_images,
            )
        autocast = torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        codebook_size = self.tokenizer.quantizer.codebook_size
        last_good = self.start_step if self.checkpoint_path.exists() else None
        window = {"data": 0.0, "total": 0.0, "images": 0}

        progress = tqdm(total=steps, initial=self.start_step, desc="train", dynamic_ncols=True, disable=not main)
        batches = iter(loader)
        with progress, RequeueSignal(cfg.cluster.get("requeue_signal")) as requeue:
            for step in range(self.start_step + 1, steps + 1):
                started = time.perf_counter()
                micro_batches = [next(batches)[0].to(device, non_blocking=True) for _ in range(layout.accumulation)]
                data_time = time.perf_counter() - started
                metrics = self._step(step, micro_batches, last_good, autocast)
                window["data"] += data_time
                window["total"] += time.perf_counter() - started
                window["images"] += layout.global_batch
                progress.update(1)

                if step % cfg.train.log_every == 0 or step == steps:
                    metrics = distributed.mean_over_ranks(metrics, device)
                    metrics.update({
                        "lr": self.sched_g.get_last_lr()[0],
                        "throughput/images_per_s": window["images"] / window["total"],
                        "throughput/data_wait_share": window["data"] / window["total"],
                    })
                    window = {"data": 0.0, "total": 0.0, "images": 0}
                    self._log(step, metrics)
                    progress.set_postfix(loss=f"{metrics['loss/g']:.3f}", use=f"{metrics.get('codebook/batch_utilization', 0):.2f}")

                if cfg.eval.every and step % cfg.eval.every == 0 and step != steps:
                    self._evaluate(evaluator, codebook_size, step)
                saved = step % cfg.train.checkpoint_every == 0 or step == steps
                if saved:
                    self._save(step)
                    last_good = step
                if step < steps and requeue.pending(device):
                    if not saved:
                        self._save(step)
                    self._leave_for_requeue(step, requeue)
        if self.start_step == steps and steps > 0 and main:
            log.info("run already trained to %d steps: evaluating its checkpoint", steps)
        # A run resumed after its final evaluation was logged evaluates again without a second line.
        logged = main and any(line["step"] == steps and "loss/g" not in line for line in self.metrics_log.read())
        results = self._evaluate(evaluator, codebook_size, steps, append=not logged)
        if main:
            results.update(
                step=steps,
                signature=self.signature,
                lpips_available=self.lpips is not None,
                checkpoint=str(self.checkpoint_path.relative_to(self.run_dir)),
                weights="ema",
            )
            write_json(self.run_dir / "results.json", results)
        return results

    def _step(self, step: int, micro_batches: list[torch.Tensor], last_good: int | None, autocast) -> dict[str, float]:
        """One optimizer step of each network over this rank's micro-batches; returns their mean losses."""
        cfg = self.cfg
        accumulation = len(micro_batches)
        gan_on = step > cfg.loss.disc_start
        self.tokenizer.train()
        self.discriminator.train()
        sums: dict[str, float] = defaultdict(float)

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
                    self._check_finite(step, last_good, {"loss/d": d_loss})
                    self._backward(d_loss, self.critic)
            sums["loss/d"] += d_loss.item()
            sums["loss/d_hinge"] += d_hinge.item()
            sums["loss/lecam"] += d_lecam.item()
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
                self._check_finite(step, last_good, {"loss/g": g_loss, "loss/quantizer": quantized.loss})
                self._backward(g_loss, self.generator)
            for name, value in (("loss/g", g_loss), ("loss/l1", l1), ("loss/perceptual", perceptual),
                                ("loss/g_adv", g_adv), ("loss/quantizer", quantized.loss)):
                sums[name] += value.item()
            for name, value in quantized.stats.items():
                sums[name] += value
        if self.zero_stage is None:
            self.scaler.step(self.opt_g)
            self.scaler.update()
        self.sched_g.step()
        self.sched_d.step()
        with self._gathered(self.tokenizer):
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

    def _leave_for_requeue(self, step: int, requeue: RequeueSignal) -> None:
        """After the checkpoint at `step`: requeue through submitit (rank 0), record it, and leave."""
        outcome = distributed.broadcast_object(requeue.requeue() if self.ranks.is_main else None)
        stops = outcome.requeued or outcome.reason == "interrupted"  # else: a time limit too many times
        refusal = f"not requeued after the checkpoint at step {step} of {self.run_dir}: {outcome.message}"
        if self.ranks.is_main:
            entry = {
                "step": step,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "reason": outcome.reason,
                "requeued": outcome.requeued,
            }
            self.record.update(requeues=[*self.record.data.get("requeues", []), entry])
            if stops:
                self.record.update(status="requeued" if outcome.requeued else "interrupted")
                self.mirror.finish()
                log.warning("signal %s: checkpoint at step %d; %s", requeue.signum.name, step,
                            "job requeued" if outcome.requeued else outcome.message)
            else:
                self._failed(refusal)
        distributed.shutdown()
        if stops:
            raise StoppedAtCheckpoint(outcome.exit_code)
        raise RequeueRefused(refusal)

    def _evaluate(self, evaluator, codebook_size: int, step: int, append: bool = True) -> dict:
        if not self.ranks.is_main:
            # Rank 0's evaluator sums its codebook histogram over the ranks: the others add an empty one.
            CodebookHistogram(codebook_size, self.device).all_reduce()
            return {}
        metrics, grid = evaluator(self.ema.shadow, codebook_size, desc=f"eval@{step}")
        grid_path = self.run_dir / "media" / f"reconstructions_step{step:07d}.png"
        tmp = grid_path.with_name(f".{grid_path.stem}.tmp.png")
        # top row: validation images; bottom: their reconstructions; small crops enlarged to be seen
        grid = torch.nn.functional.interpolate(grid, scale_factor=max(1, 128 // grid.shape[-1]), mode="nearest")
        torchvision.utils.save_image((grid + 1) / 2, tmp, nrow=len(grid) // 2)
        tmp.replace(grid_path)
        if append:
            self._log(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
            self.mirror.log_image("media/reconstructions", grid_path, step)
        return {**metrics, "reconstruction_grid": str(grid_path.relative_to(self.run_dir))}

    def _check_finite(self, step: int, last_good: int | None, losses: dict) -> None:
        """Every rank stops together when a loss is non-finite on any of them."""
        bad = {name: value.item() for name, value in losses.items() if not torch.isfinite(value)}
        if distributed.any_rank(bool(bad), self.device):
            kept = f"the last good checkpoint is {self.checkpoint_path} (step {last_good})" if last_good else "no checkpoint was written yet"
            where = ", ".join(f"{k}={v}" for k, v in bad.items()) or "on another rank"
            raise TrainingDiverged(f"non-finite loss at step {step} ({where}): training stopped; {kept}")
