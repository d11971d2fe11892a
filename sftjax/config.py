"""Config validation and derived values. Defaults live in configs/base.py, never here.

`validate(config, num_devices)` runs before anything compiles and reports every problem at
once, one line each, saying how to fix it: first every key with a set of values (`CHOICES`) or
a range (`RANGES`), then what depends on several keys, the devices and the files.
`model_config(config.model)` is the one place the config becomes a `LlamaConfig`.
"""

import dataclasses
import logging
import math
from collections.abc import Sequence

import ml_collections

from sftjax import paths, sharding
from sftjax.data import mixture, records
from sftjax.model import attention, hf_io, llama

CHOICES = {
    "model.remat": ("none", "full", "save_dots"),
    "model.attention": attention.CHOICES,
    "model.param_dtype": ("float32", "bfloat16"),
    "model.dtype": ("float32", "bfloat16"),
    "model.base_dtype": ("float32", "bfloat16", "int8"),
    "data.template": ("alpaca", "chat", "tokenizer"),
    "data.format": ("auto", "alpaca", "prompt_completion", "sharegpt", "messages"),
    "data.train_on": ("all_assistant_turns", "last_assistant_turn"),
    "data.bad_rows": ("fail", "skip"),
    "data.leakage": ("warn", "drop", "fail"),
    "data.overlong": ("drop", "truncate_prompt", "truncate_history"),
    "data.mixture_unit": mixture.UNITS,
    "checkpoint.export_dtype": ("float32", "bfloat16", "float16"),  # what safetensors and HF load
}


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric key allows: finite, an integer if `integer`, within the bounds
    (`open_low` / `open_high` exclude the bound itself), or one of `also` (e.g. -1 = the rest)."""

    low: float = -math.inf
    high: float = math.inf
    integer: bool = False
    open_low: bool = False
    open_high: bool = False
    also: tuple = ()
    why: str = ""  # said instead of the range where the range alone would not explain it

    def allows(self, value: object) -> bool:
        if value in self.also and not isinstance(value, bool):
            return True
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if math.isfinite(self.low) and math.isfinite(self.high):
            bounds = (
                f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.open_high else ']'}"
            )
        elif math.isfinite(self.low):
            bounds = f"{'>' if self.open_low else '>='} {self.low:g}"
        else:
            bounds = f"{'<' if self.open_high else '<='} {self.high:g}"
        return f"{kind} {bounds}" + "".join(f", or {a}" for a in self.also)


COUNT = Range(low=1, integer=True)  # sizes, periods, counts of things: at least one
NON_NEGATIVE_INT = Range(low=0, integer=True)  # 0 means "off" or "default" (see base.py)
POSITIVE = Range(low=0, open_low=True)
NON_NEGATIVE = Range(low=0)
FRACTION = Range(low=0, high=1)
DECAY = Range(low=0, high=1, open_high=True)  # Adam's betas (1: never forget), dropout (1: all)
MESH_AXIS = Range(low=1, integer=True, also=(-1,))

# Every numeric key of configs/base.py and its range.
RANGES = {
    "model.vocab_size": NON_NEGATIVE_INT,
    "model.lora.rank": NON_NEGATIVE_INT,
    "model.lora.alpha": POSITIVE,
    "model.lora.dropout": DECAY,
    "optim.lr": POSITIVE,
    "optim.warmup_ratio": FRACTION,
    "optim.end_lr_ratio": FRACTION,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.b1": DECAY,
    "optim.b2": DECAY,
    "optim.eps": POSITIVE,
    "optim.grad_clip_norm": NON_NEGATIVE,
    "train.batch_size": COUNT,
    "train.microbatches": COUNT,
    "train.num_steps": NON_NEGATIVE_INT,
    "train.seed": NON_NEGATIVE_INT,
    "train.log_every_steps": COUNT,
    "train.peak_tflops_per_device": NON_NEGATIVE,
    "eval.every_steps": COUNT,
    "eval.batch_size": COUNT,
    "eval.patience": COUNT,
    "eval.min_delta": NON_NEGATIVE,
    "eval.max_new_tokens": COUNT,
    "mesh.data": MESH_AXIS,
    "mesh.fsdp": MESH_AXIS,
    "mesh.tensor": MESH_AXIS,
    "checkpoint.max_to_keep": dataclasses.replace(
        COUNT, why="keep at least 1 checkpoint (the newest is what a restart resumes from)"
    ),
    "data.validation_fraction": Range(low=0, high=1, open_high=True),
    "data.seq_len": COUNT,
    "data.packing_bins": COUNT,
    "data.shuffle_seed": NON_NEGATIVE_INT,  # numpy refuses negative seeds
    "data.num_epochs": COUNT,
}


log = logging.getLogger("sftjax")

# Any one of these in a directory lets transformers build a fast tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ConfigError(ValueError):
    """One or more config problems, each on its own line with the fix."""


class InvalidConfig(ConfigError):
    """What `validate` found: `problems`, one line each (one problem: one line in all)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        one = len(self.problems) == 1
        super().__init__("invalid config:" + (" " if one else "\n  ") + "\n  ".join(problems))


