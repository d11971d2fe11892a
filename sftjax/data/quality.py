"""Data-quality figures for the data report: task mix, degenerate responses, a length histogram.

Owns: what counts as a task type (the leading word of the instruction), as an empty response
(no letter or digit), a one-token response, and a response that repeats its instruction; and
drawing the response-length histogram as a PNG (matplotlib, no display needed).
Does not own: reading, splitting or encoding (pipeline.py), formatting the report (report.py).
"""

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from sftjax.data import dedup, groups, records

MIN_REPEATED_WORDS = 3  # shorter instructions ("Add") occur inside answers by chance


def instruction_text(row: records.Row) -> str:
    """The instruction proper: the `instruction` field, or the last user turn of a chat."""
    if row.messages:
        return next(content for role, content in reversed(row.messages) if role == "user")
    return row.instruction


def task_mix(rows: Sequence[records.Row], top: int = 10) -> list[tuple[str, int]]:
    """The most common leading words of instructions ("write", "what", …) with their counts."""
    leading = collections.Counter(
        (dedup.normalize(instruction_text(r)).split() or [""])[0] for r in rows
    )
    return leading.most_common(top)


@dataclasses.dataclass(frozen=True)
class ResponseFlags:
    """Counts of degenerate responses among `rows` rows."""

    rows: int
    empty: int  # no letter or digit ("...", "-"); fully blank rows are bad rows already
    one_token: int  # trained part is one token + </s>
    repeats_instruction: int  # the normalised response contains the whole instruction

    def summary(self) -> str:
        """One line with counts and shares."""

        def share(n: int) -> str:
            return f"{n} ({100 * n / max(1, self.rows):.1f} %)"

        return (
            f"responses ({self.rows}): empty {share(self.empty)}, one token "
            f"{share(self.one_token)}, containing the whole instruction "
            f"{share(self.repeats_instruction)}"
        )


def response_flags(
    rows: Sequence[records.Row], lengths: Sequence[tuple[str, int, int]]
) -> ResponseFlags:
    """Flag each row; lengths (DataReport.lengths) holds (source, prompt, trained) of the rows
    tokenized whole, </s> in the trained count. A row without one (over-long from its
    characters alone) can't be a one-token response."""
    trained_by_source = {source: trained for source, _, trained in lengths}
    empty = one_token = repeats = 0
    for row in rows:
        response = dedup.normalize(groups.response_text(row))
        instruction = dedup.normalize(instruction_text(row))
        empty += not response
        one_token += trained_by_source.get(row.source) == 2
        long_enough = len(instruction.split()) >= MIN_REPEATED_WORDS
        repeats += long_enough and f" {instruction} " in f" {response} "
    return ResponseFlags(len(rows), empty, one_token, repeats)


def write_histogram(lengths: Sequence[int], path: str, seq_len: int) -> None:
    """Histogram of response lengths in tokens (log count axis), seq_len marked when in range."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training hosts
    from matplotlib import pyplot as plt

    values = np.asarray(lengths)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.hist(values, bins=min(60, max(1, len(np.unique(values)))), color="tab:blue")
    if values.size and values.max() >= 0.8 * seq_len:
        ax.axvline(seq_len, color="tab:red", linestyle="--", label=f"seq_len {seq_len}")
        ax.legend()
    ax.set_yscale("log")
    ax.set_xlabel("response tokens (trained, incl. </s>)")
    ax.set_ylabel("examples")
    ax.set_title(f"response lengths, {values.size} examples")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
