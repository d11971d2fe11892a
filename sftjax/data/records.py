"""Instruction rows from JSONL / JSON-array files, validated, every problem located at file:line.

Owns: expanding file specs (a list, a comma-separated string, globs), parsing JSONL and JSON
arrays while tracking the line where each row starts, validating the row formats (`FORMATS`:
alpaca `instruction` / optional `input` / `response` with `output` as an alias; TRL-style
`prompt` / `completion`; ShareGPT `conversations: [{from, value}]`; OpenAI-style
`messages: [{role, content}]`), dropping duplicates (rows equal after normalising case,
punctuation and whitespace with dedup.normalize), and the `RecordReport`.
Does not own: templates, tokenization, the validation split (pipeline.py), or exiting the
process: with `bad_rows="fail"` it raises `BadRowsError`, which the caller's main turns into a
non-zero exit before any training.
"""

import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from sftjax import paths
from sftjax.data import dedup

MAX_PROBLEMS = 20  # problems quoted in full; all of them are counted by reason
MAX_DUPLICATES = 5  # duplicate locations quoted in the report

# Reasons a row is bad. The report counts rows by these exact strings.
INVALID_JSON = "invalid JSON"
INVALID_UTF8 = "invalid UTF-8"
INVALID_UNICODE = "invalid Unicode"  # a lone surrogate escape ("\ud800"): no text has one
TOO_DEEP = "nested too deeply"  # deeper than Python's JSON reader goes (~1000 levels)
NOT_OBJECT = "not a JSON object"
MISSING = "missing field"  # absent or null
EMPTY = "empty field"  # "" or whitespace only
NOT_STRING = "not a string"
NOT_LIST = "not a list"
UNKNOWN_ROLE = "unknown role"
NO_ASSISTANT = "no assistant turn"
TURN_ORDER = "bad turn order"

ROLES = ("system", "user", "assistant")
RESPONSE_ALIASES = ("output",)  # accepted when the configured response field is absent
# ShareGPT speakers; the OpenAI names are accepted too (some exports mix them).
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
SHAREGPT_ROLES |= {r: r for r in ROLES}
FORMATS = ("alpaca", "prompt_completion", "sharegpt", "messages")

Message = tuple[str, str]  # (role, content)


@dataclasses.dataclass(frozen=True)
class Row:
    """One validated row; alpaca and prompt/completion rows fill the first three fields
    (a completion is the response to a prompt without input), conversations `messages`."""

    source: str  # "path:line" where the row starts
    instruction: str = ""
    input: str = ""
    response: str = ""
    messages: tuple[Message, ...] = ()

    def conversation(self) -> tuple[Message, ...]:
        """The row as chat turns: an instruction row is one user turn (its input after a blank
        line, as TRL and axolotl join them) and, when it has one, one assistant turn."""
        if self.messages:
            return self.messages
        user = self.instruction + (f"\n\n{self.input}" if self.input.strip() else "")
        return (("user", user),) + ((("assistant", self.response),) if self.response else ())

    def content_key(self) -> str:
        """The row's normalised content without its location: equal for duplicates, even ones
        that differ only in case, punctuation or whitespace."""
        messages = [[role, dedup.normalize(text)] for role, text in self.messages]
        fields = [dedup.normalize(t) for t in (self.instruction, self.input, self.response)]
        return json.dumps([*fields, messages], ensure_ascii=False)


@dataclasses.dataclass
class RecordReport:
    """What reading found: counts by reason, duplicates, and the first problems verbatim."""

    files: list[str]
    format: str = ""  # the row format read (resolved when "auto")
    rows_read: int = 0  # rows seen in the files, good and bad
    rows_kept: int = 0  # rows returned (good, not duplicates)
    bad_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)  # first MAX_PROBLEMS
    duplicates: int = 0  # rows equal to an earlier one after normalising (dropped if asked)
    duplicate_examples: list[str] = dataclasses.field(default_factory=list)

    @property
    def bad_rows(self) -> int:
        """Rows rejected for any reason."""
        return sum(self.bad_by_reason.values())

    def summary(self) -> str:
        """Human-readable report: counts first, then the quoted problems."""
        lines = [
            f"files: {len(self.files)} ({self.format} rows); rows read: {self.rows_read}; "
            f"kept: {self.rows_kept}; "
            f"bad: {self.bad_rows}; duplicates: {self.duplicates}"
        ]
        lines += [f"  bad rows, {r}: {n}" for r, n in sorted(self.bad_by_reason.items())]
        if self.problems:
            shown = f"first {len(self.problems)} of {self.bad_rows}"
            lines.append(f"problems ({shown}):")
            lines += [f"  {p}" for p in self.problems]
        lines += [f"  duplicate: {d}" for d in self.duplicate_examples]
        return "\n".join(lines)


