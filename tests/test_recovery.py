"""Faults in what a run has written: damaged checkpoints, a full disk, an export cut short.

Owns: a damaged newest checkpoint (truncated, deleted or overwritten files, a cut JSON record,
a fingerprint that does not match) is set aside with one warning and the run resumes from the
one before it to the same losses, on local disk and on object storage (no folders to rename);
a damaged best checkpoint older than the newest is set aside at the export, which takes the next
best; a save that fails (file size limit, as on a full disk) stops
the run at once with one message while earlier checkpoints stay restorable; SIGTERM during the
final export finishes it and exits 0; a kill between the export's renames is repaired at the
next start; a state holding NaN is never saved.
"""

import json
import logging
import resource
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multihost_fixtures import device_env
from test_storage import BUCKET, emulator  # noqa: F401 (the gs:// emulator fixture)
from train_fixtures import ROOT, config_with, demo_corpus, main_command, short_run, train_losses

from sftjax import checkpoint, loop, metrics, paths, sharding
from sftjax.model import hf_export

STEPS = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return demo_corpus(tmp_path_factory.mktemp("corpus"), n_train=200, n_val=40)


def settings(corpus, **extra) -> dict:
    return short_run(*corpus, **extra)


def make_config(corpus, **extra):
    return config_with(settings(corpus, **extra))


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished")
    loop.fit(make_config(corpus), workdir)
    return workdir


