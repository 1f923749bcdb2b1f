"""`ibq-data`: shard sets for streaming training.

  ibq-data pack /data/imagenet/train shards/imagenet --samples-per-shard 1000   an image folder
  ibq-data pack /data/laion-subset shards/laion --max-shard-mb 512               shards of at most ~512 MB
  ibq-data pack photos shards/photos --samples-per-shard 4                       the embedded photos
  ibq-data inspect shards/imagenet [--show 5] [--verify]                         counts and a few samples

inspect exits 1 when a shard is unreadable, the shards contradict the manifest or (--verify) a checksum
differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ibq.config import fail, shell_override
from ibq.errors import UserError


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="ibq-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = main.add_subparsers(dest="command", required=True)
    pack = commands.add_parser("pack", help="write an image folder (or 'photos') as tar shards with a manifest")
    pack.add_argument("source", help="an image folder (class subfolders become .cls labels) or 'photos'")
    pack.add_argument("output", type=Path, help="a new folder for the shards and manifest.json")
    pack.add_argument("--samples-per-shard", type=int, default=1000)
    pack.add_argument("--max-shard-mb", type=float, default=0, help="also end a shard before it passes this size (0: no limit)")
    pack.add_argument("--prefix", default="shard", help="shard file names: <prefix>-000000.tar, ...")
    inspect = commands.add_parser("inspect", help="count a shard set's samples and show a few")
    inspect.add_argument("shards", help="a folder, a brace pattern or URL(s) of .tar shards")
    inspect.add_argument("--show", type=int, default=3, help="samples to describe")
    inspect.add_argument("--verify", action="store_true", help="check the shards' sha256 against the manifest")
    return main


def main(argv: list[str] | None = None) -> None:
    from ibq.data.pack import inspect_shards, pack
    from ibq.data.shards import MANIFEST

    args = parser().parse_args(argv)
    try:
        if args.command == "pack":
            manifest = pack(args.source, args.output, args.samples_per_shard, int(args.max_shard_mb * 2**20), args.prefix)
            skipped = manifest["skipped_files"]
            skipped = f", {len(skipped)} unreadable file(s) skipped (first {skipped[0]}; all in {MANIFEST})" if skipped else ""
            print(f"ibq-data: {manifest['samples']} samples in {manifest['shard_count']} shard(s) -> {args.output}{skipped}")
            print(f"  train on them:  ibq-train data=shards {shell_override('data.sources.main.urls', args.output)}")
        else:
            lines, problems = inspect_shards(args.shards, args.show, args.verify)
            print("\n".join(lines))
            if problems:
                fail(f"{args.shards}: " + "; ".join(problems), 1)
    except UserError as error:
        fail(str(error))
    sys.exit(0)


if __name__ == "__main__":
    main()
