"""One training process per workdir: a lock that names its holder and shows it is alive.

Owns `hold(workdir)`, a context manager around `WORKDIR/.lock`, on a local disk or in a gs://
bucket. The lock carries JSON {host, pid, started, since, token} so a second process is refused
with who holds the workdir and since when. Its holder refreshes it every HEARTBEAT_SECONDS from
a background thread (the heartbeat); a lock not refreshed for STALE_SECONDS belongs to a run
that is gone (its host died, its pod was rescheduled) and is taken over, from any host. On the
holder's own host a lock whose process is gone (kill -9, OOM: that pid no longer runs, or now
belongs to a process started at another time) is taken over at once.

- Local: created with O_CREAT|O_EXCL (atomic on local disks and NFS); the heartbeat is the
  file's mtime. Takeovers are serialised by an fcntl lock on `.lock.takeover`, which the
  winner deletes while still holding it (a waiter that then finds another file retries).
- gs://: an object created with the generation precondition 0 (create-if-absent; GCS lets
  exactly one of several racing creates succeed). The heartbeat rewrites it on the condition
  that its generation is still the one this process wrote, a takeover replaces the stale
  generation it read, and release deletes only that generation: no step can remove another
  process's lock.

Does not own what runs under the lock (loop.fit). In multi-host runs only process 0 holds it:
all hosts share one workdir. `WorkdirError` (the workdir cannot be created or written) and
`WorkdirBusy` are user errors: one line, exit 2.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator

log = logging.getLogger("sftjax")

LOCK_NAME = ".lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0  # ten missed heartbeats
_HELD: dict[str, tuple] = {}  # workdir -> (lock, record) held here; nested holds: no-ops


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir; the message names it."""


class WorkdirError(RuntimeError):
    """The workdir cannot be used (read-only, a file, not creatable); the message says why."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), None where unknown.

    Together with the pid it names one process: a pid reused later has another start time.
    """
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in (...) may hold spaces


def _is_alive(pid: int, started: str | None) -> bool:
    """Whether the process pid (started at `started`, if known) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    now = _start_time(pid)
    return started is None or now is None or now == started


def _holder_record() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "started": _start_time(pid),
        "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "token": uuid.uuid4().hex,  # tells this holder from a later one with the same pid
    }


def _describe(holder: dict, where: str, age: float | None) -> str:
    if not holder:
        return f"an unreadable lock {where}"
    beat = f", last heartbeat {age:.0f} s ago" if age is not None else ""
    return (
        f"process {holder.get('pid')} on host {holder.get('host')} "
        f"(since {holder.get('since')} UTC{beat})"
    )


def _is_stale(holder: dict, age: float | None) -> bool:
    """Gone: its process no longer runs on this host, or no heartbeat for STALE_SECONDS."""
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        return not _is_alive(pid, holder.get("started"))
    return age is not None and age > STALE_SECONDS


def _parse(data: bytes) -> dict:
    """The holder a lock records; {} if unreadable (half-written)."""
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


class _LocalLock:
    """WORKDIR/.lock on a local or network file system; the heartbeat is its mtime."""

    def __init__(self, workdir: str):
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.where = str(self.path)
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise WorkdirError(f"--workdir={workdir} is a file, not a directory") from None
        except OSError as e:
            raise WorkdirError(_unusable(workdir, e)) from None
        if not self.workdir.is_dir():
            raise WorkdirError(f"--workdir={workdir} is a file, not a directory")

    def create(self, record: dict) -> bool:
        """Create the lock holding `record`; False if it exists already."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise WorkdirError(_unusable(self.workdir, e)) from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
            f.flush()
            os.fsync(f.fileno())
        return True

    def read(self) -> tuple[dict, float] | None:
        """(holder, seconds since its heartbeat), or None if there is no lock."""
        try:
            data, mtime = self.path.read_bytes(), self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        return _parse(data), time.time() - mtime

    def take_over(self, record: dict, judge) -> tuple[bool, tuple[dict, float] | None]:
        """Replace a stale lock with `record`, one process at a time: (won, holder seen)."""
        with _exclusive(self.workdir / f"{LOCK_NAME}.takeover"):
            seen = self.read()
            if seen is not None and not judge(*seen):
                return False, seen
            if seen is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            return self.create(record), self.read()

    def refresh(self, record: dict) -> bool:
        """Touch the lock if it is still ours (False: it was taken over)."""
        seen = self.read()
        if seen is None or seen[0] != record:
            return False
        os.utime(self.path)
        return True

    def release(self, record: dict) -> None:
        seen = self.read()
        if seen is not None and seen[0] == record:
            self.path.unlink()


@contextlib.contextmanager
def _exclusive(guard: pathlib.Path) -> Iterator[None]:
    """An fcntl lock on `guard`, which is deleted afterwards (it never stays in the workdir).

    The holder deletes the file while still holding it; a process that waited on that file
    then holds a lock on a deleted file, sees that `guard` is another file or none, and retries.
    """
    while True:
        fd = os.open(guard, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)  # POSIX locks: honoured across NFS clients too
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(guard))
            except FileNotFoundError:
                same = False
            if same:
                try:
                    yield
                finally:
                    guard.unlink()
                return
        finally:
            os.close(fd)


