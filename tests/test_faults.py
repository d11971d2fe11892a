"""User-facing faults through the commands users run: one message, exit code 2, no traceback.

Each case runs `python -m sftjax.main` (or `sftjax.data.report`, `sftjax.demo`) as a subprocess
on one shared tiny corpus. Most fail before anything compiles, in ~3 s each. JAX_PLATFORMS is
left unset, as users have it, so JAX probes for a TPU as it does on their machines.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import tokenizers
import transformers
from train_fixtures import ROOT, base_config, demo_corpus

from sftjax import cli, metrics
from sftjax import config as config_lib

TPU_PROBE_LINE = "Unable to initialize backend"
HOLDER = """import sys, time
from sftjax import workdir_lock
with workdir_lock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return demo_corpus(tmp_path_factory.mktemp("corpus"), n_train=120, n_val=20)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    return {**env, "PYTHONUNBUFFERED": "1"}


def _flags(corpus, **extra) -> list[str]:
    train, val, tok_dir, vocab = corpus
    values = {
        "data.train_files": train,
        "data.validation_files": val,
        "data.tokenizer": tok_dir,
        "data.seq_len": 64,
        "data.num_epochs": 40,
        "model.preset": "tiny",
        "model.vocab_size": vocab,
        "model.dtype": "float32",
        "model.scan_layers": False,
        "model.remat": "none",
        "train.batch_size": 8,
        "train.log_every_steps": 1,
        "eval.every_steps": 2,
        "eval.batch_size": 8,
        "checkpoint.export_dtype": "float32",
        **extra,
    }
    return [f"--config.{k}={v}" for k, v in values.items()]


