"""The NNX Llama itself: a real trained model vs llama2.c, packing, sharding, presets, numerics."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_path
from flax import nnx
from hf_fixtures import our_logits
from jax.sharding import PartitionSpec as P

from sftjax import sharding
from sftjax.model import hf_io, llama


def test_stories260k_reproduces_llama2c_greedy_and_logits():
    directory = shared_path("stories260K_hf")
    golden = json.loads((directory / "golden_greedy_from_bos.json").read_text())
    model = hf_io.load_pretrained(directory, dtype="float32")
    assert model.cfg.tie_embeddings and model.cfg.num_kv_heads == 4

    steps = len(golden["greedy_next_ids_60"])
    # A fixed-size buffer keeps one compile; causality makes the unfilled tail irrelevant.
    buffer = np.zeros((1, steps + 1), np.int32)
    buffer[0, 0] = golden["prompt_ids"][0]
    first_logits = []
    for t in range(steps):
        logits = our_logits(model, buffer)[0, t]
        if t < 3:
            first_logits.append(logits)
        buffer[0, t + 1] = int(np.argmax(logits))
    assert buffer[0, 1:].tolist() == golden["greedy_next_ids_60"]
    np.testing.assert_allclose(
        np.stack(first_logits), np.asarray(golden["logits_steps_0_1_2"]), atol=1e-4
    )


@pytest.fixture(scope="module")
def tiny():
    cfg = llama.preset("tiny", dtype="float32", vocab_size=64)
    return llama.create(cfg, sharding.make_mesh(devices=jax.devices()[:1]), seed=3)


def test_packed_row_equals_each_example_alone(tiny):
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, 64, size=7), rng.integers(1, 64, size=5)
    tokens = np.zeros((1, 16), np.int32)
    tokens[0, :7], tokens[0, 7:12] = a, b
    tokens[0, 12:] = 9  # padding content must not matter
    positions = np.array([[*range(7), *range(5), 0, 0, 0, 0]])
    segments = np.array([[1] * 7 + [2] * 5 + [0] * 4])
    packed = our_logits(tiny, tokens, positions, segments)[0]
    np.testing.assert_allclose(packed[:7], our_logits(tiny, a[None])[0], atol=1e-5)
    np.testing.assert_allclose(packed[7:12], our_logits(tiny, b[None])[0], atol=1e-5)
    # different padding content: real positions unchanged
    tokens[0, 12:] = 33
    again = our_logits(tiny, tokens, positions, segments)[0]
    np.testing.assert_array_equal(again[:12], packed[:12])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_fsdp_tensor_equals_single_device(scan_layers):
    cfg = llama.preset("tiny", dtype="float32", scan_layers=scan_layers)
    single = llama.create(cfg, sharding.make_mesh(devices=jax.devices()[:1]), seed=0)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    sharded = llama.create(cfg, mesh, seed=0)
    q = sharded.layers.attention.q[...] if scan_layers else sharded.layers[0].attention.q[...]
    assert len(q.sharding.device_set) == 8 and "tensor" in q.sharding.spec
    tokens = np.random.default_rng(1).integers(0, 512, size=(4, 32))
    np.testing.assert_allclose(our_logits(sharded, tokens), our_logits(single, tokens), atol=1e-5)


def test_bf16_compute_tracks_fp32():
    cfg = llama.preset("tiny", dtype="float32")
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    fp32 = llama.create(cfg, mesh, seed=0)
    bf16 = llama.create(llama.preset("tiny", dtype="bfloat16"), mesh, seed=0)
    assert bf16.layers[0].mlp.up[...].dtype == jnp.float32  # master weights stay fp32
    tokens = np.random.default_rng(2).integers(0, 512, size=(2, 32))
    ref, low = our_logits(fp32, tokens), our_logits(bf16, tokens)
    assert np.abs(low - ref).max() / np.abs(ref).max() < 0.05
    assert (low.argmax(-1) == ref.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_changes_memory_not_gradients(remat):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 512, size=(2, 16)))
    positions = jnp.broadcast_to(jnp.arange(16), tokens.shape)
    segments = jnp.ones_like(tokens)

    def grads(policy):
        cfg = llama.preset("tiny", dtype="float32", scan_layers=True, remat=policy)
        model = llama.create(cfg, mesh, seed=0)
        loss = lambda m: m(tokens, positions, segments).astype(jnp.float32).std()
        return jax.tree.leaves(nnx.grad(loss)(model))

    for ours, ref in zip(grads(remat), grads("none"), strict=True):
        np.testing.assert_allclose(ours, ref, atol=1e-6)


# Published parameter counts of Llama-2 (embedding and untied lm_head included).
PUBLISHED = {"llama2_7b": 6_738_415_616, "llama2_13b": 13_015_864_320, "llama2_70b": 68_976_648_192}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_presets_shapes_and_shardings(name):
    cfg = llama.preset(name, scan_layers=True)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    model = llama.abstract(cfg, mesh)
    assert llama.count_params(model) == cfg.num_params == PUBLISHED[name]
    state = nnx.state(model, nnx.Param)
    specs = nnx.to_pure_dict(sharding.state_shardings(state, mesh))
    assert specs["layers"]["mlp"]["gate"].spec == P(None, "fsdp", "tensor")
    assert specs["layers"]["attention"]["o"].spec == P(None, "tensor", None, "fsdp")
    assert specs["embedding"].spec == P(None, "fsdp")
    assert specs["lm_head"].spec == P("fsdp", "tensor")


def test_invalid_head_configuration_is_explained():
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        llama.preset("tiny", num_heads=6)
    with pytest.raises(ValueError, match="unknown preset 'llama3'"):
        llama.preset("llama3")
