"""Orbax checkpoints: the train state and a JSON record in one atomic step, verified on restore.

Owns what a checkpoint holds ({state, meta}), which ones are kept (the newest `max_to_keep`
plus the best by validation loss), restoring them and reading a workdir's best model back.
Orbax writes each step to a temporary directory and renames it when complete, so a save
interrupted by a kill is never restored. The directory may be a URL (`gs://…`): Orbax writes
there itself.

The record (JSON) carries the data iterator's position, early-stopping state, the config and a
fingerprint of the state: per-leaf sums of the raw bits, modulo 2**32, exact and independent of
the mesh. A restore that fails, or whose fingerprint differs, is moved aside (objects copied,
then deleted, on object storage, which has no folders to rename) and the previous checkpoint
is tried; for the final export, the next best by validation loss. A reader of a workdir
(`read_best`, for generate) opens it read-only: it skips a damaged checkpoint and moves nothing.
The iterator position is one index shared by every process, so a checkpoint restores onto any
process count and any mesh with the same global batch. It does not decide when to save (loop.py).
"""

import json
import logging
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint import checkpoint_managers

from sftjax import base_model, paths, sharding, train
from sftjax import config as config_lib
from sftjax.model import llama

log = logging.getLogger("sftjax")

VAL_LOSS = "val_loss"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the run stops, earlier checkpoints are intact."""


class NonFiniteState(CheckpointError):
    """The state to be saved holds NaN or inf: saving it would make every resume diverge."""


class NoCheckpoint(config_lib.ConfigError):
    """A workdir given to read a model from holds no checkpoint that restores (exit 2)."""


class Checkpointer:
    """Latest-N + best-by-validation-loss checkpoints under `directory` (local or URL)."""

    def __init__(
        self, directory, *, max_to_keep: int, async_save: bool = True, read_only: bool = False
    ):
        """`read_only`: for readers of a workdir; nothing is created, cleaned up or moved."""
        keep = checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.LatestN(n=max_to_keep),
                checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[VAL_LOSS],
                    reverse=True,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=keep,
            # Orbax writes a step's metrics (val_loss()) only when a best_fn is set
            best_fn=lambda metrics: metrics[VAL_LOSS],
            best_mode="min",
            keep_checkpoints_without_metrics=False,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
            save_interval_steps=0 if read_only else 1,
        )
        self.directory = paths.resolve(directory)
        self.read_only = read_only
        self._last_queued: int | None = None  # named if a background save fails later
        self._unconfirmed = False  # a save was queued and nobody has seen it end yet
        # Orbax warns on every read-only open; the reader is read-only by design.
        quiet = _Without("Given directory is read only")
        logging.getLogger("absl").addFilter(quiet)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            logging.getLogger("absl").removeFilter(quiet)
        if not read_only:
            self._remove_unfinished()

    def _remove_unfinished(self) -> None:
        """Delete step directories a killed save left unfinished, before a step is saved again.

        On a local disk Orbax writes into a temporary name and renames at the end. Object
        storage has no rename: an unfinished step lives under its final name, without Orbax's
        commit marker, and saving that step again would write into its leftovers.
        """
        if not self.directory.exists():
            return
        finished = set(self.all_steps())
        unfinished = [
            p for p in self.directory.iterdir() if p.name.isdigit() and int(p.name) not in finished
        ]
        if unfinished and jax.process_index() == 0:
            for step_dir in unfinished:
                log.warning(
                    "removing unfinished checkpoint %s (its save was interrupted)", step_dir
                )
                paths.remove_tree(step_dir)
        if unfinished:
            multihost_utils.sync_global_devices("sftjax-remove-unfinished")

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def steps_best_first(self) -> list[int]:
        """Kept steps by validation loss, lowest first, then those never evaluated, newest first."""
        evaluated = sorted(
            (s for s in self.all_steps() if self.val_loss(s) is not None), key=self.val_loss
        )
        return evaluated + [s for s in reversed(self.all_steps()) if s not in evaluated]

    def val_loss(self, step: int) -> float | None:
        """The validation loss saved with `step`, if it was evaluated."""
        return (self._manager.metrics(step) or {}).get(VAL_LOSS)

    def save(self, step: int, state, record: dict, val_loss: float | None) -> None:
        """Queue an (async) save; `record` is JSON (iterator, early stopping, config).

        Raises CheckpointError if this or an earlier background save failed (disk full, lost
        permissions): the run must stop rather than go on without checkpoints.
        """
        record = {**record, "fingerprint": fingerprint(state)}
        if not is_finite(record["fingerprint"]):
            raise NonFiniteState(f"the state at step {step} holds NaN or inf; it was not saved")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record)
        )
        metrics = None if val_loss is None else {VAL_LOSS: float(val_loss)}
        self.wait()  # Orbax would wait for the previous save anyway; its failure is named here
        try:
            self._last_queued, self._unconfirmed = step, True
            self._manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:
            raise CheckpointError(_save_failure(self.directory, step, e)) from e

    def check(self) -> None:
        """Raise CheckpointError as soon as a background save has ended in failure (cheap).

        Orbax keeps a failed background save to itself until the next wait; once the save
        thread has ended, waiting returns at once and surfaces the error.
        """
        if self._unconfirmed and not self._manager.is_saving_in_progress():
            self.wait()

    def restore(self, step: int, abstract_state):
        """(state, record) of `step`, verified against the fingerprint saved with it."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        state, record = restored["state"], restored["meta"]
        saved = record.get("fingerprint")
        if saved is not None and fingerprint(state) != saved:
            raise ValueError("the restored arrays differ from the fingerprint saved with them")
        return state, record

    def restore_newest(self, abstract_state, *, check=None):
        """(step, state, record) of the newest checkpoint that restores and verifies, or None.

        A damaged checkpoint is moved to `<checkpoints>/../damaged_checkpoints/` with one
        warning, never deleted, and the one before it is tried. `check(step, record)` runs on
        the JSON record before any array is read; what it raises (a refused config change)
        propagates: it is the user's call, not damage.
        """
        for step in reversed(self.all_steps()):
            state = record = error = None
            try:
                record = self.restore_record(step)
            except Exception as e:  # the JSON record is missing or cut
                error = e
            if record is not None and check is not None:
                check(step, record)
            if record is not None:
                try:
                    state, record = self.restore(step, abstract_state)
                except Exception as e:  # any unreadable file, truncated array, wrong fingerprint
                    error = e
            if _all_processes_agree(error is None):
                return step, state, record
            self._set_aside(step, error, "trying the one before")
        return None

    def restore_best(self, abstract_state) -> tuple[int, object]:
        """(step, state) of the lowest validation loss that restores and verifies.

        A damaged one is set aside with one warning and the next best is tried, so a damaged
        best checkpoint costs the export its best step, never the export.
        """
        while steps := self.steps_best_first():
            step, error = steps[0], None
            try:
                state, _ = self.restore(step, abstract_state)
            except Exception as e:  # any unreadable file, truncated array, wrong fingerprint
                error = e
            if _all_processes_agree(error is None):
                return step, state
            self._set_aside(step, error, "using the next best by validation loss")
        raise CheckpointError(f"no checkpoint under {self.directory} restores")

    def restore_record(self, step: int) -> dict:
        """Only the JSON record of `step` (its config, early-stopping state)."""
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return self._manager.restore(step, args=args)["meta"]

    def _set_aside(self, step: int, error: Exception | None, then: str) -> None:
        aside = self.directory.parent / "damaged_checkpoints" / f"{step}-{int(time.time())}"
        log.warning(
            "checkpoint step %d is damaged (%s); moved to %s, %s", step, _reason(error), aside, then
        )
        if jax.process_index() == 0:
            _move_tree(self.directory / str(step), aside)
        multihost_utils.sync_global_devices(f"sftjax-set-aside-{step}")
        self._manager.reload()

    def wait(self) -> None:
        """Block until background saves are on disk (raises CheckpointError if one failed)."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
            self._unconfirmed = False
        except Exception as e:
            raise CheckpointError(_save_failure(self.directory, self._last_queued, e)) from e

    def close(self) -> None:
        self.wait()
        self._manager.close()


def quiet_background_failures() -> None:
    """Keep a failed background save to one line: the cause reaches the user as CheckpointError.

    When a save fails in Orbax's writer thread (disk full), Orbax logs the error with its
    traceback, and every pending tensorstore callback then prints "RuntimeError: Event loop is
    closed" with a traceback of its own (1,700+ lines for one failure, the cause buried). The
    log line stays without its traceback; the closed-loop echoes are dropped. Both are
    background noise, never the first report of a problem.
    """

    class _NoTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if "orbax" in record.pathname or record.name == "asyncio":
                record.exc_info, record.exc_text = None, None
            return True

    logging.getLogger("absl").addFilter(_NoTraceback())
    # The futures of the failed writes then report "exception was never retrieved" through
    # asyncio's logger, each with the same traceback again.
    logging.getLogger("asyncio").addFilter(_NoTraceback())

    def closed_loop(value) -> bool:
        return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"

    def orbax_coroutine(obj) -> bool:
        """A read of a damaged checkpoint fails in one of Orbax's gathered coroutines; the
        others, failing alike, are collected unawaited and echo the same error with a
        traceback ("Exception ignored in: <coroutine ...>"). The first one was raised and
        reported (the step is set aside or named), so the echoes are dropped."""
        code = getattr(obj, "cr_code", None)
        return code is not None and "orbax" in code.co_filename

    # tensorstore reports through both hooks (PyErr_Print and PyErr_WriteUnraisable).
    previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda kind, value, tb: (
        None if closed_loop(value) else previous_excepthook(kind, value, tb)
    )
    sys.unraisablehook = lambda unraisable: (
        None
        if closed_loop(unraisable.exc_value) or orbax_coroutine(unraisable.object)
        else previous_unraisablehook(unraisable)
    )


class _Without(logging.Filter):
    """Drops log records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _reason(error: Exception | None) -> str:
    reason = f"{type(error).__name__}: {error}" if error else "damaged on another process"
    return reason.splitlines()[0][:300]


