"""Tests for llmprune.data: sources -> documents -> seeded token tensors. Offline, seconds."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llmprune import data
from llmprune.data import (
    PRESETS,
    DataError,
    calibration_tokens,
    eval_tokens,
    load_documents,
    resolve_source,
)


@pytest.fixture(scope="module")
def bpe_json() -> str:
    """A tiny byte-level BPE trained in memory on the python-docs text (no downloads)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    return tok.to_str()


def _wrap(bpe_json: str, add_bos: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer.from_str(bpe_json)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tokenizer(bpe_json: str) -> PreTrainedTokenizerFast:
    return _wrap(bpe_json, add_bos=False)  # GPT-2 style: has a BOS token but does not add it


@pytest.fixture
def bos_tokenizer(bpe_json: str) -> PreTrainedTokenizerFast:
    return _wrap(bpe_json, add_bos=True)  # Llama style: puts BOS first by default


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never touch the real Hub: unresolvable endpoint, empty dataset cache, fresh probe cache."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    data._tcp_reachable.cache_clear()


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def online_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No offline flag anywhere: reachability must come from the TCP probe."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


# ----------------------------------------------------------------------------- local formats

def test_txt_file_is_split_into_blank_line_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("first para\nline two\n\n\n  \nsecond para\n \t\n    indented third\n\n")
    docs, src = load_documents(str(path))
    assert docs == ["first para\nline two", "second para", "    indented third"]
    assert (src.kind, src.name, src.split, src.n_documents) == ("local", str(path.resolve()), "all", 3)
    assert src.n_chars == sum(map(len, docs))


def test_jsonl_reads_text_field_and_drops_empty(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    rows = [{"text": "alpha", "id": 1}, {"text": "   "}, {"text": None}, {"text": "beta"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs, src = load_documents(str(path))
    assert docs == ["alpha", "beta"] and src.n_documents == 2 and src.text_field == "text"
    docs, _ = load_documents(str(path.rename(tmp_path / "lines.json")))  # JSON lines named .json
    assert docs == ["alpha", "beta"]


def test_json_list_and_wrapped_records_and_custom_field(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"body": "one"}, {"body": "two"}]))
    assert load_documents(str(path), text_field="body")[0] == ["one", "two"]
    path.write_text(json.dumps({"version": 1, "data": [{"text": "x"}, {"text": "y"}]}))
    assert load_documents(str(path))[0] == ["x", "y"]
    path.write_text(json.dumps({"text": "just one string"}))
    with pytest.raises(DataError, match="expected a list of records"):
        load_documents(str(path))


def test_parquet_column(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": ["doc a", "", "doc c"], "n": [1, 2, 3]}), path)
    docs, src = load_documents(str(path), text_field="content")
    assert docs == ["doc a", "doc c"] and src.text_field == "content"
    with pytest.raises(DataError, match=r"no column 'text'.*content, n"):
        load_documents(str(path))


def test_directory_of_txt_files_sorted_with_split_subfolder(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second\n\nstill second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes.md").write_text("ignored")
    docs, src = load_documents(str(tmp_path))
    assert docs == ["first", "second\n\nstill second"] and src.split == "all"
    assert load_documents(str(tmp_path), split="test")[0] == docs  # no test/ folder: the dir itself
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "z.txt").write_text("held out")
    docs, src = load_documents(str(tmp_path), split="eval")
    assert docs == ["held out"] and src.split == "test" and src.name.endswith("test")


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no .txt files"):
        load_documents(str(tmp_path))


def test_missing_text_field_lists_available_fields(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"content": "a", "title": "t"}) + "\n")
    with pytest.raises(DataError) as info:
        load_documents(str(path))
    msg = str(info.value)
    assert "'text'" in msg and "content, title" in msg and "text_field=NAME" in msg


def test_only_empty_documents_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(DataError, match="no non-empty"):
        load_documents(str(path))


