"""Near-duplicate texts: normalisation, boilerplate stripping, MinHash LSH, exact verification.

Owns: `normalize` (the one definition of "equal up to case, punctuation and whitespace") and
`near_duplicates(texts)`: which of many normalised texts are near-duplicates, found in
O(n) with MinHash LSH and confirmed by their exact Jaccard similarity. Works on strings and
numpy arrays only. Does not own: rows, what text of a row is compared, splits (groups.py).

Definition used (docs/data.md says the same for users):
1. Boilerplate: a run of BOILERPLATE_WORDS words that occurs in at least
   `boilerplate_min(n)` distinct texts is a shared preamble or template, not content; every
   word it covers is removed before comparing, so "same preamble, different task" is not a
   near-duplicate while "preamble + X" and "X" are.
2. Each text's remaining words give a set of shingles: every word and every pair of adjacent
   words (1- and 2-grams keep single-word edits cheap on short instructions and still tell
   "celsius to fahrenheit" from "fahrenheit to celsius": Jaccard 0.4).
3. Two texts are near-duplicates when the Jaccard similarity of their sets is >= THRESHOLD
   (0.8: one word changed in a text of 14+ words; at 0.7 short templated prompts such as
   "compute the sum of 11 and 16" / "... 11 and 9" matched and chained into large groups).

MinHash with BANDS x ROWS_PER_BAND permutations makes a pair a candidate with probability
1 - (1 - J^5)^25: 0.99995 at J = 0.8, 0.99 at 0.7, 0.55 at 0.5, 0.06 at 0.3. That is an LSH
threshold well below 0.8 (LSH tuned to 0.8 itself misses about half the pairs just above it),
and only a candidate filter: every candidate is verified with its exact Jaccard. Texts with
identical sets are joined before LSH, so a big group of equal texts costs one signature, not a
quadratic number of comparisons.
"""

import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

THRESHOLD = 0.8  # exact Jaccard of 1+2-gram sets at or above which texts are near-duplicates
BOILERPLATE_WORDS = 8  # a shared run this long is template text, not content
BANDS, ROWS_PER_BAND = 25, 5  # LSH: 125 MinHash permutations
VERIFY_CHUNK = 1 << 20  # shingles gathered at once when verifying candidate pairs

_APOSTROPHES = re.compile(r"['’`]")
_NON_WORD = re.compile(r"[\W_]+")
# The same rules for ASCII text as one table lookup per character: 5x faster than the regexes.
_ASCII = {c: " " for c in range(128) if not chr(c).isalnum()} | {ord("'"): None, ord("`"): None}
_M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)
_UNIGRAM, _BIGRAM = np.uint64(0x165667B19E3779F9), np.uint64(0x27D4EB2F165667C5)


def normalize(text: str) -> str:
    """Lower-cased, punctuation removed, whitespace collapsed: "Hello,  World!" → "hello world"."""
    if text.isascii():
        return " ".join(text.lower().translate(_ASCII).split())
    text = unicodedata.normalize("NFKC", text).casefold()
    return _NON_WORD.sub(" ", _APOSTROPHES.sub("", text)).strip()


def boilerplate_min(num_texts: int) -> int:
    """Distinct texts a run must appear in to count as boilerplate: 10, or 0.1 % of a big set."""
    return max(10, num_texts // 1000)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads structured uint64 values over all 64 bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _words(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash per word, int64 text index per word), flat in text order; hashes by content."""
    vocabulary: dict[str, int] = {}
    ids, lengths = [], []
    for text in texts:
        words = text.split()
        ids += [vocabulary.setdefault(w, len(vocabulary)) for w in words]
        lengths.append(len(words))
    word_hash = np.array(
        [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest()) for w in vocabulary],
        np.uint64,
    )
    doc = np.repeat(np.arange(len(texts)), lengths)
    return word_hash[np.asarray(ids, np.int64)], doc


