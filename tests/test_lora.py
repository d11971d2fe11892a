"""LoRA: exact at init, a hand-written reference, only adapters train, and the step's invariants
(accumulation, sharding, dropout) hold with adapters; resume and the base-identity check run
through the CLI. The PEFT round trip is in test_lora_export.py."""

import json
import os
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import our_logits
from train_fixtures import (
    ROOT,
    config_with,
    demo_corpus,
    main_command,
    optim_config,
    packed_batches,
    random_examples,
    short_run,
    train_losses,
    wait_for_step,
    with_random_b,
)

from sftjax import base_model, checkpoint, resume_check, sharding, train
from sftjax import config as config_lib
from sftjax.model import int8, llama, lora, merge

VOCAB = 64
# Odd shapes: grouped-query (5 heads over 1 kv head), head_dim 6 != embed/heads, odd mlp.
ODD = dict(
    vocab_size=61,
    embed_dim=40,
    mlp_dim=72,
    num_layers=2,
    num_heads=5,
    num_kv_heads=1,
    head_dim=6,
    max_seq_len=64,
)


def single_mesh():
    return sharding.make_mesh(devices=jax.devices()[:1])


def lora_cfg(**overrides) -> llama.LlamaConfig:
    fields = dict(
        llama.PRESETS["tiny"],
        vocab_size=VOCAB,
        dtype="float32",
        lora_rank=3,
        lora_alpha=5.0,
        base_dtype="float32",
    )
    return llama.LlamaConfig(**{**fields, **overrides})


def lora_model(cfg, mesh, *, seed: int = 0, b_scale: float = 0.0) -> llama.Llama:
    """A random plain base with fresh adapters attached; B drawn from N(0, b_scale) if > 0."""
    base = llama.create(base_model.base_config(cfg), mesh, seed=seed)
    adapters = nnx.to_pure_dict(llama.create_adapters(cfg, mesh, seed=seed))
    if b_scale:
        adapters = with_random_b(adapters, seed + 1, b_scale)
    graphdef, _, _ = train.split(llama.abstract(cfg, mesh))
    return nnx.merge(graphdef, adapters, nnx.to_pure_dict(nnx.state(base)))


def tokens(rows: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(rows, length))


@pytest.mark.parametrize("dtypes", [("float32", "float32"), ("bfloat16", "bfloat16")])
def test_zero_b_first_forward_equals_the_base_exactly(dtypes):
    base_dtype, dtype = dtypes
    mesh = single_mesh()
    cfg = lora_cfg(base_dtype=base_dtype, dtype=dtype)
    model = lora_model(cfg, mesh)
    base = llama.create(base_model.base_config(cfg), mesh, seed=0)
    ids = tokens(2, 24, VOCAB)
    np.testing.assert_array_equal(our_logits(model, ids), our_logits(base, ids))
    # The base is held in base_dtype, the adapters in param_dtype (fp32 for Adam).
    attention = model.layers[0].attention
    assert attention.q[...].dtype == jnp.dtype(base_dtype)
    assert attention.lora["q"].a[...].dtype == jnp.float32
    assert not np.any(np.asarray(attention.lora["q"].b[...]))


