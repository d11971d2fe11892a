"""Orbax checkpoints: the train state, the data iterator and a JSON record in one atomic step.

Owns what a checkpoint holds ({state, data_iter, meta}), which ones are kept (the newest
`max_to_keep` plus the best by validation loss) and restoring them. Orbax writes each step to a
temporary directory and renames it when complete, so a save interrupted by a kill is never
restored. It does not decide when to save (train.py).
"""

import pathlib

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

VAL_LOSS = "val_loss"


class Checkpointer:
    """Latest-N + best-by-validation-loss checkpoints under `directory`."""

    def __init__(self, directory: pathlib.Path, *, max_to_keep: int, async_save: bool = True):
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
            best_fn=lambda metrics: metrics[VAL_LOSS],  # only so best_step() works
            best_mode="min",
            keep_checkpoints_without_metrics=False,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the lowest validation loss among kept checkpoints (None: no eval yet)."""
        steps_with_loss = [s for s in self._manager.all_steps() if self.val_loss(s) is not None]
        if not steps_with_loss:
            return None
        return min(steps_with_loss, key=self.val_loss)

    def val_loss(self, step: int) -> float | None:
        """The validation loss saved with `step`, if it was evaluated."""
        return (self._manager.metrics(step) or {}).get(VAL_LOSS)

    def save(self, step: int, state, data_iter, meta: dict, val_loss: float | None) -> None:
        """Queue an (async) save; `meta` is JSON (early stopping, config) for exact resume."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )
        metrics = None if val_loss is None else {VAL_LOSS: float(val_loss)}
        self._manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract_state, data_iter=None):
        """(state, data_iter, meta) of `step`; pass data_iter=None to restore only weights."""
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], restored.get("data_iter") if data_iter else None, restored["meta"]

    def restore_meta(self, step: int) -> dict:
        """Only the JSON record of `step` (its config, early-stopping state)."""
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def wait(self) -> None:
        """Block until background saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def with_shardings(shapes, shardings):
    """ShapeDtypeStructs of `shapes` carrying `shardings` (concrete mesh): restore targets."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )
