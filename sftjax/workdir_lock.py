"""One training process per workdir: a lock file that names its holder.

Owns `hold(workdir)`, a context manager around `WORKDIR/.lock`. The file is created with
O_CREAT|O_EXCL (atomic on local disks and NFS) and carries JSON {host, pid, started, since}, so
a second process is refused with who holds the workdir and since when. A lock left by a process
that died on this host (kill -9, OOM) is taken over: same host, and that pid is gone or now
belongs to a process started at another time. A lock from another host is never judged stale
(its pid means nothing here); the message says which file to delete if that run is really gone.
Takeovers are serialised by an fcntl lock on `WORKDIR/.lock.takeover`, so two restarts racing
for a stale lock cannot both win.
Does not own: what runs under the lock (loop.fit), or URL workdirs (gs://...: nothing to lock
with there; `hold` says so once and does not lock).
In multi-host runs only process 0 should hold it: all hosts share one workdir.
"""

import contextlib
import datetime
import fcntl
import json
import logging
import os
import pathlib
import socket
from collections.abc import Iterator

log = logging.getLogger("sftjax")

LOCK_NAME = ".lock"
_HELD: set[pathlib.Path] = set()  # workdirs this process holds, so nested holds are no-ops


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir; the message names it."""


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
    }


def _read(path: pathlib.Path) -> dict | None:
    """The holder recorded in the lock file; {} if unreadable (half-written); None if absent."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _create(path: pathlib.Path, record: dict) -> bool:
    """Create the lock file holding `record`; False if it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record))
        f.flush()
        os.fsync(f.fileno())
    return True


def _describe(holder: dict, path: pathlib.Path) -> str:
    if not holder:
        return f"an unreadable lock file {path}"
    return (
        f"process {holder.get('pid')} on host {holder.get('host')} "
        f"(since {holder.get('since')} UTC)"
    )


def _is_stale(holder: dict | None) -> bool:
    """True when the recorded holder is a process of this host that no longer runs."""
    if not holder or holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return isinstance(pid, int) and not _is_alive(pid, holder.get("started"))


def acquire(workdir: str | os.PathLike) -> dict:
    """Take WORKDIR/.lock or raise WorkdirBusy naming the holder; returns what was written."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_NAME
    record = _holder_record()
    if _create(path, record):
        return record
    with open(workdir / f"{LOCK_NAME}.takeover", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # one takeover at a time on this host
        holder = _read(path)
        if holder is None or _is_stale(holder):
            if holder:
                log.warning("taking over the lock of %s, which is gone", _describe(holder, path))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            if _create(path, record):
                return record
            holder = _read(path)
    raise WorkdirBusy(
        f"{workdir} is in use by {_describe(holder or {}, path)}; wait for it to finish, or use "
        f"another --workdir. If that run is gone (e.g. its host died), delete {path}"
    )


def release(workdir: str | os.PathLike, record: dict) -> None:
    """Remove WORKDIR/.lock if it still holds `record` (never another process's lock)."""
    path = pathlib.Path(workdir) / LOCK_NAME
    if _read(path) == record:
        path.unlink()


@contextlib.contextmanager
def hold(workdir: str | os.PathLike) -> Iterator[None]:
    """`with hold(workdir):` the block runs as the workdir's only process, or WorkdirBusy."""
    if "://" in os.fspath(workdir):
        log.warning("%s is a URL: no workdir lock; never start two runs on it", workdir)
        yield
        return
    key = pathlib.Path(workdir).resolve()
    if key in _HELD:  # nested (e.g. main around fit): this process holds it already
        yield
        return
    record = acquire(workdir)
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        release(workdir, record)