def largest_array_file(step_dir):
    return max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def overwrite_8_bytes(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def wrong_fingerprint(step_dir):
    record_file = step_dir / "meta" / "metadata"
    record = json.loads(record_file.read_text())
    record["fingerprint"][3][0] += 1
    record_file.write_text(json.dumps(record))


DAMAGE = {
    "array file truncated": lambda d: truncate(largest_array_file(d)),
    "8 bytes overwritten in an array file": lambda d: overwrite_8_bytes(largest_array_file(d)),
    "array metadata deleted": lambda d: (d / "state" / "_METADATA").unlink(),
    "ocdbt manifest deleted": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "JSON record deleted": lambda d: (d / "meta" / "metadata").unlink(),
    "JSON record cut": lambda d: truncate(d / "meta" / "metadata"),
    "fingerprint differs": wrong_fingerprint,
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_resumes(
    corpus, finished, tmp_path, caplog, damage
):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    DAMAGE[damage](workdir / "checkpoints" / str(STEPS))
    with caplog.at_level(logging.WARNING, logger="sftjax"):
        result = loop.fit(make_config(corpus), workdir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"checkpoint step {STEPS} is damaged" in warnings[0]
    assert result.last_step == STEPS
    aside = list((workdir / "damaged_checkpoints").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith(f"{STEPS}-")  # kept, not deleted
    expected, resumed = train_losses(finished), train_losses(workdir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    np.testing.assert_array_equal(
        [resumed[s] for s in range(13, STEPS + 1)], [expected[s] for s in range(13, STEPS + 1)]
    )


def test_a_state_holding_nan_is_never_saved(tmp_path):
    mesh = sharding.make_mesh()
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {"w": jax.device_put(jnp.array([1.0, jnp.nan]), replicated)}
    ckpt = checkpoint.Checkpointer(tmp_path / "ck", max_to_keep=2, async_save=False)
    with pytest.raises(checkpoint.NonFiniteState, match="step 3 holds NaN"):
        ckpt.save(3, state, {}, None)
    assert ckpt.all_steps() == [] and not any((tmp_path / "ck").glob("3*"))


def _command(corpus, workdir, **extra) -> list[str]:
    return main_command(workdir, settings(corpus, **extra))


@pytest.mark.slow
def test_failed_save_stops_the_run_at_once_and_earlier_checkpoints_restore(corpus, tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        _command(corpus, workdir, **{"eval.every_steps": 6, "train.num_steps": 40}),
        env=device_env(8),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 240
    while not (workdir / "checkpoints" / "6" / "commit_success.txt").exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.02)
    # The disk "fills up": no file may grow past 64 kB (Python ignores SIGXFSZ, so writes fail
    # with EFBIG, as they would with ENOSPC); metrics.jsonl stays well below that.
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 4, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "saving step 12" in errors[0] and "File too large" in errors[0]
    assert "Traceback" not in output
    # It stops within a few steps of the failure, long before the next save (step 18).
    assert max(train_losses(workdir)) < 16

    rerun = subprocess.run(
        _command(corpus, workdir, **{"eval.every_steps": 6, "train.num_steps": 40}),
        env=device_env(8),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from step 6" in rerun.stderr


@pytest.mark.slow
def test_sigterm_during_export_finishes_it_and_exits_0(corpus, tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        _command(corpus, workdir, **{"checkpoint.export_hf": True, "train.num_steps": 4}),
        env=device_env(8),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    for line in process.stdout:
        output.append(line)
        if "exporting step" in line:
            process.send_signal(signal.SIGTERM)
            break
    output.append(process.communicate(timeout=120)[0])
    output = "".join(output)
    assert process.returncode == 0, output[-3000:]
    assert "arrived during the export; the export finished first" in output
    assert (workdir / "hf_export" / "model.safetensors").exists()
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".hf_export")] == []


def test_export_interrupted_between_renames_is_restored_at_next_start(tmp_path):
    final = tmp_path / "hf_export"
    (tmp_path / ".hf_export.old-123").mkdir()  # the complete previous export, renamed aside
    (tmp_path / ".hf_export.old-123" / "config.json").write_text("{}")
    (tmp_path / ".hf_export.tmp-123").mkdir()  # the new one, not yet renamed into place
    hf_export.recover_export(final)
    assert (final / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_export"]


def claim_val_loss(step_dir, val_loss: float) -> None:
    """Rewrite the validation loss Orbax keeps with a step (as if later evaluations rose)."""
    (metrics_file,) = [
        p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size < 4096
        and '"val_loss"' in p.read_text(errors="replace")
    ]  # fmt: skip
    metrics = json.loads(metrics_file.read_text())
    metrics["val_loss"] = val_loss
    metrics_file.write_text(json.dumps(metrics))


@pytest.mark.slow
def test_damaged_best_checkpoint_older_than_the_newest_exports_the_next_best(
    corpus, finished, tmp_path
):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    claim_val_loss(workdir / "checkpoints" / "8", 0.001)  # step 8 was the best of the run
    truncate(largest_array_file(workdir / "checkpoints" / "8"))
    done = subprocess.run(
        _command(corpus, workdir, **{"train.num_steps": 20, "checkpoint.export_hf": True}),
        env=device_env(8),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "resumed from step 16" in done.stderr
    (warning,) = [line for line in done.stderr.splitlines() if "is damaged" in line]
    assert "checkpoint step 8 is damaged" in warning and "the next best by validation" in warning
    assert [p.name.split("-")[0] for p in (workdir / "damaged_checkpoints").iterdir()] == ["8"]
    assert (workdir / "hf_export" / "model.safetensors").exists()
    summary = [
        r for r in metrics.read_records(workdir / "metrics.jsonl") if r["split"] == "summary"
    ]
    losses = {s: checkpoint_loss(workdir, s) for s in (4, 12, 16, 20)}
    assert summary[-1]["best_step"] == min(losses, key=losses.get)


def checkpoint_loss(workdir, step: int) -> float:
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=10, read_only=True)
    try:
        return ckpt.val_loss(step)
    finally:
        ckpt.close()


@pytest.mark.slow
@pytest.mark.usefixtures("emulator")
def test_damaged_checkpoint_on_object_storage_is_set_aside_and_every_rerun_resumes():
    """gs:// has no folders: the damaged step's objects are copied aside, then deleted."""
    directory = paths.resolve(f"gs://{BUCKET}/damaged/checkpoints")
    mesh = sharding.make_mesh()
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {"w": jax.device_put(jnp.arange(8.0), replicated)}
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=5, async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"w": state["w"] * step}, {"step": step}, None)
    ckpt.close()
    (directory / "2" / "meta" / "metadata").unlink()  # the JSON record of step 2 is lost

    for _ in range(2):  # the first run sets step 2 aside; a rerun finds it gone
        ckpt = checkpoint.Checkpointer(directory, max_to_keep=5, async_save=False)
        step, restored, record = ckpt.restore_newest(state)
        ckpt.close()
        assert step == 1 and record["step"] == 1
        np.testing.assert_array_equal(restored["w"], np.arange(8.0))
    assert not (directory / "2").exists()
    (aside,) = list((directory.parent / "damaged_checkpoints").iterdir())
    assert aside.name.startswith("2-") and (aside / "state").exists()


@pytest.mark.slow
def test_only_a_never_evaluated_checkpoint_left_exports_with_its_loss_not_available(
    corpus, finished, tmp_path
):
    """Every evaluated checkpoint damaged or gone, only a stop signal's save (no validation
    loss) left: it is exported and the summary says the loss is not available, no crash."""
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    for step in (4, 8):
        shutil.rmtree(workdir / "checkpoints" / str(step))
    truncate(largest_array_file(workdir / "checkpoints" / "12"))
    shutil.rmtree(workdir / "checkpoints" / "16" / "metrics")  # as a SIGTERM save holds none
    done = subprocess.run(
        _command(corpus, workdir),
        env=device_env(8),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Logging error" not in done.stderr
    assert "best validation loss n/a (never evaluated) at step 16" in done.stderr
    assert done.stdout.splitlines()[-1] == (
        "completed at step 16; best step 16 (validation loss n/a (never evaluated)); export: None"
    )
    summary = metrics.read_records(workdir / "metrics.jsonl")[-1]
    assert (summary["split"], summary["best_step"], summary["best_val_loss"]) == (
        "summary",
        16,
        None,
    )
