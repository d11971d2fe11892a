"""data.template="tokenizer": real chat templates on the real Llama-2 tokenizer, exact masks.

The reference is transformers itself: `apply_chat_template` ids for the whole conversation, and
for each assistant turn the ids of the conversation up to it (with the generation prompt) and
through it, so the trained span of turn i is exactly [len(P_i), len(R_i)).
"""

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import transformers
from chat_fixtures import (
    CONVERSATIONS,
    COUNTS_TURNS,
    GLUED,
    LLAMA3_STYLE,
    REAL_TEMPLATES,
    TRICKY,
    as_messages,
    write_formats,
)
from conftest import shared_path
from tokenizer_fixtures import MISTRAL_NO_SYSTEM
from train_fixtures import base_config

from sftjax import contents
from sftjax import paths as sftjax_paths
from sftjax.data import chat_templates, pipeline, records, tokenize
from sftjax.data.chat_templates import TemplateError

HEADERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def llama2():
    return tokenize.load_tokenizer(str(shared_path("llama2_tokenizer")))


@pytest.fixture(scope="module")
def llama2_with_headers(tmp_path_factory):
    """Llama-2's tokenizer plus Llama-3's header tokens as special tokens, EOS = <|eot_id|>:
    a header template's markers are then control tokens, as in a real Llama-3 tokenizer."""
    hf = transformers.AutoTokenizer.from_pretrained(shared_path("llama2_tokenizer"))
    hf.add_special_tokens({"additional_special_tokens": HEADERS})
    hf.eos_token = "<|eot_id|>"
    directory = tmp_path_factory.mktemp("llama2_headers")
    hf.save_pretrained(directory)
    return tokenize.load_tokenizer(str(directory))


def _tokenizer_for(name, llama2, llama2_with_headers):
    return llama2_with_headers if name == "llama3_style" else llama2


def _hf_ids(tok, jinja, messages, generation_prompt=False):
    return tok.hf.apply_chat_template(
        messages,
        chat_template=jinja,
        add_generation_prompt=generation_prompt,
        tokenize=True,
        return_dict=False,
    )


@pytest.mark.parametrize("name", sorted(REAL_TEMPLATES))
def test_real_templates_give_apply_chat_template_ids_and_exact_masks(
    name, llama2, llama2_with_headers, tmp_path
):
    tok = _tokenizer_for(name, llama2, llama2_with_headers)
    jinja = REAL_TEMPLATES[name]
    template = chat_templates.make_template("tokenizer", tok.hf, jinja)
    paths = write_formats(tmp_path, CONVERSATIONS)
    rows, _ = records.read_records(str(paths["messages"]), row_format="messages")
    sharegpt, _ = records.read_records(str(paths["sharegpt"]), row_format="auto")
    assert [r.messages for r in sharegpt] == [r.messages for r in rows]
    segments = [template.segments(r) for r in rows]
    encoded = tokenize.encode_many(segments, tok, framed=False)
    assert tokenize.boundary_merges(segments, encoded, tok, framed=False) == []
    for row, example in zip(rows, encoded, strict=True):
        messages = as_messages(row.messages)
        assert example.ids.tolist() == _hf_ids(tok, jinja, messages), row.source
        want_mask = np.zeros(len(example.ids), np.int32)
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(_hf_ids(tok, jinja, messages[:i], generation_prompt=True))
                want_mask[start : len(_hf_ids(tok, jinja, messages[: i + 1]))] = 1
        assert example.trainable.tolist() == want_mask.tolist(), row.source
        # The inference prompt for the last answer is the training ids up to that answer.
        prompt = tokenize.encode(template.prompt(row), tok, framed=False).ids.tolist()
        assert prompt == _hf_ids(tok, jinja, messages[:-1], generation_prompt=True)
        assert example.ids[: len(prompt)].tolist() == prompt
        assert example.trainable[len(prompt) - 1 :].tolist() == [0] + [1] * (
            len(example.ids) - len(prompt)
        )


