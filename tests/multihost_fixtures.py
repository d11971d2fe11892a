"""Several JAX processes on this one machine: the environment srun would give them, and ports.

Both "nodes" are localhost; JAX's SLURM detection reads these variables in
`jax.distributed.initialize()` (main.py's `--multihost`), and gloo carries the CPU collectives.
"""

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def slurm_env(num_processes: int, devices_per_process: int, extra_paths=()) -> list[dict]:
    """One environment per process, as `srun --nodes=N --ntasks-per-node=1` would set it."""
    env = device_env(devices_per_process)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, extra_paths), env.get("PYTHONPATH", "")])
    env.update(
        SLURM_JOB_ID="4242",
        SLURM_STEP_NODELIST="localhost",
        SLURM_NTASKS=str(num_processes),
        SLURM_LOCALID="0",
        JAX_COORDINATOR_PORT=str(free_port()),
        JAX_LOCAL_DEVICE_IDS=",".join(map(str, range(devices_per_process))),
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    )
    return [{**env, "SLURM_PROCID": str(pid)} for pid in range(num_processes)]


def device_env(devices: int) -> dict:
    """The environment of one process with `devices` fake CPU devices."""
    env = dict(os.environ)
    xla_flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*xla_flags, f"--xla_force_host_platform_device_count={devices}"])
    env["PYTHONUNBUFFERED"] = "1"
    return env
