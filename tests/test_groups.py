"""groups.py: the split keeps groups whole, is seeded and order-free; leaks named by file:line."""

import json
import random

import numpy as np
import pytest
from dedup_fixtures import planted

from configs import base
from sftjax.data import groups, pipeline, records


def _rows(seed: int = 0) -> tuple[list[records.Row], list[int]]:
    """Planted texts as rows (some split into instruction + input), with their family."""
    data = planted(seed)
    rng = random.Random(seed)
    rows = []
    for i, text in enumerate(data.texts):
        lines = text.split("\n")
        instruction, extra = (lines[0], "\n".join(lines[1:])) if rng.random() < 0.5 else (text, "")
        rows.append(records.Row(f"f.jsonl:{i + 1}", instruction, extra, f"answer {rng.random()}"))
    return rows, data.family


def _held_sources(rows, fraction=0.1, seed=0) -> set[str]:
    held, _ = groups.split(rows, fraction, seed)
    return {r.source for r, h in zip(rows, held, strict=True) if h}


def test_split_keeps_every_planted_family_on_one_side():
    rows, family = _rows()
    held, report = groups.split(rows, 0.1, seed=0)
    sides: dict[int, set[bool]] = {}
    for f, h in zip(family, held, strict=True):
        sides.setdefault(f, set()).add(bool(h))
    assert all(len(s) == 1 for s in sides.values())
    assert report.multi_row_groups == len([f for f in set(family) if family.count(f) > 1])
    assert report.summary().startswith(f"split: {held.sum()} of {len(rows)} rows held out")


def test_split_is_seeded_and_independent_of_row_order():
    rows, _ = _rows()
    shuffled = list(rows)
    random.Random(1).shuffle(shuffled)
    assert _held_sources(rows) == _held_sources(shuffled) == _held_sources(rows)
    assert _held_sources(rows, seed=0) != _held_sources(rows, seed=1)


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_realised_fraction_is_within_one_point(fraction, seed):
    rows, _ = _rows(seed)
    # Make large groups too: 40 responses to one instruction, 25 restyled copies of another.
    rows += [records.Row(f"g:{i}", "Name a colour.", "", f"colour {i}") for i in range(40)]
    rows += [records.Row(f"h:{i}", "NAME  A FRUIT" + "!" * i, "", "pear") for i in range(25)]
    held, report = groups.split(rows, fraction, seed)
    assert abs(held.mean() - fraction) <= 0.01 and report.realised == held.mean()
    assert report.largest_group == 40


def test_adding_rows_moves_only_a_few_held_out_rows():
    rows, _ = _rows()
    more = rows + [records.Row(f"new:{i}", f"fresh task {i} " * 3, "", "a") for i in range(100)]
    before, after = _held_sources(rows), _held_sources(more)
    assert len(before - after) <= 0.05 * len(before)


