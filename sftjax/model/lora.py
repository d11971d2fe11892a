"""LoRA: a trainable low-rank update beside each frozen projection, y = x W + dropout(x) A B · α/r.

Owns the adapter module, its initialisation (PEFT's: A uniform in ±1/sqrt(fan_in), B zero, so
the first forward equals the base model exactly), the names of the targets, and merging A B
back into W for export. The adapters are `nnx.LoRAParam` variables (a subclass of `nnx.Param`)
with logical axis names, so one `nnx.split(model, nnx.LoRAParam, ...)` separates what trains
from the frozen base, and the mesh rules shard them like the weights they adapt. Why not
`nnx.LoRA` itself: it wraps a 2-D Linear kernel, and our projections are einsums over head-
shaped weights ([D, N, H], [N, H, D]); the variable type is what the rest of sftjax needs.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

# Our projection names, in a fixed order (each target's dropout key is folded from its index).
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Hugging Face module names of the same projections (PEFT's target_modules).
HF_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def parse_targets(spec) -> tuple[str, ...]:
    """'q,v', ('q', 'v') or 'all' -> ('q', 'v') in TARGETS order; unknown names refused.

    PEFT's module names are accepted too ('q_proj,v_proj'; 'all-linear': every projection).
    """
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    peft_names = {module.split(".")[-1]: ours for ours, module in HF_MODULES.items()}
    names = [peft_names.get(n, n) for n in names if n]
    if names in (["all"], ["all-linear"]):
        return TARGETS
    unknown = sorted(set(names) - set(TARGETS))
    if unknown or not names:
        raise ValueError(
            f"lora targets {unknown or names!r}: choose from {', '.join(TARGETS)} (or 'all')"
        )
    return tuple(t for t in TARGETS if t in names)


def num_params(cfg) -> int:
    """Adapter parameters of a LlamaConfig: rank · (in + out) per targeted weight per layer."""
    d, f, h = cfg.embed_dim, cfg.mlp_dim, cfg.head_dim
    q, kv = cfg.num_heads * h, cfg.num_kv_heads * h
    sizes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d)}
    sizes.update(gate=(d, f), up=(d, f), down=(f, d))
    per_layer = sum(sum(sizes[t]) for t in cfg.lora_targets)
    return cfg.num_layers * cfg.lora_rank * per_layer


def _mask_key(rng: jax.Array) -> jax.Array:
    """An `unsafe_rbg` key made from a (threefry) key's bits, for the dropout masks.

    XLA's RngBitGenerator draws a [B, L, D] mask far cheaper to compile than threefry's
    unrolled hash: the TPU compile of the 7B LoRA step for one v5p chip took 346 s with
    threefry masks and 30 s with rbg ones (70B on 4 chips: 438 s and 37 s), for 0.8 and 2.6
    GiB more temporaries. The masks stay a pure function of the key, so a resume on the same
    mesh is exact; under another sharding they may differ (the loss is then another sample).
    """
    data = (
        jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    )
    return jax.random.wrap_key_data(
        jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)]), impl="unsafe_rbg"
    )


class Adapter(nnx.Module):
    """The low-rank path of one projection whose weight is [*in_shape, *out_shape].

    A is [*in_shape, r] and B is [r, *out_shape]; the input's trailing len(in_shape) axes are
    contracted with A. Computed in the input's dtype, like the projection it sits beside.
    """

    def __init__(self, in_axes, out_axes, *, rank, alpha, dropout, dtype, rngs: nnx.Rngs):
        """in_axes / out_axes: ((size, logical name), ...) of the adapted weight's axes."""
        in_shape = tuple(size for size, _ in in_axes)
        out_shape = tuple(size for size, _ in out_axes)
        bound = 1.0 / math.sqrt(math.prod(in_shape))  # kaiming_uniform(a=sqrt(5)), as PEFT
        self.a = nnx.LoRAParam(
            jax.random.uniform(rngs.params(), (*in_shape, rank), jnp.dtype(dtype), -bound, bound),
            out_sharding=(*(name for _, name in in_axes), "lora_rank"),
        )
        self.b = nnx.LoRAParam(
            jnp.zeros((rank, *out_shape), jnp.dtype(dtype)),
            out_sharding=("lora_rank", *(name for _, name in out_axes)),
        )
        self.scale = alpha / rank
        self.dropout = dropout

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """The update to add to the projection of x; dropout only when an rng is given."""
        dt = x.dtype
        if rng is not None and self.dropout > 0:
            keep = jax.random.bernoulli(_mask_key(rng), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(dt)
        low_rank = jnp.tensordot(x, self.a[...].astype(dt), axes=self.a.ndim - 1)
        return jnp.tensordot(low_rank, self.b[...].astype(dt), axes=1) * jnp.asarray(self.scale, dt)

    def delta_weight(self) -> jax.Array:
        """A B · α/r in fp32, shaped like the adapted weight: what merging adds to it."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        return jnp.tensordot(a, b, axes=1) * self.scale
