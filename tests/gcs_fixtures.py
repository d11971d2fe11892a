"""A local GCS emulator (tests/gcs_emulator.py) and the variables that point every client at it.

The emulator listens on 127.0.0.1 only; the variables point gcsfs (etils.epath),
google-cloud-storage (the workdir lock) and tensorstore (Orbax) at it and keep every client off
the network. Subprocesses inherit them through os.environ.
"""

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

BUCKET = "sftjax-test"


@contextlib.contextmanager
def running_emulator() -> Iterator[dict]:
    """Start the emulator with BUCKET, set the variables in os.environ, undo both on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, str(pathlib.Path(__file__).with_name("gcs_emulator.py")), "start"]
        + ["--host=127.0.0.1"]
        + [f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs / google-cloud-storage
        "FSSPEC_GS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else a gRPC probe per call
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (Orbax's array writer)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
        "GCE_METADATA_HOST": "127.0.0.1:9",  # no metadata server: fail fast, locally
        "NO_GCE_CHECK": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "emulator did not start"
                time.sleep(0.1)
        yield env
    finally:
        server.terminate()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
