"""Rows → groups that must stay on one side of a split, the grouped split, and the leakage check.

Owns: what a row is compared by (its prompt: instruction + input, or the system and user turns
of a chat), grouping rows by normalised prompt and by near-duplicate cluster (dedup.py), the
seeded validation split that assigns whole groups, and the leakage check between training and
given validation rows (`data.leakage`). Does not own: reading rows (records.py), the
near-duplicate algorithm (dedup.py), encoding (pipeline.py).

Why groups: a split by row puts the same instruction with another response, or the same task
in other words, on both sides, and the validation loss then rewards memorising training rows.
The same holds for an instruction asked alone and with an input ("Summarise this." and
"Summarise this." + a text): a row with an input also joins the group of the prompt that is
its instruction alone (`Grouping.instruction_prompt_of_row`). Two rows with one instruction
and two different inputs are not joined by that alone: template-heavy sets reuse one
instruction for thousands of distinct inputs, and joining them would put whole task families
on one side of the split. They share a group only through a row that asks the instruction
alone, or when their prompts are near-duplicates.
"""

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from sftjax.data import dedup, records

LEAKAGE_POLICIES = ("warn", "drop", "fail")
MAX_QUOTED = 10  # leaks and cluster members quoted by file:line


def prompt_text(row: records.Row) -> str:
    """What the model is asked: instruction + input, or every system and user turn of a chat."""
    if row.messages:
        return "\n".join(content for role, content in row.messages if role != "assistant")
    return f"{row.instruction}\n{row.input}"


def response_text(row: records.Row) -> str:
    """What the model is trained to answer: the response, or the last assistant turn."""
    if row.messages:
        return next(content for role, content in reversed(row.messages) if role == "assistant")
    return row.response


@dataclasses.dataclass(frozen=True)
class Grouping:
    """Rows → distinct normalised prompts → near-duplicate sets and instruction links → groups."""

    prompts: list[str]  # distinct normalised prompts, sorted
    prompt_of_row: np.ndarray  # [num_rows] index into prompts
    # [num_rows] index into prompts of a row's instruction alone, for rows with an input whose
    # normalised instruction is some row's whole prompt; -1 otherwise (and for chat rows)
    instruction_prompt_of_row: np.ndarray
    near: dedup.NearDuplicates  # over prompts
    group_of_prompt: np.ndarray  # [num_prompts] component id

    @property
    def group_of_row(self) -> np.ndarray:
        """[num_rows] group id: rows with equal or near-duplicate prompts share one."""
        return self.group_of_prompt[self.prompt_of_row]


def _instruction_keys(rows: Sequence[records.Row], keys: Sequence[str]) -> list[str]:
    """Normalised instruction of each row with an input; "" for chat rows and rows without one.

    A row has no input when its input normalises to nothing: then its prompt key already is its
    instruction alone. Only rows with a non-blank input pay for a second normalisation.
    """
    out = []
    for row, key in zip(rows, keys, strict=True):
        alone = "" if row.messages or not row.input.strip() else dedup.normalize(row.instruction)
        out.append("" if alone == key else alone)
    return out


