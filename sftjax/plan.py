"""`python -m sftjax.plan --config=configs/llama2_70b.py --topology=v5p:2x4x4`: will it fit?

Compiles the real train step (the function `fit` jits, with its shardings, microbatches, remat
and attention) on abstract arrays for a TPU slice, using the TPU compiler from libtpu on a host
without a TPU, and reads the per-chip memory the compiler plans: nothing is allocated or run.
When the config does not fit it tries the usual knobs in order of cost to speed (a bf16 frozen
base under LoRA, microbatches, splash attention, full remat, more chips) and prints the first
change that fits.

Fit means arguments + temporaries <= HBM per chip: libtpu itself refuses a compile only when
temporaries alone exceed HBM, but the arguments (parameters + optimizer state, donated and so
aliased with the outputs; under LoRA also the frozen base, an argument never donated) are
resident at the same time. `--devices=N` compiles for N local devices instead: GPUs where there
are GPUs; on a CPU host a rough estimate only (XLA:CPU computes bf16 matmuls in fp32 and uses
XLA attention, overstating temporaries). `--topology=v5p:1x1x1` plans a single chip, the
question "does it fit one chip?" (the smallest v5p slice Google rents is v5p-8, 4 chips).

Owns topology names, the memory arithmetic and the knob search. It builds nothing of its own:
abstract state, shardings and the jitted step come from train.py, as in fit().
"""

import dataclasses
import glob
import json
import math
import os
import pathlib
import re
import sys
import time

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from sftjax import cli, sharding, train
from sftjax import config as config_lib

GIB = 2**30
# HBM per chip as libtpu reports it (GiB); v5p-N, v5e-N and v6e-N name their sizes in
# TensorCores for v5p (2 per chip) and in chips for v5e and v6e.
CHIPS = {
    "v5p": dict(hbm_gib=95.74, cores_per_chip=2, shapes={4: "2x2x1", 8: "2x2x2", 16: "2x2x4",
                32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}),
    "v5e": dict(hbm_gib=15.75, cores_per_chip=1, shapes={1: "1x1", 4: "2x2", 8: "2x4",
                16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}),
    "v6e": dict(hbm_gib=31.25, cores_per_chip=1, shapes={1: "1x1", 4: "2x2", 8: "2x4",
                16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}),
}  # fmt: skip
# Devices and HBM of a --devices=N estimate: an 80 GB GPU (H100) unless --hbm_gib says otherwise.
DEFAULT_DEVICE_HBM_GIB = 80 * 1e9 / GIB
# A fit using more than this share of HBM is reported as tight: allocator fragmentation and the
# runtime's own buffers are not in the compiler's figures, so the search looks further.
TIGHT = 0.95
_EXHAUSTED = re.compile(r"temporaries \(([\d.]+)([KMGT])\)", re.IGNORECASE)


class PlanError(ValueError):
    """A topology name or config the planner cannot use; one line for the user."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # "v5p:2x2x2", or "cpu x8" / "gpu x8" for --devices
    generation: str  # "v5p", "v5e", "v6e", or the local platform for --devices
    chips: int
    hbm_gib: float

    @property
    def is_tpu(self) -> bool:
        return self.generation in CHIPS


def parse_topology(text: str) -> Target:
    """v5p:2x4x4 (chips in a grid) or v5p-64 (TensorCores, as slices are named) -> Target."""
    match = re.fullmatch(r"(v5p|v5e|v6e)(?::(\d+(?:x\d+)*)|-(\d+))", text.strip().lower())
    if not match:
        raise PlanError(f"--topology={text!r}: expected e.g. v5p:2x2x2, v5p-16, v5e-8 or v6e:2x4")
    generation, grid, size = match.groups()
    spec = CHIPS[generation]
    if grid:
        dims = [int(d) for d in grid.split("x")]
        rank = 3 if generation == "v5p" else 2
        if len(dims) != rank or min(dims) < 1:
            example = "2x2x1" if rank == 3 else "2x4"
            raise PlanError(
                f"--topology={text!r}: a {generation} grid is {rank} numbers >= 1, e.g. "
                f"{generation}:{example}"
            )
        chips = math.prod(dims)
        shape = grid
    else:
        chips = int(size) // spec["cores_per_chip"]
        if chips not in spec["shapes"]:
            sizes = sorted(n * spec["cores_per_chip"] for n in spec["shapes"])
            raise PlanError(f"--topology={text!r}: {generation} slice sizes are {sizes}")
        shape = spec["shapes"][chips]
    return Target(f"{generation}:{shape}", generation, chips, spec["hbm_gib"])


def _host_bounds(shape: str) -> dict:
    """libtpu's topology options for `shape`: a grid smaller than its default host (2x2x1
    chips), such as v5e:1x1, is one host of exactly that grid."""
    dims = [int(d) for d in shape.split("x")]
    dims += [1] * (3 - len(dims))
    return {"chips_per_host_bounds": dims} if dims[0] < 2 or dims[1] < 2 else {}


def accelerator_type(target: Target) -> str:
    """Cloud TPU's name of the slice (v5p-8, v5litepod-4, v6e-8), as TPU VMs report it."""
    if target.generation == "v5p":
        return f"v5p-{target.chips * CHIPS['v5p']['cores_per_chip']}"
    return f"{'v5litepod' if target.generation == 'v5e' else 'v6e'}-{target.chips}"