def _run(module: str, *args: str, timeout: float = 300, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _main(corpus, workdir, *args: str, **extra) -> subprocess.CompletedProcess:
    config = f"--config={ROOT / 'configs/base.py'}"
    return _run("sftjax.main", config, f"--workdir={workdir}", *_flags(corpus, **extra), *args)


def _assert_user_error(done: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, `error: ...` on stderr naming every fragment, no traceback, no TPU probe line."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and TPU_PROBE_LINE not in done.stderr, done.stderr
    error = done.stderr[done.stderr.index("error: ") :]
    for fragment in fragments:
        assert fragment in error, error
    return error


def test_config_key_typo_names_the_closest_keys(corpus, tmp_path):
    done = _main(corpus, tmp_path, "--config.optim.learning_rate=1e-4")
    error = _assert_user_error(done, "--config.optim.learning_rate: no such config key")
    assert error.count("\n") == 1  # one line
    assert "did you mean optim.lr" in error


def test_key_hints_for_typos_in_sections_and_leaves():
    tree = base_config().to_dict()
    assert cli.unknown_key_message("optim.lr", tree) is None
    assert cli.unknown_key_message("optim", tree) is None  # a whole section may be overridden
    hint = cli.unknown_key_message("optm.lr", tree)
    assert hint.startswith("--config.optm.lr: no such config key; did you mean optim.lr")
    assert "did you mean data.pack or" in cli.unknown_key_message("data.pak", tree)
    assert "did you mean optim.lr" in cli.unknown_key_message("optim.lr.peak", tree)
    assert "did you mean model.lora.rank" in cli.unknown_key_message("model.lora.rnk", tree)
    assert "did you mean model.lora or" in cli.unknown_key_message("model.lora_rank", tree)


def test_config_value_of_the_wrong_type_is_one_line(corpus, tmp_path):
    error = _assert_user_error(_main(corpus, tmp_path, "--config.optim.lr=fast"), "optim.lr")
    assert error.count("\n") == 1


def test_verbose_adds_the_traceback(corpus, tmp_path):
    done = _main(corpus, tmp_path, "--verbose", **{"checkpoint.max_to_keep": 0})
    assert done.returncode == 2 and "Traceback" in done.stderr
    assert "error: invalid config" in done.stderr


def test_max_to_keep_zero_is_refused(corpus, tmp_path):
    done = _main(corpus, tmp_path, **{"checkpoint.max_to_keep": 0})
    _assert_user_error(done, "config.checkpoint.max_to_keep=0: keep at least 1")


def test_negative_max_to_keep_is_refused_by_validation(corpus):
    config = base_config()
    config.data.train_files, _, config.data.tokenizer, _ = map(str, corpus)
    config.checkpoint.max_to_keep = -1
    with pytest.raises(config_lib.ConfigError, match="max_to_keep=-1: keep at least 1"):
        config_lib.validate(config, num_devices=8)


def test_tokenizer_directory_without_tokenizer_files(corpus, tmp_path):
    empty = tmp_path / "tok"
    empty.mkdir()
    done = _main(corpus, tmp_path / "run", **{"data.tokenizer": empty})
    _assert_user_error(done, f"config.data.tokenizer='{empty}': holds none of tokenizer.json")


def test_tokenizer_without_eos(corpus, tmp_path):
    no_eos = tmp_path / "tok"
    raw = tokenizers.Tokenizer.from_file(str(corpus[2] / "tokenizer.json"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>").save_pretrained(
        no_eos
    )
    done = _main(corpus, tmp_path / "run", **{"data.tokenizer": no_eos})
    _assert_user_error(done, f"{no_eos}: the tokenizer defines no EOS token")


def test_pickle_only_model_dir_is_refused_before_tokenizing(corpus, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    hf = dict(shape, num_attention_heads=4, num_key_value_heads=2, vocab_size=corpus[3])
    hf.update(model_type="llama", max_position_embeddings=512, rms_norm_eps=1e-5)
    (model / "config.json").write_text(json.dumps({**hf, "hidden_act": "silu"}))
    (model / "pytorch_model.bin").write_bytes(b"never unpickled")
    done = _main(corpus, tmp_path / "run", **{"model.hf_path": model})
    _assert_user_error(done, "invalid config:", "holds only pickle weights")
    assert "data:" not in done.stderr  # refused before the data report (tokenizing) was logged


def test_empty_data_file(corpus, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    done = _main(corpus, tmp_path / "run", **{"data.train_files": empty})
    _assert_user_error(done, f"{empty}: no rows")


def test_directory_as_data_file(corpus, tmp_path):
    done = _main(corpus, tmp_path / "run", **{"data.train_files": corpus[0].parent})
    _assert_user_error(done, "is a directory; name its data files, e.g.")


def test_no_rows_left_after_filtering_in_fit_and_in_the_report(corpus, tmp_path):
    short = {"data.seq_len": 8}  # every example is longer: all dropped
    done = _main(corpus, tmp_path / "run", **short)
    error = _assert_user_error(done, "no training examples left from", "longer than data.seq_len=8")
    assert error.count("\n") == 1
    done = _run(
        "sftjax.data.report",
        f"--config={ROOT / 'configs/base.py'}",
        f"--histogram={tmp_path / 'lengths.png'}",
        *_flags(corpus, **short),
    )
    assert _assert_user_error(done, "no training examples left from") == error


def test_broken_json_array_element_loses_no_rows_in_the_report(corpus, tmp_path):
    rows = [json.loads(line) for line in corpus[0].read_text().splitlines()][:40]
    elements = [json.dumps(r, indent=1).replace("\n", " ") for r in rows]
    elements[21] = elements[21].replace('"instruction": ', '"instruction" ')  # element 22 of 40
    data = tmp_path / "rows.json"
    data.write_text("[\n" + ",\n".join(elements) + "\n]\n")
    flags = _flags(corpus, **{"data.train_files": data, "data.bad_rows": "skip"})
    histogram = f"--histogram={tmp_path / 'lengths.png'}"
    done = _run("sftjax.data.report", f"--config={ROOT / 'configs/base.py'}", histogram, *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rows read: 40; kept: 39; bad: 1" in done.stdout
    assert f"{data}:23: row: invalid JSON" in done.stdout


def test_second_run_on_a_workdir_in_use_is_refused_naming_the_holder(corpus, tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HOLDER,
            str(tmp_path),
        ],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        done = _main(corpus, tmp_path)
        _assert_user_error(done, f"is in use by process {holder.pid} on host", "(since ")
    finally:
        holder.kill()
        holder.wait()


def test_a_workdir_that_cannot_be_used_is_one_line(corpus, tmp_path):
    config = f"--config={ROOT / 'configs/base.py'}"
    a_file = tmp_path / "file"
    a_file.write_text("")
    _assert_user_error(_main(corpus, a_file), f"--workdir={a_file} is a file, not a directory")
    # An unset variable (`--workdir=$RUN`): never the current directory.
    flags = _flags(corpus, **{"train.num_steps": 1, "checkpoint.export_hf": False})
    empty = _run("sftjax.main", config, "--workdir=", *flags, cwd=tmp_path)
    _assert_user_error(empty, "--workdir is empty")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]

    read_only = tmp_path / "read_only"
    read_only.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: a read-only mount instead
        mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(read_only)]
        if subprocess.run(mount, capture_output=True).returncode != 0:
            pytest.skip("running as root without the right to mount: no read-only directory")
    else:
        read_only.chmod(0o555)
    try:
        done = _main(corpus, read_only / "run")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(read_only)], check=True)
    _assert_user_error(done, f"--workdir={read_only / 'run'} cannot be written (")


def test_divergence_before_the_first_checkpoint_says_none_was_saved(corpus, tmp_path):
    done = _main(
        corpus,
        tmp_path,
        **{"optim.lr": 1e30, "optim.warmup_ratio": 0.0, "train.num_steps": 3},
        **{"eval.every_steps": 100, "checkpoint.export_hf": False},
    )
    assert done.returncode == 3, done.stderr[-3000:]
    error = done.stderr[done.stderr.index("error: ") :]
    assert "no checkpoint was saved before it" in error and "None" not in error, error


def _wait_for_train_step(workdir, step: int, process, timeout: float = 300) -> None:
    path = workdir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        if path.exists():
            steps = [r["step"] for r in metrics.read_records(path) if r["split"] == "train"]
            if max(steps or [0]) >= step:
                return
        time.sleep(0.1)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_resume_after_a_torn_metrics_line_writes_strict_json(corpus, tmp_path):
    first = _main(corpus, tmp_path, **{"train.num_steps": 2, "checkpoint.export_hf": False})
    assert first.returncode == 0, first.stderr[-3000:]
    assert TPU_PROBE_LINE not in first.stderr
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "split": "train", "lo')  # killed mid-write
    second = _main(corpus, tmp_path, **{"train.num_steps": 4, "checkpoint.export_hf": False})
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 2" in second.stderr

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=no_constants) for line in lines]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["mfu"] is None for r in train)  # CPU: peak unknown, written as null


