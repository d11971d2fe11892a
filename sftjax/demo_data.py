"""Synthetic instruction data and a tiny tokenizer for the built-in demo (no downloads).

Owns: ten task types with several phrasings each, the split (by instruction text: a test
instruction never appears in training; phrasings are shared; no validation prompt is one the
trainer's leakage check would call a near-duplicate of a training prompt, so the demo's own
data raises no warning), and a byte-level BPE tokenizer where every whitespace character and
every digit is its own token (plain BPE that merges digits and spaces breaks copying and
arithmetic at this model size) and each Alpaca template header is one token (examples shrink
from ~40 to ~26 tokens).
"""

import json
import pathlib
import random

import tokenizers
import transformers

from sftjax.data import groups, records

WORDS = (
    "apple river stone cloud tiger lemon paper glass music dream light storm honey candle "
    "garden silver forest window rocket bottle pencil marble shadow island winter summer "
    "dragon castle violet copper meadow thunder ocean planet bridge engine feather"
).split()
ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "early": "late",
    "open": "closed",
    "rich": "poor",
    "strong": "weak",
    "high": "low",
    "full": "empty",
    "young": "old",
    "hard": "soft",
    "wet": "dry",
    "loud": "quiet",
    "long": "short",
    "clean": "dirty",
    "thick": "thin",
    "near": "far",
    "first": "last",
}
CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Canada": "Ottawa",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Cuba": "Havana",
    "Chile": "Santiago",
    "Poland": "Warsaw",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Portugal": "Lisbon",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Thailand": "Bangkok",
    "Germany": "Berlin",
}

PHRASINGS = {
    "reverse": (
        "Reverse the order of these words: {x}",
        "Write these words backwards: {x}",
        "Put the words in reverse order: {x}",
    ),
    "add": ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}."),
    "sort": (
        "Sort these numbers from smallest to largest: {x}",
        "Order ascending: {x}",
        "Arrange in increasing order: {x}",
    ),
    "uppercase": (
        "Write this in capital letters: {x}",
        "Convert to uppercase: {x}",
        "Make these words uppercase: {x}",
    ),
    "count": (
        "How many letters are in the word {x}?",
        "Count the letters of {x}.",
        "What is the length of the word {x}?",
    ),
    "antonym": (
        "What is the opposite of {x}?",
        "Give an antonym of {x}.",
        "Name the opposite of the word {x}.",
    ),
    "capital": (
        "What is the capital of {x}?",
        "Name the capital city of {x}.",
        "Which city is the capital of {x}?",
    ),
    "first_letter": (
        "What is the first letter of {x}?",
        "Which letter does {x} start with?",
        "Give the initial letter of {x}.",
    ),
    "repeat": (
        "Repeat the word {w} {n} times.",
        "Say {w} {n} times.",
        "Write the word {w} exactly {n} times.",
    ),
    "largest": (
        "Which number is the largest: {x}?",
        "Find the maximum of {x}.",
        "What is the biggest number among {x}?",
    ),
}
TASKS = tuple(PHRASINGS)


def make_item(task: str, rng: random.Random) -> dict:
    """One {task, instruction, response} row of `task` with a random phrasing and content."""
    phrasing = rng.choice(PHRASINGS[task])
    if task == "reverse":
        words = rng.sample(WORDS, rng.randint(2, 4))
        return _row(task, phrasing.format(x=" ".join(words)), " ".join(reversed(words)))
    if task == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return _row(task, phrasing.format(a=a, b=b), str(a + b))
    if task in ("sort", "largest"):
        numbers = rng.sample(range(100), rng.randint(3, 5))
        text = ", ".join(map(str, numbers))
        answer = ", ".join(map(str, sorted(numbers))) if task == "sort" else str(max(numbers))
        return _row(task, phrasing.format(x=text), answer)
    if task == "uppercase":
        words = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
        return _row(task, phrasing.format(x=words), words.upper())
    if task in ("count", "first_letter"):
        word = rng.choice(WORDS)
        return _row(task, phrasing.format(x=word), str(len(word)) if task == "count" else word[0])
    if task in ("antonym", "capital"):
        table = ANTONYMS if task == "antonym" else CAPITALS
        key = rng.choice(sorted(table))
        return _row(task, phrasing.format(x=key), table[key])
    if task == "repeat":
        word, n = rng.choice(WORDS), rng.randint(2, 4)
        return _row(task, phrasing.format(w=word, n=n), " ".join([word] * n))
    raise ValueError(f"unknown task {task!r}")


