"""fit() end to end on a tiny model: early stopping, best restore, export, resume, SIGTERM, NaN."""

import functools
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
    train_losses,
    wait_for_step,
)

from sftjax import checkpoint, loop, metrics, sharding, train
from sftjax import config as config_lib
from sftjax.data import batches, flat, pipeline, records, tokenize
from sftjax.model import hf_io


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return demo_corpus(tmp_path_factory.mktemp("corpus"))


def overrides(corpus, **extra) -> dict:
    train, val, tok_dir, vocab = corpus
    values = {
        "data.train_files": str(train),
        "data.validation_files": str(val),
        "data.tokenizer": str(tok_dir),
        "data.seq_len": 128,
        "data.num_epochs": 40,
        "model.preset": "tiny",
        "model.vocab_size": vocab,
        "model.dtype": "float32",
        "train.batch_size": 8,
        "train.log_every_steps": 1,
        "eval.every_steps": 4,
        "eval.batch_size": 8,
        "optim.lr": 3e-3,
        "optim.warmup_ratio": 0.0,
    }
    values.update(extra)
    return values


def make_config(values: dict):
    return config_with(values)


def expected_stop(eval_losses: list[tuple[int, float]], patience: int, min_delta: float):
    """Independent re-statement of the rule: (stop step, step restored = lowest loss so far)."""
    best, bad, stop = float("inf"), 0, None
    for i, (_, loss) in enumerate(eval_losses):
        if loss < best - min_delta:
            best, bad = loss, 0
        else:
            bad += 1
            if bad >= patience:
                stop = i
                break
    seen = eval_losses if stop is None else eval_losses[: stop + 1]
    return (None if stop is None else eval_losses[stop][0]), min(seen, key=lambda e: e[1])[0]


def test_overfitting_run_stops_early_and_restores_best(corpus, tmp_path):
    values = overrides(
        corpus,
        **{
            "data.train_files": str(corpus[0]),
            "eval.patience": 2,
            "eval.min_delta": 0.01,
            "train.num_steps": 400,
        },
    )
    config = make_config(values)
    config.data.validation_fraction = 0.0
    result = loop.fit(config, tmp_path)

    records_ = metrics.read_records(tmp_path / "metrics.jsonl")
    evals = [(r["step"], r["loss"]) for r in records_ if r["split"] == "eval"]
    stop_step, best_step = expected_stop(evals, patience=2, min_delta=0.01)
    assert result.stop_reason == "early_stopping"
    assert result.last_step == stop_step and result.best_step == best_step < stop_step
    assert result.best_val_loss == dict(evals)[best_step]
    assert evals[0][1] > min(loss for _, loss in evals) + 0.5  # validation loss really fell

    # The restored parameters are the best step's: re-evaluating them gives its loss.
    tok = tokenize.load_tokenizer(str(corpus[2]))
    _, val_examples, _ = pipeline.load_splits(config.data, tok)
    val = batches.validation_batches(
        flat.from_examples(val_examples),
        batch_size=8,
        seq_len=128,
        process_index=0,
        process_count=1,
    )
    graphdef, params = nnx.split(result.model)
    mesh = sharding.make_mesh()
    eval_fn = jax.jit(functools.partial(train.eval_sums, graphdef=graphdef))
    with jax.set_mesh(mesh):
        again = train.evaluate(
            eval_fn, nnx.to_pure_dict(params), list(val), sharding.batch_sharding(mesh)
        )
    assert again["loss"] == pytest.approx(dict(evals)[best_step], rel=1e-5)

    # The HF export holds those same best parameters, rounded to its bfloat16.
    exported = hf_io.load_pretrained(
        result.export_dir, dtype="float32", scan_layers=result.model.cfg.scan_layers
    )
    exported_params = nnx.to_pure_dict(nnx.state(exported, nnx.Param))
    best_params = nnx.to_pure_dict(nnx.state(result.model, nnx.Param))
    jax.tree.map(
        lambda e, b: np.testing.assert_array_equal(
            np.asarray(e, np.float32), np.asarray(b).astype(jnp.bfloat16).astype(np.float32)
        ),
        exported_params,
        best_params,
    )
    tokens = np.arange(1, 33)[None] % 256
    assert (tmp_path / "loss.png").stat().st_size > 1000
    summary = records_[-1]
    assert summary["split"] == "summary" and summary["best_step"] == best_step

    # A workdir is a checkpoint for generation too: its best parameters, without the export.
    from_workdir, record = checkpoint.read_best(tmp_path, dtype="float32")
    assert record["config"]["data"]["tokenizer"] == str(corpus[2])
    np.testing.assert_array_equal(
        our_logits(from_workdir, tokens), our_logits(result.model, tokens)
    )

    # Rerunning a run that stopped early resumes into "stopped": no further training.
    again = loop.fit(config, tmp_path)
    assert (again.stop_reason, again.last_step, again.best_step) == (
        "early_stopping",
        stop_step,
        best_step,
    )
    trained = [r for r in metrics.read_records(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert max(r["step"] for r in trained) == stop_step


def test_non_finite_loss_stops_without_writing_a_checkpoint(corpus, tmp_path):
    config = make_config(
        overrides(corpus, **{"optim.lr": 1e30, "train.num_steps": 8, "eval.every_steps": 1})
    )
    with pytest.raises(loop.TrainingDiverged, match="lower optim.lr|validation loss is nan"):
        loop.fit(config, tmp_path)
    steps = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == []


def test_bad_rows_fail_before_anything_compiles(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "response": "yo"}\n{"instruction": "x"}\nnot json\n')
    config = make_config(overrides(corpus, **{"data.train_files": str(bad)}))
    with pytest.raises(records.BadRowsError, match=r"bad\.jsonl:2.*\n?.*"):
        loop.fit(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_leaked_validation_rows_exit_2_under_leakage_fail(corpus, tmp_path):
    train = corpus[0]
    extra = {"data.validation_files": str(train), "data.leakage": "fail"}
    done = subprocess.run(_cli(corpus, tmp_path / "run", **extra), capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "validation rows have their prompt" in done.stderr
    assert f"  {train}:1: same prompt as {train}:1" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_tokenizer_larger_than_the_embedding_table_is_refused(corpus, tmp_path):
    # The demo tokenizer's added template headers sit past its trained vocabulary: a model
    # sized to the trained part would look them up out of range (NaN, not an error).
    vocab = corpus[3]
    config = make_config(overrides(corpus, **{"model.vocab_size": vocab - 1}))
    with pytest.raises(config_lib.ConfigError, match=f"token id {vocab - 1} .* {vocab} tokens"):
        loop.fit(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"mesh.tensor": 3}, "uses 3 devices but 8 are present|not divisible"),
        ({"train.batch_size": 12}, "batch_size=12 must be divisible by mesh data×fsdp"),
        ({"train.microbatches": 3}, "train.microbatches \\(3\\)"),
        ({"mesh.tensor": 8, "mesh.fsdp": 1}, "tensor=8 must divide num_heads=8 and num_kv_heads=4"),
        ({"data.seq_len": 4096}, "seq_len=4096 exceeds the model's max_seq_len=512"),
        ({"data.train_files": "/no/such/*.jsonl"}, "no file matches"),
        ({"data.tokenizer": "/no/tok"}, "not a directory"),
        ({"model.remat": "some"}, "model.remat='some': choose one of"),
        ({"model.hf_path": "/no/model"}, "no such directory"),
    ],
)
def test_invalid_config_is_explained(corpus, edit, message):
    config = make_config(overrides(corpus, **edit))
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config, num_devices=8)


