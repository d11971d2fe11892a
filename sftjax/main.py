"""Command line: `python -m sftjax.main --config=configs/llama2_7b.py --workdir=runs/7b`.

Turns flags into `loop.fit(config, workdir)`; everything else lives below. Config overrides
use ml_collections syntax: `--config.optim.lr=1e-5 --config.data.train_files=data/*.jsonl`.
Exit codes: 0 done, also after SIGTERM or Ctrl-C at any moment (the workdir resumes), 2 a user
error (bad config, data, paths, an unusable workdir or one in use by another run; one message,
`--verbose` adds the traceback), 3 diverged (non-finite loss), 4 a checkpoint or the export
could not be written (disk full), 130 aborted (a second Ctrl-C, or Ctrl-C before the start).
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
    if not (_WORKDIR.value or "").strip():  # `--workdir=$UNSET`: never the current directory
        raise workdir_lock.WorkdirError("--workdir is empty; name a directory (an unset variable?)")
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
        # The failed writes' asyncio tasks report "exception was never retrieved" as they are
        # collected at exit, once each: echoes of the one failure reported above.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        sys.exit(4)
    except KeyboardInterrupt:  # before the run installed its handlers: nothing was started
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if result.stop_reason == "preempted" and result.last_step is None:
        print("stopped before the first checkpoint: nothing to save; rerun to start again")
        return
    if result.stop_reason == "preempted":
        print(f"preempted: saved step {result.last_step}; rerun the same command to resume")
        return
    print(
        f"{result.stop_reason} at step {result.last_step}; best step {result.best_step} "
        f"(validation loss {loop.loss_text(result.best_val_loss)}); export: {result.export_dir}"
    )


if __name__ == "__main__":
    cli.run(main)
