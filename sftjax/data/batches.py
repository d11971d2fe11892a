"""Flat examples → packed, per-process numpy batches: the Grain datasets the trainer iterates.

Owns the per-epoch order (mixture.py draws it), first-fit packing, global batching, this
process's slice, and the Grain dataset/iterator whose `get_state()`/`set_state()` the trainer
checkpoints. Reads examples only from a flat.Split (a prepared dataset, memory-mapped), and
only those of this process's rows. Does not own encoding (pipeline.py), jax arrays (the
trainer calls `jax.make_array_from_process_local_data`), the loss.

Usage (the trainer):
    it = batches.train_batches(split, batch_size=B, seq_len=L, seed=…, num_epochs=…,
        process_index=jax.process_index(), process_count=jax.process_count(), mix=sources)
    for batch in it: ...   # {tokens, targets, loss_mask, segment_ids, positions}: [B/P, L] int32
    for batch in batches.validation_batches(split, batch_size=B, seq_len=L, …): ...  # each eval
`len(batches.train_dataset(...))` is the run's number of steps, known before training.

Batch vocabulary, all int32 [batch_per_process, seq_len]: `tokens`, `targets` (shifted per
example, so a target never crosses into the next example), `loss_mask` (0/1), `segment_ids`
(1, 2, … per row; 0 = padding) and `positions` (restart at 0 per example). Padding is zero.

Departure from a Grain packer (grain.experimental.FirstFitPackIterDataset): rows are planned
from example lengths by first-fit over open rows, once per epoch, for the *global* batch, and
each process materialises only its rows. So every process has the same number of batches
(collectives never hang at an epoch end), the global batch does not depend on the process
count, the number of steps is known up front, and the Grain iterator state is one index, which
resumes exactly. A plan is two int64 arrays (example indices row after row, row offsets), not
Python lists: a million examples plan in about a second a epoch and hold 16 bytes each.
"""

import math
from collections.abc import Sequence

import grain
import numpy as np

from sftjax.data import flat, mixture

KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
Batch = dict[str, np.ndarray]  # KEYS → int32 [batch_per_process, seq_len]


def plan_rows(lengths: Sequence[int], seq_len: int, num_bins: int) -> list[list[int]]:
    """First-fit packing over num_bins open rows: indices into lengths, one list per row.

    When no open row has room, the fullest one is closed; remaining rows close at the end.
    """
    open_rows: list[list[int]] = []
    free: list[int] = []
    rows = []
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens > seq_len {seq_len}; fit lengths first")
        for b, room in enumerate(free):
            if n <= room:
                open_rows[b].append(i)
                free[b] -= n
                break
        else:
            if len(open_rows) == num_bins:
                b = free.index(min(free))
                rows.append(open_rows.pop(b))
                free.pop(b)
            open_rows.append([i])
            free.append(seq_len - n)
    return rows + open_rows


class Plan:
    """Rows of examples: row r holds examples[offsets[r]:offsets[r + 1]] (indices into a Split)."""

    def __init__(self, examples: np.ndarray, offsets: np.ndarray):
        self.examples, self.offsets = examples, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, r: int) -> np.ndarray:
        return self.examples[self.offsets[r] : self.offsets[r + 1]]


def plan_epoch(order: np.ndarray, lengths: np.ndarray, seq_len: int, pack: bool, num_bins: int):
    """(example indices row after row, rows' sizes) of one epoch in `order`."""
    if not pack:
        return order.astype(np.int64), np.ones(len(order), np.int64)
    rows = plan_rows(lengths[order].tolist(), seq_len, num_bins)
    sizes = np.fromiter(map(len, rows), np.int64, len(rows))
    positions = np.fromiter((i for row in rows for i in row), np.int64, len(order))
    return order[positions].astype(np.int64), sizes