def model_config(model: ml_collections.ConfigDict) -> llama.LlamaConfig:
    """LlamaConfig from the HF directory's config.json, or from the named preset."""
    lora = model.get("lora") or {"rank": 0}  # records of runs from before LoRA lack it
    numerics = dict(
        param_dtype=model.param_dtype,
        dtype=model.dtype,
        scan_layers=model.scan_layers,
        remat=model.remat,
        attention=model.attention,
        lora_rank=lora["rank"],
    )
    if lora["rank"]:
        numerics.update(
            lora_alpha=lora["alpha"],
            lora_targets=lora["targets"],
            lora_dropout=lora["dropout"],
            base_dtype=model.base_dtype,
        )
    scaling = _rope_scaling(model.get("rope_scaling"))  # runs from before families lack it
    if model.hf_path:
        cfg = hf_io.read_config(model.hf_path, **numerics)
        if scaling is not None and scaling != cfg.rope_dict:
            raise ValueError(
                f"model.rope_scaling={scaling} but {model.hf_path}/config.json has "
                f"{cfg.rope_dict}: the checkpoint's own rope is what it was trained with; "
                "leave model.rope_scaling at its default None (--config.model.rope_scaling=None) "
                "to use it"
            )
        return cfg
    vocab = {"vocab_size": model.vocab_size} if model.vocab_size else {}
    rope = {} if scaling is None else {"rope_scaling": scaling}
    return llama.preset(model.preset, **numerics, **vocab, **rope)


def _rope_scaling(value) -> dict | None:
    """model.rope_scaling as a dict or None. On the command line it is a Python dict literal
    (ml_collections reads a value it cannot parse as a literal as a string: refused here)."""
    if value is None:
        return None
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if not isinstance(value, dict):
        raise ValueError(
            f"model.rope_scaling={value!r} is not a dict; give Hugging Face's rope_scaling as a "
            "Python dict literal (True/False, not true/false), e.g. "
            "--config.model.rope_scaling=\"{'rope_type': 'linear', 'factor': 2.0}\", or None"
        )
    return dict(value)


def _data_file_errors(key: str, spec: str) -> list[str]:
    """Problems with a data.*_files spec, found by the reader's own expansion, one per entry."""
    if key == "data.train_files" and not spec.strip():
        return [f"config.{key} is empty; give JSON/JSONL paths"]
    errors = []
    for entry in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            records.expand_paths([entry])
        except records.DataError as e:  # nothing matches, or a directory instead of files
            errors.append(f"config.{key}: {e}")
    return errors


def _get(config, dotted: str):
    node = config
    for key in dotted.split("."):
        node = node[key]
    return node


def key_errors(config: ml_collections.ConfigDict, section: str = "") -> list[str]:
    """One line per key (of `section`, e.g. "data", or all) outside its CHOICES or RANGES."""
    errors, prefix = [], f"{section}." if section else ""
    for key, allowed in CHOICES.items():
        if key.startswith(prefix) and _get(config, key) not in allowed:
            errors.append(f"config.{key}={_get(config, key)!r}: choose one of {allowed}")
    for key, allowed in RANGES.items():
        value = _get(config, key)
        if key.startswith(prefix) and not allowed.allows(value):
            errors.append(f"config.{key}={value!r}: {allowed.why or f'must be {allowed}'}")
    return errors


