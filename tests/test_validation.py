"""config.validate's key table: every numeric key of configs/base.py has a range, every value
outside it (or outside a key's set of choices) is one line naming key, value and range, and the
commands stop on it with exit 2 before anything is read or compiled.

Nothing here compiles: validate runs on placeholder files (a one-row JSONL, a tokenizer
directory with an empty tokenizer.json), which is all it looks at.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import ml_collections
import pytest
from train_fixtures import ROOT, base_config, config_with

from sftjax import config as config_lib


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Overrides making configs/base.py valid: paths to files that exist, the tiny preset's
    sequence length."""
    root = tmp_path_factory.mktemp("validation")
    rows = root / "train.jsonl"
    rows.write_text(json.dumps({"instruction": "Say hi.", "response": "Hi."}) + "\n")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    return {
        "data.train_files": str(rows),
        "data.tokenizer": str(root / "tokenizer"),
        "data.seq_len": 256,
    }


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_every_numeric_key_of_base_has_a_range():
    numeric = {
        key
        for key, value in _leaves(base_config()).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    assert numeric == set(config_lib.RANGES)
    assert set(config_lib.CHOICES) <= set(_leaves(base_config()))


def test_every_shipped_config_is_within_its_ranges():
    for path in sorted((ROOT / "configs").glob("*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert config_lib.key_errors(module.get_config()) == [], path.name


def test_the_defaults_with_real_paths_are_valid(files):
    config_lib.validate(config_with(files), num_devices=8)


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("checkpoint.export_dtype", "int8", "choose one of ('float32', 'bfloat16', 'float16')"),
        ("checkpoint.export_dtype", "int4", "choose one of ('float32', 'bfloat16', 'float16')"),
        ("train.batch_size", 0, "must be an integer >= 1"),
        ("eval.batch_size", 0, "must be an integer >= 1"),
        ("train.microbatches", 0, "must be an integer >= 1"),
        ("train.log_every_steps", 0, "must be an integer >= 1"),
        ("data.packing_bins", 0, "must be an integer >= 1"),
        ("data.num_epochs", 0, "must be an integer >= 1"),
        ("train.num_steps", -1, "must be an integer >= 0"),
        ("optim.warmup_ratio", 2.0, "must be a finite number in [0, 1]"),
        ("optim.lr", math.nan, "must be a finite number > 0"),
        ("optim.lr", math.inf, "must be a finite number > 0"),
        ("optim.lr", -1e-5, "must be a finite number > 0"),
        ("data.seq_len", -5, "must be an integer >= 1"),
        ("optim.end_lr_ratio", -0.5, "must be a finite number in [0, 1]"),
        ("optim.b2", 1.0, "must be a finite number in [0, 1)"),
        ("optim.eps", 0.0, "must be a finite number > 0"),
        ("optim.grad_clip_norm", -1.0, "must be a finite number >= 0"),
        ("optim.weight_decay", math.nan, "must be a finite number >= 0"),
        ("model.lora.rank", -4, "must be an integer >= 0"),
        ("model.lora.alpha", 0.0, "must be a finite number > 0"),
        ("model.lora.dropout", 1.0, "must be a finite number in [0, 1)"),
        ("model.vocab_size", -1, "must be an integer >= 0"),
        ("mesh.fsdp", 0, "must be an integer >= 1, or -1"),
        ("mesh.data", -2, "must be an integer >= 1, or -1"),
        ("eval.every_steps", 0, "must be an integer >= 1"),
        ("eval.patience", 0, "must be an integer >= 1"),
        ("eval.min_delta", -0.1, "must be a finite number >= 0"),
        ("eval.max_new_tokens", 0, "must be an integer >= 1"),
        ("train.seed", -1, "must be an integer >= 0"),
        ("train.peak_tflops_per_device", math.inf, "must be a finite number >= 0"),
        ("data.shuffle_seed", -1, "must be an integer >= 0"),
        ("data.validation_fraction", 1.0, "must be a finite number in [0, 1)"),
        (
            "checkpoint.max_to_keep",
            0,
            "keep at least 1 checkpoint (the newest is what a restart resumes from)",
        ),
    ],
)
def test_value_outside_its_range_is_one_line(files, key, value, allowed):
    with pytest.raises(config_lib.InvalidConfig) as refused:
        config_lib.validate(config_with({**files, key: value}), num_devices=8)
    assert str(refused.value) == f"invalid config: config.{key}={value!r}: {allowed}"


def test_every_problem_is_listed_and_none_divides_by_zero(files):
    # batch_size % (shards * microbatches) and the mesh's -1 would divide by these zeros.
    bad = {"train.batch_size": 0, "train.microbatches": 0, "mesh.data": 0, "optim.lr": math.nan}
    with pytest.raises(config_lib.InvalidConfig) as refused:
        config_lib.validate(config_with({**files, **bad, "data.tokenizer": "/no/tok"}), 8)
    keys = [problem.split("=")[0] for problem in refused.value.problems]
    assert keys == [
        "config.optim.lr",
        "config.train.batch_size",
        "config.train.microbatches",
        "config.mesh.data",
        "config.data.tokenizer",  # the file checks still run
    ]


def test_answers_longer_than_the_model_are_refused_before_training(files):
    values = {**files, "eval.prompts": ("Say hi.",), "eval.max_new_tokens": 512}
    with pytest.raises(config_lib.InvalidConfig, match="max_new_tokens=512 leaves no room for"):
        config_lib.validate(config_with(values), num_devices=8)  # the tiny preset: 512 tokens
    config_lib.validate(config_with({**values, "eval.prompts": ()}), num_devices=8)  # unused


def test_no_validation_data_is_refused_before_reading(files):
    values = {**files, "data.validation_fraction": 0.0}
    with pytest.raises(config_lib.InvalidConfig, match="validation_fraction=0 and no data.valid"):
        config_lib.validate(config_with(values), num_devices=8)


def _main(workdir, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    command = [sys.executable, "-m", "sftjax.main", f"--config={ROOT / 'configs/base.py'}"]
    return subprocess.run(
        [*command, f"--workdir={workdir}", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_main_refuses_an_int8_export_dtype_in_one_line(files, tmp_path):
    valid = [f"--config.{key}={value}" for key, value in files.items()]
    done = _main(tmp_path / "run", *valid, "--config.checkpoint.export_dtype=int8")
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors == [
        "error: invalid config: config.checkpoint.export_dtype='int8': choose one of "
        "('float32', 'bfloat16', 'float16')"
    ]
    assert "Traceback" not in done.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_main_refuses_a_nan_learning_rate_in_one_line(files, tmp_path):
    valid = [f"--config.{key}={value}" for key, value in files.items()]
    done = _main(tmp_path / "run", *valid, "--config.optim.lr=nan")
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors == ["error: invalid config: config.optim.lr=nan: must be a finite number > 0"]
    assert "data:" not in done.stderr  # before the data was read


@pytest.mark.parametrize(
    "value",
    [
        8.0,  # from a config file
        # the command line's JSON `false` is no Python literal: ml_collections keeps the text
        '{"rope_type": "yarn", "factor": 4.0, "truncate": false}',
    ],
)
def test_rope_scaling_that_is_not_a_dict_is_one_line(files, value):
    with pytest.raises(config_lib.InvalidConfig) as refused:
        config_lib.validate(config_with({**files, "model.rope_scaling": value}), num_devices=8)
    assert str(refused.value).startswith(
        f"invalid config: config.model: model.rope_scaling={value!r} is not a dict; give "
    )
    assert "\n" not in str(refused.value)


def test_main_sets_rope_scaling_from_the_command_line(files, tmp_path):
    """As docs/families.md spells it; the missing template stops the run after the model's
    checks (which read model.rope_scaling), before any data is read."""
    valid = [f"--config.{key}={value}" for key, value in files.items()]
    done = _main(
        tmp_path / "run",
        *valid,
        "--config.model.rope_scaling={'rope_type': 'linear', 'factor': 2.0}",
        f"--config.data.chat_template={tmp_path / 'none.jinja'}",
    )
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "config.data.chat_template=" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "run" / "checkpoints").exists()
