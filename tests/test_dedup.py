"""dedup.py: normalisation, and near-duplicates found by MinHash LSH equal the exact answer."""

import itertools
import random
import string

import numpy as np
from dedup_fixtures import planted

from sftjax.data import dedup


def test_normalize_ignores_case_punctuation_and_whitespace():
    assert dedup.normalize("  Hello,\tWORLD!  It's   fine...") == "hello world its fine"
    assert dedup.normalize("snake_case-and\u00a0nbsp") == "snake case and nbsp"
    assert dedup.normalize("Ｆｕｌｌ width, Ünïcödé") == "full width ünïcödé"
    assert dedup.normalize("?!...") == ""
    rng = random.Random(0)
    for _ in range(200):  # the ASCII fast path agrees with the Unicode path
        text = "".join(rng.choices(string.printable, k=40))
        assert dedup.normalize(text) == dedup.normalize(text + " é")[:-2].strip()


def _text_pairs(texts, near: dedup.NearDuplicates) -> set[tuple[int, int]]:
    """Pairs of text indices that near reports: equal sets, or a verified set pair."""
    by_set: dict[int, list[int]] = {}
    for t, s in enumerate(near.set_of):
        if s >= 0:
            by_set.setdefault(int(s), []).append(t)
    pairs = {p for members in by_set.values() for p in itertools.combinations(members, 2)}
    for a, b in near.pairs:
        pairs |= {tuple(sorted(p)) for p in itertools.product(by_set[a], by_set[b])}
    return pairs


def _shingles(text: str) -> set:
    """1- and 2-grams of words, straight from the definition (no boilerplate in these texts)."""
    w = text.split()
    return set(w) | set(zip(w, w[1:], strict=False))


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def test_planted_near_duplicates_recall_and_precision():
    """Recall and precision over planted families (edits, restyling, shared preambles): >= 0.95.

    Measured: recall 1.000 (all 310 planted pairs), precision 1.000 (no pair
    across families, so none of the 120 "same preamble, different task" texts match).
    """
    data = planted()
    texts = [dedup.normalize(t) for t in data.texts]
    found = _text_pairs(texts, dedup.near_duplicates(texts))
    truth = {
        (i, j)
        for i, j in itertools.combinations(range(len(texts)), 2)
        if data.family[i] == data.family[j]
    }
    hits = found & truth
    recall, precision = len(hits) / len(truth), len(hits) / max(1, len(found))
    missed = sorted({data.kind[j] for i, j in truth - found})
    print(f"planted pairs {len(truth)}: recall {recall:.3f}, precision {precision:.3f}, {missed=}")
    assert len(truth) == 310
    assert recall >= 0.95 and precision >= 0.95
    preamble_only = [i for i, k in enumerate(data.kind) if k == "preamble"]
    assert not {p for p in found if p[0] in preamble_only and p[1] in preamble_only}


def test_lsh_finds_every_pair_that_exact_jaccard_finds():
    """Against all-pairs exact Jaccard (no preambles here): same pairs, same Jaccard values.

    Measured: 860 texts, 280 pairs at Jaccard >= 0.8 by brute force, all 280 found by LSH."""
    data = planted(seed=1)
    texts = [dedup.normalize(t) for t, k in zip(data.texts, data.kind, strict=True)]
    texts = [t for t, k in zip(texts, data.kind, strict=True) if "preamble" not in k]
    near = dedup.near_duplicates(texts)
    sets = [_shingles(t) for t in texts]
    exact = {
        (i, j)
        for i, j in itertools.combinations(range(len(texts)), 2)
        if _jaccard(sets[i], sets[j]) >= dedup.THRESHOLD
    }
    found = _text_pairs(texts, near)
    assert found <= exact  # verified pairs are exact
    assert len(found) >= 0.99 * len(exact) and len(exact) > 250
    rep = {int(s): t for t, s in enumerate(near.set_of)}
    for (a, b), j in zip(near.pairs, near.jaccard, strict=True):
        assert j == _jaccard(sets[rep[a]], sets[rep[b]])


def test_result_does_not_depend_on_text_order():
    texts = [dedup.normalize(t) for t in planted(seed=2).texts]
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    first = _text_pairs(texts, dedup.near_duplicates(texts))
    moved = [texts[i] for i in order]
    shuffled = _text_pairs(moved, dedup.near_duplicates(moved))
    assert {tuple(sorted((order[i], order[j]))) for i, j in shuffled} == first


def test_boilerplate_runs_are_ignored_and_short_texts_compare_whole():
    preamble = "you are a helpful assistant with tools search calculator and a calendar use them"
    tasks = [
        "book a table for two at eight tonight",
        "what is the weather in paris tomorrow",
        "add lunch with sam to my calendar on friday",
        "how many days until the end of march",
        "find a cheap flight from oslo to rome",
        "multiply 1234 by 5678 and round it",
        "search recent news about solar panels",
        "remind me to call mum at noon",
        "convert 30 euros into japanese yen please",
        "list three museums near the louvre",
        "when does the next train to leeds leave",
        "summarise my meetings for next week",
    ]
    texts = [f"{preamble} {task}" for task in tasks]
    texts += ["how many days until the end of march", "convert celsius to fahrenheit"]
    texts += ["convert fahrenheit to celsius", "", "hi"]
    near = dedup.near_duplicates(texts)
    assert (near.set_of[[14, 15]] == -1).tolist() == [False, True]  # "" has no shingles
    groups = near.text_components()
    assert groups[3] == groups[12]  # preamble + X and X
    assert len(set(groups[:12])) == 12  # same preamble, different tasks
    assert groups[13] != groups[14]  # word order matters (Jaccard 0.4)
    assert len(np.unique(groups)) == len(texts) - 1
    assert dedup.near_duplicates([]).text_components().tolist() == []
    assert dedup.near_duplicates(["", ""]).text_components().tolist() == [0, 1]
