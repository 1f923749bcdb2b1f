"""`ibq-train`: stage I, a tokenizer run composed from the config groups in conf/."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ibq.cli.common import entry_point, fid_detail, guarded, kept_checkpoint_lines, parent_lines, run_training
from ibq.config import CONF_DIR


def dry_run(cfg: DictConfig) -> None:
    """Build the models on the meta device (no memory, no data) and report their sizes."""
    from ibq.engine.job_config import meta_models  # here, not at import: completion and --help start without torch

    tokenizer, discriminator = meta_models(cfg)
    counts = tokenizer.parameter_counts()
    counts["discriminator"] = sum(p.numel() for p in discriminator.parameters())
    print(f"codebook: {cfg.quantizer.codebook_size} codes x {cfg.quantizer.dim} dims; downsampling x{tokenizer.downsample_factor}")
    for name, count in counts.items():
        print(f"  {name:<16} {count / 1e6:10.2f}M  ({count:,})")


def summary_lines(training, results: dict, run_dir: Path) -> list[str]:
    def fmt(key: str, digits: int) -> str:
        value = results.get(key)
        return "unavailable" if value is None else f"{value:.{digits}f}"

    return [
        f"codebook/utilization  {fmt('codebook/utilization', 4)}  ({results['codebook/tokens']} tokens; "
        f"a uniform code assignment would reach {results['codebook/utilization_bound']:.4f})",
        f"codebook/perplexity   {fmt('codebook/perplexity', 1)}",
        f"codebook/dead         {results['codebook/dead']}",
        f"rfid                  {fmt('rfid', 2)}  {fid_detail(results, 'rfid', 'eval.rfid=false')}",
        f"psnr                  {fmt('psnr', 2)} dB",
        f"ssim                  {fmt('ssim', 4)}",
        f"lpips                 {fmt('lpips', 4)}",
        *parent_lines(training),
        f"run directory         {run_dir}",
        f"results               {run_dir / 'results.json'}",
        f"reconstructions       {run_dir / results['reconstruction_grid']}",
        *kept_checkpoint_lines(run_dir, "train.keep_every", "ibq-eval", "scores one"),
    ]


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
@guarded
def main(cfg: DictConfig, run_dir: Path) -> list[float] | float | None:
    from ibq.engine.train_tokenizer import TokenizerTraining

    return run_training(cfg, run_dir, "ibq-train", TokenizerTraining, dry_run, summary_lines)


cli = entry_point(main)

if __name__ == "__main__":
    cli()
