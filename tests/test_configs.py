"""The shipped configs and the multi-host path: overrides of base only, valid, full-size shapes.

Owns: configs/llama2_{7b,13b,70b}.py, llama2_{7b,70b}_lora.py, llama3_{8b,70b}.py,
llama3_8b_lora.py and qwen3_8b.py loaded exactly as main.py loads them; config.validate on them
with real paths; published parameter counts; the 7B and Qwen3-8B train states' FSDP sharding
and per-device bytes under jax.eval_shape (no memory); one train step run
by two processes through jax.distributed (gloo on CPU) equal to the same step in one process;
the launch scripts' commands (DRY_RUN) and main.py accepting them.
It does not run a real pod: the 2-process CPU test is the only multi-host evidence here.
"""

import ast
import json
import math
import os
import shlex
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags
from multihost_fixtures import slurm_env
from train_fixtures import ROOT, base_config, random_examples, tiny_trainer

from sftjax import config as config_lib
from sftjax import sharding, train
from sftjax.data import batches
from sftjax.data.flat import from_examples
from sftjax.model import llama

# ml_collections' config_flags loads config files with the deprecated importlib load_module().
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

NAMES = ("llama2_7b", "llama2_13b", "llama2_70b", "llama3_8b", "llama3_70b", "qwen3_8b")
# Same model and data recipe as the name without _lora, LoRA on.
LORA_NAMES = ("llama2_7b_lora", "llama2_70b_lora", "llama3_8b_lora")
PUBLISHED_PARAMS = {  # the safetensors index's total_size / 2 of the bf16 checkpoints
    "llama2_7b": 6_738_415_616,
    "llama2_13b": 13_015_864_320,
    "llama2_70b": 68_976_648_192,
    "llama3_8b": 8_030_261_248,  # Llama-3.1-8B
    "llama3_70b": 70_553_706_496,  # Llama-3.1-70B, Llama-3.3-70B
    "qwen3_8b": 8_190_735_360,  # Qwen3-8B, q/k norm scales (36 layers x 2 x 128) included
}
# The HF directory each config's placeholder paths name.
HF_NAMES = {
    "llama2_7b": "Llama-2-7b-hf",
    "llama2_13b": "Llama-2-13b-hf",
    "llama2_70b": "Llama-2-70b-hf",
    "llama3_8b": "Llama-3.1-8B",
    "llama3_70b": "Llama-3.1-70B",
    "qwen3_8b": "Qwen3-8B-Base",
}
_LLAMA2_HF = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
_LLAMA3_HF = dict(
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=dict(  # as Llama-3.1's config.json writes it (4.x spelling)
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)
# Hand-written Hugging Face config.json shapes (meta-llama/Llama-2-*-hf, Llama-3.1-*,
# Qwen/Qwen3-8B), so the HF → LlamaConfig path is checked against numbers that don't come from
# our own presets.
HF_SHAPES = {
    "llama2_7b": dict(
        _LLAMA2_HF,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "llama2_13b": dict(
        _LLAMA2_HF,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
    ),
    "llama2_70b": dict(
        _LLAMA2_HF,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    "llama3_8b": dict(
        _LLAMA3_HF,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "llama3_70b": dict(
        _LLAMA3_HF,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    "qwen3_8b": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=False,
        model_type="qwen3",
    ),
}
_ROWS_4K = {"data.seq_len": 4096, "train.batch_size": 32}  # 131k tokens/step, as 64 x 2048
# Published SFT practice that each file must carry (over COMMON_RECIPE).
RECIPE = {
    "llama2_7b": {"optim.lr": 2e-5, "model.remat": "save_dots"},
    "llama2_13b": {"optim.lr": 2e-5},
    "llama2_70b": {"optim.lr": 1e-5, "model.remat": "full"},
    "llama2_7b_lora": {"optim.lr": 2e-4, "model.lora.dropout": 0.05},
    "llama2_70b_lora": {"optim.lr": 1e-4, "model.lora.dropout": 0.05, "model.remat": "full"},
    # 4096-token rows; full remat fits the 8B ones on a v5p-8 (tests/test_plan.py).
    "llama3_8b": {"optim.lr": 2e-5, "model.remat": "full", **_ROWS_4K},
    "qwen3_8b": {"optim.lr": 1e-5, "model.remat": "full", **_ROWS_4K},
    "llama3_70b": {
        "optim.lr": 1e-5,
        "model.remat": "full",
        "data.seq_len": 4096,
        "train.batch_size": 64,  # 262k tokens per step, 2 rows per chip on a v5p-64
        "eval.every_steps": 100,  # ~26M tokens, as the others
    },
    "llama3_8b_lora": {
        "optim.lr": 2e-4,
        "model.lora.dropout": 0.05,
        "model.remat": "full",
        "train.microbatches": 16,
        **_ROWS_4K,
    },
}
# Devices each config is sized for (its microbatches divide the batch over them); else 8.
SIZED_FOR = {"llama2_7b_lora": 1, "llama2_70b_lora": 4, "llama3_8b_lora": 1, "llama3_70b": 32}
LORA_RECIPE = {
    "model.lora.rank": 16,
    "model.lora.alpha": 32.0,
    "model.lora.targets": "all",
    "model.base_dtype": "bfloat16",
}
COMMON_RECIPE = {
    "optim.warmup_ratio": 0.03,
    "optim.weight_decay": 0.0,
    "optim.end_lr_ratio": 0.0,
    "data.seq_len": 2048,
    "data.num_epochs": 3,
    "train.batch_size": 64,
    "model.param_dtype": "float32",
    "model.dtype": "bfloat16",
    "model.scan_layers": True,
    "model.attention": "auto",
    "mesh.fsdp": -1,
    "eval.every_steps": 200,
    "eval.patience": 3,
    "eval.min_delta": 0.0,
}


def load_config(name: str, *overrides: str) -> ml_collections.ConfigDict:
    """The config as main.py builds it: DEFINE_config_file(lock_config=True) + --config.a.b=v."""
    argv = ["main", f"--config={ROOT / 'configs' / f'{name}.py'}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    return flag_values.config


def flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """{"optim.lr": 2e-5, ...} over every leaf."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def size(name: str) -> str:
    """llama2_7b_lora -> llama2_7b: the preset a config fine-tunes."""
    return name.removesuffix("_lora")


def name_hf(name: str) -> str:
    """llama2_7b(_lora) -> Llama-2-7b-hf, the Hugging Face directory name."""
    return HF_NAMES[size(name)]


def published_params(name: str) -> int:
    """The published parameter count of the checkpoint a config is named after."""
    return PUBLISHED_PARAMS[size(name)]


@pytest.fixture(scope="module")
def real_paths(tmp_path_factory) -> dict:
    """Per size: CLI overrides pointing the placeholder paths at real files and directories."""
    root = tmp_path_factory.mktemp("paths")
    rows = root / "train.jsonl"
    rows.write_text(json.dumps({"instruction": "Say hi.", "response": "Hi."}) + "\n")
    (root / "tokenizer").mkdir()  # validate checks only that a tokenizer file is there
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    paths = {}
    for name, shape in HF_SHAPES.items():
        hf_dir = root / name
        hf_dir.mkdir()
        hf = {"model_type": "llama", "hidden_act": "silu", **shape}
        (hf_dir / "config.json").write_text(json.dumps(hf))
        # Weights are looked for, not read (an empty index names none).
        (hf_dir / "model.safetensors.index.json").write_text('{"weight_map": {}}')
        paths[name] = (
            f"--config.model.hf_path={hf_dir}",
            f"--config.data.tokenizer={root / 'tokenizer'}",
            f"--config.data.train_files={rows}",
        )
    return paths


@pytest.mark.parametrize("name", NAMES + LORA_NAMES)
def test_config_is_base_plus_few_commented_overrides(name):
    config = load_config(name)
    values, base = flat(config), flat(base_config())
    assert config.is_locked
    assert values.keys() == base.keys(), "configs may override base keys, never add or drop"
    changed = {k for k in base if values[k] != base[k]}
    assert 0 < len(changed) <= 20, changed

    # Every override is one `c.section.key = value  # why` line, at most 20 of them.
    source = (ROOT / "configs" / f"{name}.py").read_text()
    assigned = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]).startswith("c.")
    ]
    assert len(assigned) <= 20
    lines = source.splitlines()
    for node in assigned:
        key = ast.unparse(node.targets[0]).removeprefix("c.")
        assert key in base, f"{name}: {key} is not a key of base.py"
        assert "  # " in lines[node.lineno - 1], f"{name}: {key} has no comment"

    lora = LORA_RECIPE if name in LORA_NAMES else {"model.lora.rank": 0}
    expected = {**COMMON_RECIPE, **lora, **RECIPE[name], "model.preset": size(name)}
    assert {k: values[k] for k in expected} == expected
    assert values["model.hf_path"] == values["data.tokenizer"] == f"/path/to/{name_hf(name)}"

    # Command-line overrides work; unknown keys are refused (ml_collections raises a bare
    # AttributeError naming the key, not a flags error).
    assert load_config(name, "--config.optim.lr=3e-5").optim.lr == 3e-5
    with pytest.raises(AttributeError, match="typo"):
        load_config(name, "--config.optim.typo=1")


@pytest.mark.parametrize("name", NAMES + LORA_NAMES)
def test_validate_accepts_config_and_params_match_published(name, real_paths):
    with pytest.raises(config_lib.ConfigError) as placeholders:
        config_lib.validate(load_config(name), 8)
    for key in ("data.train_files", "data.tokenizer", "model"):
        assert f"config.{key}" in str(placeholders.value)

    config = load_config(name, *real_paths[size(name)])
    chips = SIZED_FOR.get(name, 8)
    config_lib.validate(config, num_devices=chips)
    config_lib.validate(config, num_devices=2 * chips, num_processes=2)  # e.g. two such hosts
    from_hf = config_lib.model_config(config.model)
    config.model.hf_path = ""  # the preset instead of config.json
    from_preset = config_lib.model_config(config.model)
    assert from_hf == from_preset
    assert from_hf.num_params == published_params(name)
    assert from_hf.lora_rank == (16 if name in LORA_NAMES else 0)


@pytest.mark.parametrize("name", ["llama2_7b", "qwen3_8b"])  # Qwen3: 152k vocab, head_dim given
def test_8b_train_state_is_fsdp_sharded_with_expected_bytes_per_device(name):
    config = load_config(name, "--config.model.hf_path=")
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    cfg = config_lib.model_config(config.model)

    _, abstract_state = nnx.split(llama.abstract(cfg, mesh))
    param_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_state, mesh))
    abstract_params = nnx.to_pure_dict(abstract_state)
    num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(abstract_params))
    assert num_params == published_params(name)
    tx, _ = train.make_optimizer(config.optim, 1000)
    shardings = train.state_shardings_for(param_shardings, abstract_params, tx)
    state = jax.eval_shape(
        lambda: train.TrainState(
            step=jnp.int32(0),
            params=abstract_params,
            opt_state=tx.init(abstract_params),
            rng=jax.random.PRNGKey(0),
        )
    )

    assert jax.tree.structure(state) == jax.tree.structure(shardings)
    # Adam's moments live where their parameter lives.
    for moment in ("mu", "nu"):
        assert optax.tree.get(shardings.opt_state, moment) == param_shardings
    leaves, leaf_shardings = jax.tree.leaves(state), jax.tree.leaves(shardings)
    for x, s in zip(leaves, leaf_shardings, strict=True):
        if x.size * x.dtype.itemsize > 2**20:  # only norm scales, counters and keys stay whole
            assert "fsdp" in jax.tree.leaves(tuple(s.spec)), (x.shape, s.spec)
            assert math.prod(s.shard_shape(x.shape)) * 8 == x.size, (x.shape, s.spec)
    per_device = sum(
        math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
        for x, s in zip(leaves, leaf_shardings, strict=True)
    )
    # fp32 params + Adam mu + nu = 12 bytes per parameter, split 8 ways
    assert per_device == pytest.approx(3 * 4 * num_params / 8, rel=0.01)


def one_train_step(devices, process_index: int, process_count: int) -> dict:
    """One real step of a tiny Llama on a mesh over `devices`, fed this process's rows only."""
    mesh = sharding.make_mesh(devices=devices)
    dataset = batches.train_dataset(
        from_examples(random_examples(64, vocab=64)),
        batch_size=8,
        seq_len=64,
        seed=0,
        num_epochs=1,
        process_index=process_index,
        process_count=process_count,
    )
    host_batch = dataset[0]
    state, step_fn, _, batch_sharding = tiny_trainer(mesh)
    batch = train.global_batch(host_batch, batch_sharding)
    with jax.set_mesh(mesh):
        state, metrics = step_fn(state, batch, {})
        param_norm = jax.jit(optax.tree.norm)(state.params)
    return {
        "loss": float(metrics["loss"]),
        "loss_tokens": float(metrics["loss_tokens"]),
        "param_norm": float(param_norm),
        "local_rows": int(host_batch["tokens"].shape[0]),
        "local_token_sum": int(host_batch["tokens"].sum()),
    }


WORKER = """
import json, pathlib, sys
import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize()  # main.py's call: everything comes from the SLURM variables
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2

import test_configs

result = test_configs.one_train_step(jax.devices(), jax.process_index(), jax.process_count())
pathlib.Path(sys.argv[1]).write_text(json.dumps(result))
jax.distributed.shutdown()
"""


def test_two_processes_train_step_equals_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    envs = slurm_env(2, 2, extra_paths=[ROOT, ROOT / "tests"])
    logs = [tmp_path / f"worker{pid}.log" for pid in range(2)]
    workers = []
    deadline = time.monotonic() + 60  # a hang (e.g. in jax.distributed) must not block CI
    try:
        for pid, log in enumerate(logs):
            with log.open("w") as out:
                workers.append(
                    subprocess.Popen(
                        [sys.executable, str(script), str(tmp_path / f"out{pid}.json")],
                        env=envs[pid],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        # The same global batch on 4 of this process's 8 devices, while the workers run.
        single = one_train_step(jax.devices()[:4], 0, 1)
        for worker in workers:
            worker.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail("2-process run did not finish in 60 s (hung in jax.distributed?)")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, log in zip(workers, logs, strict=True):
        assert worker.returncode == 0, log.read_text()[-3000:]
    hosts = [json.loads((tmp_path / f"out{pid}.json").read_text()) for pid in range(2)]

    # Each process fed only its half of the global batch; together they are the whole batch.
    assert [h["local_rows"] for h in hosts] == [4, 4] and single["local_rows"] == 8
    assert hosts[0]["local_token_sum"] != hosts[1]["local_token_sum"]
    assert sum(h["local_token_sum"] for h in hosts) == single["local_token_sum"]
    assert hosts[0] == {**hosts[1], "local_token_sum": hosts[0]["local_token_sum"]}
    for key in ("loss", "param_norm"):
        assert hosts[0][key] == pytest.approx(single[key], rel=1e-5, abs=1e-5), key
    assert hosts[0]["loss_tokens"] == single["loss_tokens"]


def run_launcher(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run a launch script in DRY_RUN mode (it prints its command instead of running it)."""
    return subprocess.run(
        ["bash", script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "DRY_RUN": "1", "GPUS_PER_NODE": "8", **env},
    )


def test_launch_scripts_start_main_with_the_same_arguments(tmp_path):
    for script in ("launch/tpu_pod.sh", "launch/slurm.sbatch"):
        subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)
    paths = {
        "WORKDIR": str(tmp_path / "run dir"),
        "HF_PATH": "/models/Llama-2-70b-hf",
        "TRAIN_FILES": "/data/train.jsonl",
    }
    expected = [
        "-m",
        "sftjax.main",
        "--multihost",
        "--config=configs/llama2_70b.py",
        f"--workdir={tmp_path / 'run dir'}",
        "--config.model.hf_path=/models/Llama-2-70b-hf",
        "--config.data.tokenizer=/models/Llama-2-70b-hf",
        "--config.data.train_files=/data/train.jsonl",
        "--config.optim.lr=5e-06",
    ]

    tpu = run_launcher("launch/tpu_pod.sh", "--config.optim.lr=5e-06", TPU_NAME="pod", **paths)
    assert tpu.returncode == 0, tpu.stderr
    gcloud = shlex.split(tpu.stdout)
    assert gcloud[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert "--worker=all" in gcloud
    remote = shlex.split(next(a for a in gcloud if a.startswith("--command=")).split("=", 1)[1])
    assert remote[:3] == ["cd", "sftjax", "&&"] and remote[4:] == expected

    slurm = run_launcher("launch/slurm.sbatch", "--config.optim.lr=5e-06", **paths)
    assert slurm.returncode == 0, slurm.stderr
    device_ids, srun = slurm.stdout.splitlines()
    assert device_ids == "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"  # every GPU, not only GPU 0
    assert shlex.split(srun)[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert shlex.split(srun)[3:] == expected

    bucket = {"WORKDIR": "gs://b/runs/r", "HF_PATH": "gs://b/m", "TRAIN_FILES": "gs://b/d/*.jsonl"}
    on_gcs = run_launcher("launch/tpu_pod.sh", TPU_NAME="pod", **bucket)
    command = next(a for a in shlex.split(on_gcs.stdout) if a.startswith("--command="))
    remote = shlex.split(command.split("=", 1)[1])
    assert on_gcs.returncode == 0 and "--workdir=gs://b/runs/r" in remote
    assert "--config.data.train_files=gs://b/d/*.jsonl" in remote

    # Setup installs the locked versions plus the TPU extra of the locked jax on every worker.
    setup = run_launcher("launch/tpu_pod.sh", "setup", TPU_NAME="pod")
    assert setup.returncode == 0, setup.stderr
    install = next(a for a in shlex.split(setup.stdout) if a.startswith("--command="))
    jax_pin = next(
        x for x in (ROOT / "requirements/lock.txt").read_text().split() if x.startswith("jax==")
    )
    assert "--worker=all" in setup.stdout and "-c requirements/lock.txt -e ." in install
    assert f"jax[tpu]=={jax_pin.split('==')[1]}" in install

    # main.py accepts these arguments: without --multihost (no cluster here) it gets as far as
    # config validation, which names the placeholder paths and exits 2.
    main = subprocess.run(
        [sys.executable, *[a for a in expected if a != "--multihost"]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert main.returncode == 2, main.stderr[-2000:]
    assert "config.data.train_files" in main.stderr and "Llama-2-70b-hf" in main.stderr
