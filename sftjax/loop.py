"""fit(): build everything from the config, then one flat loop of steps, evals and checkpoints.

Owns the order of events, in four phases that read top to bottom: `_prepare` (validate, read
and encode the data, compile the steps: every user error surfaces here, before any weights are
read), `_start` (resume the newest good checkpoint or initialise), `_train` (the loop: steps,
evaluation every `eval.every_steps`, checkpoints, early stopping, preemption) and `_finish`
(restore the best parameters, export to Hugging Face). Metrics are read one step late so the
host never waits on the device between steps. SIGTERM and Ctrl-C are answered in every phase
(interrupts.py): the loop saves after the step, a save or the export finishes first, anywhere
else the run stops at once; each way it ends "preempted" with a resumable workdir.
"""

import collections
import dataclasses
import logging
import math
import time

import jax
import ml_collections
import tqdm
from flax import nnx
from safetensors import SafetensorError

from sftjax import (
    base_model,
    checkpoint,
    generate,
    interrupts,
    metrics,
    paths,
    resume_check,
    sharding,
    train,
)
from sftjax import config as config_lib
from sftjax.data import batches, chat_templates, pipeline, prepare, tokenize
from sftjax.model import hf_export, llama, merge

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
    export_dir: paths.Path | None


@dataclasses.dataclass
class _Run:
    """Everything built from the config before the first step; read-only afterwards."""

    config: ml_collections.ConfigDict
    workdir: paths.Path
    mesh: jax.sharding.Mesh
    rules: sharding.Rules
    cfg: llama.LlamaConfig
    tok: tokenize.SegmentTokenizer
    template: object  # the training template (pipeline.make_template): prompts, eval, export
    data_iter: object  # grain iterator of this process's training batches
    # (source name, this process's batches) per mixture source; one ("", batches) without one
    val_sets: list[tuple[str, list]]
    total_steps: int
    graphdef: nnx.GraphDef
    abstract_state: train.TrainState
    abstract_frozen: dict  # the frozen LoRA base (shapes and shardings); {} for full FT
    base_identity: dict | None  # the LoRA base's files (sizes, sampled hashes); in every record
    inputs: dict  # data, tokenizer and template files by content (contents.py); in every record
    tx: object  # optax.GradientTransformation
    step_fn: object
    eval_fn: object
    batch_sharding: jax.sharding.NamedSharding


def fit(config: ml_collections.ConfigDict, workdir) -> FitResult:
    """Train per `config`, resuming from `workdir` (local or gs://) if it holds a checkpoint."""
    workdir = paths.resolve(workdir)
    with interrupts.Interrupts() as signals:
        try:
            return _fit(config, workdir, signals)
        except interrupts.StopRun as stop:  # before or after the loop: nothing was being written
            last = _latest_saved(workdir / "checkpoints")
            saved = f"; step {last} is saved" if last is not None else ""
            log.info("%s: stopped%s", stop, saved)
            return FitResult("preempted", last, None, None, None, None)


def _latest_saved(directory: paths.Path) -> int | None:
    """The newest finished checkpoint in `directory`, read as Orbax reads it (read-only)."""
    if not directory.exists():
        return None
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=1, async_save=False, read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def loss_text(loss: float | None) -> str:
    """A validation loss for the user; a checkpoint saved by a stop signal has none."""
    return "n/a (never evaluated)" if loss is None else f"{loss:.4f}"


def _fit(config, workdir: paths.Path, signals: interrupts.Interrupts) -> FitResult:
    run = _prepare(config, workdir)
    if jax.process_index() == 0:
        for export in ("hf_export", "peft_adapter"):
            hf_export.recover_export(run.workdir / export)
    ckpt = checkpoint.Checkpointer(
        run.workdir / "checkpoints",
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save,
    )
    try:
        state, frozen, early, start_step = _start(run, ckpt)
        # still "now" mode: a signal while it opens (tensorboardX imports) stops here too
        writer = metrics.MetricsWriter(run.workdir, resume_step=start_step)
    except interrupts.StopRun:
        ckpt.close()
        raise
    try:
        with signals.at_steps():
            stop_reason, step, state = _train(
                run, ckpt, writer, state, frozen, early, start_step, signals
            )
        with signals.deferred():
            ckpt.wait()
        # Multi-host, only the loop's sync point stops all hosts together (the export gathers).
        if stop_reason == "preempted" or (signals.requested and not signals.multihost):
            log.info("saved step %d; rerun the same command to resume", step)
            ckpt.close()
            return FitResult("preempted", step, early.best_step, early.best_loss, None, None)
        del state  # free the live state before the best one is read back
        try:
            return _finish(run, ckpt, writer, stop_reason, step, early, frozen, signals)
        except interrupts.StopRun:
            ckpt.close()
            raise
    finally:
        writer.close()


