"""`python -m sftjax.data.report --config=configs/base.py --config.data.train_files=…`

Owns: the data report a person reads before training: rows read and their format, bad rows by
reason (with the first problems at file:line), duplicates dropped, the grouped split or the
leakage between training and validation files (pairs at file:line), the largest groups of equal
or near-duplicate prompts, the task mix, empty / one-token / instruction-repeating responses, the
template and which turns are trained, over-long examples (dropped, prompt truncated, history
truncated and turns cut), examples whose segment boundaries merge when encoded whole (counted,
the first at file:line), prompt/response length percentiles, a response-length histogram (PNG
at --histogram), packing efficiency and examples per packed row, and three rendered examples
with the trained part marked ⟦like this⟧ (rendered from the token ids and loss mask themselves).
Exits 0 when training would take the data (bad rows under bad_rows="skip" are counted, not a
failure); 2, the code training exits with on the same data, when it would refuse it: bad rows
under bad_rows="fail", leaks under leakage="fail" (the full report is printed first, then one
line saying why), and with one message when a data.* key is out of range or the data cannot be
read at all (no file, empty file, no rows left) or the chat template cannot give exact masks.
Not 1: that is the code of a crash, which a script must be able to tell apart from a verdict.
Does not own: any of the computations (records, groups, quality, tokenize and pipeline do them).
"""

import sys
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from sftjax import cli
from sftjax import config as config_lib
from sftjax.data import batches, flat, pipeline, quality, tokenize

_CONFIG = config_flags.DEFINE_config_file("config", help_string="config file, e.g. configs/base.py")
_HISTOGRAM = flags.DEFINE_string(
    "histogram", "response_lengths.png", "Where to write the response-length histogram (PNG)."
)

PERCENTILES = (50, 90, 99, 100)
CLUSTER_MEMBERS = 6  # file:line quoted per group
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


def render_example(example: tokenize.Example, tok: tokenize.SegmentTokenizer) -> str:
    """The example's text with every trained span wrapped in ⟦ ⟧, decoded from its ids and mask."""
    ids = np.r_[example.tokens[:1], example.targets]
    trained = np.r_[0, example.loss_mask]
    out, start = [], 0
    for end in [*np.flatnonzero(np.diff(trained)) + 1, len(ids)]:
        text = tok.decode(ids[start:end])
        out.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained[start] else text)
        start = end
    return "".join(out)


def _percentiles(name: str, values: Sequence[int]) -> str:
    if not values:
        return f"{name} tokens: none"
    cells = ", ".join(f"p{p} {int(np.percentile(values, p))}" for p in PERCENTILES)
    return f"{name} tokens: {cells}, mean {np.mean(values):.1f}"


def _clusters(clusters: list[list[str]]) -> list[str]:
    if not clusters:
        return ["largest groups of equal or near-duplicate prompts: none (every prompt unique)"]
    lines = ["largest groups of equal or near-duplicate prompts (rows: file:line):"]
    for members in clusters:
        more = (
            f", … {len(members) - CLUSTER_MEMBERS} more" if len(members) > CLUSTER_MEMBERS else ""
        )
        lines.append(f"  {len(members)}: {', '.join(members[:CLUSTER_MEMBERS])}{more}")
    return lines


def build_report(
    data: ml_collections.ConfigDict, tok: tokenize.SegmentTokenizer, histogram: str = ""
) -> tuple[str, pipeline.DataReport]:
    """Read everything (bad rows skipped, leaks kept, so all are counted) and format the report.

    With histogram, the response-length histogram is written there as a PNG.
    """
    counting = ml_collections.ConfigDict(data.to_dict())
    counting.bad_rows = "skip"
    counting.leakage = "warn"
    template = pipeline.make_template(counting, tok)
    dropped = pipeline.overlong_rows(counting, tok, template)
    train_rows, validation_rows, report = pipeline.read_splits(counting, dropped)
    train, _ = pipeline.encode_splits(counting, tok, template, train_rows, validation_rows, report)
    rows = [*train_rows, *validation_rows]
    efficiency, per_row = batches.packing_stats(
        flat.from_examples(train),
        seq_len=data.seq_len,
        seed=data.shuffle_seed,
        num_bins=data.packing_bins,
    )
    over = report.overlong_dropped + report.prompt_truncated + report.history_truncated
    mix = quality.task_mix(rows)
    lines = [
        report.summary(),
        f"grouping (normalise + near-duplicate pass): {report.grouping_seconds:.2f} s",
        *_clusters(report.clusters),
        "task mix (leading word of the instruction): "
        + ", ".join(f"{word or '(none)'} {100 * n / len(rows):.1f} %" for word, n in mix),
        quality.response_flags(rows, report.lengths).summary(),
        f"template {data.template!r}, training on {data.train_on.replace('_', ' ')}",
        f"over-long examples (> seq_len {data.seq_len} tokens): {over} "
        f"(policy {data.overlong!r}: dropped {report.overlong_dropped}, "
        f"prompt truncated {report.prompt_truncated}, history truncated "
        f"{report.history_truncated} with {report.turns_cut} turns cut)",
        _percentiles("prompt", report.prompt_lengths),
        _percentiles("response", report.response_lengths),
        f"packing at seq_len {data.seq_len}, {data.packing_bins} bins: efficiency "
        f"{efficiency:.4f} (real tokens / all tokens), {per_row:.2f} examples per row",
    ]
    if histogram:
        quality.write_histogram(report.response_lengths, histogram, data.seq_len)
        lines.append(f"response-length histogram: {histogram}")
    for i, example in enumerate(train[:3]):
        lines += [
            f"--- example {i} (trained part in {TRAINED_OPEN} {TRAINED_CLOSE})",
            render_example(example, tok),
        ]
    return "\n".join(lines), report


def main(argv: Sequence[str]) -> None:
    """Print the report; exit 2 where training would refuse the data."""
    del argv
    cli.setup_logging()
    config_lib.validate_keys(_CONFIG.value, "data")
    data = _CONFIG.value.data
    text, report = build_report(data, tokenize.load_tokenizer(data.tokenizer), _HISTOGRAM.value)
    print(text)
    bad = report.train_records.bad_rows
    bad += report.validation_records.bad_rows if report.validation_records else 0
    refusals = []
    if data.bad_rows == "fail" and bad:
        refusals.append(f"bad_rows='fail' and {bad} bad row(s)")
    if data.leakage == "fail" and report.leaks:
        refusals.append(f"leakage='fail' and {len(report.leaks)} leaking validation row(s)")
    if refusals:
        print("; ".join(refusals) + ": training would stop here", file=sys.stderr)
        sys.exit(cli.USER_ERROR_EXIT)


if __name__ == "__main__":
    cli.run(main)
