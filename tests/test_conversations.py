"""Conversations through the pipeline: every format x template, train_on, truncate_history."""

import json

import numpy as np
import pytest
from chat_fixtures import CONVERSATIONS, LLAMA2_CHAT, TRICKY, write_formats
from conftest import shared_path
from test_report import _report
from train_fixtures import base_config

from sftjax.data import pipeline, records, tokenize

LONG = [("system", "Answer in one word.")] + [
    turn
    for i in range(6)
    for turn in (("user", f"Question {i}: " + "why " * 12), ("assistant", f"Because{i}."))
]


@pytest.fixture(scope="module")
def llama2():
    return tokenize.load_tokenizer(str(shared_path("llama2_tokenizer")))


def _config(path, tmp_path, **values):
    config = base_config().data
    (tmp_path / "llama2_chat.jinja").write_text(LLAMA2_CHAT)
    config.update(
        train_files=str(path),
        validation_files=str(path),
        tokenizer=str(shared_path("llama2_tokenizer")),
        chat_template=str(tmp_path / "llama2_chat.jinja"),
        seq_len=256,
    )
    config.update(values)
    return config


def _trained_runs(example: tokenize.Example, tok) -> list[str]:
    ids = np.r_[example.tokens[:1], example.targets]
    trained = np.r_[0, example.loss_mask]
    runs = np.split(ids, np.flatnonzero(np.diff(trained)) + 1)
    return [tok.decode(r) for r in runs[1 if trained[0] == 0 else 0 :: 2]]


ANSWER = {  # how each template writes an assistant turn, end marker included
    "alpaca": lambda text: text + "</s>",
    "chat": lambda text: " " + text + "</s>",
    "tokenizer": lambda text: " " + text.strip() + " </s>",  # LLAMA2_CHAT strips and pads
}


@pytest.mark.parametrize("template", ["alpaca", "chat", "tokenizer"])
def test_conversation_formats_give_the_same_exact_examples(template, llama2, tmp_path):
    conversations = [*CONVERSATIONS, TRICKY]
    paths = write_formats(tmp_path, conversations)
    by_format = {}
    for row_format, path in paths.items():
        config = _config(path, tmp_path, template=template, format=row_format)
        by_format[row_format], _, report = pipeline.load_splits(config, llama2)
        assert report.train_records.format == row_format
    for a, b in zip(by_format["messages"], by_format["sharegpt"], strict=True):
        assert (
            a.tokens.tolist() == b.tokens.tolist() and a.loss_mask.tolist() == b.loss_mask.tolist()
        )
    for example, turns in zip(by_format["messages"], conversations, strict=True):
        answers = [ANSWER[template](text) for role, text in turns if role == "assistant"]
        assert _trained_runs(example, llama2) == answers


@pytest.mark.parametrize("template", ["alpaca", "chat", "tokenizer"])
def test_alpaca_and_prompt_completion_rows_give_the_same_examples(template, llama2, tmp_path):
    source = json.loads((shared_path("alpaca") / "code_alpaca_2k.json").read_text())
    rows = [r for r in source if not r["input"].strip() and r["output"].strip()][:300]
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(rows))
    completions = tmp_path / "pc.jsonl"
    completions.write_text(
        "".join(
            json.dumps({"prompt": r["instruction"], "completion": r["output"]}) + "\n" for r in rows
        )
    )
    seq = dict(template=template, seq_len=4096)
    a, _, _ = pipeline.load_splits(_config(alpaca, tmp_path, **seq), llama2)
    b, _, report = pipeline.load_splits(_config(completions, tmp_path, **seq), llama2)
    assert report.train_records.format == "prompt_completion" and len(a) == len(b) == len(rows)
    for x, y, row in zip(a, b, rows, strict=True):
        assert (
            x.tokens.tolist() == y.tokens.tolist() and x.loss_mask.tolist() == y.loss_mask.tolist()
        )
        assert _trained_runs(x, llama2) == [ANSWER[template](row["output"])]


