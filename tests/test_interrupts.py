"""SIGTERM and Ctrl-C outside the training loop, and a failed export, through `sftjax.main`.

Owns: a signal while the data is read, or between the last step and the export, ends the run
with exit 0, the lock released and a workdir the same command resumes (and exports); before the
first checkpoint it says there is nothing to save. A second Ctrl-C aborts (exit 130) while the
main thread is inside XLA, where Python runs no signal handler until the call returns. An
export that cannot be written (file size limit, as a full disk) exits 4 in one line and leaves
the previous export and no staging behind, also when the PEFT adapter fails after the merged
model was written (the two are put in place together or not at all); leftovers of an
interrupted PEFT export are removed.

To hit a phase exactly, the command runs through PAUSING: it wraps one function of the real
run so that, when called, it prints "paused" and waits for a line on stdin before going on. In
the "step" phase (the first step, before its compile) the main thread waits in a blocking read
with SIGINT masked, so, as during a compile or a save, it is inside C and Python's handler
cannot run: a Ctrl-C reaches the process through another thread.
"""

import queue
import resource
import signal
import subprocess
import sys
import threading

import pytest
from hf_fixtures import make_hf_llama
from multihost_fixtures import device_env
from train_fixtures import ROOT, demo_corpus, main_command, short_run

PAUSING = """import runpy, select, signal, sys
from sftjax import loop, train
from sftjax.data import pipeline

phase = sys.argv.pop(1)
module, name = {"data": (pipeline, "read_splits"), "export": (loop, "_finish"),
                "step": (train, "global_batch")}[phase]
real = getattr(module, name)

def paused(*args, **kwargs):
    setattr(module, name, real)  # once
    if phase == "step":
        # As inside a compile: the main thread is in C and runs no Python handler until the
        # call returns (its signals go to other threads, whose C handler only notes them).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        print("paused", flush=True)
        sys.stdin.readline()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    else:
        print("paused", flush=True)
        # Polled: a signal may land on another thread, and Python runs handlers in the main
        # thread only when it next checks (a blocking read would never return to check).
        while not select.select([sys.stdin], [], [], 0.05)[0]:
            pass
    return real(*args, **kwargs)

setattr(module, name, paused)
runpy.run_module("sftjax.main", run_name="__main__", alter_sys=True)
"""


class Run:
    """`sftjax.main` paused at `phase`; its stdout and stderr read line by line as they come."""

    def __init__(self, command: list[str], phase: str, **popen):
        self.process = subprocess.Popen(
            [sys.executable, "-c", PAUSING, phase, *command[3:]],
            env=device_env(1),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **popen,
        )
        self.lines, self._queue = [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 240) -> None:
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {text!r} in time:\n{self.output()[-3000:]}") from None
            assert line is not None, f"ended before {text!r}:\n{self.output()[-3000:]}"
            self.lines.append(line)
            if text in line:
                return

    def finish(self, timeout: float = 240) -> str:
        try:
            self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        return self.output()

    def output(self) -> str:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return "".join(self.lines)
            if line is not None:
                self.lines.append(line)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """The command of a 4-step LoRA run on a tiny random base, exporting both ways.

    Rank 64 makes the fp32 adapter (0.48 MB) larger than the bf16 merged model (0.21 MB).
    """
    directory = tmp_path_factory.mktemp("lora")
    train_file, val_file, tok_dir, vocab = demo_corpus(directory, n_train=120, n_val=20)
    make_hf_llama(directory / "base", vocab_size=vocab, max_position_embeddings=128)
    values = short_run(train_file, val_file, tok_dir, **{
        "model.hf_path": directory / "base", "model.lora.rank": 64,
        "model.base_dtype": "float32", "model.param_dtype": "float32",
        "model.remat": "none", "model.attention": "xla",
        "train.num_steps": 4, "checkpoint.export_hf": True, "checkpoint.export_dtype": "bfloat16",
    })  # fmt: skip
    return lambda workdir: main_command(workdir, values)


def _workdir_files(workdir) -> list[str]:
    return sorted(p.name for p in workdir.iterdir())


@pytest.mark.slow
def test_signals_outside_the_loop_exit_0_and_a_failed_export_exits_4(lora_run, tmp_path):
    workdir = tmp_path / "run"
    # SIGTERM while the data is read, before any checkpoint: nothing to save, lock released.
    run = Run(lora_run(workdir), "data")
    run.wait_for("paused")
    run.process.send_signal(signal.SIGTERM)
    output = run.finish()
    assert run.process.returncode == 0, output[-3000:]
    assert "nothing to save" in output and "Traceback" not in output
    assert _workdir_files(workdir) == []

    # Ctrl-C between the last step and the export: exit 0, step 4 saved, no export yet.
    run = Run(lora_run(workdir), "export")
    run.wait_for("paused")
    run.process.send_signal(signal.SIGINT)
    output = run.finish()
    assert run.process.returncode == 0, output[-3000:]
    assert "preempted: saved step 4; rerun the same command to resume" in output
    assert _workdir_files(workdir) == ["checkpoints", "data", "metrics.jsonl", "tensorboard"]

    # The rerun trains nothing and exports, but the disk "fills up": no file may grow past
    # 300 kB (Python ignores SIGXFSZ, so the write fails with EFBIG as it would with ENOSPC).
    # The merged model (0.21 MB) is written, then the adapter (0.48 MB) fails: neither may
    # replace the earlier export. An interrupted PEFT export left its pieces too.
    for leftover in (".peft_adapter.tmp-1", ".peft_adapter.old-2", "peft_adapter", "hf_export"):
        (workdir / leftover).mkdir()
        (workdir / leftover / "config.json").write_text(leftover)
    done = subprocess.run(
        lora_run(workdir),
        env=device_env(1),
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(
            resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY)
        ),
    )
    assert done.returncode == 4, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "writing the export under" in errors[0], done.stderr[-3000:]
    assert "File too large" in errors[0] and "rerun the same command" in errors[0]
    assert "the checkpoints and the previous export are intact" in errors[0]
    assert done.stderr.rstrip().endswith(errors[0])  # nothing after it (asyncio echoes)
    assert "Traceback" not in done.stderr
    assert "resumed from step 4" in done.stderr  # it went straight to the export
    assert _workdir_files(workdir) == [
        "checkpoints", "data", "hf_export", "metrics.jsonl", "peft_adapter", "tensorboard",
    ]  # fmt: skip
    for export in ("hf_export", "peft_adapter"):  # as they were
        assert _workdir_files(workdir / export) == ["config.json"]
        assert (workdir / export / "config.json").read_text() == export


@pytest.mark.slow
def test_second_ctrl_c_aborts_while_the_main_thread_is_inside_c(lora_run, tmp_path):
    workdir = tmp_path / "run"
    run = Run(lora_run(workdir), "step")
    run.wait_for("paused")  # the main thread is inside C until stdin gets a line
    run.process.send_signal(signal.SIGINT)
    run.wait_for("Ctrl-C: finishing this step, saving, then exiting", timeout=30)
    run.process.send_signal(signal.SIGINT)
    output = run.finish(timeout=60)
    assert run.process.returncode == 130, output[-3000:]
    assert "aborted by a second Ctrl-C" in output
    assert not (workdir / ".lock").exists()
