"""Command line: `python -m sftjax.main --config=configs/llama2_7b.py --workdir=runs/7b`.

Turns flags into `loop.fit(config, workdir)`; everything else lives below. Config overrides
use ml_collections syntax: `--config.optim.lr=1e-5 --config.data.train_files=data/*.jsonl`.
Exit codes: 0 done (also after SIGTERM with a checkpoint saved), 2 bad config or bad data,
3 diverged (non-finite loss).
"""

import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from sftjax import config as config_lib
from sftjax import loop
from sftjax.data import chat_templates, records

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


def main(argv: list[str]) -> None:
    del argv
    if _MULTIHOST.value:
        jax.distributed.initialize()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        result = loop.fit(_CONFIG.value, _WORKDIR.value)
    except (config_lib.ConfigError, records.BadRowsError, chat_templates.TemplateError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except loop.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    print(
        f"{result.stop_reason} at step {result.last_step}; best step {result.best_step} "
        f"(validation loss {result.best_val_loss:.4f}); export: {result.export_dir}"
    )


if __name__ == "__main__":
    app.run(main)