def test_adapter_equals_x_a_b_times_alpha_over_rank_by_hand():
    """o's adapter contracts the [heads, head_dim] axes: x A B · α/r on flattened matrices."""
    mesh = single_mesh()
    cfg = llama.LlamaConfig(**ODD, dtype="float32", lora_rank=3, lora_alpha=5.0)
    model = lora_model(cfg, mesh, b_scale=0.3)
    adapter = model.layers[1].attention.lora["o"]
    a, b = np.asarray(adapter.a[...]), np.asarray(adapter.b[...])
    assert a.shape == (5, 6, 3) and b.shape == (3, 40)
    x = np.random.default_rng(0).normal(size=(2, 7, 5, 6)).astype(np.float32)
    by_hand = x.reshape(2, 7, 30) @ a.reshape(30, 3) @ b * (5.0 / 3)
    np.testing.assert_allclose(np.asarray(adapter(jnp.asarray(x))), by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_lora_logits_equal_hand_merged_weights_on_odd_shapes(scan_layers):
    """x W + x A B · α/r == x (W + A B · α/r), the merge computed here in numpy per weight."""
    mesh = single_mesh()
    cfg = llama.LlamaConfig(
        **ODD, dtype="float32", scan_layers=scan_layers, lora_rank=3, lora_alpha=5.0,
        base_dtype="float32", lora_targets=("q", "k", "o", "up", "down"),
    )  # fmt: skip
    model = lora_model(cfg, mesh, b_scale=0.3)
    params = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))
    layers = [params["layers"]] if scan_layers else list(params["layers"].values())
    for block in layers:
        for part in ("attention", "mlp"):
            for name, adapter in block[part].pop("lora").items():
                w = block[part][name]
                a, b = adapter["a"], adapter["b"]
                stack = w.shape[0] if scan_layers else None
                for i in range(stack or 1):
                    ai, bi = (a[i], b[i]) if stack else (a, b)
                    wi = w[i] if stack else w
                    in_size = int(np.prod(ai.shape[:-1]))
                    delta = ai.reshape(in_size, 3) @ bi.reshape(3, -1) * (5.0 / 3)
                    merged = wi.reshape(in_size, -1) + delta
                    if stack:
                        w[i] = merged.reshape(wi.shape)
                    else:
                        block[part][name] = merged.reshape(wi.shape)
    plain = llama.abstract(base_model.base_config(cfg), mesh)
    graphdef, state = nnx.split(plain)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jax.device_put(x, replicated), params))
    reference = nnx.merge(graphdef, state)
    ids = tokens(2, 19, ODD["vocab_size"], seed=1)
    ours = our_logits(model, ids)
    np.testing.assert_allclose(ours, our_logits(reference, ids), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(ours, our_logits(merge.merge_lora(model), ids), atol=2e-5)
    # The adapters matter: without them the logits differ.
    base_only = llama.create(base_model.base_config(cfg), mesh, seed=0)
    assert np.abs(ours - our_logits(base_only, ids)).max() > 1e-2


def lora_trainer(mesh, cfg, *, microbatches: int = 1, steps: int = 10):
    """(state, frozen, step_fn, eval_fn, batch_sharding) of a LoRA run as loop.fit builds it."""
    tx, schedule = train.make_optimizer(optim_config(), steps)
    graphdef, abstract_state, abstract_frozen = train.abstract_train_state(
        cfg, mesh, sharding.DEFAULT_RULES, tx
    )
    _, params, frozen = train.split(lora_model(cfg, mesh))
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    state = train.init_state(params, tx, shardings, 0)
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn, eval_fn = train.jit_steps_for(
        cfg, graphdef, abstract_state, abstract_frozen, tx, schedule, microbatches, batch_sharding
    )
    return state, frozen, step_fn, eval_fn, batch_sharding


def run_steps(mesh, cfg, batches, **kwargs):
    state, frozen, step_fn, _, batch_sharding = lora_trainer(mesh, cfg, **kwargs)
    losses = []
    with jax.set_mesh(mesh):
        for batch in batches:
            state, metrics = step_fn(state, train.global_batch(batch, batch_sharding), frozen)
            losses.append(float(metrics["loss"]))
    return state, frozen, losses


@pytest.fixture(scope="module")
def batches():
    return packed_batches(random_examples(200, VOCAB), batch_size=8, seq_len=64, steps=4)


def test_training_changes_only_the_adapters_and_saves_only_them(batches):
    mesh = single_mesh()
    cfg = lora_cfg()
    state, frozen, _, _, _ = lora_trainer(mesh, cfg)
    frozen_before = jax.tree.map(np.array, frozen)
    adapters_before = jax.tree.map(np.array, state.params)
    state, frozen_after, losses = run_steps(mesh, cfg, batches)
    assert losses[-1] < losses[0]
    # The base is bit-identical (it is an argument of the step, never an output).
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.array, frozen_after))
    # Every trainable leaf is an adapter; A and B both moved.
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)]
    assert paths and all("'lora'" in p for p in paths)
    moved = jax.tree.map(
        lambda x, y: bool(np.any(x != np.asarray(y))), adapters_before, state.params
    )
    assert all(jax.tree.leaves(moved))
    # Adam's moments follow the adapters only: the state is ~the adapters' size x 3.
    state_size = sum(x.size for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim)
    adapter_size = sum(x.size for x in jax.tree.leaves(state.params))
    assert state_size == 3 * adapter_size
    assert adapter_size < 0.2 * sum(x.size for x in jax.tree.leaves(frozen))


