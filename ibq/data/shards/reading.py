"""Reading tar shards: the raw samples of one shard in file order (a cut-off archive and a stalled download
are errors, not a shorter shard), and the fixed validation set of a shard config."""

from __future__ import annotations

import io
import logging
import os
import select
import tarfile
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from ibq.data.image_folder import load_resized
from ibq.data.shards.listing import list_shards
from ibq.data.splits import DataSplits
from ibq.errors import UserError, check_positive_int

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")

# What a damaged, truncated or unreadable tar raises while it is read.
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)

# Seconds a shard read through a command (pipe:, and https:// etc., which webdataset reads through curl)
# may wait for its next bytes before the shard counts as unreadable (data.read_timeout_s).
READ_TIMEOUT_S = 120.0


class StreamError(Exception):
    """A fatal problem found by a loader worker: sent to the training process as one line."""


def shard_error_text(error: Exception) -> str:
    return str(error).split(" @ ")[0]  # webdataset appends the stream's repr after " @ "


class EndCheckingReader:
    """Passes a tar stream through and tells whether it ended as a complete archive does: a multiple of
    512 bytes ending in two zero blocks. Python's tarfile takes a file cut off at a header for a shorter
    archive; this catches it."""

    END = bytes(1024)

    def __init__(self, stream):
        self.stream, self.size, self.tail = stream, 0, b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.size += len(data)
        self.tail = (self.tail + data)[-len(self.END):]
        return data

    def check_complete(self) -> None:
        while self.read(1 << 20):
            pass
        if self.size % 512 or self.tail != self.END:
            raise tarfile.ReadError(f"truncated: {self.size} bytes and no end-of-archive blocks")


class TimedPipe:
    """A command's output (webdataset's Pipe) read straight from its file descriptor, each read waiting at
    most `timeout_s` for data: a stalled download or command is killed and its shard fails with an
    OSError, which the readers count as unreadable, instead of blocking the loader for ever."""

    def __init__(self, pipe, timeout_s: float):
        self.pipe, self.timeout_s, self.fd = pipe, timeout_s, pipe.stream.fileno()

    def read(self, size: int = -1) -> bytes:
        blocks, wanted = [], size if size >= 0 else float("inf")
        while wanted > 0:
            if not select.select([self.fd], [], [], self.timeout_s)[0]:
                self.pipe.ignore_errors = True  # killed here: its exit status says nothing more
                self.pipe.proc.kill()
                raise TimeoutError(f"no data for {self.timeout_s:g} s (data.read_timeout_s)")
            block = os.read(self.fd, int(min(wanted, 1 << 20)))
            if not block:
                break
            blocks.append(block)
            wanted -= len(block)
        return b"".join(blocks)

    def close(self) -> None:
        self.pipe.close()  # waits for the command; a failed one raises with its exit status


def read_shard(url: str, timeout_s: float = READ_TIMEOUT_S) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard, in file order: {"__key__", "__url__", extension: bytes, ...}."""
    from webdataset import gopen
    from webdataset.gopen import Pipe
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    stream = gopen(url)
    if isinstance(stream, Pipe):
        stream = TimedPipe(stream, timeout_s)
    try:
        reader = EndCheckingReader(stream)
        samples = group_by_keys({**member, "__url__": url} for member in tar_file_iterator(reader))
        # the last sample waits for the end check: a cut-off shard may have cut it short too
        previous = None
        for sample in samples:
            if previous is not None:
                yield previous
            previous = sample
        reader.check_complete()
        if previous is not None:
            yield previous
    finally:
        stream.close()


def image_of(sample: dict[str, Any]) -> bytes:
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return sample[extension]
    held = ", ".join(f".{key}" for key in sample if not key.startswith("__")) or "nothing"
    raise StreamError(
        f"sample {sample_name(sample)} has no image (it holds {held}); "
        f"a sample needs one of {', '.join('.' + e for e in IMAGE_EXTENSIONS)}"
    )


def sample_name(sample: dict[str, Any]) -> str:
    return f"{sample['__key__']!r} of shard {sample['__url__']}"


class ShardImages(Dataset):
    """The first `limit` samples of a shard set in file order, centre-cropped: a fixed evaluation set.
    The encoded images are held in memory and decoded when read."""

    def __init__(self, key: str, urls: list[str], limit: int, resolution: int):
        self.resolution, self.samples = resolution, []
        for url in urls:
            try:
                for sample in read_shard(url):
                    image_of(sample)
                    self.samples.append(sample)
                    if len(self.samples) == limit:
                        return
            except SHARD_ERRORS as error:
                log.warning("skipped the rest of unreadable shard %s (%s)", url, shard_error_text(error))
            except StreamError as error:
                raise UserError(f"{key}: {error}") from None
        if not self.samples:
            raise UserError(f"{key}: its shards ({urls[0]} ...) hold no readable sample")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        sample = self.samples[index]
        image = load_resized(io.BytesIO(image_of(sample)), self.resolution, sample_name(sample))
        if image is None:  # keep the set fixed: a failing image is black, and logged
            image = torch.full((3, self.resolution, self.resolution), -1.0)
        return TF.center_crop(image, self.resolution).contiguous(), int(sample["cls"]) if "cls" in sample else -1


def build_shard_val(urls: str | list[str], resolution: int, seed: int, limit: int = 256, num_workers: int = 0) -> DataSplits:
    check_positive_int("data.val.limit", limit)
    return DataSplits(None, ShardImages("data.val.urls", list_shards("data.val.urls", urls), limit, resolution), num_workers)
