"""The export's chat_template reproduces the training format: apply_chat_template == sftjax ids.

Checked on the real Llama-2 tokenizer (dummy prefix: text after BOS gets a space) and on the
demo's byte-level tokenizer (no prefix; its export must learn to add BOS), for every shared
Alpaca row and for multi-turn conversations with and without a system turn.
"""

import json

import pytest
import test_tokenize
import transformers
from chat_fixtures import CONVERSATIONS, TRICKY, as_messages
from conftest import shared_path

from sftjax import demo_data, generate
from sftjax.data import chat_templates, records, templates, tokenize
from sftjax.model import hf_export

shared_rows = test_tokenize.shared_rows  # fixture: all 3,191 shared Alpaca rows


def _export(tok: tokenize.SegmentTokenizer, source, name: str, target):
    """Export only the tokenizer, as save_pretrained does after a run with data.template=name."""
    settings = chat_templates.export_settings(templates.TEMPLATES[name], tok)
    target.mkdir()
    hf_export.export_tokenizer(
        source, target, chat_template=settings["chat_template"], add_bos=settings["add_bos"]
    )
    return transformers.AutoTokenizer.from_pretrained(target)


@pytest.fixture(scope="module")
def llama2():
    return tokenize.load_tokenizer(str(shared_path("llama2_tokenizer")))


@pytest.fixture(scope="module")
def demo_tok(tmp_path_factory):
    train, _, _ = demo_data.make_splits(0, 200, 10, 1)
    directory = tmp_path_factory.mktemp("demo_tok")
    demo_data.train_tokenizer([r["instruction"] + "\n" + r["response"] for r in train], directory)
    return directory


def _chat_ids(exported, messages, generation_prompt):
    return exported.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
    )


@pytest.mark.parametrize("name", templates.BUILT_IN)
def test_export_reproduces_prompts_of_every_shared_alpaca_row(
    name,
    llama2,
    shared_rows,
    tmp_path,
):
    exported = _export(llama2, shared_path("llama2_tokenizer"), name, tmp_path / "export")
    assert (tmp_path / "export" / "chat_template.jinja").exists()
    assert exported("Hi")["input_ids"] == [
        llama2.bos_id,
        *llama2.first.encode("Hi", add_special_tokens=False).ids,
    ]
    mismatched = []
    template = templates.TEMPLATES[name]
    for row in shared_rows:
        user = {"role": "user", "content": row.instruction, "input": row.input}
        prompt = generate.prompt_ids(
            {"instruction": row.instruction, "input": row.input}, name, llama2
        )
        trained = tokenize.encode(template.segments(row), llama2).ids.tolist()
        whole = _chat_ids(exported, [user, {"role": "assistant", "content": row.response}], False)
        if _chat_ids(exported, [user], True) != prompt or whole != trained:
            mismatched.append(row.source)
    assert mismatched == []


@pytest.mark.parametrize("name", templates.BUILT_IN)
@pytest.mark.parametrize("tokenizer", ["llama2", "demo"])
def test_export_reproduces_training_and_prompts_of_conversations(
    name, tokenizer, llama2, demo_tok, tmp_path
):
    source = shared_path("llama2_tokenizer") if tokenizer == "llama2" else demo_tok
    tok = llama2 if tokenizer == "llama2" else tokenize.load_tokenizer(str(demo_tok))
    exported = _export(tok, source, name, tmp_path / "export")
    # Plain encoding adds BOS as training does (the demo tokenizer had no post-processor).
    assert exported("x y")["input_ids"] == [
        tok.bos_id,
        *tok.first.encode("x y", add_special_tokens=False).ids,
    ]
    template = templates.TEMPLATES[name]
    for turns in CONVERSATIONS:
        row = records.Row("conversation", messages=tuple(turns))
        messages = as_messages(turns)
        trained = tokenize.encode(template.segments(row), tok).ids.tolist()
        assert _chat_ids(exported, messages, False) == trained
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = generate.prompt_ids({"messages": messages[:i]}, name, tok)
                assert _chat_ids(exported, messages[:i], True) == prompt
                assert trained[: len(prompt)] == prompt


@pytest.mark.parametrize("name", templates.BUILT_IN)
def test_exported_template_as_tokenizer_template_trains_identically(
    name,
    llama2,
    shared_rows,
    tmp_path,
):
    """One truth: training with data.template="tokenizer" on the exported jinja gives the same
    ids and loss masks as the built-in template (alpaca inputs fold into the user turn)."""
    exported = _export(llama2, shared_path("llama2_tokenizer"), name, tmp_path / "export")
    rendered = chat_templates.make_template("tokenizer", exported, exported.chat_template)
    rows = [r for r in shared_rows if not r.input.strip()] if name == "alpaca" else shared_rows
    rows = list(rows) + [records.Row("c", messages=tuple(c)) for c in [*CONVERSATIONS, TRICKY]]
    built_in = tokenize.encode_many([templates.TEMPLATES[name].segments(r) for r in rows], llama2)
    segments = [rendered.segments(r) for r in rows]
    via_jinja = tokenize.encode_many(segments, llama2, framed=False)
    assert tokenize.boundary_merges(segments, via_jinja, llama2, framed=False) == []
    for row, a, b in zip(rows, built_in, via_jinja, strict=True):
        assert a.ids.tolist() == b.ids.tolist() and a.trainable.tolist() == b.trainable.tolist(), (
            row.source
        )


def test_tokenizer_template_exports_itself(llama2, tmp_path):
    jinja = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    template = chat_templates.make_template("tokenizer", llama2.hf, jinja)
    settings = chat_templates.export_settings(template, llama2)
    assert settings == {
        "training_format": {"template": "tokenizer"},
        "add_bos": None,
        "chat_template": jinja,
    }
    exported = _export_raw(llama2, settings, tmp_path / "export")
    assert exported.chat_template == jinja
    config = json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())
    assert "chat_template" not in config


def _export_raw(tok, settings, target):
    target.mkdir()
    hf_export.export_tokenizer(
        shared_path("llama2_tokenizer"),
        target,
        chat_template=settings["chat_template"],
        add_bos=settings["add_bos"],
    )
    return transformers.AutoTokenizer.from_pretrained(target)


def test_generate_prompts_with_the_recorded_template(llama2, caplog):
    chat = generate.training_template({"template": "chat"}, llama2, None)
    assert chat is templates.TEMPLATES["chat"]
    assert generate.training_template({"template": "chat"}, llama2, "alpaca").name == "alpaca"
    assert "trained with 'chat'" in caplog.text
    # A model sftjax did not train: its own chat template, else alpaca, said out loud.
    assert generate.training_template({}, llama2, None).name == "alpaca"
    assert "no training record" in caplog.text
