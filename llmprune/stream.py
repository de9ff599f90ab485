"""Pruning models larger than memory: block-by-block reading from safetensors, shard-by-shard writing.

The model is a skeleton on the meta device (accelerate `init_empty_weights`: shapes, no storage;
buffers such as rotary frequencies stay real). `StreamLoader` makes one block's weights real on
the compute device while the pruner needs them — calibration, scoring, simulation — and frees
them after; embeddings, final norm and head are read only for the capture of block 0's inputs.
The pruners run unchanged (they touch weights only inside `PruneContext.on_device(i)`), so the
Plan is the in-memory one. `write_streamed` then reads each kept block once more, slices it with
`surgery.slice_block` and appends its tensors to the output shards (shards.py) at once.

Memory: the largest block (twice while it is sliced) + the embedding matrix + the calibration
activations; never the model. The rule for `--stream auto` is `choose` (docs/streaming.md).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from tqdm.auto import tqdm

from . import surgery
from .checkpoint import _mark_remote_code, staging, write_extras
from .errors import UsageError
from .families import Family, family_for
from .loading import (Loaded, ModelLoadError, base_model_of, identity_for, load_config, load_tokenizer, resolve_dtype,
                      resolve_source)
from .plan import Plan
from .shards import INDEX_FILE, ShardedSource, ShardError, ShardWriter

log = logging.getLogger(__name__)

# Pruners whose planning touches weights only through PruneContext.on_device (the width engine).
STREAMABLE = ("magnitude", "wanda-sp", "flap", "cfsp", "obs", "finercut")
IN_MEMORY_PEAK = 2.5  # the in-memory path holds up to this many copies of the model while pruning
MEMORY_SHARE = 0.8  # --stream auto streams when the in-memory need exceeds this share of what is free
MAX_SHARD_SIZE: int | str = "50GB"  # transformers' save_pretrained default
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


class StreamError(UsageError):
    """Streaming cannot run as asked (the message says why and what to do)."""


# ---- opening a model without loading it -----------------------------------------------------------
def local_snapshot(model_id: str, revision: str | None = None) -> tuple[str, str]:
    """(local directory, Hub id to credit): a directory as is, an embedded name, or a Hub id whose
    config, tokenizer and safetensors files are downloaded to the HF cache (never loaded)."""
    path, base = resolve_source(model_id, revision)
    if Path(path).is_dir():
        return path, base
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, revision=revision, allow_patterns=HUB_FILES), base
    except Exception as e:  # noqa: BLE001 - hub errors have many types; all mean "cannot get the files"
        raise StreamError(f"could not download {model_id!r} for streaming: {str(e).splitlines()[0]}. Fix: check the "
                          f"name and your login (`hf auth login`), or pass a local directory") from e


def skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model class of `config` with every parameter on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


def open_streamed(model_id: str, device: torch.device, dtype: str | torch.dtype | None = "auto",
                  revision: str | None = None) -> tuple[Loaded, StreamLoader]:
    """A Loaded whose model is a meta skeleton, and the loader that fills it block by block."""
    from transformers import GenerationConfig

    path, base = local_snapshot(model_id, revision)
    config = load_config(model_id, path, None)
    family = family_for(config)
    source = ShardedSource(path)
    model = skeleton(config, resolve_dtype(dtype, device, config))
    model.name_or_path = path
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(path)
    loader = StreamLoader(model, family, source, device)
    tokenizer = load_tokenizer(path, None, model_id)
    downloaded = not Path(resolve_source(model_id, revision)[0]).is_dir()  # a Hub id: credit it, not the cache folder
    loaded = Loaded(model=model, tokenizer=tokenizer, family=family, model_id=model_id, path=path,
                    base_model=base if downloaded else base_model_of(model_id, path, base), revision=revision,
                    identity=identity_for(model_id, path, revision, config))
    return loaded, loader


# ---- the loader ----------------------------------------------------------------------------------
def layers_prefix(model: nn.Module, family: Family) -> str:
    """The state-dict prefix of the decoder blocks (e.g. `model.layers`), found from the Family."""
    layers = family.layers(model)
    return next(n for n, m in model.named_modules() if m is layers)


class StreamLoader:
    """Reads weights into a meta skeleton while they are needed, one block at a time (walker.BlockLoader)."""

    def __init__(self, model: nn.Module, family: Family, source: ShardedSource, device: torch.device):
        self.model, self.family, self.source, self.device = model, family, source, torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self.prefix = layers_prefix(model, family)
        self.layers = family.layers(model)
        # every parameter / persistent buffer: its owners (module, attribute) and the names it has
        slots: dict[int, tuple[list[tuple[nn.Module, str, bool]], list[str]]] = {}
        for mname, mod in model.named_modules():
            for attr, t in list(mod._parameters.items()) + [(b, mod._buffers[b]) for b in mod._buffers
                                                            if b not in mod._non_persistent_buffers_set]:
                if t is not None:
                    owners, names = slots.setdefault(id(t), ([], []))
                    owners.append((mod, attr, attr in mod._parameters))
                    names.append(f"{mname}.{attr}" if mname else attr)
        self.slots = list(slots.values())
        missing = [names[0] for _, names in self.slots if not any(n in source for n in names)]
        if missing:
            raise ShardError(f"{source.dir}: the checkpoint misses tensors the model needs, e.g. {missing[:3]}; "
                             f"is it complete?")
        pat = re.compile(rf"^{re.escape(self.prefix)}\.(\d+)\.")
        self.by_block: dict[int, list] = {}
        self.rest_slots = []
        for slot in self.slots:
            m = pat.match(slot[1][0])
            (self.by_block.setdefault(int(m.group(1)), []) if m else self.rest_slots).append(slot)
        # what only the final norm and the head own: not needed to capture block 0's inputs
        tail = {id(m) for top in (family.final_norm(model), family.lm_head(model)) for m in top.modules()}
        self.front_slots = [s for s in self.rest_slots if not all(id(mod) in tail for mod, _, _ in s[0])]
        self.depth: dict[Any, int] = {}

    @contextlib.contextmanager
    def _real(self, key: Any, slots: list) -> Iterator[None]:
        """Swap real tensors into `slots` while active; re-entrant per key; the meta originals come back after."""
        if self.depth.get(key, 0):
            self.depth[key] += 1
            try:
                yield
            finally:
                self.depth[key] -= 1
            return
        saved = []
        try:
            for owners, names in slots:
                name = next(n for n in names if n in self.source)
                t = self.source.read(name)
                if t.is_floating_point():
                    t = t.to(self.dtype)  # as from_pretrained(dtype=...) converts
                t = t.to(self.device)
                for mod, attr, is_param in owners:
                    table = mod._parameters if is_param else mod._buffers
                    saved.append((table, attr, table[attr]))
                    table[attr] = nn.Parameter(t, requires_grad=False) if is_param else t
            self.depth[key] = 1
            yield
        finally:
            self.depth[key] = 0
            for table, attr, old in reversed(saved):
                table[attr] = old
            saved.clear()
            release_freed_memory()

    def block(self, index: int) -> contextlib.AbstractContextManager[None]:
        return self._real(index, self.by_block.get(index, []))

    def rest(self, head: bool = True) -> contextlib.AbstractContextManager[None]:
        return self._real("rest", self.rest_slots if head else self.front_slots)

    def read(self, names: list[str]) -> torch.Tensor:
        """A non-block tensor (in the run dtype, on the CPU) under the first of `names` the checkpoint has."""
        t = self.source.read(next(n for n in names if n in self.source))
        return t.to(self.dtype) if t.is_floating_point() else t


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`). Without it, glibc keeps the blocks'
    freed buffers in its heap (its mmap threshold grows with the first freed large tensor), and the
    resident memory creeps up block after block although nothing is held: measured +15 MB per block."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


# ---- choosing the path ---------------------------------------------------------------------------
@dataclass
class Choice:
    stream: bool
    reason: str


def available_memory(device: torch.device) -> tuple[int, int | None]:
    """(free host RAM, free device memory or None for CPU) in bytes."""
    host = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                host = int(line.split()[1]) * 1024
    if host is None:
        import os

        host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    dev = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return host, dev


def choose(mode: str | bool, model_id: str, method: str, device: torch.device, dtype: str | torch.dtype | None,
           revision: str | None = None) -> Choice:
    """Stream or not: `mode` True/"on", False/"off", or "auto" (see docs/streaming.md for the rule)."""
    mode = {True: "on", False: "off"}.get(mode, mode) if isinstance(mode, bool) else str(mode).lower()
    if mode not in ("auto", "on", "off"):
        raise StreamError(f"stream must be auto, on or off, not {mode!r}")
    if mode == "off":
        return Choice(False, "in memory (--stream off)")
    if method not in STREAMABLE:
        if mode == "on":
            raise StreamError(f"method {method!r} cannot stream yet; streaming supports {', '.join(STREAMABLE)}. "
                              f"Fix: drop --stream (the model is then loaded whole)")
        return Choice(False, f"in memory (method {method} has no streamed path)")
    if mode == "on":
        return Choice(True, "streamed (--stream on)")
    try:
        path, _ = local_snapshot(model_id, revision)
    except (StreamError, ModelLoadError) as e:  # the in-memory loader reports a bad name its own way
        return Choice(False, f"in memory (cannot inspect the files: {str(e).splitlines()[0]})")
    try:
        source = ShardedSource(path)
    except ShardError as e:
        if "has no" in str(e):
            return Choice(False, "in memory (the checkpoint has no safetensors files to stream)")
        raise
    size = model_bytes(source, resolve_dtype(dtype, device, load_config(model_id, path, None)))
    host, dev = available_memory(device)
    need_host = size * (1.0 if dev is not None else IN_MEMORY_PEAK)
    gib = 1024 ** 3
    if need_host > MEMORY_SHARE * host:
        return Choice(True, f"streamed: in memory would need ~{need_host / gib:.1f} GiB of RAM, "
                            f"{host / gib:.1f} GiB is free")
    if dev is not None and size * IN_MEMORY_PEAK > MEMORY_SHARE * dev:
        return Choice(True, f"streamed: in memory would need ~{size * IN_MEMORY_PEAK / gib:.1f} GiB on {device}, "
                            f"{dev / gib:.1f} GiB is free")
    return Choice(False, f"in memory: the model ({size / gib:.2f} GiB) fits (~{need_host / gib:.1f} GiB needed, "
                         f"{host / gib:.1f} GiB free)")


def model_bytes(source: ShardedSource, dtype: torch.dtype) -> int:
    """Bytes of the model's weights once converted to the run dtype."""
    total = 0
    for name, (_, _, v) in source.entries.items():
        n = 1
        for s in v["shape"]:
            n *= int(s)
        dt = source.dtype(name)
        total += n * (torch.empty((), dtype=dtype).element_size() if dt.is_floating_point else
                      torch.empty((), dtype=dt).element_size())
    return total


