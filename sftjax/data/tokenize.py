"""Segments → token ids with an exact loss mask → `Example`, shifted once per example.

Owns: loading a local Hugging Face tokenizer, encoding each segment on its own (for framed
templates: BOS id once at the start, EOS id after every run of trainable segments and itself
trainable; special segments of rendered chat templates: their ids), which assistant turns are
trained (`keep_last_turn`), the length policies (`drop` / `truncate_prompt`; pipeline.py does
`truncate_history`) and the shift
`Example(tokens=ids[:-1], targets=ids[1:], loss_mask=trainable[1:])`.
Does not own: templates, packing, batching.

The whole-string tokenization, which every segment-wise encoding must equal, is defined by the
`transformers.AutoTokenizer` that `load_tokenizer` loads (its fast `tokenizers` backend, as
transformers 5.x rebuilds it; for Llama-2 a Metaspace pre-tokenizer with prepend_scheme="first"):
    [bos] + hf(prompt + response, add_special_tokens=False, split_special_tokens=True) + [eos]
Two copies of that backend do the work: `first` (unchanged: the dummy prefix "▁" is added, as it
is at the start of the whole string) for the first segment, and `continuation` (no dummy prefix:
Metaspace prepend_scheme="never", ByteLevel add_prefix_space=False, no Prepend normalizer) for
every later segment, because mid-string text gets no prefix. Both encode special-token strings
such as "</s>" as plain text (`encode_special_tokens`), so a row can't end its example or add a
control token; only this module inserts BOS/EOS, as ids. `load_tokenizer` checks on probe strings
that segment-wise == whole-string for the loaded tokenizer and refuses one where it isn't.
For rendered chat templates, `check_rendered` compares every row with its whole runs of text
(the render cut only at special tokens, as the HF tokenizer cuts it).
"""

import copy
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers
import transformers

from sftjax import paths
from sftjax.data.records import Row
from sftjax.data.templates import Segment, alpaca, render

OVERLONG_POLICIES = ("drop", "truncate_prompt", "truncate_history")