class _GcsLock:
    """gs://BUCKET/WORKDIR/.lock as an object; every write is conditional on its generation."""

    def __init__(self, workdir: str):
        from google.api_core import exceptions  # gcsfs depends on google-cloud-storage
        from google.cloud import storage

        self.errors = exceptions
        self.where = f"{workdir.rstrip('/')}/{LOCK_NAME}"
        bucket, _, prefix = self.where.partition("://")[2].partition("/")
        try:
            self.blob_name = prefix
            self.bucket = storage.Client().bucket(bucket)
        except Exception as e:  # no credentials
            raise WorkdirError(_unusable(workdir, e)) from None
        self.generation = None  # of the lock this process wrote

    def _call(self, action):
        try:
            return action()
        except (self.errors.PreconditionFailed, self.errors.NotFound):
            raise
        except self.errors.GoogleAPICallError as e:
            raise WorkdirError(_unusable(self.where.rsplit("/", 1)[0], e)) from None

    def _write(self, record: dict, if_generation_match: int) -> bool:
        blob = self.bucket.blob(self.blob_name)
        try:
            self._call(
                lambda: blob.upload_from_string(
                    json.dumps(record), if_generation_match=if_generation_match
                )
            )
        except self.errors.NotFound as e:  # an upload finds no object missing, only a bucket
            raise WorkdirError(_unusable(self.where.rsplit("/", 1)[0], e)) from None
        except self.errors.PreconditionFailed:
            # A create retried after a lost answer finds its own first write: still ours.
            seen = self._read_blob()
            if seen is None or seen[0] != record:
                return False
            blob = seen[2]
        self.generation = blob.generation
        return True

    def _read_blob(self):
        blob = self._call(lambda: self.bucket.get_blob(self.blob_name))
        if blob is None:
            return None
        try:
            data = self._call(lambda: blob.download_as_bytes(if_generation_match=blob.generation))
        except (self.errors.PreconditionFailed, self.errors.NotFound):
            return None  # replaced or deleted meanwhile; the caller tries again
        age = (datetime.datetime.now(datetime.UTC) - blob.updated).total_seconds()
        return _parse(data), age, blob

    def create(self, record: dict) -> bool:
        return self._write(record, 0)

    def read(self) -> tuple[dict, float] | None:
        seen = self._read_blob()
        return None if seen is None else seen[:2]

    def take_over(self, record: dict, judge) -> tuple[bool, tuple[dict, float] | None]:
        seen = self._read_blob()
        if seen is None:
            return self.create(record), self.read()
        if not judge(*seen[:2]):
            return False, seen[:2]
        return self._write(record, seen[2].generation), self.read()

    def refresh(self, record: dict) -> bool:
        return self._write(record, self.generation)

    def release(self, record: dict) -> None:
        blob = self.bucket.blob(self.blob_name)
        with contextlib.suppress(self.errors.PreconditionFailed, self.errors.NotFound):
            self._call(lambda: blob.delete(if_generation_match=self.generation))


def _unusable(workdir, error: BaseException) -> str:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    hint = "a read-only file system" if getattr(error, "errno", None) == errno.EROFS else reason
    return (
        f"--workdir={workdir} cannot be written ({hint.splitlines()[0] if hint else error!r}); "
        "give a directory this process can create files in"
    )


def _lock_for(workdir: str):
    return _GcsLock(workdir) if "://" in workdir else _LocalLock(workdir)


def acquire(workdir: str | os.PathLike) -> tuple[object, dict]:
    """Take the workdir's lock or raise WorkdirBusy naming the holder: (lock, record written)."""
    lock = _lock_for(os.fspath(workdir))
    record = _holder_record()
    if lock.create(record):
        return lock, record

    def judge(holder: dict, age: float) -> bool:
        stale = _is_stale(holder, age)
        if stale and holder:
            log.warning("taking over the lock of %s, which is gone", _describe(holder, "", age))
        return stale

    won, seen = lock.take_over(record, judge)
    if won:
        return lock, record
    holder, age = seen if seen is not None else ({}, None)
    elsewhere = holder.get("host") != socket.gethostname()
    wait = f" (it is taken over once no heartbeat came for {STALE_SECONDS:.0f} s)"
    raise WorkdirBusy(
        f"{workdir} is in use by {_describe(holder, lock.where, age)}; wait for it to finish, "
        f"or use another --workdir{wait if elsewhere or not holder else ''}"
    )


def release(lock, record: dict) -> None:
    """Remove the lock if it still holds `record` (never another process's lock)."""
    lock.release(record)


def _heartbeat(lock, record: dict, stop: threading.Event) -> None:
    """Refresh the lock until `stop`; warn once if another process took it over."""
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            if not lock.refresh(record):
                log.error(
                    "the lock %s was taken over by another process: this run no longer holds "
                    "the workdir; stop it",
                    lock.where,
                )
                return
        except Exception as e:  # a network hiccup: the next beat tries again
            log.warning("could not refresh the lock %s (%s)", lock.where, e)


@contextlib.contextmanager
def hold(workdir: str | os.PathLike) -> Iterator[None]:
    """`with hold(workdir):` the block runs as the workdir's only process, or WorkdirBusy."""
    text = os.fspath(workdir)
    if not text.strip():
        raise WorkdirError("--workdir is empty; name a directory (an unset variable?)")
    key = text.rstrip("/") if "://" in text else os.path.realpath(text)
    if key in _HELD:  # nested (e.g. main around fit): this process holds it already
        yield
        return
    lock, record = acquire(workdir)
    _HELD[key] = lock, record
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(lock, record, stop), daemon=True, name="sftjax-lock"
    )
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if _HELD.pop(key, None):
            release(lock, record)


def release_all() -> None:
    """Release every lock this process holds: for an abort that skips `hold`'s cleanup."""
    for lock, record in list(_HELD.values()):
        with contextlib.suppress(Exception):
            release(lock, record)