def _describe_host_to_libtpu(target: Target) -> None:
    """Give libtpu the slice and worker names a TPU VM would, where there is no TPU.

    Without them libtpu, on loading, prints ~6 lines of C++ warnings (a missing
    TPU_ACCELERATOR_TYPE, an unparsable TPU_WORKER_HOSTNAMES, a source-location trace) past any
    logging setting. Both only describe the host it would run on; the compiled target comes
    from the topology name alone (measured: the same devices for every value). A TPU VM's own
    values, and anything the user set, are kept.
    """
    if glob.glob("/dev/accel*") or os.path.exists("/dev/vfio"):
        return
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(target))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def devices_for(target: Target) -> list:
    """The target's devices: TPU devices from libtpu's topology, or this host's CPU devices."""
    if not target.is_tpu:
        if len(jax.devices()) < target.chips:
            raise PlanError(f"--devices={target.chips}: only {len(jax.devices())} here")
        return jax.devices()[: target.chips]
    from jax.experimental import topologies

    if jax.default_backend() != "tpu":
        # Compiling only: no TPU is opened, so libtpu's one-process-per-host lock (which would
        # serialise concurrent plans and test runs on a CPU host) guards nothing here.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        _describe_host_to_libtpu(target)
    try:
        shape = target.name.split(":")[1]
        topology = topologies.get_topology_desc(target.name, "tpu", **_host_bounds(shape))
    except Exception as e:  # libtpu missing, or a shape it does not know
        raise PlanError(
            f"no TPU compiler for {target.name}: {str(e).splitlines()[0]} "
            '(pip install "jax[tpu]" matching the installed jax; run with JAX_PLATFORMS=cpu)'
        ) from e
    return list(topology.devices)


@dataclasses.dataclass
class Plan:
    target: Target
    change: str  # "as configured" or the knobs that were turned
    params_gib: float  # what trains: every parameter, or only the LoRA adapters
    optimizer_gib: float
    frozen_gib: float  # the frozen base under LoRA (0 without): an argument, never donated
    arguments_gib: float
    temporaries_gib: float
    compile_s: float

    @property
    def per_chip_gib(self) -> float:
        return self.arguments_gib + self.temporaries_gib

    @property
    def fits(self) -> bool:
        return self.per_chip_gib <= self.target.hbm_gib

    @property
    def tight(self) -> bool:
        return self.fits and self.per_chip_gib > TIGHT * self.target.hbm_gib

    def line(self) -> str:
        share = self.per_chip_gib / self.target.hbm_gib
        verdict = "does NOT fit" if not self.fits else "fits, tight" if self.tight else "fits"
        verdict += f" ({share:.0%} of HBM)"
        estimate = " (CPU-compiler estimate)" if self.target.generation == "cpu" else ""
        state = f"params {self.params_gib:.1f} + optimizer {self.optimizer_gib:.1f}"
        if self.frozen_gib:
            state = (
                f"params {self.params_gib:.2f} (trainable) + optimizer {self.optimizer_gib:.2f}"
                f" + frozen base {self.frozen_gib:.1f}"
            )
        return (
            f"{self.target.name}, {self.change}: {state} GiB/chip; arguments "
            f"{self.arguments_gib:.1f} + temporaries {self.temporaries_gib:.1f} = "
            f"{self.per_chip_gib:.1f} / "
            f"{self.target.hbm_gib:.2f} GiB HBM: {verdict}{estimate} "
            f"(compiled in {self.compile_s:.0f} s)"
        )


def _shard_gib(tree) -> float:
    """Bytes of one device's shard of every leaf (all leaves carry NamedShardings)."""
    total = sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )
    return total / GIB


