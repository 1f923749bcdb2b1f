"""Samples in the ADM evaluator's format: a .npz holding uint8 N x H x W x 3 under `arr_0`.

The OpenAI guided-diffusion evaluator (which IBQ and LlamaGen report gFID/IS with) reads this file, so
exporting here lets the official tool score the same images. Reading streams the array in batches from
the zip member, so 50k samples at 256 px (9.8 GB) need not fit in memory."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ibq.errors import UserError
from ibq.metrics.fid import to_uint8
from ibq.runs.record import atomic_write

ARRAY_MEMBER = "arr_0.npy"


def check_adm_shape(shape: tuple[int, ...], dtype: np.dtype, source: str) -> None:
    if dtype != np.uint8:
        raise UserError(f"{source}: arr_0 has dtype {dtype}, expected uint8 images N x H x W x 3 (values 0..255)")
    if len(shape) != 4 or shape[-1] != 3 or min(shape) < 1:
        raise UserError(f"{source}: arr_0 has shape {tuple(shape)}, expected N x H x W x 3 (uint8, channels last)")


def to_adm_array(images_in_minus1_1: Tensor) -> np.ndarray:
    """Float images (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), rounded as every metric here expects."""
    if images_in_minus1_1.ndim != 4 or images_in_minus1_1.shape[1] != 3:
        raise ValueError(f"images have shape {tuple(images_in_minus1_1.shape)}, expected (N, 3, H, W)")
    return to_uint8(images_in_minus1_1).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def save_adm_npz(path: str | os.PathLike, images: np.ndarray | Tensor) -> Path:
    """Write uint8 N x H x W x 3 images as `arr_0` of an uncompressed .npz, atomically (temporary file, rename)."""
    array = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    path = Path(path)
    check_adm_shape(array.shape, array.dtype, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as file:  # a file object: np.savez would add .npz to a name
            np.savez(file, arr_0=np.ascontiguousarray(array))

    atomic_write(path, write, concurrent_writers=True)
    return path


class AdmSamples:
    """A validated ADM sample file; `batches` yields uint8 (n, 3, H, W) tensors in file order."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"samples file {self.path} not found (expected an ADM .npz: uint8 N x H x W x 3 under arr_0)")
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(ARRAY_MEMBER) as member:
                self.shape, self.dtype = self._read_header(member)
        except zipfile.BadZipFile:
            raise UserError(f"{self.path} is not a .npz (zip) file: expected uint8 N x H x W x 3 under arr_0") from None
        except KeyError:
            raise UserError(f"{self.path} has no arr_0: expected uint8 N x H x W x 3 images under arr_0") from None
        check_adm_shape(self.shape, self.dtype, str(self.path))

    def _read_header(self, member) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of the .npy member; leaves `member` at the first byte of the data."""
        try:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as error:
            raise UserError(f"{self.path}: arr_0 is not a readable .npy array ({error})") from None
        if fortran_order:
            raise UserError(f"{self.path}: arr_0 is stored in Fortran order; save it C-contiguous (np.ascontiguousarray)")
        return tuple(shape), dtype

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def resolution(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def batch_count(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        image_bytes = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as archive, archive.open(ARRAY_MEMBER) as member:
            self._read_header(member)
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                buffer = member.read(count * image_bytes)
                if len(buffer) != count * image_bytes:
                    complete = start + len(buffer) // image_bytes
                    raise UserError(f"{self.path}: arr_0 ends after {complete} of {len(self)} images (truncated file)")
                array = np.frombuffer(buffer, dtype=np.uint8).reshape(count, *self.shape[1:])
                yield torch.from_numpy(array.copy()).permute(0, 3, 1, 2)


class AdmSampleParts:
    """Several ADM sample files read as one set, in the order given: the parts of a sampling split over jobs.
    `path` names the set (the folder the parts came from)."""

    def __init__(self, files: list[AdmSamples], path: str | os.PathLike):
        self.files, self.path = files, Path(path)
        sizes = sorted({f"{f.resolution[0]}x{f.resolution[1]}" for f in files})
        if len(sizes) > 1:
            raise UserError(f"{self.path}: its sample files have different sizes ({', '.join(sizes)})")

    def __len__(self) -> int:
        return sum(len(f) for f in self.files)

    @property
    def resolution(self) -> tuple[int, int]:
        return self.files[0].resolution

    def batch_count(self, batch_size: int) -> int:
        return sum(f.batch_count(batch_size) for f in self.files)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        for samples in self.files:  # a batch never spans two files: FID and IS see the same images in the same order
            yield from samples.batches(batch_size)