def _prepare(config: ml_collections.ConfigDict, workdir: paths.Path) -> _Run:
    """Validate, read and encode the data, build the jitted steps: fails before any compile."""
    config_lib.validate(config, jax.device_count(), jax.process_count())
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = config_lib.sharding_rules(config)
    cfg = config_lib.model_config(config.model)

    tok = tokenize.load_tokenizer(config.data.tokenizer)
    template = pipeline.make_template(config.data, tok)
    data, inputs = prepare.ensure(
        config.data, workdir, tok, template, process_index=jax.process_index()
    )
    largest_id = data.manifest["max_token_id"]
    if largest_id >= cfg.vocab_size:  # an id past the table would embed as NaN, not fail
        raise config_lib.ConfigError(
            f"the data uses token id {largest_id} (the tokenizer at {config.data.tokenizer} has "
            f"{len(tok.hf)} tokens) but the model's vocab_size is {cfg.vocab_size}; use the "
            f"model's own tokenizer or, for a random init, set config.model.vocab_size"
        )
    log.info("data (%s):\n%s", data.directory, data.manifest["report"])
    if not len(data.validation):
        raise config_lib.ConfigError(
            "no validation examples: give data.validation_files or raise data.validation_fraction"
        )
    data_kwargs = dict(
        seq_len=config.data.seq_len,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_bins=config.data.packing_bins,
    )
    train_data = batches.train_dataset(
        data.train, batch_size=config.train.batch_size, seed=config.data.shuffle_seed,
        num_epochs=config.data.num_epochs, pack=config.data.pack, mix=data.sources, **data_kwargs,
    )  # fmt: skip
    steps_in_data = len(train_data)
    total_steps = min(steps_in_data, config.train.num_steps or steps_in_data)
    val_sets = _validation_sets(config, data, data_kwargs)

    tx, schedule = train.make_optimizer(config.optim, total_steps)
    graphdef, abstract_state, abstract_frozen = train.abstract_train_state(cfg, mesh, rules, tx)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    step_fn, eval_fn = train.jit_steps_for(
        cfg, graphdef, abstract_state, abstract_frozen, tx, schedule,
        config.train.microbatches, batch_sharding,
    )  # fmt: skip
    if cfg.lora_rank:
        _log_lora(cfg, abstract_state, abstract_frozen)
    return _Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        rules=rules,
        cfg=cfg,
        tok=tok,
        template=template,
        data_iter=batches.iterate(train_data),
        val_sets=val_sets,
        total_steps=total_steps,
        graphdef=graphdef,
        abstract_state=abstract_state,
        abstract_frozen=abstract_frozen,
        base_identity=base_model.identity(config),
        inputs=inputs,
        tx=tx,
        step_fn=step_fn,
        eval_fn=eval_fn,
        batch_sharding=batch_sharding,
    )


def _validation_sets(config, data: prepare.Prepared, data_kwargs: dict) -> list[tuple[str, list]]:
    """This process's validation batches: all of them, or per mixture source (those with
    held-out examples; the others are named in the log)."""
    kwargs = dict(batch_size=config.eval.batch_size, pack=config.data.pack_validation)
    if not data.sources:
        return [("", list(batches.validation_batches(data.validation, **kwargs, **data_kwargs)))]
    sets = []
    for s, name in enumerate(data.source_names):
        if not (data.validation.sources == s).any():
            log.warning("source %s has no validation examples: no validation loss of its own", name)
            continue
        found = batches.validation_batches(data.validation, source=s, **kwargs, **data_kwargs)
        sets.append((name, list(found)))
    return sets


