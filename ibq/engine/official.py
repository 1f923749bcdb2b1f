"""The released IBQ checkpoints (github.com/TencentARC/SEED-Voken) as runs of this platform, and back.

Official files hold `{"state_dict": ...}` in the official module names: a tokenizer file the generator
(`encoder.*`, `decoder.*`, `quantize.embedding.weight`, `quant_conv.*`, `post_quant_conv.*`) and its EMA
(`model_ema.<name without dots>`, `model_ema.decay`, `model_ema.num_updates`); an AR file the tokenizer
as `first_stage_model.*` (its EMA values) and the generator as `transformer.*`. Each architecture is walked
once the way the official modules build it, giving every official tensor name together with its name in
this platform's model and its shape: that walk is the key mapping, both ways, and the check that a file
fits a config. The architecture comes from the official YAML (`--config`) or from the tensors' shapes."""

from __future__ import annotations

import os
import re
import shutil
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ibq.config import build, one_line
from ibq.data.pack import sha256
from ibq.engine.checkpoint import CHECKPOINT, LoadedRun, check_tensors, load_run, read_checkpoint, save_checkpoint
from ibq.errors import UserError
from ibq.runs.record import RunRecord, result_config, signature, stage_two_config, tokenizer_identity

Shapes = dict[str, tuple[str, tuple[int, ...]]]  # official name -> (project name, shape), in the official order

EMA_PREFIX = "model_ema."
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")
TOKENIZER_PREFIXES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
# A checkpoint of the official training also holds its loss modules (LPIPS, discriminator) and their EMA.
IGNORED_PREFIXES = ("loss.", "model_ema.loss")
AR_TOKENIZER_PREFIX = "first_stage_model."
AR_TRANSFORMER_PREFIX = "transformer."


# -- the architectures, walked as the official modules build them ----------------------------------------


