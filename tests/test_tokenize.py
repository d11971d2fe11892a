"""tokenize.py on the real Llama-2 tokenizer and every shared Alpaca-format row.

The whole-string reference is the HF tokenizer itself (see tokenize.py's docstring):
[bos] + hf(prompt + response, add_special_tokens=False, split_special_tokens=True) + [eos].
"""

import dataclasses
import json

import numpy as np
import pytest
import tokenizers
import transformers
from conftest import shared_path

from sftjax.data import records, templates, tokenize
from sftjax.data.records import Row
from sftjax.data.templates import Segment


@pytest.fixture(scope="module")
def tok():
    return tokenize.load_tokenizer(str(shared_path("llama2_tokenizer")))


@pytest.fixture(scope="module")
def shared_rows(tmp_path_factory):
    """All 3,191 Alpaca-format rows: both JSON files plus the 175 seed tasks (one instance each),
    which are flattened to {instruction, input, output} rows first."""
    folder = shared_path("alpaca")
    seed_rows = []
    for line in (folder / "seed_tasks.jsonl").read_text().splitlines():
        task = json.loads(line)
        (instance,) = task["instances"]
        seed_rows.append({"instruction": task["instruction"], **instance})
    seeds = tmp_path_factory.mktemp("seed") / "seed_tasks_flat.jsonl"
    seeds.write_text("\n".join(json.dumps(r) for r in seed_rows))
    files = [str(folder / "code_alpaca_2k.json"), str(folder / "alpaca_en_demo.json"), str(seeds)]
    rows, report = records.read_records(files, bad_rows="skip", drop_duplicates=False)
    assert report.rows_read == 2017 + 999 + 175
    assert report.bad_by_reason == {"empty field": 2}  # the two empty outputs in code_alpaca
    return rows


def _whole(texts, tok):
    ids = tok.hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [[tok.bos_id, *i, tok.eos_id] for i in ids]


def test_every_shared_row_segments_exactly(tok, shared_rows):
    segments = [templates.alpaca(r) for r in shared_rows]
    encoded = tokenize.encode_many(segments, tok)
    whole = _whole([templates.render(s) for s in segments], tok)
    mismatched = [
        r.source for r, e, w in zip(shared_rows, encoded, whole, strict=True) if e.ids.tolist() != w
    ]
    assert mismatched == [], f"{len(mismatched)} of {len(shared_rows)} rows differ"
    # With BOS added by the tokenizer's own post-processor too (what inference calls).
    assert tok.hf(templates.render(segments[0]))["input_ids"] == whole[0][:-1]
    for row, e in zip(shared_rows, encoded, strict=True):
        n_prompt = int((e.trainable == 0).sum())
        assert e.trainable.tolist() == [0] * n_prompt + [1] * (len(e.ids) - n_prompt)
        assert tok.decode(e.ids[e.trainable == 1]) == row.response + "</s>", row.source


def test_naive_segment_encoding_fails_on_shared_rows(tok, shared_rows):
    """Why the continuation tokenizer exists: the dummy prefix breaks segment-wise encoding."""
    segments = [templates.alpaca(r) for r in shared_rows[:500]]
    whole = _whole([templates.render(s) for s in segments], tok)
    prompts = tok.hf([s[0].text for s in segments], add_special_tokens=False)["input_ids"]
    responses = tok.hf([s[1].text for s in segments], add_special_tokens=False)["input_ids"]
    naive = [[tok.bos_id, *p, *r, tok.eos_id] for p, r in zip(prompts, responses, strict=True)]
    matches = sum(n == w for n, w in zip(naive, whole, strict=True))
    assert matches / len(segments) < 0.01


def test_separator_search_finds_nothing(tok, shared_rows):
    """The seed recipe searches ids for the tokenized "### Response:\\n": it never occurs."""
    separator = tok.hf("### Response:\n", add_special_tokens=False)["input_ids"]
    assert tok.hf.convert_ids_to_tokens(separator) == ["▁###", "▁Response", ":", "<0x0A>"]
    whole = _whole([templates.render(templates.alpaca(r)) for r in shared_rows], tok)
    k = len(separator)
    found = sum(any(w[i : i + k] == separator for i in range(len(w) - k)) for w in whole)
    assert found == 0  # 0 % of rows: every seed-recipe mask would be wrong
    in_context = tok.hf("x\n### Response:\n", add_special_tokens=False)["input_ids"][2:]
    assert tok.hf.convert_ids_to_tokens(in_context) == ["##", "#", "▁Response", ":", "<0x0A>"]


