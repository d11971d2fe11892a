"""report.py: the CLI prints every section and exits non-zero where training would refuse."""

import json
import pathlib
import subprocess
import sys

from conftest import shared_path

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _report(train_files: str, *flags: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "sftjax.data.report",
        "--config=configs/base.py",
        f"--config.data.train_files={train_files}",
        f"--config.data.tokenizer={shared_path('llama2_tokenizer')}",
        *flags,
    ]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_report_on_alpaca_fails_on_the_two_empty_outputs():
    path = shared_path("alpaca") / "code_alpaca_2k.json"
    result = _report(str(path))
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert f"{path}:1187: output: empty field" in out and "bad rows, empty field: 2" in out
    assert "rows read: 2017" in out and "duplicates: 0" in out
    for section in (
        "over-long examples (> seq_len 2048 tokens): 0",
        "prompt tokens: p50",
        "response tokens: p50",
        "packing at seq_len 2048",
        "examples per row",
    ):
        assert section in out
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
