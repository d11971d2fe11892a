"""Round trip: fine-tune a tiny Llama on chats, export, and serve the export with transformers.

`apply_chat_template` on the exported tokenizer gives sftjax's prompt ids, and transformers'
greedy `generate` on the export answers exactly as `sftjax.generate` on the workdir does.
"""

import json

import numpy as np
import pytest
import transformers
from test_fit import make_config, overrides
from train_fixtures import demo_corpus

from sftjax import generate, loop, metrics
from sftjax.data import tokenize
from sftjax.model import hf_export


def _chats(source, target, *, seed: int) -> str:
    """Demo instructions as conversations: two exchanges each, every other one with a system."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    rng = np.random.default_rng(seed)
    with open(target, "w") as f:
        for i in range(0, len(rows) - 1, 2):
            turns = [{"role": "system", "content": "Answer briefly."}] if rng.random() < 0.5 else []
            for row in rows[i : i + 2]:
                turns += [
                    {"role": "user", "content": row["instruction"]},
                    {"role": "assistant", "content": row["response"]},
                ]
            f.write(json.dumps({"messages": turns}) + "\n")
    return str(target)


@pytest.mark.slow
def test_chat_model_served_by_transformers_answers_as_sftjax(tmp_path):
    train, val, tok_dir, vocab = demo_corpus(tmp_path / "corpus", n_train=240, n_val=40)
    values = overrides((train, val, tok_dir, vocab))
    values.update(
        {
            "data.train_files": _chats(train, tmp_path / "train.jsonl", seed=0),
            "data.validation_files": _chats(val, tmp_path / "val.jsonl", seed=1),
            "data.template": "chat",
            "train.num_steps": 6,
            "eval.every_steps": 3,
            "eval.prompts": ("Reverse the order of these words: river cloud stone",),
            "checkpoint.export_dtype": "float32",
        }
    )
    workdir = tmp_path / "run"
    result = loop.fit(make_config(values), workdir)
    samples = [
        r for r in metrics.read_records(workdir / "metrics.jsonl") if r["split"] == "samples"
    ]
    assert len(samples) == 2  # eval prompts answered with the chat template at each eval

    # The workdir remembers its template: generate needs no --template.
    model, tokenizer_dir, settings = generate._load(workdir, "float32")
    tok = tokenize.load_tokenizer(str(tokenizer_dir))
    template = generate.training_template(settings, tok, None)
    assert template.name == "chat"
    export = result.export_dir
    assert json.loads((export / hf_export.TRAINING_FORMAT_FILE).read_text()) == {"template": "chat"}
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(export).float().eval()

    conversations = [
        [{"role": "user", "content": "What is the capital of Japan?"}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": "5"},
            {"role": "user", "content": "Name the capital city of Greece."},
        ],
    ]
    prompts = [generate.prompt_ids({"messages": m}, template, tok) for m in conversations]
    for messages, prompt in zip(conversations, prompts, strict=True):
        served = hf_tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert served == prompt
    ours = generate.generate(model, prompts, max_new_tokens=12, eos_id=tok.eos_id)
    import torch

    for prompt, answer in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=12,
                pad_token_id=tok.eos_id,
            )
        theirs = out[0, len(prompt) :].tolist()
        assert answer == (theirs[: theirs.index(tok.eos_id)] if tok.eos_id in theirs else theirs)
    assert all(ours)  # real tokens were compared, not two immediate EOS
