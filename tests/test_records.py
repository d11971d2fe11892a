"""records.py: every bad-row kind is reported exactly, at the line where the row starts."""

import json

import pytest
from conftest import shared_path

from sftjax.data import records

GOOD = {"instruction": "Add", "input": "1 2", "response": "3"}


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.fixture
def bad_corpus(tmp_path):
    """One JSONL and one JSON-array file with every instruction-row problem and a duplicate."""
    jsonl = _write(
        tmp_path / "a.jsonl",
        "\n".join(
            [
                json.dumps(GOOD),  # 1
                "{not json",  # 2
                "",  # 3: blank lines are skipped, not rows
                json.dumps({"input": "x", "response": "y"}),  # 4
                json.dumps({"instruction": "  ", "response": "y"}),  # 5
                json.dumps({"instruction": 7, "response": "y"}),  # 6
                json.dumps({"instruction": "x", "input": ["l"], "response": "y"}),  # 7
                json.dumps({"instruction": "x", "response": None}),  # 8
                json.dumps(["a list"]),  # 9
                json.dumps({"instruction": "Q", "output": "A"}),  # 10: alias
                json.dumps(GOOD),  # 11: duplicate of line 1
            ]
        ),
    )
    array = _write(
        tmp_path / "b.json",
        '[\n  {"instruction": "Q2",\n   "output": "A2"},\n'  # element at line 2
        '  {"instruction": "Q3", "output": ""},\n'  # line 4: empty response
        '\n  {"instruction": "Q4",\n   "output": "A4"}\n]\n',  # line 6
    )
    return [jsonl, array]


def test_bad_corpus_report_is_exact(bad_corpus):
    jsonl, array = bad_corpus
    rows, report = records.read_records(bad_corpus, bad_rows="skip")
    assert report.bad_by_reason == {
        "invalid JSON": 1,
        "missing field": 2,
        "empty field": 2,
        "not a string": 2,
        "not a JSON object": 1,
    }
    assert report.problems == [
        f"{jsonl}:2: row: invalid JSON (Expecting property name enclosed in double quotes "
        "at column 2)",
        f"{jsonl}:4: instruction: missing field",
        f"{jsonl}:5: instruction: empty field",
        f"{jsonl}:6: instruction: not a string (int)",
        f"{jsonl}:7: input: not a string (list)",
        f"{jsonl}:8: response: missing field",
        f"{jsonl}:9: row: not a JSON object (list)",
        f"{array}:4: output: empty field",
    ]
    assert (report.rows_read, report.rows_kept, report.duplicates) == (13, 4, 1)
    assert report.duplicate_examples == [f"{jsonl}:11 repeats {jsonl}:1"]
    assert [r.source for r in rows] == [f"{jsonl}:1", f"{jsonl}:10", f"{array}:2", f"{array}:6"]
    assert rows[1] == records.Row(f"{jsonl}:10", "Q", "", "A")


def test_fail_raises_with_counts_and_problems(bad_corpus):
    with pytest.raises(records.BadRowsError) as info:
        records.read_records(bad_corpus)
    message = str(info.value)
    assert "8 bad row(s)" in message and "bad rows, missing field: 2" in message
    assert f"{bad_corpus[0]}:4: instruction: missing field" in message
    assert info.value.report.rows_kept == 4


def test_only_first_20_problems_are_quoted_but_all_counted(tmp_path):
    path = _write(tmp_path / "x.jsonl", "\n".join(["[]"] * 30 + [json.dumps(GOOD)]))
    rows, report = records.read_records(path, bad_rows="skip")
    assert len(report.problems) == 20 and report.bad_rows == 30 and len(rows) == 1
    assert report.problems[-1] == f"{path}:20: row: not a JSON object (list)"


def test_duplicates_kept_when_asked(tmp_path):
    path = _write(tmp_path / "x.jsonl", "\n".join([json.dumps(GOOD)] * 3))
    rows, report = records.read_records(path, drop_duplicates=False)
    assert len(rows) == 3 and report.duplicates == 2


def test_configurable_field_names(tmp_path):
    path = _write(tmp_path / "x.jsonl", json.dumps({"q": "Q", "ctx": "C", "a": "A"}))
    rows, _ = records.read_records(
        path, instruction_field="q", input_field="ctx", response_field="a"
    )
    assert (rows[0].instruction, rows[0].input, rows[0].response) == ("Q", "C", "A")


def test_broken_json_array_points_at_the_broken_element(tmp_path):
    path = _write(tmp_path / "x.json", '[\n {"instruction": "a", "response": "b"},\n {"x": }\n]')
    rows, report = records.read_records(path, bad_rows="skip")
    assert len(rows) == 1
    assert report.problems == [
        f"{path}:3: row: invalid JSON (Expecting value at column 8; rest of file not read)"
    ]


def test_chat_rows(tmp_path):
    def conv(*turns):
        return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})

    path = _write(
        tmp_path / "chat.jsonl",
        "\n".join(
            [
                conv(("system", "S"), ("user", "U"), ("assistant", "A")),  # 1 good
                conv(("user", "U"), ("bot", "A")),  # 2
                conv(("user", "U")),  # 3
                conv(("user", "U"), ("assistant", "A"), ("assistant", "B")),  # 4
                conv(("user", "U"), ("assistant", "A"), ("user", "V")),  # 5
                conv(("user", "U"), ("assistant", "")),  # 6
                json.dumps({"messages": "hi"}),  # 7
                json.dumps({"messages": [{"role": "user", "content": 1}]}),  # 8
                json.dumps({"turns": []}),  # 9
                json.dumps({"messages": ["x"]}),  # 10
            ]
        ),
    )
    rows, report = records.read_records(path, row_format="messages", bad_rows="skip")
    assert rows == [
        records.Row(f"{path}:1", messages=(("system", "S"), ("user", "U"), ("assistant", "A")))
    ]
    assert report.problems == [
        f"{path}:2: messages[1].role: unknown role ('bot')",
        f"{path}:3: messages: no assistant turn",
        f"{path}:4: messages[2].role: bad turn order (expected user, got assistant)",
        f"{path}:5: messages[2].role: bad turn order (ends with a user turn)",
        f"{path}:6: messages[1].content: empty field",
        f"{path}:7: messages: not a list (str)",
        f"{path}:8: messages[0].content: not a string (int)",
        f"{path}:9: messages: missing field",
        f"{path}:10: messages[0]: not a JSON object",
    ]


def test_paths_globs_and_lists(tmp_path):
    a = _write(tmp_path / "a.jsonl", json.dumps(GOOD))
    b = _write(tmp_path / "b.jsonl", json.dumps(GOOD))
    assert records.expand_paths(str(tmp_path / "*.jsonl")) == [a, b]
    assert records.expand_paths(f"{b}, {a}") == [b, a]
    assert records.expand_paths([a]) == [a]
    with pytest.raises(FileNotFoundError, match="nope"):
        records.expand_paths(str(tmp_path / "nope*.jsonl"))


def test_shared_alpaca_has_exactly_two_empty_outputs():
    path = shared_path("alpaca") / "code_alpaca_2k.json"
    with pytest.raises(records.BadRowsError) as info:
        records.read_records(str(path))
    report = info.value.report
    assert report.bad_by_reason == {"empty field": 2}
    assert report.problems == [
        f"{path}:1187: output: empty field",
        f"{path}:9297: output: empty field",
    ]
    assert report.rows_read == 2017