def _row(task: str, instruction: str, response: str) -> dict:
    return {"task": task, "instruction": instruction, "response": response}


REDRAWS = 5  # rounds of replacing leaking validation rows; what still leaks then is left out


def _leaking(train: list[dict], validation: list[dict]) -> set[int]:
    """Indices of validation rows whose prompt groups.find_leaks finds among training's."""

    def as_rows(rows: list[dict], name: str) -> list[records.Row]:
        return [
            records.Row(f"{name}:{i}", instruction=r["instruction"], response=r["response"])
            for i, r in enumerate(rows)
        ]

    if not train or not validation:
        return set()
    leaks, _ = groups.find_leaks(as_rows(train, "t"), as_rows(validation, "v"))
    return {int(leak.validation.removeprefix("v:")) for leak in leaks}


def make_splits(seed: int, n_train: int, n_val: int, n_test_per_task: int):
    """(train, validation, test) rows with pairwise disjoint instruction texts; no validation
    prompt is an exact or near-duplicate (groups.find_leaks) of a training prompt."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw(count: int, tasks) -> list[dict]:
        # Round-robin over tasks; small lookup tables run out of unseen instructions, so
        # stop after many misses rather than loop forever (those tasks get fewer rows).
        rows, attempt, misses = [], 0, 0
        while len(rows) < count and misses < 200 * len(tasks):
            row = make_item(tasks[attempt % len(tasks)], rng)
            attempt += 1
            if row["instruction"] in seen:
                misses += 1
                continue
            seen.add(row["instruction"])
            rows.append(row)
        return rows

    test = []
    for task in TASKS:  # test first, so every task gets its quota of unseen instructions
        test += draw(n_test_per_task, (task,))
    train, validation = draw(n_train, TASKS), draw(n_val, TASKS)
    for redraw in range(REDRAWS + 1):  # templated tasks: "uppercase: shadow honey" vs "...: shadow"
        leaking = _leaking(train, validation)
        if not leaking or redraw == REDRAWS:
            break
        # Each leaking row is replaced in place by a fresh one of its task (none if exhausted).
        validation = [
            new
            for i, row in enumerate(validation)
            for new in (draw(1, (row["task"],)) if i in leaking else [row])
        ]
    return train, [r for i, r in enumerate(validation) if i not in leaking], test


def write_jsonl(rows: list[dict], path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TEMPLATE_PIECES = ("### Instruction:\n", "\n\n### Input:\n", "\n\n### Response:\n")


def train_tokenizer(texts: list[str], out_dir: pathlib.Path, vocab_size: int = 512) -> int:
    """Train and save a HF tokenizer directory; returns its vocabulary size."""
    pieces = tokenizers.pre_tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pieces.Sequence(
        [
            pieces.Split(tokenizers.Regex(r"\s"), behavior="isolated"),
            pieces.Digits(individual_digits=True),
            pieces.Punctuation(),
            pieces.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size - len(TEMPLATE_PIECES),
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pieces.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # The template's headers as whole tokens: 3 tokens of scaffolding per example instead of
    # 17 single characters, so a packed row holds ~1.5x more examples for the same compute.
    tok.add_tokens([tokenizers.AddedToken(h, normalized=False) for h in TEMPLATE_PIECES])
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    hf.save_pretrained(out_dir)
    return tok.get_vocab_size()