def check_config(config: ml_collections.ConfigDict, chips: int) -> None:
    """config.validate minus the checks on local data paths, which a plan does not read."""
    try:
        config_lib.validate(config, chips)
    except config_lib.InvalidConfig as e:
        paths = ("config.data.train_files", "config.data.validation_files", "config.data.tokenizer")
        problems = [p for p in e.problems if not p.startswith(paths)]
        if problems:
            raise config_lib.InvalidConfig(problems) from None


def without_placeholder_weights(config: ml_collections.ConfigDict, report=print):
    """A copy whose hf_path is cleared when it is not on this host: the preset has its shapes."""
    hf_path = config.model.hf_path
    if not hf_path or (pathlib.Path(hf_path) / "config.json").exists():
        return config
    report(f"model.hf_path {hf_path} is not here: planning preset {config.model.preset}")
    return _with(config, **{"model.hf_path": ""})


def compile_plan(config: ml_collections.ConfigDict, target: Target, change: str) -> Plan:
    """Compile the train step of `config` for `target` and read its per-chip memory."""
    check_config(config, target.chips)
    cfg = config_lib.model_config(config.model)
    mesh = sharding.make_mesh(
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices_for(target)
    )
    rules = config_lib.sharding_rules(config)
    tx, schedule = train.make_optimizer(config.optim, 1000)  # steps shape only the schedule
    graphdef, state, frozen = train.abstract_train_state(cfg, mesh, rules, tx)  # as fit()
    batch_sharding = sharding.batch_sharding(mesh, rules)
    rows = (config.train.batch_size, config.data.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(rows, jax.numpy.int32, sharding=batch_sharding)
        for k in train.BATCH_KEYS
    }
    step_fn, _ = train.jit_steps_for(
        cfg, graphdef, state, frozen, tx, schedule, config.train.microbatches, batch_sharding
    )
    # What the arguments hold, per chip, for the report line (the verdict uses the compiler's).
    held = [_shard_gib(state.params), _shard_gib(state.opt_state), _shard_gib(frozen)]
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = step_fn.lower(state, batch, frozen)
        try:
            memory = lowered.compile().memory_analysis()
        except Exception as e:  # libtpu: RESOURCE_EXHAUSTED when temporaries alone exceed HBM
            found = _EXHAUSTED.search(str(e))
            if not found:
                raise
            scale = {"K": 2**-20, "M": 2**-10, "G": 1, "T": 2**10}[found.group(2).upper()]
            temporaries = float(found.group(1)) * scale
            arguments = _shard_gib((state, batch, frozen))  # the frozen base is resident too
            seconds = time.perf_counter() - start
            return Plan(target, change, *held, arguments, temporaries, seconds)
    seconds = time.perf_counter() - start
    # Outputs not aliased with donated arguments (the metrics) are live beside them.
    arguments = (
        memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    ) / GIB
    temporaries = memory.temp_size_in_bytes / GIB
    return Plan(target, change, *held, arguments, temporaries, seconds)