# ---- writing the pruned checkpoint ---------------------------------------------------------------
@torch.no_grad()
def pruned_skeleton(model: nn.Module, family: Family, plan: Plan, dtype: torch.dtype) -> nn.Module:
    """The pruned model's architecture (stock or llmprune_llama config) on the meta device."""
    plan.validate(family.geometry(model))
    kept, after = plan.kept_layers(), plan.geometry_after()
    config = family.target_config(model, [after[i] for i in kept], kept)
    config._attn_implementation = model.config._attn_implementation
    return skeleton(config, dtype)


@torch.no_grad()
def write_streamed(loaded: Loaded, loader: StreamLoader, plan: Plan, out: Path, info: dict[str, Any],
                   max_shard_size: int | str | None = None, target: nn.Module | None = None,
                   progress: bool = True) -> Path:
    """Slice every kept block (read once more) and write the pruned checkpoint shard by shard, atomically.

    The files equal what `save_pruned` writes for the in-memory pruned model (same tensors, names,
    shards and index); `target` is `pruned_skeleton(...)` when the caller already built it.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model = loaded.model
    kept = plan.kept_layers()
    new = target if target is not None else pruned_skeleton(model, loaded.family, plan, loader.dtype)
    new.generation_config = copy.deepcopy(model.generation_config)
    new.name_or_path = getattr(model, "name_or_path", "")
    layout_sd = remove_tied_weights_from_state_dict(new.state_dict(), new)
    split = split_torch_state_dict_into_shards(layout_sd, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size or MAX_SHARD_SIZE)
    layout = {f: [(n, layout_sd[n]) for n in names] for f, names in split.filename_to_tensors.items()}
    pat = re.compile(rf"^{re.escape(loader.prefix)}\.(\d+)\.(.*)$")
    old_names = dict(model.state_dict(keep_vars=True))  # new name -> candidate old names (tied weights)
    with staging(out) as tmp:
        _mark_remote_code(new)
        _config_files(new, tmp)
        writer = ShardWriter(tmp, layout)
        done: set[int] = set()
        bar = tqdm(total=len(kept), desc="writing blocks", unit="block", disable=not progress)
        for name in layout_sd:  # in state-dict order: embeddings, block 0, 1, ..., norm, head
            m = pat.match(name)
            if m is None:
                writer.put(name, loader.read(_aliases(model, name, old_names)))
            elif int(m.group(1)) not in done:
                j = int(m.group(1))
                done.add(j)
                writer.put_all(_pruned_block(loaded, loader, plan, kept[j], j))
                bar.update()
        bar.close()
        writer.close()
        writer.verify()
        if split.is_sharded:
            import json

            index = {"metadata": {"total_parameters": new.num_parameters(), **split.metadata},
                     "weight_map": split.tensor_to_filename}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        write_extras(tmp, new, loaded.tokenizer, plan, info)
        verify_streamed(tmp, loader.device, loader.dtype)
    return out


@torch.no_grad()
def verify_streamed(path: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Run the written checkpoint, as its own config.json describes it, on a short input, block by block
    from its own shards (it is never loaded whole): every tensor present with its shape, finite logits of
    the right shape. The in-memory save checks more (logits against the pruned model, a generate with the
    KV cache); for a streamed run that would need the whole model in memory."""
    from .calibrate.walker import BlockWalker
    from .checkpoint import CheckpointError
    from .errors import EXIT_FAILURE

    config = load_config(str(path), str(path), None)
    model = skeleton(config, dtype)
    family = family_for(config)
    ids = (torch.arange(16).unsqueeze(0) * 7919) % config.vocab_size  # [1, 16]
    try:
        loader = StreamLoader(model, family, ShardedSource(path), device)
        walker = BlockWalker(model, family, ids, batch_size=1, device=device, loader=loader)
        for i in range(len(family.layers(model))):
            walker.advance_through(i)
        logits = walker.logits()[0]
    except Exception as e:  # noqa: BLE001 - any failure means the written checkpoint is unusable; say so, chained
        raise CheckpointError(f"the streamed checkpoint does not run ({type(e).__name__}: {e}); nothing was written "
                              f"to the output directory. This is a bug in llmprune; please report it with the "
                              f"command line", exit_code=EXIT_FAILURE) from e
    if logits.shape != (1, 16, config.vocab_size) or not bool(torch.isfinite(logits).all()):
        raise CheckpointError(f"the streamed checkpoint gives {'non-finite' if logits.numel() else 'no'} logits of "
                              f"shape {tuple(logits.shape)}; nothing was written to the output directory",
                              exit_code=EXIT_FAILURE)