def validate_keys(config: ml_collections.ConfigDict, section: str = "") -> None:
    """Raise InvalidConfig if a key (of `section`, or any) is outside its choices or range: for
    commands that check the keys before their own work (the demo writes data, the report reads
    only the data section)."""
    errors = key_errors(config, section)
    if errors:
        raise InvalidConfig(errors)


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Raise InvalidConfig listing every problem (before any file is tokenized or compiled)."""
    errors = key_errors(config)
    numbers_ok = not errors  # the shape checks divide by and compare the keys' values
    errors += _file_errors(config)
    if numbers_ok:
        errors += _shape_errors(config, num_devices, num_processes)
    if errors:
        raise InvalidConfig(errors)


def _file_errors(config: ml_collections.ConfigDict) -> list[str]:
    """Data files, tokenizer and chat template that are not there."""
    errors = []
    data = config.data
    try:
        mix = mixture.parse(data.get("mixture"), data.format, data.mixture_unit)
    except mixture.MixtureError as e:
        mix, errors = [], [str(e)]
    for source in mix:
        errors += _data_file_errors(f"data.mixture ({source.name})", source.files)
    if mix and str(data.validation_files).strip():
        errors.append(
            "config.data.validation_files does not go with config.data.mixture: each source's "
            "held-out rows come from data.validation_fraction; leave validation_files empty"
        )
    if mix and str(data.train_files).strip():
        errors.append(
            "config.data.mixture and config.data.train_files are both set: the mixture's "
            "sources replace train_files; leave train_files empty"
        )
    if not (mix or data.prepared):  # a prepared dataset may train without its files
        errors += _data_file_errors("data.train_files", str(data.train_files))
    errors += _data_file_errors("data.validation_files", str(data.validation_files))
    if not config.data.validation_files and not config.data.validation_fraction:
        errors.append(
            "config.data.validation_fraction=0 and no data.validation_files: nothing to "
            "validate on; give validation files or a fraction in (0, 1)"
        )
    tokenizer = paths.resolve(config.data.tokenizer or "/nonexistent")
    if not tokenizer.is_dir():
        errors.append(
            f"config.data.tokenizer={config.data.tokenizer!r}: not a directory; give a local "
            "Hugging Face tokenizer directory (tokenizer.json / tokenizer.model)"
        )
    elif not any((tokenizer / name).exists() for name in TOKENIZER_FILES):
        errors.append(
            f"config.data.tokenizer={config.data.tokenizer!r}: holds none of "
            f"{', '.join(TOKENIZER_FILES)}; give the directory a Hugging Face tokenizer was "
            "saved to"
        )
    if config.data.chat_template and not paths.resolve(config.data.chat_template).is_file():
        errors.append(
            f"config.data.chat_template={config.data.chat_template!r}: no such file; give a "
            ".jinja chat template or leave it empty to use the tokenizer's"
        )
    return errors


def _shape_errors(
    config: ml_collections.ConfigDict, num_devices: int, num_processes: int
) -> list[str]:
    """The mesh against the devices, the batch sizes and the model's shapes."""
    errors = []
    try:
        data, fsdp, tensor = sharding.mesh_shape(dict(config.mesh), num_devices)
    except ValueError as e:
        errors.append(f"config.mesh: {e}")
        data = fsdp = tensor = 1
    batch_shards = data * fsdp
    train, ev = config.train, config.eval
    if train.batch_size % (batch_shards * train.microbatches):
        errors.append(
            f"config.train.batch_size={train.batch_size} must be divisible by mesh data×fsdp "
            f"({batch_shards}) × train.microbatches ({train.microbatches}) = "
            f"{batch_shards * train.microbatches}"
        )
    for name, size in (("train.batch_size", train.batch_size), ("eval.batch_size", ev.batch_size)):
        if size % batch_shards or size % num_processes:
            errors.append(
                f"config.{name}={size} must be divisible by mesh data×fsdp ({batch_shards}) "
                f"and by the number of processes ({num_processes})"
            )
    try:
        cfg = model_config(config.model)
        if config.model.hf_path:  # refuse pickle-only weights now, not after tokenizing
            hf_io.weight_files(paths.resolve(config.model.hf_path))
    except (ValueError, OSError) as e:
        errors.append(f"config.model: {e}")
        cfg = None
    if cfg is not None:
        if cfg.num_heads % tensor or cfg.num_kv_heads % tensor:
            errors.append(
                f"mesh tensor={tensor} must divide num_heads={cfg.num_heads} and "
                f"num_kv_heads={cfg.num_kv_heads}; lower config.mesh.tensor"
            )
        if cfg.mlp_dim % tensor or cfg.vocab_size % tensor:
            errors.append(
                f"mesh tensor={tensor} must divide mlp_dim={cfg.mlp_dim} and "
                f"vocab_size={cfg.vocab_size}; lower config.mesh.tensor"
            )
        if cfg.embed_dim % fsdp:
            errors.append(
                f"mesh fsdp={fsdp} must divide embed_dim={cfg.embed_dim}; change config.mesh"
            )
        if cfg.sliding_window is not None and cfg.sliding_window >= config.data.seq_len:
            log.info(
                "sliding_window=%d >= data.seq_len=%d: the window changes nothing in training",
                cfg.sliding_window,
                config.data.seq_len,
            )
        if config.data.seq_len > cfg.max_seq_len:
            errors.append(
                f"config.data.seq_len={config.data.seq_len} exceeds the model's max_seq_len="
                f"{cfg.max_seq_len}; lower data.seq_len"
            )
        if config.eval.prompts and config.eval.max_new_tokens >= cfg.max_seq_len:
            errors.append(  # else the first evaluation fails, after training started
                f"config.eval.max_new_tokens={config.eval.max_new_tokens} leaves no room for "
                f"eval.prompts in the model's max_seq_len={cfg.max_seq_len}; lower it"
            )
    return errors


def sharding_rules(config: ml_collections.ConfigDict) -> sharding.Rules:
    """The config's logical-axis rules (`mesh.rules`), or sharding.DEFAULT_RULES."""
    return tuple(tuple(r) for r in config.mesh.rules) or sharding.DEFAULT_RULES
