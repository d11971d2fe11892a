"""The train step and what surrounds it: state, optimizer, masked loss, evaluation, early stopping.

Owns the math of one optimizer step (token-weighted masked cross-entropy over the *global*
batch; gradient accumulation sums numerators and token counts before dividing once, so it
equals one big batch) and the evaluation/early-stopping rules. The loop that drives them,
with data, checkpoints and logging, is `fit()` in loop.py.
"""

import dataclasses
import functools
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sftjax import sharding
from sftjax.model import llama

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
# Tokens per row whose logits the loss holds at once (see loss_sums).
LOSS_CHUNK_TOKENS = 512


@flax.struct.dataclass
class TrainState:
    """What trains and is checkpointed. Under LoRA only the adapters: the frozen base weights
    travel beside it (`frozen`, an argument of every step, never donated nor saved)."""

    step: jax.Array
    params: dict  # nnx.to_pure_dict of the trainable Params; the graphdef is closed over
    opt_state: optax.OptState
    rng: jax.Array  # advanced every step; LoRA dropout's key


def trainable(cfg: llama.LlamaConfig):
    """The nnx filter of what trains: the LoRA adapters, or every parameter."""
    return nnx.LoRAParam if cfg.lora_rank else nnx.Param


def split(model: llama.Llama) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, trainable params, frozen params) as pure dicts; frozen is {} without LoRA."""
    graphdef, params, frozen = nnx.split(model, trainable(model.cfg), ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)


def lr_schedule(optim, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over warmup_ratio·total_steps, then cosine to lr·end_lr_ratio."""
    warmup = round(optim.warmup_ratio * total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim.lr * optim.end_lr_ratio,
    )


