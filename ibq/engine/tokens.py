"""Stage-II tokens: a frozen tokenizer run, and the token shards that `ibq-tokenize` writes once from it.

A tokenizer run directory (from ibq-train) holds checkpoints/last.pt with the run's resolved config and its
EMA weights; stage II encodes and decodes with those EMA weights, frozen. Token shards hold the tokens and
classes of the first `samples` items of a training stream (by sample position, as the on-the-fly path reads
them), in .npy files that are memory-mapped, plus manifest.json, which names the tokenizer run's signature
and step, its codebook size, the token grid and the dataset. The manifest is written last: a directory
without one is incomplete, and its progress.json lists the shards written so far, after which the same
command continues."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ibq.data.positions import PositionSampler, position_generator
from ibq.engine import distributed
from ibq.engine.checkpoint import load_run
from ibq.engine.ranks import Ranks
from ibq.errors import UserError
from ibq.runs.record import save_npy, timestamp, token_grid_side, write_json

MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # the shards written so far, until the manifest replaces it

log = logging.getLogger(__name__)


@dataclass
class TokenizerRun:
    run_dir: Path
    tokenizer: torch.nn.Module  # EMA weights, eval mode, frozen
    signature: str
    step: int
    config: DictConfig  # the run's resolved config

    @property
    def codebook_size(self) -> int:
        return self.tokenizer.quantizer.codebook_size

    def describe(self) -> dict:
        return {"signature": self.signature, "step": self.step, "codebook_size": self.codebook_size, "weights": "ema"}

    def grid_side(self, resolution: int) -> int:
        return token_grid_side(resolution, self.tokenizer.downsample_factor, self.run_dir)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> tokens (B, H/f * W/f) int64 in raster order."""
        return self.tokenizer.encode(images).indices.flatten(1)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens (B, side * side) -> images (B, 3, H, W) clamped to [-1, 1]."""
        side = int(tokens.shape[1] ** 0.5)
        return self.tokenizer.decode_indices(tokens.view(-1, side, side)).float().clamp(-1, 1)


def load_tokenizer_run(run_dir: str | os.PathLike | None, device: torch.device) -> TokenizerRun:
    run = load_run(run_dir, "tokenizer_run", "tokenizer")
    return TokenizerRun(run.run_dir, run.tokenizer(device), run.signature, run.step, run.config)


# -- token shards ------------------------------------------------------------------------------------


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.int16) if codebook_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def write_token_shards(
    tokenizer_run: TokenizerRun,
    dataset: Dataset,
    data_config: dict,
    seed: int,
    samples: int,
    output_dir: Path,
    batch_size: int,
    shard_size: int,
    num_workers: int,
    device: torch.device,
    ranks: Ranks = Ranks(),
) -> dict | None:
    """Tokenize items [0, samples) of the training stream into shards of shard_size items; returns the
    manifest on rank 0 (None on the others). The job's ranks take the shards in rounds, rank r the r-th
    of each; rank 0 alone cleans up, records each round and writes the manifest, so the files are those
    of one process whatever the world size, and an interrupted job continues with any world size."""
    side = tokenizer_run.grid_side(data_config["resolution"])
    dtype = token_dtype(tokenizer_run.codebook_size)
    # What the shards depend on, as JSON reads it back: a run stopped after some shards (Ctrl-C, a requeue)
    # continues after them when started again with the same tokenizer, data and counts.
    identity = json.loads(json.dumps({"tokenizer": tokenizer_run.describe(), "grid": [side, side], "data": data_config, "seed": seed,
                                      "samples": samples, "shard_size": shard_size, "dtype": dtype.name}, default=str))
    progress_path = output_dir / PROGRESS
    total = -(-samples // shard_size)
    shards, highest_label = [], -1
    if ranks.is_main:
        shards, highest_label = written_shards(output_dir, progress_path, identity, total)
    # A broadcast: no rank writes a shard before rank 0 has removed the stale ones.
    shards, highest_label = distributed.broadcast_object((shards, highest_label))
    for round_start in range(len(shards), total, ranks.world_size):
        index = round_start + ranks.rank
        shard = None
        if index < total:
            description = f"tokenize {min(samples, (round_start + ranks.world_size) * shard_size)}/{samples}"
            shard = tokenize_shard(tokenizer_run, dataset, index, shard_size, samples, side, dtype, output_dir, batch_size,
                                   num_workers, device, description if ranks.is_main else None)
        for written in distributed.gather_objects(shard):  # in rank order: the order of the shards
            if written is not None:
                highest_label = max(highest_label, written.pop("highest_label"))
                shards.append(written)
        if ranks.is_main:
            write_json(progress_path, {"identity": identity, "shards": shards, "highest_label": highest_label})
    if not ranks.is_main:
        return None

    manifest = {
        "tokenizer": {"run_dir": str(tokenizer_run.run_dir), **tokenizer_run.describe()},
        "grid": [side, side],
        "data": data_config,
        "seed": seed,
        "samples": samples,
        "num_classes": highest_label + 1,
        "dtype": dtype.name,
        "shards": shards,
        "created": timestamp(),
    }
    write_json(output_dir / MANIFEST, manifest)
    progress_path.unlink()
    return manifest


def written_shards(output_dir: Path, progress_path: Path, identity: dict, total: int) -> tuple[list[dict], int]:
    """The shards an interrupted run of the same identity recorded (all of them still there), after
    removing the manifest and any other shard file: what a new run continues after."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / MANIFEST).unlink(missing_ok=True)  # incomplete until the new manifest lands
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {}  # written atomically
    shards = progress.get("shards", []) if progress.get("identity") == identity else []
    if not all((output_dir / shard[kind]).is_file() for shard in shards for kind in ("tokens", "labels")):
        shards = []
    kept = {shard[kind] for shard in shards for kind in ("tokens", "labels")}
    for stale in output_dir.glob("*-*.npy"):
        if stale.name not in kept:
            stale.unlink()
    if shards:
        log.info("%d of %d shards are already written; continuing after them", len(shards), total)
    return shards, progress.get("highest_label", -1) if shards else -1


