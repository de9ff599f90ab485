"""Shared fixtures: tiny random models of every supported family (GQA, 3 layers) and a tiny tokenizer.

Everything is offline and takes milliseconds to build.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import llmprune  # noqa: E402,F401  (registers llmprune_llama)

# First lines of a subprocess script in which `import llmprune` is impossible (only transformers and the
# checkpoint's remote code can load a model there); each test appends its own checks (dedented).
NO_LLMPRUNE_PREAMBLE = """
import sys, importlib.abc, json, torch
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "llmprune" or name.startswith("llmprune."):
            raise ImportError("llmprune is not installed here")
sys.meta_path.insert(0, Block())
"""

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2")
VOCAB = 320
SLIDING_WINDOW = 5  # Gemma's sliding layers: shorter than the test sequences, so the window matters


def make_config(family: str = "llama", layers: int = 3, tie: bool = False, vocab: int = VOCAB, **kw):  # noqa: ANN201
    """A tiny config with GQA (4 query heads, 2 KV heads). Qwen3 and Gemma get head_dim != hidden/heads;
    Gemma alternates sliding (window SLIDING_WINDOW) and full attention layers, with soft-capping."""
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Olmo2Config, Phi3Config,
                              Qwen2Config, Qwen3Config)

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common.update(kw)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        common.setdefault("head_dim", 24)
        return Qwen3Config(**common)
    if family in ("gemma2", "gemma3_text"):
        common.setdefault("head_dim", 24)
        common.setdefault("sliding_window", SLIDING_WINDOW)
        common.setdefault("query_pre_attn_scalar", 20)
        common.setdefault("attn_logit_softcapping", 5.0)  # small enough to bite on random weights
        if family == "gemma2":
            common.setdefault("final_logit_softcapping", 3.0)
            return Gemma2Config(**common)
        common.setdefault("layer_types", ["sliding_attention", "full_attention", "sliding_attention"][:layers]
                          + ["full_attention"] * max(0, layers - 3))
        return Gemma3TextConfig(**common)
    if family == "phi3":
        return Phi3Config(**common)
    if family == "olmo2":
        return Olmo2Config(**common)
    raise ValueError(family)


def make_model(family: str = "llama", seed: int = 0, **kw) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, **kw), dtype=torch.float32)
    # Random init leaves norms at 1 and biases at 0; perturb them so tests see every parameter matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny_model(family_name: str) -> torch.nn.Module:
    return make_model(family_name)


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (4, 12), generator=g)


def python_docs_text(limit: int | None = None) -> str:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[:limit] if limit else text


@pytest.fixture(scope="session")
def tiny_tokenizer():  # noqa: ANN201
    """A byte-level BPE tokenizer with VOCAB entries, trained in-memory on Python's own docs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([python_docs_text(60_000)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert len(fast) == VOCAB
    return fast


@pytest.fixture
def model_dir(tmp_path: Path, tiny_tokenizer, family_name: str) -> Path:  # noqa: ANN001
    """A tiny model + tokenizer saved as an ordinary HF folder (what `--model DIR` reads)."""
    d = tmp_path / f"tiny-{family_name}"
    make_model(family_name, tie=True).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """~60 kB of English prose (Python's documentation) as a local calibration/eval file."""
    p = tmp_path / "docs.txt"
    p.write_text(python_docs_text(60_000))
    return p