def merge_reports(reports: Sequence[RecordReport]) -> RecordReport:
    """One report for several sources read separately (data.mixture): counts summed."""
    merged = RecordReport(files=[f for r in reports for f in r.files])
    merged.format = ",".join(dict.fromkeys(r.format for r in reports))
    for r in reports:
        merged.rows_read += r.rows_read
        merged.rows_kept += r.rows_kept
        merged.duplicates += r.duplicates
        for reason, n in r.bad_by_reason.items():
            merged.bad_by_reason[reason] = merged.bad_by_reason.get(reason, 0) + n
        merged.problems += r.problems[: MAX_PROBLEMS - len(merged.problems)]
        merged.duplicate_examples += r.duplicate_examples
    return merged


class DataError(ValueError):
    """A data file that cannot be read at all: empty, a directory, a JSON array broken beyond
    repair. Raised whatever bad_rows says: skipping rows cannot fix it."""


class BadRowsError(DataError):
    """Raised under bad_rows="fail": the message lists the counts and the first problems."""

    def __init__(self, report: RecordReport):
        self.report = report
        super().__init__(
            f"{report.bad_rows} bad row(s); fix them or set bad_rows='skip'\n" + report.summary()
        )


class _BadRow(Exception):
    def __init__(self, field: str, reason: str, detail: str = ""):
        self.field, self.reason, self.detail = field, reason, detail


@dataclasses.dataclass(frozen=True)
class _LongInteger:
    """An integer literal longer than Python converts (sys.get_int_max_str_digits(), a guard
    against quadratic-time parsing): kept unconverted, so only a row that uses it as a field is
    bad, and for that field."""

    digits: int


def _integer(literal: str) -> int | _LongInteger:
    digits = len(literal.lstrip("-"))
    return _LongInteger(digits) if digits > sys.get_int_max_str_digits() else int(literal)


_DECODER = json.JSONDecoder(parse_int=_integer)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a valid pair decodes to one character
_TOO_DEEP_DETAIL = "more levels of [ ] or { } than Python's JSON reader allows"


def _kind(value: Any) -> str:
    """The JSON type of a value, for reports."""
    if isinstance(value, _LongInteger):
        return f"int of {value.digits} digits"
    return type(value).__name__


def expand_paths(spec: str | Sequence[str]) -> list[str]:
    """Files named by a comma-separated string or a list, each entry a path or a glob."""
    entries = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    files = []
    for entry in (os.fspath(e) for e in entries if e):
        if paths.resolve(entry).is_dir():  # explicit beats guessing which files inside are data
            pattern = f"{entry.rstrip('/')}/*.jsonl"
            raise DataError(f"{entry!r} is a directory; name its data files, e.g. {pattern!r}")
        matches = [m for m in paths.expand([entry]) if paths.resolve(m).is_file()]
        if not matches:
            raise DataError(f"no file matches {entry!r}; give existing JSON/JSONL paths")
        files += matches
    if not files:
        raise DataError(f"no data files given ({spec!r})")
    return files


def _scan_jsonl(data: bytes) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield number, _BadRow("row", INVALID_UTF8, f"byte {e.start}")
            continue
        try:
            yield number, _DECODER.decode(text)
        except json.JSONDecodeError as e:
            yield number, _BadRow("row", INVALID_JSON, f"{e.msg} at column {e.colno}")
        except RecursionError:
            yield number, _BadRow("row", TOO_DEEP, _TOO_DEEP_DETAIL)


_FIRST_ON_LINE = re.compile(r"^([ \t\r]*)\S", re.MULTILINE)
_ONLY_SPACE_LEFT = re.compile(r"\s*\Z")  # matched from a position: stops at the first non-space


def _next_element(text: str, start: int, indent: str | None) -> int | None:
    """Where reading can go on after a broken element: the next line that starts an element at
    the elements' indentation and parses (or is too deep to parse), or the array's final "]";
    None if there is none.

    JSON strings cannot hold a raw newline, so a line start is never inside a string.
    """
    for match in _FIRST_ON_LINE.finditer(text, text.rfind("\n", 0, start) + 1):
        pos = match.end() - 1
        if pos < start:
            continue
        if text[pos] == "]" and _ONLY_SPACE_LEFT.match(text, pos + 1):
            return pos
        if indent is not None and match.group(1) != indent:
            continue
        try:
            _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            continue
        except RecursionError:  # an element too deep to read: it is counted as one, not skipped
            return pos
        return pos
    return None


