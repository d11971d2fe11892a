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
# Tests and CLI runs rebuild the same jitted steps again and again (a fresh jit per trainer, ~90
# executables per CLI run of one config): through JAX's persistent compilation cache each
# compiles once per session and loads after that (the same executable, so the same numbers).
# The directory is this session's own, empty at the start and removed at exit; subprocesses
# inherit it. A size limit turns on JAX's file lock: the processes of a pod never read an entry
# while another writes it. test_plan keeps its TPU plans out (tests/test_plan.py: optimized).
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="sftjax-tests-compilation-cache-")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ.update(
    JAX_COMPILATION_CACHE_DIR=_COMPILATION_CACHE,
    JAX_COMPILATION_CACHE_MAX_SIZE=str(4 * 2**30),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

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
