"""The perplexity protocol against a hand computation, and perplexity vs a baseline in the report."""
from __future__ import annotations

import json
import math

import pytest
import torch

from llmprune.cli import main
from llmprune.evaluate.perplexity import perplexity

from .conftest import VOCAB, make_model


def hand_perplexity(model: torch.nn.Module, stream: list[int], seqlen: int) -> tuple[float, int]:
    """Non-overlapping windows; every position after the first of a window is predicted from its own
    prefix only (the prefix is re-run for each position: no cache, no batching); log-softmax written out
    in float64: log p(x) = z_x − (m + log Σ exp(z − m))."""
    total, count = 0.0, 0
    for w in range(len(stream) // seqlen):
        window = stream[w * seqlen:(w + 1) * seqlen]
        for t in range(1, seqlen):
            with torch.no_grad():
                z = model(input_ids=torch.tensor([window[:t]])).logits[0, -1].double().tolist()
            m = max(z)
            log_norm = m + math.log(sum(math.exp(v - m) for v in z))
            total += -(z[window[t]] - log_norm)
            count += 1
    return math.exp(total / count), count


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_perplexity_matches_hand_computation(family):
    model = make_model(family)
    g = torch.Generator().manual_seed(5)
    stream = torch.randint(0, VOCAB, (3 * 6 + 4,), generator=g)  # 3 windows of 6 and a dropped remainder of 4
    expect, n = hand_perplexity(model, stream.tolist(), seqlen=6)
    for batch_size in (1, 2):
        res = perplexity(model, stream, seqlen=6, batch_size=batch_size, progress=False)
        assert res.n_windows == 3 and res.n_tokens == n == 3 * 5
        assert res.perplexity == pytest.approx(expect, rel=1e-5)
        assert res.nll == pytest.approx(math.log(expect), rel=1e-5)
    first, _ = hand_perplexity(model, stream[:6].tolist(), seqlen=6)
    assert perplexity(model, stream, seqlen=6, max_windows=1, progress=False).perplexity == pytest.approx(first,
                                                                                                      rel=1e-5)


@pytest.mark.parametrize("family_name", ["llama"])
def test_eval_perplexity_with_baseline_into_report(tmp_path, model_dir, text_file, capsys):
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--recipe", "magnitude", "--sparsity", "0.4", "-o", str(out), "-q"]) == 0
    saved = (out / "pruning.json").read_bytes()
    assert main(["eval", str(out), "--data", str(text_file), "--seqlen", "32", "--max-windows", "3",
                 "--baseline", "base", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "(baseline)" in printed and "ppl" in printed
    report = json.loads((out / "report.json").read_text())
    entry = report["perplexity"][str(text_file.resolve())]
    assert (entry["split"], entry["seqlen"], entry["n_windows"]) == ("all", 32, 3)  # a local file is one split
    assert entry["baseline_model"] == str(model_dir) == report["baseline"]
    assert entry["baseline"] != entry["pruned"]
    assert (out / "pruning.json").read_bytes() == saved  # written once at save time; results live in report.json
    md = (out / "report.md").read_text()
    assert "## Perplexity" in md and f"{entry['pruned']:.3f}" in md and f"{entry['baseline']:.3f}" in md
