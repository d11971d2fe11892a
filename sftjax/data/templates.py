"""Prompt templates: a validated row becomes a list of `Segment(text, trainable, special)`.

Owns: the text of the built-in formats (`alpaca`, `chat`), which parts are trained on, and the
same formats written as Hugging Face jinja chat templates for the export (`jinja`), so that
`tokenizer.apply_chat_template` on an export gives the ids sftjax trained on.
Built-in templates are "framed": their segments are plain text, and tokenize.py adds BOS once and
EOS after every trainable run, as ids. Every boundary between their segments sits right after a
newline or right before a space, where no Llama-2 vocabulary piece can span it, so tokenizing
segments one by one equals tokenizing the whole string there (tested); where a tokenizer merges
across one (Llama-3's ":\n\n"), tokenize.py counts the example and keeps the segment-wise ids.
Templates rendered from a tokenizer's own jinja (chat_templates.py) are not framed: their
segments carry every special token the template writes (`special=True`).

Every template takes every row format: an instruction row is one user turn (records.Row).
Does not own: tokenization, lengths, or row validation (records.py).
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

from sftjax.data.records import Row

BUILT_IN = ("alpaca", "chat")


class Segment(NamedTuple):
    """A run of text, whether the model is trained to produce it, and whether the text is one
    special token (encoded as that token's id, never as text)."""

    text: str
    trainable: bool
    special: bool = False


@dataclasses.dataclass(frozen=True)
class Template:
    """One data.template: a training example and an inference prompt per row."""

    name: str
    to_segments: Callable[[Row], list[Segment]]
    framed: bool = True  # tokenize adds BOS and EOS; False: segments carry their special tokens

    def segments(self, row: Row) -> list[Segment]:
        """A training example: the whole conversation, assistant turns trainable."""
        return self.to_segments(row)

    def prompt(self, row: Row) -> list[Segment]:
        """The prompt for the row's next answer: the row's segments up to where it starts."""
        segments = self.to_segments(row)
        while segments and segments[-1].trainable:  # an (empty) response to be generated
            segments.pop()
        return segments


def alpaca(row: Row) -> list[Segment]:
    """Stanford Alpaca format; the `### Input:` block only when the input is non-empty.

    A conversation repeats the instruction/response block per exchange (EOS between them); a
    system message is plain text before the first block.
    """
    if not row.messages:
        prompt = f"### Instruction:\n{row.instruction}\n\n"
        if row.input.strip():
            prompt += f"### Input:\n{row.input}\n\n"
        return [Segment(prompt + "### Response:\n", False), Segment(row.response, True)]
    segments, system = [], ""
    for role, content in row.messages:
        if role == "system":
            system = f"{content}\n\n"
        elif role == "user":
            segments.append(
                Segment(f"{system}### Instruction:\n{content}\n\n### Response:\n", False)
            )
            system = ""
        else:
            segments.append(Segment(content, True))
    return segments


def chat(row: Row) -> list[Segment]:
    """Llama-2-chat `[INST]` style, every assistant turn trainable.

    Departure from Meta's reference: BOS appears once (not before every turn) and no space
    precedes EOS; the same function builds inference prompts, so training and inference agree.
    """
    messages = list(row.conversation())
    system = ""
    if messages and messages[0][0] == "system":
        system = f"<<SYS>>\n{messages[0][1]}\n<</SYS>>\n\n"
        messages = messages[1:]
    segments = []
    for role, content in messages:
        if role == "user":
            segments.append(Segment(f"[INST] {system}{content} [/INST]", False))
            system = ""
        else:
            # The space before the answer belongs to the answer: "]" | "▁Answer" never merges.
            segments.append(Segment(f" {content}", True))
    return segments


def render(segments: list[Segment]) -> str:
    """The whole string the segments stand for (inference sees this text)."""
    return "".join(s.text for s in segments)


TEMPLATES: dict[str, Template] = {
    "alpaca": Template("alpaca", alpaca),
    "chat": Template("chat", chat),
}

# The built-in formats as jinja, for the export: one loop over the turns, with each format's
# text for a system, user and assistant turn. `message.input` is the optional alpaca input of a
# user turn. START stands for what precedes the first text: BOS, and for tokenizers with a dummy
# prefix the space that the prefix stands for (jinja_start).
_SKELETON = """{#- sftjax "NAME": the text sftjax fine-tuned on, token for token. -#}
{%- set ns = namespace(system='', started=false) -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{%- set ns.system = SYSTEM -%}
{%- else -%}
{%- if message['role'] == 'user' -%}
{%- set input = message['input'] if message['input'] is defined and message['input'] else '' -%}
USER
{%- set ns.system = '' -%}
{%- else -%}
{%- set text = ASSISTANT -%}
{%- endif -%}
START
{{- text -}}
{%- endif -%}
{%- endfor -%}
GENERATION"""
_PARTS = {
    "alpaca": {
        "SYSTEM": "message['content'] + '\\n\\n'",
        "USER": "{%- set text = ns.system + '### Instruction:\\n' -%}\n"
        "{%- set text = text + message['content'] + '\\n\\n' -%}\n"
        "{%- if input.strip() -%}{%- set text = text + '### Input:\\n' + input + '\\n\\n' -%}"
        "{%- endif -%}",
        "ASSISTANT": "'### Response:\\n' + message['content'] + eos_token",
        "GENERATION": "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}",
    },
    "chat": {
        "SYSTEM": "'<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n'",
        "USER": "{%- set text = '[INST] ' + ns.system + message['content'] -%}\n"
        "{%- if input.strip() -%}{%- set text = text + '\\n\\n' + input -%}{%- endif -%}\n"
        "{%- set text = text + ' [/INST]' -%}",
        "ASSISTANT": "' ' + message['content'] + eos_token",
        "GENERATION": "",
    },
}


def jinja_start(*, bos: bool, prefix_space: bool) -> str:
    """What the chat template writes before its first text, as framed encoding does.

    Framed encoding puts the BOS id before text tokenized as at the start of a string (with the
    tokenizer's dummy prefix), while text after a special token in a rendered string gets no
    prefix; a space stands in for it (the prefix adds one unless the text starts with one).
    """
    start = "{{- bos_token -}}" if bos else ""
    if bos and prefix_space:
        start += "{%- if not text.startswith(' ') -%}{{- ' ' -}}{%- endif -%}"
    return "{%- if not ns.started -%}" + start + "{%- set ns.started = true -%}{%- endif -%}"


def jinja(name: str, *, bos: bool, prefix_space: bool) -> str:
    """The built-in template `name` as a Hugging Face chat template."""
    text = _SKELETON.replace("NAME", name)
    for part, value in _PARTS[name].items():
        text = text.replace(part, value)
    return text.replace("START", jinja_start(bos=bos, prefix_space=prefix_space))
