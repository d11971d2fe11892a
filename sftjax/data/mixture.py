"""Several data sources mixed by weight: what `data.mixture` means and each epoch's draw.

Owns parsing `data.mixture` (a command-line string "alpaca/*.jsonl:3,chats.jsonl:1" or a
tuple of dicts in a config file) into Sources, and the sampler: a pure function of (seed,
epoch, weights, units, the examples' sources and lengths), so every process draws the same
epoch and a resumed run the same order. Does not own reading files (records.py), the split
(groups.py) nor packing (batches.py).

What a weight means: source s gets the share w_s / Σw of each epoch, measured in its unit.
An epoch is as large as all sources together (Σ tokens, or Σ rows for sources weighed in
rows), so weights 1:1 over two equal sources is a plain epoch over both. A source drawn past
its size repeats its examples in a fresh order each time round (upsampling); one drawn below
it sees a different subset each epoch (downsampling), so every example is used over epochs.
Default unit: tokens, because the loss is token-weighted and a step's compute is per token:
a token share is the share of gradient signal and of training time. In rows, a source of long
answers would take more than its weight.
"""

import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np

from sftjax.data import records

UNITS = ("tokens", "rows")
FIELDS = ("files", "weight", "format", "unit", "name")


class MixtureError(records.DataError):
    """data.mixture is malformed: the message says which part and what to write instead."""


@dataclasses.dataclass(frozen=True)
class Source:
    name: str  # in logs and metrics ("eval/loss_<name>"); from the files unless given
    files: str  # comma-free: one path or glob (local or URL) per source
    weight: float
    format: str  # row format, as data.format ("auto": the first row's keys decide)
    unit: str  # "tokens" or "rows"


EXAMPLE = '"alpaca/*.jsonl:3,chats.jsonl:1" or (dict(files="chats.jsonl", weight=1),)'


def parse(mixture, default_format: str, default_unit: str) -> list[Source]:
    """data.mixture → Sources; an empty mixture → [] (data.train_files is the one source)."""
    if not mixture:
        return []
    if default_unit not in UNITS:
        raise MixtureError(f"data.mixture_unit must be one of {UNITS}, got {default_unit!r}")
    items = mixture.split(",") if isinstance(mixture, str) else list(mixture)
    sources = []
    for item in items:
        spec = _from_text(item) if isinstance(item, str) else _from_dict(item)
        unit = spec.get("unit", default_unit)
        if unit not in UNITS:
            raise MixtureError(f"data.mixture: unit {unit!r} of {spec['files']} is not in {UNITS}")
        sources.append(
            Source(
                name=str(spec.get("name") or _name(spec["files"])),
                files=spec["files"],
                weight=spec["weight"],
                format=spec.get("format", default_format),
                unit=unit,
            )
        )
    names = [s.name for s in sources]
    for i, s in enumerate(sources):  # two sources named alike get their position appended
        if names.count(s.name) > 1:
            sources[i] = dataclasses.replace(s, name=f"{s.name}{i}")
    return sources


def _from_text(item: str) -> dict:
    files, sep, weight = item.strip().rpartition(":")
    if not sep or not files or "://" in weight:
        raise MixtureError(
            f"data.mixture: {item!r} has no weight; write FILES:WEIGHT, e.g. {EXAMPLE}"
        )
    return {"files": files, "weight": _weight(weight, files)}


def _from_dict(item) -> dict:
    if not hasattr(item, "keys") or "files" not in item:
        raise MixtureError(f"data.mixture: {item!r} is not a dict with 'files'; e.g. {EXAMPLE}")
    unknown = sorted(set(item.keys()) - set(FIELDS))
    if unknown:
        raise MixtureError(f"data.mixture: unknown key(s) {unknown} in {item!r}; keys: {FIELDS}")
    return {**item, "weight": _weight(item.get("weight", 1.0), item["files"])}


def _weight(value, files: str) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = float("nan")
    if not weight > 0 or weight == float("inf"):
        raise MixtureError(
            f"data.mixture: the weight of {files} must be a number > 0, got {value!r}"
        )
    return weight


def _name(files: str) -> str:
    """'data/alpaca/*.jsonl' → 'alpaca', 'chats.jsonl' → 'chats': the most telling part."""
    parts = [p for p in files.rstrip("/").split("/") if p and "*" not in p and "?" not in p]
    stem = os.path.splitext(parts[-1])[0] if parts else "source"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "source"


def epoch_order(
    seed: int,
    epoch: int,
    sources: np.ndarray,
    lengths: np.ndarray,
    mix: Sequence[Source],
) -> np.ndarray:
    """The training examples of one epoch, in order (indices, repeats allowed).

    sources / lengths: int [n] per example. With one source (no mixture) this is the plain
    seeded permutation of all examples. Otherwise each source is drawn in its own seeded
    order, cycled when it is upsampled, up to its share, and the draws are shuffled together.
    """
    n = len(lengths)
    if len(mix) <= 1:
        return np.random.default_rng([seed, epoch]).permutation(n)
    total_weight = sum(s.weight for s in mix)
    picked = []
    for s, source in enumerate(mix):
        members = np.flatnonzero(sources == s)
        if not len(members):
            continue
        share = source.weight / total_weight
        rng = np.random.default_rng([seed, epoch, s + 1])
        if source.unit == "rows":
            count = round(share * n)
            rounds = -(-count // len(members))
        else:
            budget = share * lengths.sum()
            rounds = int(budget // lengths[members].sum()) + 1
        cycled = np.concatenate([members[rng.permutation(len(members))] for _ in range(rounds)])
        if source.unit == "tokens":  # the prefix of its own order closest to its budget
            reached = np.cumsum(lengths[cycled])
            count = int(np.searchsorted(reached, budget))
            if count < len(cycled) and (
                count == 0 or reached[count] - budget < budget - reached[count - 1]
            ):
                count += 1
        picked.append(cycled[:count])
    drawn = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    return drawn[np.random.default_rng([seed, epoch]).permutation(len(drawn))]
