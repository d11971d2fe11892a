"""Attention over packed rows: causal AND same-segment, one signature for every backend.

Owns the masking rule (a token sees earlier tokens of its own example only; segment 0 is
padding and sees only padding, so no row is ever empty) and the choice of kernel: the XLA
reference, cuDNN's fused kernel on NVIDIA GPUs, and Pallas splash attention on TPUs. It does
not own projections or rotary embeddings (model/llama.py).

A sliding window (Mistral's `sliding_window`) narrows it further: a query sees itself and the
`window - 1` slots before it, transformers' rule (`kv > q - window`). Slots and positions of
one example differ by a constant (packing and left-padding only shift them), so the window is
measured in slots, exactly, in training and in cached decoding alike.

Decoding with a KV cache uses the same rule: queries are the chunk written at cache slots
[q_start, q_start + L) and keys are every slot of the cache, each with its own segment id
(0 for padding and for slots not yet written, which causality hides anyway).

Shapes: B batch, L query length, S key length, N query heads, K kv heads, G = N // K, H head_dim.
"""

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from sftjax import sharding

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
CHOICES = ("auto", *IMPLEMENTATIONS)
# Splash tiles the sequence in blocks of 128·k tokens; larger blocks amortise more per step.
SPLASH_BLOCKS = (512, 256, 128)

log = logging.getLogger("sftjax")


def target_platform() -> str:
    """Platform the code being traced will run on: the mesh's devices, else the default backend.

    The planner compiles for TPU devices from a CPU host, so jax.default_backend() alone would
    pick the wrong kernel there.
    """
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None else device.platform


@functools.cache
def resolve(name: str, platform: str) -> str:
    """`name`, or for "auto" the fast kernel of `platform`: tpu splash, gpu cudnn, else xla."""
    if name not in CHOICES:
        raise ValueError(f"attention {name!r} not in {CHOICES}")
    chosen = name
    if name == "auto":
        chosen = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform, "xla")
    log.info("attention: %s -> %s (platform %s)", name, chosen, platform)  # once: cached
    return chosen


def segment_mask(
    segment_ids_BL: jax.Array,
    kv_segment_ids_BS: jax.Array | None = None,
    q_start=0,
    window: int | None = None,
) -> jax.Array:
    """[B, 1, L, S] bool: causal, same segment and within `window` (True = may attend).

    Without `kv_segment_ids_BS` the keys are the queries themselves (S = L, training); with it
    the queries sit at key slots q_start.. (cached decoding), `q_start` possibly traced.
    """
    kv_segment_ids_BS = segment_ids_BL if kv_segment_ids_BS is None else kv_segment_ids_BS
    q_slot_L = q_start + jnp.arange(segment_ids_BL.shape[1])
    kv_slot_S = jnp.arange(kv_segment_ids_BS.shape[1])
    causal_LS = kv_slot_S[None, :] <= q_slot_L[:, None]
    if window is not None:
        causal_LS &= kv_slot_S[None, :] > q_slot_L[:, None] - window
    same_BLS = segment_ids_BL[:, :, None] == kv_segment_ids_BS[:, None, :]
    return (same_BLS & causal_LS[None])[:, None]


def attend_xla(
    q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, kv_segment_ids_BS=None, q_start=0, window=None
):
    """Reference attention: fp32 scores and softmax; grouped-query by repeating k/v heads.

    Repeating k/v to the query heads keeps every einsum 4-D: fwd+bwd ran 2x faster on CPU than
    a grouped 5-D einsum without the repeat (B 8, L 256, N 4, K 2), with identical outputs.
    """
    groups = q_BLNH.shape[2] // k_BSKH.shape[2]
    k_BSNH = jnp.repeat(k_BSKH, groups, axis=2)
    v_BSNH = jnp.repeat(v_BSKH, groups, axis=2)
    scores_BNLS = jnp.einsum(
        "blnh,bsnh->bnls", q_BLNH, k_BSNH, preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(q_BLNH.shape[-1]))
    mask_B1LS = segment_mask(segment_ids_BL, kv_segment_ids_BS, q_start, window)
    scores_BNLS = jnp.where(mask_B1LS, scores_BNLS, jnp.finfo(jnp.float32).min)
    probs_BNLS = jax.nn.softmax(scores_BNLS, axis=-1).astype(v_BSNH.dtype)
    return jnp.einsum("bnls,bsnh->blnh", probs_BNLS, v_BSNH)


