"""Config validation and derived values. Defaults live in configs/base.py, never here.

`validate(config, num_devices)` runs before anything compiles and reports every problem at
once, one line each, saying how to fix it. `model_config(config.model)` is the one place the
config becomes a `LlamaConfig`.
"""

import logging

import ml_collections

from sftjax import paths, sharding
from sftjax.data import records
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
}


log = logging.getLogger("sftjax")

# Any one of these in a directory lets transformers build a fast tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ConfigError(ValueError):
    """One or more config problems, each on its own line with the fix."""


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
    scaling = model.get("rope_scaling")  # records of runs from before families lack it
    scaling = None if scaling is None else dict(scaling)
    if model.hf_path:
        cfg = hf_io.read_config(model.hf_path, **numerics)
        if scaling is not None and scaling != cfg.rope_dict:
            raise ValueError(
                f"model.rope_scaling={scaling} but {model.hf_path}/config.json has "
                f"{cfg.rope_dict}: the checkpoint's own rope is what it was trained with; "
                "set model.rope_scaling=None to use it"
            )
        return cfg
    vocab = {"vocab_size": model.vocab_size} if model.vocab_size else {}
    rope = {} if scaling is None else {"rope_scaling": scaling}
    return llama.preset(model.preset, **numerics, **vocab, **rope)


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


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Raise ConfigError listing every problem (before any file is tokenized or compiled)."""
    errors = []
    for key, allowed in CHOICES.items():
        if _get(config, key) not in allowed:
            errors.append(f"config.{key}={_get(config, key)!r}: choose one of {allowed}")

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
    if ev.every_steps < 1 or ev.patience < 1:
        errors.append("config.eval.every_steps and config.eval.patience must be >= 1")

    if config.checkpoint.max_to_keep < 1:
        errors.append(
            f"config.checkpoint.max_to_keep={config.checkpoint.max_to_keep}: keep at least 1 "
            "checkpoint (the newest is what a restart resumes from)"
        )

    for key in ("data.train_files", "data.validation_files"):
        errors += _data_file_errors(key, str(_get(config, key)))
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
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def sharding_rules(config: ml_collections.ConfigDict) -> sharding.Rules:
    """The config's logical-axis rules (`mesh.rules`), or sharding.DEFAULT_RULES."""
    return tuple(tuple(r) for r in config.mesh.rules) or sharding.DEFAULT_RULES