@pytest.mark.parametrize("template", ["chat", "tokenizer"])
def test_train_on_last_assistant_turn_keeps_ids_and_masks_earlier_turns(template, llama2, tmp_path):
    paths = write_formats(tmp_path, CONVERSATIONS)
    config = _config(paths["messages"], tmp_path, template=template)
    every, _, _ = pipeline.load_splits(config, llama2)
    config.train_on = "last_assistant_turn"
    last, _, _ = pipeline.load_splits(config, llama2)
    for a, b, turns in zip(every, last, CONVERSATIONS, strict=True):
        assert a.tokens.tolist() == b.tokens.tolist()
        final = [ANSWER[template](text) for role, text in turns if role == "assistant"][-1]
        assert _trained_runs(b, llama2) == [final]
        assert _trained_runs(a, llama2)[-1] == final
        assert (b.loss_mask <= a.loss_mask).all()


@pytest.mark.parametrize("template", ["alpaca", "chat", "tokenizer"])
def test_truncate_history_drops_earliest_turns_and_keeps_spans_exact(template, llama2, tmp_path):
    paths = write_formats(tmp_path, [LONG, [("user", "short"), ("assistant", "ok")]])
    config = _config(paths["messages"], tmp_path, template=template, seq_len=120)
    _, _, dropped = pipeline.load_splits(config, llama2)
    assert dropped.overlong_dropped == 2  # the long one, in train and in validation
    config.overlong = "truncate_history"
    train, _, report = pipeline.load_splits(config, llama2)
    assert report.overlong_dropped == 0 and report.history_truncated == 2
    cut = report.turns_cut // 2  # turns cut from each copy of the long conversation
    assert cut % 2 == 0 and cut > 0  # whole user + assistant exchanges
    template_ = pipeline.make_template(config, llama2)

    def encode(turns):
        row = records.Row("x", messages=tuple(turns))
        return tokenize.encode(template_.segments(row), llama2, framed=template_.framed)

    kept = LONG[:1] + LONG[1 + cut :]
    want, example = encode(kept), train[0]
    assert len(encode(LONG[:1] + LONG[cut - 1 :]).ids) - 1 > 120  # one exchange fewer: too long
    assert example.targets.tolist() == want.ids[1:].tolist()
    assert example.loss_mask.tolist() == want.trainable[1:].tolist()
    assert _trained_runs(example, llama2) == [
        ANSWER[template](text) for role, text in kept if role == "assistant"
    ]
    assert "Answer in one word." in llama2.decode(example.tokens)  # the system turn stays


def test_truncate_history_drops_a_single_exchange_that_cannot_fit(llama2, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"instruction": "why " * 80, "output": "ok"}) + "\n")
    config = _config(path, tmp_path, overlong="truncate_history", seq_len=32)
    with pytest.raises(ValueError, match="no training examples"):
        pipeline.load_splits(config, llama2)


def test_report_shows_format_template_and_history_truncation(tmp_path):
    paths = write_formats(tmp_path, [LONG, *CONVERSATIONS])
    result = _report(
        str(paths["sharegpt"]),
        "--config.data.template=chat",
        "--config.data.overlong=truncate_history",
        "--config.data.seq_len=120",
        "--config.data.train_on=last_assistant_turn",
        "--config.data.validation_fraction=0.0",
    )
    assert result.returncode == 0, result.stderr
    assert "(sharegpt rows)" in result.stdout
    assert "template 'chat', training on last assistant turn" in result.stdout
    assert "history truncated 1 with 6 turns cut" in result.stdout  # 3 of 6 exchanges
    # Only the last answer is trained; the system turn survives the cut.
    assert "Because4.</s>[INST] Question 5" in result.stdout and "⟦ Because5.</s>⟧" in result.stdout
    assert "<<SYS>>\nAnswer in one word." in result.stdout
