"""`ibq-tokenize`: token shards from the frozen EMA tokenizer of an ibq-train run, written once for stage II."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ibq.cli.common import entry_point, guarded, save_hydra_files
from ibq.config import CONF_DIR, build, shell_override
from ibq.errors import check_positive_int
from ibq.runs.lock import RunLock


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
    from ibq.engine import distributed
    from ibq.engine.ranks import detect_ranks
    from ibq.engine.tokens import load_tokenizer_run, write_token_shards

    ranks = detect_ranks()  # several (torchrun, cluster.tasks_per_node): each tokenizes its share of the shards
    device = distributed.device_for(ranks, cfg.device, "device")
    tokenizer_run = load_tokenizer_run(cfg.tokenizer_run, device)
    data = data_config(cfg, tokenizer_run.config)
    splits = build(data, seed=cfg.seed)
    train_set = indexed_train(splits, data, "ibq-tokenize")
    samples = cfg.samples or len(train_set)
    identity = data_identity(data)
    distributed.init_process_group(ranks, device)
    # One writer per token directory, held from reading what is there to the manifest.
    with RunLock(run_dir) if ranks.is_main else nullcontext():
        done = distributed.broadcast_object(ranks.is_main and already_written(run_dir, tokenizer_run, identity, cfg.seed, samples))
        if ranks.is_main and not done:
            save_hydra_files(cfg, run_dir)
        manifest = None if done else write_token_shards(tokenizer_run, train_set, identity, cfg.seed, samples, run_dir, cfg.batch_size,
                                                        cfg.shard_size, splits.num_workers, device, ranks)
    distributed.shutdown()
    if not ranks.is_main:
        return
    if done:
        print(f"ibq-tokenize: {run_dir} already holds these {samples} items' tokens; nothing to do")
        return
    side = manifest["grid"][0]
    print(f"\nibq-tokenize: {samples} items -> {side}x{side} tokens each, {len(manifest['shards'])} shard(s), {manifest['num_classes']} classes"
          + (f", by {ranks.world_size} ranks" if ranks.world_size > 1 else ""))
    print(f"  tokenizer             {tokenizer_run.run_dir} (signature {tokenizer_run.signature}, step {tokenizer_run.step}, {tokenizer_run.codebook_size} codes)")
    print(f"  tokens                {run_dir}")
    print(f"  next                  ibq-train-ar {shell_override('tokenizer_run', tokenizer_run.run_dir)} {shell_override('tokens', run_dir)}")


def already_written(run_dir: Path, tokenizer_run, identity: dict, seed: int, samples: int) -> bool:
    """Whether run_dir's manifest is of this tokenizer (signature and step), data, seed and count."""
    from ibq.engine.tokens import MANIFEST

    manifest_path = run_dir / MANIFEST
    if not manifest_path.is_file():
        return False
    written = json.loads(manifest_path.read_text())
    same_tokenizer = {k: written["tokenizer"][k] for k in ("signature", "step")} == {"signature": tokenizer_run.signature, "step": tokenizer_run.step}
    return same_tokenizer and (written["data"], written["seed"], written["samples"]) == (identity, seed, samples)


cli = entry_point(main)

if __name__ == "__main__":
    cli()
