"""Attention over packed rows: causal AND same-segment, one signature for every backend.

Owns the masking rule (a token sees earlier tokens of its own example only; segment 0 is
padding and sees only padding, so no row is ever empty) and the choice of kernel. It does not
own projections or rotary embeddings (model/llama.py).

Decoding with a KV cache uses the same rule: queries are the chunk written at cache slots
[q_start, q_start + L) and keys are every slot of the cache, each with its own segment id
(0 for padding and for slots not yet written, which causality hides anyway).

Shapes: B batch, L query length, S key length, N query heads, K kv heads, G = N // K, H head_dim.
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn")


def segment_mask(
    segment_ids_BL: jax.Array, kv_segment_ids_BS: jax.Array | None = None, q_start=0
) -> jax.Array:
    """[B, 1, L, S] bool: causal and same segment (True = may attend).

    Without `kv_segment_ids_BS` the keys are the queries themselves (S = L, training); with it
    the queries sit at key slots q_start.. (cached decoding), `q_start` possibly traced.
    """
    kv_segment_ids_BS = segment_ids_BL if kv_segment_ids_BS is None else kv_segment_ids_BS
    q_slot_L = q_start + jnp.arange(segment_ids_BL.shape[1])
    causal_LS = jnp.arange(kv_segment_ids_BS.shape[1])[None, :] <= q_slot_L[:, None]
    same_BLS = segment_ids_BL[:, :, None] == kv_segment_ids_BS[:, None, :]
    return (same_BLS & causal_LS[None])[:, None]


def attend_xla(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, kv_segment_ids_BS=None, q_start=0):
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
    mask_B1LS = segment_mask(segment_ids_BL, kv_segment_ids_BS, q_start)
    scores_BNLS = jnp.where(mask_B1LS, scores_BNLS, jnp.finfo(jnp.float32).min)
    probs_BNLS = jax.nn.softmax(scores_BNLS, axis=-1).astype(v_BSNH.dtype)
    return jnp.einsum("bnls,bsnh->blnh", probs_BNLS, v_BSNH)


def attend(
    q_BLNH,
    k_BSKH,
    v_BSKH,
    segment_ids_BL,
    *,
    kv_segment_ids_BS: jax.Array | None = None,
    q_start=0,
    implementation: str = "xla",
) -> jax.Array:
    """Causal, segment-restricted attention. `cudnn` is the fused GPU kernel (same mask).

    Cached decoding (`kv_segment_ids_BS` given) always takes the XLA path: it reads one query
    against the whole cache, which is memory-bound, so a fused kernel buys little there.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} not in {IMPLEMENTATIONS}")
    if implementation == "xla" or kv_segment_ids_BS is not None:
        return attend_xla(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, kv_segment_ids_BS, q_start)
    same_B1LS = segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]
    return jax.nn.dot_product_attention(
        q_BLNH, k_BSKH, v_BSKH, mask=same_B1LS, is_causal=True, implementation="cudnn"
    )