def test_accumulated_microbatches_equal_one_big_batch(batches):
    mesh = single_mesh()
    cfg = lora_cfg()
    _, _, one = run_steps(mesh, cfg, batches)
    state_m, _, accumulated = run_steps(mesh, cfg, batches, microbatches=4)
    np.testing.assert_allclose(accumulated, one, rtol=1e-5)


@pytest.mark.parametrize("scan_layers, remat", [(False, "full"), (True, "save_dots")])
def test_rematerialised_lora_equals_no_remat(batches, scan_layers, remat):
    """Remat recomputes the adapters' path (dropout masks included) exactly as it ran."""
    mesh = single_mesh()
    cfg = dict(lora_dropout=0.1, scan_layers=scan_layers)
    _, _, stored = run_steps(mesh, lora_cfg(**cfg, remat="none"), batches[:3])
    _, _, recomputed = run_steps(mesh, lora_cfg(**cfg, remat=remat), batches[:3])
    np.testing.assert_allclose(recomputed, stored, rtol=1e-5)


def test_sharded_lora_run_equals_single_device(batches):
    cfg = lora_cfg()
    _, _, single = run_steps(single_mesh(), cfg, batches)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    state, _, sharded = run_steps(mesh, cfg, batches)
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    # Adapters follow the rules of the weights they adapt: q's B splits its heads over tensor.
    b = state.params["layers"][0]["attention"]["lora"]["q"]["b"]
    assert b.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
    a = state.params["layers"][0]["attention"]["lora"]["q"]["a"]
    assert a.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)


def test_dropout_changes_training_only_and_is_seeded(batches):
    mesh = single_mesh()
    _, _, plain = run_steps(mesh, lora_cfg(), batches)
    _, _, dropped = run_steps(mesh, lora_cfg(lora_dropout=0.5), batches)
    _, _, again = run_steps(mesh, lora_cfg(lora_dropout=0.5), batches)
    assert dropped == again  # keyed by the state's rng: reproducible, so resumable
    assert dropped[0] == pytest.approx(plain[0], rel=1e-6)  # B = 0: dropout cannot show yet
    assert abs(dropped[-1] - plain[-1]) > 1e-5  # B is still small after 4 steps
    # Evaluation never drops: same parameters, same loss with or without dropout configured.
    state, frozen, _, eval_fn, batch_sharding = lora_trainer(mesh, lora_cfg(lora_dropout=0.5))
    with jax.set_mesh(mesh):
        first = train.evaluate(eval_fn, state.params, batches[:1], batch_sharding, frozen)
        second = train.evaluate(eval_fn, state.params, batches[:1], batch_sharding, frozen)
    assert first == second


def test_bad_lora_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="choose from q, k, v, o, gate, up, down"):
        lora_cfg(lora_targets="q,qkv")
    with pytest.raises(ValueError, match="need rank >= 0"):
        lora_cfg(lora_rank=-1)
    assert lora.parse_targets("v, q") == ("q", "v")
    assert lora.parse_targets("all") == lora.TARGETS
    assert lora.parse_targets("v_proj,q_proj,down_proj") == ("q", "v", "down")  # PEFT's names
    assert lora.parse_targets("all-linear") == lora.TARGETS


def test_resume_refuses_switching_between_lora_and_full_fine_tuning():
    from train_fixtures import base_config

    saved = json.loads(json.dumps(base_config().to_dict()))
    del saved["model"]["lora"]  # a checkpoint from before LoRA existed: full fine-tuning
    new = base_config()
    new.model.lora.rank = 8
    with pytest.raises(resume_check.ConfigChanged, match="model.lora.rank: 0 -> 8"):
        resume_check.check(saved, new.to_dict(), saved_step=10)
    same = base_config()
    same.model.lora.rank = 8
    changed_alpha = base_config()
    changed_alpha.model.lora.rank, changed_alpha.model.lora.alpha = 8, 32.0
    with pytest.raises(resume_check.ConfigChanged, match="allow_config_change"):
        resume_check.check(same.to_dict(), changed_alpha.to_dict(), saved_step=10)


