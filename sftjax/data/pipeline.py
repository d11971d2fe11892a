"""Files → validated, split, encoded examples: the work that preparation (prepare.py) does once.

Owns: applying the train/validation split and the leakage policy (groups.py decides them),
encoding rows (template, `train_on`, the length policy with its counts; `truncate_history`
re-renders a conversation without its earliest turns) and the data report of all that.
Does not own: storing examples (flat.py, prepare.py), batching (batches.py), jax arrays.

Usage (prepare.py, data.report, tests):
    tok = tokenize.load_tokenizer(config.data.tokenizer)
    template = pipeline.make_template(config.data, tok)   # read data.chat_template once
    train, validation, report = pipeline.load_splits(config.data, tok, template)  # DataError

Encoding runs eagerly, in batched Rust calls: the report, the split and the over-long counts
are exact before training starts.
"""

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import ml_collections

from sftjax import paths
from sftjax.data import chat_templates, groups, mixture, records, tokenize
from sftjax.data.templates import Segment
from sftjax.data.tokenize import Encoded, Example

log = logging.getLogger("sftjax")


@dataclasses.dataclass
class DataReport:
    """What load_splits did: record reports, the split, and the length policy's counts."""

    train_records: records.RecordReport
    validation_records: records.RecordReport | None  # None: split from the training rows
    # data.mixture: each source's own report (train_records then sums them), in mixture order
    source_records: list[records.RecordReport] = dataclasses.field(default_factory=list)
    split: groups.SplitReport | None = None  # the grouped split (no validation files)
    leaks: list[groups.Leak] = dataclasses.field(default_factory=list)  # with validation files
    leakage: str = "warn"  # the policy applied to leaks
    clusters: list[list[str]] = dataclasses.field(default_factory=list)  # largest groups, file:line
    grouping_seconds: float = 0.0  # normalise + near-duplicate pass (start-up cost)
    train_examples: int = 0
    validation_examples: int = 0
    overlong_dropped: int = 0  # over seq_len, dropped (train + validation)
    prompt_truncated: int = 0  # over seq_len, prompt cut from the left (train + validation)
    history_truncated: int = 0  # over seq_len, earliest turns dropped (train + validation)
    turns_cut: int = 0  # user + assistant turns those examples lost
    # (row source file:line, untrained tokens, trained tokens) per example (train + validation)
    # tokenized whole, before the length policy; BOS counts with the prompt, EOS with the
    # response. Rows whose characters alone prove them over-long have none: paired with its
    # row, a length can't be read as another row's.
    lengths: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)
    # Examples kept (train + validation) where some segment boundary tokenizes differently when
    # the whole string is encoded; trained segment-wise, as generation sees them (tokenize.py).
    boundary_merges: int = 0
    merged_examples: list[str] = dataclasses.field(default_factory=list)  # first few, file:line

    @property
    def prompt_lengths(self) -> list[int]:
        return [prompt for _, prompt, _ in self.lengths]

    @property
    def response_lengths(self) -> list[int]:
        return [response for _, _, response in self.lengths]

    def summary(self) -> str:
        """Counts, for logs."""
        parts = ["train files: " + self.train_records.summary()]
        if self.validation_records is not None:
            parts.append("validation files: " + self.validation_records.summary())
        if self.split is not None:
            parts.append(self.split.summary())
        if self.validation_records is not None:
            dropped = f", {len(self.leaks)} dropped" if self.leakage == "drop" else ""
            parts.append(
                f"leakage: {len(self.leaks)} of {self.validation_records.rows_kept} validation "
                "rows have an exact, same-instruction or near-duplicate prompt in training "
                f"(policy {self.leakage!r}{dropped})"
            )
            parts += [f"  {leak}" for leak in self.leaks[: groups.MAX_QUOTED]]
        parts.append(
            f"examples: train {self.train_examples}, validation {self.validation_examples}; "
            f"over-long: dropped {self.overlong_dropped}, "
            f"prompt truncated {self.prompt_truncated}, "
            f"history truncated {self.history_truncated} ({self.turns_cut} turns cut)"
        )
        quoted = ", ".join(self.merged_examples)
        more = ", …" if self.boundary_merges > len(self.merged_examples) else ""
        parts.append(
            f"segment boundaries: {self.boundary_merges} examples tokenize differently when "
            "encoded whole (trained as encoded segment by segment, as generation sees them)"
            + (f": {quoted}{more}" if quoted else "")
        )
        return "\n".join(parts)