@dataclasses.dataclass(frozen=True)
class SegmentTokenizer:
    """A tokenizer split in two: text at the start of a sequence, and text that continues one."""

    hf: Any  # transformers.PreTrainedTokenizerBase: defines the whole-string tokenization
    first: tokenizers.Tokenizer
    continuation: tokenizers.Tokenizer
    bos_id: int | None  # None when the tokenizer defines no BOS (then nothing is prepended)
    eos_id: int
    # True: `first` adds a dummy prefix, i.e. encodes text as `continuation` encodes it with a
    # space in front (unless it starts with one); False: no prefix; None: neither holds.
    prefix_space: bool | None = None

    def decode(self, ids: Sequence[int]) -> str:
        """Exact text of ids, control tokens shown (no leading-space strip): for reports, tests."""
        return self.continuation.decode([int(i) for i in ids], skip_special_tokens=False)


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One example before the shift: ids and, per id, whether it is a training target."""

    ids: np.ndarray  # int32 [n]
    trainable: np.ndarray  # int32 0/1 [n]


@dataclasses.dataclass(frozen=True)
class Example:
    """One training example, shifted: tokens[i] predicts targets[i] where loss_mask[i] is 1."""

    tokens: np.ndarray  # int32 [n]
    targets: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # int32 0/1 [n]

    def __len__(self) -> int:
        return len(self.tokens)


def _drop_prefix(node: Any, drop: str) -> Any:
    """A tokenizer.json component without dummy prefix; `drop`: Sequence items to remove."""
    if isinstance(node, list):
        return [_drop_prefix(n, drop) for n in node if not _is_type(n, drop)]
    if not isinstance(node, dict):
        return node
    node = {k: _drop_prefix(v, drop) for k, v in node.items()}
    if node.get("type") == "Metaspace":
        node["prepend_scheme"] = "never"
        if "add_prefix_space" in node:  # older serialisations
            node["add_prefix_space"] = False
    if node.get("type") == "ByteLevel" and "add_prefix_space" in node:
        node["add_prefix_space"] = False
    return node


def _is_type(node: Any, name: str) -> bool:
    return isinstance(node, dict) and node.get("type") == name


def _backend(spec: dict) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok.encode_special_tokens = True  # "</s>" in text stays text
    return tok


class TokenizerError(ValueError):
    """A tokenizer directory sftjax cannot use; the message says what is missing."""


def load_tokenizer(path: str) -> SegmentTokenizer:
    """Load a HF tokenizer directory, local or gs:// (no hub, no remote code); check segmenting."""
    try:
        local = paths.local_copy(path)  # transformers reads local files only
        hf = transformers.AutoTokenizer.from_pretrained(local, local_files_only=True)
    except (OSError, ValueError) as e:  # transformers' own words, first line only
        reason = str(e).strip().split("\n")[0]
        raise TokenizerError(
            f"{path}: cannot load a Hugging Face tokenizer ({reason}); the directory needs "
            "tokenizer.json (or tokenizer.model) with its tokenizer_config.json"
        ) from e
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"{path}: needs a fast (tokenizers-backed) tokenizer, got {type(hf)}")
    if hf.eos_token_id is None:
        raise TokenizerError(
            f"{path}: the tokenizer defines no EOS token; set eos_token in "
            "special_tokens_map.json (examples must end in EOS to learn to stop)"
        )
    spec = json.loads(backend.to_str())
    continuation_spec = copy.deepcopy(spec)
    normalizer = _drop_prefix(spec.get("normalizer"), "Prepend")  # legacy Llama tokenizer.json
    continuation_spec["normalizer"] = None if _is_type(normalizer, "Prepend") else normalizer
    continuation_spec["pre_tokenizer"] = _drop_prefix(spec.get("pre_tokenizer"), "")
    decoder = _drop_prefix(spec.get("decoder"), "Strip")  # no leading-space strip: exact decode
    continuation_spec["decoder"] = None if _is_type(decoder, "Strip") else decoder
    first, continuation = _backend(spec), _backend(continuation_spec)
    tok = SegmentTokenizer(
        hf=hf,
        first=first,
        continuation=continuation,
        bos_id=hf.bos_token_id,
        eos_id=hf.eos_token_id,
        prefix_space=_prefix_space(first, continuation),
    )
    check_segmentation(tok, path)
    return tok


def _prefix_space(first: tokenizers.Tokenizer, continuation: tokenizers.Tokenizer) -> bool | None:
    """Whether the start-of-string encoding is the continuation one after a space (on PROBES)."""
    ids = lambda t, s: t.encode(s, add_special_tokens=False).ids  # noqa: E731
    probes = [p for p in PROBES if p]
    if all(ids(first, p) == ids(continuation, p) for p in probes):
        return False
    spaced = lambda p: p if p.startswith(" ") else " " + p  # noqa: E731
    if all(ids(first, p) == ids(continuation, spaced(p)) for p in probes):
        return True
    return None


PROBES = (
    "Hello world",
    " leading space",
    "\nnewline first",
    "  two",
    "tab\there",
    "x",
    "ünï 日本語 🙂",
    "a</s> <s>[INST]",
    "### Response:\n",
    "",
)


def check_segmentation(tok: SegmentTokenizer, name: str = "tokenizer") -> None:
    """Raise if segment-wise encoding differs from whole-string encoding on probe rows."""
    for text in PROBES:
        row = Row(source="probe", instruction=text or "x", input=text, response=text)
        segments = alpaca(row)
        got = encode(segments, tok).ids.tolist()
        want = whole_string_ids(render(segments), tok)
        if got != want:
            raise TokenizerError(
                f"{name}: segment-wise encoding of {text!r} differs from the whole "
                f"string: {got} != {want}; this tokenizer is not supported"
            )


def whole_string_ids(text: str, tok: SegmentTokenizer) -> list[int]:
    """Reference tokenization of a single-response example by the HF tokenizer itself."""
    ids = tok.hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ([tok.bos_id] if tok.bos_id is not None else []) + list(ids) + [tok.eos_id]


