"""Flax NNX Llama: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Owns the architecture and the logical axis names of every parameter. It does not own how those
names map to devices (sharding.py), the Hugging Face key table (model/hf_io.py) nor the rotary
frequencies (model/rope.py). The families people fine-tune (Llama 2/3, Mistral, Qwen2/2.5,
Qwen3) are this one architecture with a few LlamaConfig fields set: q/k/v biases (Qwen2), an
RMSNorm over each head's q and k (Qwen3), a rope scaling kind (Llama 3.1, long-context
checkpoints) and a sliding attention window (Mistral); nothing else branches on the family.

Shape legend: B batch, L seq, D embed, N q-heads, K kv-heads, H head_dim, F mlp, V vocab.
Calling convention: `model(tokens_BL, positions_BL, segment_ids_BL) -> logits_BLV`; positions
restart at 0 for each packed example and segment id 0 marks padding.
Decoding passes a `Cache` as well: `model(tokens_BL, positions_BL, segment_ids_BL, cache)
-> (logits_BLV, cache)`, the chunk's keys and values written at cache slots [end, end + L).
"""

import dataclasses
import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from sftjax import sharding
from sftjax.model import attention, int8, lora, rope

Remat = Literal["none", "full", "save_dots"]
# HF model_type (written back on export) -> its fixed (qkv_bias, qk_norm) in transformers.
MODEL_TYPES = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics; `LlamaConfig(**config.model)` minus the keys that aren't ours."""

    vocab_size: int
    embed_dim: int
    mlp_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_seq_len: int
    head_dim: int | None = None  # None: embed_dim // num_heads (every Llama-2 size)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    param_dtype: str = "float32"  # master weights
    dtype: str = "bfloat16"  # matmul / activation compute
    scan_layers: bool = False
    remat: Remat = "none"
    attention: str = "xla"  # model/attention.py CHOICES; "auto" picks by platform at trace time
    init_std: float = 0.02
    # Family fields (hf_io reads them from config.json; hf_export writes them back).
    model_type: str = "llama"  # one of MODEL_TYPES
    qkv_bias: bool = False  # biases on q, k and v (Qwen2 / Qwen2.5), not on o or the MLP
    qk_norm: bool = False  # RMSNorm over each head's q and k before rotary (Qwen3)
    # HF's own dict spelling ({"rope_type": "llama3", "factor": 8.0, ...}); None = plain RoPE.
    # Stored as a sorted tuple of items so the config stays hashable; read it as `rope_dict`.
    rope_scaling: dict | None = None
    sliding_window: int | None = None  # a query sees itself and the window - 1 keys before it
    # LoRA (model/lora.py): rank 0 = full fine-tuning. Under LoRA only the adapters train (in
    # param_dtype); the frozen base weights are held in base_dtype ("int8": model/int8.py).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = lora.TARGETS
    lora_dropout: float = 0.0
    base_dtype: str = "bfloat16"

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", lora.parse_targets(self.lora_targets))
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}: choose one of {list(MODEL_TYPES)}")
        if (self.qkv_bias, self.qk_norm) != MODEL_TYPES[self.model_type]:
            bias, norm = MODEL_TYPES[self.model_type]
            raise ValueError(
                f"model_type={self.model_type!r} has qkv_bias={bias}, qk_norm={norm} in "
                f"transformers, not {self.qkv_bias}, {self.qk_norm}: the export would differ"
            )
        if self.sliding_window is not None and self.model_type == "llama":
            raise ValueError("model_type='llama' has no sliding window; use 'mistral'")
        scaling = self.rope_scaling
        if scaling is not None and not isinstance(scaling, tuple):
            scaling = tuple(sorted(dict(scaling).items())) or None
        object.__setattr__(self, "rope_scaling", scaling)
        rope.check(self.rope_dict)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window}: need >= 1, or None (off)")
        if self.base_dtype not in ("float32", "bfloat16", "int8"):
            raise ValueError(f"base_dtype={self.base_dtype!r}: choose float32, bfloat16 or int8")
        if self.lora_rank < 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError(
                f"lora rank={self.lora_rank}, alpha={self.lora_alpha}, dropout="
                f"{self.lora_dropout}: need rank >= 0 (0 = off), alpha > 0, 0 <= dropout < 1"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None:
            if self.embed_dim % self.num_heads:
                raise ValueError(f"embed_dim={self.embed_dim} not divisible by {self.num_heads=}")
            object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def rope_dict(self) -> dict | None:
        """rope_scaling as HF's dict (None: plain RoPE)."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def quantized_base(self) -> bool:
        """LoRA over int8 projection weights (codes + per-channel scales)."""
        return bool(self.lora_rank) and self.base_dtype == "int8"

    @property
    def weights_dtype(self) -> str:
        """dtype of the base weights: frozen ones (LoRA) in base_dtype, else param_dtype.

        Under an int8 base, what is not quantised (embeddings, norms, head) is bf16.
        """
        if not self.lora_rank:
            return self.param_dtype
        return "bfloat16" if self.base_dtype == "int8" else self.base_dtype

    @property
    def num_params(self) -> int:
        """Exact parameter count (no int32 overflow: pure Python ints)."""
        d, f, n, k = self.embed_dim, self.mlp_dim, self.num_heads, self.num_kv_heads
        h = self.head_dim
        attn = d * n * h * 2 + d * k * h * 2
        attn += (n * h + 2 * k * h) * self.qkv_bias + 2 * h * self.qk_norm
        block = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * block + d + head


_LLAMA2 = dict(vocab_size=32000, max_seq_len=4096, norm_eps=1e-5, rope_theta=10000.0)
_LLAMA3 = dict(
    vocab_size=128256,
    max_seq_len=131072,
    norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=dict(  # Llama-3.1's long-context rescaling of the rotary frequencies
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)
PRESETS = {
    "llama2_7b": dict(
        _LLAMA2, embed_dim=4096, mlp_dim=11008, num_layers=32, num_heads=32, num_kv_heads=32
    ),
    "llama2_13b": dict(
        _LLAMA2, embed_dim=5120, mlp_dim=13824, num_layers=40, num_heads=40, num_kv_heads=40
    ),
    "llama2_70b": dict(
        _LLAMA2, embed_dim=8192, mlp_dim=28672, num_layers=80, num_heads=64, num_kv_heads=8
    ),
    "tiny": dict(
        vocab_size=512,
        embed_dim=64,
        mlp_dim=172,
        num_layers=2,
        num_heads=8,
        num_kv_heads=4,
        max_seq_len=512,
    ),
    "demo": dict(
        vocab_size=512,
        embed_dim=128,
        mlp_dim=384,
        num_layers=3,
        num_heads=4,
        num_kv_heads=4,
        max_seq_len=512,
    ),
    # Shapes of the public Hugging Face config.json files (Llama-3.1-8B, Llama-3.1/3.3-70B,
    # Qwen3-8B): random init and the planner use them; with hf_path set, config.json decides.
    "llama3_8b": dict(
        _LLAMA3, embed_dim=4096, mlp_dim=14336, num_layers=32, num_heads=32, num_kv_heads=8
    ),
    "llama3_70b": dict(
        _LLAMA3, embed_dim=8192, mlp_dim=28672, num_layers=80, num_heads=64, num_kv_heads=8
    ),
    "qwen3_8b": dict(
        vocab_size=151936,
        embed_dim=4096,
        mlp_dim=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_seq_len=40960,
        rope_theta=1e6,
        norm_eps=1e-6,
        model_type="qwen3",
        qk_norm=True,
    ),
}


def preset(name: str, **overrides) -> LlamaConfig:
    """A named architecture, e.g. preset("llama2_7b", scan_layers=True)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})


