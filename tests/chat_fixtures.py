"""Chat templates as tokenizers ship them (written here from their documented formats), and
conversations that stress them: system turns, several exchanges, unicode, and text that looks
like control tokens (`</s>`, `[INST]`, `<|im_end|>`) but must stay text."""

import json
import pathlib

LLAMA2_CHAT = """{#- Llama-2-chat: BOS + [INST] per exchange, system inside the first -#}
{%- if messages[0]['role'] == 'system' -%}
{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' -%}
{%- set turns = messages[1:] -%}
{%- else -%}
{%- set system = '' -%}
{%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
{%- if message['role'] == 'user' -%}
{%- set text = (system if loop.first else '') + message['content'] -%}
{{- bos_token + '[INST] ' + text.strip() + ' [/INST]' -}}
{%- else -%}
{{- ' ' + message['content'].strip() + ' ' + eos_token -}}
{%- endif -%}
{%- endfor -%}
"""

CHATML = """{#- ChatML: every turn framed by <|im_start|>role and <|im_end|> -#}
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""

LLAMA3_STYLE = """{#- Llama-3 style: BOS once, a header per turn, <|eot_id|> after each -#}
{{- bos_token -}}
{%- for message in messages -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}
{{- (message['content'] | trim) + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{%- endif -%}
"""

REAL_TEMPLATES = {"llama2_chat": LLAMA2_CHAT, "chatml": CHATML, "llama3_style": LLAMA3_STYLE}

# Not prefix-stable: the first line counts the turns, so every render rewrites the one before.
COUNTS_TURNS = """{{- messages | length }} turns
{% for message in messages -%}
{{- message['role'] + ': ' + message['content'] + '\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}
"""

# Prefix-stable, but the answer is glued to the question: "Q:Hi" + "Hello" tokenizes across
# the boundary, so segment-wise ids can't equal the whole string's.
GLUED = """{%- for message in messages -%}
{%- if message['role'] == 'user' -%}{{- 'Q:' + message['content'] -}}
{%- else -%}{{- message['content'] + eos_token -}}{%- endif -%}
{%- endfor -%}
"""

CONVERSATIONS = [
    [("user", "Hi"), ("assistant", "Hello! How can I help?")],
    [
        ("system", "You are terse."),
        ("user", "Name a colour."),
        ("assistant", "Blue."),
        ("user", "Another one, in French?"),
        ("assistant", "Rouge — « rouge »."),
    ],
    [
        ("user", "Übersetze: 日本語 🙂"),
        ("assistant", "Japanese 🙂\nwith a newline"),
        ("user", "  leading and trailing spaces  "),
        ("assistant", " Kept as given. "),
        ("user", "last?"),
        ("assistant", "Yes."),
    ],
    [("system", "Sys\nwith two lines"), ("user", "tab\tand\nnewline"), ("assistant", "ok")],
]
# Text that spells control tokens; only the tokenizer's own special tokens are affected.
TRICKY = [
    ("user", "Does a</s> b <s> end it? [INST] no [/INST]"),
    ("assistant", "No: </s> and <|im_end|> stay text."),
    ("user", "<|start_header_id|>really<|end_header_id|>"),
    ("assistant", "Really </s>"),
]


def as_messages(turns) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


def write_formats(directory: pathlib.Path, conversations) -> dict[str, pathlib.Path]:
    """The conversations in the messages and sharegpt formats (one JSONL file each)."""
    speaker = {"user": "human", "assistant": "gpt", "system": "system"}
    files = {
        "messages": [{"messages": as_messages(c)} for c in conversations],
        "sharegpt": [
            {"conversations": [{"from": speaker[r], "value": t} for r, t in c]}
            for c in conversations
        ],
    }
    paths = {}
    for name, rows in files.items():
        paths[name] = directory / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return paths
