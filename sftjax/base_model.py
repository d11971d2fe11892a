"""Where a run's weights begin: the pretrained (or randomly initialised) base, and its identity.

Owns `initial_params` (full fine-tuning: every weight trains; LoRA: fresh adapters train beside
the frozen base), `frozen_params` (the base again on resume: LoRA checkpoints hold only the
adapters) and the base's identity, recorded with every LoRA checkpoint and checked before a
resume, so adapters are never resumed onto different weights than they were trained against.
"""

import dataclasses
import hashlib

import ml_collections
from flax import nnx

from sftjax import config as config_lib
from sftjax import contents, paths, sharding
from sftjax.model import hf_io, int8, llama


class BaseChanged(config_lib.ConfigError):
    """The base model at model.hf_path is not the one the checkpoint's adapters were trained on."""


def base_config(cfg: llama.LlamaConfig) -> llama.LlamaConfig:
    """The architecture without adapters, in the dtype the run holds its base weights."""
    return dataclasses.replace(cfg, lora_rank=0, param_dtype=cfg.weights_dtype)


def _numerics(cfg: llama.LlamaConfig) -> dict:
    keys = ("param_dtype", "dtype", "scan_layers", "remat", "attention")
    return {k: getattr(cfg, k) for k in keys}


def load_base(config: ml_collections.ConfigDict, cfg, mesh, rules) -> llama.Llama:
    """model.hf_path read into its sharding, or the preset's random init from train.seed."""
    base = base_config(cfg)
    if config.model.hf_path:
        return hf_io.load_pretrained(
            config.model.hf_path, mesh=mesh, rules=rules, **_numerics(base)
        )
    return llama.create(base, mesh, seed=config.train.seed, rules=rules)


def initial_params(config: ml_collections.ConfigDict, cfg, mesh, rules) -> tuple[dict, dict]:
    """(trainable, frozen) pure dicts of a fresh run; frozen is {} for full fine-tuning."""
    if not cfg.lora_rank:
        return nnx.to_pure_dict(nnx.state(load_base(config, cfg, mesh, rules))), {}
    adapters = llama.create_adapters(cfg, mesh, seed=config.train.seed, rules=rules)
    return nnx.to_pure_dict(adapters), frozen_params(config, cfg, mesh, rules)


def frozen_params(config: ml_collections.ConfigDict, cfg, mesh, rules) -> dict:
    """The LoRA base as the step takes it (int8 codes + scales if so configured); {} for full
    fine-tuning. A resumed run reads it again: its checkpoints hold only the adapters."""
    if not cfg.lora_rank:
        return {}
    base = nnx.to_pure_dict(nnx.state(load_base(config, cfg, mesh, rules)))
    if cfg.quantized_base:
        _, _, abstract = nnx.split(llama.abstract(cfg, mesh, rules), nnx.LoRAParam, ...)
        shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh, rules))
        base["layers"] = int8.quantize_blocks(
            base["layers"], shardings["layers"], stacked=cfg.scan_layers
        )
    return base


def identity(config: ml_collections.ConfigDict) -> dict | None:
    """What tells this base apart from another; None when nothing is frozen or read.

    Per weight file: its size and a sha256 of its header and sampled spans
    (contents.file_identity); plus config.json's sha256. The path is kept only to be named:
    a base moved elsewhere with the same contents is the same base. A random-init base is
    fixed by preset and seed, which the resume check already compares.
    """
    if not (config.model.lora.rank and config.model.hf_path):
        return None
    directory = paths.resolve(config.model.hf_path)
    files = {}
    for file in sorted(set(hf_io.weight_files(directory).values()), key=str):
        files[file.name] = contents.file_identity(file, safetensors=True)
    config_sha = hashlib.sha256((directory / "config.json").read_bytes()).hexdigest()
    return {"hf_path": str(directory), "config_sha256": config_sha, "files": files}


def check_identity(saved: dict | None, current: dict | None, step: int) -> None:
    """Refuse (exit 2) adapters resumed onto another base than the one they trained on."""
    if saved is None or current is None:
        return
    differences = []
    if saved["config_sha256"] != current["config_sha256"]:
        differences.append("config.json differs")
    for name in sorted(saved["files"].keys() | current["files"].keys()):
        old, new = saved["files"].get(name), current["files"].get(name)
        if old is None or new is None:
            differences.append(f"{name} {'is new' if old is None else 'is missing'}")
        elif old != new:
            differences.append(
                f"{name}: {new['bytes']} bytes (was {old['bytes']})"
                if old["bytes"] != new["bytes"]
                else f"{name}: same size, different content"
            )
    if differences:
        raise BaseChanged(
            f"model.hf_path={current['hf_path']} is not the base model the LoRA checkpoint of "
            f"step {step} was trained on (it was {saved['hf_path']}): "
            f"{'; '.join(differences[:3])}. Point model.hf_path at that base, or use a new "
            "workdir to start over"
        )
