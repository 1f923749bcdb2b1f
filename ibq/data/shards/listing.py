"""Which shards a data config names: brace patterns, URLs, folders and the manifest that ibq-data pack writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ibq.errors import UserError

MANIFEST = "manifest.json"


def is_local(url: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*:", url) is None or url.startswith("file:")


def read_manifest(key: str, manifest: Path) -> dict:
    """A manifest written by ibq-data pack, checked for the entries the readers use."""
    try:
        content = json.loads(manifest.read_text())
        if not isinstance(content["samples"], int) or not all("name" in entry for entry in content["shards"]):
            raise ValueError("no sample count or a shard without a name")
        return content
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{key}: {manifest} is not a shard manifest written by ibq-data pack ({error})") from None


def manifest_shards(key: str, manifest: Path) -> list[str]:
    return [str(manifest.parent / entry["name"]) for entry in read_manifest(key, manifest)["shards"]]


def list_shards(key: str, spec: str | list[str]) -> list[str]:
    """The shard URLs that `spec` names: brace patterns (data/shard-{000000..000099}.tar), URLs, lists of
    them, or a folder (its manifest.json, else its *.tar files)."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for pattern in patterns:
        path = Path(str(pattern).removeprefix("file:")).expanduser()
        if is_local(str(pattern)) and path.is_dir():
            urls += manifest_shards(key, path / MANIFEST) if (path / MANIFEST).is_file() else sorted(map(str, path.glob("*.tar")))
        elif path.name == MANIFEST and path.is_file():
            urls += manifest_shards(key, path)
        else:
            from webdataset.shardlists import expand_urls

            urls += [str(Path(url).expanduser()) if is_local(url) else url for url in expand_urls(str(pattern))]
    missing = [url for url in urls if is_local(url) and not Path(url.removeprefix("file:")).is_file()]
    if not urls or len(missing) == len(urls):
        example = f" ({missing[0]} does not exist)" if missing else ""
        raise UserError(
            f"{key}={spec!r} matches no shard{example}: give a folder written by ibq-data pack, a brace pattern "
            f"such as /data/laion/{{000000..000999}}.tar, a URL, or a list of them"
        )
    if missing:
        raise UserError(f"{key}={spec!r}: {len(missing)} of its {len(urls)} shards do not exist (first: {missing[0]})")
    return urls


def manifest_samples(name: str, spec) -> int:
    """weight: samples -- the sample count in the manifest of the source's folder."""
    manifest = Path(str(spec)).expanduser() / MANIFEST
    if not isinstance(spec, str) or not manifest.is_file():
        raise UserError(f"data.sources.{name}.weight=samples needs a folder written by ibq-data pack (its manifest counts "
                        f"the samples), and {spec} has no {MANIFEST}: give the weight as a number")
    return int(read_manifest(f"data.sources.{name}.urls", manifest)["samples"])
