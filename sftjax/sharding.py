"""Device mesh and the one table that maps logical axis names to mesh axes.

Owns: mesh construction, the logical→mesh rules, NamedShardings for parameters and batches, and
`constrain` for activations. Parameters name their axes in model/llama.py; nothing else in the
project names a mesh axis for a weight.
"""

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Logical axis -> mesh axes. Activations keep `embed` replicated (None in their names), so
# `batch` may use fsdp while weights' `embed` also does.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("vocab_table", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("lora_rank", None),  # LoRA's rank axis: small, never split
)


def mesh_shape(axes: dict[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolve one -1 entry to the remaining devices; check the product."""
    sizes = [int(axes[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices not divisible by fixed axes {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} uses {math.prod(sizes)} devices but "
            f"{num_devices} are present; set one axis to -1 to take the rest"
        )
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh with automatic (GSPMD) axes over `devices` (default: all)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(dict(data=data, fsdp=fsdp, tensor=tensor), len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=np.asarray(devices).ravel()
    )


def _active_rules() -> dict:
    return dict(spmd.get_logical_axis_rules() or DEFAULT_RULES)


def logical_to_spec(names: Sequence[str | None], rules: Rules | None = None) -> PartitionSpec:
    """("batch", "seq", None) -> P(("data", "fsdp"), None, None) under `rules`."""
    table = dict(rules) if rules is not None else _active_rules()
    unknown = [n for n in names if n is not None and n not in table]
    if unknown:
        raise ValueError(f"logical axes {unknown} have no sharding rule; known: {sorted(table)}")
    return PartitionSpec(*(None if n is None else table[n] for n in names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh, free on one device."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """[batch, seq] arrays: batch split over data×fsdp, seq whole."""
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for an (abstract or concrete) NNX state from its logical axis metadata."""
    with nnx.logical_axis_rules(rules):
        return nnx.get_named_sharding(state, mesh)