def _decay_mask(params: dict) -> dict:
    """True for weight matrices; False for RMSNorm scales, biases and the embedding table."""

    def decays(path, _) -> bool:
        names = [str(getattr(k, "key", k)) for k in path]
        return not any(n == "embedding" or n.endswith(("norm", "bias")) for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping then AdamW on the warmup+cosine schedule."""
    schedule = lr_schedule(optim, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=None if optim.decay_norms_and_embeddings else _decay_mask,
    )
    if optim.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw), schedule
    return adamw, schedule


def loss_chunks(length: int) -> int:
    """How many sequence chunks the loss takes: the fewest of at most LOSS_CHUNK_TOKENS each."""
    return next(c for c in range(-(-length // LOSS_CHUNK_TOKENS), length + 1) if length % c == 0)


def loss_sums(
    graphdef: nnx.GraphDef, params: dict, batch: dict, frozen: dict | None = None, rng=None
) -> tuple[jax.Array, jax.Array]:
    """(Σ CE·mask, Σ mask) in fp32; divide once per global batch, never per row.

    `frozen`: the base weights under LoRA (no gradient flows to them); `rng`: LoRA dropout.

    The output projection and cross-entropy run one sequence chunk at a time under a scan, each
    chunk rematerialised in the backward pass, so the [B, L, V] fp32 logits (2 GiB per chip for
    8 rows × 2048 × 32k) never exist whole: only one chunk's, forward or backward.
    """
    model = nnx.merge(graphdef, params, {} if frozen is None else frozen)
    x_BLD, _ = model.hidden_states(
        batch["tokens"], batch["positions"], batch["segment_ids"], rng=rng
    )
    rows, length, _ = x_BLD.shape
    chunks = loss_chunks(length)

    def by_chunk(x):  # [B, L, ...] -> [C, B, L/C, ...], chunks leading for the scan
        return jnp.moveaxis(x.reshape(rows, chunks, length // chunks, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_ce_sum(x_BlD, targets_Bl, mask_Bl):
        logits_BlV = model.logits(x_BlD).astype(jnp.float32)
        ce_Bl = optax.softmax_cross_entropy_with_integer_labels(logits_BlV, targets_Bl)
        return (ce_Bl * mask_Bl).sum()

    def body(total, chunk):
        return total + chunk_ce_sum(*chunk), None

    mask_BL = batch["loss_mask"].astype(jnp.float32)
    xs = (by_chunk(x_BLD), by_chunk(batch["targets"]), by_chunk(mask_BL))
    loss_sum, _ = jax.lax.scan(body, jnp.float32(0), xs)
    return loss_sum, mask_BL.sum()


def _split_microbatches(batch: dict, microbatches: int) -> dict:
    """[B, L] -> [M, B/M, L] taking rows i, i+M, ... so every device feeds every microbatch."""

    def split(x):
        rows, length = x.shape
        micro = x.reshape(rows // microbatches, microbatches, length).swapaxes(0, 1)
        return sharding.constrain(micro, (None, "batch", "seq"))

    return jax.tree.map(split, batch)


def train_step(
    state: TrainState,
    batch: dict,
    frozen: dict,
    *,
    graphdef,
    tx,
    schedule,
    microbatches: int,
    dropout: bool = False,
):
    """One optimizer step on the global batch -> (new state, metrics).

    `dropout`: the model has LoRA dropout, keyed by state.rng (and the microbatch index).
    """
    grad_fn = jax.value_and_grad(
        lambda params, micro, rng: loss_sums(graphdef, params, micro, frozen, rng), has_aux=True
    )
    rng = state.rng if dropout else None

    if microbatches == 1:
        (loss_sum, tokens), grads = grad_fn(state.params, batch, rng)
    else:

        def accumulate(carry, indexed):
            grads_acc, loss_acc, tokens_acc = carry
            index, micro = indexed
            micro_rng = None if rng is None else jax.random.fold_in(rng, index)
            (loss_sum, tokens), grads = grad_fn(state.params, micro, micro_rng)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            return (grads_acc, loss_acc + loss_sum, tokens_acc + tokens), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        init = (zeros, jnp.float32(0), jnp.float32(0))
        micro_batches = (jnp.arange(microbatches), _split_microbatches(batch, microbatches))
        (grads, loss_sum, tokens), _ = jax.lax.scan(accumulate, init, micro_batches)
    denominator = jnp.maximum(tokens, 1.0)  # a batch of only prompts has no loss tokens
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        rng=jax.random.fold_in(state.rng, state.step),
    )
    metrics = {
        "loss": loss_sum / denominator,
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state.step),
        "loss_tokens": tokens,
        "real_fraction": (batch["segment_ids"] > 0).mean(),
    }
    return new_state, metrics


def eval_sums(params: dict, batch: dict, frozen: dict, *, graphdef) -> tuple[jax.Array, jax.Array]:
    """(Σ CE·mask, Σ mask) of one validation batch; the caller adds them over the whole set."""
    return loss_sums(graphdef, params, batch, frozen)


def jit_steps(
    graphdef,
    tx,
    schedule,
    microbatches: int,
    state_shardings,
    batch_sharding,
    frozen_shardings=None,
    *,
    dropout: bool = False,
):
    """The jitted train step `(state, batch, frozen)` (explicit shardings, donated state) and
    eval step `(params, batch, frozen)`; `frozen` is {} without LoRA."""
    frozen_shardings = {} if frozen_shardings is None else frozen_shardings
    step = jax.jit(
        functools.partial(
            train_step,
            graphdef=graphdef,
            tx=tx,
            schedule=schedule,
            microbatches=microbatches,
            dropout=dropout,
        ),
        in_shardings=(state_shardings, batch_sharding, frozen_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    evaluate_batch = jax.jit(
        functools.partial(eval_sums, graphdef=graphdef),
        in_shardings=(state_shardings.params, batch_sharding, frozen_shardings),
    )
    return step, evaluate_batch


def jit_steps_for(
    cfg, graphdef, abstract_state, abstract_frozen, tx, schedule, microbatches, batch_sharding
):
    """jit_steps for the trees `abstract_train_state` returned (their shardings), with LoRA
    dropout when the model has it: the step fit() runs and the planner compiles."""
    return jit_steps(
        graphdef,
        tx,
        schedule,
        microbatches,
        jax.tree.map(lambda a: a.sharding, abstract_state),
        batch_sharding,
        jax.tree.map(lambda a: a.sharding, abstract_frozen),
        dropout=cfg.lora_dropout > 0,
    )


def state_shardings_for(param_shardings: dict, abstract_params: dict, tx) -> TrainState:
    """Shardings of every TrainState leaf: optimizer moments follow their parameter."""
    any_sharding = jax.tree.leaves(param_shardings)[0]
    replicated = NamedSharding(any_sharding.mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(
        step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated
    )


def abstract_train_state(cfg: llama.LlamaConfig, mesh, rules, tx):
    """(graphdef, TrainState, frozen params), all ShapeDtypeStructs with their concrete
    shardings: no memory. `frozen` is {} without LoRA.

    The restore target of a checkpoint and the input spec of the jitted step; the mesh may
    differ from the one the checkpoint was written on (Orbax reshards on restore).
    """
    graphdef, abstract_params, abstract_frozen = nnx.split(
        llama.abstract(cfg, mesh, rules), trainable(cfg), ...
    )
    frozen = _with_shardings(
        nnx.to_pure_dict(abstract_frozen),
        nnx.to_pure_dict(sharding.state_shardings(abstract_frozen, mesh, rules)),
    )
    param_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh, rules))
    abstract_params = _with_shardings(nnx.to_pure_dict(abstract_params), param_shardings)
    shardings = state_shardings_for(param_shardings, abstract_params, tx)
    shapes = jax.eval_shape(
        lambda: TrainState(
            jnp.int32(0), abstract_params, tx.init(abstract_params), jax.random.PRNGKey(0)
        )
    )
    return graphdef, _with_shardings(shapes, shardings), frozen


def _with_shardings(shapes, shardings):
    """ShapeDtypeStructs of `shapes` carrying `shardings` (concrete mesh): restore targets."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )


def init_state(params: dict, tx, shardings: TrainState, seed: int) -> TrainState:
    """A fresh TrainState around (already sharded) params; moments born in their sharding."""
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return TrainState(
        step=jax.device_put(jnp.int32(0), shardings.step),
        params=params,
        opt_state=opt_state,
        rng=jax.device_put(jax.random.PRNGKey(seed), shardings.rng),
    )


def global_batch(host_batch: dict, batch_sharding: NamedSharding) -> dict:
    """This process's numpy rows -> global jax.Arrays split over data×fsdp."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(host_batch[k]))
        for k in BATCH_KEYS
    }


def evaluate(evaluate_batch, params, host_batches, batch_sharding, frozen=None) -> dict:
    """Token-weighted loss over the whole validation set (sums in float64 on the host)."""
    frozen = {} if frozen is None else frozen
    sums = [evaluate_batch(params, global_batch(b, batch_sharding), frozen) for b in host_batches]
    loss_sum, tokens = (
        float(np.sum(np.asarray(x, np.float64))) for x in zip(*jax.device_get(sums), strict=True)
    )
    if tokens == 0:
        raise ValueError("validation set has no loss tokens")
    return {"loss": loss_sum / tokens, "loss_tokens": int(tokens), "batches": len(host_batches)}


@dataclasses.dataclass
class EarlyStopping:
    """Stop after `patience` evaluations that fail to beat the best loss by more than min_delta.

    Its state is saved in every checkpoint, so a resumed run stops exactly where an
    uninterrupted one would.
    """

    patience: int
    min_delta: float = 0.0
    best_loss: float = math.inf
    best_step: int = -1
    evals_without_improvement: int = 0

    def update(self, step: int, loss: float) -> bool:
        """Record one evaluation; True if it is the new best."""
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.evals_without_improvement = loss, step, 0
            return True
        self.evals_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.evals_without_improvement >= self.patience


COLLAPSE_WINDOW = 5  # logged train steps in a row that must all show the collapse


def collapse_reason(
    history: Sequence[tuple[int, float, float]],
    vocab_size: int,
    warmup_steps: int,
    window: int = COLLAPSE_WINDOW,
    lowest_loss: float = -math.inf,
) -> str | None:
    """Why training can no longer learn, from the logged (step, loss, grad_norm); None if it can.

    Two signs, each over the last `window` logged steps: a gradient norm of exactly 0 (nothing
    can move the parameters again), or, after warmup, a loss within 1e-3 of ln(vocab_size), the
    loss of the uniform distribution a too-large learning rate collapses a model to (lr=1e4 on
    the tiny preset: both within 5 steps). Free: the loop reads these values to log them anyway.
    The second sign needs `lowest_loss` (the lowest logged so far) 0.1 below ln(V): a randomly
    initialised model sits at ln(V) too, and at a small learning rate it may stay there a while.
    """
    recent = list(history)[-window:]
    if len(recent) < window:
        return None
    (first, *_), (last, loss, _) = recent[0], recent[-1]
    uniform = math.log(vocab_size)
    if all(grad_norm == 0.0 for _, _, grad_norm in recent):
        what = "the gradient norm is 0.0: nothing can change the parameters any more"
    elif lowest_loss < uniform - 0.1 and all(
        step > warmup_steps and abs(x - uniform) < 1e-3 for step, x, _ in recent
    ):
        what = "the model predicts the uniform distribution over its vocabulary"
    else:
        return None
    return (
        f"training collapsed at steps {first}-{last}: {what} (loss {loss:.4f}, "
        f"ln(vocab_size) = {uniform:.4f}); lower optim.lr and start again from a checkpoint "
        "saved before the collapse or a new workdir"
    )
