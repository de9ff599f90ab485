"""`llmprune bench` on tiny checkpoints: output schema, exact KV/weight bytes, ideal speed-up, errors."""
from __future__ import annotations

import json

import pytest
import torch

from llmprune import surgery
from llmprune.checkpoint import save_pruned
from llmprune.cli import main
from llmprune.evaluate.bench import BenchSettings, cache_bytes, median_iqr, prefill, time_models, weight_bytes
from llmprune.evaluate.flops import ideal_speedups

from .conftest import make_model
from .test_surgery import mixed_plan

SPEED_KEYS = {"device", "dtype", "prompt_len", "decode_tokens", "batch_sizes", "prefill_speedup", "decode_speedup",
              "ideal_speedup", "memory_saving", "runs"}
RUN_KEYS = {"batch_size", "model", "prefill_ms_median", "prefill_ms_iqr", "decode_tok_s_median", "decode_tok_s_iqr",
            "peak_mem_bytes", "kv_cache_bytes", "weight_bytes"}


def _kv_bytes(geometries, batch: int, tokens: int, itemsize: int = 4) -> int:  # noqa: ANN001
    """Keys + values of every layer that still has attention: 2 · n_kv · head_dim · B · tokens."""
    return sum(2 * g.n_kv_heads * g.head_dim * batch * tokens * itemsize for g in geometries if g.has_attn)


@pytest.fixture
def pair(tmp_path, tiny_tokenizer):  # noqa: ANN001, ANN201
    """A dense tiny model folder and a non-uniform pruned checkpoint of it (with provenance naming the base)."""
    dense = make_model("llama", tie=True, max_position_embeddings=512)
    base_dir = tmp_path / "dense"
    dense.save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    plan = mixed_plan(dense)
    ckpt = save_pruned(surgery.apply(dense, plan), tiny_tokenizer, tmp_path / "ckpt", plan,
                       info={"provenance": {"model_arg": str(base_dir)}})
    return base_dir, ckpt, plan


def test_bench_command_output_schema(pair, capsys):
    base_dir, ckpt, plan = pair
    assert main(["bench", str(ckpt), "--prompt-len", "12", "--decode-tokens", "3", "--batch-sizes", "1,2",
                 "--repeats", "2", "--warmup", "1", "--threads", "1", "-q"]) == 0  # --baseline defaults to base
    printed = capsys.readouterr().out
    assert "prefill speed-up" in printed and "ideal from FLOPs" in printed
    report = json.loads((ckpt / "report.json").read_text())
    speed = report["speed"]
    assert SPEED_KEYS <= set(speed) and report["baseline"] == str(base_dir)
    assert (speed["prompt_len"], speed["decode_tokens"], speed["batch_sizes"], speed["threads"]) == (12, 3, [1, 2], 1)
    assert len(speed["runs"]) == 4 and all(RUN_KEYS <= set(r) for r in speed["runs"])
    assert "fresh process" in speed["memory_method"]
    runs = {(r["model"], r["batch_size"]): r for r in speed["runs"]}
    for bs in (1, 2):
        d, p = runs[("dense", bs)], runs[("pruned", bs)]
        assert len(d["prefill_ms_samples"]) == 2 and d["prefill_ms_median"] > 0 and d["decode_tok_s_median"] > 0
        # exact bytes: the cache holds the 12 prompt tokens and the 3 tokens fed back by the decode steps
        assert d["kv_cache_bytes"] == _kv_bytes(plan.geometry, bs, 12 + 3)
        assert p["kv_cache_bytes"] == _kv_bytes(plan.geometry_after(), bs, 12 + 3) < d["kv_cache_bytes"]
        assert p["weight_bytes"] < d["weight_bytes"] and d["peak_mem_bytes"] >= d["weight_bytes"]
    ratios = {r["batch_size"]: r for r in speed["ratios"]}
    assert ratios[2]["prefill_speedup"] == pytest.approx(runs[("dense", 2)]["prefill_ms_median"] /
                                                         runs[("pruned", 2)]["prefill_ms_median"])
    assert speed["prefill_speedup"] == pytest.approx((ratios[1]["prefill_speedup"] * ratios[2]["prefill_speedup"])
                                                     ** 0.5)
    assert speed["kv_cache_saving"] == pytest.approx(1 - runs[("pruned", 2)]["kv_cache_bytes"] /
                                                     runs[("dense", 2)]["kv_cache_bytes"])
    dense = make_model("llama", tie=True)
    expect = ideal_speedups(plan.geometry, plan.geometry_after(), 64, dense.config.vocab_size, 12, 3)
    assert speed["ideal_speedup"] == pytest.approx(expect["ideal_speedup"]) and speed["ideal_speedup"] > 1
    assert (ckpt / "report.png").exists() and "## Speed and memory" in (ckpt / "report.md").read_text()
    assert "results" not in json.loads((ckpt / "pruning.json").read_text())  # report.json is the one copy


