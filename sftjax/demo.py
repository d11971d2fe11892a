"""The embedded default: `python -m sftjax.demo` shows the whole mission on a laptop CPU.

Writes synthetic instruction data and trains a tokenizer (demo_data.py), fine-tunes the tiny
config through the same `loop.fit` as the 7B config (early stopping restores the best
checkpoint), then answers held-out test instructions with the KV-cache generator and prints
exact-match accuracy per task type and five sample answers. Nothing is downloaded.
Rerun with the same --workdir after an interruption (SIGTERM saves a checkpoint) to resume.
"""

import collections
import json
import pathlib
import time

from absl import flags
from ml_collections import config_flags

from sftjax import cli, demo_data, generate, loop, workdir_lock
from sftjax import config as config_lib
from sftjax.data import tokenize

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(pathlib.Path(__file__).resolve().parents[1] / "configs/tiny.py"),
    "Demo config; data paths are replaced by the files this run writes.",
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for data, checkpoints, export; a rerun there resumes."
)
_TRAIN_ROWS = flags.DEFINE_integer("train_rows", 1800, "Synthetic training instructions.")
_VALIDATION_ROWS = flags.DEFINE_integer("validation_rows", 200, "Validation instructions.")
_TEST_PER_TASK = flags.DEFINE_integer("test_per_task", 20, "Held-out test items per task type.")
_DATA_SEED = flags.DEFINE_integer("data_seed", 0, "Seed of the synthetic data.")


def prepare(
    workdir: pathlib.Path,
    config,
    *,
    train_rows: int,
    validation_rows: int,
    test_per_task: int,
    seed: int,
) -> list[dict]:
    """Write data + tokenizer under workdir, point `config` at them; return the test rows.

    A rerun in the same workdir (e.g. after SIGTERM) reuses what the first run wrote, so the
    training resumes on the same data; it must ask for the same data, or it is refused.
    """
    data = workdir / "demo_rows"  # WORKDIR/data is where fit prepares them
    made = {
        "train_rows": train_rows,
        "validation_rows": validation_rows,
        "test_per_task": test_per_task,
        "seed": seed,
    }
    marker = data / "prepared.json"  # written last: its presence means the data is complete
    if marker.exists():
        saved = json.loads(marker.read_text())
        vocab = saved.pop("vocab_size")
        if saved != made:
            raise config_lib.ConfigError(
                f"{workdir} holds demo data made with {saved}, not {made}; rerun with those "
                "flags to resume, or give a new --workdir"
            )
    else:
        lock = workdir_lock.LOCK_NAME
        ours = {"demo_rows", "tokenizer", lock, f"{lock}.takeover"}
        if workdir.exists() and {p.name for p in workdir.iterdir()} - ours:
            raise config_lib.ConfigError(
                f"{workdir} is not empty and holds no demo data; give a new --workdir"
            )
        train, validation, test = demo_data.make_splits(
            seed, train_rows, validation_rows, test_per_task
        )
        demo_data.write_jsonl(train, data / "train.jsonl")
        demo_data.write_jsonl(validation, data / "validation.jsonl")
        demo_data.write_jsonl(test, data / "test.jsonl")
        texts = [f"{r['instruction']}\n{r['response']}" for r in train]
        vocab = demo_data.train_tokenizer(
            texts, workdir / "tokenizer", config.model.vocab_size or 512
        )
        marker.write_text(json.dumps({**made, "vocab_size": vocab}))
    config.data.train_files = str(data / "train.jsonl")
    config.data.validation_files = str(data / "validation.jsonl")
    config.data.tokenizer = str(workdir / "tokenizer")
    config.model.vocab_size = vocab
    return [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]


def score(
    model, tok, test: list[dict], template: str = "alpaca"
) -> tuple[dict, list[tuple[dict, str]]]:
    """Exact-match accuracy per task on `test` (prompted with the training template)."""
    # One batch: one compile.
    answers = generate.respond(model, tok, test, template=template, max_new_tokens=24)
    hits, totals = collections.Counter(), collections.Counter()
    for row, answer in zip(test, answers, strict=True):
        totals[row["task"]] += 1
        hits[row["task"]] += answer.strip() == row["response"]
    accuracy = {task: hits[task] / totals[task] for task in totals}
    accuracy["overall"] = sum(hits.values()) / sum(totals.values())
    return accuracy, list(zip(test, answers, strict=True))


def main(argv) -> None:
    del argv
    cli.setup_logging()
    start = time.perf_counter()
    workdir = pathlib.Path(_WORKDIR.value or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    config = _CONFIG.value
    config_lib.validate_keys(config)  # before any data is written (the rest needs the data)
    with workdir_lock.hold(workdir):
        test = prepare(
            workdir,
            config,
            train_rows=_TRAIN_ROWS.value,
            validation_rows=_VALIDATION_ROWS.value,
            test_per_task=_TEST_PER_TASK.value,
            seed=_DATA_SEED.value,
        )
        result = loop.fit(config, workdir)
    if result.stop_reason == "preempted":  # nothing to score yet: the model was not restored
        print(f"preempted at step {result.last_step}; rerun the same command to resume:")
        print(f"  python -m sftjax.demo --workdir={workdir}")
        return
    tok = tokenize.load_tokenizer(config.data.tokenizer)
    accuracy, pairs = score(result.model, tok, test, template=config.data.template)
    (workdir / "demo_results.json").write_text(
        json.dumps(
            {
                "stop_reason": result.stop_reason,
                "last_step": result.last_step,
                "best_step": result.best_step,
                "best_val_loss": result.best_val_loss,
                "accuracy": accuracy,
                "seconds": time.perf_counter() - start,
            },
            indent=2,
        )
    )

    print(
        f"\n{result.stop_reason} at step {result.last_step}; best validation loss "
        f"{loop.loss_text(result.best_val_loss)} at step {result.best_step} (restored)"
    )
    print(f"held-out exact match ({len(test)} unseen instructions, greedy):")
    for task, value in sorted(accuracy.items(), key=lambda kv: kv[0] == "overall"):
        print(f"  {task:<13} {value:6.1%}")
    print("samples:")
    for row, answer in pairs[:: max(1, len(pairs) // 5)][:5]:
        mark = "ok " if answer.strip() == row["response"] else "bad"
        print(f"  [{mark}] {row['instruction']!r} -> {answer!r} (expected {row['response']!r})")
    print(
        f"workdir: {workdir} (HF export: {result.export_dir}); "
        f"{time.perf_counter() - start:.0f} s in all"
    )


if __name__ == "__main__":
    cli.run(main)
