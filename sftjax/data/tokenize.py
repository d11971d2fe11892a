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
control token; only this module inserts BOS/EOS, as ids.

The segment-wise ids are the ones trained: the prompt encoded alone, then the response, is what
generation sees (the prompt is tokenized, then the answer is produced token by token). Where a
tokenizer merges across a boundary when the whole string is encoded (Llama-3's byte-level BPE
has a ":\n\n" token, so ":\n" + "\nText" differs from ":\n\nText"), `boundary_merges` finds
those examples with one batched whole-string encode of the text between special tokens, and the
data report counts them; no tokenizer is refused for it.

`min_tokens` bounds an example's length from its characters (no token covers more characters
than the longest vocabulary entry), so a 50 MB line is found over-long without tokenizing it.
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
from sftjax.data.templates import Segment

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
    # No token covers more input characters than this (None: no such bound, e.g. a pre-tokenizer
    # that removes whitespace or an unknown token that stands for a run of characters).
    max_token_chars: int | None = None
    # The normalizer may shorten text (NFC composes, Strip removes): measure normalized text.
    normalizer_shrinks: bool = False
    # Adjacent character pairs inside vocabulary entries, where those alone decide whether a
    # boundary can join (tokenize._boundary_pairs); None: the whole-string encode decides.
    boundary_pairs: frozenset[str] | None = None

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
        max_token_chars=_max_token_chars(hf, spec),
        normalizer_shrinks=_shrinks(spec.get("normalizer")),
        boundary_pairs=_boundary_pairs(hf, spec),
    )
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


def whole_runs(segments: list[Segment], *, framed: bool = False) -> list[Segment]:
    """The segments' text joined between special tokens: what a whole-string tokenizer sees.

    framed: EOS ids end every trainable run, so text is joined only up to there.
    """
    runs: list[Segment] = []
    for seg in segments:
        ended = framed and runs and runs[-1].trainable and not seg.trainable
        if runs and not seg.special and not runs[-1].special and not ended:
            runs[-1] = Segment(runs[-1].text + seg.text, seg.trainable)
        else:
            runs.append(seg)
    return runs


def boundary_merges(
    examples: Sequence[list[Segment]],
    encoded: Sequence[Encoded],
    tok: SegmentTokenizer,
    *,
    framed: bool = True,
) -> list[int]:
    """Indices of examples whose ids differ from those of their whole runs of text.

    One batched encode of the whole runs, skipped for examples whose every boundary is
    `_unjoinable` (then whole == segment-wise by construction); the trained ids stay the
    segment-wise ones.
    """
    runs = [whole_runs(segs, framed=framed) for segs in examples]
    check = [
        i
        for i, (segs, r) in enumerate(zip(examples, runs, strict=True))
        if len(r) < len(segs) and not _unjoinable(segs, tok)
    ]
    whole = encode_many([runs[i] for i in check], tok, framed=framed)
    return [
        i for i, w in zip(check, whole, strict=True) if not np.array_equal(encoded[i].ids, w.ids)
    ]


def _unjoinable(segments: Sequence[Segment], tok: SegmentTokenizer) -> bool:
    """True where no token can span any text/text boundary, so segment-wise == whole.

    Only for BPE over the whole text (no pre-tokenizer splits; Llama-2's Metaspace): there a
    difference needs a merge across the boundary, i.e. a vocabulary entry holding the boundary's
    two characters (a space written as the Metaspace "▁"). Llama-2 has no entry with a newline,
    so the alpaca and chat boundaries never join.
    """
    if tok.boundary_pairs is None:
        return False
    for left, right in zip(segments, segments[1:], strict=False):
        if left.special or right.special:
            continue
        if not left.text or not right.text:
            return False
        pair = (left.text[-1] + right.text[0]).replace(" ", "\u2581")
        if pair in tok.boundary_pairs:
            return False
    return True


def _boundary_pairs(hf: Any, spec: dict) -> frozenset[str] | None:
    """Every two adjacent characters inside a vocabulary entry, where `_unjoinable` applies:
    a BPE model, no normalizer but Metaspace's own (Prepend, " " → "▁"), no pre-tokenizer other
    than Metaspace without splitting. None elsewhere (the whole encode decides)."""
    pre = spec.get("pre_tokenizer")
    if (spec.get("model") or {}).get("type") != "BPE":
        return None
    if pre is not None and not (_is_type(pre, "Metaspace") and pre.get("split") is False):
        return None
    spaces = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    normalizers = (spec.get("normalizer") or {}).get("normalizers", [spec.get("normalizer")])
    if any(n and not (_is_type(n, "Prepend") or n == spaces) for n in normalizers):
        return None
    return frozenset(t[i : i + 2] for t in hf.get_vocab() for i in range(len(t) - 1))


def _max_token_chars(hf: Any, spec: dict) -> int | None:
    """The most input characters one token can stand for, or None where nothing bounds it.

    A vocabulary entry's string has one character per input character (Metaspace's "▁" for a
    space) or per byte (byte-level BPE, ≥ one per character); byte-fallback "<0x0A>" is longer
    than the one byte it covers. Unbounded: a model other than BPE, an unknown token that can
    stand for a run of characters, a pre-tokenizer that removes characters.
    """
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None
    if (
        model.get("unk_token") is not None
        and model.get("fuse_unk")
        and not model.get("byte_fallback")
    ):
        return None
    removing = ("Whitespace", "WhitespaceSplit", "BertPreTokenizer", "CharDelimiterSplit")
    if _any_node(
        spec.get("pre_tokenizer"),
        lambda n: (
            n.get("type") in removing
            or (n.get("type") == "Split" and n.get("behavior") == "Removed")
        ),
    ):
        return None
    return max(len(t) for t in hf.get_vocab())


def _any_node(node: Any, test: Any) -> bool:
    if isinstance(node, list):
        return any(_any_node(n, test) for n in node)
    if not isinstance(node, dict):
        return False
    return bool(test(node)) or any(_any_node(v, test) for v in node.values())


def _shrinks(normalizer: Any) -> bool:
    """Whether a normalizer can make text shorter (only Prepend, Replace by no-shorter text,
    NFD/NFKD and Lowercase are known not to)."""

    def shrinking(n: dict) -> bool:
        kind = n.get("type")
        if kind in ("Sequence", "Prepend", "NFD", "NFKD", "Lowercase"):
            return False
        if kind == "Replace":
            pattern = n.get("pattern", {}).get("String")
            return pattern is None or len(n.get("content", "")) < len(pattern)
        return True

    return _any_node(normalizer, shrinking)


def surely_longer(
    segments: Sequence[Segment], tok: SegmentTokenizer, limit: int, *, framed: bool
) -> bool:
    """Whether encode(segments) certainly has more than `limit` ids, from characters alone.

    Exact in one direction: True only if no encoding could fit (each token covers at most
    max_token_chars characters), so a row that fits is never judged long; False decides nothing.
    """
    if tok.max_token_chars is None:
        return False
    special = sum(s.special for s in segments)
    if framed:
        special += (tok.bos_id is not None) + sum(
            s.trainable and (i + 1 == len(segments) or not segments[i + 1].trainable)
            for i, s in enumerate(segments)
        )

    def bound(chars: list[int]) -> int:
        return special + sum(-(-c // tok.max_token_chars) for c in chars)

    texts = [s.text for s in segments if not s.special]
    if bound([len(t) for t in texts]) <= limit:
        return False  # also when the normalizer shrinks: normalized text is no longer
    if tok.normalizer_shrinks:
        texts = [tok.first.normalizer.normalize_str(t) for t in texts]
    return bound([len(t) for t in texts]) > limit


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