def _scan_json_array(text: str, path: str) -> Iterator[tuple[int, Any]]:
    """Elements of a JSON array with the line each starts on (raw_decode, one element at a time).

    A broken element is one bad row; reading goes on at the next element (`_next_element`), so
    the rows after it are not lost. Where no next element can be found the file is refused.
    """
    pos, line, counted = text.index("[") + 1, 1, 0
    indent = None  # what precedes an element on its line, from the first that starts a line

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    def skip_space(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    while True:
        pos = skip_space(pos)
        if pos >= len(text):
            raise DataError(f"{path}:{line_at(pos)}: the JSON array ends without its closing ']'")
        if text[pos] == "]":
            if not _ONLY_SPACE_LEFT.match(text, pos + 1):
                raise DataError(f"{path}:{line_at(pos)}: text after the array's closing ']'")
            return
        if indent is None:
            prefix = text[text.rfind("\n", 0, pos) + 1 : pos]
            indent = prefix if not prefix.strip() else None
        try:
            element, end = _DECODER.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError) as e:
            if isinstance(e, RecursionError):
                lineno, reason, why = line_at(pos), TOO_DEEP, _TOO_DEEP_DETAIL
            else:
                lineno, reason, why = e.lineno, INVALID_JSON, f"{e.msg} at column {e.colno}"
            yield lineno, _BadRow("row", reason, why)
            resume = _next_element(text, pos + 1, indent)
            if resume is None:
                raise DataError(
                    f"{path}:{lineno}: {reason} ({why}) and no element after it can be "
                    "found; fix the file (bad_rows='skip' cannot skip inside a broken array)"
                ) from None
            pos = resume
            continue
        yield line_at(pos), element
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            yield (
                line_at(pos),
                _BadRow("row", INVALID_JSON, "no ',' between this and the row above"),
            )
            resume = _next_element(text, pos, indent)
            if resume is None:
                raise DataError(f"{path}:{line_at(pos)}: expected ',' or ']' after an element")
            pos = resume


