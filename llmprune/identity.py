"""Which model exactly: a base model's identity (where it came from + a cheap fingerprint of its files).

Recorded in pruning.json (`provenance.base`) and in every Plan (`base_identity`), then checked when a
plan is applied (`apply`) and when `--baseline base` is resolved (eval, bench), so a relative path
resolved from another directory, or another model of the same shape, is caught instead of silently used.

The fingerprint never reads all weights (a model may be tens of GB). It hashes:
- config.json without the fields that name the path or the tool version (`_name_or_path`, ...);
- per weight file (safetensors / bin, sorted): its name, its size, its safetensors header (tensor
  names, dtypes, shapes, offsets) and three 4 KiB samples of tensor bytes (start, middle, end of the
  data), which differ between two models of identical shapes.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

SAMPLE = 4096
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "architectures", "torch_dtype",
                         "dtype", "auto_map", "use_cache"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weight_files(directory: str | Path) -> list[Path]:
    d = Path(directory)
    return sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                  and not p.name.startswith(".") and p.name not in ("training_args.bin",))


def config_fingerprint(directory: str | Path) -> str | None:
    p = Path(directory) / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    cfg = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(directory: str | Path) -> str | None:
    """sha256 (16 hex) over names, sizes, safetensors headers and sampled bytes of the weight files."""
    files = weight_files(directory)
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            start = 0
            if f.name.endswith(".safetensors") and size >= 8:
                (n,) = struct.unpack("<Q", fh.read(8))
                if 8 + n <= size:
                    h.update(fh.read(n))
                    start = 8 + n
            for off in (start, start + (size - start) // 2, max(start, size - SAMPLE)):
                fh.seek(off)
                h.update(fh.read(SAMPLE))
    return h.hexdigest()[:16]


def identity_of(directory: str | Path, *, hub_id: str | None = None, revision: str | None = None,
                commit: str | None = None, model_arg: str | None = None) -> dict[str, Any]:
    """The identity record of a model whose files lie in `directory` (a local dir or a Hub snapshot)."""
    d = Path(directory)
    ident: dict[str, Any] = {"model_arg": model_arg}
    if hub_id is not None:
        ident.update(hub_id=hub_id, revision=revision, commit=commit)
    else:
        ident["path"] = str(d.resolve())
    ident["config_sha"] = config_fingerprint(d)
    ident["weights_sha"] = weights_fingerprint(d)
    return ident


def mismatch(recorded: dict[str, Any] | None, found: dict[str, Any] | None) -> str | None:
    """None when `found` is the recorded model (or nothing was recorded), else what differs."""
    if not recorded or not found:
        return None
    diffs = []
    for key, what in (("config_sha", "config.json"), ("weights_sha", "weights")):
        a, b = recorded.get(key), found.get(key)
        if a and b and a != b:
            diffs.append(what)
    return " and ".join(diffs) + " differ" if diffs else None


def describe(ident: dict[str, Any] | None) -> str:
    if not ident:
        return "an unrecorded model"
    if ident.get("hub_id"):
        rev = ident.get("commit") or ident.get("revision")
        return f"{ident['hub_id']}" + (f"@{rev}" if rev else "")
    return str(ident.get("path") or ident.get("model_arg"))


__all__ = ["config_fingerprint", "describe", "identity_of", "mismatch", "weight_files", "weights_fingerprint"]