def _with(config: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted keys changed, e.g. _with(c, **{"model.remat": "full"})."""
    copy = ml_collections.ConfigDict(config.to_dict())
    for dotted, value in changes.items():
        group, key = dotted.split(".")
        copy[group][key] = value
    return copy


def knobs(config: ml_collections.ConfigDict, target: Target):
    """(change, config, target) to try in order, cheapest in speed first; the first fit wins."""
    rows_per_chip = config.train.batch_size // target.chips
    micro = config.train.microbatches
    if config.model.lora.rank and config.model.base_dtype == "float32":
        # The frozen base is the largest argument under LoRA; bf16 halves it (and is faster).
        yield "model.base_dtype=bfloat16", _with(config, **{"model.base_dtype": "bfloat16"}), target
    # More microbatches: same math, less activation memory, smaller matmuls. Under LoRA their
    # fp32 gradient accumulator is only adapter-sized.
    for factor in (2, 4):
        if rows_per_chip % (micro * factor) == 0:
            more = {"train.microbatches": micro * factor}
            yield f"train.microbatches={micro * factor}", _with(config, **more), target
    if target.is_tpu and config.model.attention not in ("splash", "auto"):
        yield "model.attention=splash", _with(config, **{"model.attention": "splash"}), target
    if config.model.remat != "full":  # recomputes each layer's forward: ~1/3 more FLOPs
        yield "model.remat=full", _with(config, **{"model.remat": "full"}), target
    rows = config.train.batch_size // 2
    if rows % target.chips == 0 and rows % config.train.microbatches == 0:
        # Changes the recipe (half the tokens per step), but costs no chips: shown before them.
        # At 70B, 16 v5p chips, it fits where more microbatches do not (their fp32 gradient
        # accumulator is one more copy of the gradients).
        yield f"train.batch_size={rows}", _with(config, **{"train.batch_size": rows}), target
    if target.is_tpu:
        spec = CHIPS[target.generation]
        for chips in sorted(n for n in spec["shapes"] if n > target.chips)[:2]:
            if config.train.batch_size % chips == 0:
                bigger = parse_topology(f"{target.generation}:{spec['shapes'][chips]}")
                cores = chips * spec["cores_per_chip"]
                yield f"{chips} chips ({target.generation}-{cores})", config, bigger


def plan(config, target: Target, *, search: bool = True, report=print) -> list[Plan]:
    """The configured plan, then (if it does not fit) knobs until one fits with room to spare."""
    config = without_placeholder_weights(config, report)
    first = compile_plan(config, target, "as configured")
    report(first.line())
    plans = [first]
    if (first.fits and not first.tight) or not search:
        return plans
    for change, changed, where in knobs(config, target):
        try:
            candidate = compile_plan(changed, where, change)
        except config_lib.ConfigError as e:
            why = e.problems[-1] if isinstance(e, config_lib.InvalidConfig) else str(e)
            report(f"{change}: not possible ({why})")
            continue
        report(candidate.line())
        plans.append(candidate)
        if candidate.fits and not candidate.tight:
            break
    return plans


def summary(plans: list[Plan]) -> dict:
    """The JSON verdict: the configured plan, and the first change that fits (roomy first)."""
    first = plans[0]
    fitting = [p for p in plans[1:] if p.fits]
    fitting = next((p for p in fitting if not p.tight), fitting[0] if fitting else None)
    result = {
        "fits": first.fits,
        "tight": first.tight,
        "target": first.target.name,
        "estimate": first.target.generation == "cpu",
        "per_chip_gib": round(first.per_chip_gib, 2),
        "params_gib": round(first.params_gib, 2),
        "optimizer_gib": round(first.optimizer_gib, 2),
        "frozen_gib": round(first.frozen_gib, 2),
        "arguments_gib": round(first.arguments_gib, 2),
        "temporaries_gib": round(first.temporaries_gib, 2),
        "hbm_gib": first.target.hbm_gib,
        "compile_s": round(first.compile_s, 1),
    }
    if not first.fits or first.tight:
        result["suggestion"] = None
        if fitting is not None:
            result["suggestion"] = {
                "change": fitting.change,
                "target": fitting.target.name,
                "per_chip_gib": round(fitting.per_chip_gib, 2),
            }
    return result


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags, defined on demand: importing this module (tests do) adds none."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
    flags.DEFINE_string("topology", None, "TPU slice: v5p:2x4x4, v5p-64, v5e-8, v6e:2x4.")
    flags.DEFINE_integer(
        "devices",
        None,
        "Instead: N local devices (GPUs, or CPUs for a rough estimate).",
        lower_bound=1,
    )
    flags.DEFINE_float(
        "hbm_gib", DEFAULT_DEVICE_HBM_GIB, "Memory per device for --devices.", lower_bound=0.01
    )
    flags.DEFINE_bool("search", True, "If it does not fit, try knobs until one does.")
    flags.mark_flag_as_required("config")


def main(argv: list[str]) -> None:
    del argv
    cli.setup_logging()  # on a host without a TPU: the CPU backend, and no libtpu start-up noise
    try:
        if bool(FLAGS.topology) == (FLAGS.devices is not None):
            raise PlanError("give exactly one of --topology=v5p:2x2x2 or --devices=N")
        if FLAGS.devices:
            jax.config.update("jax_num_cpu_devices", FLAGS.devices)  # used if on the CPU
            local = jax.default_backend()
            target = Target(f"{local} x{FLAGS.devices}", local, FLAGS.devices, FLAGS.hbm_gib)
        else:
            target = parse_topology(FLAGS.topology)
        plans = plan(FLAGS.config, target, search=FLAGS.search)
    except (PlanError, *cli.USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary(plans)))
    sys.exit(0 if plans[0].fits else 1)


if __name__ == "__main__":
    define_flags()
    # A malformed flag (--devices=x, an unknown --config key) is one line and exit 2, as in main.
    app.run(main, flags_parser=cli.parse_flags)