def _read(
    files: str, config: ml_collections.ConfigDict, row_format: str | None = None
) -> tuple[list, records.RecordReport]:
    return records.read_records(
        files,
        row_format=config.format if row_format is None else row_format,
        instruction_field=config.instruction_field,
        input_field=config.input_field,
        response_field=config.response_field,
        messages_field=config.messages_field,
        prompt_field=config.prompt_field,
        completion_field=config.completion_field,
        conversations_field=config.conversations_field,
        bad_rows=config.bad_rows,
        drop_duplicates=config.drop_duplicates,
    )


def make_template(config: ml_collections.ConfigDict, tok: tokenize.SegmentTokenizer):
    """The data section's template; data.chat_template (a .jinja file) overrides the tokenizer's."""
    jinja = paths.resolve(config.chat_template).read_text() if config.chat_template else ""
    return chat_templates.make_template(
        config.template,
        tok.hf,
        jinja,
        origin=config.chat_template,
        last_turn_only=config.train_on == "last_assistant_turn",
    )


def _encode(
    segments: Sequence[list[Segment]], template, tok: tokenize.SegmentTokenizer, train_on: str
) -> tuple[list[Encoded], list[int]]:
    """Segment lists → encoded examples, and the indices of those whose boundaries merge."""
    encoded = tokenize.encode_many(segments, tok, framed=template.framed)
    merged = tokenize.boundary_merges(segments, encoded, tok, framed=template.framed)
    if train_on == "last_assistant_turn":
        encoded = [tokenize.keep_last_turn(e) for e in encoded]
    elif train_on != "all_assistant_turns":
        raise ValueError(
            f"train_on must be all_assistant_turns or last_assistant_turn: {train_on!r}"
        )
    return encoded, merged


def _without_history(row: records.Row, cut: int) -> records.Row | None:
    """The row without its first `cut` exchanges (a system turn stays); None when none is left."""
    turns = row.conversation()
    system = turns[:1] if turns[0][0] == "system" else ()
    rest = turns[len(system) + 2 * cut :]
    if not rest:
        return None
    return records.Row(row.source, messages=system + rest)