def _join(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component id per node after also joining labels[a] with labels[b] (renumbered 0..)."""
    n = int(labels.max(initial=-1)) + 1
    graph = coo_matrix((np.ones(len(a)), (labels[a], labels[b])), shape=(n, n))
    return connected_components(graph, directed=False)[1][labels].astype(np.int64)


def group_rows(rows: Sequence[records.Row]) -> Grouping:
    """Group rows by normalised prompt, near-duplicate cluster and instruction alone (a row with
    an input joins the prompt equal to its instruction); independent of row order."""
    keys = [dedup.normalize(prompt_text(r)) for r in rows]
    prompts = sorted(set(keys))
    index = {p: i for i, p in enumerate(prompts)}
    instructions = _instruction_keys(rows, keys)
    alone = np.array([index.get(k, -1) if k else -1 for k in instructions], np.int64)
    prompt_of_row = np.array([index[k] for k in keys], np.int64)
    near = dedup.near_duplicates(prompts)
    linked = np.flatnonzero(alone >= 0)
    group_of_prompt = near.text_components()
    if len(linked):
        group_of_prompt = _join(group_of_prompt, prompt_of_row[linked], alone[linked])
    return Grouping(prompts, prompt_of_row, alone, near, group_of_prompt)


@dataclasses.dataclass
class SplitReport:
    """What the grouped split did, for the log and the data report."""

    requested: float  # validation_fraction asked for
    rows: int = 0
    validation_rows: int = 0
    groups: int = 0
    multi_row_groups: int = 0  # groups of more than one row (equal or near-duplicate prompts)
    largest_group: int = 0  # rows

    @property
    def realised(self) -> float:
        """Validation rows / all rows."""
        return self.validation_rows / self.rows if self.rows else 0.0

    def summary(self) -> str:
        """One line; says when the realised fraction is more than 1 point off the request."""
        line = (
            f"split: {self.validation_rows} of {self.rows} rows held out "
            f"({100 * self.realised:.2f} %, requested {100 * self.requested:.2f} %) as whole "
            f"groups: {self.groups} groups, {self.multi_row_groups} with several rows, "
            f"largest {self.largest_group} rows"
        )
        if abs(self.realised - self.requested) > 0.01:
            line += " (more than 1 point off: a few groups are too large to balance)"
        return line


def _group_rank(name: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\0{name}".encode()).digest()


def split(
    rows: Sequence[records.Row], fraction: float, seed: int, grouping: Grouping | None = None
) -> tuple[np.ndarray, SplitReport]:
    """Boolean [num_rows] held-out mask that takes whole groups until fraction of the rows.

    Groups are ranked by a seeded hash of their name (their smallest normalised prompt) and taken
    in that order while a group brings the count closer to the target. The result depends on the
    content and the seed only: not on row order, and adding rows moves only groups near the cut.
    """
    grouping = grouping or group_rows(rows)
    group = grouping.group_of_row
    report = SplitReport(requested=fraction, rows=len(rows))
    if not len(rows):
        return np.zeros(0, bool), report
    labels, group, sizes = np.unique(group, return_inverse=True, return_counts=True)
    name = {}
    for prompt, label in enumerate(grouping.group_of_prompt):  # prompts are sorted: first = min
        name.setdefault(label, grouping.prompts[prompt])
    target = round(fraction * len(rows))
    taken = np.zeros(len(labels), bool)
    count = 0
    for g in sorted(range(len(labels)), key=lambda g: _group_rank(name[labels[g]], seed)):
        if count >= target:
            break
        if count + sizes[g] / 2 < target:
            taken[g] = True
            count += int(sizes[g])
    held = taken[group]
    report.validation_rows = int(held.sum())
    report.groups = len(labels)
    report.multi_row_groups = int((sizes > 1).sum())
    report.largest_group = int(sizes.max())
    return held, report


@dataclasses.dataclass(frozen=True)
class Leak:
    """A validation row whose prompt equals (kind "exact") or nearly equals ("near") a training
    prompt, or whose instruction alone is a training prompt or the reverse ("instruction")."""

    validation: str  # file:line
    train: str  # file:line of one matching training row
    kind: str  # "exact", "instruction" or "near"
    jaccard: float  # 1.0 unless near

    def __str__(self) -> str:
        how = {"exact": "same prompt as", "instruction": "same instruction (one without input) as"}
        how = how.get(self.kind, f"near-duplicate (J={self.jaccard:.2f}) of")
        return f"{self.validation}: {how} {self.train}"


def find_leaks(
    train_rows: Sequence[records.Row], validation_rows: Sequence[records.Row]
) -> tuple[list[Leak], Grouping]:
    """Every validation row with an exact or near-duplicate prompt among the training rows, or
    with the same instruction as a training row where one of the two has no input (the rule
    group_rows applies: a validation row whose instruction alone is a training row's whole
    prompt, or whose whole prompt is a training row's instruction alone).

    Only direct matches count (a chain through other validation rows does not). Also returns
    the grouping of all rows (training first), for the data report.
    """
    everything = [*train_rows, *validation_rows]
    grouping = group_rows(everything)
    n_train = len(train_rows)
    prompt = grouping.prompt_of_row
    alone = grouping.instruction_prompt_of_row
    set_of = grouping.near.set_of
    first_train_of_prompt: dict[int, int] = {}
    first_train_asking: dict[int, int] = {}  # prompt → first training row with it as instruction
    first_train_of_set: dict[int, int] = {}
    for r in range(n_train):
        first_train_of_prompt.setdefault(int(prompt[r]), r)
        if alone[r] >= 0:
            first_train_asking.setdefault(int(alone[r]), r)
        if set_of[prompt[r]] >= 0:
            first_train_of_set.setdefault(int(set_of[prompt[r]]), r)
    partners: dict[int, list[tuple[float, int]]] = {}
    for (a, b), j in zip(grouping.near.pairs, grouping.near.jaccard, strict=True):
        partners.setdefault(int(a), []).append((float(j), int(b)))
        partners.setdefault(int(b), []).append((float(j), int(a)))
    leaks = []
    for r in range(n_train, len(everything)):
        source = everything[r].source
        if int(prompt[r]) in first_train_of_prompt:
            train = everything[first_train_of_prompt[int(prompt[r])]].source
            leaks.append(Leak(source, train, "exact", 1.0))
            continue
        train = first_train_of_prompt.get(int(alone[r]), first_train_asking.get(int(prompt[r])))
        if train is not None:
            leaks.append(Leak(source, everything[train].source, "instruction", 1.0))
            continue
        own = int(set_of[prompt[r]])
        matches = [(1.0, own)] if own in first_train_of_set else []
        matches += [(j, s) for j, s in partners.get(own, []) if s in first_train_of_set]
        if own >= 0 and matches:
            j, s = max(matches)
            leaks.append(Leak(source, everything[first_train_of_set[s]].source, "near", j))
    return leaks, grouping


class LeakageError(records.DataError):
    """Raised under data.leakage="fail": the message names the first leaking pairs."""

    def __init__(self, leaks: Sequence[Leak], num_validation: int):
        quoted = "\n".join(f"  {leak}" for leak in leaks[:MAX_QUOTED])
        super().__init__(
            f"{len(leaks)} of {num_validation} validation rows have their prompt in the training "
            f"rows (exactly, nearly, or as one instruction with and without input); remove them "
            f"or set data.leakage='drop' or 'warn'\n" + quoted
        )


def largest_clusters(
    rows: Sequence[records.Row], grouping: Grouping, count: int = 5
) -> list[list[str]]:
    """The largest groups of more than one row (equal or near-duplicate prompts), as lists of
    file:line, largest first."""
    members: dict[int, list[str]] = {}
    for row, g in zip(rows, grouping.group_of_row, strict=True):
        members.setdefault(int(g), []).append(row.source)
    clusters = sorted((m for m in members.values() if len(m) > 1), key=lambda m: (-len(m), m[0]))
    return clusters[:count]
