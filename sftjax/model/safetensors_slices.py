"""Slices of tensors in .safetensors files, local or in object storage, with the bytes counted.

Owns reading one tensor's slice without reading the tensor: locally through safetensors' own
memory-mapped `get_slice`; from a URL (gs://) by parsing the file's header here and fetching the
byte span that covers the slice. Does not own which slices to read (hf_io.py maps each device's
slice of our layout back to the HF tensor).
"""

import dataclasses
import json
import math
import os
import struct

import ml_dtypes
import numpy as np
import safetensors
from etils import epath

from sftjax import paths


@dataclasses.dataclass
class LoadStats:
    """What one process read: the bytes of the tensor slices its devices hold, of the total."""

    bytes_read: int = 0
    bytes_total: int = 0


class SliceReader:
    """Reads slices of tensors in one .safetensors file, local (memory-mapped) or remote.

    Locally, safetensors' own `get_slice` maps the file and copies only the slice. From object
    storage, the header is parsed here (8-byte length, JSON of dtype / shape / byte offsets)
    and the byte span covering the slice is fetched with one ranged read.
    """

    def __init__(self, path: epath.Path):
        self.path = path
        self._remote = paths.is_remote(path)
        if self._remote:
            with path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                self._header = json.loads(f.read(length))
            self._data_start = 8 + length
            self._header.pop("__metadata__", None)
            self._file = None
        else:
            self._file = safetensors.safe_open(os.fspath(path), framework="numpy")
            self._handle = self._file.__enter__()

    def names(self) -> list[str]:
        return list(self._header) if self._remote else list(self._handle.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        if self._remote:
            return tuple(self._header[name]["shape"])
        return tuple(self._handle.get_slice(name).get_shape())

    def itemsize(self, name: str) -> int:
        dtype = (
            self._header[name]["dtype"]
            if self._remote
            else self._handle.get_slice(name).get_dtype()
        )
        return DTYPES[dtype].itemsize

    def read(self, name: str, index: tuple, stats: LoadStats) -> np.ndarray:
        """The tensor's [index] (a tuple of unit-step slices over its leading axes)."""
        shape = self.shape(name)
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape, strict=False))
        index += tuple(slice(0, n) for n in shape[len(index) :])
        if not self._remote:
            value = self._handle.get_slice(name)[index]
            stats.bytes_read += value.nbytes
            return value
        info = self._header[name]
        dtype = DTYPES[info["dtype"]]
        strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
        first = sum(s.start * st for s, st in zip(index, strides, strict=True))
        last = sum((s.stop - 1) * st for s, st in zip(index, strides, strict=True))
        with self.path.open("rb") as f:
            f.seek(self._data_start + info["data_offsets"][0] + first * dtype.itemsize)
            span = np.frombuffer(f.read((last - first + 1) * dtype.itemsize), dtype=dtype)
        stats.bytes_read += span.nbytes
        view = np.lib.stride_tricks.as_strided(
            span,
            shape=tuple(s.stop - s.start for s in index),
            strides=tuple(st * dtype.itemsize for st in strides),
        )
        return view.copy()

    def close(self) -> None:
        if self._file is not None:
            self._file.__exit__(None, None, None)


DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
}