def test_missing_file_and_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_documents(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        load_documents("calib/nope.jsonl")  # looks like org/name, but it is a file name
    with pytest.raises(DataError) as info:
        load_documents("wikitext3")
    assert all(name in str(info.value) for name in PRESETS)


# ----------------------------------------------------------------------------- python-docs preset

def test_python_docs_train_test_are_disjoint_and_cover_the_corpus() -> None:
    train, src_train = load_documents("python-docs", split="train")
    test, src_test = load_documents("python-docs", split="eval")
    assert set(train).isdisjoint(test)
    assert set(train) | set(test) == set(topics.values())
    frac = src_train.n_chars / (src_train.n_chars + src_test.n_chars)
    assert 0.75 < frac < 0.85, frac
    assert (src_train.kind, src_train.split, src_test.split) == ("preset", "train", "test")
    assert train[0] == topics[sorted(topics)[0]]  # sorted-key order
    json.dumps(src_train.to_dict())  # provenance is JSON-able
    assert src_train.to_dict()["n_documents"] == len(train)


# ----------------------------------------------------------------------------- tokens

def test_calibration_shape_dtype_determinism(tokenizer: PreTrainedTokenizerFast) -> None:
    a, src = calibration_tokens(tokenizer, "python-docs", nsamples=8, seqlen=64, seed=0)
    b, _ = calibration_tokens(tokenizer, "python-docs", nsamples=8, seqlen=64, seed=0)
    c, _ = calibration_tokens(tokenizer, "python-docs", nsamples=8, seqlen=64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert src.split == "train"
    # every row is a contiguous window of the "\n\n"-joined train stream
    stream, _ = eval_tokens(tokenizer, "python-docs", split="train")
    windows = stream.unfold(0, 64, 1)
    assert all(bool((windows == row).all(1).any()) for row in a)


def test_eval_stream_is_the_joined_text(tokenizer: PreTrainedTokenizerFast) -> None:
    docs, _ = load_documents("python-docs", split="test")
    stream, src = eval_tokens(tokenizer, "python-docs")
    expected = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    assert stream.dtype == torch.int64 and stream.dim() == 1 and stream.tolist() == expected
    short, _ = eval_tokens(tokenizer, "python-docs", max_tokens=100)
    assert torch.equal(short, stream[:100]) and src.split == "test"


def test_bos_only_when_the_tokenizer_adds_it(tokenizer, bos_tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("The assert statement.\n\nThe import statement.")
    plain, _ = eval_tokens(tokenizer, str(path))
    with_bos, _ = eval_tokens(bos_tokenizer, str(path))
    assert plain[0].item() != tokenizer.bos_token_id
    assert with_bos[0].item() == bos_tokenizer.bos_token_id
    assert with_bos[1:].tolist() == plain.tolist()  # BOS once, at the start of the stream only
    assert (with_bos == bos_tokenizer.bos_token_id).sum() == 1


def test_no_sequence_too_long_warning(tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    import transformers

    tokenizer.model_max_length = 16
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            stream, _ = eval_tokens(tokenizer, "python-docs")
    finally:
        transformers.logging.disable_propagation()
    assert len(stream) > 16
    assert "longer than the specified maximum" not in caplog.text


def test_too_little_text_error_says_what_fits(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("The assert statement is a convenient way to insert debugging assertions.")
    n = len(eval_tokens(tokenizer, str(path))[0])
    with pytest.raises(DataError) as info:
        calibration_tokens(tokenizer, str(path), nsamples=4, seqlen=n)
    msg = str(info.value)
    assert "too little calibration text" in msg and f"gives {n} tokens" in msg
    assert f"= {4 * n}" in msg and "--nsamples 1" in msg and "or more text" in msg
    with pytest.raises(DataError, match=f"pass --seqlen {n}, or more text"):
        calibration_tokens(tokenizer, str(path), nsamples=1, seqlen=n + 1)
    with pytest.raises(DataError, match=f"pass --nsamples 1 --seqlen {n}, or more text"):
        calibration_tokens(tokenizer, str(path), nsamples=n, seqlen=n + 1)  # no single knob fits
    ok, _ = calibration_tokens(tokenizer, str(path), nsamples=1, seqlen=n)  # exactly fits
    assert ok.shape == (1, n)


@pytest.mark.parametrize("nsamples,seqlen", [(0, 8), (-1, 8), (2, 1), (2, 0), (True, 8), (2, 8.0)])
def test_bad_nsamples_or_seqlen(tokenizer, nsamples, seqlen) -> None:
    with pytest.raises(DataError, match="must be an integer >="):
        calibration_tokens(tokenizer, "python-docs", nsamples=nsamples, seqlen=seqlen)


def test_large_corpus_path_tokenizes_shuffled_documents_lazily(tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(data, "WHOLE_STREAM_MAX_CHARS", 10_000)
    calls = []
    original = data._encode
    monkeypatch.setattr(data, "_encode", lambda tok, texts: calls.append(len(texts)) or original(tok, texts))
    monkeypatch.setattr(data, "_BATCH_DOCS", 4)
    a, _ = calibration_tokens(tokenizer, "python-docs", nsamples=4, seqlen=32, seed=3)
    assert sum(calls) - 1 < len(load_documents("python-docs")[0])  # stopped early (1 call = separator)
    b, _ = calibration_tokens(tokenizer, "python-docs", nsamples=4, seqlen=32, seed=3)
    c, _ = calibration_tokens(tokenizer, "python-docs", nsamples=4, seqlen=32, seed=4)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)
    full, _ = eval_tokens(tokenizer, "python-docs")  # per-document stream, still "\n\n"-joined
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    docs, _ = load_documents("python-docs", split="test")
    expected = tokenizer(docs[0], add_special_tokens=False)["input_ids"] + sep
    assert full[: len(expected)].tolist() == expected
    head, _ = eval_tokens(tokenizer, "python-docs", max_tokens=50)
    assert torch.equal(head, full[:50])


# ----------------------------------------------------------------------------- Hub and fallback

def test_hub_spec_parsing() -> None:
    m = data._HUB_SPEC.fullmatch("org/name:cfg:validation")
    assert m is not None and m.groups() == ("org/name", "cfg", "validation")
    assert data._HUB_SPEC.fullmatch("org/name").groups() == ("org/name", None, None)
    assert data._HUB_SPEC.fullmatch("noslash") is None


@pytest.mark.usefixtures("offline_env")
def test_hub_id_offline_gives_precache_advice_fast() -> None:
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        load_documents("someorg/not-cached-corpus:cfg")
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert "'someorg/not-cached-corpus' could not be reached" in msg
    assert "HF_DATASETS_CACHE" in msg and "--calibration path/to/text.jsonl" in msg
    assert "python-docs" in msg


@pytest.mark.usefixtures("online_env")
def test_hub_id_unreachable_without_offline_flag_is_fast() -> None:
    start = time.monotonic()
    assert data._hub_reachable() is False  # hub.invalid never resolves
    with pytest.raises(DataError, match="could not be reached"):
        load_documents("someorg/not-cached-corpus")
    with pytest.raises(DataError, match="could not be reached"):
        eval_tokens(None, "wikitext2")  # presets go through the same path
    assert time.monotonic() - start < 10


@pytest.mark.usefixtures("offline_env")
def test_default_source_falls_back_when_offline(caplog: pytest.LogCaptureFixture) -> None:
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="llmprune.data"):
        assert resolve_source(None) == "python-docs"
    assert time.monotonic() - start < 10
    assert "falling back" in caplog.text and "python-docs" in caplog.text and "wikitext2" in caplog.text


@pytest.mark.usefixtures("online_env")
def test_default_source_falls_back_when_hub_unreachable() -> None:
    start = time.monotonic()
    assert resolve_source(None) == "python-docs"
    assert time.monotonic() - start < 10


@pytest.mark.usefixtures("offline_env")
def test_named_source_is_never_probed_nor_replaced(monkeypatch, caplog) -> None:
    def probe(name: str) -> bool:
        raise AssertionError("a named source must not be probed")

    monkeypatch.setattr(data, "_preset_available", probe)
    with caplog.at_level(logging.WARNING):
        assert resolve_source("wikitext2") == "wikitext2"  # offline, yet kept: the user asked for it
        assert resolve_source("someorg/x") == "someorg/x"
        assert resolve_source("python-docs") == "python-docs"
        assert resolve_source("some/local.jsonl") == "some/local.jsonl"
    monkeypatch.setattr(data, "_preset_available", lambda name: True)
    with caplog.at_level(logging.WARNING):
        assert resolve_source(None) == "wikitext2"
    assert "falling back" not in caplog.text


@pytest.mark.usefixtures("online_env")
def test_cached_wikitext2_is_kept_and_read_without_network(tmp_path: Path) -> None:
    """A Hub preset in the local cache: no fallback, loaded at once although the Hub is unreachable."""
    import datasets
    import datasets.config

    files = {}
    for split in ("train", "test", "validation"):
        files[split] = str(tmp_path / f"{split}.jsonl")
        rows = ["", f" = {split} heading = \n", f" {split} body text\n"]
        Path(files[split]).write_text("\n".join(json.dumps({"text": r}) for r in rows))
    builder = datasets.load_dataset_builder("json", data_files=files, cache_dir=str(tmp_path / "b"))
    builder.download_and_prepare()
    # lay the prepared arrow files out as the Hub dataset "wikitext" would be cached
    built = Path(builder.cache_dir)
    cached = Path(datasets.config.HF_DATASETS_CACHE) / "wikitext" / "wikitext-2-raw-v1" / "0.0.0" / "x"
    cached.mkdir(parents=True)
    for f in built.glob("*.arrow"):
        (cached / f.name.replace("json-", "wikitext-")).write_bytes(f.read_bytes())
    info = json.loads((built / "dataset_info.json").read_text())
    info.update(builder_name="wikitext", config_name="wikitext-2-raw-v1", dataset_name="wikitext")
    (cached / "dataset_info.json").write_text(json.dumps(info))

    start = time.monotonic()
    assert resolve_source(None) == "wikitext2"
    docs, src = load_documents("wikitext2", split="eval")
    assert time.monotonic() - start < 10
    assert docs == ["", " = test heading = \n", " test body text\n"]  # empty rows kept (standard join)
    assert (src.kind, src.name, src.config, src.split) == ("preset", "wikitext2", "wikitext-2-raw-v1", "test")
