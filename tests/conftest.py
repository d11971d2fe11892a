"""Test setup: 8 fake CPU devices (before jax is imported), strict rank promotion, shared data."""

import os
import pathlib

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
