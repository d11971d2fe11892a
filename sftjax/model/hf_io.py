"""Hugging Face Llama checkpoints <-> our NNX Llama: one key table, streamed, sharded, atomic.

Owns the HF boundary: config.json translation, the tensor-name table and the layout transforms
(HF Linear weights are [out, in]; ours are [in, heads, head_dim] etc.). Loading reads one tensor
at a time (safetensors, memory-mapped) and places it straight into its target sharding, so a 70B
checkpoint is never whole on one host. Saving writes into a temporary sibling directory that is
renamed at the end, so an interrupted export never leaves a half-written model behind.
Pickle (`.bin`) checkpoints are refused: they can execute code when loaded.
The exported tokenizer carries the training format: `chat_template.jinja` (what
`apply_chat_template` renders) and a post-processor that adds BOS exactly when training did.
"""

import json
import math
import os
import pathlib
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx
from jax.experimental import multihost_utils

from sftjax import sharding
from sftjax.model import llama

Transform = tuple[Callable, Callable]  # (hf -> ours, ours -> hf); second arg: head_dim

_COPY: Transform = (lambda w, h: w, lambda w, h: w)
_LINEAR: Transform = (lambda w, h: w.T, lambda w, h: w.T)
_IN_HEADS: Transform = (  # [heads*H, D] <-> [D, heads, H]
    lambda w, h: w.T.reshape(w.shape[1], -1, h),
    lambda w, h: w.reshape(w.shape[0], -1).T,
)
_OUT_HEADS: Transform = (  # [D, N*H] <-> [N, H, D]
    lambda w, h: w.T.reshape(-1, h, w.shape[0]),
    lambda w, h: w.reshape(-1, w.shape[-1]).T,
)

# (HF name, our path inside the model, transform). "{i}" = layer index.
GLOBAL_KEYS = (
    ("model.embed_tokens.weight", ("embedding",), _COPY),
    ("model.norm.weight", ("final_norm", "weight"), _COPY),
    ("lm_head.weight", ("lm_head",), _LINEAR),
)
LAYER_KEYS = (
    ("model.layers.{i}.input_layernorm.weight", ("attention_norm", "weight"), _COPY),
    ("model.layers.{i}.self_attn.q_proj.weight", ("attention", "q"), _IN_HEADS),
    ("model.layers.{i}.self_attn.k_proj.weight", ("attention", "k"), _IN_HEADS),
    ("model.layers.{i}.self_attn.v_proj.weight", ("attention", "v"), _IN_HEADS),
    ("model.layers.{i}.self_attn.o_proj.weight", ("attention", "o"), _OUT_HEADS),
    ("model.layers.{i}.post_attention_layernorm.weight", ("mlp_norm", "weight"), _COPY),
    ("model.layers.{i}.mlp.gate_proj.weight", ("mlp", "gate"), _LINEAR),
    ("model.layers.{i}.mlp.up_proj.weight", ("mlp", "up"), _LINEAR),
    ("model.layers.{i}.mlp.down_proj.weight", ("mlp", "down"), _LINEAR),
)
# Buffers some older exports carry; they are recomputed, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
MAX_SHARD_BYTES = 5 * 1024**3
TRAINING_FORMAT_FILE = "sftjax_format.json"  # {"template": ...}: what sftjax.generate reads


class CheckpointError(ValueError):
    """A Hugging Face directory we cannot load, with the reason and the fix."""