def _move_tree(source: paths.Path, target: paths.Path) -> None:
    """Rename a directory; on object storage (no directories to rename) copy every object,
    then delete the originals. Interrupted, the step stays where it was (and is set aside
    again by the next run) or is already whole at `target`."""
    if not paths.is_remote(source):
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
        return
    for item in source.iterdir():
        if item.is_dir():
            _move_tree(item, target / item.name)
        else:
            target.mkdir(parents=True, exist_ok=True)
            item.copy(target / item.name, overwrite=True)
    paths.remove_tree(source)


def _save_failure(directory, step: int | None, error: BaseException) -> str:
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    at = f"step {step}" if step is not None else "a checkpoint"
    return (
        f"saving {at} under {directory} failed ({type(cause).__name__}: "
        f"{str(cause).splitlines()[0] if str(cause) else ''}); earlier checkpoints are intact. "
        "Free disk space or fix permissions, then rerun the same command to resume"
    )


def _all_processes_agree(ok: bool) -> bool:
    """True only if `ok` on every process (so all restore the same step or none does)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _leaf_sums(leaves: list) -> jax.Array:
    """[leaves, 3] uint32: Σbits, Σbits², all-finite, per leaf (wrapping sums: exact, any mesh)."""
    rows = []
    for x in leaves:
        bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
        finite = jnp.all(jnp.isfinite(x)).astype(jnp.uint32)
        rows.append(
            jnp.stack([bits.sum(dtype=jnp.uint32), (bits * bits).sum(dtype=jnp.uint32), finite])
        )
    return jnp.stack(rows)


_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def fingerprint(state) -> list[list[int]]:
    """Per-leaf checksums of a (sharded) train state, computed on device: a cheap exact check."""
    leaves = jax.tree.leaves(state)
    replicated = NamedSharding(leaves[0].sharding.mesh, PartitionSpec())
    sums = jax.jit(_leaf_sums, out_shardings=replicated)(leaves)
    return np.asarray(jax.device_get(sums)).tolist()


def is_finite(record_fingerprint: list[list[int]]) -> bool:
    """Whether every floating leaf of a fingerprinted state was finite."""
    return all(row[2] == 1 for row in record_fingerprint)


def read_best(workdir, *, dtype: str | None = None) -> tuple[llama.Llama, dict]:
    """(model, JSON record) of the best checkpoint of a training workdir that restores.

    Read-only: a damaged checkpoint is skipped with a warning (the next best by validation
    loss is read) and left where it is; the training run, when rerun, sets it aside. Raises
    NoCheckpoint (exit 2) when none restores. The model is built from the recorded config
    outside the damage handling: a config that no longer builds (model.hf_path moved, its
    config.json changed) is the user's to fix and says so once, not "damaged" per step.
    """
    workdir = paths.resolve(workdir)
    directory = workdir / "checkpoints"
    ckpt = Checkpointer(directory, max_to_keep=1, async_save=False, read_only=True)
    try:
        steps = ckpt.steps_best_first()
        if not steps:
            raise NoCheckpoint(
                f"{directory} holds no complete checkpoint yet: a run saves its first at "
                "its first evaluation (eval.every_steps) or when stopped by SIGTERM/Ctrl-C"
            )
        built = {}  # recorded config (JSON) -> its model; one entry unless a resume changed it
        skipped = []
        for step in steps:
            try:
                record = ckpt.restore_record(step)
                key = json.dumps(record["config"], sort_keys=True)
            except Exception as e:  # the JSON record is missing or cut
                skipped.append(step)
                log.warning("checkpoint step %d is damaged (%s); not used", step, _reason(e))
                continue
            if key not in built:
                built[key] = _Recorded(record["config"], dtype, workdir)
            model = built[key]
            try:
                state, record = ckpt.restore(step, model.abstract_state)
            except Exception as e:  # any unreadable file, truncated array, wrong fingerprint
                skipped.append(step)
                log.warning("checkpoint step %d is damaged (%s); not used", step, _reason(e))
                continue
            if skipped:
                log.warning(
                    "using step %d instead (validation loss %s); rerun the training command "
                    "to set the damaged checkpoints aside",
                    step,
                    ckpt.val_loss(step),
                )
            break
        else:
            raise NoCheckpoint(
                f"no checkpoint under {directory} restores (steps {steps} are damaged)"
            )
    finally:
        ckpt.close()
    config, cfg = model.config, model.cfg
    if cfg.lora_rank:  # the checkpoint holds the adapters; the base is read where it was
        base_model.check_identity(record.get("base_model"), base_model.identity(config), step)
    frozen = base_model.frozen_params(config, cfg, model.mesh, model.rules)
    return nnx.merge(model.graphdef, state.params, frozen), record


class _Recorded:
    """The model and train state a checkpoint's recorded config describes (shapes only)."""

    def __init__(self, recorded: dict, dtype: str | None, workdir: paths.Path):
        self.config = ml_collections.ConfigDict(recorded)
        if dtype:
            self.config.model.dtype = dtype
        try:
            self.cfg = config_lib.model_config(self.config.model)
        except (ValueError, OSError) as e:  # hf_io.CheckpointError is a ValueError
            reason, base = str(e).splitlines()[0], self.config.model.hf_path
            raise config_lib.ConfigError(
                f"reading {workdir} needs the architecture in model.hf_path={base}/config.json "
                f"(the checkpoints hold weights only): {reason}; put the base model back there"
                if base
                else f"the config recorded in {workdir}'s checkpoints builds no model: {reason}"
            ) from e
        self.mesh = sharding.make_mesh(
            self.config.mesh.data, self.config.mesh.fsdp, self.config.mesh.tensor
        )
        self.rules = config_lib.sharding_rules(self.config)
        tx, _ = train.make_optimizer(self.config.optim, 1)
        self.graphdef, self.abstract_state, _ = train.abstract_train_state(
            self.cfg, self.mesh, self.rules, tx
        )
