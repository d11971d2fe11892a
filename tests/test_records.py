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


def test_rows_equal_up_to_case_punctuation_and_whitespace_are_duplicates(tmp_path):
    rows = [
        GOOD,
        {"instruction": "ADD!", "input": " 1,  2", "response": "3."},
        {**GOOD, "response": "4"},
    ]
    path = _write(tmp_path / "x.jsonl", "\n".join(json.dumps(r) for r in rows))
    kept, report = records.read_records(path)
    assert [r.source for r in kept] == [f"{path}:1", f"{path}:3"]
    assert report.duplicate_examples == [f"{path}:2 repeats {path}:1"]


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
    assert report.problems == [f"{path}:3: row: invalid JSON (Expecting value at column 8)"]


def _rows(n: int) -> list[dict]:
    return [{"instruction": f"q{i}", "input": "", "response": f"a{i}"} for i in range(n)]


@pytest.mark.parametrize(
    "damage, error_line",
    [
        (lambda e: e.replace('"response": "a21"', '"response": a21"'), 3),  # a lost quote
        (lambda e: e.replace('"input": "",', '"input": "",,'), 2),  # a doubled comma
        (lambda e: e.replace("}", ""), 5),  # the closing brace cut: seen on the next line
    ],
)
def test_rows_after_a_broken_array_element_are_read(tmp_path, damage, error_line):
    # Element 22 of 40 broken: it is one bad row and the 18 after it are still read.
    elements = [json.dumps(r, indent=4).replace("\n", "\n  ") for r in _rows(40)]
    elements[21] = damage(elements[21])
    path = _write(tmp_path / "x.json", "[\n  " + ",\n  ".join(elements) + "\n]\n")
    rows, report = records.read_records(path, bad_rows="skip")
    assert [r.instruction for r in rows] == [f"q{i}" for i in range(40) if i != 21]
    assert report.bad_by_reason == {records.INVALID_JSON: 1} and report.rows_read == 40
    line = 2 + 21 * 5 + error_line  # each element spans 5 lines, the first starts on line 2
    assert report.problems[0].startswith(f"{path}:{line}: row: invalid JSON (")
    with pytest.raises(records.BadRowsError, match="1 bad row"):
        records.read_records(path)


def test_missing_comma_between_elements_loses_nothing(tmp_path):
    elements = [json.dumps(r) for r in _rows(4)]
    text = "[\n " + ",\n ".join(elements[:2]) + "\n " + ",\n ".join(elements[2:]) + "\n]"
    path = _write(tmp_path / "x.json", text)
    rows, report = records.read_records(path, bad_rows="skip")
    assert [r.instruction for r in rows] == ["q0", "q1", "q2", "q3"]
    assert report.problems == [
        f"{path}:4: row: invalid JSON (no ',' between this and the row above)"
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ('[{"instruction": "a", "response": "b"}, {"x": }, {"instruction": "c"}]', r":1: invalid"),
        ('[\n {"instruction": "a", "response": "b"},\n {"instruction": "c"', r":3: invalid"),
        ('[\n {"instruction": "a", "response": "b"},\n', r":3: the JSON array ends without"),
        ('[\n {"instruction": "a", "response": "b"}\n]\n{"more": 1}', r":3: text after"),
    ],
)
def test_array_that_cannot_be_read_on_is_refused_even_under_skip(tmp_path, text, message):
    path = _write(tmp_path / "x.json", text)
    with pytest.raises(records.DataError, match=r"x\.json" + message):
        records.read_records(path, bad_rows="skip")


def test_invalid_utf8_in_an_array_is_refused_with_its_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b'[\n {"instruction": "a", "response": "b"},\n {"instruction": "\xff"}\n]')
    with pytest.raises(records.DataError, match=r"x\.json:3: invalid UTF-8"):
        records.read_records(str(path), bad_rows="skip")


@pytest.mark.parametrize("text", ["", "\n\n", "[]", " [ ]\n"])
def test_empty_file_is_refused_by_name(tmp_path, text):
    good = _write(tmp_path / "good.jsonl", json.dumps(GOOD))
    empty = _write(tmp_path / "empty.json", text)
    with pytest.raises(records.DataError, match=r"empty\.json: no rows"):
        records.read_records([good, empty], bad_rows="skip")


def test_directory_as_data_file_is_refused_with_a_glob_to_use(tmp_path):
    _write(tmp_path / "a.jsonl", json.dumps(GOOD))
    with pytest.raises(records.DataError, match=r"is a directory; name its data files, e\.g\."):
        records.expand_paths(str(tmp_path))
    assert records.expand_paths(str(tmp_path / "*")) == [str(tmp_path / "a.jsonl")]


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
    with pytest.raises(records.DataError, match="nope"):
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


# Valid JSON that Python's reader or the tokenizer cannot take: each is a bad row, not a crash.
LONE_SURROGATE = '{"instruction": "x\\ud800y", "response": "ok"}'  # the escape, not a character
LONG_RESPONSE = '{"instruction": "a", "response": ' + "7" * 5000 + "}"  # > 4300 digits
LONG_UNUSED = '{"instruction": "b", "response": "c", "id": -' + "9" * 5000 + "}"  # kept
DEEP = "[" * 100_000 + "]" * 100_000
DEEP_FIELD = '{"instruction": "d", "response": ' + "[" * 100_000 + "]" * 100_000 + "}"
HOSTILE = [json.dumps(GOOD), LONE_SURROGATE, LONG_RESPONSE, LONG_UNUSED, DEEP, DEEP_FIELD]


@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_valid_json_python_cannot_take_is_a_bad_row(tmp_path, layout):
    if layout == "jsonl":  # rows on lines 1-6
        path = _write(tmp_path / "rows.jsonl", "\n".join(HOSTILE) + "\n")
    else:  # "[" on line 1, rows on lines 2-7
        path = _write(tmp_path / "rows.json", "[\n" + ",\n".join(HOSTILE) + "\n]\n")
    first = 1 if layout == "jsonl" else 2
    rows, report = records.read_records(path, bad_rows="skip")
    assert [(r.instruction, r.response) for r in rows] == [("Add", "3"), ("b", "c")]
    deep = "row: nested too deeply (more levels of [ ] or { } than Python's JSON reader allows)"
    assert report.problems == [
        f"{path}:{first + 1}: instruction: invalid Unicode (lone surrogate \\ud800 at character 1)",
        f"{path}:{first + 2}: response: not a string (int of 5000 digits)",
        f"{path}:{first + 4}: {deep}",
        f"{path}:{first + 5}: {deep}",
    ]
    assert report.rows_read == 6 and report.bad_rows == 4
    with pytest.raises(records.BadRowsError, match="4 bad row"):
        records.read_records(path, bad_rows="fail")
