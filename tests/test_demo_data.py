"""The demo's synthetic data and tokenizer: disjoint splits, exact segment-wise encoding."""

from sftjax import demo_data
from sftjax.data import groups, records, templates, tokenize


def test_splits_never_share_an_instruction_and_cover_every_task():
    train, validation, test = demo_data.make_splits(3, 600, 100, 20)
    instructions = [{r["instruction"] for r in split} for split in (train, validation, test)]
    assert sum(len(s) for s in instructions) == len(train) + len(validation) + len(test)
    assert len(set.union(*instructions)) == len(train) + len(validation) + len(test)
    tasks = [r["task"] for r in test]
    assert sorted(set(tasks)) == sorted(demo_data.TASKS) and len(demo_data.TASKS) >= 8
    assert min(tasks.count(t) for t in demo_data.TASKS) == 20
    assert {r["task"] for r in train} == set(demo_data.TASKS)


def test_demo_validation_rows_do_not_leak_into_training():
    # The demo's default split (sftjax.demo's flags): the trainer's own leakage check finds no
    # validation prompt among the training prompts, so the demo prints no warning about itself.
    train, validation, _ = demo_data.make_splits(0, 1800, 200, 20)
    as_rows = lambda rows, name: [
        records.Row(f"{name}:{i}", instruction=r["instruction"], response=r["response"])
        for i, r in enumerate(rows)
    ]
    leaks, _ = groups.find_leaks(as_rows(train, "train"), as_rows(validation, "validation"))
    assert leaks == [] and len(train) == 1800 and len(validation) == 200


def test_tokenizer_keeps_headers_whole_and_digits_and_spaces_apart(tmp_path):
    train, _, _ = demo_data.make_splits(0, 400, 0, 0)
    texts = [f"{r['instruction']}\n{r['response']}" for r in train]
    assert demo_data.train_tokenizer(texts, tmp_path, 512) == 512
    tok = tokenize.load_tokenizer(str(tmp_path))  # refuses a tokenizer that splits differently

    lengths = []
    for r in train:
        row = records.Row(source="demo", instruction=r["instruction"], response=r["response"])
        segments = templates.alpaca(row)
        encoded = tokenize.encode(segments, tok)
        # Segment by segment equals the whole string, so the loss mask is exact.
        assert encoded.ids.tolist() == tokenize.whole_string_ids(templates.render(segments), tok)
        lengths.append(len(encoded.ids))

    row = records.Row(source="demo", instruction="What is 12 plus 7?", response="19")
    pieces = tok.hf.convert_ids_to_tokens(tokenize.encode(templates.alpaca(row), tok).ids.tolist())
    assert pieces[:2] == ["<s>", "### Instruction:\n"]
    assert "\n\n### Response:\n" in pieces
    assert pieces[-3:] == ["1", "9", "</s>"]  # one token per digit
    assert pieces.count("Ġ") == 4  # each space its own token
    assert sum(lengths) / len(lengths) < 30  # the headers cost 2 tokens, not 17
