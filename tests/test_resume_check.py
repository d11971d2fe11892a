"""resume_check: which config changes a resume refuses, which it allows, and what it says;
files by content (a moved file resumes, a rewritten one is refused), through the CLI too."""

import json
import pathlib
import re
import shutil
import subprocess

import chat_fixtures
import pytest
from hf_fixtures import make_hf_llama
from train_fixtures import ROOT, base_config, demo_corpus, main_command, short_run

from sftjax import config as config_lib
from sftjax import demo_data, resume_check


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


@pytest.mark.parametrize(
    "old, new",
    [
        (None, {"rope_type": "linear", "factor": 2.0}),
        ({"rope_type": "linear", "factor": 2.0}, {"rope_type": "linear", "factor": 4.0}),
        ("absent", {"rope_type": "llama3", "factor": 8.0}),  # a record from before the key
    ],
)
def test_rope_scaling_is_compared_as_one_value(old, new):
    """A dict-or-None key flattened would read None -> {...} as keys of another version."""
    saved = _saved()
    if old == "absent":
        del saved["model"]["rope_scaling"]
    else:
        saved["model"]["rope_scaling"] = old
    changed = _new()
    changed["model"]["rope_scaling"] = new
    with pytest.raises(resume_check.ConfigChanged, match="model.rope_scaling: "):
        resume_check.check(saved, changed, saved_step=10)


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


def _files(*contents_: tuple[str, int, str]) -> list[dict]:
    return [{"name": n, "bytes": b, "sampled_sha256": h} for n, b, h in contents_]


def test_files_are_compared_by_contents_and_order_not_by_path():
    saved_inputs = {"data.train_files": _files(("a.jsonl", 10, "x"), ("b.jsonl", 20, "y"))}
    moved = _new(**{"data.train_files": "/elsewhere/*.jsonl"})
    renamed = {"data.train_files": _files(("c.jsonl", 10, "x"), ("d.jsonl", 20, "y"))}
    changes = resume_check.check(_saved(), moved, 10, saved_inputs, renamed)
    assert [str(c) for c in changes] == [
        'data.train_files: "" -> "/elsewhere/*.jsonl" (same contents)'
    ]

    cases = {
        "a.jsonl: same size, different content": _files(("a.jsonl", 10, "z"), ("b.jsonl", 20, "y")),
        "a.jsonl: 11 bytes (was 10)": _files(("a.jsonl", 11, "z"), ("b.jsonl", 20, "y")),
        "the same contents in another file order": _files(
            ("a.jsonl", 20, "y"), ("b.jsonl", 10, "x")
        ),
        "b.jsonl (20 bytes) is gone": _files(("a.jsonl", 10, "x")),
    }
    for expected, files in cases.items():
        with pytest.raises(resume_check.ConfigChanged, match="allow_config_change") as info:
            resume_check.check(_saved(), _new(), 10, saved_inputs, {"data.train_files": files})
        assert f"data.train_files: {expected}" in str(info.value)
        overridden = _new(**{"train.allow_config_change": True})
        allowed = resume_check.check(
            _saved(), overridden, 10, saved_inputs, {"data.train_files": files}
        )
        assert any(expected in str(c) for c in allowed)


def test_a_record_without_fingerprints_is_compared_by_path_and_its_lora_base_may_move():
    base = {"hf_path": "/old/base", "config_sha256": "c", "files": {"model.safetensors": {}}}
    moved_base = {**base, "hf_path": "/new/base"}
    record = {"config": _saved(), "base_model": base}  # as saved before content fingerprints
    record["config"]["model"]["hf_path"] = "/old/base"
    new = _new(**{"model.hf_path": "/new/base"})
    files = {"data.train_files": _files(("train.jsonl", 5, "h"))}
    inputs = resume_check.inputs(files, moved_base)
    changes = resume_check.check_record(record, new, inputs, step=7)
    assert [str(c) for c in changes] == [
        'model.hf_path: "/old/base" -> "/new/base" (same contents)'
    ]
    with pytest.raises(resume_check.ConfigChanged, match="data.train_files"):
        moved = _new(**{"model.hf_path": "/new/base", "data.train_files": "/new/train.jsonl"})
        resume_check.check_record(record, moved, inputs, step=7)


@pytest.mark.slow
def test_resume_through_the_cli_refuses_rewritten_files_and_follows_moved_ones(tmp_path):
    """A LoRA run with a chat template file stops at step 2. Rewriting the training file in
    place (reversed rows), retraining the tokenizer into its folder and editing the template
    is refused, one line naming each; moving all of them and the base elsewhere resumes."""
    first_dir = tmp_path / "first"
    train_file, val_file, tok_dir, vocab = demo_corpus(first_dir, n_train=120, n_val=20)
    template = first_dir / "chat.jinja"
    template.write_text(chat_fixtures.LLAMA2_CHAT)
    make_hf_llama(first_dir / "base", vocab_size=vocab, max_position_embeddings=128)

    def values(directory: pathlib.Path, steps: int) -> dict:
        return short_run(
            directory / "train.jsonl",
            directory / "val.jsonl",
            directory / "tokenizer",
            **{
                "model.hf_path": str(directory / "base"),
                "model.lora.rank": 4,
                "data.template": "tokenizer",
                "data.chat_template": str(directory / "chat.jinja"),
                "train.num_steps": steps,
                "eval.every_steps": 2,
            },
        )

    def run(directory: pathlib.Path, steps: int) -> subprocess.CompletedProcess:
        command = main_command(tmp_path / "run", values(directory, steps))
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)

    done = run(first_dir, 2)
    assert done.returncode == 0, done.stderr[-3000:]

    kept = tmp_path / "kept"
    shutil.copytree(first_dir, kept)
    train_file.write_text("".join(reversed(train_file.read_text().splitlines(keepends=True))))
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    demo_data.train_tokenizer([r["instruction"] for r in rows], tok_dir, vocab_size=300)
    template.write_text(chat_fixtures.LLAMA2_CHAT + "{#- edited -#}\n")
    refused = run(first_dir, 4)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    (message,) = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert "data.train_files: train.jsonl: same size, different content" in message
    assert "data.tokenizer: tokenizer.json: " in message and " bytes (was " in message
    size = len(chat_fixtures.LLAMA2_CHAT.encode())
    assert f"data.chat_template: chat.jinja: {size + 15} bytes (was {size})" in message
    assert "allow_config_change" in message

    shutil.rmtree(first_dir)  # everything moves elsewhere, unchanged: the run goes on
    resumed = run(kept, 4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stderr
    for key in ("data.train_files", "data.tokenizer", "data.chat_template", "model.hf_path"):
        assert re.search(rf"{key}: [^;]* \(same contents\)", resumed.stderr), key