def _run_hashes(h: np.ndarray, doc: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hash of the n-word run starting at each position, and whether it stays inside its text."""
    starts = len(h) - n + 1
    if starts <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, bool)
    acc = np.zeros(starts, np.uint64)
    for k in range(n):
        acc = _mix(acc ^ h[k : k + starts])
    return acc, doc[:starts] == doc[n - 1 :]


def _strip_boilerplate(h: np.ndarray, doc: np.ndarray, num_texts: int) -> np.ndarray:
    """Mask of the words not covered by a BOILERPLATE_WORDS run shared by many texts."""
    runs, inside = _run_hashes(h, doc, BOILERPLATE_WORDS)
    keep = np.ones(len(h), bool)
    starts = np.flatnonzero(inside)
    if not len(starts):
        return keep
    runs = runs[starts]
    order = np.argsort(runs)
    bounds = np.flatnonzero(np.r_[True, runs[order][1:] != runs[order][:-1], True])
    occurrences = np.diff(bounds)
    frequent = order[np.repeat(occurrences >= boilerplate_min(num_texts), occurrences)]
    if not len(frequent):  # the usual case: no run recurs often enough to be boilerplate
        return keep
    # Count each frequent run once per text.
    _, first = np.unique(
        _mix(runs[frequent] ^ _mix(doc[starts[frequent]].astype(np.uint64))), return_index=True
    )
    values, texts = np.unique(runs[frequent[first]], return_counts=True)
    hit = starts[np.isin(runs, values[texts >= boilerplate_min(num_texts)])]
    cover = np.zeros(len(h) + 1, np.int64)
    np.add.at(cover, hit, 1)
    np.add.at(cover, hit + BOILERPLATE_WORDS, -1)
    return np.cumsum(cover[:-1]) == 0


def _shingles(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Shingles per text, CSR (shingles, offsets [num_texts + 1]): its words, then its bigrams.

    A word repeated in a text repeats its shingle: these are multisets, and only `_jaccard`,
    which needs sets, removes the repeats (MinHash is the same for a multiset and its set).
    """
    h, doc = _words(texts)
    keep = _strip_boilerplate(h, doc, len(texts))
    h, doc = h[keep], doc[keep]
    words = np.bincount(doc, minlength=len(texts))
    offsets = np.r_[0, np.cumsum(np.maximum(2 * words - 1, 0))]
    local = np.arange(len(h)) - np.r_[0, np.cumsum(words)][doc]  # word index inside its text
    shingles = np.empty(offsets[-1], np.uint64)
    shingles[offsets[doc] + local] = _mix(h ^ _UNIGRAM)
    bigrams, inside = _run_hashes(h, doc, 2)
    p = np.flatnonzero(inside)
    shingles[offsets[doc[p]] + words[doc[p]] + local[p]] = _mix(bigrams[p] ^ _BIGRAM)
    return shingles, offsets


def _signatures(shingles: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """MinHash [BANDS * ROWS_PER_BAND, num_sets] uint32 of non-empty CSR sets (fixed seed).

    32-bit multiply-add permutations of the shingles' top 32 bits, one permutation at a time:
    7x faster than 64-bit values in [shingles, permutations] blocks, and 8 bytes per shingle
    of scratch memory. Rare 32-bit collisions only add candidates; verification is exact.
    """
    rng = np.random.default_rng(20261130)
    num_perm = BANDS * ROWS_PER_BAND
    a = rng.integers(1, 2**32, num_perm, dtype=np.uint32) | np.uint32(1)
    b = rng.integers(0, 2**32, num_perm, dtype=np.uint32)
    top = (shingles >> np.uint64(32)).astype(np.uint32)
    scratch = np.empty_like(top)
    out = np.empty((num_perm, len(offsets) - 1), np.uint32)
    for p in range(num_perm):
        np.multiply(top, a[p], out=scratch)
        np.add(scratch, b[p], out=scratch)
        out[p] = np.minimum.reduceat(scratch, offsets[:-1])
    return out


def _candidates(signatures: np.ndarray) -> np.ndarray:
    """Pairs (i < j) of sets that share all ROWS_PER_BAND values of at least one band."""
    num_sets = signatures.shape[1]
    found = []
    for band in range(BANDS):
        key = np.zeros(num_sets, np.uint64)
        for row in signatures[band * ROWS_PER_BAND : (band + 1) * ROWS_PER_BAND]:
            key = _mix(key ^ row.astype(np.uint64))
        order = np.argsort(key, kind="stable")
        key = key[order]
        bounds = np.flatnonzero(np.r_[True, key[1:] != key[:-1], True])
        lo, size = bounds[:-1], np.diff(bounds)
        two = lo[size == 2]  # most buckets that pair anything hold two sets: no loop for them
        found.append(np.sort(np.stack([order[two], order[two + 1]], axis=1), axis=1))
        for start, n in zip(lo[size > 2], size[size > 2], strict=True):
            i, j = np.triu_indices(n, 1)
            members = np.sort(order[start : start + n])
            found.append(np.stack([members[i], members[j]], axis=1))
    found = np.concatenate(found)
    code = np.unique(found[:, 0] * num_sets + found[:, 1])
    return np.stack([code // num_sets, code % num_sets], axis=1)


def _gather(shingles: np.ndarray, offsets: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """The shingles of the given CSR sets, concatenated in that order."""
    lengths = offsets[sets + 1] - offsets[sets]
    begin = np.repeat(offsets[sets] - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
    return shingles[np.arange(int(lengths.sum())) + begin]


def _jaccard(pairs: np.ndarray, shingles: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Exact Jaccard of each pair of CSR multisets, as sets: two sorts per chunk of pairs."""
    sizes = np.diff(offsets)
    out = np.empty(len(pairs))
    start = 0
    while start < len(pairs):
        cost = np.cumsum(sizes[pairs[start:, 0]] + sizes[pairs[start:, 1]])
        stop = start + max(1, int(np.searchsorted(cost, VERIFY_CHUNK)))
        chunk = pairs[start:stop]
        sides = chunk.T.ravel()  # first every left set, then every right set
        member = np.repeat(np.arange(len(sides)), sizes[sides])  # (side, pair) index
        values = _gather(shingles, offsets, sides)
        order = np.lexsort((values, member))
        values, member = values[order], member[order]
        repeat = np.r_[False, (values[1:] == values[:-1]) & (member[1:] == member[:-1])]
        values, member = values[~repeat], member[~repeat]  # multisets -> sets
        distinct = np.bincount(member, minlength=len(sides))
        pair_of = member % len(chunk)
        order = np.lexsort((values, pair_of))
        values, pair_of = values[order], pair_of[order]
        same = (values[1:] == values[:-1]) & (pair_of[1:] == pair_of[:-1])
        shared = np.bincount(pair_of[1:][same], minlength=len(chunk))
        out[start:stop] = shared / (distinct[: len(chunk)] + distinct[len(chunk) :] - shared)
        start = stop
    return out


@dataclasses.dataclass(frozen=True)
class NearDuplicates:
    """Texts → sets (texts whose shingle sets are equal share one), and near-duplicate set pairs."""

    set_of: np.ndarray  # [num_texts] int64 set id; -1: nothing left after boilerplate stripping
    pairs: np.ndarray  # [P, 2] int64 set ids a < b with Jaccard >= threshold
    jaccard: np.ndarray  # [P] float64

    def text_components(self) -> np.ndarray:
        """Component id per text: equal sets and near-duplicate pairs joined transitively."""
        num_sets = int(self.set_of.max(initial=-1)) + 1
        graph = coo_matrix(
            (np.ones(len(self.pairs)), (self.pairs[:, 0], self.pairs[:, 1])),
            shape=(num_sets, num_sets),
        )
        set_label = connected_components(graph, directed=False)[1] if num_sets else np.zeros(0)
        label = np.full(len(self.set_of), -1, np.int64)
        has_set = self.set_of >= 0
        label[has_set] = set_label[self.set_of[has_set]]
        label[~has_set] = num_sets + np.arange(int((~has_set).sum()))  # no shingles: alone
        return label


def near_duplicates(texts: Sequence[str], threshold: float = THRESHOLD) -> NearDuplicates:
    """Near-duplicate structure of normalised texts; depends on their content, not their order."""
    shingles, offsets = _shingles(texts)
    # One fingerprint per multiset (order-free sum of a second hash), then one id per distinct
    # one; a set that differs only in repeats gets its own id and is joined by LSH at J = 1.
    sizes = np.diff(offsets)
    nonempty = np.flatnonzero(sizes)
    fingerprint = np.zeros(len(texts), np.uint64)
    if len(shingles):
        sums = np.add.reduceat(_mix(shingles ^ _M2), offsets[nonempty])
        fingerprint[nonempty] = _mix(sums ^ (sizes[nonempty].astype(np.uint64) * _M1))
    set_of = np.full(len(texts), -1, np.int64)
    _, first, inverse = np.unique(fingerprint[nonempty], return_index=True, return_inverse=True)
    # Number sets by their content-ordered fingerprint so ids do not depend on the input order.
    set_of[nonempty] = inverse
    representative = nonempty[first]
    rep_offsets = np.r_[0, np.cumsum(sizes[representative])]
    rep_shingles = _gather(shingles, offsets, representative)
    pairs = _candidates(_signatures(rep_shingles, rep_offsets)) if len(representative) > 1 else None
    if pairs is None or not len(pairs):
        return NearDuplicates(set_of, np.zeros((0, 2), np.int64), np.zeros(0))
    jaccard = _jaccard(pairs, rep_shingles, rep_offsets)
    near = jaccard >= threshold
    return NearDuplicates(set_of, pairs[near], jaccard[near])
