"""metrics.jsonl survives crashes: torn last lines, atomic rewrites on resume, no NaN tokens."""

import json
import math

import pytest

from sftjax import metrics


def _write(path, records, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_torn_last_line_is_dropped_on_resume_and_the_rest_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "split": "train", "loss": 1.0 / s} for s in range(1, 6)]
    _write(path, records, tail='{"step": 6, "split": "tr')  # killed mid-write
    metrics._drop_records_after(path, 4)
    assert metrics.read_records(path) == records[:4]
    assert path.read_text().endswith("\n")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left


def test_torn_line_is_removed_even_when_no_record_is_past_the_step(tmp_path):
    # Otherwise the next append would glue a record onto the torn line.
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"step": 1, "split": "train"}], tail='{"step": 2, "spl')
    metrics._drop_records_after(path, 10)
    with path.open("a") as f:
        f.write(metrics.json_line({"step": 2, "split": "train"}))
    assert [r["step"] for r in metrics.read_records(path)] == [1, 2]


def test_read_records_skips_only_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"step": 1, "split": "train"}], tail="{broken")
    assert metrics.read_records(path) == [{"step": 1, "split": "train"}]
    path.write_text('{"step": 1}\n{broken\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: unreadable line"):
        metrics.read_records(path)


def test_broken_middle_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{broken\n{"step": 2}\n{"step": 3}\n')
    metrics._drop_records_after(path, 2)
    assert metrics.read_records(path) == [{"step": 1}, {"step": 2}]


def test_unchanged_file_is_not_rewritten(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"step": 1}, {"step": 2}])
    before = path.stat().st_mtime_ns, path.stat().st_ino
    metrics._drop_records_after(path, 2)
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before


def test_non_finite_values_are_written_as_null(tmp_path):
    writer = metrics.MetricsWriter(tmp_path)
    writer.write(1, "train", {"loss": 2.5, "mfu": math.nan, "tokens_per_s": math.inf})
    writer.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text)  # strict JSON: would fail on NaN
    assert record == {"step": 1, "split": "train", "loss": 2.5, "mfu": None, "tokens_per_s": None}
    assert math.isnan(metrics.mfu(1000.0, 1e9, None))  # the benchmarks still get NaN