@struct.dataclass
class Cache:
    """Every layer's keys and values for generation; slot s of a row holds its s-th written token.

    `segment_ids` marks real tokens (1, or any id > 0) and padding or unwritten slots (0), so
    prompts of different lengths can share slots by left-padding. Layers are stacked on the
    leading axis whether or not the model scans its layers.
    """

    k: jax.Array  # [layers, B, S, K, H], keys after rotary
    v: jax.Array  # [layers, B, S, K, H]
    segment_ids: jax.Array  # [B, S] int32
    end: jax.Array  # int32 scalar: slots [0, end) are written


def init_cache(cfg: LlamaConfig, batch_size: int, length: int) -> Cache:
    """An empty cache of `length` slots per row, in the compute dtype."""
    shape = (cfg.num_layers, batch_size, length, cfg.num_kv_heads, cfg.head_dim)
    return Cache(
        k=jnp.zeros(shape, jnp.dtype(cfg.dtype)),
        v=jnp.zeros(shape, jnp.dtype(cfg.dtype)),
        segment_ids=jnp.zeros((batch_size, length), jnp.int32),
        end=jnp.zeros((), jnp.int32),
    )


class LayerCache(NamedTuple):
    """One layer's view of a Cache: its own k/v plus the shared slot segment ids and write slot."""

    k_BSKH: jax.Array
    v_BSKH: jax.Array
    segment_ids_BS: jax.Array  # already includes the chunk being written
    start: jax.Array


