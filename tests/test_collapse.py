"""train.collapse_reason: a real too-large learning rate is caught; healthy runs are left alone."""

import math

import jax
from flax import nnx
from train_fixtures import optim_config, packed_batches, random_examples

from sftjax import sharding, train
from sftjax.model import llama

VOCAB = 64


def _history(steps, losses, grad_norms):
    return list(zip(steps, losses, grad_norms, strict=True))


def test_lr_1e4_collapses_a_real_model_and_is_caught_within_a_few_steps():
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    cfg = llama.preset("tiny", dtype="float32", vocab_size=VOCAB)
    tx, schedule = train.make_optimizer(optim_config(lr=1e4), 12)
    graphdef, params = nnx.split(llama.create(cfg, mesh, seed=0))
    params = nnx.to_pure_dict(params)
    shardings = train.state_shardings_for(jax.tree.map(lambda x: x.sharding, params), params, tx)
    state = train.init_state(params, tx, shardings, 0)
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn, _ = train.jit_steps(graphdef, tx, schedule, 1, shardings, batch_sharding)
    batches = packed_batches(random_examples(100, VOCAB), batch_size=8, seq_len=64, steps=12)
    history, caught_at = [], None
    with jax.set_mesh(mesh):
        for step, batch in enumerate(batches, start=1):
            state, metrics = step_fn(state, train.global_batch(batch, batch_sharding), {})
            metrics = jax.device_get(metrics)
            history.append((step, float(metrics["loss"]), float(metrics["grad_norm"])))
            reason = train.collapse_reason(history, VOCAB, warmup_steps=0)
            if reason and caught_at is None:
                caught_at = step
    assert history[0][2] > 0  # it did learn something at first
    assert caught_at is not None and caught_at <= 10, history
    assert "training collapsed at steps" in reason and "lower optim.lr" in reason


def test_zero_gradient_norm_in_a_row_is_a_collapse():
    history = _history(range(10, 60, 10), [3.0] * 5, [0.0] * 5)
    reason = train.collapse_reason(history, VOCAB, warmup_steps=100)  # any time, even warmup
    assert reason.startswith("training collapsed at steps 10-50: the gradient norm is 0.0")


def test_uniform_loss_after_warmup_is_a_collapse():
    uniform = math.log(VOCAB)
    history = _history(range(101, 106), [uniform + 2e-4] * 5, [1e-3] * 5)
    assert "uniform distribution" in train.collapse_reason(history, VOCAB, warmup_steps=100)


def test_healthy_runs_and_fresh_models_are_not_flagged():
    uniform = math.log(VOCAB)
    # A random init sits at ln(V) until warmup lets it move.
    at_init = _history(range(1, 6), [uniform] * 5, [1.0] * 5)
    assert train.collapse_reason(at_init, VOCAB, warmup_steps=10) is None
    # One zero gradient (e.g. a batch of prompts only) among normal ones.
    one_zero = _history(range(1, 6), [2.0, 1.9, 1.8, 1.7, 1.6], [1.0, 0.0, 1.0, 1.0, 1.0])
    assert train.collapse_reason(one_zero, VOCAB, warmup_steps=0) is None
    # Too few logged steps to judge.
    assert train.collapse_reason(at_init[:4], VOCAB, warmup_steps=0) is None
    # Near ln(V) but still moving by more than 1e-3.
    moving = _history(range(11, 16), [uniform - 0.01 * i for i in range(5)], [1.0] * 5)
    assert train.collapse_reason(moving, VOCAB, warmup_steps=0) is None
