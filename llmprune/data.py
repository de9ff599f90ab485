"""Calibration and evaluation text -> seeded token tensors.

A *source* is one string, resolved by :func:`load_documents` in this order:

1. a preset name (:data:`PRESETS`): ``wikitext2``, ``c4``, ``pile`` (Hugging Face Hub) or
   ``python-docs`` (offline, read from the standard library's ``pydoc_data.topics``);
2. an existing local path (``.txt``, ``.jsonl``, ``.json``, ``.parquet`` or a directory of ``.txt``);
3. a Hub dataset id ``org/name``, ``org/name:config`` or ``org/name:config:split``.

Documents are joined with ``"\\n\\n"`` and tokenized without special tokens, except that the BOS
token is put once at the start of the stream when the tokenizer adds one by default (Llama-style).
That is exactly what ``tokenizer("\\n\\n".join(docs))`` gives, the stream used by the standard
Wanda/SparseGPT calibration recipe and the wikitext-2 perplexity protocol.

Hub access never stalls an offline machine: when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set,
or a 2 s TCP probe of the Hub endpoint fails, ``datasets`` is run with its offline mode forced, so
it answers from the local cache at once instead of retrying for ~25 s.

``source=None`` (a recipe or request that names no data) is resolved once, by :func:`resolve_source`:
wikitext2, or ``python-docs`` with a warning when wikitext2 cannot be loaded. A named source never
falls back.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# the Hub probe lives in hubprobe.py; its names stay reachable here (tests clear data._tcp_reachable's cache)
from .hubprobe import _forced_offline, _hub_reachable, _offline_requested, _tcp_reachable  # noqa: F401
from .textfiles import _FIELD_FIX, _LOCAL_SUFFIXES, _SPLIT_ALIASES, DataError, _as_text, read_local

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SOURCE", "FALLBACK_SOURCE", "PRESETS", "DataError", "Preset", "ResolvedSource",
           "calibration_tokens", "eval_tokens", "load_documents", "resolve_source"]

DEFAULT_SOURCE = "wikitext2"
FALLBACK_SOURCE = "python-docs"
SEPARATOR = "\n\n"
# Corpora up to this many characters are tokenized as one joined string (the standard recipe,
# byte-identical to published pipelines); larger ones are tokenized per document.
WHOLE_STREAM_MAX_CHARS = 16_000_000
_BATCH_DOCS = 256


@dataclass(frozen=True)
class Preset:
    """How a named corpus is loaded. ``hub_ids`` empty means built in (offline)."""

    description: str
    hub_ids: tuple[str, ...] = ()  # tried in order (the first reachable/cached one wins)
    config: str | None = None
    # our split name ("train" | "test" | "validation") -> the split loaded from the Hub
    splits: Mapping[str, str] = field(default_factory=dict)
    data_files: Mapping[str, str] | None = None  # Hub split -> file inside the repo (c4)
    holdout: float | None = None  # no test split on the Hub: last fraction of documents is "test"
    keep_empty: bool = False  # keep empty rows so the joined text matches the standard protocol


PRESETS: dict[str, Preset] = {
    "wikitext2": Preset(
        "WikiText-2 raw (rows kept as-is, empty ones too, as in the standard perplexity protocol)",
        hub_ids=("wikitext", "Salesforce/wikitext"), config="wikitext-2-raw-v1",
        splits={"train": "train", "test": "test", "validation": "validation"}, keep_empty=True),
    "c4": Preset(
        "C4 English, first train shard / first validation shard", hub_ids=("allenai/c4",),
        splits={"train": "train", "test": "validation", "validation": "validation"},
        data_files={"train": "en/c4-train.00000-of-01024.json.gz",
                    "validation": "en/c4-validation.00000-of-00008.json.gz"}),
    "pile": Preset(
        "The Pile, first 10k documents (NeelNanda/pile-10k); test = last 10% of documents",
        hub_ids=("NeelNanda/pile-10k",), holdout=0.1,
        splits={"train": "train", "test": "train", "validation": "train"}),
    FALLBACK_SOURCE: Preset(
        "Python's own reference docs (pydoc_data.topics), offline; test = topics after 80% of the text"
    ),
}
_ALIASES = {"wikitext-2": "wikitext2", "pile10k": "pile", "pile-10k": "pile", "pydoc": FALLBACK_SOURCE}
_HUB_SPEC = re.compile(r"([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::([^:]*))?(?::([^:]+))?")


@dataclass(frozen=True)
class ResolvedSource:
    """What a source string resolved to; recorded in provenance (``pruning.json``)."""

    spec: str  # what the user passed
    kind: str  # "preset" | "hub" | "local"
    name: str  # preset name / hub id / absolute path
    config: str | None
    split: str
    text_field: str
    n_documents: int
    n_chars: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- documents

def load_documents(source: str, split: str = "train",
                   text_field: str = "text") -> tuple[list[str], ResolvedSource]:
    """Load the documents of ``source`` (see the module docstring for what a source can be).

    Local files (``split`` is ignored for them, except for directories):

    - ``.txt``: one document per paragraph block; blocks are separated by blank lines.
    - ``.jsonl`` / ``.json``: records with ``text_field`` (``.json``: a list of records, an object
      holding one list of records, or JSON lines).
    - ``.parquet``: column ``text_field``.
    - a directory: its ``*.txt`` files, sorted by name, each file one document. For ``split="train"``
      a ``train/`` subfolder is used if it exists; for ``test``/``validation``/``eval`` a ``test/``
      or ``validation/`` subfolder; otherwise the directory itself.

    Presets always read their own ``text`` field. Empty (whitespace-only) documents are dropped,
    except in ``wikitext2``, whose rows are kept verbatim so that the joined text is the standard
    one. Raises :class:`DataError`.
    """
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"data source must be a non-empty string, got {source!r}; "
                        f"pass a preset ({', '.join(PRESETS)}), a local file or a Hub id org/name")
    preset = _ALIASES.get(source.lower(), source.lower())
    if preset in PRESETS:
        docs, resolved = _load_preset(preset, _canonical_split(split, f"preset {preset!r}"), text_field)
    else:
        path = Path(source).expanduser()
        if path.exists():
            docs, resolved = _load_local(path.resolve(), split, text_field)
        elif path.suffix.lower() in _LOCAL_SUFFIXES or source.startswith(("/", ".", "~")):
            raise DataError(f"data file {source!r} does not exist; check the path "
                            f"(absolute: {path.absolute()})")
        elif (m := _HUB_SPEC.fullmatch(source)) is not None:
            hub_id, config, hub_split = m.group(1), m.group(2) or None, m.group(3)
            split = hub_split or ("test" if split == "eval" else split)
            rows = _hub_rows(hub_id, config, split, text_field)
            docs, resolved = rows, ResolvedSource(source, "hub", hub_id, config, split, text_field, 0, 0)
        else:
            raise DataError(f"unknown data source {source!r}: it is not a preset, an existing path, "
                            f"or a Hub dataset id 'org/name[:config[:split]]'; presets are: "
                            f"{', '.join(PRESETS)}")
    if not (preset in PRESETS and PRESETS[preset].keep_empty):
        docs = [d for d in docs if d.strip()]
    if not any(d.strip() for d in docs):
        raise DataError(f"data source {source!r} ({resolved.split}) has no non-empty "
                        f"{text_field!r} text; pass a source that contains text")
    resolved = dataclasses.replace(resolved, spec=source, n_documents=len(docs),
                                   n_chars=sum(len(d) for d in docs))
    logger.info("data: %s %s (%s) -> %d documents, %d characters", resolved.kind, resolved.name,
                resolved.split, resolved.n_documents, resolved.n_chars)
    return docs, resolved


def _canonical_split(split: str, what: str) -> str:
    try:
        return _SPLIT_ALIASES[split.lower()]
    except (KeyError, AttributeError):
        raise DataError(f"unknown split {split!r} for {what}; use one of "
                        f"{', '.join(sorted(set(_SPLIT_ALIASES)))}") from None


def _load_preset(name: str, split: str, text_field: str) -> tuple[list[str], ResolvedSource]:
    preset = PRESETS[name]
    if not preset.hub_ids:
        return _python_docs(split), ResolvedSource(name, "preset", name, None, split, "text", 0, 0)
    hub_split = preset.splits[split]
    data_files = {hub_split: preset.data_files[hub_split]} if preset.data_files else None
    first_error: DataError | None = None
    for hub_id in preset.hub_ids:
        try:
            rows = _hub_rows(hub_id, preset.config, hub_split, "text", data_files)
            break
        except DataError as e:
            first_error = first_error or e
    else:
        assert first_error is not None
        raise first_error
    if preset.holdout is not None:  # disjoint document split: first (1-h) train, last h test
        cut = len(rows) - int(round(len(rows) * preset.holdout))
        rows = rows[:cut] if split == "train" else rows[cut:]
    return rows, ResolvedSource(name, "preset", name, preset.config, split, "text", 0, 0)


def _python_docs(split: str) -> list[str]:
    """Topic texts of ``pydoc_data.topics`` in sorted-key order, exact duplicates dropped.

    "train" = topics whose text starts before 80% of the total characters, "test" = the rest.
    """
    from pydoc_data.topics import topics  # standard library; text is read at runtime, never copied

    docs = list(dict.fromkeys(topics[k] for k in sorted(topics)))
    total, offset, n_train = sum(len(d) for d in docs), 0, 0
    for doc in docs:
        if offset >= 0.8 * total:
            break
        offset += len(doc)
        n_train += 1
    return docs[:n_train] if split == "train" else docs[n_train:]


# ----------------------------------------------------------------------------- local files

def _load_local(path: Path, split: str, text_field: str) -> tuple[list[str], ResolvedSource]:
    """Read a local file or directory; the recorded split is "all" unless a split subfolder is used."""
    docs, used, used_split, field_used = read_local(path, split, text_field)
    return docs, ResolvedSource(str(path), "local", used, None, used_split, field_used, 0, 0)


# ----------------------------------------------------------------------------- Hub

def _unreachable_message(hub_id: str, error: BaseException) -> str:
    import datasets.config
    return (f"Hugging Face dataset {hub_id!r} could not be reached (offline, Hub unreachable, or not "
            f"in the local cache {datasets.config.HF_DATASETS_CACHE}): {error}. Pre-cache it by "
            f"loading it once with internet access (or point HF_DATASETS_CACHE at a cache that has "
            f"it), or pass a local file instead, e.g. --calibration path/to/text.jsonl, or use the "
            f"offline preset {FALLBACK_SOURCE!r}")


def _hub_rows(hub_id: str, config: str | None, split: str, text_field: str,
              data_files: Mapping[str, str] | None = None) -> list[str]:
    """Rows of ``text_field`` from ``datasets.load_dataset`` (cache only when offline/unreachable)."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    offline = _offline_requested() or not _hub_reachable()
    try:
        with _forced_offline(offline):
            ds = datasets.load_dataset(hub_id, config, split=split,
                                       data_files=dict(data_files) if data_files else None)
    except DatasetNotFoundError as e:
        if offline:
            raise DataError(_unreachable_message(hub_id, e)) from e
        raise DataError(f"Hugging Face dataset {hub_id!r} was not found or is gated ({e}); check "
                        f"the id, log in with `hf auth login`, or pass a local file") from e
    except (ConnectionError, OSError) as e:
        raise DataError(_unreachable_message(hub_id, e)) from e
    except ValueError as e:  # unknown split or config
        raise DataError(f"cannot load {hub_id!r} (config {config!r}, split {split!r}): {e}; pass "
                        f"'{hub_id}:CONFIG:SPLIT' with a config and split that exist") from e
    if text_field not in ds.column_names:
        raise DataError(f"Hugging Face dataset {hub_id!r} has no column {text_field!r}; available "
                        f"columns: {', '.join(ds.column_names)}; {_FIELD_FIX}")
    return [_as_text(v, f"{hub_id} row {i}") for i, v in enumerate(ds[text_field])]


