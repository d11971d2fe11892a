"""Pod behaviour on one CPU box: preemption agreed across processes, restore onto another slice.

Owns: SIGTERM reaching one of two `--multihost` processes (jax.distributed over gloo) makes both
save the same step and exit 0, and the same command resumes to the losses of a run that was
never interrupted; Ctrl-C on a single process saves and resumes bit-identically; a checkpoint
written by 2 processes on 4 devices restores in 1 process on 8 devices as fsdp 4 x tensor 2,
and one written on 8 devices restores on 4.
"""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from multihost_fixtures import device_env, slurm_env
from train_fixtures import (
    ROOT,
    config_with,
    demo_corpus,
    main_command,
    short_run,
    train_losses,
    wait_for_step,
)

from sftjax import loop

STEPS = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return demo_corpus(tmp_path_factory.mktemp("corpus"), n_train=200, n_val=40)


def settings(corpus, **extra) -> dict:
    return short_run(*corpus, **extra)


def command(corpus, workdir, *, multihost: bool = False, **extra) -> list[str]:
    return main_command(workdir, settings(corpus, **extra), *(["--multihost"] if multihost else []))


def saved_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """Losses of an uninterrupted run: one process, 8 devices (fsdp 8), every checkpoint kept."""
    workdir = tmp_path_factory.mktemp("reference")
    result = loop.fit(config_with(settings(corpus)), workdir)
    assert result.stop_reason == "completed" and result.last_step == STEPS
    return workdir, train_losses(workdir)


def assert_losses_match(workdir, expected: dict, *, exact: bool = False) -> None:
    got = train_losses(workdir)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    got_, expected_ = [got[s] for s in sorted(got)], [expected[s] for s in sorted(got)]
    if exact:
        np.testing.assert_array_equal(got_, expected_)
    else:  # another mesh sums in another order
        np.testing.assert_allclose(got_, expected_, rtol=1e-5)


def start_pod(corpus, workdir, logs_dir, num_processes: int = 2) -> list[subprocess.Popen]:
    processes = []
    for pid, env in enumerate(slurm_env(num_processes, 2)):
        log = open(logs_dir / f"process{pid}.log", "w")  # noqa: SIM115 (closed with the test)
        processes.append(
            subprocess.Popen(
                command(corpus, workdir, multihost=True),
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return processes


def finish(processes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        for p in processes:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_sigterm_on_one_host_stops_all_at_one_step_and_resumes(corpus, reference, tmp_path):
    workdir = tmp_path / "pod"
    pod = start_pod(corpus, workdir, tmp_path)
    wait_for_step(workdir, 6, pod)
    pod[1].send_signal(signal.SIGTERM)  # a maintenance notice reaches one host only
    started = time.monotonic()
    finish(pod, timeout=60)
    logs = [(tmp_path / f"process{pid}.log").read_text() for pid in range(2)]
    assert [p.returncode for p in pod] == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    assert time.monotonic() - started < 60
    saved = saved_steps(workdir)[-1]
    assert 6 <= saved < STEPS
    for log in logs:  # both processes stopped at the same step and say how to go on
        assert f"saved step {saved}; rerun the same command to resume" in log

    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved)

    # The same command resumes to the end with the losses of the uninterrupted run.
    pod = start_pod(corpus, workdir, tmp_path)
    finish(pod, timeout=240)
    log = (tmp_path / "process0.log").read_text()
    assert [p.returncode for p in pod] == [0, 0], log[-3000:]
    assert f"resumed from step {saved}" in log
    assert_losses_match(workdir, reference[1])

    # Restore onto another slice: 2 processes x 2 devices (fsdp 4) -> 1 process x 8 devices as
    # fsdp 4 x tensor 2, same global batch.
    config = config_with(settings(corpus, **{"mesh.fsdp": 4, "mesh.tensor": 2}))
    result = loop.fit(config, moved)
    assert result.stop_reason == "completed"
    assert_losses_match(moved, reference[1])


@pytest.mark.slow
def test_checkpoint_from_8_devices_resumes_on_4(corpus, reference, tmp_path):
    workdir = tmp_path / "moved"
    shutil.copytree(reference[0], workdir)
    for step in saved_steps(workdir):
        if step > 8:
            shutil.rmtree(workdir / "checkpoints" / str(step))
    env = device_env(4)
    done = subprocess.run(
        command(corpus, workdir), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step 8" in done.stderr
    assert_losses_match(workdir, reference[1])


@pytest.mark.slow
def test_ctrl_c_saves_exits_0_and_resumes_identically(corpus, reference, tmp_path):
    workdir = tmp_path / "run"
    env = device_env(8)
    first = subprocess.Popen(
        command(corpus, workdir),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_for_step(workdir, 6, [first])
    first.send_signal(signal.SIGINT)
    output = first.communicate(timeout=120)[0].decode()
    assert first.returncode == 0, output[-3000:]
    saved = saved_steps(workdir)[-1]
    assert 6 <= saved < STEPS and f"saved step {saved}" in output
    assert "Traceback" not in output

    done = subprocess.run(command(corpus, workdir), env=env, cwd=ROOT, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert_losses_match(workdir, reference[1], exact=True)
    meta = json.loads((workdir / "checkpoints" / str(STEPS) / "meta" / "metadata").read_text())
    assert meta["data_iter"] == {"next_index": STEPS}


LOADER = """
import json, sys
import jax

jax.distributed.initialize()
from sftjax import checkpoint, sharding
from sftjax.model import hf_io

stats = hf_io.LoadStats()
model = hf_io.load_pretrained(sys.argv[1], mesh=sharding.make_mesh(), stats=stats, dtype="float32")
from flax import nnx

print(json.dumps({"read": stats.bytes_read, "total": stats.bytes_total,
                  "fingerprint": checkpoint.fingerprint(nnx.to_pure_dict(nnx.state(model)))}))
jax.distributed.shutdown()
"""


def test_each_host_reads_only_its_slices_of_the_hf_weights(tmp_path):
    import jax
    from flax import nnx
    from hf_fixtures import make_hf_llama

    from sftjax import checkpoint, sharding
    from sftjax.model import hf_io

    make_hf_llama(tmp_path / "hf", hidden_size=128, intermediate_size=256, vocab_size=512)
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    envs = slurm_env(2, 2, extra_paths=[ROOT])
    pod = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "hf")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for env in envs
    ]
    # The same fsdp-4 mesh in one process, on 4 of this process's devices.
    single_stats = hf_io.LoadStats()
    single = hf_io.load_pretrained(
        tmp_path / "hf",
        mesh=sharding.make_mesh(devices=jax.devices()[:4]),
        stats=single_stats,
        dtype="float32",
    )
    outputs = [p.communicate(timeout=120)[0] for p in pod]
    assert [p.returncode for p in pod] == [0, 0], outputs
    hosts = [json.loads(out.strip().splitlines()[-1]) for out in outputs]

    # Together the two hosts hold exactly the model the single process loaded...
    expected = checkpoint.fingerprint(nnx.to_pure_dict(nnx.state(single)))
    assert hosts[0]["fingerprint"] == hosts[1]["fingerprint"] == expected
    # ...while each read about half the bytes (the small norms are replicated, read by both).
    assert single_stats.bytes_read == single_stats.bytes_total
    for host in hosts:
        assert host["total"] == single_stats.bytes_total
        assert host["read"] / host["total"] < 0.55, host["read"] / host["total"]
    print("bytes read per host / whole:", [h["read"] / h["total"] for h in hosts])