def config_from_hf(hf: dict, **overrides) -> llama.LlamaConfig:
    """Our LlamaConfig from a HF config.json dict; refuses architecture features we don't run."""
    if hf.get("model_type", "llama") != "llama":
        raise CheckpointError(f"model_type={hf.get('model_type')!r}: only 'llama' is supported")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"{flag}=true is not supported (Llama-2 has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"rope scaling {rope} is not supported; only plain RoPE")
    fields = dict(
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        mlp_dim=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        max_seq_len=hf.get("max_position_embeddings", 4096),
        head_dim=hf.get("head_dim"),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    return llama.LlamaConfig(**{**fields, **overrides})


def config_to_hf(cfg: llama.LlamaConfig, *, dtype: str, bos_token_id: int, eos_token_id: int):
    """A config.json dict that `transformers.LlamaForCausalLM` reads back to the same model."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def _expected_keys(cfg: llama.LlamaConfig):
    """Yield (hf_name, our_path, transform, layer index or None) for every tensor of `cfg`."""
    for name, path, transform in GLOBAL_KEYS:
        if not (name == "lm_head.weight" and cfg.tie_embeddings):
            yield name, path, transform, None
    for i in range(cfg.num_layers):
        for name, path, transform in LAYER_KEYS:
            yield name.format(i=i), path, transform, i


def _weight_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """HF tensor name -> safetensors file holding it (single file or sharded with an index)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if single.exists():
        with safetensors.safe_open(str(single), framework="numpy") as f:
            return {name: single for name in f.keys()}
    if list(directory.glob("*.bin")) or list(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory} holds only pickle weights (*.bin/*.pt), which sftjax refuses to load "
            "(unpickling can run code). Convert once with transformers: "
            "LlamaForCausalLM.from_pretrained(d).save_pretrained(d, safe_serialization=True)"
        )
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def read_config(path: str | os.PathLike, **overrides) -> llama.LlamaConfig:
    """The LlamaConfig of a HF directory, with our own fields (dtype, scan_layers...) overridden."""
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory")
    config_file = directory / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face model directory)")
    return config_from_hf(json.loads(config_file.read_text()), **overrides)


def load_pretrained(
    path: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
    **overrides,
) -> llama.Llama:
    """A HF Llama directory -> Llama, each tensor read alone and placed in its sharding.

    `overrides` set our own LlamaConfig fields, e.g. param_dtype="bfloat16", scan_layers=True.
    Without a mesh, the model lives on one device.
    """
    directory = pathlib.Path(path)
    cfg = read_config(directory, **overrides)
    files = _weight_files(directory)
    mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.devices()[:1])
    graphdef, abstract_state = nnx.split(llama.abstract(cfg, mesh, rules))
    targets = nnx.to_pure_dict(abstract_state)
    shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_state, mesh, rules))

    expected = {name for name, *_ in _expected_keys(cfg)}
    unexpected = sorted(
        n
        for n in files
        if n not in expected
        and not n.endswith(IGNORED_SUFFIXES)
        and not (cfg.tie_embeddings and n == "lm_head.weight")
    )
    if unexpected:
        raise CheckpointError(
            f"{directory}: tensors the Llama architecture lacks: {unexpected[:5]}"
        )
    missing = sorted(expected - files.keys())
    if missing:
        raise CheckpointError(f"{directory}: missing tensor {missing[0]} ({len(missing)} missing)")

    loaded: dict = {}
    stacked_pieces: dict = {}
    open_files: dict = {}
    try:
        for name, path_in_model, (to_ours, _), layer in _expected_keys(cfg):
            file = files[name]
            if file not in open_files:
                open_files[file] = safetensors.safe_open(str(file), framework="numpy").__enter__()
            hf_tensor = open_files[file].get_tensor(name)
            full_path = _model_path(cfg, path_in_model, layer)
            target = _get(targets, full_path)
            target_sharding = _get(shardings, full_path)
            value = to_ours(hf_tensor, cfg.head_dim)
            want = target.shape[1:] if cfg.scan_layers and layer is not None else target.shape
            if value.shape != tuple(want):
                raise CheckpointError(
                    f"{name}: checkpoint shape {tuple(hf_tensor.shape)} gives {value.shape} but "
                    f"the config expects {tuple(want)}"
                )
            value = np.asarray(value, dtype=target.dtype)
            if cfg.scan_layers and layer is not None:
                spec = jax.sharding.PartitionSpec(*target_sharding.spec[1:])
                layer_sharding = jax.sharding.NamedSharding(mesh, spec)
                stacked_pieces.setdefault(full_path, []).append(_place(value, layer_sharding))
                if len(stacked_pieces[full_path]) == cfg.num_layers:
                    pieces = stacked_pieces.pop(full_path)
                    stack = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=target_sharding)
                    _set(loaded, full_path, stack(*pieces))
            else:
                _set(loaded, full_path, _place(value, target_sharding))
    finally:
        for handle in open_files.values():
            handle.__exit__(None, None, None)
    nnx.replace_by_pure_dict(abstract_state, loaded)
    return nnx.merge(graphdef, abstract_state)


def _model_path(cfg: llama.LlamaConfig, path: tuple, layer: int | None) -> tuple:
    if layer is None:
        return path
    return ("layers", *path) if cfg.scan_layers else ("layers", layer, *path)


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _place(value: np.ndarray, target: jax.sharding.Sharding) -> jax.Array:
    """Host array -> global array; each device gets only its slice (works multi-host)."""
    return jax.make_array_from_callback(value.shape, target, lambda index: value[index])


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_pretrained(
    model: llama.Llama,
    path: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    chat_template: str | None = None,
    training_format: dict | None = None,
    add_bos: bool | None = None,
    dtype: str | None = None,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a directory `transformers.LlamaForCausalLM.from_pretrained` loads, atomically.

    Tensors go out one at a time (gathered to process 0 for multi-host). `dtype` defaults to the
    parameter dtype. An existing `path` is replaced only with `overwrite=True`, and only after
    the new export is complete. With `tokenizer_dir`, the tokenizer is exported too (see
    export_tokenizer: `chat_template`, `add_bos`); `training_format` is written as JSON.
    """
    cfg: llama.LlamaConfig = model.cfg
    dtype = dtype or cfg.param_dtype
    final = pathlib.Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True to replace it")
    is_writer = jax.process_index() == 0
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if is_writer:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    entries = list(_expected_keys(cfg))
    itemsize = np.dtype(jnp.dtype(dtype)).itemsize
    shards = _plan_shards(cfg, params, entries, itemsize, max_shard_bytes)
    weight_map, total = {}, 0
    for shard_index, shard_entries in enumerate(shards):
        file_name = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{shard_index + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = {}
        for name, path_in_model, (_, to_hf), layer in shard_entries:
            leaf = _get(params, _model_path(cfg, path_in_model, layer))
            if cfg.scan_layers and layer is not None:
                leaf = leaf[layer]
            host = to_hf(_to_host(leaf), cfg.head_dim).astype(jnp.dtype(dtype))
            tensors[name] = np.ascontiguousarray(host)
            weight_map[name] = file_name
            total += host.nbytes
        if is_writer:
            safetensors.numpy.save_file(tensors, staging / file_name, metadata={"format": "pt"})
    if not is_writer:
        return final

    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf_config = config_to_hf(cfg, dtype=dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2))
    generation = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer_dir is not None:
        export_tokenizer(tokenizer_dir, staging, chat_template=chat_template, add_bos=add_bos)
    if training_format is not None:
        (staging / TRAINING_FORMAT_FILE).write_text(json.dumps(training_format, indent=2))
    _replace_dir(staging, final)
    return final


def export_tokenizer(
    source: str | os.PathLike,
    target: pathlib.Path,
    *,
    chat_template: str | None = None,
    add_bos: bool | None = None,
) -> None:
    """Copy the tokenizer files; write `chat_template`; make plain encoding add BOS as training did.

    Training puts BOS first (when the tokenizer has one) and never appends EOS to a prompt, so
    the export must do the same for `tokenizer(text)` (add_bos=None: leave it as it is).
    Tokenizers whose post-processor differs (a byte-level one with none) get a
    TemplateProcessing post-processor that does exactly that.
    """
    import tokenizers
    import transformers

    for name in TOKENIZER_FILES:
        if (pathlib.Path(source) / name).exists():
            shutil.copy2(pathlib.Path(source) / name, target / name)
    config_path = target / "tokenizer_config.json"
    settings = json.loads(config_path.read_text()) if config_path.exists() else {}
    if chat_template is not None:
        # transformers 5 reads chat_template.jinja; a second copy in the config could disagree.
        (target / "chat_template.jinja").write_text(chat_template)
        settings.pop("chat_template", None)
        config_path.write_text(json.dumps(settings, indent=2, ensure_ascii=False))

    def loaded():
        return transformers.AutoTokenizer.from_pretrained(target, local_files_only=True)

    if add_bos is None:
        return
    hf = loaded()
    bos = hf.bos_token if add_bos and hf.bos_token_id is not None else None
    text_ids = hf("x", add_special_tokens=False)["input_ids"]
    want = ([hf.bos_token_id] if bos else []) + text_ids
    if hf("x")["input_ids"] == want:
        return
    backend = tokenizers.Tokenizer.from_file(str(target / "tokenizer.json"))
    head = f"{bos} " if bos else ""
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{head}$A",
        pair=f"{head}$A {head}$B:1",
        special_tokens=[(bos, hf.bos_token_id)] if bos else [],
    )
    backend.save(str(target / "tokenizer.json"))
    settings.update(add_bos_token=bool(bos), add_eos_token=False)
    config_path.write_text(json.dumps(settings, indent=2, ensure_ascii=False))
    if loaded()("x")["input_ids"] != want:
        raise CheckpointError(
            f"{source}: could not make the exported tokenizer add BOS={bos!r} as training did"
        )


def _plan_shards(cfg, params, entries, itemsize: int, max_bytes: int) -> list[list]:
    """Group tensors in table order into files of at most `max_bytes` (from shapes alone)."""
    shards, current, size = [], [], 0
    for entry in entries:
        _, path_in_model, _, layer = entry
        shape = _get(params, _model_path(cfg, path_in_model, layer)).shape
        nbytes = math.prod(shape[1:] if cfg.scan_layers and layer is not None else shape) * itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    return shards + [current]


def _replace_dir(staging: pathlib.Path, final: pathlib.Path) -> None:
    """Rename the finished export into place; an old one is removed only after that succeeds."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old)
    else:
        staging.rename(final)