def test_aligned_token_table(tok):
    row = Row("f:1", instruction="Hi", response="Hello")
    example = tokenize.to_example(tokenize.encode(templates.alpaca(row), tok))
    pieces = tok.hf.convert_ids_to_tokens
    # fmt: off
    assert pieces(example.tokens.tolist()) == [
        "<s>", "▁###", "▁Inst", "ruction", ":", "<0x0A>", "Hi", "<0x0A>", "<0x0A>",
        "##", "#", "▁Response", ":", "<0x0A>", "Hello"]
    assert pieces(example.targets.tolist()) == [
        "▁###", "▁Inst", "ruction", ":", "<0x0A>", "Hi", "<0x0A>", "<0x0A>",
        "##", "#", "▁Response", ":", "<0x0A>", "Hello", "</s>"]
    assert example.loss_mask.tolist() == [
        0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 1, 1]
    # fmt: on
    assert example.tokens.dtype == example.loss_mask.dtype == np.int32


def test_special_token_text_is_plain_text(tok):
    text = "a</s> b <s> [INST] c"
    assert 2 in tok.hf(text, add_special_tokens=False)["input_ids"]  # HF's default splits it out
    row = Row("f:1", instruction=f"Say {text}", input=text, response=text)
    encoded = tokenize.encode(templates.alpaca(row), tok)
    assert encoded.ids.tolist().count(tok.bos_id) == 1 and encoded.ids[0] == tok.bos_id
    assert encoded.ids.tolist().count(tok.eos_id) == 1 and encoded.ids[-1] == tok.eos_id
    assert tok.decode(encoded.ids[encoded.trainable == 1]) == text + "</s>"


def test_chat_turns(tok):
    row = Row(
        "f:1",
        messages=(
            ("system", "Be brief."),
            ("user", "Hi </s>"),
            ("assistant", "Hello"),
            ("user", "[INST] again"),
            ("assistant", " Bye\n"),
        ),
    )
    encoded = tokenize.encode(templates.chat(row), tok)
    ids, trained = encoded.ids, encoded.trainable
    runs = np.split(ids, np.flatnonzero(np.diff(trained)) + 1)
    assert [tok.decode(r) for r in runs[1::2]] == [" Hello</s>", "  Bye\n</s>"]
    assert ids.tolist().count(tok.eos_id) == 2 and trained[0] == 0
    one_turn = templates.chat(Row("f:1", messages=row.messages[:3]))
    want = tokenize.whole_string_ids(templates.render(one_turn), tok)
    assert tokenize.encode(one_turn, tok).ids.tolist() == want


def test_fit_length():
    encoded = tokenize.Encoded(
        np.array([1, 10, 11, 12, 13, 20, 21, 2], np.int32),
        np.array([0, 0, 0, 0, 0, 1, 1, 1], np.int32),
    )
    assert tokenize.fit_length(encoded, 7, "drop") is encoded
    assert tokenize.fit_length(encoded, 5, "drop") is None
    cut = tokenize.fit_length(encoded, 5, "truncate_prompt")
    assert (
        cut.ids.tolist() == [1, 12, 13, 20, 21, 2] and cut.trainable.tolist() == [0] * 3 + [1] * 3
    )
    assert tokenize.fit_length(encoded, 3, "truncate_prompt").ids.tolist() == [1, 20, 21, 2]
    assert (
        tokenize.fit_length(encoded, 2, "truncate_prompt") is None
    )  # the response alone is too long


def _byte_level_tokenizer(folder, **special):
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    model.train_from_iterator(
        ["### Instruction:\nHello world\n\n### Response:\nHi there"] * 20, trainer
    )
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=model, **special)
    hf.save_pretrained(folder)
    return str(folder)


def test_byte_level_tokenizer_without_bos(tmp_path):
    tok = tokenize.load_tokenizer(_byte_level_tokenizer(tmp_path, eos_token="<|end|>"))
    assert tok.bos_id is None
    segments = templates.alpaca(Row("f:1", instruction="Hello", response=" Hi </s>"))
    encoded = tokenize.encode(segments, tok)
    assert encoded.ids.tolist() == tokenize.whole_string_ids(templates.render(segments), tok)
    assert tok.decode(encoded.ids[encoded.trainable == 1]) == " Hi </s><|end|>"


def test_tokenizer_without_eos_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no EOS token"):
        tokenize.load_tokenizer(_byte_level_tokenizer(tmp_path))


def test_empty_first_segment_still_gets_bos(tok):
    assert tokenize.encode([Segment("", False), Segment("x", True)], tok).ids.tolist() == [
        tok.bos_id,
        *tok.continuation.encode("x", add_special_tokens=False).ids,
        tok.eos_id,
    ]


