"""Planted near-duplicates: families of texts derived from one base, and unrelated texts.

Word-level edits follow dedup.py's definition (1+2-gram Jaccard >= 0.8): one edit needs a text of
at least 14 words, two edits at least 30 (a substitution in n distinct words leaves Jaccard
(2n - 4) / (2n + 2), 0.8 at n = 14). Shared preambles are 40 words, used by 40+ texts each.
"""

import dataclasses
import random
import string

EDITS = ("substitute", "insert", "delete", "swap")


def _vocabulary(rng: random.Random, size: int = 4000) -> list[str]:
    words = {"".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(size)}
    return sorted(words)


@dataclasses.dataclass
class Planted:
    """texts[i] belongs to family[i]; texts of one family are near-duplicates, others are not."""

    texts: list[str] = dataclasses.field(default_factory=list)
    family: list[int] = dataclasses.field(default_factory=list)
    kind: list[str] = dataclasses.field(default_factory=list)  # how the text was made

    def add(self, family: int, kind: str, text: str) -> None:
        self.texts.append(text)
        self.family.append(family)
        self.kind.append(kind)


def _words(rng: random.Random, vocab: list[str], n: int) -> list[str]:
    # Zipf-like: common words recur across texts, as in real instructions.
    return rng.choices(vocab, weights=[1 / (r + 20) for r in range(len(vocab))], k=n)


def edit(rng: random.Random, words: list[str], vocab: list[str], kind: str) -> list[str]:
    """One word-level edit away from words (never at the very ends, so the length stays)."""
    words = list(words)
    i = rng.randrange(1, len(words) - 2)
    if kind == "substitute":
        words[i] = rng.choice([w for w in vocab[:500] if w not in words])
    elif kind == "insert":
        words.insert(i, rng.choice(vocab[:500]))
    elif kind == "delete":
        del words[i]
    else:
        words[i], words[i + 1] = words[i + 1], words[i]
    return words


def restyle(rng: random.Random, text: str) -> str:
    """Same words, other case, spacing and punctuation."""
    out = []
    for w in text.split():
        w = w.upper() if rng.random() < 0.2 else w.capitalize() if rng.random() < 0.2 else w
        out.append(w + rng.choice(["", "", ",", ";", ":"]) + rng.choice([" ", "  ", "\n"]))
    return "".join(out).strip() + rng.choice(["?", "!", ".", " ..."])


def planted(seed: int = 0) -> Planted:
    """~1000 texts: unrelated ones, edit / restyle families, and preambles with different tasks."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    out = Planted()
    family = 0

    def base(lo: int, hi: int) -> list[str]:
        return _words(rng, vocab, rng.randint(lo, hi))

    for _ in range(300):  # unrelated
        out.add(family, "single", " ".join(base(5, 60)))
        family += 1
    for k in range(160):  # one word-level edit
        words = base(15, 60)
        out.add(family, "base", " ".join(words))
        out.add(family, EDITS[k % 4], " ".join(edit(rng, words, vocab, EDITS[k % 4])))
        family += 1
    for k in range(60):  # two edits
        words = base(30, 60)
        edited = edit(rng, edit(rng, words, vocab, EDITS[k % 4]), vocab, EDITS[(k + 1) % 4])
        out.add(family, "base", " ".join(words))
        out.add(family, "two edits", " ".join(edited))
        family += 1
    for _ in range(60):  # case, whitespace, punctuation
        text = " ".join(base(3, 40))
        out.add(family, "base", text)
        out.add(family, "restyled", restyle(rng, text))
        family += 1
    preambles = [" ".join(base(40, 40)) for _ in range(3)]
    for p, preamble in enumerate(preambles):
        for _ in range(40):  # same preamble, different task: not near-duplicates
            out.add(family, "preamble", f"{preamble}\n{' '.join(base(6, 20))}")
            family += 1
        for k in range(10):  # a task with and without the preamble, one edit apart
            task = base(15, 30)
            out.add(family, "preamble", f"{preamble}\n{' '.join(task)}")
            edited = edit(rng, task, vocab, EDITS[k % 4])
            other = preambles[(p + 1) % 3] + "\n" if k % 2 else ""
            out.add(family, "preamble + edit", other + " ".join(edited))
            family += 1
    return out