def _preset_available(name: str) -> bool:
    """Is a Hub preset in the local cache, or (when not offline) is the Hub reachable?"""
    import datasets

    preset = PRESETS[name]
    probe_split = preset.splits.get("test", "train")
    data_files = {probe_split: preset.data_files[probe_split]} if preset.data_files else None
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()  # no "using the latest cached version" noise here
    try:
        for hub_id in preset.hub_ids:
            try:
                with _forced_offline():
                    datasets.load_dataset(hub_id, preset.config, split=probe_split,
                                          data_files=data_files)
                return True
            except Exception as e:  # noqa: BLE001 - a probe: any failure means "not cached"
                logger.debug("data: %s not in the local cache (%s)", hub_id, e)
    finally:
        datasets.logging.set_verbosity(verbosity)
    return not _offline_requested() and _hub_reachable()


def resolve_source(source: str | None) -> str:
    """The one place the default data source is decided: ``None`` means "the default".

    A source the user named (CLI flag, ``key=value`` override, recipe YAML, Python argument) is
    returned unchanged and never replaced: errors surface when it is loaded. ``None`` becomes
    ``DEFAULT_SOURCE`` (wikitext2) when that preset can be loaded, else the offline preset
    ``python-docs`` with a WARNING.

    The check is fast: the preset is first looked up in the local cache with the libraries' offline
    mode forced (no network at all); if it is not cached and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is
    not set, a TCP connection to the Hub endpoint (or the HTTPS proxy) is tried with a 2 s timeout.
    """
    if source is not None:
        return source
    if _preset_available(DEFAULT_SOURCE):
        return DEFAULT_SOURCE
    logger.warning("data: the default data %r cannot be loaded (Hugging Face Hub offline or "
                   "unreachable, and it is not in the local cache); falling back to the offline "
                   "preset %r. Numbers will not be comparable with %s results: pre-cache %s once "
                   "online, or pass a data source explicitly.", DEFAULT_SOURCE, FALLBACK_SOURCE,
                   DEFAULT_SOURCE, DEFAULT_SOURCE)
    return FALLBACK_SOURCE


