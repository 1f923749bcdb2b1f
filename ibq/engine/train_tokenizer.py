"""Stage I: train a tokenizer (encoder -> quantizer -> decoder) against a PatchGAN discriminator.

One iteration, as in the released IBQ code: a discriminator step (hinge + LeCAM) on the detached
reconstruction, then a generator step (L1 + LPIPS + non-saturating GAN + the quantizer's loss) on the
same reconstruction, then the EMA update. Everything that the run needs is built and checked in
`__init__`, before anything is written to the run directory."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from ibq.engine.build import build, resolve_device, resolve_precision
from ibq.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from ibq.engine.ema import EMA
from ibq.engine.evaluate import ReconstructionEvaluator
from ibq.data.positions import PositionSampler
from ibq.errors import TrainingDiverged, UserError, check_positive_int
from ibq.losses import LeCAM, hinge_d_loss, non_saturating_g_loss
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
        self.device = resolve_device(cfg.train.device)
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
        self.start_step = self._resume() if self.checkpoint_path.exists() else 0

    # -- checkpoints ---------------------------------------------------------------------------
    def _state(self, step: int) -> dict:
        return {
            "step": step,
            "signature": self.signature,
            "config": result_config(self.cfg),
            "tokenizer": self.tokenizer.state_dict(),
            "ema": self.ema.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "lecam": self.lecam.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "sched_d": self.sched_d.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
        }

    def _resume(self) -> int:
        state = load_checkpoint(self.checkpoint_path)
        if state["signature"] != self.signature:
            changed = config_differences(state["config"], result_config(self.cfg))
            raise UserError(
                f"{self.checkpoint_path} belongs to another configuration (signature {state['signature']}, "
                f"this run {self.signature}; differs in {'; '.join(changed[:3]) or 'unknown keys'}): "
                f"use a new run_dir or the original overrides"
            )
        self.tokenizer.load_state_dict(state["tokenizer"])
        self.ema.load_state_dict(state["ema"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.lecam.load_state_dict(state["lecam"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        return state["step"]

    # -- the run -------------------------------------------------------------------------------
    def run(self, choices: dict, overrides: list[str], group: str | None) -> dict:
        cfg = self.cfg
        (self.run_dir / "media").mkdir(parents=True, exist_ok=True)
        record = RunRecord(self.run_dir)
        record.start(cfg, choices, overrides, kind="tokenizer", resumed_from_step=self.start_step or None)
        metrics_log = MetricsLog(self.run_dir / "metrics.jsonl")
        metrics_log.truncate_after(self.start_step)
        mirror = self._mirror(choices, group)
        record.update(wandb={"id": mirror.run_id, "url": mirror.url, "dir": mirror.local_dir, "mode": mirror.mode, "group": mirror.group})
        try:
            results = self._train(metrics_log, mirror)
        except TrainingDiverged as error:
            record.finish("failed", str(error))
            mirror.finish(exit_code=1)
            raise
        except BaseException as error:
            record.finish("failed", f"{type(error).__name__}: {error}")
            mirror.finish(exit_code=1)
            raise
        record.finish("completed")
        mirror.summarize(results)
        mirror.finish()
        return results

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

    def _train(self, metrics_log: MetricsLog, mirror) -> dict:
        cfg, device = self.cfg, self.device
        steps, batch_size = cfg.train.steps, cfg.train.batch_size
        loader = DataLoader(
            self.data.train,
            batch_size=batch_size,
            sampler=PositionSampler(self.start_step * batch_size, steps * batch_size),
            num_workers=self.data.num_workers,
            drop_last=True,
        )
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

        progress = tqdm(total=steps, initial=self.start_step, desc="train", dynamic_ncols=True)
        batches = iter(loader)
        for step in range(self.start_step + 1, steps + 1):
            started = time.perf_counter()
            images, _ = next(batches)
            images = images.to(device, non_blocking=True)
            data_time = time.perf_counter() - started
            self.tokenizer.train()
            self.discriminator.train()
            gan_on = step > cfg.loss.disc_start

            with autocast:
                reconstructions, quantized = self.tokenizer(images)

            # Discriminator step, on the detached reconstruction.
            self.discriminator.requires_grad_(True)
            with autocast:
                real_logits = self.discriminator(images)
                fake_logits = self.discriminator(reconstructions.detach())
                d_hinge = hinge_d_loss(real_logits, fake_logits)
                d_lecam = self.lecam(real_logits, fake_logits)
                d_loss = d_hinge + cfg.loss.lecam_weight * d_lecam
            if gan_on:
                self._check_finite(step, last_good, {"loss/d": d_loss})
                self.opt_d.zero_grad(set_to_none=True)
                self.scaler.scale(d_loss).backward()
                self.scaler.step(self.opt_d)

            # Generator step: reconstruction + perceptual + adversarial + quantizer terms.
            self.discriminator.requires_grad_(False)
            with autocast:
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
            self.opt_g.zero_grad(set_to_none=True)
            self.scaler.scale(g_loss).backward()
            self.scaler.step(self.opt_g)
            self.scaler.update()
            self.sched_g.step()
            self.sched_d.step()
            self.ema.update(self.tokenizer)

            window["data"] += data_time
            window["total"] += time.perf_counter() - started
            window["images"] += batch_size
            progress.update(1)

            if step % cfg.train.log_every == 0 or step == steps:
                metrics = {
                    "loss/g": g_loss.item(),
                    "loss/l1": l1.item(),
                    "loss/perceptual": perceptual.item(),
                    "loss/g_adv": g_adv.item(),
                    "loss/quantizer": quantized.loss.item(),
                    "loss/d": d_loss.item(),
                    "loss/d_hinge": d_hinge.item(),
                    "loss/lecam": d_lecam.item(),
                    **quantized.stats,
                    "lr": self.sched_g.get_last_lr()[0],
                    "throughput/images_per_s": window["images"] / window["total"],
                    "throughput/data_wait_share": window["data"] / window["total"],
                }
                window = {"data": 0.0, "total": 0.0, "images": 0}
                metrics_log.append(step, metrics)
                mirror.log(metrics, step)
                progress.set_postfix(loss=f"{metrics['loss/g']:.3f}", use=f"{quantized.stats.get('codebook/batch_utilization', 0):.2f}")

            if cfg.eval.every and step % cfg.eval.every == 0 and step != steps:
                self._evaluate(evaluator, codebook_size, step, metrics_log, mirror)
            if step % cfg.train.checkpoint_every == 0 or step == steps:
                save_checkpoint(self.checkpoint_path, self._state(step))
                last_good = step
        progress.close()
        if self.start_step == steps and steps > 0:
            log.info("run already trained to %d steps: evaluating its checkpoint", steps)
        results = self._evaluate(evaluator, codebook_size, steps, metrics_log, mirror)
        results.update(
            step=steps,
            signature=self.signature,
            lpips_available=self.lpips is not None,
            checkpoint=str(self.checkpoint_path.relative_to(self.run_dir)),
            weights="ema",
        )
        write_json(self.run_dir / "results.json", results)
        return results

    def _evaluate(self, evaluator, codebook_size: int, step: int, metrics_log: MetricsLog, mirror) -> dict:
        metrics, grid = evaluator(self.ema.shadow, codebook_size, desc=f"eval@{step}")
        grid_path = self.run_dir / "media" / f"reconstructions_step{step:07d}.png"
        tmp = grid_path.with_name(f".{grid_path.stem}.tmp.png")
        # top row: validation images; bottom: their reconstructions; small crops enlarged to be seen
        grid = torch.nn.functional.interpolate(grid, scale_factor=max(1, 128 // grid.shape[-1]), mode="nearest")
        torchvision.utils.save_image((grid + 1) / 2, tmp, nrow=len(grid) // 2)
        tmp.replace(grid_path)
        logged = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        metrics_log.append(step, logged)
        mirror.log(logged, step)
        mirror.log_image("media/reconstructions", grid_path, step)
        return {**metrics, "reconstruction_grid": str(grid_path.relative_to(self.run_dir))}

    def _check_finite(self, step: int, last_good: int | None, losses: dict) -> None:
        bad = {name: value.item() for name, value in losses.items() if not torch.isfinite(value)}
        if bad:
            kept = f"the last good checkpoint is {self.checkpoint_path} (step {last_good})" if last_good else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"non-finite loss at step {step} ({', '.join(f'{k}={v}' for k, v in bad.items())}): training stopped; {kept}"
            )