def _start(run: _Run, ckpt: checkpoint.Checkpointer):
    """(state, frozen base, early stopping, first step): the newest good checkpoint, else a
    fresh model. Under LoRA the base is read again from model.hf_path, checked to be the one
    the checkpoint's adapters were trained on."""
    config = run.config
    early = train.EarlyStopping(config.eval.patience, config.eval.min_delta)

    warned = False

    def check_config(step: int, record: dict) -> None:
        """Refuse a resume whose config or base model changes the run (exit 2)."""
        nonlocal warned
        base_model.check_identity(record.get("base_model"), run.base_identity, step)
        if "inputs" not in record and not warned:  # once, not per step tried
            log.warning(resume_check.NO_FINGERPRINTS)
            warned = True
        inputs = resume_check.inputs(run.inputs, run.base_identity)
        changes = resume_check.check_record(record, config.to_dict(), inputs, step)
        log.info(resume_check.describe(changes))

    found = ckpt.restore_newest(run.abstract_state, check=check_config)
    if found is None:
        params, frozen = base_model.initial_params(config, run.cfg, run.mesh, run.rules)
        shardings = jax.tree.map(lambda a: a.sharding, run.abstract_state)
        state = train.init_state(params, run.tx, shardings, config.train.seed)
        return state, frozen, early, 0
    step, state, record = found
    frozen = base_model.frozen_params(config, run.cfg, run.mesh, run.rules)
    # One batch per step, so the index is the step where a record predates the field.
    run.data_iter.set_state(record.get("data_iter", {"next_index": step}))
    # The rule's parameters follow the config (eval.* may change on resume); its state resumes.
    saved = {**record["early_stopping"], "patience": early.patience, "min_delta": early.min_delta}
    early = train.EarlyStopping(**saved)
    log.info("resumed from step %d (%s)", step, ckpt.directory)
    return state, frozen, early, step


def _evaluate(run: _Run, params, frozen) -> dict:
    """Validation loss over every held-out token; with a mixture also per source ("loss/NAME").

    The total, which early stopping follows, weighs every validation token alike: sources count
    by their held-out tokens, not by their mixture weights.
    """
    if len(run.val_sets) == 1 and not run.val_sets[0][0]:
        return train.evaluate(run.eval_fn, params, run.val_sets[0][1], run.batch_sharding, frozen)
    per_source = {
        name: train.evaluate(run.eval_fn, params, found, run.batch_sharding, frozen)
        for name, found in run.val_sets
    }
    tokens = sum(r["loss_tokens"] for r in per_source.values())
    total = sum(r["loss"] * r["loss_tokens"] for r in per_source.values()) / tokens
    result = {"loss": total, "loss_tokens": tokens}
    result["batches"] = sum(r["batches"] for r in per_source.values())
    for name, r in per_source.items():
        result[f"loss/{name}"], result[f"loss_tokens/{name}"] = r["loss"], r["loss_tokens"]
    return result


def _log_lora(cfg: llama.LlamaConfig, abstract_state, abstract_frozen) -> None:
    trained = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    frozen = sum(x.size for x in jax.tree.leaves(abstract_frozen))
    log.info(
        "LoRA rank %d, alpha %g on %s: %s trainable parameters (%.3f%% of %s; base frozen in %s)",
        cfg.lora_rank,
        cfg.lora_alpha,
        ",".join(cfg.lora_targets),
        f"{trained:,}",
        100 * trained / frozen,
        f"{frozen:,}",
        cfg.base_dtype,
    )


