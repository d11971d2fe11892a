"""A LoRA model as the plain Llama it computes: what the Hugging Face export writes.

Owns merging W + A B · α/r weight by weight, in fp32, into the export dtype. W is the base as
stored in model.hf_path when there is one, read again slice by slice (hf_io.read_tensors): the
resident base was rounded to model.base_dtype (bf16, or int8 codes), and merging from it would
export that rounding (3.6e-3 relative logits from an fp32 base in bf16) where PEFT's
base + adapter has none. A random-init base exists only resident, so it is merged from there
(int8 dequantised). The adapters themselves live in lora.py, the int8 format in int8.py.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from sftjax import paths
from sftjax.model import hf_io, int8, llama


def merge_lora(
    model: llama.Llama, dtype: str = "float32", base_path: str | os.PathLike = ""
) -> llama.Llama:
    """The same function as a plain Llama (no adapters): W + A B · α/r, same shardings.

    What the Hugging Face export writes; a model without adapters is returned as it is. Each
    weight is merged in fp32 and stored in `dtype`, one at a time, so the peak is the frozen
    base plus the export plus one fp32 weight (70B on 4 chips has no room for an fp32 copy).
    `base_path`: the Hugging Face directory the base was read from; every weight, adapted or
    not (norms, embeddings, any a family adds), then comes from its stored values. Without it,
    weights that neither carry an adapter nor need dequantising are shared, not copied.
    """
    cfg = model.cfg
    if not cfg.lora_rank:
        return model
    params = nnx.to_pure_dict(nnx.state(model))
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    plain = dataclasses.replace(cfg, lora_rank=0, param_dtype=dtype)
    graphdef, state = nnx.split(llama.abstract(plain, mesh))
    merged = _merge_stored if base_path else _merge_resident
    nnx.replace_by_pure_dict(state, merged(cfg, params, dtype, base_path, state, mesh))
    return nnx.merge(graphdef, state)


def _merger(cfg: llama.LlamaConfig, dtype: str):
    """(W or codes, scale or None, adapter {a, b} or None) -> (W x scale + A B · α/r) in dtype."""
    delta = lambda a, b: jnp.tensordot(a, b, axes=1) * (cfg.lora_alpha / cfg.lora_rank)  # noqa: E731
    delta = jax.vmap(delta) if cfg.scan_layers else delta

    def merged(weight, scale, adapter):
        weight = weight.astype(jnp.float32) * (1.0 if scale is None else scale)
        if adapter is not None:
            weight = weight + delta(adapter["a"], adapter["b"])
        return weight.astype(dtype)

    return merged


def _merge_resident(cfg, params: dict, dtype: str, base_path, state, mesh) -> dict:
    """The resident base (int8 dequantised) + adapters; other weights shared as they are."""
    merged = _merger(cfg, dtype)
    layers = params["layers"]
    for block in [layers] if cfg.scan_layers else layers.values():
        for part, names in int8.PARTS.items():
            adapters = block[part].pop("lora", {})
            for name in names:
                scale = block[part].pop(f"{name}_scale", None)
                if scale is None and name not in adapters:
                    continue
                weight = block[part][name]
                merge = jax.jit(merged, out_shardings=weight.sharding)
                block[part][name] = merge(weight, scale, adapters.get(name))
    return params


def _merge_stored(cfg, params: dict, dtype: str, base_path, state, mesh) -> dict:
    """Every tensor of the stored base, read in fp32 into the resident weight's sharding, plus
    its adapter where it has one; the key table (hf_io) says which tensors there are."""
    merged = _merger(cfg, dtype)
    targets = nnx.to_pure_dict(state)
    shardings = jax.tree_util.tree_map_with_path(
        lambda path, _: hf_io.tree_get(params, tuple(k.key for k in path)).sharding, targets
    )
    plain = dataclasses.replace(cfg, lora_rank=0)
    out: dict = {}
    stored = hf_io.read_tensors(
        paths.resolve(base_path), plain, targets, shardings, mesh, dtype=jnp.float32
    )
    for path, weight in stored:
        parent = hf_io.tree_get(params, path[:-1])
        adapter = parent.get("lora", {}).get(path[-1]) if isinstance(parent, dict) else None
        merge = jax.jit(merged, out_shardings=weight.sharding)
        hf_io.tree_set(out, path, merge(weight, None, adapter))
    return out
