"""Command line: `python -m sftjax.main --config=configs/llama2_7b.py --workdir=runs/7b`.

Turns flags into `loop.fit(config, workdir)`; everything else lives below. Config overrides
use ml_collections syntax: `--config.optim.lr=1e-5 --config.data.train_files=data/*.jsonl`.
Exit codes: 0 done (also after SIGTERM with a checkpoint saved), 2 a user error (bad config,
data, paths, or the workdir in use by another run; one message, `--verbose` adds the
traceback), 3 diverged (non-finite loss), 4 a checkpoint could not be written (disk full),
130 interrupted before anything could be saved.
"""

import contextlib
import logging
import sys

import jax
from absl import flags
from ml_collections import config_flags

from sftjax import checkpoint, cli, loop, workdir_lock

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Checkpoints, metrics and the HF export go here; an existing checkpoint there is resumed.",
)
_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    False,
    "Call jax.distributed.initialize() first (one process per host: TPU pods, SLURM).",
)
flags.mark_flags_as_required(["config", "workdir"])

log = logging.getLogger("sftjax")


def main(argv: list[str]) -> None:
    del argv
    cli.setup_logging()
    if _MULTIHOST.value:
        jax.distributed.initialize()
    log.info("jax: %d %s device(s)", jax.device_count(), jax.devices()[0].platform)
    checkpoint.quiet_background_failures()
    # One process per workdir; in a multi-host run all hosts share it and process 0 holds it.
    holding = jax.process_index() == 0
    try:
        with workdir_lock.hold(_WORKDIR.value) if holding else contextlib.nullcontext():
            result = loop.fit(_CONFIG.value, _WORKDIR.value)
    except loop.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except checkpoint.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(4)
    except KeyboardInterrupt:
        print("interrupted before a checkpoint could be saved", file=sys.stderr)
        sys.exit(130)
    if result.stop_reason == "preempted":
        print(f"preempted: saved step {result.last_step}; rerun the same command to resume")
        return
    print(
        f"{result.stop_reason} at step {result.last_step}; best step {result.best_step} "
        f"(validation loss {result.best_val_loss:.4f}); export: {result.export_dir}"
    )


if __name__ == "__main__":
    cli.run(main)
