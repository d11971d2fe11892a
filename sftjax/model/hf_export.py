"""Our NNX Llama -> a Hugging Face directory: weights, config, tokenizer, chat template; atomic.

Owns writing an export that `transformers.AutoModelForCausalLM.from_pretrained` loads as the
family it came from (hf_io.config_to_hf): safetensors shards (one tensor gathered at a time),
config.json, generation_config.json (the base's, its end-of-sequence ids kept), the tokenizer
files with the training format's chat template and BOS rule, and `sftjax_format.json`. A local
export is written into a temporary sibling directory renamed into place at the end; a gs://
export is uploaded beside its final name before replacing it; `published_together` puts a
merged model and its adapter in place only once both are written. `recover_export` repairs
what a kill midway left behind. The key table and layout transforms live in hf_io.py.
"""

import contextlib
import json
import logging
import math
import os
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from sftjax import paths
from sftjax.model import hf_io, llama, lora

log = logging.getLogger("sftjax")

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
    base_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    overwrite: bool = False,
    pending: list | None = None,
) -> pathlib.Path:
    """Write a directory `transformers.AutoModelForCausalLM.from_pretrained` loads, atomically.

    Tensors go out one at a time (gathered to process 0 for multi-host). `dtype` defaults to the
    parameter dtype. An existing `path` is replaced only with `overwrite=True`, and only after
    the new export is complete. With `tokenizer_dir`, the tokenizer is exported too (see
    export_tokenizer: `chat_template`, `add_bos`); `training_format` is written as JSON.
    `base_dir`: the HF model fine-tuned; its end-of-sequence ids and generation settings are
    kept (Llama-3.1 stops on three ids), with `eos_token_id` (the tokenizer's) added.
    `pending`: from published_together, which puts `path` in place with the others.
    """
    cfg: llama.LlamaConfig = model.cfg
    if cfg.lora_rank:
        raise ValueError(
            "save_pretrained writes a plain Llama: pass model/merge.py merge_lora(model)"
        )
    dtype = dtype or cfg.param_dtype
    with _staged(path, overwrite, pending) as staging:
        eos = eos_token_ids(base_dir, eos_token_id)
        generation = {
            **_base_generation(base_dir),
            "bos_token_id": bos_token_id,
            "eos_token_id": eos,
        }
        _write_model(model, staging, dtype, bos_token_id, generation, max_shard_bytes)
        if staging is None:  # not the writing process
            return paths.resolve(path)
        if tokenizer_dir is not None:
            export_tokenizer(tokenizer_dir, staging, chat_template=chat_template, add_bos=add_bos)
        if training_format is not None:
            (staging / TRAINING_FORMAT_FILE).write_text(json.dumps(training_format, indent=2))
    return paths.resolve(path)


@contextlib.contextmanager
def published_together():
    """Yield a list to pass as `pending=` to save_pretrained and save_adapter: inside the block
    they only write their staging directories, and only at its normal exit are all put in
    place, in the order written. If any write fails, none of the targets is replaced (a merged
    model and its adapter stay a pair). The staging directories are removed either way."""
    pending: list[tuple[pathlib.Path, epath.Path]] = []
    try:
        yield pending
        for staging, final in pending:
            _publish(staging, final)
    finally:
        for staging, final in pending:
            _discard(staging, final)


