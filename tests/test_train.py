"""The train step on real computation: sharded == single device, accumulation == big batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from train_fixtures import packed_batches, random_examples, tiny_trainer

from sftjax import sharding, train
from sftjax.data import batches as batching
from sftjax.data import flat
from sftjax.model import llama

STEPS = 5


@pytest.fixture(scope="module")
def batches():
    return packed_batches(random_examples(200, 64), batch_size=8, seq_len=64, steps=STEPS)


def run(mesh, batches, **kwargs):
    state, step_fn, _, batch_sharding = tiny_trainer(mesh, **kwargs)
    losses = []
    with jax.set_mesh(mesh):
        for batch in batches:
            state, metrics = step_fn(state, train.global_batch(batch, batch_sharding), {})
            losses.append(float(metrics["loss"]))
    return losses, state, step_fn


def single_device_mesh():
    return sharding.make_mesh(devices=jax.devices()[:1])


@pytest.mark.parametrize("scan_layers", [True, False])
def test_fsdp_tensor_sharded_losses_equal_single_device(batches, scan_layers):
    single, _, _ = run(single_device_mesh(), batches, scan_layers=scan_layers)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded, state, step_fn = run(mesh, batches, scan_layers=scan_layers)
    assert single[-1] < single[0]  # it trains
    # fp32; different reduction orders across 8 devices: agree to 1e-5 relative
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    assert step_fn._cache_size() == 1  # compiled once for all steps


def test_gradient_accumulation_equals_one_big_batch(batches):
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=1, devices=jax.devices()[:2])
    big, big_state, _ = run(mesh, batches, microbatches=1)
    accumulated, acc_state, _ = run(mesh, batches, microbatches=4)
    np.testing.assert_allclose(accumulated, big, rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(acc_state.params), jax.tree.leaves(big_state.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)  # lr 3e-3: 0.3 %


def test_loss_is_token_weighted_over_the_global_batch(batches):
    """Rows with many loss tokens weigh more: not a mean of per-row means."""
    mesh = single_device_mesh()
    state, _, eval_fn, batch_sharding = tiny_trainer(mesh)
    batch = batches[0]
    with jax.set_mesh(mesh):
        total, tokens = eval_fn(state.params, train.global_batch(batch, batch_sharding), {})
        per_row = []
        for i in range(len(batch["tokens"])):
            row = {k: np.repeat(v[i : i + 1], 8, axis=0) for k, v in batch.items()}
            row_sum, row_tokens = eval_fn(state.params, train.global_batch(row, batch_sharding), {})
            per_row.append((float(row_sum) / 8, float(row_tokens) / 8))
    assert float(tokens) == batch["loss_mask"].sum()
    np.testing.assert_allclose(float(total), sum(s for s, _ in per_row), rtol=1e-5)


def test_validation_loss_independent_of_eval_batch_size_and_packing():
    examples = random_examples(37, 64, seed=5)
    mesh = single_device_mesh()
    state, _, eval_fn, batch_sharding = tiny_trainer(mesh)
    losses = {}
    with jax.set_mesh(mesh):
        for batch_size in (1, 3, 8):
            for pack in (True, False):
                val = batching.validation_batches(
                    flat.from_examples(examples),
                    batch_size=batch_size,
                    seq_len=64,
                    process_index=0,
                    process_count=1,
                    pack=pack,
                )
                result = train.evaluate(eval_fn, state.params, list(val), batch_sharding)
                assert result["loss_tokens"] == sum(int(e.loss_mask.sum()) for e in examples)
                losses[batch_size, pack] = result["loss"]
    values = list(losses.values())
    np.testing.assert_allclose(values, values[0], rtol=1e-5)


def whole_logits_loss_sums(graphdef, params, batch):
    """The loss as it was before chunking: all [B, L, V] fp32 logits at once."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["targets"]
    )
    mask = batch["loss_mask"].astype(jnp.float32)
    return (ce * mask).sum(), mask.sum()


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_chunked_loss_equals_whole_logits_loss_and_gradients(batches, monkeypatch, tie_embeddings):
    monkeypatch.setattr(train, "LOSS_CHUNK_TOKENS", 16)  # 64-token rows: 4 chunks
    assert train.loss_chunks(64) == 4 and train.loss_chunks(2048) == 128
    assert train.loss_chunks(48) == 3 and train.loss_chunks(17) == 17  # a prime: chunks of 1
    cfg = llama.preset("tiny", dtype="float32", vocab_size=64, tie_embeddings=tie_embeddings)
    graphdef, params = nnx.split(llama.create(cfg, single_device_mesh()))
    params = nnx.to_pure_dict(params)
    batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
    chunked = jax.value_and_grad(train.loss_sums, argnums=1, has_aux=True)
    whole = jax.value_and_grad(whole_logits_loss_sums, argnums=1, has_aux=True)
    (loss, tokens), grads = jax.jit(chunked, static_argnums=0)(graphdef, params, batch)
    (want_loss, want_tokens), want_grads = jax.jit(whole, static_argnums=0)(graphdef, params, batch)
    assert float(tokens) == float(want_tokens) > 0
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_early_stopping_patience_and_min_delta():
    early = train.EarlyStopping(patience=2, min_delta=0.1)
    assert early.update(10, 3.0) and early.best_step == 10
    assert not early.update(20, 2.95)  # not better by more than min_delta
    assert not early.should_stop
    assert early.update(30, 2.5) and early.evals_without_improvement == 0
    assert not early.update(40, 2.6) and not early.update(50, 2.45)
    assert early.should_stop and early.best_step == 30
