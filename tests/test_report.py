"""report.py: the CLI prints every section and exits 2 where training would refuse."""

import json
import pathlib
import subprocess
import sys

from conftest import shared_path

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _report(train_files: str, *flags: str, histogram: str = "") -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "sftjax.data.report",
        "--config=configs/base.py",
        f"--config.data.train_files={train_files}",
        f"--config.data.tokenizer={shared_path('llama2_tokenizer')}",
        f"--histogram={histogram}",
        *flags,
    ]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_report_on_alpaca_fails_on_the_two_empty_outputs(tmp_path):
    path = shared_path("alpaca") / "code_alpaca_2k.json"
    png = tmp_path / "lengths.png"
    result = _report(str(path), histogram=str(png))
    assert result.returncode == 2, result.stderr
    out = result.stdout
    assert f"{path}:1187: output: empty field" in out and "bad rows, empty field: 2" in out
    assert "rows read: 2017" in out and "duplicates: 0" in out
    for section in (
        "over-long examples (> seq_len 2048 tokens): 0",
        "segment boundaries: 0 examples tokenize differently when encoded whole",
        "prompt tokens: p50",
        "response tokens: p50",
        "packing at seq_len 2048",
        "examples per row",
        "split: 101 of 2015 rows held out (5.01 %, requested 5.00 %) as whole groups",
        "largest groups of equal or near-duplicate prompts: none",
        "task mix (leading word of the instruction): write ",
        "responses (2015): empty 0 (0.0 %), one token ",
        f"response-length histogram: {png}",
    ):
        assert section in out
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert out.count("--- example") == 3 and out.count("</s>⟧") == 3
    assert "training would stop here" in result.stderr


def test_report_with_skip_exits_zero(tmp_path):
    rows = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(5)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in rows] * 2 + ["{bad"]))
    result = _report(str(path), "--config.data.bad_rows=skip", "--config.data.seq_len=64")
    assert result.returncode == 0, result.stderr
    assert "bad rows, invalid JSON: 1" in result.stdout
    assert "kept: 5; bad: 1; duplicates: 5" in result.stdout
    assert "### Response:\n⟦A" in result.stdout
    assert "response-length histogram" not in result.stdout  # --histogram=""


def test_report_names_leaks_and_groups_and_fails_like_training(tmp_path):
    describe = "Describe animal number 0 in one short sentence for a book about the sea"
    train = [{"instruction": describe, "output": "ok"}]
    train += [{"instruction": "Name a colour", "output": c} for c in ("red", "blue")]
    validation = [
        {"instruction": describe.upper() + "!", "output": "no"},
        {"instruction": describe.replace("one", "one very"), "output": "no"},
        {"instruction": "Count to three", "output": "1 2 3"},
    ]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in train))
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in validation))
    t, v = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    flags = (f"--config.data.validation_files={v}", "--config.data.leakage=fail")
    result = _report(str(t), *flags, "--config.data.seq_len=64")
    assert result.returncode == 2 and "leakage='fail' and 2 leaking" in result.stderr
    out = result.stdout
    assert (
        "leakage: 2 of 3 validation rows have an exact, same-instruction or near-duplicate prompt"
        in out
    )
    assert f"  {v}:1: same prompt as {t}:1" in out
    # one word inserted: 14 of 15 words and 12 of 15 word pairs shared, Jaccard 26 / 30
    assert f"  {v}:2: near-duplicate (J=0.87) of {t}:1" in out
    assert f"  3: {t}:1, {v}:1, {v}:2" in out and f"  2: {t}:2, {t}:3" in out
    assert "task mix (leading word of the instruction): describe 50.0 %, name 33.3 %" in out


def test_rows_python_cannot_read_are_reported_and_refused_in_one_line(tmp_path):
    rows = [json.dumps({"instruction": f"Q{i}", "output": f"A{i}"}) for i in range(5)]
    surrogate = '{"instruction": "x\\udc00", "output": "y"}'
    deep = '{"instruction": "z", "output": ' + "[" * 100_000 + "]" * 100_000 + "}"
    long_int = '{"instruction": "n", "output": ' + "1" * 5000 + "}"
    jsonl, array = tmp_path / "rows.jsonl", tmp_path / "rows.json"
    jsonl.write_text("\n".join([*rows, surrogate, deep]))
    array.write_text("[\n" + ",\n".join([long_int, rows[0].replace("Q0", "Q9")]) + "\n]")
    result = _report(f"{jsonl},{array}", "--config.data.seq_len=64")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    out = result.stdout
    assert "rows read: 9; kept: 6; bad: 3" in out
    assert f"{jsonl}:6: instruction: invalid Unicode (lone surrogate \\udc00 at character 1)" in out
    assert f"{jsonl}:7: row: nested too deeply" in out
    assert f"{array}:2: output: not a string (int of 5000 digits)" in out
    assert result.stderr.splitlines()[-1] == (
        "bad_rows='fail' and 3 bad row(s): training would stop here"
    )


def test_data_key_out_of_range_is_one_line_before_reading(tmp_path):
    result = _report(str(tmp_path / "never_read.jsonl"), "--config.data.packing_bins=0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: invalid config: config.data.packing_bins=0: must be an integer >= 1"
    ]


def _chat(*turns: str) -> dict:
    roles = ("user", "assistant") * len(turns)
    return {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]}


def test_rows_over_long_from_their_characters_are_reported_not_a_crash(tmp_path):
    """Rows the length policy settles from characters alone are never tokenized whole, so
    they have no lengths: a huge conversation whose last exchange fits (truncate_history) and
    one whose turns alone just fit 65 tokens of 16 characters but not with the template's
    tokens (dropped). The one-token answer after them is still found as one."""
    rows = [_chat(f"Question {i}?", f"Answer number {i}.") for i in range(4)]
    rows += [
        _chat("word " * 5000, "ok " * 3000, "Short?", "Yes, short."),
        _chat("a" * 520, "b" * 520),
        _chat("Is the sky blue?", "Yes"),
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    flags = ("--config.data.template=chat", "--config.data.seq_len=64")
    result = _report(str(path), *flags, "--config.data.overlong=truncate_history")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "dropped 1, prompt truncated 0, history truncated 1 with 2 turns cut" in out
    assert "responses (7): empty 0 (0.0 %), one token 1 (14.3 %)" in out
    assert "prompt tokens: p50" in out and "response tokens: p50" in out
    result = _report(str(path), *flags, "--config.data.overlong=drop")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(policy 'drop': dropped 2, prompt truncated 0" in result.stdout
    assert "responses (6): empty 0 (0.0 %), one token 1 (16.7 %)" in result.stdout
