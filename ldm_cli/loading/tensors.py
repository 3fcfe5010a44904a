"""A checkpoint file as names, shapes and metadata (from the safetensors header alone) plus a
way to read one tensor at a time.

The header is read and checked here before any tensor is touched, so a truncated download, a
corrupt file or a header that lies about its data is one clear error, not a crash half-way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ldm_cli import files, untrusted_json
from ldm_cli.errors import LdmError
from ldm_cli.loading import safety

MAX_HEADER = 100 * 2**20  # real headers are well under 1 MB
MAX_SIZE = 2**63 - 1  # torch's sizes are int64: a larger dimension (of an empty tensor) cannot be made
TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2", "BOOL": "bool", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8"}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1,
            "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1}
DTYPE_NAMES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64", "F8_E4M3": "fp8", "F8_E5M2": "fp8"}


@dataclass
class Checkpoint:
    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors dtype names: F16, F32, BF16, ...
    metadata: dict[str, str] = field(default_factory=dict)
    reader: Callable[[str], Any] | None = None  # key -> the tensor, a view into the file where possible
    releaser: Callable[[str], None] | None = None  # key -> let go of the file's memory under it

    @property
    def name(self) -> str:
        return self.path.name

    def get(self, key: str):
        """The tensor at `key`, as a view into the file where possible: copy what you keep."""
        return self.reader(key)

    def release(self, key: str) -> None:
        """Done with the tensor at `key` (copied): the mapped file's pages under it leave this
        process's memory, so a load never holds the file and its converted copy at once."""
        if self.releaser is not None:
            self.releaser(key)


def corrupt(path: Path, why: str) -> LdmError:
    return LdmError(f"{path.name} is truncated or corrupt ({why}); download it again")


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, where the data starts) of a .safetensors file, checked
    against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > MAX_HEADER or 8 + n > size:
            raise corrupt(path, f"its header claims {n} bytes; the file has {size}")
        try:
            header = untrusted_json.loads(f.read(n), "its header", max_chars=MAX_HEADER)
        except untrusted_json.BadJson as e:
            raise corrupt(path, str(e)) from None
    if not isinstance(header, dict):
        raise corrupt(path, "its header is not a table of tensors")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt(path, "its __metadata__ is not a table of texts")
    check_entries(path, header, size - 8 - n)
    return header, metadata, 8 + n


def check_entries(path: Path, header: dict, data_size: int) -> None:
    end = 0
    for key, entry in header.items():
        try:
            begin, stop = entry["data_offsets"]
            # a list of whole numbers (JSON's true is none), each and their product within torch's int64
            shape = entry["shape"]
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in [*shape, begin, stop]) \
                    or math.prod(max(d, 1) for d in shape) > MAX_SIZE:
                raise ValueError
            nbytes = math.prod(entry["shape"]) * ITEMSIZE[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise corrupt(path, f"the header entry for {key!r} is malformed") from None
        if stop - begin != nbytes:
            raise corrupt(path, f"the header says {key!r} is {entry['shape']} {entry['dtype']} but gives it {stop - begin} bytes")
        end = max(end, stop)
    if end > data_size:
        raise corrupt(path, f"the header expects {end} bytes of tensor data; only {data_size} are there")


def open_checkpoint(path: Path, allow_pickle: bool = False) -> Checkpoint:
    """A safetensors or GGUF file (or, with allow_pickle, a torch pickle), judged by its content."""
    files.check_openable(path)  # every checkpoint file is first opened here
    kind = safety.sniff(path)
    if kind == "gguf":
        from ldm_cli.loading import quantized

        return Checkpoint(path, *quantized.read_gguf(path))
    if kind == "pickle":
        if not allow_pickle:
            raise safety.refusal(path)
        tensors = safety.load_pickle(path)
        names = {f"torch.{torch_name}": name for name, torch_name in TORCH_DTYPES.items()}
        return Checkpoint(path, {k: tuple(t.shape) for k, t in tensors.items()},
                          {k: names.get(str(t.dtype), str(t.dtype)) for k, t in tensors.items()}, {}, tensors.__getitem__)
    if kind != "safetensors":
        if path.stat().st_size < 9:
            raise corrupt(path, "it is empty")
        raise LdmError(f"{path.name} is neither a safetensors, GGUF nor PyTorch checkpoint file; ldm cannot read it")
    header, metadata, data_start = read_header(path)
    return Checkpoint(path, {k: tuple(e["shape"]) for k, e in header.items()},
                      {k: e["dtype"] for k, e in header.items()}, metadata,
                      *_safetensors_reader(path, header, data_start))


def shapes_of(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors or GGUF file, from its header alone."""
    if safety.sniff(path) == "gguf":
        from ldm_cli.loading import quantized

        return quantized.read_gguf(path)[0]
    return {k: tuple(e.get("shape", ())) for k, e in read_header(path)[0].items() if isinstance(e, dict)}


def _safetensors_reader(path: Path, header: dict, data_start: int) -> tuple[Callable[[str], Any], Callable[[str], None]]:
    """(key -> a zero-copy view into the mapped file (offsets already checked against its size),
    key -> drop the mapped pages under it)."""
    import mmap

    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: never writes the file

    def view(key: str):
        import torch  # on the first read: `ldm info` opens checkpoints and reads no tensor

        entry = header[key]
        dtype = getattr(torch, TORCH_DTYPES[entry["dtype"]])
        begin, stop = entry["data_offsets"]
        if stop == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        flat = torch.frombuffer(mapped, dtype=dtype, count=(stop - begin) // dtype.itemsize, offset=data_start + begin)
        return flat.view(entry["shape"])

    def release(key: str) -> None:
        begin, stop = (data_start + offset for offset in header[key]["data_offsets"])
        start = begin - begin % mmap.PAGESIZE
        if stop > start and hasattr(mmap, "MADV_DONTNEED"):  # clean private pages: read again if touched
            mapped.madvise(mmap.MADV_DONTNEED, start, stop - start)
    return view, release


def dtype_name(checkpoint: Checkpoint, prefix: str = "") -> str:
    """The dtype most of the weights under `prefix` are stored in: fp16, fp32, bf16."""
    counts: dict[str, int] = {}
    for key, dtype in checkpoint.dtypes.items():
        if key.startswith(prefix):
            counts[dtype] = counts.get(dtype, 0) + math.prod(checkpoint.shapes[key])
    top = max(counts, key=counts.get) if counts else "?"
    return DTYPE_NAMES.get(top, top)
