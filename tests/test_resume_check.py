"""resume_check: which config changes a resume refuses, which it allows, and what it says."""

import json

import pytest
from train_fixtures import base_config

from sftjax import config as config_lib
from sftjax import resume_check


def _saved() -> dict:
    """As loop.py stores it: config.to_dict() through JSON (tuples become lists)."""
    config = base_config()
    config.eval.prompts = ("a", "b")
    return json.loads(json.dumps(config.to_dict()))


def _new(**edits):
    config = base_config()
    config.eval.prompts = ("a", "b")
    for dotted, value in edits.items():
        section, key = dotted.split(".")
        config[section][key] = value
    return config.to_dict()


def test_identical_config_passes_with_nothing_to_log():
    assert resume_check.check(_saved(), _new(), saved_step=100) == []
    assert resume_check.describe([]) == "config unchanged since the checkpoint"


@pytest.mark.parametrize(
    "key, value",
    [
        ("eval.every_steps", 7),
        ("eval.batch_size", 8),
        ("eval.prompts", ("other",)),
        ("eval.patience", 9),
        ("train.log_every_steps", 1),
        ("train.microbatches", 4),
        ("train.peak_tflops_per_device", 100.0),
        ("checkpoint.max_to_keep", 5),
        ("checkpoint.export_hf", False),
        ("mesh.fsdp", 2),
        ("mesh.data", 4),
        ("model.remat", "full"),
        ("model.attention", "cudnn"),
        ("data.pack_validation", False),
        ("data.bad_rows", "skip"),
        ("train.num_steps", 1000),  # was 0 (all epochs): still past the saved step
        ("data.num_epochs", 5),  # was 3: the batches so far are unchanged
        ("train.allow_config_change", True),
    ],
)
def test_harmless_changes_are_allowed_and_returned_for_the_log(key, value):
    changes = resume_check.check(_saved(), _new(**{key: value}), saved_step=100)
    assert [c.key for c in changes] == [key]
    assert resume_check.describe(changes).startswith(f"config changed since the checkpoint: {key}")


@pytest.mark.parametrize(
    "key, value",
    [
        ("optim.lr", 1e-3),
        ("optim.warmup_ratio", 0.1),
        ("optim.b2", 0.999),
        ("optim.grad_clip_norm", 0.5),  # still clipping: same state layout, other math
        ("train.batch_size", 32),
        ("train.seed", 1),
        ("model.dtype", "float32"),
        ("model.hf_path", "/models/other"),
        ("data.train_files", "other.jsonl"),
        ("data.validation_files", "val.jsonl"),  # was a split of the training rows
        ("data.validation_fraction", 0.1),
        ("data.template", "chat"),
        ("data.response_field", "output"),
        ("data.tokenizer", "/tok2"),
        ("data.seq_len", 1024),
        ("data.pack", False),
        ("data.packing_bins", 4),
        ("data.shuffle_seed", 3),
        ("data.drop_duplicates", False),
        ("data.overlong", "truncate_prompt"),
        ("data.num_epochs", 1),  # was 3: the saved iterator index may lie past the end
        ("train.num_steps", 50),  # below the saved step 100
    ],
)
def test_changes_of_math_or_data_order_are_refused_unless_overridden(key, value):
    saved = _saved()
    old = saved[key.split(".")[0]][key.split(".")[1]]
    with pytest.raises(resume_check.ConfigChanged) as info:
        resume_check.check(saved, _new(**{key: value}), saved_step=100)
    message = str(info.value)
    assert isinstance(info.value, config_lib.ConfigError)  # main: one message, exit 2
    assert f"{key}: {json.dumps(old)} -> {json.dumps(value)}" in message
    assert "new --workdir" in message and "--config.train.allow_config_change=True" in message

    changes = resume_check.check(
        saved, _new(**{key: value, "train.allow_config_change": True}), saved_step=100
    )
    assert sorted(c.key for c in changes) == sorted([key, "train.allow_config_change"])


@pytest.mark.parametrize(
    "key, value",
    [
        ("model.preset", "llama2_7b"),
        ("model.vocab_size", 1000),
        ("model.scan_layers", False),
        ("model.param_dtype", "bfloat16"),
        ("optim.grad_clip_norm", 0.0),  # clipping off: one optimizer state fewer
    ],
)
def test_changes_the_checkpoint_cannot_be_restored_into_are_refused_even_overridden(key, value):
    edits = {key: value, "train.allow_config_change": True}
    with pytest.raises(resume_check.ConfigChanged, match="cannot be restored into this model") as e:
        resume_check.check(_saved(), _new(**edits), saved_step=100)
    assert key in str(e.value) and "allow_config_change" not in str(e.value)


def test_every_refused_key_is_listed_old_to_new():
    new = _new(**{"optim.lr": 0.5, "train.batch_size": 4, "eval.every_steps": 3})
    with pytest.raises(resume_check.ConfigChanged) as info:
        resume_check.check(_saved(), new, saved_step=10)
    message = str(info.value)
    assert "optim.lr: 2e-05 -> 0.5; train.batch_size: 64 -> 4." in message
    assert "eval.every_steps" not in message  # allowed ones are not blamed
    assert "\n" not in message  # one line


def test_keys_known_to_one_version_only_are_allowed_with_a_note():
    saved = _saved()
    saved["data"]["retired_key"] = 1
    new = _new()
    new["data"]["dedupe_near"] = True
    del new["train"]["allow_config_change"]
    changes = resume_check.check(saved, new, saved_step=10)
    assert [str(c) for c in changes] == [
        "data.dedupe_near: (absent) -> true",
        "data.retired_key: 1 -> (absent)",
        "train.allow_config_change: false -> (absent)",
    ]


def test_length_changes_say_the_schedule_follows():
    changes = resume_check.check(_saved(), _new(**{"data.num_epochs": 10}), saved_step=10)
    assert "learning-rate schedule follows the new length" in resume_check.describe(changes)
