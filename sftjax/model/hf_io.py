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

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import shutil
import struct
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from sftjax import paths, sharding
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
log = logging.getLogger("sftjax")
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


def weight_files(directory: epath.Path) -> dict[str, epath.Path]:
    """HF tensor name -> safetensors file holding it (single file or sharded with an index)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if single.exists():
        return {name: single for name in _SafetensorsFile(single).names()}
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


@dataclasses.dataclass
class LoadStats:
    """What one process read: the bytes of the tensor slices its devices hold, of the total."""

    bytes_read: int = 0
    bytes_total: int = 0


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

    stats = stats if stats is not None else LoadStats()
    readers = {file: _SafetensorsFile(file) for file in sorted(set(files.values()), key=str)}
    loaded: dict = {}
    stacked_pieces: dict = {}
    for name, path_in_model, transform, layer in _expected_keys(cfg):
        reader = readers[files[name]]
        full_path = _model_path(cfg, path_in_model, layer)
        target = _get(targets, full_path)
        target_sharding = _get(shardings, full_path)
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
            reader, name, transform, cfg.head_dim, want, target.dtype, piece_sharding, stats
        )
        if stacked:
            stacked_pieces.setdefault(full_path, []).append(piece)
            if len(stacked_pieces[full_path]) == cfg.num_layers:
                pieces = stacked_pieces.pop(full_path)
                stack = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=target_sharding)
                _set(loaded, full_path, stack(*pieces))
        else:
            _set(loaded, full_path, piece)
    for reader in readers.values():
        reader.close()
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
}


class _SafetensorsFile:
    """Reads slices of tensors in one .safetensors file, local (memory-mapped) or remote.

    Locally, safetensors' own `get_slice` maps the file and copies only the slice. From object
    storage, the header is parsed here (8-byte length, JSON of dtype / shape / byte offsets)
    and the byte span covering the slice is fetched with one ranged read.
    """

    def __init__(self, path: epath.Path):
        self.path = path
        self._remote = paths.is_remote(path)
        if self._remote:
            with path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                self._header = json.loads(f.read(length))
            self._data_start = 8 + length
            self._header.pop("__metadata__", None)
            self._file = None
        else:
            self._file = safetensors.safe_open(os.fspath(path), framework="numpy")
            self._handle = self._file.__enter__()

    def names(self) -> list[str]:
        return list(self._header) if self._remote else list(self._handle.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        if self._remote:
            return tuple(self._header[name]["shape"])
        return tuple(self._handle.get_slice(name).get_shape())

    def itemsize(self, name: str) -> int:
        dtype = (
            self._header[name]["dtype"]
            if self._remote
            else self._handle.get_slice(name).get_dtype()
        )
        return _DTYPES[dtype].itemsize

    def read(self, name: str, index: tuple, stats: LoadStats) -> np.ndarray:
        """The tensor's [index] (a tuple of unit-step slices over its leading axes)."""
        shape = self.shape(name)
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape, strict=False))
        index += tuple(slice(0, n) for n in shape[len(index) :])
        if not self._remote:
            value = self._handle.get_slice(name)[index]
            stats.bytes_read += value.nbytes
            return value
        info = self._header[name]
        dtype = _DTYPES[info["dtype"]]
        strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
        first = sum(s.start * st for s, st in zip(index, strides, strict=True))
        last = sum((s.stop - 1) * st for s, st in zip(index, strides, strict=True))
        with self.path.open("rb") as f:
            f.seek(self._data_start + info["data_offsets"][0] + first * dtype.itemsize)
            span = np.frombuffer(f.read((last - first + 1) * dtype.itemsize), dtype=dtype)
        stats.bytes_read += span.nbytes
        view = np.lib.stride_tricks.as_strided(
            span,
            shape=tuple(s.stop - s.start for s in index),
            strides=tuple(st * dtype.itemsize for st in strides),
        )
        return view.copy()

    def close(self) -> None:
        if self._file is not None:
            self._file.__exit__(None, None, None)


_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
}


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
    final = paths.resolve(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True to replace it")
    is_writer = jax.process_index() == 0
    remote = paths.is_remote(final)
    if remote:  # written locally, then uploaded (object storage has no atomic rename)
        staging = pathlib.Path(tempfile.mkdtemp(prefix="sftjax-export-")) / final.name
    else:
        staging = pathlib.Path(final).with_name(f".{final.name}.tmp-{os.getpid()}")
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
    if remote:
        _upload_dir(staging, final)
        shutil.rmtree(staging.parent)
    else:
        _replace_dir(staging, pathlib.Path(final))
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
        file = paths.resolve(source) / name  # local or gs://
        if file.exists():
            file.copy(epath.Path(target / name), overwrite=True)
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


def _upload_dir(staging: pathlib.Path, final: epath.Path) -> None:
    """Publish a finished export to object storage; a complete copy exists at every instant.

    The export is uploaded beside `final` first; only then is the old one deleted and the new
    one copied into place, so a kill leaves either `final` or the complete `.tmp` sibling.
    """
    uploaded = final.parent / f".{final.name}.tmp-{os.getpid()}"
    paths.remove_tree(uploaded)
    paths.upload_tree(staging, uploaded)
    paths.remove_tree(final)
    paths.upload_tree(staging, final)
    paths.remove_tree(uploaded)


def recover_export(path) -> None:
    """Undo what an export killed midway left behind (call before exporting again).

    Locally, a kill between `_replace_dir`'s two renames leaves the previous export, complete,
    under its `.old` name: it is put back. In object storage the `.tmp` upload is complete
    whenever the final one is missing (see `_upload_dir`): it is kept and named in a warning.
    Every other leftover is removed.
    """
    final = paths.resolve(path)
    if not final.parent.exists():
        return
    old = sorted(final.parent.glob(f".{final.name}.old-*"), key=os.fspath)
    if old and not final.exists():
        log.warning("restoring the previous export %s (a replacement was interrupted)", old[-1])
        old.pop().rename(final)
    for leftover in old + list(final.parent.glob(f".{final.name}.tmp-*")):
        if paths.is_remote(final) and not final.exists():
            log.warning("%s is missing; a complete copy of it is at %s", final, leftover)
            continue
        log.info("removing %s (left by an interrupted export)", leftover)
        paths.remove_tree(leftover)


def _replace_dir(staging: pathlib.Path, final: pathlib.Path) -> None:
    """Rename the finished export into place; an old one is removed only after that succeeds."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old)
    else:
        staging.rename(final)