@contextlib.contextmanager
def _staged(path, overwrite: bool, pending: list | None = None):
    """Yield a local directory to fill (None on processes other than 0); at a normal exit it
    replaces `path` whole (renamed locally, uploaded to object storage), never half-written,
    or, given `pending` (see published_together), is queued there to be put in place later.
    Otherwise the staging directory is removed either way."""
    final = paths.resolve(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True to replace it")
    if jax.process_index() != 0:
        yield None
        return
    if paths.is_remote(final):  # written locally, then uploaded (no atomic rename there)
        staging = pathlib.Path(tempfile.mkdtemp(prefix="sftjax-export-")) / final.name
    else:
        staging = pathlib.Path(final).with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    queued = False
    try:
        staging.mkdir(parents=True)
        yield staging
        if pending is None:
            _publish(staging, final)
        else:
            pending.append((staging, final))
            queued = True
    finally:  # also when a write failed (a full disk): the space goes back, `path` is as it was
        if not queued:
            _discard(staging, final)


def _publish(staging: pathlib.Path, final: epath.Path) -> None:
    if paths.is_remote(final):
        _upload_dir(staging, final)
    else:
        _replace_dir(staging, pathlib.Path(final))


def _discard(staging: pathlib.Path, final: epath.Path) -> None:
    shutil.rmtree(staging.parent if paths.is_remote(final) else staging, ignore_errors=True)


def _read_json(directory, name: str) -> dict:
    file = None if not directory else paths.resolve(directory) / name
    return json.loads(file.read_text()) if file is not None and file.exists() else {}


def _base_generation(base_dir) -> dict:
    """The base model's generation_config.json (sampling defaults), {} without one."""
    return _read_json(base_dir, "generation_config.json")


def eos_token_ids(base_dir, tokenizer_eos: int) -> int | list[int]:
    """The base's end-of-sequence ids (generation_config.json's, what `generate` stops on; else
    config.json's) plus the training tokenizer's when missing; one id stays an int, as
    transformers writes it."""
    value = _read_json(base_dir, "generation_config.json").get("eos_token_id")
    if value is None:
        value = _read_json(base_dir, "config.json").get("eos_token_id")
    ids = [int(i) for i in (value if isinstance(value, list) else [] if value is None else [value])]
    if tokenizer_eos is not None and tokenizer_eos not in ids:
        ids.append(int(tokenizer_eos))
    return ids[0] if len(ids) == 1 else ids


def _write_model(model, staging, dtype: str, bos_token_id, generation, max_shard_bytes) -> None:
    """Safetensors shards (+ index), config.json and generation_config.json into `staging`.

    Every process takes part (multi-host gathers are collective); only process 0 writes.
    """
    cfg = model.cfg
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    entries = list(hf_io.expected_keys(cfg))
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
            leaf = hf_io.tree_get(params, hf_io.model_path(cfg, path_in_model, layer))
            if cfg.scan_layers and layer is not None:
                leaf = leaf[layer]
            host = to_hf(_to_host(leaf), cfg.head_dim).astype(jnp.dtype(dtype))
            tensors[name] = np.ascontiguousarray(host)
            weight_map[name] = file_name
            total += host.nbytes
        if staging is not None:
            safetensors.numpy.save_file(tensors, staging / file_name, metadata={"format": "pt"})
    if staging is None:
        return
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf_config = hf_io.config_to_hf(
        cfg, dtype=dtype, bos_token_id=bos_token_id, eos_token_id=generation["eos_token_id"]
    )
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2))
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))


def save_adapter(
    model: llama.Llama,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str = "",
    dtype: str = "float32",
    overwrite: bool = False,
    pending: list | None = None,
) -> pathlib.Path:
    """A PEFT LoRA adapter directory: adapter_config.json + adapter_model.safetensors.

    `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)` loads
    it for every family (Llama, Mistral, Qwen2 and Qwen3 name their projections alike).
    PEFT's lora_A.weight is [r, in] and lora_B.weight is [out, r] with HF's flattening of heads
    (q_proj's out = heads × head_dim, o_proj's in likewise), so A [*in, r] -> reshape(-1, r).T
    and B [r, *out] -> reshape(r, -1).T. Replaced atomically like save_pretrained (`pending`
    likewise).
    """
    cfg: llama.LlamaConfig = model.cfg
    if not cfg.lora_rank:
        raise ValueError("save_adapter needs a model with LoRA adapters (model.lora.rank > 0)")
    # Gathered to the host once (70B rank 16: 0.8 GB in fp32), not once per stacked layer.
    adapters = jax.tree.map(_to_host, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    tensors = {}
    for layer in range(cfg.num_layers):
        block = adapters["layers"] if cfg.scan_layers else adapters["layers"][layer]
        for part in ("attention", "mlp"):
            # A part with no targeted projection holds no LoRAParam, so no entry at all.
            for name, adapter in block.get(part, {}).get("lora", {}).items():
                a, b = adapter["a"], adapter["b"]
                if cfg.scan_layers:
                    a, b = a[layer], b[layer]
                prefix = f"base_model.model.model.layers.{layer}.{lora.HF_MODULES[name]}"
                rank = cfg.lora_rank
                for key, value in (
                    ("lora_A", a.reshape(-1, rank).T),
                    ("lora_B", b.reshape(rank, -1).T),
                ):
                    tensors[f"{prefix}.{key}.weight"] = np.ascontiguousarray(
                        value.astype(jnp.dtype(dtype))
                    )
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(lora.HF_MODULES[t].split(".")[-1] for t in cfg.lora_targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    with _staged(path, overwrite, pending) as staging:
        if staging is None:
            return paths.resolve(path)
        safetensors.numpy.save_file(
            tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"}
        )
        (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return paths.resolve(path)


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
        raise hf_io.CheckpointError(
            f"{source}: could not make the exported tokenizer add BOS={bos!r} as training did"
        )


def _plan_shards(cfg, params, entries, itemsize: int, max_bytes: int) -> list[list]:
    """Group tensors in table order into files of at most `max_bytes` (from shapes alone)."""
    shards, current, size = [], [], 0
    for entry in entries:
        _, path_in_model, _, layer = entry
        shape = hf_io.tree_get(params, hf_io.model_path(cfg, path_in_model, layer)).shape
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