def tokenize_shard(tokenizer_run: TokenizerRun, dataset: Dataset, index: int, shard_size: int, samples: int, side: int,
                   dtype: np.dtype, output_dir: Path, batch_size: int, num_workers: int, device: torch.device,
                   description: str | None) -> dict:
    """Shard `index`: its tokens and labels, each written atomically; its record, with its highest label.
    `description` None: no progress bar."""
    first = index * shard_size
    count = min(shard_size, samples - first)
    tokens, labels = np.empty((count, side * side), dtype=dtype), np.empty(count, dtype=np.int32)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=PositionSampler(first, first + count), num_workers=num_workers)
    filled = 0
    for images, batch_labels in tqdm(loader, desc=description, disable=description is None, dynamic_ncols=True):
        tokens[filled : filled + len(images)] = tokenizer_run.encode(images.to(device)).cpu().numpy()
        labels[filled : filled + len(images)] = batch_labels.numpy()
        filled += len(images)
    names = {"tokens": f"tokens-{index:05d}.npy", "labels": f"labels-{index:05d}.npy"}
    save_npy(output_dir / names["tokens"], tokens)
    save_npy(output_dir / names["labels"], labels)
    return {**names, "count": count, "highest_label": int(labels.max())}


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory).expanduser() / MANIFEST
    if not path.is_file():
        raise UserError(f"tokens={directory} holds no {MANIFEST}: write token shards with ibq-tokenize (an interrupted one leaves none, and continues when run again)")
    return json.loads(path.read_text())


def check_shards(manifest: dict, directory: str, tokenizer_run: TokenizerRun, data_config: dict) -> None:
    written_by = manifest["tokenizer"]
    if written_by["signature"] != tokenizer_run.signature or written_by["step"] != tokenizer_run.step:
        raise UserError(
            f"tokens={directory} were written by another tokenizer (run {written_by['run_dir']}, signature "
            f"{written_by['signature']}, step {written_by['step']}), not by tokenizer_run={tokenizer_run.run_dir} "
            f"(signature {tokenizer_run.signature}, step {tokenizer_run.step}): tokenize again with ibq-tokenize tokenizer_run=..."
        )
    if manifest["data"] != data_config:
        differing = sorted(key for key in set(manifest["data"]) | set(data_config) if manifest["data"].get(key) != data_config.get(key))
        raise UserError(
            f"tokens={directory} were written from other data than this run's (differs in data.{', data.'.join(differing)}): "
            f"pass the data overrides the shards were written with"
        )


class TokenShards(Dataset):
    """Token shards addressed by training position: the first pass over them in the order they were written
    (the stream the on-the-fly path reads), every later pass in its own seeded order."""

    def __init__(self, directory: str | os.PathLike, seed: int):
        self.directory = Path(directory).expanduser()
        self.manifest = read_manifest(self.directory)
        self.seed = seed
        shards = self.manifest["shards"]
        self.tokens = [np.load(self.directory / shard["tokens"], mmap_mode="r") for shard in shards]
        self.labels = [np.load(self.directory / shard["labels"], mmap_mode="r") for shard in shards]
        self.starts = np.cumsum([0] + [shard["count"] for shard in shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @lru_cache(maxsize=2)
    def order(self, epoch: int) -> Tensor:
        return torch.randperm(len(self), generator=position_generator(self.seed, -1 - epoch))

    def __getitem__(self, position: int) -> tuple[Tensor, int]:
        epoch, index = divmod(position, len(self))
        if epoch:
            index = int(self.order(epoch)[index])
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        offset = index - self.starts[shard]
        return torch.from_numpy(self.tokens[shard][offset].astype(np.int64)), int(self.labels[shard][offset])