def _plan(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> Plan:
    examples = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    sizes = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return Plan(examples, offsets)


def make_batch(split: flat.Split, rows: Sequence[np.ndarray], seq_len: int) -> Batch:
    """Materialise rows (arrays of example indices) into one batch; empty rows are padding."""
    batch = {k: np.zeros((len(rows), seq_len), np.int32) for k in KEYS}
    arange = np.arange(seq_len, dtype=np.int32)
    flat_indices = [int(i) for row in rows for i in row]
    spans = split.spans(flat_indices)
    k = 0
    for r, row in enumerate(rows):
        start = 0
        for segment in range(1, len(row) + 1):
            end = start + len(spans["tokens"][k])
            for name in flat.TOKEN_ARRAYS:
                batch[name][r, start:end] = spans[name][k]
            batch["segment_ids"][r, start:end] = segment
            batch["positions"][r, start:end] = arange[: end - start]
            start, k = end, k + 1
    return batch


def _check_slicing(batch_size: int, process_index: int, process_count: int) -> None:
    if batch_size % process_count or not 0 <= process_index < process_count:
        raise ValueError(
            f"batch_size {batch_size} must split evenly over {process_count} processes "
            f"(process_index {process_index})"
        )


def _dataset(
    split: flat.Split,
    plan: Plan,
    seq_len: int,
    batch_size: int,
    process_index: int,
    process_count: int,
) -> grain.MapDataset:
    """Global batches of the plan's rows (the last padded with empty rows), this process's
    share of each: batch b holds rows b·B + p·B/P … + B/P - 1."""
    _check_slicing(batch_size, process_index, process_count)
    per_process = batch_size // process_count
    first = process_index * per_process
    empty = np.zeros(0, np.int64)

    def rows_of(b: int) -> list[np.ndarray]:
        indices = range(b * batch_size + first, b * batch_size + first + per_process)
        return [plan.row(r) if r < len(plan) else empty for r in indices]

    num_batches = math.ceil(len(plan) / batch_size)
    return grain.MapDataset.range(num_batches).map(
        lambda b: make_batch(split, rows_of(int(b)), seq_len)
    )


def train_plan(
    split: flat.Split,
    *,
    seq_len: int,
    seed: int,
    num_epochs: int,
    pack: bool = True,
    num_bins: int = 16,
    mix: Sequence[mixture.Source] = (),
) -> Plan:
    """Every epoch's rows back to back: a fresh seeded draw (mixture.epoch_order), packed anew."""
    if not len(split):
        raise ValueError("no training examples")
    lengths = split.lengths
    parts = []
    for epoch in range(num_epochs):
        order = mixture.epoch_order(seed, epoch, split.sources, lengths, mix)
        parts.append(plan_epoch(order, lengths, seq_len, pack, num_bins))
    return _plan(parts)


def train_dataset(
    split: flat.Split,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    num_epochs: int,
    process_index: int,
    process_count: int,
    pack: bool = True,
    num_bins: int = 16,
    mix: Sequence[mixture.Source] = (),
    plan: Plan | None = None,
) -> grain.MapDataset:
    """All of this process's training batches, random access; len() = steps in the run.

    batch_size is global. Epochs follow each other without a gap; only the run's last batch
    is padded. plan: train_plan(...) of the same arguments, computed beforehand (the start-up
    benchmark times it on its own).
    """
    if plan is None:
        plan = train_plan(
            split, seq_len=seq_len, seed=seed, num_epochs=num_epochs, pack=pack,
            num_bins=num_bins, mix=mix,
        )  # fmt: skip
    return _dataset(split, plan, seq_len, batch_size, process_index, process_count)


def iterate(dataset: grain.MapDataset, prefetch: int = 8) -> grain.DatasetIterator:
    """A checkpointable iterator over a train_dataset (get_state/set_state: one index)."""
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(read))


def train_batches(split: flat.Split, *, prefetch: int = 8, **kwargs) -> grain.DatasetIterator:
    """Iterator over train_dataset(split, **kwargs)."""
    return iterate(train_dataset(split, **kwargs), prefetch)


def validation_batches(
    split: flat.Split,
    *,
    batch_size: int,
    seq_len: int,
    process_index: int,
    process_count: int,
    pack: bool = True,
    num_bins: int = 16,
    source: int | None = None,
) -> grain.MapDataset:
    """Every validation example (of `source`, or all) exactly once, in stored order; iterate
    it again for each eval.

    The last batch is padded with empty rows (loss_mask 0), never dropped, and every process
    gets the same number of batches. Packed or not, Σ(ce·mask)/Σ(mask) is the same.
    """
    order = np.arange(len(split)) if source is None else np.flatnonzero(split.sources == source)
    plan = _plan([plan_epoch(order, split.lengths, seq_len, pack, num_bins)])
    return _dataset(split, plan, seq_len, batch_size, process_index, process_count)


def packing_stats(
    split: flat.Split, *, seq_len: int, seed: int = 0, num_bins: int = 16
) -> tuple[float, float]:
    """(real tokens / all tokens, examples per row) of one packed epoch, before batching."""
    plan = train_plan(split, seq_len=seq_len, seed=seed, num_epochs=1, num_bins=num_bins)
    real = int(split.lengths.sum())
    return real / (len(plan) * seq_len), len(split) / len(plan)
