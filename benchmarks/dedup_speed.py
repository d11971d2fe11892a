"""Start-up cost of the grouped split: normalise + near-duplicate pass + split, in seconds.

Run: python benchmarks/dedup_speed.py [--rows 100000]
Prints one JSON line per result. Results:
- `alpaca`: the shared Alpaca files (3,016 rows). Baselines in the same run: reading and
  validating the rows (`read_s`, `ratio_vs_read` = grouping / reading) and encoding them with
  the Llama-2 tokenizer (`encode_s`, `share_of_startup` = grouping / (read + group + encode)).
- `synthetic`: `--rows` instruction rows built like real data (Zipf-distributed words, 8-80 words
  each; 5 % behind one of 5 shared 40-word preambles; 5 % near-duplicates one word edit away,
  2 % restyled copies), written to a JSONL file and read back. Baseline: the same reading and
  validation in the same run. Peak RSS is the process's high-water mark after the pass (the
  baseline's peak before it is reported too).
"""

import argparse
import json
import pathlib
import random
import resource
import string
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import base  # noqa: E402
from sftjax.data import dedup, groups, records, templates, tokenize  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared/data"


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    vocab = sorted(
        {"".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(50_000)}
    )
    weights = [1 / (r + 20) for r in range(len(vocab))]
    cum = list(__import__("itertools").accumulate(weights))

    def words(k: int) -> list[str]:
        return rng.choices(vocab, cum_weights=cum, k=k)

    preambles = [" ".join(words(40)) for _ in range(5)]
    rows: list[dict] = []
    while len(rows) < n:
        r = rng.random()
        text = words(rng.randint(8, 80))
        if r < 0.05 and rows:  # near-duplicate of an earlier row: one word substituted
            prior = rows[rng.randrange(len(rows))]["instruction"].split()
            prior[rng.randrange(len(prior))] = rng.choice(vocab)
            text = prior
        elif r < 0.07 and rows:  # restyled copy of an earlier instruction
            text = rows[rng.randrange(len(rows))]["instruction"].upper().split()
        elif r < 0.12:
            text = [rng.choice(preambles), *text[:20]]
        rows.append({"instruction": " ".join(text), "output": " ".join(words(30))})
    return rows


def _time_pass(config, tokenizer: str = "") -> dict:
    start = time.perf_counter()
    rows, report = records.read_records(config.train_files, bad_rows="skip")
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    for row in rows:  # what read_records now spends on normalised duplicate keys
        row.content_key()
    key_s = time.perf_counter() - start
    peak_before = _peak_mib()
    start = time.perf_counter()
    grouping = groups.group_rows(rows)
    held, split = groups.split(rows, config.validation_fraction, config.shuffle_seed, grouping)
    group_s = time.perf_counter() - start
    peak_after = _peak_mib()
    encode = {}
    if tokenizer:
        tok = tokenize.load_tokenizer(tokenizer)
        start = time.perf_counter()
        tokenize.encode_many([templates.alpaca(r) for r in rows], tok)
        encode_s = time.perf_counter() - start
        share = group_s / (read_s + group_s + encode_s)
        encode = {"encode_s": round(encode_s, 3), "share_of_startup": round(share, 3)}
    return {
        "rows": len(rows),
        "duplicates_dropped": report.duplicates,
        "distinct_prompts": len(grouping.prompts),
        "near_duplicate_pairs": len(grouping.near.pairs),
        "multi_row_groups": split.multi_row_groups,
        "validation_fraction": round(split.realised, 4),
        "read_s": round(read_s, 3),
        "normalised_keys_s": round(key_s, 3),
        "grouping_s": round(group_s, 3),
        "ratio_vs_read": round(group_s / read_s, 3),
        **encode,
        "peak_rss_mib_before": round(peak_before),
        "peak_rss_mib_after": round(peak_after),
        "threshold": dedup.THRESHOLD,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--skip_alpaca", action="store_true")
    args = parser.parse_args()
    config = base.get_config().data
    if not args.skip_alpaca:
        config.train_files = str(SHARED / "alpaca/*.json")
        tokenizer = str(SHARED / "llama2_tokenizer")
        print(json.dumps({"result": "alpaca", **_time_pass(config, tokenizer)}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "rows.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in _synthetic_rows(args.rows)))
        config.train_files = str(path)
        print(json.dumps({"result": "synthetic", **_time_pass(config)}), flush=True)


if __name__ == "__main__":
    main()