def _param(rngs: nnx.Rngs, cfg: LlamaConfig, shape, names, std: float) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, dtype=jnp.dtype(cfg.weights_dtype))
    return nnx.Param(value, out_sharding=names)


def _projection(rngs: nnx.Rngs, cfg: LlamaConfig, shape, names, std: float, num_in: int):
    """(weight, per-output-channel scale): int8 codes and their scale under an int8 base,
    else the plain weight and None."""
    if not cfg.quantized_base:
        return _param(rngs, cfg, shape, names, std), None
    codes, scale = int8.quantize(std * jax.random.normal(rngs.params(), shape), num_in)
    scale_names = (None,) * num_in + tuple(names[num_in:])  # size-1 input axes: never split
    return nnx.Param(codes, out_sharding=names), nnx.Param(scale, out_sharding=scale_names)


def _adapters(cfg: LlamaConfig, rngs: nnx.Rngs, weights: dict) -> nnx.Dict:
    """A LoRA adapter for each of `weights` (name -> (in axes, out axes)) that cfg targets."""
    return nnx.Dict(
        {
            name: lora.Adapter(
                in_axes,
                out_axes,
                rank=cfg.lora_rank,
                alpha=cfg.lora_alpha,
                dropout=cfg.lora_dropout,
                dtype=cfg.param_dtype,
                rngs=rngs,
            )
            for name, (in_axes, out_axes) in weights.items()
            if cfg.lora_rank and name in cfg.lora_targets
        }
    )


def _project(module: nnx.Module, name: str, spec: str, x, rng):
    """einsum(spec, x, weight `name`) plus its LoRA update when `name` has an adapter."""
    weight, scale = getattr(module, name)[...], getattr(module, f"{name}_scale")
    if scale is None:
        weight = weight.astype(x.dtype)
    else:  # int8 base: dequantised here, at use
        weight = int8.dequantize(weight, scale[...], x.dtype)
    y = jnp.einsum(spec, x, weight)
    if name in module.lora:
        key = None if rng is None else jax.random.fold_in(rng, lora.TARGETS.index(name))
        y = y + module.lora[name](x, key)
    return y


