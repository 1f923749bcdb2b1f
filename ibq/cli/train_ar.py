"""`ibq-train-ar`: stage II, the class-conditional transformer on the tokens of a trained tokenizer run."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ibq.cli.common import CONF_DIR, entry_point, guarded, hydra_context, save_hydra_files
from ibq.engine.build import build
from ibq.engine.tokens import run_name
from ibq.errors import UserError
from ibq.runs.record import RunRecord

OmegaConf.register_new_resolver("ibq.run_name", run_name, replace=True)


def dry_run(cfg: DictConfig, choices: dict) -> None:
    """Build the transformer on the meta device (no memory, no data, no tokenizer) and report its size."""
    if "transformer" not in cfg:
        raise UserError("this model_scale has no stage-II transformer: choose model_scale=tiny, B, L, XL or XXL")
    with torch.device("meta"):
        model = build(cfg.transformer)
    t = cfg.transformer
    print("choices: " + ", ".join(f"{k}={v}" for k, v in sorted(choices.items()) if v is not None))
    print(f"transformer: depth {t.depth}, width {t.width}, heads {t.heads}, {t.block_size} tokens from {t.vocab_size} codes, {t.num_classes} classes")
    for name, count in model.parameter_counts().items():
        print(f"  {name:<12} {count / 1e6:10.2f}M  ({count:,})")


@hydra.main(config_path=str(CONF_DIR), config_name="train_ar", version_base="1.3")
@guarded
def main(cfg: DictConfig, run_dir: Path) -> None:
    from ibq.engine.train_ar import ARTraining

    choices, overrides, group = hydra_context()
    if cfg.dry_run:
        dry_run(cfg, choices)
        return
    training = ARTraining(cfg, run_dir)  # builds and checks everything; writes nothing
    if training.ranks.is_main:
        save_hydra_files(cfg, run_dir)
    results = training.run(choices, overrides, group)
    if not training.ranks.is_main:
        return
    wandb = RunRecord(run_dir).data.get("wandb") or {}
    print(f"\nibq-train-ar: {training.total_steps} steps done ({', '.join(f'{k}={v}' for k, v in sorted(choices.items()) if v)})")
    lines = [
        f"loss                  {results['loss']:.4f}",
        f"parameters            {results['parameters'] / 1e6:.2f}M",
        f"tokenizer             {training.tokenizer_run.run_dir} (signature {training.tokenizer_run.signature})",
        f"run directory         {run_dir}",
        f"results               {run_dir / 'results.json'}",
    ]
    if "sample_grid" in results:
        lines.append(f"samples               {run_dir / results['sample_grid']}")
    if wandb.get("dir"):
        lines.append(f"W&B ({wandb['mode']})         {wandb['dir']}" + (f"  (upload: wandb sync {wandb['dir']})" if wandb["mode"] == "offline" else ""))
    for line in lines:
        print("  " + line)


cli = entry_point(main, "train_ar")

if __name__ == "__main__":
    cli()
