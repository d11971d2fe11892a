"""data.template="tokenizer": a Hugging Face jinja chat template as exact training segments.

Owns: rendering a conversation with the tokenizer's own `chat_template` (or a .jinja file) and
cutting it into segments without ever searching for separator tokens. Each assistant turn's
span comes from rendering prefixes: the conversation up to the turn with
`add_generation_prompt=True` (P), then through the turn (R); the trained span is R minus P, and
everything between the previous R and this P is prompt. Each render must be a prefix of the
next, otherwise the template is refused, naming the row (a template that rewrites earlier turns
has no exact mask for them). Qwen3's template rewrites earlier answers (it drops their reasoning)
but never the last one's prompt: with `last_turn_only` (data.train_on="last_assistant_turn")
only the last answer's two renders are compared, which is exact for it. Text a template writes
after the EOS token inside an answer (ChatML's "\n" after `<|im_end|>`) is not trained: the
model stops at EOS and never produces it. Special tokens the template writes (BOS,
`<|im_end|>`, ...) become special segments, encoded as their ids; the same strings inside message
text stay text: they are swapped for private-use placeholders while rendering and put back after
the render is cut.

The result is exactly what `tokenizer.apply_chat_template(messages, tokenize=True)` gives for the
same conversation (tested), so serving the model with that call matches training.
Every render is guarded: any error of the template (a syntax error, an unknown filter,
`raise_exception`, the sandbox's SecurityError, a TypeError inside) becomes one TemplateError
naming the row's file:line, the template and its line, and its own message; a render that runs
longer than RENDER_SECONDS (+ 1 s per million characters of the row) is stopped by a timer
signal (SIGALRM, main thread only: jinja loops run Python bytecode, which a signal interrupts,
whereas an operation-counting sandbox sees only calls and attribute reads, not loop steps).
Does not own: the built-in formats (templates.py), token ids (tokenize.py).
"""

import contextlib
import dataclasses
import logging
import re
import signal
import threading
from collections.abc import Iterator
from typing import Any

from sftjax.data.records import Row
from sftjax.data.templates import BUILT_IN, TEMPLATES, Segment, Template, jinja

NAMES = (*BUILT_IN, "tokenizer")
_OPEN, _CLOSE = "\ue000", "\ue001"  # placeholder brackets: Unicode private use, refused in rows
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")

log = logging.getLogger("sftjax")


RENDER_SECONDS = 2.0  # per render of one row, plus 1 s per million characters in it
PROBE_SECONDS = 0.5  # per render of make_template's probe, which only decides a warning


class TemplateError(ValueError):
    """A chat template that cannot give exact loss masks for a row; names the row."""


