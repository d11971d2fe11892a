"""The planner on the real TPU compiler (libtpu, no TPU attached): verdicts for shipped configs."""

import json
import os
import subprocess
import sys

import jax
import pytest
from train_fixtures import ROOT, base_config

from sftjax import plan

pytest.importorskip("libtpu", reason="libtpu (test extra) holds the TPU compiler the plans use")


def shipped(name: str):
    """configs/<name>.py as shipped."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture
def optimized():
    """Plans need XLA's real optimisations (conftest turns most off to compile tests faster).

    Each plan compiles once, so none is written to the session's compilation cache either."""
    before = jax.config.read("jax_disable_most_optimizations")
    min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_disable_most_optimizations", False)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    yield
    jax.config.update("jax_disable_most_optimizations", before)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)


def test_topology_names():
    assert plan.parse_topology("v5p:2x4x4") == plan.Target("v5p:2x4x4", "v5p", 32, 95.74)
    # v5p slices are named by TensorCores, two per chip: v5p-32 is 16 chips.
    assert plan.parse_topology("v5p-32").chips == 16
    assert plan.parse_topology("v5p-32").name == "v5p:2x2x4"
    assert plan.parse_topology("v5e-8").name == "v5e:2x4"
    assert plan.parse_topology("V6E:2x4").hbm_gib == 31.25
    for bad in ("v4-8", "v5p-12", "v5p", "tpu", "v5p:0x2x2", "v6e:2x2x2", "v5p-2x2", "v5p:2xx2"):
        with pytest.raises(plan.PlanError):
            plan.parse_topology(bad)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "0"}
    return subprocess.run(
        [sys.executable, "-m", "sftjax.plan", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_cli_prints_a_json_verdict_and_rejects_bad_input():
    # 128-token rows: whole splash blocks, so "auto" takes the Pallas kernel for the TPU.
    done = run_cli("--config=configs/tiny.py", "--topology=v5p-8", "--config.data.seq_len=128")
    assert done.returncode == 0, done.stderr
    # Nothing but the plan's own log line: libtpu's start-up warnings about the TPU it would run
    # on (TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES, a source-location trace) are not printed.
    (log,) = done.stderr.strip().splitlines()
    assert "attention: auto -> splash (platform tpu)" in log
    verdict = json.loads(done.stdout.strip().splitlines()[-1])
    assert verdict["fits"] and verdict["target"] == "v5p:2x2x1" and not verdict["estimate"]
    assert 0 < verdict["per_chip_gib"] < verdict["hbm_gib"] == 95.74
    bad = run_cli("--config=configs/tiny.py", "--topology=v5p-12")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "v5p slice sizes are" in bad.stderr
    estimate = run_cli("--config=configs/tiny.py", "--devices=4", "--hbm_gib=80")
    assert estimate.returncode == 0, estimate.stderr
    assert json.loads(estimate.stdout.strip().splitlines()[-1])["estimate"] is True


@pytest.mark.parametrize(
    "flag,says",
    [
        ("--devices=-1", "--devices=-1"),
        ("--devices=x", "--devices=x"),
        ("--topology=v5p:0x2x2", "a v5p grid is 3 numbers >= 1"),
    ],
)
def test_cli_bad_flag_is_one_line_and_exit_2(flag, says):
    bad = run_cli("--config=configs/tiny.py", flag)
    assert bad.returncode == 2 and bad.stderr.startswith("error: "), bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and says in bad.stderr, bad.stderr


def test_bad_mesh_is_reported_not_compiled(optimized):
    config = base_config()
    config.model.preset = "tiny"
    config.mesh.tensor = 3
    with pytest.raises(plan.config_lib.ConfigError, match="config.mesh"):
        plan.plan(config, plan.parse_topology("v5p:2x2x1"), report=lambda _: None)


@pytest.mark.slow
def test_7b_fits_on_8_v5p_chips_and_splash_needs_less_than_xla(optimized):
    target = plan.parse_topology("v5p:2x2x2")
    config = shipped("llama2_7b")
    (splash,) = plan.plan(config, target, search=False, report=print)
    config.model.attention = "xla"
    (xla,) = plan.plan(config, target, search=False, report=print)
    print(f"7B v5p:2x2x2 temporaries: splash {splash.temporaries_gib:.1f} GiB, xla "
          f"{xla.temporaries_gib:.1f} GiB")  # fmt: skip
    assert splash.fits and not splash.tight
    assert splash.arguments_gib == pytest.approx(xla.arguments_gib)
    assert splash.temporaries_gib < xla.temporaries_gib - 8  # measured: 56.3 vs 72.4


@pytest.mark.slow
def test_7b_on_4_v5p_chips_does_not_fit_and_a_change_does(optimized):
    plans = plan.plan(shipped("llama2_7b"), plan.parse_topology("v5p:2x2x1"), report=print)
    verdict = plan.summary(plans)
    assert not verdict["fits"] and verdict["per_chip_gib"] > verdict["hbm_gib"]
    assert verdict["suggestion"]["per_chip_gib"] <= verdict["hbm_gib"]
    assert verdict["suggestion"]["change"].startswith("train.microbatches=")


@pytest.mark.slow
@pytest.mark.parametrize("topology,fits", [("v5p:2x2x4", False), ("v5p:2x4x4", True)])
def test_70b_needs_32_v5p_chips(optimized, topology, fits):
    (result,) = plan.plan(
        shipped("llama2_70b"), plan.parse_topology(topology), search=False, report=print
    )
    assert result.fits is fits


def test_single_chip_topologies_are_one_host_of_one_chip():
    # libtpu's default host is 2x2x1 chips; a smaller grid needs its own host bounds.
    for name in ("v5p:1x1x1", "v5e-1", "v6e:1x1"):
        target = plan.parse_topology(name)
        assert target.chips == len(plan.devices_for(target)) == 1, name


def test_lora_knobs_try_a_bf16_base_first():
    config = shipped("llama2_7b_lora")
    target = plan.parse_topology("v5p:1x1x1")
    config.model.base_dtype = "float32"
    change, changed, where = next(plan.knobs(config, target))
    assert change == "model.base_dtype=bfloat16" and where == target
    assert changed.model.base_dtype == "bfloat16" and changed.model.lora.rank == 16
    config.model.base_dtype = "bfloat16"  # already bf16: the microbatch knobs come first
    assert next(plan.knobs(config, target))[0].startswith("train.microbatches=")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,topology",
    [
        ("llama2_7b_lora", "v5p:1x1x1"),
        ("llama2_70b_lora", "v5p:2x2x1"),
        # 128k vocabulary, 4096-token rows: the chunked loss keeps the logits out of the peak.
        ("llama3_8b_lora", "v5p:1x1x1"),
    ],
)
def test_lora_configs_fit_their_target_with_the_frozen_base_counted(optimized, name, topology):
    # Full fine-tuning needs 8 v5p chips for 7B and 32 for 70B (the tests above).
    config, target, lines = shipped(name), plan.parse_topology(topology), []
    # As shipped, dropout included: its rbg masks compile in 30-60 s (threefry's took 6-7 min).
    (result,) = plan.plan(config, target, search=False, report=lines.append)
    print(lines[-1])
    assert result.fits and result.per_chip_gib < 0.7 * target.hbm_gib  # shipped with room
    assert "(trainable)" in lines[-1] and f"frozen base {result.frozen_gib:.1f}" in lines[-1]
    config.model.hf_path = ""  # the preset's shapes, as the plan used
    num_params = plan.config_lib.model_config(config.model).num_params
    # The frozen base is every base weight in bf16, split over the chips.
    assert result.frozen_gib == pytest.approx(num_params * 2 / target.chips / plan.GIB, rel=0.01)
    # What trains: fp32 adapters, a few % of the base's bytes (part of them is replicated over
    # fsdp), and Adam's two moments of them.
    assert 0 < result.params_gib < 0.03 * result.frozen_gib
    assert result.optimizer_gib == pytest.approx(2 * result.params_gib, rel=0.01)
    # The compiler's arguments are those three (plus the batch and the metrics).
    held = result.params_gib + result.optimizer_gib + result.frozen_gib
    assert held <= result.arguments_gib < held + 0.1
