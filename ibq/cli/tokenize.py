"""`ibq-tokenize`: token shards from the frozen EMA tokenizer of an ibq-train run, written once for stage II."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ibq.cli.common import entry_point, guarded, save_hydra_files
from ibq.config import CONF_DIR, build
from ibq.errors import check_positive_int


def data_config(cfg: DictConfig, tokenizer_config: DictConfig) -> DictConfig:
    """The tokenizer run's data, or the chosen data at the tokenizer run's resolution unless one is given."""
    if cfg.get("data") is None:
        return tokenizer_config.data
    data = OmegaConf.create(OmegaConf.to_container(cfg.data))
    if OmegaConf.is_missing(data, "resolution"):
        data.resolution = tokenizer_config.data.resolution
    return data


def check_tokenize_job(cfg: DictConfig) -> None:
    """What the job refuses from its config alone (checks.JOB_CHECKS: before a sweep is submitted, and when the job starts)."""
    for key in ("batch_size", "shard_size"):
        check_positive_int(key, cfg[key])
    if cfg.samples is not None:
        check_positive_int("samples", cfg.samples)


@hydra.main(config_path=str(CONF_DIR), config_name="tokenize", version_base="1.3")
@guarded
def main(cfg: DictConfig, run_dir: Path) -> None:
    # The engine and torch are imported here, not with the module: completion and --help start without them.
    from ibq.data.batches import indexed_train
    from ibq.data.splits import data_identity
    from ibq.engine.build import resolve_device
    from ibq.engine.tokens import MANIFEST, load_tokenizer_run, write_token_shards

    device = resolve_device(cfg.device)
    tokenizer_run = load_tokenizer_run(cfg.tokenizer_run, device)
    data = data_config(cfg, tokenizer_run.config)
    splits = build(data, seed=cfg.seed)
    train_set = indexed_train(splits, data, "ibq-tokenize")
    samples = cfg.samples or len(train_set)
    identity = data_identity(data)

    manifest_path = run_dir / MANIFEST
    if manifest_path.is_file():
        written = json.loads(manifest_path.read_text())
        same_tokenizer = {k: written["tokenizer"][k] for k in ("signature", "step")} == {"signature": tokenizer_run.signature, "step": tokenizer_run.step}
        if same_tokenizer and (written["data"], written["seed"], written["samples"]) == (identity, cfg.seed, samples):
            print(f"ibq-tokenize: {run_dir} already holds these {samples} items' tokens; nothing to do")
            return
    save_hydra_files(cfg, run_dir)
    manifest = write_token_shards(
        tokenizer_run, train_set, identity, cfg.seed, samples, run_dir, cfg.batch_size, cfg.shard_size, splits.num_workers, device
    )
    side = manifest["grid"][0]
    print(f"\nibq-tokenize: {samples} items -> {side}x{side} tokens each, {len(manifest['shards'])} shard(s), {manifest['num_classes']} classes")
    print(f"  tokenizer             {tokenizer_run.run_dir} (signature {tokenizer_run.signature}, step {tokenizer_run.step}, {tokenizer_run.codebook_size} codes)")
    print(f"  tokens                {run_dir}")
    print(f"  next                  ibq-train-ar tokenizer_run={tokenizer_run.run_dir} tokens={run_dir}")


cli = entry_point(main)

if __name__ == "__main__":
    cli()
