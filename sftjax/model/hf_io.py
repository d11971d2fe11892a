"""Hugging Face checkpoints <-> our NNX Llama: one key table, streamed, sharded, atomic.

Owns the HF boundary: config.json translation (model_type llama, mistral, qwen2 and qwen3, both
rope spellings; every other architecture refused in one line naming what is missing), the
tensor-name table and the layout transforms (HF Linear weights are [out, in]; ours are
[in, heads, head_dim] etc.). Loading reads one tensor
at a time (safetensors, memory-mapped) and places it straight into its target sharding, so a 70B
checkpoint is never whole on one host. Saving writes into a temporary sibling directory that is
renamed at the end, so an interrupted export never leaves a half-written model behind.
Pickle (`.bin`) checkpoints are refused: they can execute code when loaded.
The exported tokenizer carries the training format: `chat_template.jinja` (what
`apply_chat_template` renders) and a post-processor that adds BOS exactly when training did.
"""

import functools
import json
import logging
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from sftjax import paths, sharding
from sftjax.model import llama, safetensors_slices
from sftjax.model import rope as rope_kinds
from sftjax.model.safetensors_slices import LoadStats

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

_HEAD_VECTOR: Transform = (  # [heads*H] <-> [heads, H]
    lambda w, h: w.reshape(-1, h),
    lambda w, h: w.reshape(-1),
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
# Family tensors, present when the LlamaConfig flag that names them is set.
FAMILY_KEYS = (
    ("model.layers.{i}.self_attn.q_proj.bias", ("attention", "q_bias"), _HEAD_VECTOR, "qkv_bias"),
    ("model.layers.{i}.self_attn.k_proj.bias", ("attention", "k_bias"), _HEAD_VECTOR, "qkv_bias"),
    ("model.layers.{i}.self_attn.v_proj.bias", ("attention", "v_bias"), _HEAD_VECTOR, "qkv_bias"),
    (
        "model.layers.{i}.self_attn.q_norm.weight",
        ("attention", "q_norm", "weight"),
        _COPY,
        "qk_norm",
    ),
    (
        "model.layers.{i}.self_attn.k_norm.weight",
        ("attention", "k_norm", "weight"),
        _COPY,
        "qk_norm",
    ),
)
# Buffers some older exports carry; they are recomputed, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
log = logging.getLogger("sftjax")


class CheckpointError(ValueError):
    """A Hugging Face directory we cannot load, with the reason and the fix."""


ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either spelling transformers writes.

    transformers 5: `rope_parameters` {rope_type, rope_theta, factor, ...}; 4.x: top-level
    `rope_theta` and `rope_scaling` (null or a dict, `type` being the old name of rope_type).
    """
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise CheckpointError(f"per-layer-type rope parameters {rope} are not supported")
    theta = float(rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0)
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    partial = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0
    if partial != 1.0:
        raise CheckpointError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    if kind == "default":
        return theta, None
    if kind in ("llama3", "yarn") and rope.get("original_max_position_embeddings") is None:
        # transformers' own default: the pre-scaling context is max_position_embeddings
        original = hf.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
        rope["original_max_position_embeddings"] = original
    if kind == "yarn" and rope.get("factor") is None:
        rope["factor"] = hf["max_position_embeddings"] / rope["original_max_position_embeddings"]
    scaling = {"rope_type": kind, **rope}
    try:
        rope_kinds.check(scaling)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return theta, scaling


def _window_from_hf(hf: dict, model_type: str) -> int | None:
    """The sliding window every layer uses, or None; per-layer windows refused.

    Mistral windows every layer when `sliding_window` is set. Qwen2/Qwen3 window only when
    `use_sliding_window` is true, and then only layers >= `max_window_layers` (transformers 5
    also writes the outcome as `layer_types`).
    """
    window = hf.get("sliding_window")
    if model_type == "llama":
        return None
    if model_type == "mistral":
        return window
    n = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None:
        if not hf.get("use_sliding_window") or window is None:
            return None
        first = hf.get("max_window_layers", 28)  # transformers' default
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    kinds = set(layer_types)
    if not kinds <= {"full_attention", "sliding_attention"}:
        raise CheckpointError(f"layer_types {sorted(kinds)}: only full and sliding attention")
    if kinds == {"full_attention"}:
        return None
    if window is None:  # transformers ignores sliding layers without a window
        return None
    if len(kinds) > 1:
        raise CheckpointError(
            f"a sliding window on some layers only (layer_types {layer_types}) is not supported: "
            "one window holds for every layer here (with scan_layers they are one computation)"
        )
    return window


def config_from_hf(hf: dict, **overrides) -> llama.LlamaConfig:
    """Our LlamaConfig from a HF config.json dict; refuses architecture features we don't run."""
    model_type = hf.get("model_type", "llama")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"model_type={model_type!r} is not supported: sftjax runs the Llama architecture "
            f"and its near relatives {sorted(ARCHITECTURES)} (no other attention, MLP, MoE or "
            "norm layout)"
        )
    if hf.get("attention_bias"):
        raise CheckpointError(
            f"{model_type}: attention_bias=true (biases on q, k, v and o) is not supported; "
            "only Qwen2's q/k/v biases are"
        )
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{model_type}: mlp_bias=true is not supported (no MLP biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    theta, scaling = _rope_from_hf(hf)
    fields = dict(
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        mlp_dim=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        max_seq_len=hf.get("max_position_embeddings", 4096),
        head_dim=hf.get("head_dim"),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        model_type=model_type,
        qkv_bias=model_type == "qwen2",  # Qwen2 always has them, with no flag to say so
        qk_norm=model_type == "qwen3",
        sliding_window=_window_from_hf(hf, model_type),
    )
    return llama.LlamaConfig(**{**fields, **overrides})


def config_to_hf(
    cfg: llama.LlamaConfig, *, dtype: str, bos_token_id: int, eos_token_id: int | list[int]
) -> dict:
    """A config.json dict that transformers' class of `cfg.model_type` reads back to the same
    model; the rope written in both spellings (5.x `rope_parameters`, 4.x `rope_scaling`)."""
    scaling = cfg.rope_dict
    hf = {
        "architectures": [ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
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
        "rope_scaling": scaling,
        "rope_parameters": {
            "rope_type": "default",
            **(scaling or {}),
            "rope_theta": cfg.rope_theta,
        },
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
    }
    if cfg.model_type in ("llama", "qwen3"):
        hf["attention_bias"] = False
    if cfg.model_type == "llama":
        hf["mlp_bias"] = False
    if cfg.model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if cfg.model_type in ("qwen2", "qwen3"):
        windowed = cfg.sliding_window is not None
        hf.update(
            use_sliding_window=windowed,
            sliding_window=cfg.sliding_window,
            max_window_layers=0 if windowed else cfg.num_layers,
            layer_types=[f"{'sliding' if windowed else 'full'}_attention"] * cfg.num_layers,
        )
    hf.update(bos_token_id=bos_token_id, eos_token_id=eos_token_id, torch_dtype=dtype, dtype=dtype)
    return hf


def expected_keys(cfg: llama.LlamaConfig):
    """Yield (hf_name, our_path, transform, layer index or None) for every tensor of `cfg`."""
    for name, path, transform in GLOBAL_KEYS:
        if not (name == "lm_head.weight" and cfg.tie_embeddings):
            yield name, path, transform, None
    family = tuple((name, path, t) for name, path, t, flag in FAMILY_KEYS if getattr(cfg, flag))
    for i in range(cfg.num_layers):
        for name, path, transform in LAYER_KEYS + family:
            yield name.format(i=i), path, transform, i


def weight_files(directory: epath.Path) -> dict[str, epath.Path]:
    """HF tensor name -> safetensors file holding it (single file or sharded with an index)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if single.exists():
        return {name: single for name in safetensors_slices.SliceReader(single).names()}
    if list(directory.glob("*.bin")) or list(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory} holds only pickle weights (*.bin/*.pt), which sftjax refuses to load "
            "(unpickling can run code). Convert once with transformers: "
            "LlamaForCausalLM.from_pretrained(d).save_pretrained(d, safe_serialization=True)"
        )
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def read_config(path: str | os.PathLike, **overrides) -> llama.LlamaConfig:
    """The LlamaConfig of a HF directory, with our own fields (dtype, scan_layers...) overridden."""
    directory = paths.resolve(path)
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
    stats: LoadStats | None = None,
    **overrides,
) -> llama.Llama:
    """A HF Llama directory (local or gs://) -> Llama, each process reading only its slices.

    Every tensor is placed straight into its sharding: for each of this process's devices the
    matching slice is mapped back through the layout transform to a slice of the HF tensor,
    and only that is read (a memory-mapped slice locally; the byte span covering it from
    object storage). Nothing is ever whole on one host unless its sharding says so.
    `overrides` set our own LlamaConfig fields, e.g. param_dtype="bfloat16", scan_layers=True.
    Without a mesh, the model lives on one device. `stats` (optional) receives the byte counts.
    """
    directory = paths.resolve(path)
    cfg = read_config(directory, **overrides)
    files = weight_files(directory)
    mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.devices()[:1])
    graphdef, abstract_state = nnx.split(llama.abstract(cfg, mesh, rules))
    targets = nnx.to_pure_dict(abstract_state)
    shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_state, mesh, rules))

    expected = {name for name, *_ in expected_keys(cfg)}
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

    stats = stats if stats is not None else LoadStats()
    loaded: dict = {}
    for full_path, array in read_tensors(directory, cfg, targets, shardings, mesh, stats=stats):
        tree_set(loaded, full_path, array)
    log.info(
        "read %.1f MiB of %.1f MiB of weights on process %d",
        stats.bytes_read / 2**20,
        stats.bytes_total / 2**20,
        jax.process_index(),
    )
    nnx.replace_by_pure_dict(abstract_state, loaded)
    return nnx.merge(graphdef, abstract_state)


def _spec(shape) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _read_placed(reader, name, transform, head_dim, shape, dtype, target, stats) -> jax.Array:
    """The global array of one tensor in our layout; each device's slice read on its own."""
    hf_index_of = _HF_INDEX[transform]
    cache: dict = {}

    def read(index: tuple) -> np.ndarray:
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape, strict=True))
        key = tuple((s.start, s.stop) for s in index)
        if key not in cache:  # devices that replicate a slice share one read
            hf_slice = reader.read(name, hf_index_of(index, head_dim), stats)
            cache[key] = np.asarray(transform[0](hf_slice, head_dim), dtype=dtype)
        return cache[key]

    return jax.make_array_from_callback(shape, target, read)


def _heads_rows(heads: slice, head_dim: int) -> slice:
    return slice(heads.start * head_dim, heads.stop * head_dim)


# Our slice -> the HF slice it comes from, per transform (head_dim is never sharded).
_HF_INDEX = {
    _COPY: lambda index, h: index,
    _LINEAR: lambda index, h: (index[1], index[0]),
    _IN_HEADS: lambda index, h: (_heads_rows(index[1], h), index[0]),  # [D,N,H] <- [N*H, D]
    _OUT_HEADS: lambda index, h: (index[2], _heads_rows(index[0], h)),  # [N,H,D] <- [D, N*H]
    _HEAD_VECTOR: lambda index, h: (_heads_rows(index[0], h),),  # [N,H] <- [N*H]
}


def model_path(cfg: llama.LlamaConfig, path: tuple, layer: int | None) -> tuple:
    if layer is None:
        return path
    return ("layers", *path) if cfg.scan_layers else ("layers", layer, *path)


def tree_get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def tree_set(tree: dict, path: tuple, value) -> None:
    """tree[path[0]]...[path[-1]] = value, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


@functools.cache
def _stacker(out_sharding: jax.sharding.Sharding):
    """jit(stack) into `out_sharding`, one per sharding: weights of the same sharding, shape
    and dtype (q and o, gate and up) share a compile, and a second load compiles nothing."""
    return jax.jit(_stack, out_shardings=out_sharding)


def _stack(*layers: jax.Array) -> jax.Array:
    return jnp.stack(layers)


def read_tensors(
    directory: epath.Path,
    cfg: llama.LlamaConfig,
    targets: dict,
    shardings: dict,
    mesh: jax.sharding.Mesh,
    *,
    stats: LoadStats | None = None,
    dtype=None,
):
    """Yield (path in the model's pure dict, global array) for every tensor of `cfg`.

    Each array is placed straight into its sharding from `shardings`, every device's slice
    read on its own. Stacked layers (scan_layers) are read weight by weight, all layers of one
    before the next, so only one weight's pieces wait to be stacked beyond what the caller
    keeps. `targets` (pure dict of the model's abstract arrays) gives shapes and dtypes;
    `dtype` overrides the latter (merge.py reads the base in fp32).
    """
    files = weight_files(directory)
    stats = stats if stats is not None else LoadStats()
    readers = {
        file: safetensors_slices.SliceReader(file) for file in sorted(set(files.values()), key=str)
    }
    keys = list(expected_keys(cfg))
    if cfg.scan_layers:  # stable: a weight's layers stay in order, together
        group = {path: i for i, path in reversed(list(enumerate(k[1] for k in keys)))}
        keys.sort(key=lambda k: group[k[1]])
    stacked_pieces: dict = {}
    try:
        for name, path_in_model, transform, layer in keys:
            reader = readers[files[name]]
            full_path = model_path(cfg, path_in_model, layer)
            target = tree_get(targets, full_path)
            target_sharding = tree_get(shardings, full_path)
            stacked = cfg.scan_layers and layer is not None
            want = tuple(target.shape[1:] if stacked else target.shape)
            hf_shape = reader.shape(name)
            ours = jax.eval_shape(functools.partial(transform[0], h=cfg.head_dim), _spec(hf_shape))
            if ours.shape != want:
                raise CheckpointError(
                    f"{name}: checkpoint shape {hf_shape} gives {ours.shape} but the config "
                    f"expects {want}"
                )
            stats.bytes_total += math.prod(hf_shape) * reader.itemsize(name)
            if stacked:
                spec = jax.sharding.PartitionSpec(*target_sharding.spec[1:])
                piece_sharding = jax.sharding.NamedSharding(mesh, spec)
            else:
                piece_sharding = target_sharding
            piece = _read_placed(
                reader,
                name,
                transform,
                cfg.head_dim,
                want,
                dtype or target.dtype,
                piece_sharding,
                stats,
            )
            if stacked:
                stacked_pieces.setdefault(full_path, []).append(piece)
                if len(stacked_pieces[full_path]) == cfg.num_layers:
                    pieces = stacked_pieces.pop(full_path)
                    yield full_path, _stacker(target_sharding)(*pieces)
            else:
                yield full_path, piece
    finally:
        for reader in readers.values():
            reader.close()