def _train(run: _Run, ckpt, writer, state, frozen, early, start_step: int, signals):
    """The loop; returns (stop reason, last step, state)."""
    config = run.config
    is_main = jax.process_index() == 0
    flops_token = metrics.flops_per_token(run.cfg, config.data.seq_len)
    peak = metrics.peak_flops_per_device(config.train.peak_tflops_per_device)
    tokens_per_step = config.train.batch_size * config.data.seq_len
    total_steps = run.total_steps
    progress = tqdm.tqdm(
        total=total_steps, initial=start_step, disable=not is_main, desc="train", dynamic_ncols=True
    )

    def record() -> dict:
        """JSON saved with every checkpoint: what an exact resume needs beyond the arrays."""
        return {
            "data_iter": run.data_iter.get_state(),
            "early_stopping": dataclasses.asdict(early),
            "config": config.to_dict(),
            "base_model": run.base_identity,
            "inputs": run.inputs,
        }

    def diverged(what: str) -> TrainingDiverged:
        """The error that stops a diverged run, once the saves under way are on disk."""
        ckpt.wait()
        latest = ckpt.latest_step()
        saved = (
            f"the checkpoints on disk (latest step {latest}) are from before"
            if latest is not None
            else "no checkpoint was saved before it"
        )
        return TrainingDiverged(f"{what}; stopping: {saved}; lower optim.lr or check the data")

    history = collections.deque(maxlen=train.COLLAPSE_WINDOW)  # (step, loss, grad norm)
    warmup_steps = round(config.optim.warmup_ratio * total_steps)
    lowest_loss = math.inf  # a collapse is a return to ln(V) after learning something

    def log_train(step: int, values: dict, steps: int) -> None:
        """Log one step's metrics (non-finite or collapsed: stop); throughput over `steps`."""
        nonlocal lowest_loss
        values = {k: float(v) for k, v in jax.device_get(values).items()}  # waits for the step
        seconds = time.perf_counter() - window_start
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            raise diverged(
                f"loss {values['loss']}, gradient norm {values['grad_norm']} at step {step}"
            )
        history.append((step, values["loss"], values["grad_norm"]))
        lowest_loss = min(lowest_loss, values["loss"])
        collapsed = train.collapse_reason(
            history, run.cfg.vocab_size, warmup_steps, lowest_loss=lowest_loss
        )
        if collapsed:
            ckpt.wait()
            raise TrainingDiverged(collapsed)
        tokens_per_s = tokens_per_step * steps / max(seconds, 1e-9)
        values.update(tokens_per_s=tokens_per_s, mfu=metrics.mfu(tokens_per_s, flops_token, peak))
        writer.write(step, "train", values)
        progress.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")

    def evaluate(step: int) -> float:
        result = _evaluate(run, state.params, frozen)
        val_loss = result["loss"]
        if not math.isfinite(val_loss):
            raise TrainingDiverged(f"validation loss is {val_loss} at step {step}")
        improved = early.update(step, val_loss)
        writer.write(
            step, "eval", {**result, "best_step": early.best_step, "improved": int(improved)}
        )
        progress.write(
            f"step {step}: validation loss {val_loss:.4f} "
            f"(best {early.best_loss:.4f} at step {early.best_step})"
        )
        if config.eval.prompts:
            _answer_eval_prompts(
                run, nnx.merge(run.graphdef, state.params, frozen), step, writer, progress
            )
        return val_loss

    stop_reason, step = "completed", start_step
    if early.should_stop:  # resuming a run that had already stopped early: don't train on
        stop_reason, total_steps = "early_stopping", start_step
    pending, window_start, window_steps = None, time.perf_counter(), 0
    try:
        with jax.set_mesh(run.mesh):
            while step < total_steps:
                batch = train.global_batch(next(run.data_iter), run.batch_sharding)
                state, step_metrics = run.step_fn(state, batch, frozen)
                ckpt.check()  # a failed background save stops the run now, not at the next one
                step += 1
                window_steps += 1
                progress.update(1)
                if pending is not None:  # read one step late: the device stays busy
                    pending_step, pending_metrics = pending
                    if pending_step % config.train.log_every_steps == 0:
                        log_train(pending_step, pending_metrics, window_steps - 1)
                        window_start, window_steps = time.perf_counter(), 1
                pending = (step, step_metrics)

                preempted = signals.reached(step)
                at_eval = step % config.eval.every_steps == 0 or step == total_steps
                if at_eval or preempted:
                    log_train(step, step_metrics, window_steps)  # never save a diverged state
                    pending = None
                val_loss = evaluate(step) if at_eval else None
                if at_eval or preempted:
                    try:
                        ckpt.save(step, state, record(), val_loss)
                    except checkpoint.NonFiniteState as e:
                        raise diverged(str(e)) from e
                    writer.sync()
                    window_start, window_steps = time.perf_counter(), 0
                if preempted:
                    stop_reason = "preempted"
                    break
                if at_eval and early.should_stop:
                    stop_reason = "early_stopping"
                    break
    finally:
        progress.close()
    return stop_reason, step, state


