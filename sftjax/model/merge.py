"""A LoRA model as the plain Llama it computes: what the Hugging Face export writes.

Owns merging W + A B · α/r (and dequantising an int8 base) weight by weight, in fp32, into the
export dtype. The adapters themselves live in lora.py, the int8 format in int8.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sftjax.model import int8, llama


def merge_lora(model: llama.Llama, dtype: str = "float32") -> llama.Llama:
    """The same function as a plain Llama (no adapters): W + A B · α/r, same shardings.

    What the Hugging Face export writes; a model without adapters is returned as it is. Each
    adapted or int8 weight is merged in fp32 and stored in `dtype`, one at a time, so the peak
    is the frozen base plus one fp32 weight (70B on 4 chips has no room for an fp32 copy);
    weights that neither carry an adapter nor need dequantising are shared, not copied.
    """
    cfg = model.cfg
    if not cfg.lora_rank:
        return model
    params = nnx.to_pure_dict(nnx.state(model))
    delta = lambda a, b: jnp.tensordot(a, b, axes=1) * (cfg.lora_alpha / cfg.lora_rank)  # noqa: E731
    delta = jax.vmap(delta) if cfg.scan_layers else delta

    def merged(weight, scale, adapter):
        """(codes x scale or W) + A B · α/r in fp32, stored in `dtype`."""
        weight = weight.astype(jnp.float32) * (1.0 if scale is None else scale)
        if adapter is not None:
            weight = weight + delta(adapter["a"], adapter["b"])
        return weight.astype(dtype)

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
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    plain = dataclasses.replace(cfg, lora_rank=0, param_dtype=dtype)
    graphdef, state = nnx.split(llama.abstract(plain, mesh))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