class _RenderTimeout(BaseException):
    """Raised by the timer inside a render (BaseException: no template code can swallow it)."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block after `seconds` (SIGALRM; no limit outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _RenderTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)


def _template_line(error: BaseException) -> int | None:
    """The template line an error came from (jinja names compiled templates "<template>")."""
    line = getattr(error, "lineno", None)
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


@dataclasses.dataclass(frozen=True)
class RenderedTemplate:
    """A jinja chat template, rendered by the tokenizer's apply_chat_template (tokenize=False)."""

    hf: Any  # transformers tokenizer: renders, and supplies bos_token / eos_token to the template
    chat_template: str
    controls: tuple[str, ...]  # special-token strings, longest first
    name: str = "tokenizer"
    framed: bool = False  # the template writes BOS / EOS itself
    origin: str = "the tokenizer's chat_template"  # or the data.chat_template file, for messages
    last_turn_only: bool = False  # data.train_on="last_assistant_turn": one span, the last
    render_seconds: float = RENDER_SECONDS  # the time limit of one render (+ 1 s per M chars)

    def _render(self, messages: list[dict], generation_prompt: bool, source: str) -> str:
        """apply_chat_template(tokenize=False), every failure one TemplateError naming `source`."""
        chars = sum(len(m["content"]) for m in messages)
        limit = self.render_seconds + chars / 1e6
        try:
            with _time_limit(limit):
                return self.hf.apply_chat_template(
                    messages,
                    chat_template=self.chat_template,
                    add_generation_prompt=generation_prompt,
                    tokenize=False,
                )
        except _RenderTimeout:
            raise TemplateError(
                f"{source}: the chat template ({self.origin}) ran longer than {limit:g} s on "
                "this row and was stopped; fix the template's loops"
            ) from None
        except Exception as e:  # the user's template failed: its own words, where it failed
            line = _template_line(e)
            where = f"{self.origin}, line {line}" if line else self.origin
            message = " ".join(str(e).split()) or "no message"
            raise TemplateError(
                f"{source}: the chat template ({where}) failed: {type(e).__name__}: {message}"
            ) from None

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

    def _answer(self, text: str) -> list[Segment]:
        """An assistant turn's span: trained up to its last EOS token; what follows is prompt."""
        segments = self._split(text, True)
        ends = [i for i, s in enumerate(segments) if s.special and s.text == self.hf.eos_token]
        if not ends:
            return segments
        return segments[: ends[-1] + 1] + [
            s._replace(trainable=False) for s in segments[ends[-1] + 1 :]
        ]

    def segments(self, row: Row) -> list[Segment]:
        """Prompt and assistant spans from prefix renders; refuses a template that rewrites."""
        messages = self._messages(row)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.last_turn_only:
            turns = turns[-1:]
        segments, done = [], ""
        for i in turns:
            prompt = self._render(messages[:i], True, row.source)
            through = self._render(messages[: i + 1], False, row.source)
            for shorter, longer, what in (
                (done, prompt, f"turns 1-{i} with a generation prompt"),
                (prompt, through, f"turns 1-{i + 1}"),
            ):
                if not longer.startswith(shorter):
                    raise TemplateError(
                        f"{row.source}: the chat template's render of {what} does not extend the "
                        f"render before it ({shorter[-60:]!r} is not a prefix of "
                        f"{longer[: len(shorter)][-60:]!r}); exact loss masks need a template that "
                        "only appends: if it rewrites earlier answers (Qwen3 drops their "
                        "reasoning), set data.train_on='last_assistant_turn'; otherwise use "
                        "another template or data.template='chat'"
                    )
            segments += self._split(prompt[len(done) :], False)
            segments += self._answer(through[len(prompt) :])
            done = through
        return segments

    def prompt(self, row: Row) -> list[Segment]:
        """Conversation ending with a user turn, rendered with the generation prompt."""
        messages = self._messages(row)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return self._split(self._render(messages, True, row.source), False)


def control_tokens(hf: Any) -> tuple[str, ...]:
    """The tokenizer's special added tokens (BOS, EOS, ...), longest first."""
    found = {t.content for t in hf.added_tokens_decoder.values() if t.special and t.content}
    return tuple(sorted(found, key=len, reverse=True))


def make_template(
    name: str, hf: Any, chat_template: str = "", *, origin: str = "", last_turn_only: bool = False
) -> Template | RenderedTemplate:
    """The data.template `name`; "tokenizer" renders `chat_template` or the tokenizer's own.

    origin: where chat_template came from (its file), for messages; last_turn_only: only the
    last assistant turn is trained (RenderedTemplate.last_turn_only)."""
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
    origin = origin if chat_template else "the tokenizer's chat_template"
    template = RenderedTemplate(
        hf, text, control_tokens(hf), origin=origin, last_turn_only=last_turn_only
    )
    probe = Row("probe", messages=(("user", "Hi"), ("assistant", "Hello")))
    try:
        # A quick look for the warning below; rows find and name any failure themselves.
        quick = dataclasses.replace(template, render_seconds=PROBE_SECONDS)
        trained = [s for s in quick.segments(probe) if s.trainable]
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