# ----------------------------------------------------------------------------- tokens

def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # verbose=False: no "Token indices sequence length is longer than ..." warning for streams
    return list(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos]`` if the tokenizer has a BOS token and puts it first by default, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", verbose=False)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _token_stream(tokenizer: Any, docs: list[str], stop_after: int | None = None) -> list[int]:
    """BOS? + tokens of ``"\\n\\n".join(docs)``.

    Small corpora are tokenized as one string; above :data:`WHOLE_STREAM_MAX_CHARS` documents are
    tokenized in batches with the tokens of ``"\\n\\n"`` between them, stopping once the stream
    holds at least ``stop_after`` tokens.
    """
    ids = _bos_prefix(tokenizer)
    if sum(len(d) for d in docs) <= WHOLE_STREAM_MAX_CHARS:
        return ids + _encode(tokenizer, [SEPARATOR.join(docs)])[0]
    sep = _encode(tokenizer, [SEPARATOR])[0]
    for start in range(0, len(docs), _BATCH_DOCS):
        for i, doc_ids in enumerate(_encode(tokenizer, docs[start:start + _BATCH_DOCS])):
            if start + i:
                ids += sep
            ids += doc_ids
        if stop_after is not None and len(ids) >= stop_after:
            break
    return ids


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}; "
                        f"set {name} to a whole number >= {minimum}")