def _write(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _leaky_files(tmp_path) -> tuple[str, str, set[int]]:
    """Train / validation files with planted leaks; returns the leaking validation lines."""
    data = planted(seed=3)
    train, validation, leaking = [], [], set()
    seen: dict[int, int] = {}
    for text, f in zip(data.texts, data.family, strict=True):
        row = {"instruction": text, "output": f"answer {len(train) + len(validation)}"}
        if f in seen or (f % 5 == 0 and data.family.count(f) == 1):
            validation.append(row)
            if f in seen:
                leaking.add(len(validation))
        else:
            train.append(row)
            seen[f] = len(train)
    return (
        _write(tmp_path / "train.jsonl", train),
        _write(tmp_path / "validation.jsonl", validation),
        leaking,
    )


def _config(**overrides):
    data = base.get_config().data
    data.update(overrides)
    return data


def test_leakage_check_finds_planted_leaks_by_file_and_line(tmp_path):
    """Recall and precision over the planted leaks (each family's second text in validation,
    unrelated and same-preamble-different-task texts as clean validation rows): both >= 0.95;
    measured 1.000 and 1.000."""
    train, validation, leaking = _leaky_files(tmp_path)
    _, validation_rows, report = pipeline.read_splits(
        _config(train_files=train, validation_files=validation)
    )
    found = {int(leak.validation.rsplit(":", 1)[1]) for leak in report.leaks}
    recall = len(found & leaking) / len(leaking)
    precision = len(found & leaking) / len(found)
    print(f"planted leaks {len(leaking)}: recall {recall:.3f}, precision {precision:.3f}")
    assert recall >= 0.95 and precision >= 0.95 and len(leaking) == 310
    assert len(validation_rows) == report.validation_records.rows_kept  # "warn" keeps them
    assert {leak.kind for leak in report.leaks} == {"exact", "near"}
    leak = next(leak for leak in report.leaks if leak.kind == "near")
    assert str(leak).startswith(f"{validation}:") and f"of {train}:" in str(leak)
    assert "leakage: 310 of" in report.summary() and str(report.leaks[0]) in report.summary()


def test_leakage_policies_drop_and_fail(tmp_path):
    train = _write(tmp_path / "t.jsonl", [{"instruction": "Sort a list", "output": "sorted()"}])
    validation = _write(
        tmp_path / "v.jsonl",
        [
            {"instruction": "sort a LIST!", "output": "x.sort()"},
            {"instruction": "Add", "output": "+"},
        ],
    )
    config = _config(train_files=train, validation_files=validation, leakage="drop")
    _, kept, report = pipeline.read_splits(config)
    assert [r.source for r in kept] == [f"{validation}:2"]
    assert [str(leak) for leak in report.leaks] == [f"{validation}:1: same prompt as {train}:1"]
    config.leakage = "fail"
    with pytest.raises(groups.LeakageError, match=f"1 of 2 .*\n  {validation}:1: same prompt"):
        pipeline.read_splits(config)
    config.leakage = "maybe"
    with pytest.raises(ValueError, match="data.leakage 'maybe'"):
        pipeline.read_splits(config)


def test_largest_clusters_name_their_rows():
    rows = [records.Row(f"f:{i}", "Name a colour.", "", str(i)) for i in range(3)]
    rows += [records.Row("g:1", "NAME A COLOUR", "", "red"), records.Row("g:2", "Other", "", "x")]
    grouping = groups.group_rows(rows)
    assert groups.largest_clusters(rows, grouping) == [["f:0", "f:1", "f:2", "g:1"]]
    assert np.unique(grouping.group_of_row).size == 2


def _with_inputs(name: str, instruction: str, count: int) -> list[records.Row]:
    """Rows asking one instruction with distinct 25-word inputs (no two are near-duplicates)."""
    rng = random.Random(name)
    words = [f"{name}{i}" for i in range(200)]
    return [
        records.Row(f"{name}:{i}", instruction, " ".join(rng.sample(words, 25)), f"answer {i}")
        for i in range(count)
    ]


def test_an_instruction_alone_joins_its_rows_with_inputs_on_one_side():
    """An input-less "Summarise this text." links every row that asks it with an input into one
    group, on one side for every seed and fraction and any row order; rows that share only an
    instruction (a template with distinct inputs) stay separate groups; a chat row whose whole
    prompt is the instruction links like an input-less row."""
    filler, _ = _rows()
    n = len(filler)
    linked = _with_inputs("s", "Summarise this text.", 6)
    linked.append(records.Row("s:alone", "summarise THIS text!", "", "Which text?"))
    template = _with_inputs("t", "Translate to French.", 6)
    rows = filler + linked + template
    grouping = groups.group_rows(rows)
    group = grouping.group_of_row
    assert len(set(group[n : n + 7])) == 1
    assert len(set(group[n + 7 :])) == 6 and not set(group[n + 7 :]) & set(group[: n + 7])
    sides = set()
    for seed in range(6):
        for fraction in (0.05, 0.2, 0.5):
            held, _ = groups.split(rows, fraction, seed, grouping)
            assert len(set(held[n : n + 7])) == 1
            sides.add(bool(held[n]))
    assert sides == {True, False}  # the family was held out under some seeds, kept under others
    assert _held_sources(rows, 0.5) == _held_sources(rows[::-1], 0.5)
    chat = records.Row("c:1", messages=(("user", "Translate to French"), ("assistant", "Sure.")))
    assert np.unique(groups.group_rows([*template, chat]).group_of_row).size == 1


def test_leak_when_one_side_asks_the_instruction_without_input():
    train = [
        records.Row("t:1", "Summarise this text.", "The meeting moved to Friday.", "Friday."),
        records.Row("t:2", "List three fruits", "", "Apple, pear, plum."),
        records.Row("t:3", "Translate to French.", "Good morning", "Bonjour"),
    ]
    validation = [
        records.Row("v:1", "summarise this text", "", "Which text?"),
        records.Row("v:2", "List three fruits!", "For a salad.", "Apple, melon, grape."),
        records.Row("v:3", "Translate to French.", "Good night", "Bonne nuit"),  # not a leak
        records.Row("v:4", "List three fruits.", "", "Fig, kiwi, lime."),
    ]
    leaks, _ = groups.find_leaks(train, validation)
    assert [str(leak) for leak in leaks] == [
        "v:1: same instruction (one without input) as t:1",
        "v:2: same instruction (one without input) as t:2",
        "v:4: same prompt as t:2",
    ]