def _is_jsonl(head: bytes) -> bool:
    """A file starting with "[" is JSONL only if its first line is a whole value and more follow."""
    first, _, rest = head.partition(b"\n")
    try:
        _DECODER.decode(first.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False
    return bool(rest.strip())


def scan_file(path: str) -> Iterator[tuple[int, Any]]:
    """(line, value or _BadRow) per row: a JSON array if the file starts with "[", else JSONL."""
    data = paths.resolve(path).read_bytes()  # local or gs://
    head = data.removeprefix(b"\xef\xbb\xbf").lstrip()
    if not head.startswith(b"[") or _is_jsonl(head):
        yield from _scan_jsonl(data)
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:  # an array can't be read past it: refuse, don't truncate
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 (byte {e.start}) in a JSON array") from None
    yield from _scan_json_array(text, path)


def _text(value: Any, field: str, *, optional: bool = False) -> str:
    if value is None:
        if optional:
            return ""
        raise _BadRow(field, MISSING)
    if not isinstance(value, str):
        raise _BadRow(field, NOT_STRING, _kind(value))
    if not optional and not value.strip():
        raise _BadRow(field, EMPTY)
    surrogate = _LONE_SURROGATE.search(value)
    if surrogate:  # tokenizers cannot take it; UTF-8 cannot encode it
        where = f"lone surrogate \\u{ord(surrogate.group()):04x} at character {surrogate.start()}"
        raise _BadRow(field, INVALID_UNICODE, where)
    return value


def _instruction_row(obj: dict, source: str, fields: dict[str, str]) -> Row:
    response_key = fields["response"]
    if response_key not in obj:
        response_key = next((a for a in RESPONSE_ALIASES if a in obj), response_key)
    return Row(
        source=source,
        instruction=_text(obj.get(fields["instruction"]), fields["instruction"]),
        input=_text(obj.get(fields["input"]), fields["input"], optional=True),
        response=_text(obj.get(response_key), response_key),
    )


def _prompt_completion_row(obj: dict, source: str, fields: dict[str, str]) -> Row:
    return Row(
        source=source,
        instruction=_text(obj.get(fields["prompt"]), fields["prompt"]),
        response=_text(obj.get(fields["completion"]), fields["completion"]),
    )


def _turns(obj: dict, key: str) -> list:
    turns = obj.get(key)
    if turns is None:
        raise _BadRow(key, MISSING)
    if not isinstance(turns, list):
        raise _BadRow(key, NOT_LIST, _kind(turns))
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _BadRow(f"{key}[{i}]", NOT_OBJECT)
    return turns


def _checked_order(messages: list[Message], key: str, source: str, role: str) -> Row:
    """An optional system turn, then user/assistant alternating, ending with assistant."""
    roles = [r for r, _ in messages]
    if "assistant" not in roles:
        raise _BadRow(key, NO_ASSISTANT)
    start = 1 if roles[0] == "system" else 0
    for i, got in enumerate(roles[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if got != expected:
            raise _BadRow(f"{key}[{i}].{role}", TURN_ORDER, f"expected {expected}, got {got}")
    if roles[-1] != "assistant":
        raise _BadRow(f"{key}[{len(roles) - 1}].{role}", TURN_ORDER, "ends with a user turn")
    return Row(source=source, messages=tuple(messages))


def _conversation_row(obj: dict, source: str, key: str, sharegpt: bool) -> Row:
    """OpenAI-style {role, content} turns, or ShareGPT {from, value} turns mapped to roles."""
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    names = SHAREGPT_ROLES if sharegpt else {r: r for r in ROLES}
    messages = []
    for i, turn in enumerate(_turns(obj, key)):
        name = _text(turn.get(role_key), f"{key}[{i}].{role_key}")
        if name not in names:
            raise _BadRow(f"{key}[{i}].{role_key}", UNKNOWN_ROLE, repr(name))
        messages.append((names[name], _text(turn.get(text_key), f"{key}[{i}].{text_key}")))
    return _checked_order(messages, key, source, role_key)


def detect_format(obj: dict, fields: dict[str, str]) -> str:
    """The format a row object is in, from its keys (data.format="auto")."""
    if fields["messages"] in obj:
        return "messages"
    if fields["conversations"] in obj:
        return "sharegpt"
    if fields["prompt"] in obj and fields["completion"] in obj:
        return "prompt_completion"
    return "alpaca"


def _parse(obj: dict, source: str, row_format: str, fields: dict[str, str]) -> Row:
    if row_format == "messages":
        return _conversation_row(obj, source, fields["messages"], sharegpt=False)
    if row_format == "sharegpt":
        return _conversation_row(obj, source, fields["conversations"], sharegpt=True)
    if row_format == "prompt_completion":
        return _prompt_completion_row(obj, source, fields)
    return _instruction_row(obj, source, fields)


def read_records(
    paths: str | Sequence[str],
    *,
    row_format: str = "alpaca",
    instruction_field: str = "instruction",
    input_field: str = "input",
    response_field: str = "response",
    messages_field: str = "messages",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    conversations_field: str = "conversations",
    bad_rows: str = "fail",
    drop_duplicates: bool = True,
) -> tuple[list[Row], RecordReport]:
    """Every valid row of the files, in file order, and a report of what was rejected and why.

    row_format is one of FORMATS, or "auto": the format of the first JSON object read. With
    bad_rows="fail" any bad row raises BadRowsError after all files are read (so the message
    has complete counts); with "skip" bad rows are only counted.
    """
    if bad_rows not in ("fail", "skip"):
        raise ValueError(f"bad_rows must be 'fail' or 'skip', got {bad_rows!r}")
    if row_format not in (*FORMATS, "auto"):
        raise ValueError(f"row format must be one of {FORMATS} or 'auto', got {row_format!r}")
    files = expand_paths(paths)
    fields = {
        "instruction": instruction_field,
        "input": input_field,
        "response": response_field,
        "messages": messages_field,
        "prompt": prompt_field,
        "completion": completion_field,
        "conversations": conversations_field,
    }
    report = RecordReport(files=files, format=row_format)
    rows: list[Row] = []
    first_seen: dict[str, str] = {}
    for path in files:
        rows_before = report.rows_read
        for line, value in scan_file(path):
            source = f"{path}:{line}"
            report.rows_read += 1
            try:
                if isinstance(value, _BadRow):
                    raise value
                if not isinstance(value, dict):
                    raise _BadRow("row", NOT_OBJECT, _kind(value))
                if report.format == "auto":
                    report.format = detect_format(value, fields)
                row = _parse(value, source, report.format, fields)
            except _BadRow as bad:
                report.bad_by_reason[bad.reason] = report.bad_by_reason.get(bad.reason, 0) + 1
                if len(report.problems) < MAX_PROBLEMS:
                    detail = f" ({bad.detail})" if bad.detail else ""
                    report.problems.append(f"{source}: {bad.field}: {bad.reason}{detail}")
                continue
            key = row.content_key()
            if key in first_seen:
                report.duplicates += 1
                if len(report.duplicate_examples) < MAX_DUPLICATES:
                    report.duplicate_examples.append(f"{source} repeats {first_seen[key]}")
                if drop_duplicates:
                    continue
            else:
                first_seen[key] = source
            rows.append(row)
        if report.rows_read == rows_before:
            raise DataError(f"{path}: no rows (the file is empty)")
    report.rows_kept = len(rows)
    if bad_rows == "fail" and report.bad_rows:
        raise BadRowsError(report)
    return rows, report