def _finish(
    run: _Run, ckpt, writer, stop_reason: str, step: int, early, frozen, signals
) -> FitResult:
    """Restore the best checkpoint, export it, write the summary and the loss plot."""
    config = run.config
    # The restored checkpoint is the lowest validation loss saved; with min_delta > 0 that can
    # be a later step than early stopping's own best (an improvement too small to reset patience).
    best_step, best_state = ckpt.restore_best(run.abstract_state)  # a damaged one: the next
    best_loss = ckpt.val_loss(best_step)
    why = {
        "completed": f"completed {run.total_steps} steps",
        "early_stopping": f"early stopping: {early.patience} evaluations without improving "
        f"by more than {early.min_delta}",
    }[stop_reason]
    log.info(
        "stopped at step %d (%s); best validation loss %s at step %s",
        step,
        why,
        loss_text(best_loss),
        best_step,
    )
    best_model = nnx.merge(run.graphdef, best_state.params, frozen)
    export_dir = None
    with signals.deferred():  # a SIGTERM now would leave no export; it is nearly done
        if config.checkpoint.export_hf:
            log.info("exporting step %d to %s", best_step, run.workdir / "hf_export")
            export_dir = _export(run, best_model)
        writer.write(
            step,
            "summary",
            {"stop_reason": stop_reason, "best_step": best_step, "best_val_loss": best_loss},
        )
        writer.plot(best_step)
        ckpt.close()
    if signals.received:
        log.warning(
            "signal %s arrived during the export; the export finished first", signals.received
        )
    return FitResult(stop_reason, step, best_step, best_loss, best_model, export_dir)


def _export(run: _Run, best_model: llama.Llama) -> paths.Path:
    """hf_export/ (merged under LoRA) and, under LoRA, the PEFT adapter beside it.

    Both are written to staging directories first and put in place only when both are
    complete, so the two stay a pair. A failed write is CheckpointError (exit 4): the
    checkpoints and the previous export stay as they were, and a rerun exports again without
    training.
    """
    config = run.config
    written = False
    try:
        with hf_export.published_together() as pending:
            export_dir = hf_export.save_pretrained(
                # from the base as stored in model.hf_path, not its base_dtype copy
                merge.merge_lora(best_model, config.checkpoint.export_dtype, config.model.hf_path),
                run.workdir / "hf_export",
                tokenizer_dir=config.data.tokenizer,
                # chat_template.jinja, BOS rule and sftjax_format.json of the training format
                **chat_templates.export_settings(run.template, run.tok),
                dtype=config.checkpoint.export_dtype,
                bos_token_id=run.tok.bos_id or run.tok.eos_id,
                eos_token_id=run.tok.eos_id,
                base_dir=config.model.hf_path or None,  # its eos ids and generation settings
                overwrite=True,
                pending=pending,
            )
            if run.cfg.lora_rank:  # the adapters alone, for PEFT, beside the merged model
                hf_export.save_adapter(
                    best_model,
                    run.workdir / "peft_adapter",
                    base_model_name_or_path=str(paths.resolve(config.model.hf_path))
                    if config.model.hf_path
                    else "",
                    overwrite=True,
                    pending=pending,
                )
            written = True  # what fails from here on is putting them in place
    except (OSError, SafetensorError) as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        state = (  # nothing is replaced before every write succeeded
            "the checkpoints are intact, but putting the finished export in place failed, so "
            "the previous export may be partly replaced"
            if written
            else "the checkpoints and the previous export are intact"
        )
        raise checkpoint.CheckpointError(
            f"writing the export under {run.workdir} failed ({reason}); {state}. Free disk "
            "space, then rerun the same command: it exports again without training"
        ) from e
    return export_dir


def _answer_eval_prompts(run: _Run, model: llama.Llama, step, writer, progress) -> None:
    """Greedy answers to eval.prompts in the training template: behaviour, not only a loss."""
    prompts = run.config.eval.prompts
    if run.config.data.template == "alpaca":
        rows = [{"instruction": p} for p in prompts]
    else:
        rows = [{"messages": [{"role": "user", "content": p}]} for p in prompts]
    answers = generate.respond(
        model,
        run.tok,
        rows,
        template=run.template,
        max_new_tokens=run.config.eval.max_new_tokens,
    )
    samples = {
        f"prompt_{i}": f"{p!r} -> {a!r}"
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    }
    writer.write(step, "samples", samples)
    for line in samples.values():
        progress.write(f"  {line}")