class RMSNorm(nnx.Module):
    """x / rms(x) * w over the last axis (embed, or head_dim for Qwen3's q/k norms),
    normalised in fp32 then cast back before the scale (as HF does)."""

    def __init__(self, cfg: LlamaConfig, size: int | None = None):
        self.eps = cfg.norm_eps
        self.weight = nnx.Param(
            jnp.ones((size or cfg.embed_dim,), jnp.dtype(cfg.weights_dtype)),
            out_sharding=("norm",),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        weight = self.weight[...].astype(x.dtype)
        return normed.astype(x.dtype) * weight.reshape((1,) * (x.ndim - 1) + weight.shape)


@functools.cache
def _rope_tables(cfg: LlamaConfig):
    """(inverse frequencies, cos/sin scale): numpy constants, computed once per config."""
    return rope.inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_dict)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, n, k, h, std = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.init_std
        self.cfg = cfg
        self.q, self.q_scale = _projection(
            rngs, cfg, (d, n, h), ("embed", "heads", "head_dim"), std, 1
        )
        self.k, self.k_scale = _projection(
            rngs, cfg, (d, k, h), ("embed", "kv_heads", "head_dim"), std, 1
        )
        self.v, self.v_scale = _projection(
            rngs, cfg, (d, k, h), ("embed", "kv_heads", "head_dim"), std, 1
        )
        self.o, self.o_scale = _projection(
            rngs, cfg, (n, h, d), ("heads", "head_dim", "embed"), std, 2
        )
        # Biases and q/k norms are never quantised nor adapted: under LoRA they stay frozen.
        zeros = lambda shape, names: nnx.Param(  # noqa: E731
            jnp.zeros(shape, jnp.dtype(cfg.weights_dtype)), out_sharding=names
        )
        self.q_bias = zeros((n, h), ("heads", "head_dim")) if cfg.qkv_bias else None
        self.k_bias = zeros((k, h), ("kv_heads", "head_dim")) if cfg.qkv_bias else None
        self.v_bias = zeros((k, h), ("kv_heads", "head_dim")) if cfg.qkv_bias else None
        self.q_norm = RMSNorm(cfg, h) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg, h) if cfg.qk_norm else None
        embed, heads, kv_heads = (
            ((d, "embed"),),
            ((n, "heads"), (h, "head_dim")),
            ((k, "kv_heads"), (h, "head_dim")),
        )
        self.lora = _adapters(
            cfg,
            rngs,
            {
                "q": (embed, heads),
                "k": (embed, kv_heads),
                "v": (embed, kv_heads),
                "o": (heads, embed),
            },
        )

    def __call__(
        self, x_BLD, positions_BL, segment_ids_BL, cache: LayerCache | None = None, rng=None
    ):
        """Output [B, L, D] and, with a cache, the cache holding this chunk's keys and values.

        `rng`: LoRA dropout's key (training only); None runs without dropout.
        """
        dt = x_BLD.dtype
        q_BLNH = _project(self, "q", "bld,dnh->blnh", x_BLD, rng)
        k_BLKH = _project(self, "k", "bld,dkh->blkh", x_BLD, rng)
        v_BLKH = _project(self, "v", "bld,dkh->blkh", x_BLD, rng)
        if self.cfg.qkv_bias:
            q_BLNH = q_BLNH + self.q_bias[...].astype(dt)[None, None]
            k_BLKH = k_BLKH + self.k_bias[...].astype(dt)[None, None]
            v_BLKH = v_BLKH + self.v_bias[...].astype(dt)[None, None]
        if self.cfg.qk_norm:
            q_BLNH, k_BLKH = self.q_norm(q_BLNH), self.k_norm(k_BLKH)
        q_BLNH = sharding.constrain(q_BLNH, ("batch", "seq", "heads", None))
        inv_freq, scale = _rope_tables(self.cfg)
        q_BLNH = rope.rotate(q_BLNH, positions_BL, inv_freq, scale)
        k_BLKH = rope.rotate(k_BLKH, positions_BL, inv_freq, scale)
        window = self.cfg.sliding_window
        if cache is None:
            out_BLNH = attention.attend(
                q_BLNH,
                k_BLKH,
                v_BLKH,
                segment_ids_BL,
                window=window,
                implementation=self.cfg.attention,
            )
        else:
            k_BSKH = jax.lax.dynamic_update_slice_in_dim(
                cache.k_BSKH, k_BLKH.astype(cache.k_BSKH.dtype), cache.start, axis=1
            )
            v_BSKH = jax.lax.dynamic_update_slice_in_dim(
                cache.v_BSKH, v_BLKH.astype(cache.v_BSKH.dtype), cache.start, axis=1
            )
            cache = cache._replace(k_BSKH=k_BSKH, v_BSKH=v_BSKH)
            out_BLNH = attention.attend(
                q_BLNH,
                k_BSKH.astype(dt),
                v_BSKH.astype(dt),
                segment_ids_BL,
                kv_segment_ids_BS=cache.segment_ids_BS,
                q_start=cache.start,
                window=window,
                implementation=self.cfg.attention,
            )
        return _project(self, "o", "blnh,nhd->bld", out_BLNH.astype(dt), rng), cache


