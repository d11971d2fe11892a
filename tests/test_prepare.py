"""Prepared data (prepare.py, flat.py, mixture.py): prepared == unprepared bit for bit, content
changes caught, mixture weights held, per-source validation loss, process 0 prepares."""

import json
import shutil
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
from chat_fixtures import CHATML
from train_fixtures import ROOT, config_with, demo_corpus

from sftjax import config as config_lib
from sftjax import loop, metrics, paths
from sftjax.data import batches, flat, mixture, pipeline, prepare, tokenize


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(alpaca file, chat file, tokenizer dir, vocab): two formats of distinct demo rows."""
    directory = tmp_path_factory.mktemp("corpus")
    train, val, tok_dir, vocab = demo_corpus(directory, n_train=240, n_val=80)
    chats = []
    for line in val.read_text().splitlines():
        row = json.loads(line)
        turns = [("user", row["instruction"]), ("assistant", row["response"])] * 2
        chats.append({"messages": [{"role": r, "content": c} for r, c in turns]})
    chat_file = directory / "chats.jsonl"
    chat_file.write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    return train, chat_file, tok_dir, vocab


@pytest.fixture(scope="module")
def tok(corpus):
    return tokenize.load_tokenizer(str(corpus[2]))


def data_config(corpus, **values):
    train, chats, tok_dir, _ = corpus
    defaults = {"train_files": str(train), "tokenizer": str(tok_dir), "seq_len": 96,
                "validation_fraction": 0.2}  # fmt: skip
    return config_with({f"data.{k}": v for k, v in {**defaults, **values}.items()}).data


CASES = {
    "plain": {},
    "chat": {"format": "messages", "template": "chat"},
    "mixed": {"train_files": "", "mixture": "{train}:3,{chats}:1"},
}


def _case(corpus, case):
    values = dict(CASES[case])
    if "mixture" in values:
        values["mixture"] = values["mixture"].format(train=corpus[0], chats=corpus[1])
    if case == "chat":
        values["train_files"] = str(corpus[1])
    return data_config(corpus, **values)


def _all_batches(split, mix, process_index, process_count):
    kw = dict(batch_size=4, seq_len=96, process_index=process_index, process_count=process_count)
    train = batches.train_dataset(split, seed=5, num_epochs=2, mix=mix, **kw)
    validation = batches.validation_batches(split, **kw)
    return [*train, *validation]


@pytest.mark.parametrize("case", CASES)
def test_prepared_batches_equal_unprepared_bit_for_bit(corpus, tok, tmp_path, case, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK_ROWS", 37)  # encoded in several chunks, as 1M rows are
    data = _case(corpus, case)
    manifest = prepare.prepare(data, tmp_path / "prepared", tok, progress=False)
    ready = prepare.open_prepared(paths.resolve(tmp_path / "prepared"), manifest)
    assert isinstance(ready.train.tokens, np.memmap)  # read from disk, not kept from preparing
    train, validation, _ = pipeline.load_splits(data, tok)  # the start before preparation
    assert (len(ready.train), len(ready.validation)) == (len(train), len(validation))
    mix = pipeline.sources(data)
    assert [s.name for s in ready.sources] == [s.name for s in mix]
    for stored, examples in ((ready.train, train), (ready.validation, validation)):
        memory = flat.from_examples(examples, stored.sources)
        for process_count in (1, 2):
            for p in range(process_count):
                got = _all_batches(stored, ready.sources, p, process_count)
                want = _all_batches(memory, mix, p, process_count)
                assert len(got) == len(want) > 0
                for a, b in zip(got, want, strict=True):
                    for key in batches.KEYS:
                        np.testing.assert_array_equal(a[key], b[key])
    if case == "mixed":  # each example is an encoding of a row of its own source
        template = pipeline.make_template(data, tok)
        for s, source in enumerate(mix):
            rows, _ = pipeline._read(source.files, data, source.format)
            report = pipeline.DataReport(None, None)
            dropped = pipeline.overlong_rows(data, tok, template)
            report.overlong_dropped = sum(map(dropped, rows))
            rows = [r for r in rows if not dropped(r)]
            own = pipeline.encode_rows(rows, template, tok, config=data, report=report)
            own_ids = {tuple(e.tokens) for e in own}
            stored = 0
            for split in (ready.train, ready.validation):
                ids = np.flatnonzero(split.sources == s)
                assert ids.size and all(tuple(split.example(i)["tokens"]) in own_ids for i in ids)
                stored += ids.size
            assert stored == len(own)  # every example of the source, once
            counted = manifest["sources"][s]
            assert counted["train_examples"] + counted["validation_examples"] == len(own)
            assert counted["train_tokens"] + counted["validation_tokens"] == sum(map(len, own))
            assert counted["dropped_overlong"] == report.overlong_dropped
        assert [s["rows_read"] for s in manifest["sources"]] == [240, 80]


def test_changed_content_under_a_prepared_dir_is_caught(corpus, tok, tmp_path):
    train = tmp_path / "train.jsonl"
    shutil.copy(corpus[0], train)
    tok_dir = tmp_path / "tokenizer"
    shutil.copytree(corpus[2], tok_dir)
    jinja = tmp_path / "chat.jinja"
    jinja.write_text(CHATML)
    data = data_config(corpus, train_files=str(train), tokenizer=str(tok_dir), template="tokenizer",
                       chat_template=str(jinja))  # fmt: skip
    template = pipeline.make_template(data, tok)
    prepare.prepare(data, tmp_path / "prepared", tok, template, progress=False)
    data.prepared = str(tmp_path / "prepared")
    workdir = paths.resolve(tmp_path / "run")
    ready, inputs = prepare.ensure(data, workdir, tok, template)
    assert ready.directory == paths.resolve(tmp_path / "prepared") and "data.tokenizer" in inputs

    # moved, same content: still the same data
    moved = tmp_path / "moved.jsonl"
    train.rename(moved)
    data.train_files = str(moved)
    prepare.ensure(data, workdir, tok, template)
    # no data files at all: the rows as prepared
    data.train_files = ""
    prepare.ensure(data, workdir, tok, template)
    moved.rename(train)
    data.train_files = str(train)

    lines = train.read_text().splitlines()
    edits = [
        (train, "\n".join(lines[::-1]) + "\n", "data.train_files: train.jsonl: same size, diff"),
        (train, "\n".join(lines[1:]) + "\n", "data.train_files: train.jsonl: [0-9]+ bytes .was"),
        (tok_dir / "tokenizer_config.json", None, "data.tokenizer: tokenizer_config.json"),
        (jinja, CHATML.replace("im_start", "im_begin"), "data.chat_template: chat.jinja"),
    ]
    for file, text, message in edits:
        before = file.read_text()
        file.write_text(text if text is not None else before.replace("}", ', "x": 1}', 1))
        fresh = pipeline.make_template(data, tok)
        with pytest.raises(config_lib.ConfigError, match=message):
            prepare.ensure(data, workdir, tok, fresh)
        file.write_text(before)
    with pytest.raises(config_lib.ConfigError, match="data.seq_len=64 .prepared with 96"):
        prepare.ensure(
            config_with({**_flat(data), "data.seq_len": 64}).data, workdir, tok, template
        )

    # WORKDIR/data: prepared once, reused, prepared again when a file changes
    data.prepared = ""
    first = prepare.ensure(data, workdir, tok, template)[0].manifest
    again = prepare.ensure(data, workdir, tok, template)[0].manifest
    assert again == first and (workdir / "data" / "manifest.json").exists()
    train.write_text("\n".join(lines[1:]) + "\n")
    changed = prepare.ensure(data, workdir, tok, template)[0]
    assert changed.manifest["fingerprint"] != first["fingerprint"]
    train_now, validation_now, _ = pipeline.load_splits(data, tok, template)
    assert (len(changed.train), len(changed.validation)) == (len(train_now), len(validation_now))
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["data"]  # no staging left over


def _flat(data) -> dict:
    return {f"data.{k}": v for k, v in data.to_dict().items()}


def test_other_processes_wait_for_process_0(corpus, tok, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "WAIT_SECONDS", 0.05)
    data = data_config(corpus)
    template = pipeline.make_template(data, tok)
    workdir = paths.resolve(tmp_path)
    found = {}
    waiter = threading.Thread(
        target=lambda: found.update(
            p1=prepare.ensure(data, workdir, tok, template, process_index=1)
        )
    )
    waiter.start()
    ready, _ = prepare.ensure(data, workdir, tok, template, process_index=0)
    waiter.join(timeout=60)
    other = found["p1"][0]
    assert other.manifest == ready.manifest
    np.testing.assert_array_equal(other.train.tokens, ready.train.tokens)


def _two_sources(n0=2000, n1=500):
    rng = np.random.default_rng(0)
    lengths = np.r_[rng.integers(20, 60, n0), rng.integers(100, 300, n1)]
    sources = np.r_[np.zeros(n0, np.int16), np.ones(n1, np.int16)]
    return lengths, sources


@pytest.mark.parametrize("unit", ["tokens", "rows"])
@pytest.mark.parametrize("weights", [(3, 1), (1, 4)])
def test_mixture_weights_hold_within_2_percent_each_epoch(unit, weights):
    lengths, sources = _two_sources()
    mix = mixture.parse(f"a.jsonl:{weights[0]},b.jsonl:{weights[1]}", "auto", unit)
    want = weights[0] / sum(weights)
    orders = []
    for epoch in range(3):
        order = mixture.epoch_order(7, epoch, sources, lengths, mix)
        measure = lengths[order] if unit == "tokens" else np.ones(len(order))
        share = measure[sources[order] == 0].sum() / measure.sum()
        assert abs(share / want - 1) <= 0.02, (epoch, share, want)
        total = lengths.sum() if unit == "tokens" else len(lengths)
        assert abs(measure.sum() / total - 1) <= 0.02  # an epoch is as large as both sources
        counts = np.bincount(order[sources[order] == 1], minlength=len(lengths))[sources == 1]
        assert counts.max() - counts.min() <= 1  # upsampled or not: drawn evenly, no favourites
        np.testing.assert_array_equal(order, mixture.epoch_order(7, epoch, sources, lengths, mix))
        orders.append(order)
    assert not np.array_equal(orders[0][:50], orders[1][:50])
    # the same shares in the packed plan the trainer iterates
    split = flat.Split(np.zeros(0), np.zeros(0), np.zeros(0), np.r_[0, np.cumsum(lengths)], sources)
    plan = batches.train_plan(split, seq_len=512, seed=7, num_epochs=1, mix=mix)
    measure = lengths[plan.examples] if unit == "tokens" else np.ones(len(plan.examples))
    share = measure[sources[plan.examples] == 0].sum() / measure.sum()
    assert abs(share / want - 1) <= 0.02


def test_mixture_spellings_and_mistakes():
    text = mixture.parse("data/alpaca/*.jsonl:3, gs://b/chats.jsonl:1.5", "auto", "tokens")
    spelled = mixture.parse(
        (dict(files="data/alpaca/*.jsonl", weight=3), dict(files="gs://b/chats.jsonl",
         weight=1.5, format="messages", unit="rows", name="chat")), "auto", "tokens",
    )  # fmt: skip
    assert [(s.name, s.weight, s.unit) for s in text] == [("alpaca", 3, "tokens"),
                                                          ("chats", 1.5, "tokens")]  # fmt: skip
    assert [(s.name, s.format, s.unit) for s in spelled][1] == ("chat", "messages", "rows")
    for bad, message in [
        ("a.jsonl", "has no weight"),
        ("a.jsonl:0", "must be a number > 0"),
        ("a.jsonl:x", "must be a number > 0"),
        ((dict(files="a", wieght=2),), "unknown key"),
        ((dict(files="a", unit="bytes"),), "unit 'bytes'"),
    ]:
        with pytest.raises(mixture.MixtureError, match=message):
            mixture.parse(bad, "auto", "tokens")


def _tensorboard_tags(directory) -> set[str]:
    """Scalar tags in tensorboardX event files (TFRecord framing: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for file in directory.rglob("events.out.tfevents.*"):
        data = file.read_bytes()
        while data:
            (length,) = struct.unpack("<Q", data[:8])
            event = event_pb2.Event.FromString(data[12 : 12 + length])
            tags |= {v.tag for v in event.summary.value}
            data = data[16 + length :]
    return tags


def test_fit_on_a_mixture_reports_validation_loss_per_source(corpus, tmp_path):
    train, chats, tok_dir, vocab = corpus
    config = config_with({
        "data.mixture": f"{train}:3,{chats}:1", "data.tokenizer": str(tok_dir),
        "data.seq_len": 128, "data.validation_fraction": 0.2, "model.preset": "tiny",
        "model.vocab_size": vocab, "model.dtype": "float32", "train.batch_size": 8,
        "train.num_steps": 4, "eval.every_steps": 2, "eval.batch_size": 8,
        "checkpoint.export_hf": False, "optim.warmup_ratio": 0.0,
    })  # fmt: skip
    loop.fit(config, tmp_path)
    evals = [r for r in metrics.read_records(tmp_path / "metrics.jsonl") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        per_source = [(r[f"loss/{n}"], r[f"loss_tokens/{n}"]) for n in ("train", "chats")]
        assert all(tokens > 0 for _, tokens in per_source)
        assert r["loss_tokens"] == sum(t for _, t in per_source)
        assert r["loss"] == pytest.approx(
            sum(loss * t for loss, t in per_source) / r["loss_tokens"]
        )
    tags = _tensorboard_tags(tmp_path / "tensorboard")
    assert {"eval/loss", "eval/loss/train", "eval/loss/chats"} <= tags
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert [s["weight"] for s in manifest["sources"]] == [3.0, 1.0]


def _prepare_cli(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sftjax.data.prepare", f"--config={ROOT / 'configs/base.py'}"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=ROOT)


def test_prepare_command_writes_a_dataset_and_refuses_mistakes_in_one_line(corpus, tmp_path):
    train, chats, tok_dir, _ = corpus
    data = [f"--config.data.mixture={train}:3,{chats}:1", f"--config.data.tokenizer={tok_dir}",
            "--config.data.seq_len=96", "--config.data.validation_fraction=0.2"]  # fmt: skip
    done = _prepare_cli(*data, f"--out={tmp_path / 'out'}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "source chats (" in done.stdout and "rows read 80," in done.stdout
    assert f"--config.data.prepared={tmp_path / 'out'}" in done.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused = _prepare_cli(*data, f"--out={tmp_path / 'mine'}")
    assert refused.returncode == 2 and "is not a prepared dataset" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_mixture_resumes_from_the_iterator_state_exactly():
    lengths, sources = _two_sources(300, 80)
    tokens = np.arange(lengths.sum(), dtype=np.int32) % 997
    offsets = np.r_[0, np.cumsum(lengths)]
    split = flat.Split(tokens, tokens, np.ones(len(tokens), np.uint8), offsets, sources)
    mix = mixture.parse("a.jsonl:1,b.jsonl:2", "auto", "tokens")
    kw = dict(batch_size=4, seq_len=512, seed=1, num_epochs=3, process_index=0, process_count=1)
    it = batches.train_batches(split, mix=mix, **kw)
    for _ in range(20):  # past the first epoch (about 15 batches)
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    after = [next(it) for _ in range(5)]
    resumed = batches.train_batches(split, mix=mix, **kw)
    resumed.set_state(state)
    for a, b in zip(after, [next(resumed) for _ in range(5)], strict=True):
        for key in batches.KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def test_new_mixture_weights_reuse_the_prepared_arrays_and_steer_the_draw(corpus, tok, tmp_path):
    data = _case(corpus, "mixed")
    template = pipeline.make_template(data, tok)
    workdir = paths.resolve(tmp_path)
    first = prepare.ensure(data, workdir, tok, template)[0]
    data.mixture = f"{corpus[0]}:1,{corpus[1]}:4"
    data.mixture_unit = "rows"
    again = prepare.ensure(data, workdir, tok, template)[0]
    assert again.manifest == first.manifest  # not prepared again: weights only steer the draw
    assert [(s.weight, s.unit) for s in again.sources] == [(1.0, "rows"), (4.0, "rows")]
    assert [(s.weight, s.unit) for s in first.sources] == [(3.0, "tokens"), (1.0, "tokens")]