def _cli(corpus, workdir, **extra) -> list[str]:
    return main_command(workdir, overrides(corpus, **extra))


def test_killed_and_terminated_run_resumes_to_identical_losses(corpus, tmp_path):
    extra = {"train.num_steps": 20, "eval.patience": 100}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = tmp_path / "uninterrupted"
    subprocess.run(
        _cli(corpus, reference, **extra), check=True, env=env, cwd=ROOT, capture_output=True
    )

    run = tmp_path / "interrupted"
    first = subprocess.Popen(
        _cli(corpus, run, **extra),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_for_step(run, 10, first)
    first.send_signal(signal.SIGKILL)
    first.wait()

    second = subprocess.Popen(
        _cli(corpus, run, **extra),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_for_step(run, 14, second)
    second.send_signal(signal.SIGTERM)
    output = second.communicate(timeout=120)[0].decode()
    assert second.returncode == 0, output
    assert "resumed from step" in output and "preempted" in output
    assert "reusing the prepared data in" in output  # WORKDIR/data, prepared by the first start
    saved = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved >= 14

    # The last leg trains from another prepared directory of the same data (the reference's):
    # a resumed run over data.prepared equals the uninterrupted one.
    (run / "data").rename(run / "data.moved")  # nothing can be read from WORKDIR/data
    last = {**extra, "data.prepared": str(reference / "data")}
    subprocess.run(_cli(corpus, run, **last), check=True, env=env, cwd=ROOT, capture_output=True)
    assert not (run / "data").exists()
    expected, resumed = train_losses(reference), train_losses(run)
    assert sorted(resumed) == sorted(expected) == list(range(1, 21))
    np.testing.assert_array_equal(
        [resumed[s] for s in range(1, 21)], [expected[s] for s in range(1, 21)]
    )
    evals = lambda d: [
        json.dumps(r) for r in metrics.read_records(d / "metrics.jsonl") if r["split"] == "eval"
    ]
    assert evals(run) == evals(reference)
