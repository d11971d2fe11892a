"""SIGTERM (preemption) and Ctrl-C at any moment of a run: exit 0 with a resumable workdir.

Owns `Interrupts`, which loop.fit installs for the whole run, and what a signal does in each
phase:
- `now` (reading data, compiling, restoring, between the last step and the export): nothing is
  being written, so the signal raises `StopRun` where the program is; fit returns "preempted"
  with the checkpoints on disk as they were (none yet: nothing to save).
- `at_steps` (the loop): a flag that `reached(step)` reports, so the loop saves after the step.
- `deferred` (waiting for a save, the export): a flag; the block finishes first.
A second Ctrl-C aborts (exit 130) in every phase, also inside a long call into C (a compile, a
save), where Python runs no handler until the call returns and a second signal only repeats
the first: CPython's C handler writes every signal to a wakeup file, which a thread reads.

Multi-host: JAX's preemption service hears SIGTERM on any host and tells all of them; every
host asks `reached_preemption_sync_point(step)` each step and all get True at the same step,
so the collective save never waits on a host that kept training. A Python SIGTERM handler would
replace JAX's listener, so none is installed there, Ctrl-C becomes a SIGTERM to this process
(which JAX then spreads), and nothing raises: hosts stop together in the loop or not at all.
"""

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils

from sftjax import workdir_lock

log = logging.getLogger("sftjax")

ABORT_EXIT = 130


class StopRun(BaseException):  # noqa: N818 (like KeyboardInterrupt: not caught as an Exception)
    """A signal arrived outside the loop: stop now, nothing is being written."""


class Interrupts:
    """`with Interrupts() as signals:` SIGTERM/Ctrl-C stop the run cleanly (see the module)."""

    def __init__(self):
        self.multihost = jax.process_count() > 1
        self.requested = False  # a stop was asked for (by the first signal)
        self.received: list[int] = []  # signals that arrived in a deferred block
        self._mode = "now"
        self._interrupts = 0  # Ctrl-Cs seen by the watcher thread

    def __enter__(self) -> "Interrupts":
        handled = [signal.SIGINT] + ([] if self.multihost else [signal.SIGTERM])
        self._previous = {s: signal.signal(s, self._on_signal) for s in handled}
        read_end, self._write_end = os.pipe()
        os.set_blocking(self._write_end, False)
        self._previous_fd = signal.set_wakeup_fd(self._write_end, warn_on_full_buffer=False)
        self._watcher = threading.Thread(
            target=self._watch, args=(read_end,), daemon=True, name="sftjax-signals"
        )
        self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        os.close(self._write_end)  # the watcher reads end-of-file and ends
        self._watcher.join()

    def _on_signal(self, signum, frame) -> None:
        """Python's handler, in the main thread, once the current call into C returns."""
        if signum == signal.SIGINT and self.multihost:
            if not self.requested:
                os.kill(os.getpid(), signal.SIGTERM)  # JAX's listener tells every host
            self.requested = True
            return
        if self.requested:
            return  # a repeat; a second Ctrl-C is the watcher's (it aborts)
        self.requested = True
        if self._mode == "deferred":
            self.received.append(signum)
        elif self._mode == "now":
            raise StopRun(signal.Signals(signum).name)

    def _watch(self, read_end: int) -> None:
        """Count Ctrl-Cs as they arrive (from the wakeup file): say what happens; abort at two."""
        with os.fdopen(read_end, "rb", buffering=0) as signals:
            while chunk := signals.read(64):
                for signum in chunk:
                    if signum == signal.SIGINT:
                        self._interrupts += 1
                        self._on_ctrl_c()

    def _on_ctrl_c(self) -> None:
        if self._interrupts >= 2:
            print("error: aborted by a second Ctrl-C", file=sys.stderr, flush=True)
            workdir_lock.release_all()
            os._exit(ABORT_EXIT)  # the main thread may be inside C for minutes (a compile)
        if self._mode == "now" and not self.multihost:
            log.warning("Ctrl-C: stopping (Ctrl-C again to abort)")
        else:
            log.warning("Ctrl-C: finishing this step, saving, then exiting (Ctrl-C again to abort)")

    @contextlib.contextmanager
    def _in(self, mode: str) -> Iterator[None]:
        previous, self._mode = self._mode, mode
        try:
            yield
        finally:
            self._mode = previous

    def at_steps(self) -> contextlib.AbstractContextManager:
        """The training loop: a signal is answered by `reached` after the current step (the
        caller checks `requested` after the block)."""
        return self._in("at_steps")

    def deferred(self) -> contextlib.AbstractContextManager:
        """A block that finishes whatever arrives (a save, the export)."""
        return self._in("deferred")

    def reached(self, step: int) -> bool:
        """Call once per step on every host; True at the step all hosts save and stop."""
        if self.multihost:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested
