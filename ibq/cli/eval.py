"""`ibq-eval`: metrics of a trained tokenizer (reconstruction) or of generated samples (generation), recorded
in the evaluated run (see ibq.engine.evaluation_run); this module composes, calls the engine and prints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ibq.cli.common import entry_point, fid_detail, guarded
from ibq.config import CONF_DIR
from ibq.runs.record import group_choices

if TYPE_CHECKING:
    from ibq.engine.evaluation_run import Evaluation


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "unavailable"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def closing_lines(evaluation: Evaluation, wandb_mode: str) -> list[str]:
    lines = [f"  results               {evaluation.destination}" + (f" ({evaluation.note})" if evaluation.note else "")]
    if evaluation.wandb_dir:
        lines.append(f"  W&B ({wandb_mode})         {evaluation.wandb_dir}")
    return lines


def reconstruction_lines(evaluation: Evaluation, cfg: DictConfig) -> list[str]:
    results = evaluation.results
    lines = [
        f"ibq-eval: {results['eval/checkpoint']} (step {results['eval/step']}, {cfg.weights} weights) on {results['eval/dataset']} val "
        f"({results['eval/images']} images)",
        f"  codebook/utilization  {fmt(results['codebook/utilization'])}  ({results['codebook/tokens']} tokens; "
        f"a uniform code assignment would reach {results['codebook/utilization_bound']:.4f})",
        f"  codebook/perplexity   {fmt(results['codebook/perplexity'], 1)}",
        f"  codebook/dead         {results['codebook/dead']}",
        f"  rfid                  {fmt(results['rfid'], 2)}  {fid_detail(results, 'rfid', 'metrics.fid=false')}",
        f"  psnr                  {fmt(results['psnr'], 2)} dB",
        f"  ssim                  {fmt(results['ssim'])}",
    ]
    lines += [f"  lpips/{net:<15} {fmt(results[f'lpips/{net}'])}" for net in cfg.metrics.lpips]
    return lines + closing_lines(evaluation, cfg.wandb_mode)


def generation_lines(evaluation: Evaluation, cfg: DictConfig) -> list[str]:
    results = evaluation.results
    height, width = evaluation.resolution
    lines = [f"ibq-eval: {results['eval/samples_file']} ({results['eval/samples']} samples, {height}x{width})"]
    if results["gfid"] is not None:
        lines.append(
            f"  gfid                  {fmt(results['gfid'], 2)}  ({results['gfid/samples']} samples, "
            f"{results['gfid/network']}; reference {evaluation.reference})"
        )
    else:
        lines.append("  gfid                  unavailable")
    if results["is"] is not None:
        order = "shuffled" if results["is/shuffle"] else "in file order"
        lines.append(f"  is                    {fmt(results['is'], 2)} ± {results['is/std']:.2f}  ({results['is/splits']} splits, {order})")
    else:
        lines.append("  is                    unavailable")
    return lines + closing_lines(evaluation, cfg.wandb_mode)


def evaluate(cfg: DictConfig, choices: dict) -> list[str]:
    """The evaluation's summary lines."""
    from ibq.engine import evaluation_run  # here, not at import: completion and --help start without torch

    evaluation = evaluation_run.evaluate(cfg, choices)
    return (generation_lines if cfg.samples else reconstruction_lines)(evaluation, cfg)


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
@guarded
def main(cfg: DictConfig, output_dir: Path) -> None:
    # Results go into the evaluated run; guarded() removes the job's own folder, which stays empty.
    print("\n".join(evaluate(cfg, group_choices(HydraConfig.get().runtime.choices))))


cli = entry_point(main)

if __name__ == "__main__":
    cli()
