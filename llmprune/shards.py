"""Safetensors files read and written one tensor at a time, for models larger than memory (stream.py).

Reading (`ShardedSource`): the checkpoint's headers are parsed up front — a truncated or corrupt
shard fails at once, naming the file — and each tensor is read with a plain `readinto` into its
own buffer. No memory map: mapped pages of a whole shard would count in the process's resident
memory, and safetensors' own errors do not name the file.

Writing (`ShardWriter`): the layout of the output (every tensor's name, dtype and shape, split into
shards as transformers' `save_pretrained` splits them) is known before any weight is computed, so
each shard's header is written first and tensors are appended as they are produced; nothing waits
in memory for a whole shard. A CRC32 of every tensor is kept and re-checked by reading the files
back (`verify`).
"""
from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import EXIT_USAGE, LlmpruneError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


class ShardError(LlmpruneError, RuntimeError):
    """A checkpoint file is missing, truncated or corrupt (the message names it and the fix)."""

    exit_code = EXIT_USAGE  # a truncated or corrupt model file: the user's input


# ---- reading -------------------------------------------------------------------------------------
def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """(tensor name -> {dtype, shape, data_offsets}, offset of the data) of one file; checks its size."""
    fix = "re-download it (delete it from the HF cache or the directory) or re-save the checkpoint"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ShardError(f"{path}: truncated safetensors file ({size} bytes, no header); {fix}")
            n = struct.unpack("<Q", raw)[0]
            if n > MAX_HEADER or 8 + n > size:
                raise ShardError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file of "
                                 f"{size}); {fix}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ShardError(f"{path}: checkpoint file is missing; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: corrupt safetensors header ({e}); {fix}") from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ShardError(f"{path}: truncated safetensors file: its header needs {8 + n + end:,} bytes, the file has "
                         f"{size:,}; {fix}")
    for name, v in header.items():
        if v.get("dtype") not in _DTYPES:
            raise ShardError(f"{path}: tensor {name} has dtype {v.get('dtype')!r}, which llmprune cannot stream")
    return header, 8 + n


class ShardedSource:
    """The tensors of a safetensors checkpoint directory (single file or index + shards)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index = self.dir / INDEX_FILE
        if index.exists():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise ShardError(f"{index}: not a valid safetensors index ({e}); re-download it") from None
        elif (self.dir / SINGLE_FILE).exists():
            files = [SINGLE_FILE]
        else:
            raise ShardError(f"{self.dir} has no {SINGLE_FILE} or {INDEX_FILE}: streaming reads safetensors only. "
                             f"Fix: convert the checkpoint (load it once and save_pretrained), or run without --stream")
        self.entries: dict[str, tuple[Path, int, dict]] = {}  # name -> (file, data start, header entry)
        for fname in files:
            path = self.dir / fname
            header, start = read_header(path)
            for name, v in header.items():
                self.entries[name] = (path, start, v)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    @property
    def nbytes(self) -> int:
        return sum(int(v["data_offsets"][1]) - int(v["data_offsets"][0]) for _, _, v in self.entries.values())

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.entries[name][2]["dtype"]]

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in the checkpoint's dtype, in fresh CPU memory."""
        if name not in self.entries:
            raise ShardError(f"{self.dir}: the checkpoint has no tensor {name!r}")
        path, start, v = self.entries[name]
        a, b = (int(x) for x in v["data_offsets"])
        buf = torch.empty(b - a, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(start + a)
            got = f.readinto(buf.numpy()) if b > a else 0
        if got != b - a:
            raise ShardError(f"{path}: truncated while reading {name} (got {got} of {b - a} bytes); re-download it")
        return buf.view(_DTYPES[v["dtype"]]).reshape(v["shape"])


# ---- writing -------------------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardWriter:
    """Writes tensors into pre-laid-out safetensors files as they arrive (any order across shards).

    layout: shard file name -> [(tensor name, meta or real tensor giving dtype and shape)], in file order.
    """

    def __init__(self, directory: Path, layout: dict[str, list[tuple[str, torch.Tensor]]]):
        self.dir, self.layout = directory, layout
        self.where: dict[str, tuple[str, int]] = {}  # tensor -> (file, position in the file's list)
        self.headers: dict[str, bytes] = {}
        for fname, items in layout.items():
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            off = 0
            for pos, (name, t) in enumerate(items):
                if t.dtype not in _NAMES:
                    raise ShardError(f"cannot write tensor {name} of dtype {t.dtype}")
                header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                                "data_offsets": [off, off + _nbytes(t)]}
                off += _nbytes(t)
                self.where[name] = (fname, pos)
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
            self.headers[fname] = struct.pack("<Q", len(raw)) + raw
        self.files: dict[str, object] = {}
        self.next_pos = {f: 0 for f in layout}
        self.pending: dict[str, torch.Tensor] = {}
        self.crc: dict[str, int] = {}

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.where:
            raise ShardError(f"internal error: tensor {name} is not in the output layout")
        fname, pos = self.where[name]
        want = self.layout[fname][pos][1]
        if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype != want.dtype:
            raise ShardError(f"internal error: {name} is {tuple(tensor.shape)} {tensor.dtype}, the layout says "
                             f"{tuple(want.shape)} {want.dtype}")
        self.pending[name] = tensor
        self._drain(fname)

    def put_all(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, t in tensors:
            self.put(name, t)

    def _drain(self, fname: str) -> None:
        items = self.layout[fname]
        while self.next_pos[fname] < len(items) and items[self.next_pos[fname]][0] in self.pending:
            name = items[self.next_pos[fname]][0]
            t = self.pending.pop(name).detach().to("cpu").contiguous()
            f = self.files.get(fname)
            if f is None:
                f = self.files[fname] = open(self.dir / fname, "wb")
                f.write(self.headers[fname])
            data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
            f.write(data)
            self.crc[name] = zlib.crc32(data)
            self.next_pos[fname] += 1
            if self.next_pos[fname] == len(items):
                f.close()

    def close(self) -> None:
        """Check that every tensor was written; close the files."""
        for f in self.files.values():
            f.close()
        missing = [items[self.next_pos[f]][0] for f, items in self.layout.items() if self.next_pos[f] < len(items)]
        if missing or self.pending:
            raise ShardError(f"internal error: tensors never written: {(missing + list(self.pending))[:5]}")

    def verify(self) -> None:
        """Read every written file back: headers parse, sizes fit, every tensor's bytes match what was written."""
        for fname, items in self.layout.items():
            header, start = read_header(self.dir / fname)
            if set(header) != {n for n, _ in items}:
                raise ShardError(f"{self.dir / fname}: written tensors differ from the layout")
            with open(self.dir / fname, "rb") as f:
                for name, _ in items:
                    a, b = header[name]["data_offsets"]
                    f.seek(start + a)
                    crc, left = 0, b - a
                    while left:  # in chunks: one tensor (an embedding) can be gigabytes
                        chunk = f.read(min(left, 64 << 20))
                        if not chunk:
                            break
                        crc, left = zlib.crc32(chunk, crc), left - len(chunk)
                    if left or crc != self.crc[name]:
                        raise ShardError(f"{self.dir / fname}: tensor {name} reads back differently than written")


__all__ = ["INDEX_FILE", "SINGLE_FILE", "ShardError", "ShardWriter", "ShardedSource", "read_header"]