def encode_many(
    examples: Sequence[list[Segment]], tok: SegmentTokenizer, *, framed: bool = True
) -> list[Encoded]:
    """Encode many segment lists with two batched calls (Rust, multi-threaded).

    The first segment, if text, is encoded as the start of a string; later text continues it.
    framed: BOS id first, EOS id after each trainable run (built-in templates); otherwise the
    ids are exactly the segments', special segments being one id each (rendered templates).
    """
    heads = [segs[0].text if segs and not segs[0].special else "" for segs in examples]
    tails = [s.text for segs in examples for s in segs[1:] if not s.special]
    head_ids = tok.first.encode_batch(heads, add_special_tokens=False)
    tail_ids = iter(tok.continuation.encode_batch(tails, add_special_tokens=False))
    out = []
    for segs, head in zip(examples, head_ids, strict=True):
        ids: list[int] = [tok.bos_id] if framed and tok.bos_id is not None else []
        mask: list[int] = [0] * len(ids)
        for i, seg in enumerate(segs):
            if seg.special:
                piece = [tok.hf.convert_tokens_to_ids(seg.text)]
            else:
                piece = (head if i == 0 else next(tail_ids)).ids
            ids += piece
            mask += [int(seg.trainable)] * len(piece)
            ends_run = i + 1 == len(segs) or not segs[i + 1].trainable
            if framed and seg.trainable and ends_run:
                ids.append(tok.eos_id)  # the model learns to stop after each response
                mask.append(1)
        out.append(Encoded(np.asarray(ids, np.int32), np.asarray(mask, np.int32)))
    return out


def encode(segments: list[Segment], tok: SegmentTokenizer, *, framed: bool = True) -> Encoded:
    """Encode one segment list (see encode_many)."""
    return encode_many([segments], tok, framed=framed)[0]


def whole_runs(segments: list[Segment]) -> list[Segment]:
    """The segments' text joined between special tokens: what a whole-string tokenizer sees."""
    runs: list[Segment] = []
    for seg in segments:
        if runs and not seg.special and not runs[-1].special:
            runs[-1] = Segment(runs[-1].text + seg.text, False)
        else:
            runs.append(Segment(seg.text, False, seg.special))
    return runs


def check_rendered(
    examples: Sequence[list[Segment]], encoded: Sequence[Encoded], tok: SegmentTokenizer
) -> int | None:
    """Index of the first rendered example whose ids differ from its whole runs', else None."""
    whole = encode_many([whole_runs(segs) for segs in examples], tok, framed=False)
    for i, (got, want) in enumerate(zip(encoded, whole, strict=True)):
        if not np.array_equal(got.ids, want.ids):
            return i
    return None


def keep_last_turn(encoded: Encoded) -> Encoded:
    """Train on the last run of trainable tokens only (data.train_on="last_assistant_turn")."""
    trainable = encoded.trainable
    starts = np.flatnonzero(np.diff(np.r_[0, trainable]) == 1)
    if len(starts) <= 1:
        return encoded
    kept = trainable.copy()
    kept[: starts[-1]] = 0
    return Encoded(encoded.ids, kept)


def fit_length(encoded: Encoded, seq_len: int, overlong: str) -> Encoded | None:
    """Make the shifted example fit seq_len: unchanged, prompt cut from the left, or None (drop;
    under truncate_history the caller then re-encodes the row with fewer turns)."""
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    excess = len(encoded.ids) - 1 - seq_len
    if excess <= 0:
        return encoded
    first_trained = int(np.argmax(encoded.trainable)) if encoded.trainable.any() else 0
    # Keep ids[0] (BOS, when there is one) and at least one token before the first target.
    if overlong != "truncate_prompt" or excess > first_trained - 1:
        return None
    keep = np.r_[0, 1 + excess : len(encoded.ids)]
    return Encoded(encoded.ids[keep], encoded.trainable[keep])


def to_example(encoded: Encoded) -> Example:
    """Shift once: views, no copies; a packed row can then never predict across examples."""
    return Example(encoded.ids[:-1], encoded.ids[1:], encoded.trainable[1:])