@pytest.mark.parametrize("name", sorted(REAL_TEMPLATES))
def test_control_token_text_in_messages_stays_text(name, llama2, llama2_with_headers):
    tok = _tokenizer_for(name, llama2, llama2_with_headers)
    template = chat_templates.make_template("tokenizer", tok.hf, REAL_TEMPLATES[name])
    row = records.Row("tricky:1", messages=tuple(TRICKY))
    segments = template.segments(row)
    example = tokenize.encode(segments, tok, framed=False)
    assert tokenize.boundary_merges([segments], [example], tok, framed=False) == []
    # Only the template's own special tokens are ids: one EOS per answer at most, BOS as written.
    rendered = tok.hf.apply_chat_template(
        as_messages(TRICKY), chat_template=REAL_TEMPLATES[name], tokenize=False
    )
    written_eos = rendered.count(tok.hf.eos_token) - sum(
        c.count(tok.hf.eos_token) for _, c in TRICKY
    )
    assert example.ids.tolist().count(tok.eos_id) == written_eos
    assert example.ids.tolist().count(tok.bos_id) == rendered.count("<s>") - 1  # one in text
    # The user's "</s>" is the text pieces a plain encoding of that text gives.
    text = tok.continuation.encode("a</s> b", add_special_tokens=False).ids
    assert [tok.decode([i]) for i in text][1:3] == ["</", "s"]
    runs = np.split(example.ids, np.flatnonzero(np.diff(example.trainable)) + 1)
    answers = [tok.decode(r) for r in runs[1::2]]
    assert "</s> and <|im_end|> stay text." in answers[0]
    assert "Really </s>" in answers[1]


def test_a_template_that_rewrites_earlier_turns_is_refused(llama2, tmp_path):
    paths = write_formats(tmp_path, CONVERSATIONS[:2])
    rows, _ = records.read_records(str(paths["messages"]), row_format="messages")
    template = chat_templates.make_template("tokenizer", llama2.hf, COUNTS_TURNS)
    with pytest.raises(TemplateError, match=f"{paths['messages']}:1: .* does not extend"):
        template.segments(rows[0])


def test_a_boundary_that_merges_when_whole_is_counted_and_trained_segment_wise(llama2, tmp_path):
    paths = write_formats(tmp_path, [[("user", "Say th"), ("assistant", "e end")], *CONVERSATIONS])
    (tmp_path / "glued.jinja").write_text(GLUED)
    config = base_config().data
    config.update(
        train_files=str(paths["messages"]),
        validation_files=str(paths["messages"]),
        template="tokenizer",
        chat_template=str(tmp_path / "glued.jinja"),
        leakage="warn",
    )
    train, _, report = pipeline.load_splits(config, llama2)
    assert report.boundary_merges == 2  # the glued row, in training and in validation
    assert report.merged_examples == [f"{paths['messages']}:1"] * 2
    line = [x for x in report.summary().splitlines() if x.startswith("segment boundaries")]
    assert line[0].startswith("segment boundaries: 2 examples tokenize differently")
    assert line[0].endswith(f"sees them): {paths['messages']}:1, {paths['messages']}:1")
    # Trained ids: the prompt encoded alone, then the answer (what generation sees).
    prompt = _hf_ids(llama2, GLUED, [{"role": "user", "content": "Say th"}])
    answer = llama2.continuation.encode("e end", add_special_tokens=False).ids + [llama2.eos_id]
    whole = _hf_ids(llama2, GLUED, as_messages([("user", "Say th"), ("assistant", "e end")]))
    assert prompt + answer != whole
    assert np.r_[train[0].tokens[:1], train[0].targets].tolist() == prompt + answer
    assert train[0].loss_mask.tolist() == [0] * (len(prompt) - 1) + [1] * len(answer)