def test_prefill_keeps_last_logits_and_cache_matches_geometry(pair):
    _, _, plan = pair
    model = make_model("llama", tie=True)
    ids = torch.randint(0, 320, (2, 5))
    cache, nxt = prefill(model, ids)
    assert nxt.shape == (2, 1)
    assert torch.equal(nxt[:, 0], model(ids).logits[:, -1].argmax(-1))
    assert cache_bytes(cache) == _kv_bytes(plan.geometry, 2, 5)
    assert weight_bytes(model) == 4 * sum(p.numel() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())


def test_timing_interleaves_and_summarises():
    calls: list[str] = []

    class Clocked(torch.nn.Module):
        def __init__(self, name: str):
            super().__init__()
            self.name, self.w = name, torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, **kw):  # noqa: ANN001, ANN003, ANN201
            calls.append(self.name)
            from types import SimpleNamespace

            return SimpleNamespace(past_key_values=None, logits=torch.zeros(input_ids.shape[0], 1, 4))

    s = BenchSettings(prompt_len=4, decode_tokens=1, batch_sizes=(1,), repeats=3, warmup=1)
    out = time_models({"a": Clocked("a"), "b": Clocked("b")}, 4, s, progress=False)
    # warm-up a, warm-up b, then ABBA...: rounds a b | b a | a b (each run = prefill + 1 decode step)
    runs = calls[::2]
    assert runs == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert len(out[("a", 1)].prefill_s) == 3
    assert median_iqr([1.0, 2.0, 3.0, 10.0]) == (2.5, pytest.approx(4.75 - 1.75))  # inclusive quartiles
    assert median_iqr([7.0]) == (7.0, 0.0)


def test_bench_errors(tmp_path, pair, tiny_tokenizer, capsys):
    base_dir, ckpt, _ = pair
    assert main(["bench", str(tmp_path / "nope"), "--baseline", str(base_dir)]) == 2
    assert "checkpoint directory" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope"), "--data", "python-docs"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "--baseline", str(tmp_path / "missing-dense"), "--data", "python-docs"]) == 2
    assert "missing-dense does not exist" in capsys.readouterr().err
    assert main(["bench", str(ckpt), "--batch-sizes", "1,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["bench", str(ckpt), "--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err

    other = tmp_path / "other-vocab"  # a different vocabulary: not the model this checkpoint came from
    make_model("llama", vocab=400).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    assert main(["bench", str(ckpt), "--baseline", str(other)]) == 2
    err = capsys.readouterr().err
    assert "vocab_size 400" in err and "--baseline base" in err
    retok = tmp_path / "other-tokenizer"  # same vocab_size in the config, but the tokenizer differs
    make_model("llama").save_pretrained(retok)
    tok = type(tiny_tokenizer).from_pretrained(base_dir)
    tok.add_tokens(["<an-extra-token>"])
    tok.save_pretrained(retok)
    assert main(["eval", str(ckpt), "--baseline", str(retok), "--data", "python-docs"]) == 2
    assert "different tokenizer vocabulary" in capsys.readouterr().err
    assert not (ckpt / "report.json").exists()  # nothing written on failure


def test_ratio_ci_brackets_the_paired_ratio():
    from llmprune.evaluate.bench import ratio_ci

    lo, hi = ratio_ci([2.0, 2.2, 1.8, 2.0], [1.0, 1.1, 0.9, 1.0])  # every paired ratio is 2
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    lo, hi = ratio_ci([1.0, 3.0, 2.0, 2.5, 1.5], [1.0] * 5)
    assert lo < 2.0 < hi and lo >= 1.0 and hi <= 3.0
    assert ratio_ci([1.0], [1.0]) is None