@dataclass(frozen=True)
class TokenizerArch:
    """An official `ddconfig` + `n_embed`/`embed_dim`, in this platform's terms (attention by level)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_levels: tuple[int, ...]
    z_channels: int
    embed_dim: int
    codebook_size: int
    resolution: int | None = None  # None: not known (inferred from shapes)
    dropout: float = 0.0

    @property
    def image_size(self) -> int:
        """The official config's resolution; without one, the released 16x16 token grid."""
        return self.resolution or 16 * 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_side(self) -> int:
        return self.image_size // 2 ** (len(self.ch_mult) - 1)

    @property
    def is_paper(self) -> bool:
        return (self.ch, self.ch_mult, self.num_res_blocks, self.attn_levels, self.z_channels, self.embed_dim) == (
            128, (1, 1, 2, 2, 4), 4, (4,), 256, 256)

    def tensors(self) -> Shapes:
        """Every tensor of the official generator in its state-dict order: official name -> (project name, shape)."""
        out: OrderedDict = OrderedDict()
        levels = len(self.ch_mult)

        def add(official: str, project: str, shape: tuple[int, ...]) -> None:
            out[official] = (project, shape)

        def conv(official: str, project: str, cout: int, cin: int, k: int) -> None:
            add(f"{official}.weight", f"{project}.weight", (cout, cin, k, k))
            add(f"{official}.bias", f"{project}.bias", (cout,))

        def norm(official: str, project: str, c: int) -> None:
            add(f"{official}.weight", f"{project}.weight", (c,))
            add(f"{official}.bias", f"{project}.bias", (c,))

        def resnet(official: str, project: str, cin: int, cout: int) -> None:
            norm(f"{official}.norm1", f"{project}.branch.0", cin)
            conv(f"{official}.conv1", f"{project}.branch.2", cout, cin, 3)
            norm(f"{official}.norm2", f"{project}.branch.3", cout)
            conv(f"{official}.conv2", f"{project}.branch.6", cout, cout, 3)
            if cin != cout:
                conv(f"{official}.nin_shortcut", f"{project}.shortcut", cout, cin, 1)

        def attention(official: str, project: str, c: int) -> None:
            norm(f"{official}.norm", f"{project}.norm", c)
            for name, mapped in (("q", "q"), ("k", "k"), ("v", "v"), ("proj_out", "proj")):
                conv(f"{official}.{name}", f"{project}.{mapped}", c, c, 1)

        def mid(part: str, c: int) -> None:
            resnet(f"{part}.mid.block_1", f"{part}.mid.0", c, c)
            attention(f"{part}.mid.attn_1", f"{part}.mid.1", c)
            resnet(f"{part}.mid.block_2", f"{part}.mid.2", c, c)

        def level(official: str, project: str, attended: bool, cin: int, cout: int, blocks: int, resample: str | None) -> None:
            step = 2 if attended else 1  # the project's levels interleave blocks and attention in one list
            for i in range(blocks):
                resnet(f"{official}.block.{i}", f"{project}.{i * step}", cin if i == 0 else cout, cout)
            for i in range(blocks if attended else 0):
                attention(f"{official}.attn.{i}", f"{project}.{i * step + 1}", cout)
            if resample:
                conv(f"{official}.{resample}.conv", f"{project}.{blocks * step}.conv", cout, cout, 3)

        conv("encoder.conv_in", "encoder.conv_in", self.ch, 3, 3)
        channels = self.ch
        for index, mult in enumerate(self.ch_mult):
            level(f"encoder.down.{index}", f"encoder.levels.{index}", index in self.attn_levels, channels, self.ch * mult,
                  self.num_res_blocks, "downsample" if index != levels - 1 else None)
            channels = self.ch * mult
        mid("encoder", channels)
        norm("encoder.norm_out", "encoder.out.0", channels)
        conv("encoder.conv_out", "encoder.out.2", self.z_channels, channels, 3)

        # The decoder is built from the lowest level up but listed as up.0 .. up.n-1 (level order).
        channels = self.ch * self.ch_mult[-1]
        conv("decoder.conv_in", "decoder.conv_in", channels, self.z_channels, 3)
        mid("decoder", channels)
        inputs = {}
        for index in reversed(range(levels)):
            inputs[index] = channels
            channels = self.ch * self.ch_mult[index]
        for index in range(levels):
            level(f"decoder.up.{index}", f"decoder.levels.{levels - 1 - index}", index in self.attn_levels, inputs[index],
                  self.ch * self.ch_mult[index], self.num_res_blocks + 1, "upsample" if index != 0 else None)
        norm("decoder.norm_out", "decoder.out.0", self.ch * self.ch_mult[0])
        conv("decoder.conv_out", "decoder.out.2", 3, self.ch * self.ch_mult[0], 3)

        add("quantize.embedding.weight", "quantizer.codebook.weight", (self.codebook_size, self.embed_dim))
        conv("quant_conv", "quant_conv", self.embed_dim, self.z_channels, 1)
        conv("post_quant_conv", "post_quant_conv", self.z_channels, self.embed_dim, 1)
        return out

    def overrides(self) -> list[str]:
        """Hydra overrides of conf/train.yaml that build this tokenizer."""
        size = f"codebook_size={self.codebook_size}"
        if self.is_paper and self.resolution in (None, 256):
            return ["model_scale=paper", size, "quantizer=ibq"]
        return [
            "model_scale=tiny", size, "quantizer=ibq",
            f"model.embed_dim={self.embed_dim}",
            f"model.encoder.ch={self.ch}",
            f"model.encoder.ch_mult=[{','.join(map(str, self.ch_mult))}]",
            f"model.encoder.num_res_blocks={self.num_res_blocks}",
            f"model.encoder.attn_levels=[{','.join(map(str, self.attn_levels))}]",
            f"model.encoder.z_channels={self.z_channels}",
            f"model.encoder.dropout={self.dropout}",
            f"data.resolution={self.image_size}",
        ]

    @classmethod
    def from_ddconfig(cls, ddconfig: dict, n_embed: int, embed_dim: int, source: str) -> "TokenizerArch":
        try:
            if ddconfig.get("double_z", False) or ddconfig.get("in_channels", 3) != 3 or ddconfig.get("out_ch", 3) != 3:
                raise UserError(f"{source}: only RGB tokenizers with double_z: false exist in this platform (ddconfig {ddconfig})")
            resolution, ch_mult = int(ddconfig["resolution"]), tuple(int(m) for m in ddconfig["ch_mult"])
            attn = {int(r) for r in ddconfig.get("attn_resolutions", [])}
            return cls(
                ch=int(ddconfig["ch"]), ch_mult=ch_mult, num_res_blocks=int(ddconfig["num_res_blocks"]),
                attn_levels=tuple(level for level in range(len(ch_mult)) if resolution // 2**level in attn),
                z_channels=int(ddconfig["z_channels"]), embed_dim=int(embed_dim), codebook_size=int(n_embed),
                resolution=resolution, dropout=float(ddconfig.get("dropout", 0.0)),
            )
        except KeyError as missing:
            raise UserError(f"{source}: the tokenizer's ddconfig lacks {missing}") from None

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], source: str) -> "TokenizerArch":
        """The architecture of a generator state dict (official names), from its tensors' shapes alone."""
        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise UserError(f"{source} is not an IBQ tokenizer: it has no tensor {key}")
            return shapes[key]

        ch = shape("encoder.conv_in.weight")[0]
        levels = sorted({int(m.group(1)) for key in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", key))})
        blocks = {int(m.group(1)) for key in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", key))}
        if not levels or levels != list(range(len(levels))) or not blocks:
            raise UserError(f"{source} is not an IBQ tokenizer: its encoder has no levels encoder.down.<L>.block.<i>")
        codebook_size, embed_dim = shape("quantize.embedding.weight")
        return cls(
            ch=ch,
            ch_mult=tuple(shape(f"encoder.down.{level}.block.0.conv1.weight")[0] // ch for level in levels),
            num_res_blocks=len(blocks),
            attn_levels=tuple(level for level in levels if f"encoder.down.{level}.attn.0.q.weight" in shapes),
            z_channels=shape("encoder.conv_out.weight")[0],
            embed_dim=embed_dim,
            codebook_size=codebook_size,
        )

    @classmethod
    def from_run_config(cls, cfg: DictConfig) -> "TokenizerArch":
        """The tokenizer of one of this platform's runs (encoder and decoder alike, as the official model)."""
        encoder = cfg.model.encoder
        return cls(
            ch=encoder.ch, ch_mult=tuple(encoder.ch_mult), num_res_blocks=encoder.num_res_blocks,
            attn_levels=tuple(encoder.attn_levels), z_channels=encoder.z_channels, embed_dim=cfg.model.embed_dim,
            codebook_size=cfg.quantizer.codebook_size, resolution=cfg.data.resolution, dropout=encoder.dropout,
        )


# The released AR models (facts sheet 3.2): depth, width, heads and the model_scale preset that holds them.
RELEASED_AR_SCALES = {(16, 1024): "B", (20, 1280): "L", (24, 1536): "XL", (30, 1920): "XXL"}
RELEASED_HEAD_DIM = 64


def swiglu_hidden(width: int, multiple_of: int = 256) -> int:
    """The official GPT's FFN width: 2/3 of 4 x width, rounded up to a multiple of 256."""
    hidden = int(2 * 4 * width / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class ARArch:
    """An official `llama.GPT` config in this platform's terms."""

    vocab_size: int
    num_classes: int
    depth: int
    width: int
    heads: int
    ffn_hidden: int
    block_size: int = 256
    alng: float = 1e-3

    @property
    def released_scale(self) -> str | None:
        scale = RELEASED_AR_SCALES.get((self.depth, self.width))
        released = scale and self.vocab_size == 16384 and self.num_classes == 1000 and self.block_size == 256
        return scale if released and self.width // self.heads == RELEASED_HEAD_DIM else None

    def tensors(self) -> Shapes:
        out: OrderedDict = OrderedDict()
        c = self.width
        out["tok_emb.weight"] = ("tok_embed.weight", (self.vocab_size, c))
        out["class_emb.embedding_table.weight"] = ("class_embed.weight", (self.num_classes + 1, c))
        for i in range(self.depth):
            block = f"blocks.{i}"
            for official, project, shape in (
                ("attention.wqkv.weight", "attn.qkv.weight", (3 * c, c)),
                ("attention.wo.weight", "attn.proj.weight", (c, c)),
                ("feed_forward.w1.weight", "ffn.w1.weight", (self.ffn_hidden, c)),
                ("feed_forward.w3.weight", "ffn.w3.weight", (self.ffn_hidden, c)),
                ("feed_forward.w2.weight", "ffn.w2.weight", (c, self.ffn_hidden)),
                ("attention_norm.weight", "attn_norm.weight", (c,)),
                ("ffn_norm.weight", "ffn_norm.weight", (c,)),
                ("ada_lin.1.weight", "ada_lin.1.weight", (6 * c, c)),
                ("ada_lin.1.bias", "ada_lin.1.bias", (6 * c,)),
            ):
                out[f"{block}.{official}"] = (f"{block}.{project}", shape)
        out["head_nm.rmsnorm.weight"] = ("head_norm.weight", (c,))
        out["head_nm.ada_lin.1.weight"] = ("head_ada_lin.1.weight", (2 * c, c))
        out["head_nm.ada_lin.1.bias"] = ("head_ada_lin.1.bias", (2 * c,))
        out["head.weight"] = ("head.weight", (self.vocab_size, c))
        return out

    def overrides(self, resolution: int) -> list[str]:
        """Hydra overrides of conf/train_ar.yaml that build this transformer on images of `resolution` px."""
        if self.released_scale and resolution == 256:
            return [f"model_scale={self.released_scale}"]
        return [
            "model_scale=tiny", f"data.resolution={resolution}",
            f"transformer.vocab_size={self.vocab_size}", f"transformer.num_classes={self.num_classes}",
            f"transformer.block_size={self.block_size}", f"transformer.depth={self.depth}",
            f"transformer.width={self.width}", f"transformer.heads={self.heads}",
            f"transformer.ffn_hidden={self.ffn_hidden}", f"transformer.alng={self.alng}",
        ]

    @classmethod
    def from_params(cls, params: dict, source: str) -> "ARArch":
        try:
            width = int(params["n_embd"])
            if int(params.get("cond_dim", width)) != width:
                raise UserError(f"{source}: cond_dim={params['cond_dim']} differs from n_embd={width}; this platform's AdaLN takes the class embedding itself (cond_dim = n_embd)")
            return cls(
                vocab_size=int(params["vocab_size"]), num_classes=int(params.get("class_num", 1000)),
                depth=int(params["n_layer"]), width=width, heads=int(params["n_head"]), ffn_hidden=swiglu_hidden(width),
                block_size=int(params.get("block_size", 256)), alng=float(params.get("alng", 1e-3)),
            )
        except KeyError as missing:
            raise UserError(f"{source}: transformer_config.params lacks {missing}") from None

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], block_size: int, source: str) -> "ARArch":
        if "tok_emb.weight" not in shapes or "class_emb.embedding_table.weight" not in shapes:
            raise UserError(f"{source} is not an IBQ AR model: it has no transformer.tok_emb.weight / transformer.class_emb.embedding_table.weight")
        vocab_size, width = shapes["tok_emb.weight"]
        depth = len({m.group(1) for key in shapes if (m := re.match(r"blocks\.(\d+)\.", key))})
        if (depth, width) not in RELEASED_AR_SCALES:
            raise UserError(
                f"{source}: a transformer of depth {depth} and width {width} is none of the released scales "
                f"(B, L, XL, XXL), and its number of heads cannot be read from the tensors: give its official config with --config"
            )
        hidden = shapes.get("blocks.0.feed_forward.w1.weight", (swiglu_hidden(width),))[0]
        return cls(vocab_size=vocab_size, num_classes=shapes["class_emb.embedding_table.weight"][0] - 1, depth=depth,
                   width=width, heads=width // RELEASED_HEAD_DIM, ffn_hidden=hidden, block_size=block_size)

    @classmethod
    def from_run_config(cls, transformer: DictConfig) -> "ARArch":
        return cls(vocab_size=transformer.vocab_size, num_classes=transformer.num_classes, depth=transformer.depth,
                   width=transformer.width, heads=transformer.heads, ffn_hidden=transformer.ffn_hidden or swiglu_hidden(transformer.width),
                   block_size=transformer.block_size, alng=transformer.alng)


# -- official files ----------------------------------------------------------------------------------------


@dataclass
class OfficialFile:
    path: Path
    sha256: str
    state: dict[str, Tensor]  # the state dict, official names
    global_step: int | None

    @property
    def kind(self) -> str:
        if any(key.startswith(AR_TRANSFORMER_PREFIX) for key in self.state):
            return "ar"
        return "tokenizer"

    def part(self, prefix: str) -> dict[str, Tensor]:
        return {key.removeprefix(prefix): value for key, value in self.state.items() if key.startswith(prefix)}

    def describe(self, weights: str, config: Path | None) -> dict:
        return {"source": str(self.path), "file": self.path.name, "sha256": self.sha256, "weights": weights,
                "config": str(config) if config else "inferred from the tensors' shapes", "global_step": self.global_step}


def read_official(path: Path) -> OfficialFile:
    """An official checkpoint; anything else (missing, truncated, not a checkpoint, another model) is one line."""
    if not path.is_file():
        raise UserError(f"{path} does not exist (expected an official checkpoint such as imagenet256_16384.ckpt or AR_256_B.ckpt)")
    try:
        loaded = read_checkpoint(path, mmap=True)
    except Exception as error:  # torch raises many types for a torn or foreign file
        reason = one_line(str(error)).split(". ")[0] or type(error).__name__  # torch goes on with advice on torn files
        raise UserError(f"{path} cannot be read as a checkpoint (truncated, or not a torch file?): {reason}") from None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("state_dict"), dict):
        top = ", ".join(map(str, list(loaded)[:5])) if isinstance(loaded, dict) else type(loaded).__name__
        raise UserError(f"{path} is not an official IBQ checkpoint: it has no 'state_dict' (found: {top})")
    state = {key: value for key, value in loaded["state_dict"].items() if isinstance(value, Tensor)}
    step = loaded.get("global_step")
    return OfficialFile(path.resolve(), sha256(path), state, int(step) if isinstance(step, int) else None)


def read_official_config(path: Path) -> dict:
    """An official YAML config (configs/IBQ/gpu/*.yaml; JSON is YAML too)."""
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"--config {path} cannot be read as YAML: {one_line(str(error))}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserError(f"--config {path} is not an official IBQ config: it has no model: section")
    return config


def model_args(config: dict) -> dict:
    model = config["model"]
    return model.get("init_args") or model.get("params") or {}


def tokenizer_params(config: dict, ar: bool) -> dict:
    args = model_args(config)
    return (args.get("first_stage_config") or {}).get("params", {}) if ar else args


def tokenizer_arch(file: OfficialFile, prefix: str, config: dict | None, config_path: Path | None) -> TokenizerArch:
    shapes = {key: tuple(value.shape) for key, value in file.part(prefix).items()}
    if config is None:
        return TokenizerArch.from_shapes(shapes, str(file.path))
    params = tokenizer_params(config, ar=prefix == AR_TOKENIZER_PREFIX)
    if "ddconfig" not in params:
        raise UserError(f"--config {config_path} has no tokenizer ddconfig (model.init_args.ddconfig or first_stage_config.params.ddconfig)")
    arch = TokenizerArch.from_ddconfig(params["ddconfig"], params.get("n_embed", 0), params.get("embed_dim", 0), f"--config {config_path}")
    found = shapes.get("quantize.embedding.weight")
    if found and found[0] != arch.codebook_size:
        raise UserError(
            f"{file.path.name} has a codebook of K={found[0]} codes but --config {config_path} says n_embed={arch.codebook_size}: "
            f"give the config of this file (e.g. imagenet_ibqgan_{found[0]}.yaml)"
        )
    return arch


def ar_arch(file: OfficialFile, tokenizer: TokenizerArch, config: dict | None, config_path: Path | None) -> ARArch:
    if config is not None:
        params = (model_args(config).get("transformer_config") or {}).get("params")
        if not params:
            raise UserError(f"--config {config_path} has no transformer_config.params (an imagenet_conditional_llama_*.yaml is needed for an AR file)")
        return ARArch.from_params(params, f"--config {config_path}")
    grid = tokenizer.grid_side
    shapes = {key: tuple(value.shape) for key, value in file.part(AR_TRANSFORMER_PREFIX).items()}
    return ARArch.from_shapes(shapes, grid * grid, str(file.path))


def sampling_overrides(config: dict | None) -> list[str]:
    """The official config's sampling block, where it has one (the released ones come with model_scale)."""
    sampling = (config or {}).get("sampling") or {}
    return [f"sampling.{key}={sampling[key]}" for key in ("cfg_scale", "temperature", "top_k", "top_p") if key in sampling]


def loss_overrides(config: dict | None, ar: bool) -> list[str]:
    """IBQ's loss weights of the official config, under this platform's names."""
    if config is None:
        return []
    params = tokenizer_params(config, ar)
    loss = (params.get("lossconfig") or {}).get("params") or {}
    pairs = (
        ("beta", params, "quantizer.codebook_weight"),
        ("entropy_temperature", params, "quantizer.entropy_temperature"),
        ("sample_minimization_weight", params, "quantizer.sample_entropy_weight"),
        ("batch_maximization_weight", params, "quantizer.codebook_entropy_weight"),
        ("entropy_loss_weight", loss, "quantizer.entropy_weight"),
        ("quant_loss_weight", loss, "loss.quantizer_weight"),
        ("gen_loss_weight", loss, "loss.generator_adv_weight"),
        ("lecam_loss_weight", loss, "loss.lecam_weight"),
    )
    return [f"{key}={source[name]}" for name, source, key in pairs if name in source]


# -- checking a state dict against an architecture ----------------------------------------------------------


def check_official(found: dict[str, tuple[int, ...]], expected: Shapes, what: str, prefix: str = "") -> None:
    check_tensors(found, {key: shape for key, (_, shape) in expected.items()}, what, prefix)


def check_model_matches(cfg_model: DictConfig, quantizer: DictConfig | None, expected: Shapes, what: str) -> None:
    """The platform's model built from the composed config (on the meta device) has exactly the mapped tensors."""
    with torch.device("meta"):
        model = build(cfg_model, quantizer=build(quantizer)) if quantizer is not None else build(cfg_model)
    mapped = {project: shape for project, shape in expected.values()}
    built = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    if built != mapped:
        differ = sorted(set(built) ^ set(mapped)) or [k for k in built if built[k] != mapped[k]]
        raise UserError(f"{what}: the config's model does not match the file (first difference: {differ[0]}); drop the overrides that change the model")


def split_tokenizer_state(file: OfficialFile, arch: TokenizerArch, prefix: str) -> tuple[dict, dict, dict]:
    """(generator, EMA shadows, EMA counters) in official names; other keys are an error unless ignored."""
    part = file.part(prefix)
    expected = arch.tensors()
    generator = {key: value for key, value in part.items() if key.startswith(TOKENIZER_PREFIXES)}
    shadows = {key.removeprefix(EMA_PREFIX): value for key, value in part.items()
               if key.startswith(EMA_PREFIX) and key not in EMA_COUNTERS and not key.startswith(IGNORED_PREFIXES)}
    counters = {key: value for key, value in part.items() if key in EMA_COUNTERS}
    others = [key for key in part if not key.startswith((*TOKENIZER_PREFIXES, EMA_PREFIX, *IGNORED_PREFIXES))]
    what = f"{file.path.name} does not fit the tokenizer {describe_tokenizer(arch)}"
    if others:
        raise UserError(f"{what}: unexpected {len(others)} tensor(s), e.g. {', '.join(prefix + k for k in others[:3])}")
    check_official({k: tuple(v.shape) for k, v in generator.items()}, expected, what, prefix)
    if shadows:
        dotless = {key.replace(".", ""): key for key in expected}
        unknown = [key for key in shadows if key not in dotless]
        absent = [key for key in dotless if key not in shadows]
        if unknown or absent:
            example = f"model_ema.{(unknown or absent)[0]}"
            raise UserError(f"{file.path.name}: its EMA does not match its generator ({len(unknown)} unknown, {len(absent)} missing EMA tensors, e.g. {example})")
        shadows = {dotless[key]: value for key, value in shadows.items()}
        check_official({k: tuple(v.shape) for k, v in shadows.items()}, expected, f"{file.path.name}: the EMA", EMA_PREFIX)
    return generator, shadows, counters


def describe_tokenizer(arch: TokenizerArch) -> str:
    return (f"(K={arch.codebook_size}, embed_dim={arch.embed_dim}, ch={arch.ch}, ch_mult={list(arch.ch_mult)}, "
            f"num_res_blocks={arch.num_res_blocks}, attention at levels {list(arch.attn_levels)})")


def to_project(state: dict[str, Tensor], expected: Shapes) -> dict[str, Tensor]:
    return {expected[key][0]: state[key] for key in expected}


def to_official(state: dict[str, Tensor], expected: Shapes) -> "OrderedDict[str, Tensor]":
    return OrderedDict((official, state[project]) for official, (project, _) in expected.items())


# -- writing run directories ------------------------------------------------------------------------------


@dataclass
class ComposedRun:
    """A config composed by the app (Hydra), with its group choices and overrides."""

    cfg: DictConfig  # without Hydra's node
    choices: dict
    overrides: list[str]


def tokenizer_run_config(run: ComposedRun, imported: dict) -> DictConfig:
    """A stage-I run's own config, as TokenizerTraining keeps it, plus where its weights came from (so its
    signature is never that of a run trained here)."""
    cfg = tokenizer_identity(run.cfg)
    cfg.imported = provenance(imported)
    return cfg


def provenance(imported: dict) -> dict:
    """What of an import identifies the weights: part of the runs' configs and so of their signatures."""
    return {key: imported[key] for key in ("file", "sha256", "weights")}


def write_run_files(run_dir: Path, run: ComposedRun, own: DictConfig, kind: str, checkpoint: dict, imported: dict, **fields: Any) -> None:
    """Hydra's files, last.pt and a completed run.json, as a training run of this platform leaves them; the
    composed config carries the provenance too, so that tables tell imported runs from trained ones."""
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.merge(run.cfg, {"imported": provenance(imported)}), run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(run.overrides), run_dir / ".hydra" / "overrides.yaml")
    save_checkpoint(run_dir / CHECKPOINT, checkpoint)
    record = RunRecord(run_dir)
    record.start(own, run.choices, run.overrides, kind=kind, resumed_from_step=None)
    record.update(imported=imported, step=checkpoint["step"], **fields)  # the step a training run's results.json gives
    record.finish("completed")


def tokenizer_checkpoint(own: DictConfig, raw: dict, ema: dict, counters: dict, step: int) -> dict:
    return {
        "step": step,
        "signature": signature(own),
        "config": result_config(own),
        "tokenizer": raw,
        "ema": {f"shadow.{key}": value for key, value in ema.items()},
        "official_ema": counters,  # model_ema.decay and num_updates, given back by export
    }


@dataclass
class Imported:
    run_dirs: list[Path]
    weights: str
    notes: list[str]


@contextmanager
def staged(out_dir: Path):
    """A temporary sibling of `out_dir` to write into, renamed to it once complete and removed on failure:
    nothing half-written is left behind."""
    if out_dir.exists():
        raise UserError(f"{out_dir} already exists: give a new output directory (-o) or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def import_tokenizer(file: OfficialFile, arch: TokenizerArch, run: ComposedRun, weights: str, out_dir: Path, config_path: Path | None) -> Imported:
    """An official tokenizer file -> a completed stage-I run directory at out_dir."""
    expected = arch.tensors()
    generator, shadows, counters = split_tokenizer_state(file, arch, "")
    check_model_matches(run.cfg.model, run.cfg.quantizer, expected, f"{file.path.name}")
    notes = []
    if weights == "ema" and not shadows:
        weights = "raw"
        notes.append(f"{file.path.name} holds no EMA weights (model_ema.*): the run uses its raw weights")
    raw = to_project(generator, expected)
    used = to_project(shadows, expected) if weights == "ema" else raw
    imported = file.describe(weights, config_path)
    own = tokenizer_run_config(run, imported)
    with staged(out_dir) as tmp:
        write_run_files(tmp, run, own, "tokenizer", tokenizer_checkpoint(own, raw, used, counters, file.global_step or 0), imported)
    return Imported([out_dir], weights, notes)


def import_ar(file: OfficialFile, tokenizer: TokenizerArch, ar: ARArch, tokenizer_run: ComposedRun, ar_run: ComposedRun,
              out_dir: Path, config_path: Path | None) -> Imported:
    """An official AR file -> out_dir/tokenizer (stage I, from first_stage_model.*) and out_dir/ar (stage II,
    linked to it), both completed runs."""
    expected_tokenizer, expected_ar = tokenizer.tensors(), ar.tensors()
    tokenizer_part = file.part(AR_TOKENIZER_PREFIX)
    others = [key for key in file.state if not key.startswith((AR_TOKENIZER_PREFIX, AR_TRANSFORMER_PREFIX))]
    if others:
        raise UserError(f"{file.path.name} is not an official AR file: unexpected {len(others)} tensor(s), e.g. {', '.join(others[:3])}")
    generator = {key: value for key, value in tokenizer_part.items() if not key.startswith(EMA_PREFIX)}
    check_official({k: tuple(v.shape) for k, v in generator.items()}, expected_tokenizer,
                   f"{file.path.name} does not fit the tokenizer {describe_tokenizer(tokenizer)}", AR_TOKENIZER_PREFIX)
    transformer = file.part(AR_TRANSFORMER_PREFIX)
    what = f"{file.path.name} does not fit the transformer (depth {ar.depth}, width {ar.width}, vocab {ar.vocab_size}, {ar.num_classes} classes)"
    check_official({k: tuple(v.shape) for k, v in transformer.items()}, expected_ar, what, AR_TRANSFORMER_PREFIX)
    check_model_matches(tokenizer_run.cfg.model, tokenizer_run.cfg.quantizer, expected_tokenizer, file.path.name)
    check_model_matches(ar_run.cfg.transformer, None, expected_ar, file.path.name)
    if ar.vocab_size != tokenizer.codebook_size:
        raise UserError(f"{file.path.name}: the transformer's vocabulary ({ar.vocab_size}) differs from its tokenizer's codebook ({tokenizer.codebook_size})")

    # The AR stage keeps the tokenizer's EMA values under the generator's names.
    weights = "ema"
    imported = file.describe(weights, config_path)
    tokenizer_weights = to_project(generator, expected_tokenizer)
    own_tokenizer = tokenizer_run_config(tokenizer_run, imported)
    tokenizer_state = tokenizer_checkpoint(own_tokenizer, tokenizer_weights, tokenizer_weights, {}, file.global_step or 0)
    describe = {"signature": tokenizer_state["signature"], "step": tokenizer_state["step"], "codebook_size": tokenizer.codebook_size, "weights": "ema"}
    own, identity = stage_two_config(ar_run.cfg, out_dir / "tokenizer", describe, imported=provenance(imported))
    ar_state = {"step": file.global_step or 0, "signature": signature(identity), "config": OmegaConf.to_container(own),
                "model": to_project(transformer, expected_ar)}
    with staged(out_dir) as tmp:
        write_run_files(tmp / "tokenizer", tokenizer_run, own_tokenizer, "tokenizer", tokenizer_state, imported)
        write_run_files(tmp / "ar", ar_run, identity, "generator", ar_state, imported,
                        tokenizer={"run_dir": str(out_dir / "tokenizer"), **describe}, tokens=None)
    return Imported([out_dir / "tokenizer", out_dir / "ar"], weights, [])


# -- export -------------------------------------------------------------------------------------------------


def tokenizer_arch_of(run: LoadedRun) -> TokenizerArch:
    if run.config.quantizer.get("_target_") != "ibq.quantizers.IBQ":
        raise UserError(f"{run.run_dir} uses {run.config.quantizer.get('_target_')}: only IBQ tokenizers have an official layout (quantizer=ibq)")
    return TokenizerArch.from_run_config(run.config)


def export_tokenizer(run: LoadedRun) -> "OrderedDict[str, Tensor]":
    """Generator, EMA counters and EMA shadows under the official names, in the official order."""
    expected = tokenizer_arch_of(run).tensors()
    live = run.tokenizer_weights("live")
    check_tensors({key: tuple(value.shape) for key, value in live.items()},
                  {project: shape for project, shape in expected.values()},
                  f"{run.run_dir} has no official layout (its decoder differs from its encoder's mirror image?)")
    official = to_official(live, expected)
    official.update(run.state.get("official_ema") or {
        "model_ema.decay": torch.tensor(float(run.config.train.ema_decay), dtype=torch.float32),
        "model_ema.num_updates": torch.tensor(run.step, dtype=torch.int32),
    })
    ema = to_official(run.tokenizer_weights("ema"), expected)
    official.update((EMA_PREFIX + key.replace(".", ""), value) for key, value in ema.items())
    return official


def export_ar(run: LoadedRun) -> "OrderedDict[str, Tensor]":
    """The tokenizer's EMA weights as first_stage_model.*, the transformer as transformer.*."""
    tokenizer = load_run(run.config.tokenizer_run, "tokenizer_run", "tokenizer")
    tokenizer_ema = to_official(tokenizer.tokenizer_weights("ema"), tokenizer_arch_of(tokenizer).tensors())
    official = OrderedDict((AR_TOKENIZER_PREFIX + key, value) for key, value in tokenizer_ema.items())
    ar = ARArch.from_run_config(run.config.transformer)
    official.update((AR_TRANSFORMER_PREFIX + key, value) for key, value in to_official(run.state["model"], ar.tensors()).items())
    return official


def export_run(run_dir: Path, output: Path) -> str:
    """A tokenizer or AR run of this platform -> an official checkpoint file ({"state_dict": ...}); returns its kind."""
    if output.exists():
        raise UserError(f"{output} already exists: give a new output file or remove it")
    run = load_run(run_dir, "source", "any")
    if "transformer" in run.state["config"]:
        official, kind = export_ar(run), "ar"
    elif "tokenizer" in run.state and "ema" in run.state:
        official, kind = export_tokenizer(run), "tokenizer"
    else:
        raise UserError(f"{run.checkpoint_path} holds neither a tokenizer nor a transformer")
    save_checkpoint(output, {"state_dict": official})
    return kind