class Mlp(nnx.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, f, std = cfg.embed_dim, cfg.mlp_dim, cfg.init_std
        self.gate, self.gate_scale = _projection(rngs, cfg, (d, f), ("embed", "mlp"), std, 1)
        self.up, self.up_scale = _projection(rngs, cfg, (d, f), ("embed", "mlp"), std, 1)
        self.down, self.down_scale = _projection(rngs, cfg, (f, d), ("mlp", "embed"), std, 1)
        embed, mlp = ((d, "embed"),), ((f, "mlp"),)
        self.lora = _adapters(
            cfg, rngs, {"gate": (embed, mlp), "up": (embed, mlp), "down": (mlp, embed)}
        )

    def __call__(self, x_BLD: jax.Array, rng=None) -> jax.Array:
        gate_BLF = _project(self, "gate", "bld,df->blf", x_BLD, rng)
        up_BLF = _project(self, "up", "bld,df->blf", x_BLD, rng)
        hidden_BLF = sharding.constrain(jax.nn.silu(gate_BLF) * up_BLF, ("batch", "seq", "mlp"))
        return _project(self, "down", "blf,fd->bld", hidden_BLF, rng)


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(cfg)
        self.attention = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg)
        self.mlp = Mlp(cfg, rngs)

    def __call__(
        self, x_BLD, positions_BL, segment_ids_BL, cache: LayerCache | None = None, rng=None
    ):
        attended_BLD, cache = self.attention(
            self.attention_norm(x_BLD), positions_BL, segment_ids_BL, cache, rng
        )
        x_BLD = x_BLD + attended_BLD
        x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD), rng)
        return sharding.constrain(x_BLD, ("batch", "seq", None)), cache


def _remat(fn, policy: Remat):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, static_argnums=(0,))
    if policy == "save_dots":
        saveable = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        return jax.checkpoint(fn, static_argnums=(0,), policy=saveable)
    raise ValueError(f"remat={policy!r} not in ('none', 'full', 'save_dots')")


