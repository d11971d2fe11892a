"""An int8 frozen base for LoRA (`model.base_dtype="int8"`, QLoRA-style with int8 codes).

Owns the format: each projection weight W [*in, *out] is stored as int8 codes plus an fp32 scale
per output channel, absmax over the input axes / 127 (symmetric, so zero stays exact). The scale
keeps size-1 input axes ([*1, *out]) so it broadcasts against the codes, stacked layers
included. Dequantised at use, in the compute dtype, inside the layer (remat recomputes it rather
than keeping a dequantised copy). Only the seven projections are quantised (about 96 % of a
Llama-2's weights); embeddings, norms and the output head stay in bf16.
"""

import functools

import jax
import jax.numpy as jnp

# How many leading axes of each projection weight are its input (contracted) axes.
NUM_IN_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
PARTS = {"attention": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}


def quantize(w: jax.Array, num_in: int, leading: int = 0) -> tuple[jax.Array, jax.Array]:
    """(int8 codes shaped like w, fp32 scale with the input axes kept at size 1).

    `leading`: axes before the weight's own (1 for layers stacked by scan).
    """
    in_axes = tuple(range(leading, leading + num_in))
    absmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=in_axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    codes = jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8)
    return codes, scale


def dequantize(codes: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    return codes.astype(dtype) * scale.astype(dtype)


def quantize_blocks(layers: dict, shardings: dict, stacked: bool) -> dict:
    """The `layers` subtree of a plain base's pure dict -> its int8 form (codes + `<name>_scale`)
    placed in `shardings` (the same subtree of the int8 model's shardings), one weight at a time
    so a bf16 copy of at most one weight is alive beside the codes."""
    blocks = [(layers, shardings)] if stacked else [(layers[i], shardings[i]) for i in layers]
    quantizers = {}  # one compiled function per weight name: every layer has its shape
    for block, block_shardings in blocks:
        for part, names in PARTS.items():
            for name in names:
                if name not in quantizers:
                    target = (block_shardings[part][name], block_shardings[part][f"{name}_scale"])
                    quantizers[name] = jax.jit(
                        functools.partial(quantize, num_in=NUM_IN_AXES[name], leading=int(stacked)),
                        out_shardings=target,
                    )
                codes, scale = quantizers[name](block[part][name])
                block[part][name], block[part][f"{name}_scale"] = codes, scale
    return layers