def _truncate_history(row, template, tok, config, report) -> Encoded | None:
    """Drop the earliest exchanges until the example fits (None: even the last one doesn't)."""
    for cut in range(1, len(row.conversation()) // 2 + 1):
        shorter = _without_history(row, cut)
        if shorter is None:
            return None
        segments = template.segments(shorter)
        if tokenize.surely_longer(segments, tok, config.seq_len + 1, framed=template.framed):
            continue
        (encoded,), merged = _encode([segments], template, tok, config.train_on)
        if len(encoded.ids) - 1 <= config.seq_len:
            _count_merges(report, [row.source] if merged else [])
            report.history_truncated += 1
            report.turns_cut += 2 * cut
            return encoded
    return None


def _count_merges(report: DataReport, sources: list[str]) -> None:
    report.boundary_merges += len(sources)
    report.merged_examples += sources[: groups.MAX_QUOTED - len(report.merged_examples)]


def _cut_prompt(
    segments: list[Segment], tok: tokenize.SegmentTokenizer, seq_len: int, framed: bool
) -> list[Segment] | None:
    """An example certainly over seq_len, for truncate_prompt: None if its trained part alone
    is, else its prompt cut to the last characters that certainly hold seq_len + 1 tokens
    (a special first segment, BOS, stays). fit_length then cuts the ids exactly as it would
    have cut the whole prompt's; only the leftmost cut token, which it drops, can differ."""
    first = next((i for i, s in enumerate(segments) if s.trainable), len(segments))
    trained = segments[first:]
    if framed and tok.bos_id is not None:
        trained = [Segment("", False, True), *trained]  # stands for BOS in the bound
    if tokenize.surely_longer(trained, tok, seq_len + 1, framed=False):
        return None
    budget = (seq_len + 1) * tok.max_token_chars
    head = segments[:1] if segments and segments[0].special else []
    kept: list[Segment] = []
    for seg in reversed(segments[len(head) : first]):
        if budget <= 0:
            break
        if not seg.special:
            seg = seg._replace(text=seg.text[-budget:])
            budget -= len(seg.text)
        kept.insert(0, seg)
    return head + kept + list(segments[first:])


def encode_rows(
    rows: Sequence[records.Row],
    template,
    tok: tokenize.SegmentTokenizer,
    *,
    config: ml_collections.ConfigDict,
    report: DataReport,
) -> list[Example]:
    """encode_indexed's examples."""
    return encode_indexed(rows, template, tok, config=config, report=report)[1]


def encode_indexed(
    rows: Sequence[records.Row],
    template,
    tok: tokenize.SegmentTokenizer,
    *,
    config: ml_collections.ConfigDict,
    report: DataReport,
) -> tuple[list[int], list[Example]]:
    """Rows → (indices of the rows kept, their fitted, shifted examples); the length policy's
    outcomes are counted in report.

    Uses config.seq_len, .overlong and .train_on; `template` comes from make_template. A row
    whose characters alone prove it over-long is never tokenized whole: dropped, its prompt cut
    (truncate_prompt) or its history cut (truncate_history) first, so a 50 MB line costs
    milliseconds. Only rows that are tokenized whole have their lengths recorded (report.lengths).
    """
    if config.overlong not in tokenize.OVERLONG_POLICIES:
        raise ValueError(
            f"overlong must be one of {tokenize.OVERLONG_POLICIES}, got {config.overlong!r}"
        )
    limit = config.seq_len + 1  # ids, before the shift
    todo: list[tuple[int, list[Segment]]] = []
    by_history: list[int] = []
    for i, row in enumerate(rows):
        segments = template.segments(row)
        if not tokenize.surely_longer(segments, tok, limit, framed=template.framed):
            todo.append((i, segments))
        elif config.overlong == "truncate_prompt":
            cut = _cut_prompt(segments, tok, config.seq_len, template.framed)
            if cut is None:
                report.overlong_dropped += 1
            else:
                todo.append((i, cut))
        elif config.overlong == "truncate_history":
            by_history.append(i)
        else:
            report.overlong_dropped += 1
    encoded, merged = _encode([s for _, s in todo], template, tok, config.train_on)
    merged_rows = {todo[m][0] for m in merged}  # counted where the example is kept
    fitted_by_row: dict[int, Encoded] = {}
    for (i, _), example in zip(todo, encoded, strict=True):
        trained = int(example.trainable.sum())
        report.lengths.append((rows[i].source, len(example.ids) - trained, trained))
        fitted = tokenize.fit_length(example, config.seq_len, config.overlong)
        if fitted is None and config.overlong == "truncate_history":
            by_history.append(i)
            continue
        if fitted is None:
            report.overlong_dropped += 1
            continue
        report.prompt_truncated += int(
            fitted is not example and config.overlong == "truncate_prompt"
        )
        _count_merges(report, [rows[i].source] if i in merged_rows else [])
        fitted_by_row[i] = fitted
    for i in sorted(by_history):
        fitted = _truncate_history(rows[i], template, tok, config, report)
        if fitted is None:
            report.overlong_dropped += 1
        else:
            fitted_by_row[i] = fitted
    kept = sorted(fitted_by_row)
    return kept, [tokenize.to_example(fitted_by_row[i]) for i in kept]


def overlong_rows(
    config: ml_collections.ConfigDict, tok: tokenize.SegmentTokenizer, template
) -> Callable[[records.Row], bool]:
    """Whether the length policy certainly drops a row, judged from its characters alone.

    read_splits takes such rows out before grouping, so a 50 MB line never reaches the
    near-duplicate pass or the tokenizer. Only rows with more characters than seq_len + 1
    tokens could cover are rendered (with `template`, from make_template) to check; a row that
    might fit is always kept.
    """
    if tok.max_token_chars is None:
        return lambda row: False
    limit = config.seq_len + 1
    framed = template.framed

    def dropped(row: records.Row) -> bool:
        turns = row.conversation()
        if sum(len(text) for _, text in turns) <= limit * tok.max_token_chars:
            return False
        segments = template.segments(row)
        if not tokenize.surely_longer(segments, tok, limit, framed=framed):
            return False
        if config.overlong == "truncate_prompt":
            return _cut_prompt(segments, tok, config.seq_len, framed) is None
        if config.overlong == "truncate_history":  # the last exchange, and a system turn
            exchanges = (len(turns) - (turns[0][0] == "system")) // 2
            last = _without_history(row, exchanges - 1) if exchanges > 1 else row
            return last is None or tokenize.surely_longer(
                template.segments(last), tok, limit, framed=framed
            )
        return True

    return dropped


def sources(config: ml_collections.ConfigDict) -> list[mixture.Source]:
    """data.mixture's sources ([] without one: data.train_files is the only source)."""
    return mixture.parse(config.get("mixture"), config.format, config.get("mixture_unit", "tokens"))


def read_splits(
    config: ml_collections.ConfigDict, dropped: Callable[[records.Row], bool] | None = None
) -> tuple[list[records.Row], list[records.Row], DataReport]:
    """Read and validate the files, then split by groups or apply the leakage policy.

    dropped (overlong_rows): rows taken out first, counted as over-long and dropped.
    Raises BadRowsError (bad_rows="fail") or groups.LeakageError (leakage="fail").
    """
    if config.leakage not in groups.LEAKAGE_POLICIES:
        raise ValueError(f"data.leakage {config.leakage!r} is not one of {groups.LEAKAGE_POLICIES}")
    too_long = 0

    def read(files: str, row_format=None) -> tuple[list[records.Row], records.RecordReport]:
        nonlocal too_long
        rows, counts = _read(files, config, row_format)
        kept = [r for r in rows if dropped is None or not dropped(r)]
        too_long += len(rows) - len(kept)
        return kept, counts

    mix = sources(config)
    if mix and config.validation_files:
        raise mixture.MixtureError(
            "data.validation_files does not go with data.mixture: each source's held-out rows "
            "come from data.validation_fraction; leave data.validation_files empty"
        )
    if mix:
        parts = [read(source.files, source.format) for source in mix]
        train_rows = [row for rows, _ in parts for row in rows]
        train_report = records.merge_reports([counts for _, counts in parts])
    else:
        train_rows, train_report = read(config.train_files)
    if config.validation_files:
        validation_rows, validation_report = read(config.validation_files)
        start = time.perf_counter()
        report = DataReport(train_report, validation_report, leakage=config.leakage)
        report.leaks, grouping = groups.find_leaks(train_rows, validation_rows)
        report.clusters = groups.largest_clusters([*train_rows, *validation_rows], grouping)
        if report.leaks and config.leakage == "fail":
            raise groups.LeakageError(report.leaks, len(validation_rows))
        if report.leaks and config.leakage == "drop":
            leaked = {leak.validation for leak in report.leaks}
            validation_rows = [r for r in validation_rows if r.source not in leaked]
        if report.leaks:
            log.warning("%d validation rows leak into training", len(report.leaks))
    else:
        start = time.perf_counter()
        report = DataReport(train_report, None)
        report.source_records = [counts for _, counts in parts] if mix else []
        grouping = groups.group_rows(train_rows)
        held, report.split = groups.split(
            train_rows, config.validation_fraction, config.shuffle_seed, grouping
        )
        report.clusters = groups.largest_clusters(train_rows, grouping)
        validation_rows = [r for r, h in zip(train_rows, held, strict=True) if h]
        train_rows = [r for r, h in zip(train_rows, held, strict=True) if not h]
    report.grouping_seconds = time.perf_counter() - start
    report.overlong_dropped += too_long
    return train_rows, validation_rows, report


def encode_splits(
    config: ml_collections.ConfigDict,
    tok: tokenize.SegmentTokenizer,
    template,
    train_rows: Sequence[records.Row],
    validation_rows: Sequence[records.Row],
    report: DataReport,
) -> tuple[list[Example], list[Example]]:
    """Encode both sides with `template` (make_template) and the length policy (counted in
    report)."""
    train = encode_rows(train_rows, template, tok, config=config, report=report)
    validation = encode_rows(validation_rows, template, tok, config=config, report=report)
    if not train:
        raise no_examples_error(config, report, len(train_rows))
    report.train_examples, report.validation_examples = len(train), len(validation)
    return train, validation


def no_examples_error(
    config: ml_collections.ConfigDict, report: DataReport, train_rows: int
) -> records.DataError:
    """The one-line refusal when every training row was dropped, with the counts of why."""
    counts = report.train_records
    where = config.get("mixture") or config.train_files
    return records.DataError(
        f"no training examples left from {where!r}: {counts.rows_read} rows "
        f"read, {counts.bad_rows} bad, {counts.duplicates} duplicates, {train_rows} kept "
        f"for training, {report.overlong_dropped} longer than data.seq_len={config.seq_len} "
        "dropped; run python -m sftjax.data.report for details"
    )


def load_splits(
    config: ml_collections.ConfigDict, tok: tokenize.SegmentTokenizer, template=None
) -> tuple[list[Example], list[Example], DataReport]:
    """Read, validate, split and encode the data section's files (read_splits says what raises).

    template: make_template(config, tok) when not given; a caller that needs the template
    afterwards (the trainer: eval prompts, export, the run's record) makes it once and passes
    it, so the data.chat_template file is read, and its probe warns, once per run.
    """
    template = make_template(config, tok) if template is None else template
    train_rows, validation_rows, report = read_splits(config, overlong_rows(config, tok, template))
    train, validation = encode_splits(config, tok, template, train_rows, validation_rows, report)
    return train, validation, report