def _config_files(new: nn.Module, tmp: Path) -> None:
    """config.json, generation_config.json and remote code exactly as save_pretrained writes them (no weights)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards: 0it" bar would only confuse
    try:
        new.save_pretrained(tmp, state_dict={})
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _aliases(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> list[str]:
    """`name` and every other name of the same (tied) tensor in the base model."""
    t = state.get(name)
    return [name] + [n for n, v in state.items() if t is not None and v is t and n != name]


def _pruned_block(loaded: Loaded, loader: StreamLoader, plan: Plan, old: int,
                  new: int) -> list[tuple[str, torch.Tensor]]:
    """Block `old` read, sliced by its layer plan, renamed to index `new`: [(name, CPU tensor)]."""
    family, model = loaded.family, loaded.model
    with loader.block(old):
        block = family.block(model, old)
        here = f"{loader.prefix}.{old}."
        state = {here + k: v for k, v in block.module.state_dict().items()}
        names = {id(p): here + n for n, p in block.module.named_parameters()}
        surgery.slice_block(state, names, block, plan.geometry[old], plan.layers[old], plan.tensors, old)
        there = f"{loader.prefix}.{new}."
        return [(there + k[len(here):], v.to("cpu")) for k, v in state.items()]


__all__ = ["Choice", "IN_MEMORY_PEAK", "MEMORY_SHARE", "STREAMABLE", "StreamError", "StreamLoader", "choose",
           "layers_prefix", "model_bytes", "open_streamed", "pruned_skeleton", "skeleton", "write_streamed"]
