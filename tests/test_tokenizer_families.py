"""Llama-3, Qwen2.5/Qwen3 and Mistral tokenizers (built in tokenizer_fixtures.py) with every
template: ids equal transformers' own (`apply_chat_template`, or the whole string where no
boundary merges), one BOS where the family has one, none for Qwen, only answers + end-of-turn
trained; boundaries that merge when encoded whole are counted, never refused."""

import json
import subprocess

import numpy as np
import pytest
import transformers
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


LLAMA31_EOS = [128001, 128008, 128009]  # Llama-3.1-Instruct's config.json


@pytest.fixture(scope="module")
def llama3_run(family_dirs, tmp_path_factory):
    """`python -m sftjax.main` fine-tunes a tiny Llama-3-shaped base (vocab 128256, eos list)
    with the Llama-3 tokenizer and its own chat template: 1 step, then the HF export."""
    from hf_fixtures import make_hf_llama
    from train_fixtures import config_with, main_command, short_run

    root = tmp_path_factory.mktemp("llama3_cli")
    make_hf_llama(  # tied and narrow: the 128256-row table is most of the (compile) cost
        root / "base",
        tie=True,
        vocab_size=128256,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=128000,
        eos_token_id=LLAMA31_EOS,
    )
    chats = write_formats(root, CONVERSATIONS)["messages"]
    values = short_run(chats, chats, family_dirs["llama3"])
    values.update(
        {
            "model.hf_path": str(root / "base"),
            "data.template": "tokenizer",
            "data.seq_len": 256,
            "data.leakage": "warn",
            "train.num_steps": 1,
            "eval.every_steps": 1,
            "checkpoint.export_hf": True,
        }
    )
    done = subprocess.run(
        main_command(root / "run", values), capture_output=True, text=True, timeout=400
    )
    return done, config_with(values), root / "run"


def test_llama3_tokenizer_trains_through_the_cli_on_its_own_chat_template(llama3_run, families):
    done, config, workdir = llama3_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert "segment boundaries: 0 examples" in done.stderr
    tok = families["llama3"]
    train, _, _ = pipeline.load_splits(config.data, tok)  # what that run trained on
    for turns, example in zip(CONVERSATIONS, train, strict=True):
        messages = as_messages(turns)
        ids = _ids(example)
        assert ids == _hf_ids(tok, messages) and ids.count(128000) == 1 and ids[0] == 128000
        trained = np.asarray(ids)[np.asarray(_mask(example)) == 1]
        assert list(trained).count(128009) == sum(r == "assistant" for r, _ in turns)
        assert {128006, 128007, 128000} & set(trained.tolist()) == set()  # no header trained
    exported = transformers.AutoTokenizer.from_pretrained(workdir / "hf_export")
    messages = as_messages(CONVERSATIONS[1])
    assert exported.apply_chat_template(messages, tokenize=True, return_dict=False) == _ids(
        train[1]
    )


def test_llama3_export_keeps_the_base_eos_list(llama3_run):
    """Generation stops at any of the base's end tokens (<|end_of_text|>, <|eom_id|>,
    <|eot_id|>); the training tokenizer's EOS, <|eot_id|>, is one of them."""
    done, _, workdir = llama3_run
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("config.json", "generation_config.json"):
        written = json.loads((workdir / "hf_export" / name).read_text())
        assert written["eos_token_id"] == LLAMA31_EOS, name
