"""`python -m sftjax.data.report --config=configs/base.py --config.data.train_files=…`

Owns: the data report a person reads before training: rows read and their format, bad rows by
reason (with the first problems at file:line), duplicates dropped, the template and which turns
are trained, over-long examples (dropped, prompt truncated, history truncated and turns cut),
prompt/response length percentiles, packing efficiency and examples per packed row, and three
rendered examples with the trained part marked ⟦like this⟧ (rendered from the token ids and
loss mask themselves). Exits 1 when the config's bad_rows policy is "fail" and there are bad
rows, as training would; 2 when the chat template can't give exact masks.
Does not own: any of the computations (records, tokenize and pipeline do them).
"""

import sys
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import app
from ml_collections import config_flags

from sftjax.data import chat_templates, pipeline, tokenize

_CONFIG = config_flags.DEFINE_config_file("config", help_string="config file, e.g. configs/base.py")

PERCENTILES = (50, 90, 99, 100)
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


def build_report(
    data: ml_collections.ConfigDict, tok: tokenize.SegmentTokenizer
) -> tuple[str, pipeline.DataReport]:
    """Read everything (bad rows skipped so all are counted) and format the report."""
    skipping = ml_collections.ConfigDict(data.to_dict())
    skipping.bad_rows = "skip"
    train, validation, report = pipeline.load_splits(skipping, tok)
    efficiency, per_row = pipeline.packing_stats(
        train, seq_len=data.seq_len, seed=data.shuffle_seed, num_bins=data.packing_bins
    )
    over = report.overlong_dropped + report.prompt_truncated + report.history_truncated
    lines = [
        report.summary(),
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
    for i, example in enumerate(train[:3]):
        lines += [
            f"--- example {i} (trained part in {TRAINED_OPEN} {TRAINED_CLOSE})",
            render_example(example, tok),
        ]
    return "\n".join(lines), report


def main(argv: Sequence[str]) -> None:
    """Print the report; exit 1 where training would refuse the data."""
    del argv
    data = _CONFIG.value.data
    try:
        text, report = build_report(data, tokenize.load_tokenizer(data.tokenizer))
    except chat_templates.TemplateError as e:  # a template without exact masks: refuse
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(text)
    bad = report.train_records.bad_rows
    bad += report.validation_records.bad_rows if report.validation_records else 0
    if data.bad_rows == "fail" and bad:
        print(f"bad_rows='fail' and {bad} bad row(s): training would stop here", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
