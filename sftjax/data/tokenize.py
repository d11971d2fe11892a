"""Segments → token ids with an exact loss mask → `Example`, shifted once per example.

Owns: loading a local Hugging Face tokenizer, encoding each segment on its own (BOS id once at
the start, EOS id after every run of trainable segments and itself trainable), the length
policy (`drop` / `truncate_prompt`) and the shift
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

OVERLONG_POLICIES = ("drop", "truncate_prompt")


@dataclasses.dataclass(frozen=True)
class SegmentTokenizer:
    """A tokenizer split in two: text at the start of a sequence, and text that continues one."""

    hf: Any  # transformers.PreTrainedTokenizerBase: defines the whole-string tokenization
    first: tokenizers.Tokenizer
    continuation: tokenizers.Tokenizer
    bos_id: int | None  # None when the tokenizer defines no BOS (then nothing is prepended)
    eos_id: int

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
    tok = SegmentTokenizer(
        hf=hf,
        first=_backend(spec),
        continuation=_backend(continuation_spec),
        bos_id=hf.bos_token_id,
        eos_id=hf.eos_token_id,
    )
    check_segmentation(tok, path)
    return tok


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


def encode_many(examples: Sequence[list[Segment]], tok: SegmentTokenizer) -> list[Encoded]:
    """Encode many segment lists with two batched calls (Rust, multi-threaded)."""
    heads = [segs[0].text if segs else "" for segs in examples]
    tails = [s.text for segs in examples for s in segs[1:]]
    head_ids = tok.first.encode_batch(heads, add_special_tokens=False)
    tail_ids = iter(tok.continuation.encode_batch(tails, add_special_tokens=False))
    out = []
    for segs, head in zip(examples, head_ids, strict=True):
        ids: list[int] = [] if tok.bos_id is None else [tok.bos_id]
        mask: list[int] = [0] * len(ids)
        for i, seg in enumerate(segs):
            piece = (head if i == 0 else next(tail_ids)).ids
            ids += piece
            mask += [int(seg.trainable)] * len(piece)
            if seg.trainable and (i + 1 == len(segs) or not segs[i + 1].trainable):
                ids.append(tok.eos_id)  # the model learns to stop after each response
                mask.append(1)
        out.append(Encoded(np.asarray(ids, np.int32), np.asarray(mask, np.int32)))
    return out


def encode(segments: list[Segment], tok: SegmentTokenizer) -> Encoded:
    """Encode one segment list (see encode_many)."""
    return encode_many([segments], tok)[0]


def fit_length(encoded: Encoded, seq_len: int, overlong: str) -> Encoded | None:
    """Make the shifted example fit seq_len: unchanged, prompt cut from the left, or None (drop)."""
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    excess = len(encoded.ids) - 1 - seq_len
    if excess <= 0:
        return encoded
    first_trained = int(np.argmax(encoded.trainable)) if encoded.trainable.any() else 0
    # Keep ids[0] (BOS, when there is one) and at least one token before the first target.
    if overlong == "drop" or excess > first_trained - 1:
        return None
    keep = np.r_[0, 1 + excess : len(encoded.ids)]
    return Encoded(encoded.ids[keep], encoded.trainable[keep])


def to_example(encoded: Encoded) -> Example:
    """Shift once: views, no copies; a packed row can then never predict across examples."""
    return Example(encoded.ids[:-1], encoded.ids[1:], encoded.trainable[1:])
