"""`ibq-import`: the released IBQ checkpoints as run directories of this platform, and back.

  ibq-import imagenet256_16384.ckpt                          a tokenizer -> outputs/imported/imagenet256_16384
  ibq-import imagenet256_16384.ckpt --config imagenet_ibqgan_16384.yaml --weights raw -o runs/ibq16k_raw
  ibq-import AR_256_B.ckpt                                   -> outputs/imported/AR_256_B/{tokenizer,ar}
  ibq-import IBQ_pretrain_262144.ckpt data=image_folder data.root=/data/imagenet   overrides of the runs' configs
  ibq-import --export outputs/imported/AR_256_B/ar -o AR_256_B.ckpt                a run -> the official layout

The architecture comes from the official YAML (--config) or from the tensors' shapes; a tokenizer runs with
its EMA weights unless --weights raw. Nothing is downloaded: the files are read from disk.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ibq.config import CONF_DIR, check_group_choices, check_values, fail, given_overrides, one_line
from ibq.engine import official
from ibq.errors import UserError
from ibq.runs.record import RunRecord, run_choices


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="ibq-import", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    main.add_argument("source", type=Path, help="an official checkpoint (with --export: a run directory)")
    main.add_argument("overrides", nargs="*", help="Hydra overrides of the imported runs' configs (data=..., logger=none, quantizer.chunk_size=8192, ...)")
    main.add_argument("-o", "--output", type=Path, help="the new run directory (default outputs/imported/<file name>); with --export the new file")
    main.add_argument("--config", type=Path, help="the file's official YAML (configs/IBQ/gpu/*.yaml); default: inferred from the tensors")
    main.add_argument("--weights", choices=("ema", "raw"), default="ema", help="the tokenizer weights the run uses (default ema)")
    main.add_argument("--export", action="store_true", help="write the run directory SOURCE as an official checkpoint -o FILE")
    return main


def composed(overrides: list[str], config_name: str) -> official.ComposedRun:
    """The config an app would run with these overrides, its values checked as the apps check them."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=config_name):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    except Exception as error:  # Hydra raises several unrelated types for bad overrides
        raise UserError(one_line(str(error))) from None
    check_values(cfg)
    choices = run_choices(cfg, cfg.hydra.runtime.choices)
    overrides = given_overrides(cfg.hydra)
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra")
    return official.ComposedRun(OmegaConf.create(container), choices, overrides)


def stage_two_overrides(overrides: list[str], cfg) -> list[str]:
    """Of the overrides, those for stage II too (data, logger, ...): the tokenizer's (quantizer.*) stay with it."""
    return [arg for arg in overrides if arg.lstrip("+~").split("=", 1)[0].split(".")[0] in cfg]


def import_file(args: argparse.Namespace) -> None:
    check_group_choices(args.overrides, CONF_DIR)
    file = official.read_official(args.source)
    config = official.read_official_config(args.config) if args.config else None
    out_dir = (args.output or Path("outputs") / "imported" / args.source.stem).expanduser().resolve()
    if file.kind == "tokenizer":
        arch = official.tokenizer_arch(file, "", config, args.config)
        run = composed(arch.overrides() + official.loss_overrides(config, ar=False) + args.overrides, "train")
        result = official.import_tokenizer(file, arch, run, args.weights, out_dir, args.config)
    else:
        if args.weights != "ema":
            raise UserError(f"--weights {args.weights}: an AR file holds only its tokenizer's EMA weights (first_stage_model.*)")
        tokenizer = official.tokenizer_arch(file, official.AR_TOKENIZER_PREFIX, config, args.config)
        ar = official.ar_arch(file, tokenizer, config, args.config)
        tokenizer_run = composed(tokenizer.overrides() + official.loss_overrides(config, ar=True) + args.overrides, "train")
        own = ar.overrides(tokenizer.image_size) + official.sampling_overrides(config) + [f"tokenizer_run={out_dir / 'tokenizer'}"]
        ar_run = composed(own + stage_two_overrides(args.overrides, composed(own, "train_ar").cfg), "train_ar")
        result = official.import_ar(file, tokenizer, ar, tokenizer_run, ar_run, out_dir, args.config)
    print(f"ibq-import: {args.source} ({file.sha256[:12]}) -> {out_dir}")
    for note in result.notes:
        print(f"  note: {note}")
    for run_dir in result.run_dirs:
        record = RunRecord(run_dir).data
        print(f"  {record['kind']:<10} {run_dir}  (signature {record['signature']}, {', '.join(f'{k}={v}' for k, v in sorted(record['choices'].items()) if v)})")
    print(f"  weights    {result.weights}")


def export(args: argparse.Namespace) -> None:
    if args.output is None:
        raise UserError("--export needs -o FILE: where to write the official checkpoint")
    if args.overrides:
        raise UserError(f"--export takes no overrides (got {' '.join(args.overrides)})")
    kind = official.export_run(args.source.expanduser().resolve(), args.output.expanduser())
    print(f"ibq-import: {args.source} -> {args.output} (official {'AR' if kind == 'ar' else 'tokenizer'} layout: torch.load(path)['state_dict'])")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_intermixed_args(argv)
    try:
        export(args) if args.export else import_file(args)
    except UserError as error:
        fail(str(error))


if __name__ == "__main__":
    main()