def test_no_shared_row_merges_at_its_boundary_and_the_vocabulary_shortcut_agrees(tok, shared_rows):
    """Llama-2 never joins across "### Response:\\n" | answer: 0 merges counted, and the
    vocabulary shortcut (no token holds "\\n" + anything) gives what the whole encode gives."""
    segments = [templates.alpaca(r) for r in shared_rows]
    encoded = tokenize.encode_many(segments, tok)
    assert tok.boundary_pairs is not None
    assert tokenize.boundary_merges(segments, encoded, tok) == []
    whole_only = dataclasses.replace(tok, boundary_pairs=None)
    assert tokenize.boundary_merges(segments, encoded, whole_only) == []


def test_the_character_bound_is_exact_at_the_edge(tok):
    """ "-" * 16 is one Llama-2 token, the longest: k of them are k tokens, and the bound says
    "certainly longer" only past the true count."""
    assert tok.max_token_chars == 16
    for k in (1, 7, 300):
        segments = [Segment("### Response:\n", False), Segment("-" * 16 * k, True)]
        n = len(tokenize.encode(segments, tok).ids)
        assert n == 1 + len(tok.first.encode("### Response:\n", add_special_tokens=False)) + k + 1
        assert not tokenize.surely_longer(segments, tok, n, framed=True)
        answer_only = [Segment("-" * 16 * k, True)]  # BOS + k + EOS: the bound is the count
        assert not tokenize.surely_longer(answer_only, tok, k + 2, framed=True)
        assert tokenize.surely_longer(answer_only, tok, k + 1, framed=True)


def test_huge_lines_are_judged_from_characters_then_dropped_or_cut(tok, tmp_path):
    """A 5 MB one-word answer and a 1M-word prompt: dropped and counted without being
    tokenized; under truncate_prompt a long prompt is cut from characters first and gives the
    very ids that cutting its full encoding gives."""
    from train_fixtures import base_config

    from sftjax.data import pipeline

    rows = [{"instruction": f"Say {i}", "response": f"ok {i}"} for i in range(4)]
    long_prompt = " ".join(f"w{i % 97}" for i in range(20_000))  # 130 kB, truncatable
    rows += [
        {"instruction": "Repeat", "response": "x" * 5_000_000},
        {"instruction": "word " * 1_000_000, "response": "short"},
        {"instruction": long_prompt, "response": "the end"},
    ]
    path = tmp_path / "huge.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = base_config().data
    config.update(train_files=str(path), validation_files="", validation_fraction=0.0)
    config.update(seq_len=128, overlong="drop")
    train, _, report = pipeline.load_splits(config, tok)
    assert (len(train), report.overlong_dropped, report.prompt_truncated) == (4, 3, 0)
    assert len(report.prompt_lengths) == 4  # the huge rows were never tokenized
    config.overlong = "truncate_prompt"
    rows_read, _ = records.read_records(str(path))
    train, _, report = pipeline.load_splits(config, tok)
    assert (report.overlong_dropped, report.prompt_truncated) == (1, 2)  # the 5 MB answer
    full = tokenize.encode(templates.alpaca(rows_read[-1]), tok)
    want = tokenize.to_example(tokenize.fit_length(full, 128, "truncate_prompt"))
    (got,) = [e for e in train if tok.decode(e.targets[-3:-1]) == "the end"]
    assert np.array_equal(got.tokens, want.tokens) and np.array_equal(got.loss_mask, want.loss_mask)


def test_truncate_history_drops_a_huge_early_turn_without_tokenizing_it(tok, tmp_path):
    from train_fixtures import base_config

    from sftjax.data import pipeline

    def chat(first_question: str, last_question: str) -> dict:
        turns = [("system", "Be brief."), ("user", first_question), ("assistant", "One.")]
        turns += [("user", last_question), ("assistant", "Two.")]
        return {"messages": [{"role": r, "content": c} for r, c in turns]}

    huge = "word " * 400_000
    path = tmp_path / "chats.jsonl"
    rows = [chat("Hi", "Next?"), chat(huge, "Next?"), chat("Hi", huge)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = base_config().data
    config.update(train_files=str(path), validation_files="", validation_fraction=0.0)
    config.update(seq_len=128, overlong="truncate_history", template="chat")
    train, _, report = pipeline.load_splits(config, tok)
    assert (report.overlong_dropped, report.history_truncated, report.turns_cut) == (1, 1, 2)
    assert len(report.prompt_lengths) == 1  # only the short conversation was tokenized whole
    kept = tok.decode(np.r_[train[1].tokens[:1], train[1].targets])
    assert kept.startswith("<s> [INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nNext? [/INST] Two.")
