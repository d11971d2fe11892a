"""Prompt templates: a validated row becomes a list of `Segment(text, trainable)`.

Owns: the text of each format and which parts are trained on. Segments are plain text: no
special tokens appear here (tokenize.py adds BOS once and EOS after each trainable run, as ids).
Every boundary between segments sits right after a newline or right before a space, where no
vocabulary piece can span it, so tokenizing segments one by one equals tokenizing the whole
string (checked for the real tokenizer in tests and at load time in tokenize.py).

Adding a template is one function `(Row) -> list[Segment]` added to `TEMPLATES`.
Does not own: tokenization, lengths, or row validation (records.py).
"""

from collections.abc import Callable
from typing import NamedTuple

from sftjax.data.records import Row


class Segment(NamedTuple):
    """A run of text and whether the model is trained to produce it."""

    text: str
    trainable: bool


Template = Callable[[Row], list[Segment]]


def alpaca(row: Row) -> list[Segment]:
    """Stanford Alpaca format; the `### Input:` block only when the input is non-empty."""
    prompt = f"### Instruction:\n{row.instruction}\n\n"
    if row.input.strip():
        prompt += f"### Input:\n{row.input}\n\n"
    prompt += "### Response:\n"
    return [Segment(prompt, False), Segment(row.response, True)]


def chat(row: Row) -> list[Segment]:
    """Llama-2-chat `[INST]` style, every assistant turn trainable.

    Departure from Meta's reference: BOS appears once (not before every turn) and no space
    precedes EOS; the same function builds inference prompts, so training and inference agree.
    """
    messages = list(row.messages)
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


TEMPLATES: dict[str, Template] = {"alpaca": alpaca, "chat": chat}
