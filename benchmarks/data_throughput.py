"""Data pipeline throughput on the shared Alpaca files: packed tokens/s vs a pad-to-max baseline.

Run: python benchmarks/data_throughput.py [--seq_len 2048 --batch_size 8 --epochs 3]
Prints one JSON line per result. The bar: a 7B step on 8 chips consumes ~25k tokens/s per host,
so the pipeline must deliver well above that on this 2-core machine. Baseline, measured in the
same run: the same examples unpacked (one example per row, padded to seq_len: the seed recipe).
"""

import argparse
import json
import pathlib
import time

from configs import base
from sftjax.data import batches, flat, pipeline, records, templates, tokenize

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared/data"
NEEDED_PER_HOST = 25_000  # tokens/s of a 7B train step on 8 chips


def _drain(examples, *, pack: bool, args) -> tuple[float, int, int]:
    """(seconds, real tokens, all tokens) to plan and draw every batch of `args.epochs` epochs."""
    start = time.perf_counter()
    it = batches.train_batches(
        flat.from_examples(examples),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=0,
        num_epochs=args.epochs,
        process_index=0,
        process_count=1,
        pack=pack,
    )
    real, total = 0, 0
    for batch in it:
        real += int((batch["segment_ids"] > 0).sum())
        total += batch["tokens"].size
    return time.perf_counter() - start, real, total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    tok = tokenize.load_tokenizer(str(SHARED / "llama2_tokenizer"))
    config = base.get_config().data
    config.update(
        train_files=str(SHARED / "alpaca/*.json"),
        bad_rows="skip",
        seq_len=args.seq_len,
        validation_fraction=0.0,
    )

    rows, _ = records.read_records(config.train_files, bad_rows="skip")
    start = time.perf_counter()
    encoded = tokenize.encode_many([templates.alpaca(r) for r in rows], tok)
    encode_s = time.perf_counter() - start
    encode_tokens = sum(len(e.ids) for e in encoded)
    print(
        json.dumps(
            {
                "name": "encode (template + segment tokenization)",
                "rows": len(rows),
                "tokens": encode_tokens,
                "tokens_per_s": round(encode_tokens / encode_s),
            }
        )
    )

    train, _, _ = pipeline.load_splits(config, tok)
    results, shares = {}, {}
    for pack in (False, True):
        seconds, real, total = _drain(train, pack=pack, args=args)
        results[pack], shares[pack] = real / seconds, real / total
        print(
            json.dumps(
                {
                    "name": "packed batches" if pack else "baseline: unpacked, padded to seq_len",
                    "seq_len": args.seq_len,
                    "batch_size": args.batch_size,
                    "epochs": args.epochs,
                    "real_tokens_per_s": round(real / seconds),
                    "all_tokens_per_s": round(total / seconds),
                    "real_share": round(real / total, 4),
                }
            )
        )
    # End to end for one epoch on one host: encode every row once, then pack and batch.
    per_epoch_real = sum(len(e) for e in train)
    batch_s = per_epoch_real / results[True]
    end_to_end = per_epoch_real / (encode_s + batch_s)
    print(
        json.dumps(
            {
                "name": "pipeline, real tokens/s (encode + pack + batch, 1 epoch)",
                "tokens_per_s": round(end_to_end),
                "needed_per_host": NEEDED_PER_HOST,
                "headroom": round(end_to_end / NEEDED_PER_HOST, 1),
                "baseline_real_tokens_per_s": round(results[False]),
                "ratio_packed_vs_baseline": round(results[True] / results[False], 2),
                "real_tokens_per_train_step_ratio": round(shares[True] / shares[False], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