@pytest.mark.slow
def test_lora_run_killed_resumes_identically_and_refuses_another_base(tmp_path):
    """Through the CLI on a Hugging Face base held in int8: kill -9, rerun, the same losses bit
    for bit; the checkpoints hold only adapters; a different base at model.hf_path exits 2."""
    from hf_fixtures import make_hf_llama

    train_file, val_file, tok_dir, vocab = demo_corpus(tmp_path / "corpus")
    base_dir = tmp_path / "base"
    make_hf_llama(base_dir, vocab_size=vocab, max_position_embeddings=128)
    values = short_run(
        train_file,
        val_file,
        tok_dir,
        **{
            "model.hf_path": str(base_dir),
            "model.lora.rank": 4,
            "model.lora.dropout": 0.1,  # the dropout key must resume too
            "model.base_dtype": "int8",  # codes and scales rebuilt identically on resume
            "optim.lr": 1e-2,
            "checkpoint.export_hf": True,
            # 8 steps, checkpoints at 4 and 8: the dropout masks (unsafe_rbg, see lora.py) cost
            # seconds a step on CPU, and 4 resumed steps compare bit for bit as well as 8.
            "train.num_steps": 8,
        },
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = tmp_path / "uninterrupted"
    # Only its losses are compared: no export (the resumed run's is checked below).
    reference_values = {**values, "checkpoint.export_hf": False}
    subprocess.run(main_command(reference, reference_values), check=True, env=env, cwd=ROOT)

    run = tmp_path / "interrupted"
    first = subprocess.Popen(
        main_command(run, values), env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for_step(run, 6, first)  # past the checkpoint of step 4
    first.send_signal(signal.SIGKILL)
    first.wait()
    subprocess.run(main_command(run, values), check=True, env=env, cwd=ROOT, capture_output=True)
    expected, resumed = train_losses(reference), train_losses(run)
    assert sorted(resumed) == sorted(expected) == list(range(1, 9))
    np.testing.assert_array_equal(
        [resumed[s] for s in range(1, 9)], [expected[s] for s in range(1, 9)]
    )
    assert expected[8] < expected[1]
    assert (run / "peft_adapter" / "adapter_model.safetensors").exists()

    # The checkpoint holds the adapters alone, and its record names the base's files.
    ckpt = checkpoint.Checkpointer(run / "checkpoints", max_to_keep=10, async_save=False)
    record = ckpt.restore_record(8)
    assert set(record["base_model"]["files"]) == {"model.safetensors"}
    config = config_with(values)
    tx, _ = train.make_optimizer(config.optim, 8)
    cfg = config_lib.model_config(config.model)
    _, abstract_state, _ = train.abstract_train_state(
        cfg, sharding.make_mesh(), sharding.DEFAULT_RULES, tx
    )
    state, _ = ckpt.restore(8, abstract_state)  # Orbax refuses a target that misses leaves
    ckpt.close()
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    assert leaves and all("'lora'" in jax.tree_util.keystr(p) for p, _ in leaves)

    # Another base under the same path: the adapters' checkpoint is refused, one line, exit 2.
    make_hf_llama(base_dir, vocab_size=vocab, max_position_embeddings=128, seed=1)
    refused = subprocess.run(
        main_command(run, {**values, "train.num_steps": 12}),
        env=env, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "is not the base model the LoRA checkpoint of step 8 was trained on" in refused.stderr
    assert "model.safetensors: same size, different content" in refused.stderr
    assert "Traceback" not in refused.stderr


# --- int8 base (model.base_dtype="int8") ---


def test_int8_codes_round_trip_within_half_a_step_per_output_channel():
    w = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 5, 6)) * jnp.arange(1, 31.0).reshape(
        1, 1, 5, 6
    )
    w = w.at[0, :, 0, 0].set(0.0)  # an all-zero channel stays exact
    codes, scale = int8.quantize(w, num_in=1, leading=1)
    assert codes.dtype == jnp.int8 and scale.shape == (2, 1, 5, 6)
    assert int(jnp.abs(codes).max()) == 127  # every channel's absmax maps to ±127
    error = jnp.abs(int8.dequantize(codes, scale, jnp.float32) - w)
    assert bool(jnp.all(error <= scale / 2 + 1e-6))
    assert float(jnp.abs(int8.dequantize(codes, scale, jnp.float32)[0, :, 0, 0]).max()) == 0.0


@pytest.mark.parametrize("scan_layers", [False, True])
def test_int8_base_is_the_dequantised_base_and_trains_only_adapters(tmp_path, scan_layers):
    """The int8 LoRA model computes with codes x scale: equal to a plain model holding those
    dequantised weights, close to the bf16 base, and its merge is what it computes."""
    from hf_fixtures import make_hf_llama

    make_hf_llama(tmp_path / "base", vocab_size=VOCAB)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    values = {
        "model.hf_path": str(tmp_path / "base"),
        "model.dtype": "float32",
        "model.scan_layers": scan_layers,
        "model.lora.rank": 4,
        "model.base_dtype": "int8",
    }
    config = config_with(values)
    cfg = config_lib.model_config(config.model)
    params, frozen = base_model.initial_params(config, cfg, mesh, sharding.DEFAULT_RULES)
    layer = frozen["layers"] if scan_layers else frozen["layers"][0]
    assert layer["attention"]["q"].dtype == jnp.int8
    assert layer["attention"]["o_scale"].shape[-3:] == (1, 1, 64)
    assert frozen["embedding"].dtype == jnp.bfloat16  # only the projections are quantised
    graphdef, _, _ = train.split(llama.abstract(cfg, mesh))
    model = nnx.merge(graphdef, params, frozen)
    ids = tokens(2, 16, VOCAB)
    zero_b = our_logits(model, ids)

    # B = 0, so the logits are the merged (dequantised, adapter-free) model's, exactly.
    np.testing.assert_allclose(zero_b, our_logits(merge.merge_lora(model), ids), atol=1e-5)
    bf16 = config_with({**values, "model.base_dtype": "bfloat16"})
    bf16_params, bf16_frozen = base_model.initial_params(
        bf16, config_lib.model_config(bf16.model), mesh, sharding.DEFAULT_RULES
    )
    bf16_model = nnx.merge(graphdef_of(bf16, mesh), bf16_params, bf16_frozen)
    reference = our_logits(bf16_model, ids)
    relative = np.abs(zero_b - reference).max() / np.abs(reference).max()
    print(f"int8 base vs bf16 base: max |logit difference| / max |logit| = {relative:.4f}")
    assert 0 < relative < 0.02, relative

    frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
    bf16_bytes = sum(x.nbytes for x in jax.tree.leaves(bf16_frozen))
    assert frozen_bytes < 0.7 * bf16_bytes, (frozen_bytes, bf16_bytes)

    # It trains: the adapters learn, the codes and scales stay bit-identical.
    tx, schedule = train.make_optimizer(optim_config(), 10)
    _, abstract_state, abstract_frozen = train.abstract_train_state(
        cfg, mesh, sharding.DEFAULT_RULES, tx
    )
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    state = train.init_state(params, tx, shardings, 0)
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn, _ = train.jit_steps_for(
        cfg, graphdef, abstract_state, abstract_frozen, tx, schedule, 1, batch_sharding
    )
    before = jax.tree.map(np.array, frozen)
    losses = []
    with jax.set_mesh(mesh):
        for batch in packed_batches(random_examples(100, VOCAB), batch_size=8, seq_len=64, steps=4):
            state, metrics = step_fn(state, train.global_batch(batch, batch_sharding), frozen)
            losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, frozen))


def graphdef_of(config, mesh):
    cfg = config_lib.model_config(config.model)
    return train.split(llama.abstract(cfg, mesh))[0]


def test_adapter_count_and_lora_flops_match_the_model():
    """lora.num_params counts what the model holds; a LoRA step is credited 4 FLOPs per frozen
    weight (no weight gradient) + 6 per adapter weight, not full fine-tuning's 6 per weight."""
    from sftjax import metrics

    for targets in ("all", "q,v", "o,down"):
        cfg = llama.LlamaConfig(**ODD, lora_rank=3, lora_targets=targets)
        held = jax.tree.leaves(nnx.state(llama.abstract(cfg, single_mesh()), nnx.LoRAParam))
        assert lora.num_params(cfg) == sum(x.size for x in held)
    cfg = llama.LlamaConfig(**ODD, lora_rank=3)
    full = llama.LlamaConfig(**ODD)
    attention = 6 * ODD["num_layers"] * ODD["num_heads"] * ODD["head_dim"] * 64
    matmul = (metrics.flops_per_token(full, 64) - attention) / 6
    assert metrics.flops_per_token(cfg, 64) == 4 * matmul + 6 * lora.num_params(cfg) + attention