def test_the_template_is_read_once_and_its_text_is_what_trains_and_is_recorded(
    llama2, tmp_path, caplog
):
    """The trainer makes the template once and passes it along: the data.chat_template file is
    read, and its probe warns, once (an over-long row once made it again), and the run's
    record holds the text that trained, with the fingerprint of a file holding it, even when
    the file is edited after it was read."""
    no_eos = GLUED.replace(" + eos_token", " + '\\n'")
    over_long = [("user", "word " * 300), ("assistant", "fine")]  # > 65 tokens of 16 chars
    paths = write_formats(tmp_path, [*CONVERSATIONS[:2], over_long])
    file = tmp_path / "chat.jinja"
    file.write_text(no_eos)
    config = base_config().data
    config.update(
        train_files=str(paths["messages"]),
        validation_files=str(paths["messages"]),
        template="tokenizer",
        chat_template=str(file),
        leakage="warn",
        seq_len=64,
    )
    template = pipeline.make_template(config, llama2)
    file.write_text(no_eos.replace("Q:", "Question:"))  # edited while the run starts
    train, _, report = pipeline.load_splits(config, llama2, template)
    assert caplog.text.count("will not learn to emit EOS") == 1
    assert report.overlong_dropped == 2  # in training and in validation
    assert llama2.decode(train[0].tokens).strip().startswith("Q:Hi")  # as it was read
    inputs = contents.run_inputs(config, template)
    (file.parent / "as_read.jinja").write_text(no_eos)
    (recorded,) = inputs["data.chat_template"]
    assert recorded == {
        "name": "chat.jinja",
        **contents.file_identity(sftjax_paths.resolve(file.parent / "as_read.jinja")),
        "text": no_eos,
    }


def test_a_tokenizer_without_a_chat_template_is_explained(llama2):
    with pytest.raises(TemplateError, match="has no chat_template: set data.chat_template"):
        chat_templates.make_template("tokenizer", llama2.hf)


def test_every_format_reads_into_the_same_conversation(tmp_path):
    pairs = [
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"prompt": "Add 1 2", "completion": "3"},
        {"conversations": [{"from": "human", "value": "Add 1 2"}, {"from": "gpt", "value": "3"}]},
        {
            "messages": [
                {"role": "user", "content": "Add 1 2"},
                {"role": "assistant", "content": "3"},
            ]
        },
    ]
    read = []
    for i, row in enumerate(pairs):
        path = tmp_path / f"{i}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        rows, report = records.read_records(str(path), row_format="auto")
        read.append((report.format, rows[0].conversation()))
    assert [f for f, _ in read] == ["alpaca", "prompt_completion", "sharegpt", "messages"]
    assert read[0][1] == (("user", "Add\n\n1 2"), ("assistant", "3"))
    assert {c for _, c in read[1:]} == {(("user", "Add 1 2"), ("assistant", "3"))}


