"""A GGUF file's header walked before the gguf package reads it: every count and length in it
(key-value pairs, strings, arrays, tensors, dimensions, each tensor's bytes) is checked against
the bytes the file has, so a header that lies (a 51-byte file claiming an array of 2**40
elements) is refused at once instead of being allocated. No numpy or torch: plain struct reads."""
from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

from ldm_cli.errors import LdmError

# GGUF's value types -> their size in bytes (8: string, 9: array, sized as they are read)
FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
MAX_DIMS = 8  # ggml has 4; a few more leave room, far fewer than a forged count
MAX_NESTING = 4  # arrays of arrays: real files have none


class _Bad(Exception):
    pass


class _Walker:
    def __init__(self, data: mmap.mmap, order: str):
        self.data, self.order, self.pos = data, order, 0

    def take(self, n: int) -> int:
        """Step over n bytes, which the file must have; return where they start."""
        if n < 0 or self.pos + n > len(self.data):
            raise _Bad(f"it claims {n:,} bytes at offset {self.pos:,}; the file has {len(self.data):,}")
        start, self.pos = self.pos, self.pos + n
        return start

    def number(self, code: str) -> int:
        return struct.unpack_from(self.order + code, self.data, self.take(struct.calcsize(code)))[0]

    def count(self, each: int, what: str) -> int:
        """A u64 count of items of at least `each` bytes: the rest of the file must hold them."""
        n = self.number("Q")
        if n * each > len(self.data) - self.pos:
            raise _Bad(f"it claims {n:,} {what} after offset {self.pos:,}; the file has {len(self.data):,} bytes")
        return n

    def string(self) -> bytes:
        return self.data[self.take(self.count(1, "bytes of a string")):self.pos]

    def value(self, kind: int, nesting: int = 0) -> None:
        if kind in FIXED:
            self.take(FIXED[kind])
        elif kind == STRING:
            self.string()
        elif kind == ARRAY and nesting < MAX_NESTING:
            item = self.number("I")
            least = FIXED.get(item, 8 if item == STRING else 12)  # an array's own header is 12 bytes
            n = self.count(least, "array elements")
            if item in FIXED:
                self.take(n * FIXED[item])
            for _ in range(0 if item in FIXED else n):
                self.value(item, nesting + 1)
        else:
            raise _Bad(f"value type {kind} at offset {self.pos:,} is not one of GGUF's")


def check(path: Path) -> None:
    """Refuse a GGUF file whose header claims more than the file holds (LdmError)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            _walk(data, path)
        except (_Bad, struct.error) as e:
            raise LdmError(f"{path.name} is truncated or corrupt (its GGUF header is malformed: {e}); "
                           "download it again") from None


def _walk(data: mmap.mmap, path: Path) -> None:
    w = _Walker(data, "<")
    w.take(4)  # the magic, already sniffed
    if w.number("I") & 0xFFFF == 0:  # written on a big-endian machine, as the gguf package tells
        w.order = ">"
    tensors, pairs = w.count(24, "tensors"), w.count(13, "key-value pairs")  # their smallest sizes
    for _ in range(pairs):
        w.string()
        w.value(w.number("I"))
    for _ in range(tensors):
        name = w.string().decode("utf-8", "replace")[:80]
        dims = w.number("I")
        if dims > MAX_DIMS:
            raise _Bad(f"tensor {name!r} claims {dims:,} dimensions")
        shape = [w.number("Q") for _ in range(dims)]
        kind, offset = w.number("I"), w.number("Q")
        if offset + _nbytes(kind, shape) > len(data) - w.pos:  # its data lies after the header
            raise _Bad(f"tensor {name!r} claims {_nbytes(kind, shape):,} bytes at {offset:,} of its data; "
                       f"the file has {len(data) - w.pos:,} after offset {w.pos:,}")


def _nbytes(kind: int, shape: list[int]) -> int:
    """A tensor's bytes from its GGML type's block size (0 for a type the gguf package names no size of:
    it says so itself, by name)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        return 0
    return math.prod(shape) // block * size