def _splash_kernel(length: int, heads: int, window: int | None, interpret: bool):
    """A causal (and local, with a window) splash kernel for (L, local N), built in the trace.

    Not cached here: the kernel holds its block tables as arrays of the trace that built it.
    splash caches the numpy work behind them (the mask processing) itself.
    """
    block = next((b for b in SPLASH_BLOCKS if length % b == 0), None)
    if block is None:
        raise ValueError(f"splash attention needs data.seq_len a multiple of 128, got {length}")
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    if window is None:
        causal = splash.CausalMask((length, length))
    else:  # keys q - (window - 1) .. q: causal and local in one mask
        causal = splash.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    mask = splash.MultiHeadMask([causal] * heads)
    return splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _splash_local(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, *, window, interpret: bool):
    """Splash on one device's rows and heads; k/v keep their K heads (grouped, no repeat)."""
    _, length, heads, head_dim = q_BLNH.shape
    kernel = _splash_kernel(length, heads, window, interpret)
    # The kernel neither scales logits nor takes the batch: pre-scale q, vmap over rows.
    q_BNLH = (q_BLNH * (head_dim**-0.5)).astype(q_BLNH.dtype).transpose(0, 2, 1, 3)
    k_BKLH = k_BLKH.transpose(0, 2, 1, 3)
    v_BKLH = v_BLKH.transpose(0, 2, 1, 3)

    def one_row(q_NLH, k_KLH, v_KLH, seg_L):
        return kernel(q_NLH, k_KLH, v_KLH, segment_ids=splash.SegmentIds(q=seg_L, kv=seg_L))

    out_BNLH = jax.vmap(one_row)(q_BNLH, k_BKLH, v_BKLH, segment_ids_BL.astype(jnp.int32))
    return out_BNLH.transpose(0, 2, 1, 3)


def attend_splash(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, *, window=None, interpret: bool = False):
    """Splash attention, per device under shard_map: rows over data×fsdp, heads over tensor.

    `interpret=True` runs the same kernel through the Pallas interpreter (CPU tests).
    """
    local = functools.partial(_splash_local, window=window, interpret=interpret)
    if jax.sharding.get_abstract_mesh().empty:
        return local(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)
    q_spec = sharding.logical_to_spec(("batch", "seq", "heads", None))
    kv_spec = sharding.logical_to_spec(("batch", "seq", "kv_heads", None))
    seg_spec = sharding.logical_to_spec(("batch", "seq"))
    if q_spec[1] is not None:
        raise ValueError("splash attention needs the sequence unsharded (rule 'seq': None)")
    return jax.shard_map(
        local,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
        out_specs=q_spec,
        check_vma=False,  # a Pallas call carries no varying-axis information
    )(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)


def attend(
    q_BLNH,
    k_BSKH,
    v_BSKH,
    segment_ids_BL,
    *,
    kv_segment_ids_BS: jax.Array | None = None,
    q_start=0,
    window: int | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Causal, segment-restricted attention by `implementation` (one of CHOICES).

    `window`: a sliding window (keys q - window < k <= q); None = unlimited. Every kernel
    applies it exactly (splash with a local mask, cuDNN with its left window).

    `cudnn` is the fused GPU kernel with a dense [B, 1, L, L] same-segment mask (jax's public
    cuDNN call takes no segment ids); `splash` is the Pallas TPU kernel, which reads segment ids
    directly and never builds an [L, L] array. Splash on a non-TPU backend runs interpreted:
    correct but slow, for tests. Cached decoding (`kv_segment_ids_BS` given) always takes the
    XLA path: it reads one query against the whole cache, which is memory-bound, so a fused
    kernel buys little there.
    """
    platform = target_platform()
    requested, implementation = implementation, resolve(implementation, platform)
    if requested == "auto" and implementation == "splash" and q_BLNH.shape[1] % SPLASH_BLOCKS[-1]:
        implementation = "xla"  # splash tiles need L % 128 == 0; "auto" never fails over it
    if window is not None and window >= k_BSKH.shape[1]:
        window = None  # every causal key is inside it: the window changes nothing
    if implementation == "xla" or kv_segment_ids_BS is not None:
        return attend_xla(
            q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, kv_segment_ids_BS, q_start, window
        )
    if implementation == "splash":
        interpret = platform != "tpu"
        return attend_splash(
            q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, window=window, interpret=interpret
        )
    return attend_cudnn(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, window=window)


def attend_cudnn(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, *, window=None, implementation="cudnn"):
    """jax's fused attention with a dense same-segment mask; the window as its left window
    (`local_window_size=(window - 1, 0)`: itself and window - 1 keys before). `implementation`
    "xla" runs jax's own reference of the same call (tests its arguments on CPU)."""
    same_B1LS = segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]
    return jax.nn.dot_product_attention(
        q_BLNH,
        k_BLKH,
        v_BLKH,
        mask=same_B1LS,
        is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation,
    )
