"""Splash attention (Pallas, interpreted on CPU) vs the XLA reference, alone and in the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sftjax import sharding
from sftjax.model import attention, llama

LENGTH = 256  # two splash blocks of 128: block skipping across the diagonal is exercised


def segment_layout(name: str) -> np.ndarray:
    """One row of segment ids: packed examples 1, 2, ... and padding 0 at the end."""
    if name == "one_example":
        return np.ones(LENGTH, np.int32)
    if name == "packed_with_padding":  # a segment crossing the block boundary at 128
        return np.repeat([1, 2, 3, 0], [50, 100, 60, 46]).astype(np.int32)
    if name == "many_short":  # single-token and odd-length segments, then padding
        lengths = [1, 1, 3, 7, 20, 64, 1, 100, 40, 19]
        return np.repeat(np.arange(1, 11), lengths).astype(np.int32)
    if name == "all_padding":
        return np.zeros(LENGTH, np.int32)
    raise ValueError(name)


LAYOUTS = ("one_example", "packed_with_padding", "many_short", "all_padding")


def qkv(heads: int, kv_heads: int, batch: int = 2, head_dim: int = 32, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (batch, LENGTH, heads, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (batch, LENGTH, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (batch, LENGTH, kv_heads, head_dim), jnp.float32)
    return q, k, v


@pytest.mark.parametrize("heads,kv_heads", [(8, 1), (4, 4)])
def test_splash_matches_xla_forward_and_gradients(heads, kv_heads):
    q, k, v = qkv(heads, kv_heads, batch=len(LAYOUTS))
    seg = jnp.asarray(np.stack([segment_layout(name) for name in LAYOUTS]))
    cotangent = jax.random.normal(jax.random.PRNGKey(1), q.shape)
    splash = jax.jit(lambda *a: attention.attend_splash(*a, interpret=True))

    def loss(fn, q, k, v):
        return (fn(q, k, v, seg) * cotangent).sum()

    np.testing.assert_allclose(splash(q, k, v, seg), attention.attend_xla(q, k, v, seg), atol=1e-5)
    grads_splash = jax.grad(loss, argnums=(1, 2, 3))(splash, q, k, v)
    grads_xla = jax.grad(loss, argnums=(1, 2, 3))(attention.attend_xla, q, k, v)
    for got, want in zip(grads_splash, grads_xla, strict=True):
        np.testing.assert_allclose(got, want, atol=5e-5)


def test_splash_in_the_sharded_model_matches_xla():
    """attention='splash' under shard_map (rows over data×fsdp, heads over tensor) == 'xla'."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (4, LENGTH), 0, 64))
    segs = np.stack([segment_layout(n) for n in LAYOUTS])
    positions = np.zeros_like(segs)
    for row in range(len(segs)):  # positions restart at each segment start
        for s in np.unique(segs[row]):
            where = segs[row] == s
            positions[row, where] = np.arange(where.sum())
    logits = {}
    for impl in ("xla", "splash"):
        cfg = llama.preset("tiny", dtype="float32", vocab_size=64, attention=impl)
        model = llama.create(cfg, mesh, seed=0)
        graphdef, params = nnx.split(model)
        with jax.set_mesh(mesh):
            run = jax.jit(lambda p, *a, g=graphdef: nnx.merge(g, p)(*a))
            logits[impl] = run(params, tokens, positions, segs)
    np.testing.assert_allclose(logits["splash"], logits["xla"], atol=2e-5)


def test_auto_picks_the_kernel_of_the_target_platform():
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("auto", "gpu") == "cudnn"
    assert attention.resolve("auto", "cpu") == "xla"
    assert attention.resolve("cudnn", "tpu") == "cudnn"  # an explicit choice is kept
    with pytest.raises(ValueError, match="not in"):
        attention.resolve("flash", "tpu")


def test_splash_needs_whole_blocks():
    q, k, v = (x[:, :200] for x in qkv(4, 2))
    with pytest.raises(ValueError, match="multiple of 128"):
        attention.attend_splash(q, k, v, jnp.ones((2, 200), jnp.int32), interpret=True)


def test_splash_kernels_do_not_leak_between_traces():
    """Two traces of the same shapes: a kernel built inside one jit must not reach the next."""
    q, k, v = (x[:1, :128] for x in qkv(2, 1, seed=3))
    seg = jnp.ones((1, 128), jnp.int32)
    for scale in (1.0, 2.0):  # two separate traces of the same shapes
        out = jax.jit(
            lambda q, k, v, s, c=scale: attention.attend_splash(c * q, k, v, s, interpret=True)
        )(q, k, v, seg)
        np.testing.assert_allclose(out, attention.attend_xla(scale * q, k, v, seg), atol=1e-5)
