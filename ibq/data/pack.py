"""Writing and reading shard sets: an image folder (or the embedded photos) into webdataset tar shards
with a manifest, and a summary of any shard set.

A sample is `<key>.<image extension>` (the file's own bytes, not re-encoded), `<key>.cls` (the class
index, when the folder has class subfolders), `<key>.txt` (a caption from a `<image stem>.txt` file
beside the image) and `<key>.json` (the image's path in the source). The shard set is written to a
temporary folder that becomes the output only when complete, so a failed pack leaves nothing."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ibq.data.image_folder import IMAGE_SUFFIXES, header_parses
from ibq.data.shards import MANIFEST, SHARD_ERRORS, StreamError, image_of, list_shards, read_manifest, read_shard, shard_error_text
from ibq.errors import UserError, check_positive_int
from ibq.runs.record import timestamp

FORMAT = "ibq-shards/1"


@dataclass(frozen=True)
class PackItem:
    key: str
    extension: str
    payload: bytes
    label: int | None
    caption: str | None
    path: str


def folder_items(root: Path) -> tuple[list[Path], list[str]]:
    """Image files under `root` (sorted) and the class names: the first-level subfolders, if any."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    return files, classes


def folder_source(root: Path) -> tuple[Iterator[PackItem], int, list[str], list[str]]:
    """The items of an image folder, how many, its classes, and the files skipped as unreadable."""
    files, classes = folder_items(root)
    if not files:
        raise UserError(f"{root} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}): give a folder of images")
    skipped: list[str] = []  # filled while the items are read

    def items() -> Iterator[PackItem]:
        for index, path in enumerate(files):
            if not header_parses(path):
                skipped.append(str(path))
                continue
            relative = path.relative_to(root)
            extension = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            caption_file = path.with_suffix(".txt")
            yield PackItem(
                key=f"{index:09d}",
                extension=extension,
                payload=path.read_bytes(),
                label=classes.index(relative.parts[0]) if len(relative.parts) > 1 else None,
                caption=caption_file.read_text(errors="replace").strip() if caption_file.is_file() else None,
                path=str(relative),
            )

    return items(), len(files), classes, skipped


def photos_source() -> tuple[Iterator[PackItem], int, list[str], list[str]]:
    """scikit-image's bundled photos, PNG-encoded, one class each."""
    from ibq.data.photos import PHOTOS, load_photo

    def items() -> Iterator[PackItem]:
        for index, name in enumerate(PHOTOS):
            buffer = io.BytesIO()
            Image.fromarray(load_photo(name)).save(buffer, format="PNG")
            yield PackItem(f"{index:09d}", "png", buffer.getvalue(), index, name.replace("_", " "), f"skimage.data.{name}")

    return items(), len(PHOTOS), list(PHOTOS), []