class Llama(nnx.Module):
    """Decoder-only Llama; `scan_layers` stacks blocks on a leading `layers` axis."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        v, d = cfg.vocab_size, cfg.embed_dim
        # The table is sharded over `embed` only: sharding the gather's vocab axis over
        # `tensor` makes XLA rematerialise the whole table (docs/jax_notes.md).
        self.embedding = _param(rngs, cfg, (v, d), ("vocab_table", "embed"), 1.0)
        if cfg.scan_layers:
            self.layers = _stacked_blocks(cfg, rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, cfg, (d, v), ("embed", "vocab"), cfg.init_std)

    def __call__(self, tokens_BL, positions_BL, segment_ids_BL, cache: Cache | None = None):
        """logits [B, L, V]; with a cache, (logits, the cache with this chunk appended)."""
        x_BLD, cache = self.hidden_states(tokens_BL, positions_BL, segment_ids_BL, cache)
        logits_BLV = self.logits(x_BLD)
        return logits_BLV if cache is None else (logits_BLV, cache)

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        """Final hidden states [B, L, D] -> logits [B, L, V] (compute dtype, vocab over tensor).

        Separate from the layers so the loss can apply it a sequence chunk at a time.
        """
        dt = x_BLD.dtype
        if self.cfg.tie_embeddings:
            logits_BLV = jnp.einsum("bld,vd->blv", x_BLD, self.embedding[...].astype(dt))
        else:
            logits_BLV = jnp.einsum("bld,dv->blv", x_BLD, self.lm_head[...].astype(dt))
        return sharding.constrain(logits_BLV, ("batch", "seq", "vocab"))

    def hidden_states(
        self, tokens_BL, positions_BL, segment_ids_BL, cache: Cache | None = None, rng=None
    ) -> tuple[jax.Array, Cache | None]:
        """(final-normed hidden states [B, L, D], the cache with this chunk appended or None).

        `rng` turns on LoRA dropout (training); each layer gets its own key.
        """
        dt = jnp.dtype(self.cfg.dtype)
        # Gather from a table all-gathered over fsdp (as FSDP does for every weight at use):
        # gathering from the embed-sharded table would leave activations sharded the wrong
        # way and XLA falls back to replicating them ("involuntary full rematerialization").
        table_VD = sharding.constrain(self.embedding[...], ("vocab_table", None))
        x_BLD = jnp.take(table_VD, tokens_BL, axis=0).astype(dt)
        x_BLD = sharding.constrain(x_BLD, ("batch", "seq", None))
        if cache is not None:
            kv_segment_ids_BS = jax.lax.dynamic_update_slice_in_dim(
                cache.segment_ids, segment_ids_BL.astype(jnp.int32), cache.end, axis=1
            )

        def run_block(graphdef, block_state, x, kv, key):
            """kv: this layer's (k, v) cache buffers, or None without a cache."""
            layer_cache = None if kv is None else LayerCache(*kv, kv_segment_ids_BS, cache.end)
            x, layer_cache = nnx.merge(graphdef, block_state)(
                x, positions_BL, segment_ids_BL, layer_cache, key
            )
            return x, None if layer_cache is None else (layer_cache.k_BSKH, layer_cache.v_BSKH)

        run_block = _remat(run_block, self.cfg.remat)
        kv = None if cache is None else (cache.k, cache.v)
        keys = None if rng is None else jax.random.split(rng, self.cfg.num_layers)
        if self.cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(x, layer):
                block_state, layer_kv, key = layer
                return run_block(graphdef, block_state, x, layer_kv, key)

            # The stacked caches (or None) are scanned alongside the stacked block parameters.
            x_BLD, kv = jax.lax.scan(body, x_BLD, (stacked, kv, keys))
        else:
            new_kv = []
            for i, block in enumerate(self.layers):
                layer_kv = None if kv is None else (kv[0][i], kv[1][i])
                key = None if keys is None else keys[i]
                x_BLD, layer_kv = run_block(*nnx.split(block), x_BLD, layer_kv, key)
                new_kv.append(layer_kv)
            kv = None if kv is None else tuple(jnp.stack(t) for t in zip(*new_kv, strict=True))

        x_BLD = self.final_norm(x_BLD)
        if cache is None:
            return x_BLD, None
        end = cache.end + tokens_BL.shape[1]
        return x_BLD, Cache(k=kv[0], v=kv[1], segment_ids=kv_segment_ids_BS, end=end)


def _stacked_blocks(cfg: LlamaConfig, rngs: nnx.Rngs) -> Block:
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs)

    return make(rngs)


def count_params(model: nnx.Module) -> int:
    """Parameters actually held by a (possibly abstract) model."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def create(
    cfg: LlamaConfig,
    mesh: jax.sharding.Mesh,
    *,
    seed: int = 0,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> Llama:
    """Random init under jit: each parameter is born in its sharding (70B never on one host)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return nnx.jit(lambda: Llama(cfg, rngs=nnx.Rngs(seed)))()


def create_adapters(
    cfg: LlamaConfig,
    mesh: jax.sharding.Mesh,
    *,
    seed: int = 0,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> nnx.State:
    """Only the LoRA adapters of a fresh model, born in their sharding (XLA drops the unused
    base init, so a 70B base is never drawn at random just to be thrown away)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return nnx.jit(lambda: nnx.state(Llama(cfg, rngs=nnx.Rngs(seed)), nnx.LoRAParam))()


def abstract(
    cfg: LlamaConfig, mesh: jax.sharding.Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES
) -> Llama:
    """Shapes, dtypes and shardings only (no memory): for loading, planning and eval_shape tests."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
