"""`ibq-train-ar`: stage II, the class-conditional transformer on the tokens of a trained tokenizer run."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ibq.cli.common import entry_point, guarded, kept_checkpoint_lines, parent_lines, run_training
from ibq.config import CONF_DIR, shell_override


def dry_run(cfg: DictConfig) -> None:
    """Report the size of the transformer, built on the meta device (no memory, no data; of tokenizer_run, its
    config alone, for sizes given as `auto`)."""
    from ibq.engine.job_config import meta_transformer  # here, not at import: completion and --help start without torch

    model = meta_transformer(cfg)
    t = cfg.transformer
    print(f"transformer: depth {t.depth}, width {t.width}, heads {t.heads}, {model.block_size} tokens from {model.vocab_size} codes, {model.num_classes} classes")
    for name, count in model.parameter_counts().items():
        print(f"  {name:<12} {count / 1e6:10.2f}M  ({count:,})")


def summary_lines(training, results: dict, run_dir: Path) -> list[str]:
    lines = [
        f"loss                  {results['loss']:.4f}",
        f"parameters            {results['parameters'] / 1e6:.2f}M",
        f"tokenizer             {training.tokenizer_run.run_dir} (signature {training.tokenizer_run.signature})",
        *parent_lines(training),
        f"run directory         {run_dir}",
        f"results               {run_dir / 'results.json'}",
    ]
    if "sample_grid" in results:
        lines.append(f"samples               {run_dir / results['sample_grid']}")
    lines += kept_checkpoint_lines(run_dir, "ar_train.keep_every", "ibq-sample", "samples one")
    lines.append(f"next                  ibq-sample {shell_override('run_dir', run_dir)}   (samples, gFID and IS)")
    return lines


@hydra.main(config_path=str(CONF_DIR), config_name="train_ar", version_base="1.3")
@guarded
def main(cfg: DictConfig, run_dir: Path) -> list[float] | float | None:
    from ibq.engine.train_ar import ARTraining

    return run_training(cfg, run_dir, "ibq-train-ar", ARTraining, dry_run, summary_lines)


cli = entry_point(main)

if __name__ == "__main__":
    cli()
