"""Attention over packed rows: causal AND same-segment, one signature for every backend.

Owns the masking rule (a token sees earlier tokens of its own example only; segment 0 is
padding and sees only padding, so no row is ever empty) and the choice of kernel. It does not
own projections or rotary embeddings (model/llama.py).

Shapes: B batch, L query length, S key length, N query heads, K kv heads, G = N // K, H head_dim.
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn")


def segment_mask(segment_ids_BL: jax.Array) -> jax.Array:
    """[B, 1, L, L] bool: causal and same segment (True = may attend)."""
    length = segment_ids_BL.shape[1]
    causal_LL = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    return (same_BLL & causal_LL[None])[:, None]


def attend_xla(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL) -> jax.Array:
    """Reference attention: fp32 scores and softmax, grouped-query without repeating k/v."""
    batch, length, num_heads, head_dim = q_BLNH.shape
    num_kv = k_BSKH.shape[2]
    q_BLKGH = q_BLNH.reshape(batch, length, num_kv, num_heads // num_kv, head_dim)
    scores_BKGLS = jnp.einsum(
        "blkgh,bskh->bkgls", q_BLKGH, k_BSKH, preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(head_dim))
    mask_B11LS = segment_mask(segment_ids_BL)[:, :, None]
    scores_BKGLS = jnp.where(mask_B11LS, scores_BKGLS, jnp.finfo(jnp.float32).min)
    probs_BKGLS = jax.nn.softmax(scores_BKGLS, axis=-1).astype(v_BSKH.dtype)
    out_BLKGH = jnp.einsum("bkgls,bskh->blkgh", probs_BKGLS, v_BSKH)
    return out_BLKGH.reshape(batch, length, num_heads, head_dim)


def attend(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, *, implementation: str = "xla") -> jax.Array:
    """Causal, segment-restricted attention. `cudnn` is the fused GPU kernel (same mask)."""
    if implementation == "xla":
        return attend_xla(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL)
    if implementation == "cudnn":
        same_B1LS = segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]
        return jax.nn.dot_product_attention(
            q_BLNH, k_BSKH, v_BSKH, mask=same_B1LS, is_causal=True, implementation="cudnn"
        )
    raise ValueError(f"attention implementation {implementation!r} not in {IMPLEMENTATIONS}")