def tar_bytes(payload: bytes) -> int:
    """What a file adds to a tar: a 512-byte header and its content padded to 512 bytes."""
    return 512 + -(-len(payload) // 512) * 512


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pack(source: str, output: Path, samples_per_shard: int = 1000, max_shard_bytes: int = 0, prefix: str = "shard") -> dict:
    """Write `source` (an image folder, or "photos") as shards into the new folder `output`; returns
    the manifest. A shard ends after `samples_per_shard` samples or before it passes `max_shard_bytes`
    (0: no limit; tar's closing blocks and record padding, under 10 KiB, come on top), whichever comes
    first; a larger single sample gets a shard alone."""
    from webdataset import TarWriter

    check_positive_int("--samples-per-shard", samples_per_shard)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 0:
        raise UserError(f"--max-shard-mb={max_shard_bytes / 2**20:g} is invalid: a size in MB >= 0 (0: no limit)")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"{output} already exists and is not empty: give a new output folder")
    if source == "photos":
        items, total, classes, skipped = photos_source()
    else:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise UserError(f"{source} is neither a folder nor 'photos' (the embedded photos)")
        items, total, classes, skipped = folder_source(root)

    output.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, unlike mkdtemp's 0700, gives the folder the mode the umask allows, as other folders get
    staging = output.parent / f".{output.name}.{secrets.token_hex(6)}"
    staging.mkdir()
    try:
        shards: list[dict] = []
        writer, count, written = None, 0, 0
        for item in tqdm(items, total=total, desc="pack", unit="img", dynamic_ncols=True):
            full = count == samples_per_shard or (max_shard_bytes and count and written + tar_bytes(item.payload) > max_shard_bytes)
            if writer is None or full:
                if writer is not None:
                    writer.close()
                shards.append({"name": f"{prefix}-{len(shards):06d}.tar", "samples": 0})
                # A fixed integer time: the same images give byte-identical shards, and no pax header
                # (which a float time brings) precedes each file for readers to parse.
                writer, count, written = TarWriter(str(staging / shards[-1]["name"]), encoder=False, mtime=0), 0, 0
            sample = {"__key__": item.key, item.extension: item.payload, "json": json.dumps({"path": item.path}).encode()}
            if item.label is not None:
                sample["cls"] = str(item.label).encode()
            if item.caption is not None:
                sample["txt"] = item.caption.encode()
            writer.write(sample)
            written += sum(tar_bytes(value) for key, value in sample.items() if key != "__key__")
            count += 1
            shards[-1]["samples"] += 1
        if writer is not None:
            writer.close()
        if not shards:
            raise UserError(f"{source}: all {total} image files are unreadable; nothing to pack")
        for shard in shards:
            path = staging / shard["name"]
            shard.update(bytes=path.stat().st_size, sha256=sha256(path))
        manifest = {
            "format": FORMAT,
            "source": source,
            "samples": sum(shard["samples"] for shard in shards),
            "shard_count": len(shards),
            "shards": shards,
            "classes": classes,
            "skipped_files": skipped,
            "created": timestamp(),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if output.exists():
            output.rmdir()  # empty, checked above
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def inspect_shards(spec: str, show: int = 3, verify: bool = False) -> tuple[list[str], list[str]]:
    """A shard set's counts (read from every shard) and its first `show` samples, as printable lines, and
    the problems found: unreadable shards, a manifest that the shards contradict, checksum mismatches."""
    urls = list_shards("shards", spec)
    manifest_path = Path(spec).expanduser() / MANIFEST
    manifest = read_manifest("shards", manifest_path) if manifest_path.is_file() else None
    per_shard, extensions, unreadable, shown = Counter(), Counter(), [], []
    for url in tqdm(urls, desc="inspect", unit="shard", dynamic_ncols=True):
        try:
            for sample in read_shard(url):
                per_shard[url] += 1
                extensions.update(key for key in sample if not key.startswith("__"))
                if len(shown) < show:
                    shown.append(describe(sample))
        except SHARD_ERRORS as error:
            unreadable.append(f"{url} ({shard_error_text(error)})")
    samples = sum(per_shard.values())
    lines = [f"{spec}: {len(urls)} shard(s), {samples} sample(s); files per sample: "
             + ", ".join(f".{ext} {count}" for ext, count in sorted(extensions.items()))]
    problems = []
    if manifest is not None:
        miscounted = [entry["name"] for entry in manifest["shards"]
                      if "samples" in entry and per_shard[str(manifest_path.parent / entry["name"])] != entry["samples"]]
        agrees = manifest["samples"] == samples and manifest["shard_count"] == len(urls) and not miscounted
        lines.append(f"  manifest: {manifest['samples']} sample(s) in {manifest['shard_count']} shard(s) "
                     f"({'agrees' if agrees else 'DIFFERS from the shards'}), source {manifest['source']}")
        if not agrees:
            problems.append(f"the manifest says {manifest['samples']} sample(s) in {manifest['shard_count']} shard(s), the shards "
                            f"hold {samples} in {len(urls)}" + (f" (other counts in {', '.join(miscounted)})" if miscounted else ""))
        if verify:
            bad = [entry["name"] for entry in manifest["shards"] if sha256(manifest_path.parent / entry["name"]) != entry["sha256"]]
            lines.append(f"  checksums: {'all ' + str(len(manifest['shards'])) + ' match' if not bad else 'MISMATCH in ' + ', '.join(bad)}")
            if bad:
                problems.append(f"sha256 mismatch in {', '.join(bad)}")
    if unreadable:
        lines.append(f"  unreadable: {len(unreadable)} shard(s): " + "; ".join(unreadable))
        problems.append(f"{len(unreadable)} unreadable shard(s), first {unreadable[0]}")
    lines += [f"  {line}" for line in shown]
    return lines, problems


def describe(sample: dict) -> str:
    try:
        with Image.open(io.BytesIO(image_of(sample))) as image:
            size = f"{image.width}x{image.height} {image.mode}"
    except StreamError:
        size = "no image"
    except (UnidentifiedImageError, OSError):
        size = "undecodable image"
    label = f" class {sample['cls'].decode()}" if "cls" in sample else ""
    caption = f" \"{sample['txt'].decode(errors='replace')[:60]}\"" if "txt" in sample else ""
    return f"{sample['__key__']}: {size}{label}{caption}"
