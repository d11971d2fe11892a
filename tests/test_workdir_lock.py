"""workdir_lock with real processes: one holder, others refused by name, dead holders replaced.

Local directories and gs:// workdirs (tests/gcs_emulator.py, which answers generation
preconditions as GCS does) alike: exactly one of several processes holds a workdir, a holder
that is gone is taken over (at once on its own host, after STALE_SECONDS without a heartbeat
from any host), and nothing but the workdir's own files stays behind.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from gcs_fixtures import BUCKET, running_emulator
from train_fixtures import ROOT

from sftjax import workdir_lock

# A process that holds the lock, says so, then sleeps (the tests kill it or let it finish).
HOLDER = textwrap.dedent(
    """
    import sys, time
    from sftjax import workdir_lock
    try:
        with workdir_lock.hold(sys.argv[1]):
            print("held", flush=True)
            time.sleep(float(sys.argv[2]))
    except workdir_lock.WorkdirBusy as e:
        print("busy", e, flush=True)
    """
)


def _start(workdir, seconds: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir), str(seconds)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    return int(done.stdout)


def _write_lock(workdir, **record) -> None:
    workdir.mkdir(exist_ok=True)
    (workdir / workdir_lock.LOCK_NAME).write_text(json.dumps(record))


def test_second_process_is_refused_naming_the_holder(tmp_path):
    holder = _start(tmp_path, 60)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = _start(tmp_path, 0)
        line = second.communicate(timeout=60)[0]
        assert line.startswith("busy")
        assert f"process {holder.pid} on host {socket.gethostname()} (since 20" in line
        assert "another --workdir" in line
        with pytest.raises(workdir_lock.WorkdirBusy, match=f"process {holder.pid} "):
            workdir_lock.acquire(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture(scope="module")
def emulator():
    with running_emulator() as env:
        yield env


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = _start(tmp_path, 60)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # SIGKILL: no cleanup ran, the lock file stays
    holder.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid
    with workdir_lock.hold(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()  # released on exit


def test_clean_exit_releases_the_lock(tmp_path):
    holder = _start(tmp_path, 0)
    assert holder.communicate(timeout=60)[0].strip() == "held"
    assert not (tmp_path / ".lock").exists()


def test_only_one_of_several_racing_restarts_takes_a_stale_lock(tmp_path):
    _write_lock(tmp_path, host=socket.gethostname(), pid=_dead_pid(), started=None, since="x")
    racers = [_start(tmp_path, 3) for _ in range(4)]
    outputs = [r.communicate(timeout=120)[0] for r in racers]
    assert sorted(o.split()[0] for o in outputs) == ["busy", "busy", "busy", "held"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no .lock.takeover stays behind


def test_reused_pid_with_another_start_time_is_stale(tmp_path):
    # Our own pid, but "started" at another time: the process that wrote it is gone.
    _write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), started="1", since="x")
    with workdir_lock.hold(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["started"] != "1"


def test_lock_from_another_host_is_taken_once_its_heartbeat_is_stale(tmp_path):
    # A rescheduled pod on shared storage: the old holder's host is gone, its pid means nothing.
    _write_lock(tmp_path, host="elsewhere-node-7", pid=1, started=None, since="t0")
    with pytest.raises(workdir_lock.WorkdirBusy) as info:  # fresh heartbeat: maybe alive
        workdir_lock.acquire(tmp_path)
    message = str(info.value)
    assert "on host elsewhere-node-7 (since t0 UTC, last heartbeat 0 s ago)" in message
    assert f"taken over once no heartbeat came for {workdir_lock.STALE_SECONDS:.0f} s" in message
    assert json.loads((tmp_path / ".lock").read_text())["host"] == "elsewhere-node-7"

    beat = time.time() - workdir_lock.STALE_SECONDS - 5  # its last heartbeat, 305 s ago
    os.utime(tmp_path / ".lock", (beat, beat))
    holder = _start(tmp_path, 0)
    assert holder.communicate(timeout=60)[0].strip() == "held"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_holder_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_SECONDS", 0.05)
    with workdir_lock.hold(tmp_path):
        old = time.time() - 1000
        os.utime(tmp_path / ".lock", (old, old))
        time.sleep(0.5)
        assert time.time() - (tmp_path / ".lock").stat().st_mtime < 100


def test_unreadable_lock_file_is_not_taken(tmp_path):
    (tmp_path / ".lock").write_text("")  # a holder between create and write, or a crash there
    with pytest.raises(workdir_lock.WorkdirBusy, match="unreadable lock"):
        workdir_lock.acquire(tmp_path)


def test_nested_hold_in_one_process_is_a_no_op(tmp_path):
    with workdir_lock.hold(tmp_path), workdir_lock.hold(tmp_path):
        assert (tmp_path / ".lock").exists()
    assert not (tmp_path / ".lock").exists()


def test_release_leaves_another_holders_lock_alone(tmp_path):
    lock, record = workdir_lock.acquire(tmp_path)
    _write_lock(tmp_path, host="other", pid=1, started=None, since="later")
    workdir_lock.release(lock, record)
    assert json.loads((tmp_path / ".lock").read_text())["host"] == "other"


def test_gs_workdir_has_one_holder_and_dead_ones_are_taken_over(emulator):
    workdir = f"gs://{BUCKET}/runs/locked"
    holder = _start(workdir, 60)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = _start(workdir, 0)
        line = second.communicate(timeout=60)[0]
        assert line.startswith("busy"), line
        assert f"process {holder.pid} on host {socket.gethostname()} (since 20" in line
        training = subprocess.run(  # as a user meets it: refused before anything is read
            [sys.executable, "-m", "sftjax.main", f"--config={ROOT / 'configs/base.py'}"]
            + [f"--workdir={workdir}"],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert training.returncode == 2, training.stderr[-3000:]
        assert f"error: {workdir} is in use by process {holder.pid} on host" in training.stderr
    finally:
        holder.kill()  # no cleanup ran: the lock object stays, its process is gone
        holder.wait()
    racers = [_start(workdir, 3) for _ in range(4)]
    outputs = [r.communicate(timeout=120)[0] for r in racers]
    assert sorted(o.split()[0] for o in outputs) == ["busy", "busy", "busy", "held"], outputs
    assert sum(f"process {holder.pid} " in o for o in outputs) == 0  # busy names the winner


def test_gs_lock_from_another_host_is_taken_once_stale(emulator, monkeypatch):
    from sftjax import paths

    workdir = f"gs://{BUCKET}/runs/stale"
    other = {"host": "elsewhere-node-7", "pid": 1, "started": None, "since": "t0"}
    (paths.resolve(workdir) / ".lock").write_text(json.dumps(other))
    with pytest.raises(workdir_lock.WorkdirBusy, match="on host elsewhere-node-7"):
        workdir_lock.acquire(workdir)
    monkeypatch.setattr(workdir_lock, "STALE_SECONDS", 0.5)
    time.sleep(1)
    with workdir_lock.hold(workdir):
        record = json.loads((paths.resolve(workdir) / ".lock").read_text())
        assert record["pid"] == os.getpid()
    assert not (paths.resolve(workdir) / ".lock").exists()
