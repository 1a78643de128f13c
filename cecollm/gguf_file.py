"""A GGUF reader that checks every length against the file and keeps tensor data memory-mapped.

GGUF (versions 2 and 3, little-endian): magic "GGUF", version u32, tensor count u64, metadata
count u64; metadata entries (key string, value type u32, value); tensor infos (name string, n_dims
u32, dims u64 × n_dims with ne0 first, type u32, offset u64); tensor data from the next multiple
of general.alignment (default 32). A string is a u64 byte length and UTF-8 bytes; an array is an
element type u32, a count u64 and the elements.

Metadata becomes plain Python values, except arrays of strings (a vocabulary, its merges), which stay
in the file as a StringArray: no Python object per token. Tensor data is never read here, only
viewed through one read-only memory map, so loading costs the file's pages only when the model runs.
"""

from __future__ import annotations

import array
import mmap
import operator
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAGIC = b"GGUF"
STRING, ARRAY = 8, 9
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
MAX_ARRAY_DEPTH = 4
MAX_DIMS = 4

# Bytes per block and elements per block of the tensor types this reader can size (GGML ids).
TYPE_SIZES = {0: (4, 1), 1: (2, 1), 2: (18, 32), 3: (20, 32), 8: (34, 32), 30: (2, 1)}
TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 30: "BF16"}


class GGUFFormatError(ValueError):
    """The bytes are not a well-formed GGUF file."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 (contiguous) first
    type_id: int
    offset: int  # from the start of the tensor data section

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type_id, f"type {self.type_id}")


class StringArray(Sequence):
    """Strings kept as one buffer: string i is data[starts[i] : starts[i] + lens[i]], decoded (UTF-8)
    only when indexed."""

    def __init__(self, data, starts: np.ndarray, lens: np.ndarray):
        self.data, self.starts, self.lens = data, starts, lens

    @classmethod
    def from_strings(cls, strings) -> StringArray:
        encoded = [s.encode("utf-8") for s in strings]
        lens = np.array([len(b) for b in encoded], np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if len(lens) else lens
        return cls(b"".join(encoded), starts, lens)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> str:
        i = operator.index(i)  # an integer (slices are not supported)
        start, n = int(self.starts[i]), int(self.lens[i])
        try:
            return bytes(self.data[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"string {i} of an array (byte {start}) is not UTF-8") from None


class GGUFFile:
    """fields: {key: value}; tensors: [TensorInfo]; data(info, nbytes) -> read-only uint8 view."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise GGUFFormatError("the file is empty") from None
        self.size = len(self._map)
        self._pos = 0
        if self._bytes(4, "magic") != MAGIC:
            raise GGUFFormatError("no GGUF magic at the start")
        version = self._scalar(4, "version")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_fields = self._scalar(10, "tensor count"), self._scalar(10, "metadata count")
        if n_tensors > self.size // 24 or n_fields > self.size // 12:  # each entry takes at least that many bytes
            raise GGUFFormatError(f"counts ({n_tensors} tensors, {n_fields} metadata entries) exceed the file")
        self.fields = {}
        for _ in range(n_fields):
            key = self._string("metadata key")
            self.fields[key] = self._value(self._scalar(4, f"type of {key}"), key, 0)
        self.tensors = [self._tensor_info() for _ in range(n_tensors)]
        alignment = self.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"general.alignment {alignment!r} is not a power of two")
        self.data_start = -(-self._pos // alignment) * alignment
        self._array = np.frombuffer(self._map, np.uint8)

    def data(self, info: TensorInfo, nbytes: int) -> np.ndarray:
        """The tensor's nbytes as a read-only view of the map; GGUFFormatError past the end."""
        start = self.data_start + info.offset
        if start + nbytes > self.size:
            raise GGUFFormatError(
                f"tensor {info.name} needs {nbytes} bytes at offset {start}, the file holds {max(0, self.size - start)} (truncated?)"
            )
        return self._array[start : start + nbytes]

    # ---- parsing, each step bounds-checked ----
    def _bytes(self, n: int, what: str) -> bytes:
        if n < 0 or self._pos + n > self.size:
            raise GGUFFormatError(f"truncated at byte {self._pos} while reading {what} ({n} bytes)")
        out = self._map[self._pos : self._pos + n]
        self._pos += n
        return out

    def _scalar(self, type_id: int, what: str):
        fmt = SCALARS[type_id]
        return struct.unpack(fmt, self._bytes(struct.calcsize(fmt), what))[0]

    def _string(self, what: str) -> str:
        raw = self._bytes(self._scalar(10, f"length of {what}"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"{what} at byte {self._pos - len(raw)} is not UTF-8") from None

    def _value(self, type_id: int, key: str, depth: int):
        if type_id in SCALARS:
            return self._scalar(type_id, key)
        if type_id == STRING:
            return self._string(key)
        if type_id != ARRAY or depth >= MAX_ARRAY_DEPTH:
            raise GGUFFormatError(f"metadata {key}: value type {type_id} is not valid here")
        item_type, count = self._scalar(4, f"element type of {key}"), self._scalar(10, f"length of {key}")
        if item_type in SCALARS:  # numeric arrays in one read
            dtype = np.dtype(SCALARS[item_type])
            return np.frombuffer(self._bytes(count * dtype.itemsize, key), dtype).tolist()
        if count > (self.size - self._pos) // 8:  # every string or array element takes >= 8 bytes
            raise GGUFFormatError(f"metadata {key}: {count} elements exceed the file")
        if item_type == STRING:
            return self._strings(count, key)
        return [self._value(item_type, key, depth + 1) for _ in range(count)]

    def _strings(self, count: int, key: str) -> StringArray:
        """count strings as a StringArray over the map: one pass over their lengths, nothing copied."""
        starts, lens = array.array("q"), array.array("q")
        pos, size, unpack = self._pos, self.size, struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise GGUFFormatError(f"truncated at byte {pos} while reading the length of a string of {key}")
            (n,) = unpack(self._map, pos)
            if n > size - pos - 8:
                raise GGUFFormatError(f"metadata {key}: a string of {n} bytes at byte {pos} exceeds the file")
            starts.append(pos + 8)
            lens.append(n)
            pos += 8 + n
        self._pos = pos
        return StringArray(self._map, np.frombuffer(starts, np.int64), np.frombuffer(lens, np.int64))

    def _tensor_info(self) -> TensorInfo:
        name = self._string("tensor name")
        n_dims = self._scalar(4, f"dimensions of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFFormatError(f"tensor {name} has {n_dims} dimensions")
        shape = tuple(self._scalar(10, f"shape of {name}") for _ in range(n_dims))
        type_id, offset = self._scalar(4, f"type of {name}"), self._scalar(10, f"offset of {name}")
        if any(s == 0 or s > 1 << 40 for s in shape) or offset > self.size:
            raise GGUFFormatError(f"tensor {name}: shape {shape} or offset {offset} out of range")
        return TensorInfo(name, shape, type_id, offset)


def tensor_nbytes(info: TensorInfo) -> int | None:
    """Bytes of the tensor's data, or None for a type this reader cannot size."""
    if info.type_id not in TYPE_SIZES:
        return None
    block_bytes, block_elems = TYPE_SIZES[info.type_id]
    n = int(np.prod(info.shape, dtype=object))
    return None if n % block_elems else n // block_elems * block_bytes