@pytest.mark.slow
def test_demo_resumes_after_sigterm(tmp_path):
    workdir = tmp_path / "demo"
    args = [
        f"--workdir={workdir}",
        "--train_rows=200",
        "--validation_rows=40",
        "--test_per_task=2",
        "--config.train.num_steps=40",
        "--config.train.log_every_steps=1",
        "--config.eval.every_steps=10",
        "--config.eval.prompts=()",
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "sftjax.demo", *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for_train_step(workdir, 3, first)
    first.send_signal(signal.SIGTERM)
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 0, output[-3000:]
    assert "rerun the same command to resume" in output and "Traceback" not in output

    second = _run("sftjax.demo", *args, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step" in second.stderr
    assert "held-out exact match" in second.stdout
    results = json.loads((workdir / "demo_results.json").read_text())
    assert results["stop_reason"] in ("completed", "early_stopping") and results["last_step"] > 3

    other = _run("sftjax.demo", *args[:1], "--train_rows=300")  # other data: refused
    _assert_user_error(other, "holds demo data made with")
    shutil.rmtree(workdir / "demo_rows")
    assert _run("sftjax.demo", *args).returncode == 2  # no demo data, not empty: refused


@pytest.mark.slow
def test_resume_refuses_a_changed_learning_rate_and_allows_a_new_eval_cadence(corpus, tmp_path):
    short = {"train.num_steps": 2, "checkpoint.export_hf": False}
    assert _main(corpus, tmp_path, **short).returncode == 0
    longer = {**short, "train.num_steps": 4}

    changed = _main(corpus, tmp_path, **{**longer, "optim.lr": 0.5})
    _assert_user_error(changed, "optim.lr")
    assert "train.allow_config_change" in changed.stderr  # and it says how to go on anyway
    assert not (tmp_path / "damaged_checkpoints").exists()  # a refusal is not damage

    cadence = _main(corpus, tmp_path, **{**longer, "eval.every_steps": 1})
    assert cadence.returncode == 0, cadence.stderr[-3000:]
    assert "resumed from step 2" in cadence.stderr
    assert "config changed since the checkpoint" in cadence.stderr
    assert "eval.every_steps" in cadence.stderr


@pytest.mark.slow
def test_a_learning_rate_that_collapses_the_model_stops_the_run(corpus, tmp_path):
    run = _main(
        corpus,
        tmp_path,
        **{"optim.lr": 1e4, "optim.warmup_ratio": 0.0, "train.num_steps": 60},
        **{"eval.every_steps": 100, "checkpoint.export_hf": False},
    )
    assert run.returncode == 3, run.stderr[-3000:]
    assert "training collapsed at steps" in run.stderr and "lower optim.lr" in run.stderr
    trained = [r["step"] for r in metrics.read_records(tmp_path / "metrics.jsonl")]
    assert max(trained) < 30  # caught within a few logged steps, not at the end


def test_generate_with_a_missing_checkpoint_is_one_line(tmp_path):
    done = _run("sftjax.generate", f"--checkpoint={tmp_path / 'missing'}", "--prompt=hi")
    _assert_user_error(done, "missing: no such directory")
