"""Rotary position embeddings: the frequencies of each scaling kind, and applying them.

Owns the inverse frequencies (and yarn's cos/sin scale) computed once per config from
(head_dim, rope_theta, rope_scaling) with rope_scaling in Hugging Face's own dict spelling:
`rope_type` default, linear, llama3 or yarn. The formulas are those of transformers'
`modeling_rope_utils` (the reference our parity tests run against); they are static, so
jit sees constants. "dynamic" NTK scaling is refused: its frequencies change with the longest
position of each batch, so an example's math would depend on the rows it is packed with and a
KV cache would mix keys rotated at different frequencies.
The rotation is HF's rotate-half convention, so imported weights need no permutation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("default", "linear", "llama3", "yarn")
# Keys each kind reads besides rope_type (anything else in the dict is refused, never ignored).
_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
}
_REQUIRED = {
    "default": set(),
    "linear": {"factor"},
    "llama3": _KEYS["llama3"],
    "yarn": {"factor", "original_max_position_embeddings"},
}


def check(scaling: dict | None) -> None:
    """Raise ValueError naming what is wrong with a rope_scaling dict (None = plain RoPE)."""
    if not scaling:
        return
    kind = scaling.get("rope_type")
    if kind == "dynamic":
        raise ValueError(
            "rope_type 'dynamic' is not supported: its frequencies follow the longest position "
            "of each batch, so an example's result would depend on what it is packed with"
        )
    if kind not in KINDS:
        raise ValueError(f"rope_type {kind!r} is not supported; choose one of {KINDS}")
    unknown = sorted(set(scaling) - _KEYS[kind] - {"rope_type"})
    if unknown:
        raise ValueError(f"rope_type {kind!r}: unsupported keys {unknown}")
    missing = sorted(_REQUIRED[kind] - {k for k, v in scaling.items() if v is not None})
    if missing:
        raise ValueError(f"rope_type {kind!r} needs {missing}")


def inverse_frequencies(
    head_dim: int, theta: float, scaling: dict | None = None
) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim / 2] in fp32, the factor scaling cos and sin).

    Computed in fp32 in transformers' order of operations, so the rounding matches theirs.
    """
    check(scaling)
    scaling = scaling or {"rope_type": "default"}
    kind = scaling["rope_type"]
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    # theta ** e correctly rounded to fp32 (as torch's pow gives it; numpy's fp32 pow is off by
    # an ulp for some e, which at position 40000 turns an angle by ~1e-3)
    powers = (np.float64(np.float32(theta)) ** exponents.astype(np.float64)).astype(np.float32)
    inv_freq = np.float32(1.0) / powers
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / np.float32(factor), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, factor, scaling), 1.0
    return _yarn(powers, head_dim, theta, factor, scaling)


def _llama3(inv_freq: np.ndarray, factor: float, scaling: dict) -> np.ndarray:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    # scalar / tensor is reciprocal-then-multiply in torch; done alike, the rounding matches
    wavelen = (np.float32(1.0) / inv_freq) * np.float32(2 * math.pi)
    scaled = np.where(wavelen > context / low, inv_freq / np.float32(factor), inv_freq)
    smooth = ((np.float32(1.0) / wavelen) * np.float32(context) - np.float32(low)) / np.float32(
        high - low
    )
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < context / high) & ~(wavelen > context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(powers, head_dim: int, theta: float, factor: float, scaling: dict):
    """YaRN: interpolate low frequencies, keep high ones, ramp between; cos/sin scaled."""

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = (
            mscale(factor, m) / mscale(factor, m_all) if m and m_all else (mscale(factor))
        )
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    context = scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)  # 1: extrapolate (keep), 0: interpolate
    extrapolated = np.float32(1.0) / powers
    interpolated = np.float32(1.0) / (np.float32(factor) * powers)
    inv_freq = interpolated * (1 - keep) + extrapolated * keep
    return inv_freq.astype(np.float32), float(attention_factor)


def rotate(
    x_BLNH: jax.Array, positions_BL: jax.Array, inv_freq: np.ndarray, scale: float = 1.0
) -> jax.Array:
    """HF rotate-half RoPE: pair (i, i + H/2) turns by position * inv_freq[i], in fp32.

    `scale` multiplies cos and sin (yarn's attention factor; 1 otherwise).
    """
    angles_BLh = positions_BL.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None]
    cos = (jnp.cos(angles_BLh) * scale)[:, :, None, :]
    sin = (jnp.sin(angles_BLh) * scale)[:, :, None, :]
    x1, x2 = jnp.split(x_BLNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLNH.dtype)
