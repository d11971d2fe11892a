"""data.template="tokenizer": a Hugging Face jinja chat template as exact training segments.

Owns: rendering a conversation with the tokenizer's own `chat_template` (or a .jinja file) and
cutting it into segments without ever searching for separator tokens. Each assistant turn's
span comes from rendering prefixes: the conversation up to the turn with
`add_generation_prompt=True` (P), then through the turn (R); the trained span is R minus P, and
everything between the previous R and this P is prompt. Each render must be a prefix of the
next, otherwise the template is refused, naming the row (a template that rewrites earlier turns
has no exact mask). Special tokens the template writes (BOS, `<|im_end|>`, ...) become special
segments, encoded as their ids; the same strings inside message text stay text: they are swapped
for private-use placeholders while rendering and put back after the render is cut.

The result is exactly what `tokenizer.apply_chat_template(messages, tokenize=True)` gives for the
same conversation (tested), so serving the model with that call matches training.
Does not own: the built-in formats (templates.py), token ids (tokenize.py).
"""

import dataclasses
import logging
import re
from typing import Any

from sftjax.data.records import Row
from sftjax.data.templates import BUILT_IN, TEMPLATES, Segment, Template, jinja

NAMES = (*BUILT_IN, "tokenizer")
_OPEN, _CLOSE = "\ue000", "\ue001"  # placeholder brackets: Unicode private use, refused in rows
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")

log = logging.getLogger("sftjax")


class TemplateError(ValueError):
    """A chat template that cannot give exact loss masks for a row; names the row."""


@dataclasses.dataclass(frozen=True)
class RenderedTemplate:
    """A jinja chat template, rendered by the tokenizer's apply_chat_template (tokenize=False)."""

    hf: Any  # transformers tokenizer: renders, and supplies bos_token / eos_token to the template
    chat_template: str
    controls: tuple[str, ...]  # special-token strings, longest first
    name: str = "tokenizer"
    framed: bool = False  # the template writes BOS / EOS itself

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.hf.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            add_generation_prompt=generation_prompt,
            tokenize=False,
        )

    def _messages(self, row: Row) -> list[dict]:
        """The row's turns as dicts, special-token strings in the text swapped for placeholders."""
        messages = []
        for role, content in row.conversation():
            if _OPEN in content or _CLOSE in content:
                raise TemplateError(
                    f"{row.source}: text holds U+E000/U+E001, which data.template='tokenizer' "
                    "reserves; remove them"
                )
            for i, control in enumerate(self.controls):
                content = content.replace(control, f"{_OPEN}{i}{_CLOSE}")
            messages.append({"role": role, "content": content})
        return messages

    def _split(self, text: str, trainable: bool) -> list[Segment]:
        """Rendered text → text and special-token segments, placeholders restored as text."""
        segments = []
        for i, piece in enumerate(self._pattern().split(text)):
            if i % 2:
                segments.append(Segment(piece, trainable, True))
            elif piece:
                restored = _PLACEHOLDER.sub(lambda m: self.controls[int(m.group(1))], piece)
                segments.append(Segment(restored, trainable))
        return segments

    def _pattern(self) -> re.Pattern:
        return re.compile("(" + "|".join(re.escape(c) for c in self.controls) + ")")

    def segments(self, row: Row) -> list[Segment]:
        """Prompt and assistant spans from prefix renders; refuses a template that rewrites."""
        messages = self._messages(row)
        segments, done = [], ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], True)
            through = self._render(messages[: i + 1], False)
            for shorter, longer, what in (
                (done, prompt, f"turns 1-{i} with a generation prompt"),
                (prompt, through, f"turns 1-{i + 1}"),
            ):
                if not longer.startswith(shorter):
                    raise TemplateError(
                        f"{row.source}: the chat template's render of {what} does not extend the "
                        f"render before it ({shorter[-60:]!r} is not a prefix of "
                        f"{longer[: len(shorter)][-60:]!r}); exact loss masks need a template that "
                        "only appends: use another template or data.template='chat'"
                    )
            segments += self._split(prompt[len(done) :], False)
            segments += self._split(through[len(prompt) :], True)
            done = through
        return segments

    def prompt(self, row: Row) -> list[Segment]:
        """Conversation ending with a user turn, rendered with the generation prompt."""
        messages = self._messages(row)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return self._split(self._render(messages, True), False)


def control_tokens(hf: Any) -> tuple[str, ...]:
    """The tokenizer's special added tokens (BOS, EOS, ...), longest first."""
    found = {t.content for t in hf.added_tokens_decoder.values() if t.special and t.content}
    return tuple(sorted(found, key=len, reverse=True))


def make_template(name: str, hf: Any, chat_template: str = "") -> Template | RenderedTemplate:
    """The data.template `name`; "tokenizer" renders `chat_template` or the tokenizer's own."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name != "tokenizer":
        raise ValueError(f"data.template {name!r} is not one of {NAMES}")
    text = chat_template or getattr(hf, "chat_template", None)
    if not text or not isinstance(text, str):
        raise TemplateError(
            f"data.template='tokenizer' but {getattr(hf, 'name_or_path', 'the tokenizer')} has no "
            "chat_template: set data.chat_template to a .jinja file, or choose 'alpaca' or 'chat'"
        )
    template = RenderedTemplate(hf, text, control_tokens(hf))
    probe = Row("probe", messages=(("user", "Hi"), ("assistant", "Hello")))
    try:
        trained = [s for s in template.segments(probe) if s.trainable]
    except TemplateError:
        return template  # refused row by row, each named, when the data is encoded
    if hf.eos_token not in [s.text for s in trained if s.special]:
        log.warning(
            "the chat template ends assistant turns with %r, not the EOS token %r: the model "
            "will not learn to emit EOS, and generation stops only at EOS",
            "".join(s.text for s in trained).replace("Hello", "", 1),
            hf.eos_token,
        )
    return template


def export_settings(template: Template | RenderedTemplate, tok: Any) -> dict:
    """save_pretrained's arguments that carry the training format into a Hugging Face export.

    Built-in templates export as their jinja (tokenize.SegmentTokenizer.prefix_space says how
    text after BOS is written); a rendered template exports as itself.
    """
    settings = {"training_format": {"template": template.name}, "add_bos": None}
    if not template.framed:
        return {**settings, "chat_template": template.chat_template}
    if tok.prefix_space is None:
        log.warning("no chat_template exported: this tokenizer's start-of-text rule has no jinja")
        return {**settings, "chat_template": None, "add_bos": True}
    text = jinja(template.name, bos=tok.bos_id is not None, prefix_space=tok.prefix_space)
    return {**settings, "chat_template": text, "add_bos": True}
