"""pipeline.py + batches.py: packing == unpacked, exact resume, disjoint shards, full validation."""

import collections
import json

import numpy as np
import pytest
from conftest import shared_path

from configs import base
from sftjax.data import batches, flat, pipeline, records, tokenize
from sftjax.data.tokenize import Encoded, Example


def _examples(n: int, seed: int = 0, max_len: int = 60) -> list[Example]:
    """Examples with unique first tokens (so each can be recognised inside a packed row)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(3, max_len))
        ids = np.r_[1, 1000 + i, rng.integers(3, 999, length - 2)].astype(np.int32)
        prompt = int(rng.integers(2, length))
        trainable = np.r_[np.zeros(prompt), np.ones(length - prompt)].astype(np.int32)
        out.append(tokenize.to_example(Encoded(ids, trainable)))
    return out


def _segments(batch: batches.Batch):
    """(example id, tokens, targets, loss_mask, positions) for every packed segment."""
    for r in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][r]
        assert (batch["loss_mask"][r][seg == 0] == 0).all()
        assert all((batch[k][r][seg == 0] == 0).all() for k in batches.KEYS)
        ids = [s for s in np.unique(seg) if s]
        assert ids == list(range(1, len(ids) + 1))  # 1, 2, … in each row
        for s in ids:
            cols = seg == s
            yield (
                int(batch["tokens"][r][cols][1]) - 1000,
                *(batch[k][r][cols] for k in ("tokens", "targets", "loss_mask", "positions")),
            )


def _train(examples, **kw):
    args = dict(batch_size=4, seq_len=128, seed=3, num_epochs=2, process_index=0, process_count=1)
    return batches.train_dataset(flat.from_examples(examples), **{**args, **kw})


@pytest.mark.parametrize("pack", [True, False])
def test_batches_equal_the_examples_each_once_per_epoch(pack):
    examples = _examples(101)
    dataset = _train(examples, pack=pack)
    seen = collections.Counter()
    for batch in dataset:
        assert set(batch) == set(batches.KEYS)
        assert all(v.shape == (4, 128) and v.dtype == np.int32 for v in batch.values())
        for i, tokens, targets, loss_mask, positions in _segments(batch):
            e = examples[i]
            np.testing.assert_array_equal(tokens, e.tokens)
            np.testing.assert_array_equal(targets, e.targets)
            np.testing.assert_array_equal(loss_mask, e.loss_mask)
            np.testing.assert_array_equal(positions, np.arange(len(e)))
            seen[i] += 1
    assert seen == {i: 2 for i in range(101)}
    if not pack:
        assert len(dataset) == 51  # 202 rows / 4, last batch padded with empty rows


def test_shuffle_is_seeded_and_differs_per_epoch():
    examples = _examples(50)

    def order(**kw):
        return [i for b in _train(examples, **kw) for i, *_ in _segments(b)]

    assert order(seed=3) == order(seed=3)
    assert order(seed=3) != order(seed=4)
    epochs = order(pack=False)
    assert epochs[:50] != epochs[50:] and sorted(epochs[:50]) == sorted(epochs[50:])


def test_resume_from_saved_state_gives_the_same_batches():
    examples = _examples(300)
    kw = dict(batch_size=4, seq_len=128, seed=0, num_epochs=2, process_index=0, process_count=1)
    it = batches.train_batches(flat.from_examples(examples), **kw)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    after = [next(it) for _ in range(5)]
    resumed = batches.train_batches(flat.from_examples(examples), **kw)
    resumed.set_state(state)
    for a, b in zip(after, [next(resumed) for _ in range(5)], strict=True):
        for k in batches.KEYS:
            np.testing.assert_array_equal(a[k], b[k])


def test_two_processes_get_disjoint_shards_that_cover_the_global_batch():
    examples = _examples(120)
    whole = _train(examples, batch_size=8, process_count=1)
    shards = [_train(examples, batch_size=8, process_index=p, process_count=2) for p in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for b in range(len(whole)):
        for k in batches.KEYS:
            joined = np.concatenate([shards[0][b][k], shards[1][b][k]])
            np.testing.assert_array_equal(joined, whole[b][k])
    ids = [[i for b in s for i, *_ in _segments(b)] for s in shards]
    assert collections.Counter(ids[0] + ids[1]) == {i: 2 for i in range(120)}


@pytest.mark.parametrize("pack", [True, False])
def test_validation_covers_every_example_once_on_every_process(pack):
    examples = _examples(37)
    kw = dict(batch_size=6, seq_len=128, process_count=2, pack=pack)
    shards = [
        batches.validation_batches(flat.from_examples(examples), process_index=p, **kw)
        for p in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) >= 1
    ids = [i for s in shards for b in s for i, *_ in _segments(b)]
    assert sorted(ids) == list(range(37))
    last = shards[1][len(shards[1]) - 1]
    if not pack:  # 37 rows in batches of 6: the last global batch has one real row
        assert last["loss_mask"].sum() == 0 and shards[0][len(shards[0]) - 1]["loss_mask"][0].sum()
    assert [i for b in shards[0] for i, *_ in _segments(b)] == [
        i for b in shards[0] for i, *_ in _segments(b)
    ]  # re-iterable, same every evaluation


@pytest.fixture(scope="module")
def tok():
    return tokenize.load_tokenizer(str(shared_path("llama2_tokenizer")))


def _config(**overrides):
    data = base.get_config().data
    data.update(overrides)
    return data


def test_alpaca_packing_efficiency_at_2048(tok):
    alpaca = shared_path("alpaca")
    config = _config(train_files=f"{alpaca}/*.json", tokenizer="", bad_rows="skip")
    train, validation, report = pipeline.load_splits(config, tok)
    assert report.train_records.bad_by_reason == {"empty field": 2}
    assert report.train_records.duplicates == 14
    assert len(train) + len(validation) == 3000 and len(validation) == 150  # 5 %, whole groups
    efficiency, per_row = batches.packing_stats(flat.from_examples(train), seq_len=2048)
    one_epoch = batches.train_dataset(
        flat.from_examples(train),
        batch_size=8,
        seq_len=2048,
        seed=0,
        num_epochs=1,
        process_index=0,
        process_count=1,
    )
    real = sum(int((b["segment_ids"] > 0).sum()) for b in one_epoch)
    batched = real / (len(one_epoch) * 8 * 2048)
    print(
        f"packing efficiency at 2048: rows {efficiency:.4f} ({per_row:.1f} examples/row), "
        f"batches incl. last-batch padding {batched:.4f}"
    )
    assert efficiency >= 0.95 and batched >= 0.95


def _bad_corpus(tmp_path):
    path = tmp_path / "rows.jsonl"
    good = [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(40)]
    path.write_text("\n".join([json.dumps(r) for r in good] + ["{oops", '{"instruction": "x"}']))
    return str(path)


def test_fail_stops_before_any_batch_and_skip_trains_on_the_rest(tmp_path, tok):
    config = _config(train_files=_bad_corpus(tmp_path), validation_fraction=0.0)
    with pytest.raises(records.BadRowsError, match="rows.jsonl:41: row: invalid JSON"):
        pipeline.load_splits(config, tok)
    config.bad_rows = "skip"
    train, validation, report = pipeline.load_splits(config, tok)
    assert (len(train), len(validation), report.train_records.bad_rows) == (40, 0, 2)
    drawn = list(
        batches.train_batches(
            flat.from_examples(train),
            batch_size=2,
            seq_len=64,
            seed=0,
            num_epochs=1,
            process_index=0,
            process_count=1,
        )
    )
    assert sum(len(list(_segments_any(b))) for b in drawn) == 40


def _segments_any(batch):
    for r in range(batch["segment_ids"].shape[0]):
        yield from (s for s in np.unique(batch["segment_ids"][r]) if s)


def test_validation_files_and_overlong_policies(tmp_path, tok):
    rows = [{"instruction": "word " * n, "response": "ok"} for n in (5, 150, 400)]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=1))
    config = _config(train_files=str(path), validation_files=str(path), seq_len=100)
    train, validation, report = pipeline.load_splits(config, tok)
    assert (len(train), len(validation), report.overlong_dropped) == (1, 1, 4)
    config.overlong = "truncate_prompt"
    train, _, report = pipeline.load_splits(config, tok)
    assert (len(train), report.prompt_truncated, report.overlong_dropped) == (3, 4, 0)
    assert max(len(e) for e in train) == 100
    assert all(e.tokens[0] == tok.bos_id and e.loss_mask.sum() == 2 for e in train)