def calibration_tokens(tokenizer: Any, source: str, nsamples: int, seqlen: int, seed: int = 0,
                       text_field: str = "text",
                       split: str = "train") -> tuple[torch.LongTensor, ResolvedSource]:
    """``nsamples`` random windows of ``seqlen`` tokens: a ``[nsamples, seqlen]`` int64 tensor.

    The Wanda/SparseGPT recipe: the documents joined with ``"\\n\\n"`` are tokenized (BOS once at
    the start if the tokenizer adds it by default) and window starts are drawn uniformly with
    ``random.Random(seed)``; windows may overlap. Corpora larger than
    :data:`WHOLE_STREAM_MAX_CHARS` (c4, pile) are not tokenized whole: their document order is
    shuffled with the same seed and documents are tokenized until the stream holds twice the
    requested tokens. Same arguments -> identical tensor.
    """
    _check_count("nsamples", nsamples, 1)
    _check_count("seqlen", seqlen, 2)
    docs, resolved = load_documents(source, split=split, text_field=text_field)
    need = nsamples * seqlen
    rng = random.Random(seed)
    if resolved.n_chars > WHOLE_STREAM_MAX_CHARS:
        rng.shuffle(docs)
        stream = _token_stream(tokenizer, docs, stop_after=2 * need)
    else:
        stream = _token_stream(tokenizer, docs)
    if len(stream) < need:
        fits, longest = len(stream) // seqlen, len(stream) // nsamples
        fix = " or ".join([f"--nsamples {fits}"] * (fits > 0) + [f"--seqlen {longest}"] * (longest >= 2))
        fix = f"pass {fix or f'--nsamples 1 --seqlen {len(stream)}'}"
        raise DataError(f"too little calibration text: {source!r} ({resolved.split}) gives "
                        f"{len(stream)} tokens, but nsamples={nsamples} x seqlen={seqlen} = {need} "
                        f"tokens were requested; {fix}, or more text")
    starts = [rng.randint(0, len(stream) - seqlen) for _ in range(nsamples)]
    flat = torch.tensor(stream, dtype=torch.long)
    batch = torch.stack([flat[s:s + seqlen] for s in starts])  # [nsamples, seqlen]
    logger.info("calibration: %d x %d tokens from %s (%s, seed %d, %d tokens available)",
                nsamples, seqlen, resolved.name, resolved.split, seed, len(stream))
    return batch, resolved


def eval_tokens(tokenizer: Any, source: str, split: str = "test", text_field: str = "text",
                max_tokens: int | None = None) -> tuple[torch.LongTensor, ResolvedSource]:
    """The whole evaluation stream, 1-D int64: documents joined with ``"\\n\\n"``, tokenized (the
    standard corpus-perplexity protocol), cut to ``max_tokens`` if given."""
    if max_tokens is not None:
        _check_count("max_tokens", max_tokens, 1)
    docs, resolved = load_documents(source, split=split, text_field=text_field)
    stream = _token_stream(tokenizer, docs, stop_after=max_tokens)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    logger.info("evaluation: %d tokens from %s (%s)", len(stream), resolved.name, resolved.split)
    return torch.tensor(stream, dtype=torch.long), resolved
