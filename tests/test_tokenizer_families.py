"""Llama-3, Qwen2.5/Qwen3 and Mistral tokenizers (built in tokenizer_fixtures.py) with every
template: ids equal transformers' own (`apply_chat_template`, or the whole string where no
boundary merges), one BOS where the family has one, none for Qwen, only answers + end-of-turn
trained; boundaries that merge when encoded whole are counted, never refused."""

import json

import numpy as np
import pytest
from chat_fixtures import CONVERSATIONS, as_messages, write_formats
from tokenizer_fixtures import llama3_tokenizer, mistral_tokenizer, qwen_tokenizer
from train_fixtures import base_config

from sftjax.data import pipeline, records, templates, tokenize
from sftjax.data.chat_templates import TemplateError

FAMILIES = ("llama3", "qwen", "mistral")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {
        "llama3": llama3_tokenizer(root / "llama3"),
        "qwen": qwen_tokenizer(root / "qwen"),
        "qwen3": qwen_tokenizer(root / "qwen3", qwen3=True),
        "mistral": mistral_tokenizer(root / "mistral"),
    }


@pytest.fixture(scope="module")
def families(family_dirs):
    return {name: tokenize.load_tokenizer(str(d)) for name, d in family_dirs.items()}


def _data_config(train_file, **values):
    config = base_config().data
    config.update(
        train_files=str(train_file),
        validation_files=str(train_file),  # every row on both sides, in file order
        leakage="warn",
        seq_len=1024,
        **values,
    )
    return config


def _ids(example):
    return np.r_[example.tokens[:1], example.targets].tolist()


def _mask(example):
    return np.r_[0, example.loss_mask].tolist()


def _hf_ids(tok, messages, generation_prompt=False):
    return tok.hf.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_tokenizer_template_is_apply_chat_template_with_answers_and_end_of_turn_trained(
    name, families, tmp_path
):
    tok = families[name]
    conversations = CONVERSATIONS  # text spelling control tokens: see the alpaca test
    paths = write_formats(tmp_path, conversations)
    train, _, report = pipeline.load_splits(
        _data_config(paths["messages"], template="tokenizer"), tok
    )
    assert len(train) == len(conversations) and report.boundary_merges == 0
    for turns, example in zip(conversations, train, strict=True):
        messages = as_messages(turns)
        ids = _ids(example)
        assert ids == _hf_ids(tok, messages)
        assert ids.count(tok.bos_id) == (0 if tok.bos_id is None else 1)
        if tok.bos_id is not None:
            assert ids[0] == tok.bos_id
        # Trained: each answer's span from transformers' own prefix renders, up to and
        # including its end-of-turn token (ChatML's newline after <|im_end|> is never produced).
        want = np.zeros(len(ids), np.int32)
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(_hf_ids(tok, messages[:i], generation_prompt=True))
                end = len(_hf_ids(tok, messages[: i + 1]))
                end = start + ids[start:end].index(tok.eos_id) + 1
                want[start:end] = 1
        assert _mask(example) == want.tolist()
        runs = np.split(np.asarray(ids), np.flatnonzero(np.diff(want)) + 1)[1::2]
        answers = [c for r, c in turns if r == "assistant"]
        assert len(runs) == len(answers)
        for run, answer in zip(runs, answers, strict=True):
            assert run[-1] == tok.eos_id and list(run).count(tok.eos_id) == 1
            assert answer.strip() in tok.decode(run[:-1])


ALPACA_ROWS = [
    {"instruction": "Name a colour.", "input": "", "response": "Blue."},
    {"instruction": "List two words:", "input": "the of", "response": "\nthe\nof"},
    {"instruction": "Translate", "input": "Über 日本語 🙂", "response": " with a space"},
    {"instruction": "Say it", "input": "", "response": "a</s> <|eot_id|> <|im_end|> [INST]"},
]


@pytest.mark.parametrize("template", ["alpaca", "chat"])
@pytest.mark.parametrize("name", FAMILIES)
def test_built_in_templates_one_bos_and_merging_boundaries_counted(
    name, template, families, tmp_path
):
    tok = families[name]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ALPACA_ROWS))
    train, _, report = pipeline.load_splits(_data_config(path, template=template), tok)
    rows, _ = records.read_records(str(path), row_format="auto")
    differ = []
    for i, (row, example) in enumerate(zip(rows, train, strict=True)):
        segments = templates.TEMPLATES[template].segments(row)
        ids, whole = _ids(example), tokenize.whole_string_ids(templates.render(segments), tok)
        if ids != whole:
            differ.append(f"{path}:{i + 1}")
        # Segment-wise: BOS, the prompt encoded alone, the answer encoded alone, EOS.
        prompt = tokenize.whole_string_ids(segments[0].text, tok)[:-1]
        answer = tok.continuation.encode(segments[1].text, add_special_tokens=False).ids
        assert ids == prompt + answer + [tok.eos_id]
        assert _mask(example) == [0] * len(prompt) + [1] * (len(answer) + 1)
        assert ids.count(tok.bos_id) == (0 if tok.bos_id is None else 1)
        assert ids.count(tok.eos_id) == 1  # "</s>", "<|eot_id|>", ... in the text stay text
    assert report.boundary_merges == 2 * len(differ)
    assert report.merged_examples == differ * 2
    if name == "llama3" and template == "alpaca":  # ":\n" + "\nthe" is ":\n\n" + "the" whole
        assert differ == [f"{path}:2"]


def test_qwen3_template_trains_the_last_answer_exactly_or_says_how(families, tmp_path):
    tok = families["qwen3"]
    turns = [
        ("user", "Name a colour."),
        ("assistant", "<think>\nThe user wants one.\n</think>\n\nBlue."),
        ("user", "Another?"),
        ("assistant", "<think>\nNot blue again.\n</think>\n\nRed."),
    ]
    paths = write_formats(tmp_path, [turns])
    with pytest.raises(TemplateError, match=r"messages.jsonl:1: .*train_on='last_assistant_turn'"):
        pipeline.load_splits(_data_config(paths["messages"], template="tokenizer"), tok)
    config = _data_config(paths["messages"], template="tokenizer", train_on="last_assistant_turn")
    (example,), _, _ = pipeline.load_splits(config, tok)
    messages = as_messages(turns)
    ids = _ids(example)
    assert ids == _hf_ids(tok, messages) and tok.bos_id is None
    start = len(_hf_ids(tok, messages[:3], generation_prompt=True))
    assert _mask(example) == [0] * start + [1] * (len(ids) - start - 1) + [0]  # "\n" after
    trained = tok.decode(ids[start:-1])
    assert trained == "<think>\nNot blue again.\n</think>\n\nRed.<|im_end|>"
    assert "The user wants one." not in tok.decode(ids)  # the earlier reasoning was dropped
