"""fit(): build everything from the config, then one flat loop of steps, evals and checkpoints.

Owns the order of events: resume or initialise, train, evaluate every `eval.every_steps`,
checkpoint (newest + best), early-stop, restore the best parameters, export to Hugging Face.
Metrics are read one step late so the host never waits on the device between steps.
"""

import dataclasses
import logging
import math
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import tqdm
from flax import nnx

from sftjax import checkpoint, generate, metrics, sharding, train
from sftjax import config as config_lib
from sftjax.data import chat_templates, pipeline, tokenize
from sftjax.model import hf_io, llama

log = logging.getLogger("sftjax")


class TrainingDiverged(RuntimeError):
    """A non-finite loss; the checkpoints on disk predate it and are left untouched."""


@dataclasses.dataclass
class FitResult:
    stop_reason: str  # "completed", "early_stopping" or "preempted"
    last_step: int
    best_step: int | None
    best_val_loss: float | None
    model: llama.Llama | None  # best parameters restored (None when preempted)
    export_dir: pathlib.Path | None


class _Preemption:
    """SIGTERM sets a flag; the loop finishes its step, saves and returns."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _build_model(config, cfg: llama.LlamaConfig, mesh, rules) -> llama.Llama:
    if config.model.hf_path:
        return hf_io.load_pretrained(config.model.hf_path, mesh=mesh, rules=rules, **_numerics(cfg))
    return llama.create(cfg, mesh, seed=config.train.seed, rules=rules)


def _numerics(cfg: llama.LlamaConfig) -> dict:
    keys = ("param_dtype", "dtype", "scan_layers", "remat", "attention")
    return {k: getattr(cfg, k) for k in keys}


def _abstract_train_state(cfg: llama.LlamaConfig, mesh, rules, tx):
    """(graphdef, TrainState of ShapeDtypeStructs carrying their concrete shardings): no memory."""
    graphdef, abstract_params = nnx.split(llama.abstract(cfg, mesh, rules))
    param_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh, rules))
    abstract_params = checkpoint.with_shardings(nnx.to_pure_dict(abstract_params), param_shardings)
    shardings = train.state_shardings_for(param_shardings, abstract_params, tx)
    shapes = jax.eval_shape(
        lambda: train.TrainState(
            jnp.int32(0), abstract_params, tx.init(abstract_params), jax.random.PRNGKey(0)
        )
    )
    return graphdef, checkpoint.with_shardings(shapes, shardings)


def load_best(
    workdir: pathlib.Path, *, dtype: str | None = None
) -> tuple[llama.Llama, pathlib.Path]:
    """(best model, tokenizer dir) of a training workdir, from its Orbax checkpoints."""
    ckpt = checkpoint.Checkpointer(
        pathlib.Path(workdir) / "checkpoints", max_to_keep=1, async_save=False
    )
    step = ckpt.best_step()
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no complete checkpoint")
    config = ml_collections.ConfigDict(ckpt.restore_meta(step)["config"])
    if dtype:
        config.model.dtype = dtype
    cfg = config_lib.model_config(config.model)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = tuple(tuple(r) for r in config.mesh.rules) or sharding.DEFAULT_RULES
    tx, _ = train.make_optimizer(config.optim, 1)
    graphdef, abstract_state = _abstract_train_state(cfg, mesh, rules, tx)
    state, _, _ = ckpt.restore(step, abstract_state)
    ckpt.close()
    return nnx.merge(graphdef, state.params), pathlib.Path(config.data.tokenizer)


def _answer_eval_prompts(config, graphdef, params, tok, step, writer, progress) -> None:
    """Greedy answers to config.eval.prompts, logged: behaviour, not only a loss, over time."""
    if config.data.template == "chat":
        rows = [{"messages": [{"role": "user", "content": p}]} for p in config.eval.prompts]
    else:
        rows = [{"instruction": p} for p in config.eval.prompts]
    answers = generate.respond(
        nnx.merge(graphdef, params),
        tok,
        rows,
        template=pipeline.make_template(config.data, tok),  # issue 13: the training template
        max_new_tokens=config.eval.max_new_tokens,
    )
    samples = {
        f"prompt_{i}": f"{p!r} -> {a!r}"
        for i, (p, a) in enumerate(zip(config.eval.prompts, answers, strict=True))
    }
    writer.write(step, "samples", samples)
    for line in samples.values():
        progress.write(f"  {line}")


def fit(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> FitResult:
    """Train per `config`, resuming from `workdir` if it holds a checkpoint."""
    workdir = pathlib.Path(workdir)
    config_lib.validate(config, jax.device_count(), jax.process_count())
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = tuple(tuple(r) for r in config.mesh.rules) or sharding.DEFAULT_RULES
    cfg = config_lib.model_config(config.model)

    # Data first: bad rows fail here, before anything is compiled.
    tok = tokenize.load_tokenizer(config.data.tokenizer)
    train_examples, val_examples, report = pipeline.load_splits(config.data, tok)
    largest_id = max(max(e.tokens.max(), e.targets.max()) for e in train_examples + val_examples)
    if largest_id >= cfg.vocab_size:  # an id past the table would embed as NaN, not fail
        raise config_lib.ConfigError(
            f"the data uses token id {largest_id} (the tokenizer at {config.data.tokenizer} has "
            f"{len(tok.hf)} tokens) but the model's vocab_size is {cfg.vocab_size}; use the "
            f"model's own tokenizer or, for a random init, set config.model.vocab_size"
        )
    log.info("data:\n%s", report.summary())
    if not val_examples:
        raise config_lib.ConfigError(
            "no validation examples: give data.validation_files or raise data.validation_fraction"
        )
    data_kwargs = dict(
        seq_len=config.data.seq_len,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        pack=config.data.pack,
        num_bins=config.data.packing_bins,
    )
    train_kwargs = dict(
        batch_size=config.train.batch_size,
        seed=config.data.shuffle_seed,
        num_epochs=config.data.num_epochs,
        **data_kwargs,
    )
    steps_in_data = len(pipeline.train_dataset(train_examples, **train_kwargs))
    total_steps = min(steps_in_data, config.train.num_steps or steps_in_data)
    data_iter = pipeline.train_batches(train_examples, **train_kwargs)
    val_batches = list(
        pipeline.validation_batches(
            val_examples,
            batch_size=config.eval.batch_size,
            **{**data_kwargs, "pack": config.data.pack_validation},
        )
    )

    tx, schedule = train.make_optimizer(config.optim, total_steps)
    graphdef, abstract_state = _abstract_train_state(cfg, mesh, rules, tx)
    state_shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    step_fn, eval_fn = train.jit_steps(
        graphdef, tx, schedule, config.train.microbatches, state_shardings, batch_sharding
    )

    ckpt = checkpoint.Checkpointer(
        workdir / "checkpoints",
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save,
    )
    early = train.EarlyStopping(config.eval.patience, config.eval.min_delta)
    start_step = ckpt.latest_step()
    if start_step is None:
        start_step = 0
        params = nnx.to_pure_dict(nnx.state(_build_model(config, cfg, mesh, rules)))
        state = train.init_state(params, tx, state_shardings, config.train.seed)
    else:
        state, data_iter, meta = ckpt.restore(start_step, abstract_state, data_iter)
        early = train.EarlyStopping(**meta["early_stopping"])
        log.info("resumed from step %d (%s)", start_step, workdir / "checkpoints")

    writer = metrics.MetricsWriter(workdir, resume_step=start_step)
    flops_token = metrics.flops_per_token(cfg, config.data.seq_len)
    peak = metrics.peak_flops_per_device(config.train.peak_tflops_per_device)
    tokens_per_step = config.train.batch_size * config.data.seq_len
    preemption = _Preemption()
    progress = tqdm.tqdm(
        total=total_steps, initial=start_step, disable=not is_main, desc="train", dynamic_ncols=True
    )

    def checkpoint_record() -> dict:
        """JSON saved with every checkpoint: what an exact resume needs beyond the arrays."""
        return {"early_stopping": dataclasses.asdict(early), "config": config.to_dict()}

    def log_train(step: int, values: dict, steps: int) -> None:
        """Log one step's metrics; throughput over the `steps` since window_start."""
        values = {k: float(v) for k, v in jax.device_get(values).items()}  # waits for the step
        seconds = time.perf_counter() - window_start
        if not math.isfinite(values["loss"]):
            ckpt.wait()
            raise TrainingDiverged(
                f"loss is {values['loss']} at step {step}; stopping. Checkpoints on disk "
                f"(latest {ckpt.latest_step()}) are from before; lower optim.lr or check data"
            )
        tokens_per_s = tokens_per_step * steps / max(seconds, 1e-9)
        values.update(tokens_per_s=tokens_per_s, mfu=metrics.mfu(tokens_per_s, flops_token, peak))
        writer.write(step, "train", values)
        progress.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")

    stop_reason, step = "completed", start_step
    if early.should_stop:  # resuming a run that had already stopped early: don't train on
        stop_reason, total_steps = "early_stopping", start_step
    pending, window_start, window_steps = None, time.perf_counter(), 0
    try:
        with jax.set_mesh(mesh):
            while step < total_steps:
                batch = train.global_batch(next(data_iter), batch_sharding)
                state, step_metrics = step_fn(state, batch)
                step += 1
                window_steps += 1
                progress.update(1)
                if pending is not None:  # read one step late: the device stays busy
                    pending_step, pending_metrics = pending
                    if pending_step % config.train.log_every_steps == 0:
                        log_train(pending_step, pending_metrics, window_steps - 1)
                        window_start, window_steps = time.perf_counter(), 1
                pending = (step, step_metrics)

                at_eval = step % config.eval.every_steps == 0 or step == total_steps
                if at_eval or preemption.requested:
                    log_train(step, step_metrics, window_steps)
                    pending = None
                val_loss = None
                if at_eval:
                    result = train.evaluate(eval_fn, state.params, val_batches, batch_sharding)
                    val_loss = result["loss"]
                    if not math.isfinite(val_loss):
                        raise TrainingDiverged(f"validation loss is {val_loss} at step {step}")
                    improved = early.update(step, val_loss)
                    writer.write(
                        step,
                        "eval",
                        {**result, "best_step": early.best_step, "improved": int(improved)},
                    )
                    progress.write(
                        f"step {step}: validation loss {val_loss:.4f} "
                        f"(best {early.best_loss:.4f} at step {early.best_step})"
                    )
                    if config.eval.prompts:
                        _answer_eval_prompts(
                            config, graphdef, state.params, tok, step, writer, progress
                        )
                if at_eval or preemption.requested:
                    ckpt.save(step, state, data_iter, checkpoint_record(), val_loss)
                    window_start, window_steps = time.perf_counter(), 0
                if preemption.requested:
                    stop_reason = "preempted"
                    break
                if at_eval and early.should_stop:
                    stop_reason = "early_stopping"
                    break
    finally:
        progress.close()
        preemption.restore()
        ckpt.wait()

    if stop_reason == "preempted":
        log.info("SIGTERM: saved step %d; rerun the same command to resume", step)
        ckpt.close()
        writer.close()
        return FitResult(stop_reason, step, early.best_step, early.best_loss, None, None)

    # The restored checkpoint is the lowest validation loss saved; with min_delta > 0 that can
    # be a later step than early stopping's own best (an improvement too small to reset patience).
    best_step = ckpt.best_step()
    best_loss = ckpt.val_loss(best_step)
    why = {
        "completed": f"completed {total_steps} steps",
        "early_stopping": f"early stopping: {early.patience} evaluations without improving "
        f"by more than {early.min_delta}",
    }[stop_reason]
    log.info(
        "stopped at step %d (%s); best validation loss %.4f at step %s",
        step,
        why,
        best_loss,
        best_step,
    )
    del state  # free the live state before the best one is read back
    best_state, _, _ = ckpt.restore(best_step, abstract_state)
    best_model = nnx.merge(graphdef, best_state.params)
    export_dir = None
    if config.checkpoint.export_hf:
        export_dir = hf_io.save_pretrained(
            best_model,
            workdir / "hf_export",
            tokenizer_dir=config.data.tokenizer,
            # issue 13: chat_template.jinja, BOS rule and sftjax_format.json of the training format
            **chat_templates.export_settings(pipeline.make_template(config.data, tok), tok),
            dtype=config.checkpoint.export_dtype,
            bos_token_id=tok.bos_id or tok.eos_id,
            eos_token_id=tok.eos_id,
            overwrite=True,
        )
    writer.write(
        step,
        "summary",
        {"stop_reason": stop_reason, "best_step": best_step, "best_val_loss": best_loss},
    )
    writer.close()
    if is_main:
        metrics.plot_losses(workdir / "metrics.jsonl", workdir / "loss.png", best_step)
    ckpt.close()
    return FitResult(stop_reason, step, best_step, best_loss, best_model, export_dir)
