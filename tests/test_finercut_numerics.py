"""FinerCut search numerics: non-finite distances rank last (no hang), bf16 exact search stays exact."""
from __future__ import annotations

import logging
import math
import signal

import pytest
import torch

from llmprune.prune.finercut.reference import ReferenceSearch
from llmprune.prune.finercut.residual_stream import ChunkScore, ResidualStream

from .test_finercut import fc_model, order_of, plan_for


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.randint(3, 300, (6, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def deadline():  # noqa: ANN201
    """Fail (instead of hanging the suite) if the search does not finish in time."""
    def expired(*_: object) -> None:
        raise TimeoutError("search did not terminate")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(900)  # wall clock: generous for busy CI machines; a real hang never ends
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def poison(monkeypatch: pytest.MonkeyPatch, bad: int, value: float) -> None:
    """Make the candidate with index `bad` score `value` (NaN / inf) in both the exact and the reference search."""
    pair_sums = ResidualStream.pair_sums

    def patched(self, pairs, limits=None, bound=False):  # noqa: ANN001, ANN202
        out = pair_sums(self, pairs, limits, bound)
        return [ChunkScore(value, s.seen, s.complete, s.per_token, s.hidden) if c.index == bad else s
                for (c, _), s in zip(pairs, out)]

    ref_sum = ReferenceSearch._sum

    def patched_ref(self, removed):  # noqa: ANN001, ANN202
        return value if any(c.index == bad for c in removed) else ref_sum(self, removed)

    monkeypatch.setattr(ResidualStream, "pair_sums", patched)
    monkeypatch.setattr(ReferenceSearch, "_sum", patched_ref)


@pytest.mark.parametrize(("value", "bad"), [(math.nan, 7), (math.inf, 2)])  # 7: the deepest, raced first at step 0
def test_non_finite_candidates_rank_last(value, bad, monkeypatch, deadline, caplog):  # noqa: ARG001
    model = fc_model(layers=4)
    calib = torch.randint(3, 300, (4, 12), generator=torch.Generator().manual_seed(3))
    clean = order_of(plan_for(model, calib, mode="reference"))
    poison(monkeypatch, bad, value)
    bad_site = (bad // 2, "attn" if bad % 2 == 0 else "mlp")
    with caplog.at_level(logging.WARNING):
        ref = order_of(plan_for(model, calib, mode="reference"))
        exact = order_of(plan_for(model, calib, mode="exact", candidate_batch=3))
        fast = order_of(plan_for(model, calib, mode="fast"))
    assert exact == ref and bad_site not in exact and bad_site not in fast
    assert len(ref) == len(clean) == 4  # floor(0.5 · 8)
    if clean[0] != bad_site:  # a poisoned candidate changes nothing before it would have been picked
        assert ref[0] == clean[0]
    assert any("non-finite" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("distance", ["js", "perplexity"])
def test_exact_equals_reference_in_bfloat16(distance, calib):
    """The vocabulary bound is certified for float32 logits: in bf16 the head runs in float32 for both searches."""
    model = fc_model(layers=5).to(torch.bfloat16)
    ref = plan_for(model, calib, distance=distance, mode="reference")
    for bound in (256, 8):
        exact = plan_for(model, calib, distance=distance, mode="exact", candidate_batch=3, bound_topk=bound)
        assert order_of(exact) == order_of(ref)
        for a, b in zip(exact.extras["removal_order"], ref.extras["removal_order"]):
            assert a["divergence"] == pytest.approx(b["divergence"], rel=2e-3, abs=1e-6)
