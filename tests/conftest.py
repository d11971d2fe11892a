"""Test setup: 8 fake CPU devices (before jax is imported), strict rank promotion, shared data."""

import atexit
import os
import pathlib
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tiny models: compile time dominates the suite, and XLA's optimisations halve it at no cost to
# what is tested (same semantics; tolerances below hold). Subprocesses inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# CLI runs (subprocesses) of one config compile the same ~90 executables each; through JAX's
# persistent compilation cache they compile once per session and load after that (same
# executables, so the same numbers). Set after `import jax`: this process keeps compiling in
# memory only (the TPU plans' big executables are compiled once anyway). The directory is this
# session's own, empty at the start; a size limit turns on JAX's file lock, so two processes of
# a pod never read an entry while the other writes it.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="sftjax-tests-compilation-cache-")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ.update(
    JAX_COMPILATION_CACHE_DIR=_COMPILATION_CACHE,
    JAX_COMPILATION_CACHE_MAX_SIZE=str(4 * 2**30),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
)

# Real artifacts (tokenizer, Alpaca rows, a trained tiny Llama) live beside the checkout.
SHARED_DATA = pathlib.Path(
    os.environ.get(
        "SFTJAX_SHARED_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared/data"
    )
)


def shared_path(name: str) -> pathlib.Path:
    """Path under ../shared/data, or skip with the reason when that folder is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is provided beside the checkout in CI)")
    return path