def test_bad_sharegpt_and_prompt_completion_rows_are_located(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]},
        {"conversations": [{"from": "gpt", "value": "Hi"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": 3}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    _, report = records.read_records(str(path), row_format="sharegpt", bad_rows="skip")
    assert report.problems == [
        f"{path}:1: conversations[1].from: unknown role ('bot')",
        f"{path}:2: conversations[0].from: bad turn order (expected user, got assistant)",
        f"{path}:3: conversations[1].value: not a string (int)",
    ]
    path.write_text(
        json.dumps({"prompt": "p"}) + "\n" + json.dumps({"prompt": "p", "completion": " "})
    )
    _, report = records.read_records(str(path), row_format="prompt_completion", bad_rows="skip")
    assert report.problems == [
        f"{path}:1: completion: missing field",
        f"{path}:2: completion: empty field",
    ]


def test_llama3_header_template_marks_eos_and_ignores_header_text_in_messages(
    llama2_with_headers,
):
    tok = llama2_with_headers
    template = chat_templates.make_template("tokenizer", tok.hf, LLAMA3_STYLE)
    row = records.Row("f:1", messages=(("user", "<|eot_id|> is text here"), ("assistant", "Yes")))
    example = tokenize.encode(template.segments(row), tok, framed=False)
    eot = tok.hf.convert_tokens_to_ids("<|eot_id|>")
    assert example.ids.tolist().count(eot) == 2  # one per turn, not the user's
    assert example.ids[-1] == eot and example.trainable[-1] == 1


def _cli_error_line(tmp_path, train_file, template_file, *overrides: str) -> str:
    """Train through `python -m sftjax.main` with a user chat template; its one error line."""
    root = pathlib.Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        "-m",
        "sftjax.main",
        "--config=configs/base.py",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.train_files={train_file}",
        *overrides,
        f"--config.data.tokenizer={shared_path('llama2_tokenizer')}",
        "--config.data.template=tokenizer",
        f"--config.data.chat_template={template_file}",
        "--config.data.seq_len=256",
    ]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    return line


def test_training_refuses_a_rewriting_template_in_one_line(tmp_path):
    paths = write_formats(tmp_path, CONVERSATIONS[:2])
    (tmp_path / "counts.jinja").write_text(COUNTS_TURNS)
    line = _cli_error_line(tmp_path, paths["messages"], tmp_path / "counts.jinja")
    assert re.match(f"error: {paths['messages']}:[12]: the chat template's render of", line)


# A user's template failing in every way jinja can: (template, words its message must contain).
FAILING = {
    "raise_exception": ("{{- raise_exception('no system turns here') }}", "no system turns here"),
    "sandbox": ("{{- messages.__class__.__mro__ }}", "SecurityError"),
    "syntax": ("{%- for m in messages %}\n{{- m['content'] }}\n", "TemplateSyntaxError"),
    "unknown_filter": ("\n\n{{- messages | frobnicate }}", "No filter named 'frobnicate'"),
    "type_error": ("{{- messages[0]['content'] + 1 }}", "TypeError"),
    "zero_division": ("\n{{- (messages | length) / 0 }}", "ZeroDivisionError"),
    "roles_alternate": (MISTRAL_NO_SYSTEM, "Conversation roles must alternate"),
}


@pytest.mark.parametrize("name", sorted(FAILING))
def test_a_failing_user_template_is_one_line_naming_the_row_and_template(name, llama2, tmp_path):
    jinja, words = FAILING[name]
    paths = write_formats(tmp_path, [CONVERSATIONS[1]])  # a system turn first
    template_file = tmp_path / f"{name}.jinja"
    template_file.write_text(jinja)
    config = base_config().data
    config.update(
        train_files=str(paths["messages"]),
        validation_files=str(paths["messages"]),
        template="tokenizer",
        chat_template=str(template_file),
    )
    with pytest.raises(TemplateError) as error:
        pipeline.load_splits(config, llama2)
    message = str(error.value)
    assert "\n" not in message and words in message
    assert message.startswith(f"{paths['messages']}:1: the chat template ({template_file}")
    if name in ("syntax", "unknown_filter", "zero_division"):  # where in the template
        line = {"syntax": 2, "unknown_filter": 3, "zero_division": 2}[name]
        assert f"{template_file}, line {line})" in message


def test_a_template_that_never_ends_is_stopped_in_one_line_through_the_cli(tmp_path):
    paths = write_formats(tmp_path, CONVERSATIONS[:1])
    (tmp_path / "loops.jinja").write_text(
        "{%- for i in range(100000) %}{%- for j in range(100000) %}{%- endfor %}{%- endfor %}"
    )
    line = _cli_error_line(
        tmp_path,
        paths["messages"],
        tmp_path / "loops.jinja",
        f"--config.data.validation_files={paths['messages']}",
    )
    assert line.startswith(f"error: {paths['messages']}:1: the chat template ({tmp_path}")
    assert "ran longer than 2 s on this row and was stopped" in line
