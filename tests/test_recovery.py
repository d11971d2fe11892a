"""Faults in what a run has written: damaged checkpoints, a full disk, an export cut short.

Owns: a damaged newest checkpoint (truncated, deleted or overwritten files, a cut JSON record,
a fingerprint that does not match) is set aside with one warning and the run resumes from the
one before it to the same losses; a save that fails (file size limit, as on a full disk) stops
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
from train_fixtures import ROOT, config_with, demo_corpus, main_command, short_run, train_losses

from sftjax import checkpoint, loop, sharding
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
