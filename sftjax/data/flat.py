"""Encoded examples as flat arrays: what a prepared dataset stores and the batcher reads.

Owns the layout (one split = five arrays: every example's `tokens`, `targets` and `loss_mask`
laid end to end, `offsets` [n + 1] where example i is [offsets[i], offsets[i + 1]), and
`sources` [n], the mixture source of each example), building it from examples in memory,
writing it as raw little-endian files, and opening it again memory-mapped (local) or by byte
ranges (object storage), so a process touches only the examples of its own batches.
Does not own what the examples are (pipeline.py encodes them) nor the manifest (prepare.py).

Why flat: a million examples as Python objects cost ~30 KB each (three arrays, their headers
and the lists holding them); flat, they cost their ids (4 bytes a token, a byte of mask) and
16 bytes of index, and a restart maps them instead of rebuilding them.
"""

import dataclasses
import os
import threading
from collections.abc import Sequence

import fsspec
import numpy as np

from sftjax import paths
from sftjax.data.tokenize import Example

# name → dtype of each file; token arrays are per token, offsets per example + 1, sources per
# example. Raw little-endian bytes (`<name>.bin`): numpy maps them, any reader can.
DTYPES = {
    "tokens": np.dtype("<i4"),
    "targets": np.dtype("<i4"),
    "loss_mask": np.dtype("u1"),
    "offsets": np.dtype("<i8"),
    "sources": np.dtype("<i2"),
}
TOKEN_ARRAYS = ("tokens", "targets", "loss_mask")


@dataclasses.dataclass(frozen=True)
class Split:
    """The examples of one split, flat. Token arrays may be memory maps or remote readers."""

    tokens: "np.ndarray | RemoteArray"
    targets: "np.ndarray | RemoteArray"
    loss_mask: "np.ndarray | RemoteArray"
    offsets: np.ndarray  # int64 [n + 1], read whole (8 bytes an example)
    sources: np.ndarray  # int16 [n], read whole

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """int64 [n]: tokens per example (after the shift)."""
        return np.diff(self.offsets)

    def example(self, i: int) -> dict[str, np.ndarray]:
        """One example's arrays (tests, debugging; batches use `spans`)."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return {name: np.asarray(getattr(self, name)[start:end]) for name in TOKEN_ARRAYS}

    def spans(self, indices: Sequence[int]) -> dict[str, list[np.ndarray]]:
        """The token arrays of `indices`, in that order: what one batch reads."""
        indices = np.asarray(indices, np.int64)
        starts, ends = self.offsets[indices], self.offsets[indices + 1]
        out = {}
        for name in TOKEN_ARRAYS:
            array = getattr(self, name)
            if isinstance(array, RemoteArray):
                out[name] = array.read_spans(starts, ends)
            else:
                out[name] = [array[s:e] for s, e in zip(starts, ends, strict=True)]
        return out


def from_examples(examples: Sequence[Example], sources: Sequence[int] | None = None) -> Split:
    """Examples in memory → one Split (copies the ids once)."""
    lengths = np.fromiter((len(e) for e in examples), np.int64, len(examples))
    offsets = np.zeros(len(examples) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])

    def joined(name: str) -> np.ndarray:
        parts = [getattr(e, name) for e in examples]
        dtype = DTYPES[name]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    source_ids = np.zeros(len(examples), np.int16) if sources is None else sources
    return Split(
        *(joined(name) for name in TOKEN_ARRAYS),
        offsets=offsets,
        sources=np.asarray(source_ids, DTYPES["sources"]),
    )


class Writer:
    """Appends encoded examples to the five files of one split in a local directory.

    Preparation encodes in chunks and appends each, so the whole split is never in memory.
    """

    def __init__(self, directory: str | os.PathLike):
        os.makedirs(directory, exist_ok=True)
        self._files = {n: open(os.path.join(directory, f"{n}.bin"), "wb") for n in DTYPES}
        self._end = 0
        self._files["offsets"].write(np.zeros(1, DTYPES["offsets"]).tobytes())
        self.examples = 0
        self.tokens = 0
        self.loss_tokens = 0
        self.max_token_id = 0

    def append(self, examples: Sequence[Example], sources: Sequence[int]) -> None:
        """Examples, and the mixture source of each."""
        if not examples:
            return
        part = from_examples(examples, sources)
        self.max_token_id = max(self.max_token_id, int(part.tokens.max()), int(part.targets.max()))
        for name in TOKEN_ARRAYS:
            self._files[name].write(getattr(part, name).tobytes())
        self._files["offsets"].write((part.offsets[1:] + self._end).tobytes())
        self._files["sources"].write(part.sources.tobytes())
        self._end += int(part.offsets[-1])
        self.examples += len(examples)
        self.tokens += int(part.offsets[-1])
        self.loss_tokens += int(part.loss_mask.sum(dtype=np.int64))

    def close(self) -> dict:
        """Flush and close; the split's counts, for the manifest."""
        for f in self._files.values():
            f.close()
        return {"examples": self.examples, "tokens": self.tokens, "loss_tokens": self.loss_tokens}


def open_split(directory: paths.Path) -> Split:
    """A written split: local files memory-mapped, remote token files read by byte range."""
    index = {n: np.frombuffer((directory / f"{n}.bin").read_bytes(), DTYPES[n]) for n in
             ("offsets", "sources")}  # fmt: skip
    arrays = {}
    for name in TOKEN_ARRAYS:
        file = directory / f"{name}.bin"
        if paths.is_remote(file):
            arrays[name] = RemoteArray(file, DTYPES[name])
        elif int(index["offsets"][-1]) == 0:  # numpy cannot map an empty file
            arrays[name] = np.zeros(0, DTYPES[name])
        else:
            arrays[name] = np.memmap(os.fspath(file), DTYPES[name], mode="r")
    split = Split(**arrays, **index)
    if len(split.sources) != len(split) or any(
        len(getattr(split, n)) != int(split.offsets[-1]) for n in TOKEN_ARRAYS
    ):
        raise ValueError(f"{directory}: the arrays disagree in length; prepare the data again")
    return split


class RemoteArray:
    """A flat array in object storage, read by byte ranges through one open file per thread
    (small blocks: examples of a shuffled epoch lie far apart, read-ahead would be wasted)."""

    BLOCK_BYTES = 1 << 18

    def __init__(self, file: paths.Path, dtype: np.dtype):
        self.dtype = dtype
        self._fs, self._path = fsspec.core.url_to_fs(os.fspath(file))
        self._size = self._fs.size(self._path) // dtype.itemsize
        self._local = threading.local()

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, item: slice) -> np.ndarray:
        start, stop, _ = item.indices(self._size)
        return self.read_spans([start], [stop])[0]

    def read_spans(self, starts, ends) -> list[np.ndarray]:
        if getattr(self._local, "file", None) is None:
            self._local.file = self._fs.open(self._path, "rb", block_size=self.BLOCK_BYTES)
        f, size = self._local.file, self.dtype.itemsize
        out = []
        for start, end in zip(starts, ends, strict=True):
            f.seek(int(start) * size)
            out.append(np.frombuffer(f.read(int(end - start) * size), self.dtype))
        return out
