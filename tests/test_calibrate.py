"""Streaming statistics and the block-by-block walker."""
from __future__ import annotations

import math

import pytest
import torch

from llmprune.calibrate import BlockWalker, RunningMoments, calibrate
from llmprune.calibrate.stats import BlockSimilarity
from llmprune.families import family_for

from .conftest import make_model


def test_running_moments_equal_torch_on_concatenated_data():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 7, generator=g, dtype=torch.float32) * 3 + 1 for n in (5, 1, 17, 2)]
    acc = RunningMoments()
    for c in chunks:
        acc.update(c.to(torch.bfloat16).float())  # low-precision inputs: accumulation is still float64
    allx = torch.cat([c.to(torch.bfloat16).double() for c in chunks])
    assert acc.count == allx.shape[0]
    torch.testing.assert_close(acc.mean, allx.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.var(), allx.var(0, unbiased=True), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(acc.sumsq(), (allx**2).sum(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(acc.l2(), allx.norm(dim=0), rtol=1e-10, atol=1e-10)


def test_running_moments_merge_is_order_independent():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(9, 4, generator=g), torch.randn(3, 4, generator=g) + 5
    x, y = RunningMoments(), RunningMoments()
    x.update(a), x.update(b)
    y.update(b), y.update(a)
    torch.testing.assert_close(x.mean, y.mean)
    torch.testing.assert_close(x.m2, y.m2)


def test_empty_site_raises():
    with pytest.raises(ValueError, match="no data"):
        RunningMoments().var()


def test_walker_reproduces_full_forward(tiny_model, tokens):
    fam = family_for(tiny_model.config)
    ref = tiny_model(tokens).logits
    walker = BlockWalker(tiny_model, fam, tokens, batch_size=3)  # uneven micro-batches: 3 + 1
    for i in range(len(walker.layers)):
        walker.advance(walker.run(i))
    out = torch.cat(walker.logits())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_walker_stops_after_the_named_submodule(tiny_model, tokens):
    """run(stop_after=attention): every micro-batch runs the attention and none reaches the FFN; the hook is
    removed afterwards; asking for outputs of a stopped pass is refused."""
    fam = family_for(tiny_model.config)
    walker = BlockWalker(tiny_model, fam, tokens, batch_size=3)  # 2 micro-batches
    block = fam.block(tiny_model, 0)
    seen = {"attn": 0, "mlp": 0}
    h1 = block.attn.module.register_forward_hook(lambda *_: seen.__setitem__("attn", seen["attn"] + 1))
    h2 = block.mlp.module.register_forward_hook(lambda *_: seen.__setitem__("mlp", seen["mlp"] + 1))
    try:
        assert walker.run(0, keep=False, stop_after=block.attn.module) == []
        assert seen == {"attn": 2, "mlp": 0}
        walker.run(0, keep=False)  # the stop hook is gone
        assert seen == {"attn": 4, "mlp": 2}
        with pytest.raises(ValueError, match="keep=False"):
            walker.run(0, stop_after=block.attn.module)
    finally:
        h1.remove()
        h2.remove()


def test_walker_captures_per_layer_masks_for_sliding_layers(tokens):
    model = make_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    walker = BlockWalker(model, family_for(model.config), tokens, batch_size=4)
    for i in range(3):
        walker.advance(walker.run(i))
    torch.testing.assert_close(torch.cat(walker.logits()), model(tokens).logits, rtol=1e-5, atol=1e-5)


def test_calibrate_moments_equal_direct_hooks(tiny_model, tokens):
    """Statistics from the block walk equal those of the inputs captured in one plain forward."""
    fam = family_for(tiny_model.config)
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for i in range(len(fam.layers(tiny_model))):
        b = fam.block(tiny_model, i)
        for site, mod in ((f"L{i}.attn.o_in", b.attn.o), (f"L{i}.mlp.down_in", b.mlp.down)):
            handles.append(mod.register_forward_pre_hook(
                lambda _m, args, site=site: seen.setdefault(site, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    tiny_model(tokens)
    for h in handles:
        h.remove()
    stats = calibrate(tiny_model, tokens, sites=("attn.o_in", "mlp.down_in", "block"), batch_size=3, progress=False)
    assert stats.n_tokens == tokens.numel()
    for site, xs in seen.items():
        allx = torch.cat(xs).double()
        torch.testing.assert_close(stats[site].mean, allx.mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats[site].var(), allx.var(0), rtol=1e-5, atol=1e-6)
    sim = stats.block(1)
    assert sim.count == tokens.numel() and 0.0 < sim.angular_mean < 0.5


def test_block_similarity_values():
    acc = BlockSimilarity()
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # same, orthogonal, zero input (NaN cosine)
    acc.update(x, y)
    assert acc.count == 3
    assert math.isclose(acc.angular_sum, 0.0 + 0.5 + 0.5)
    assert math.isclose(acc.one_minus_cos_sum, 0.0 + 1.0 + 1.0)


def _spy_on_blocks(model, fam, events: list) -> None:
    """Record every block's .to() target and the device of its weights whenever it runs."""
    for i, layer in enumerate(fam.layers(model)):
        def to(*args, _i=i, _orig=layer.to, **kwargs):
            events.append(("to", _i, str(torch.device(args[0] if args else kwargs["device"]))))
            return _orig(*args, **kwargs)

        layer.to = to
        layer.register_forward_pre_hook(lambda m, a, _i=i: events.append(("run", _i, str(next(m.parameters()).device))))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_offload_visits_the_device_one_block_at_a_time(tokens, device):
    """With offload each block goes to the compute device just before it runs and home right after; the
    statistics equal those of the resident walk."""
    model = make_model("llama")
    fam = family_for(model.config)
    events: list = []
    _spy_on_blocks(model, fam, events)
    a = calibrate(model, tokens, sites=("mlp.down_in",), family=fam, device=device, batch_size=2, progress=False)
    assert {e[0] for e in events} == {"run"}  # resident walk: no block moves
    events.clear()
    b = calibrate(model, tokens, sites=("mlp.down_in",), family=fam, device=device, batch_size=2, offload=True,
                  progress=False)
    n_batches = -(-tokens.shape[0] // 2)
    dev = str(torch.device(device))
    expected = []
    for i in range(len(fam.layers(model))):
        expected += [("to", i, dev)] + [("run", i, dev)] * n_batches + [("to", i, "cpu")]
    assert events == expected
    assert all(p.device.type == "cpu" for p in model.parameters())  # every block is back home
    for site in ("L0.mlp.down_in", "L2.mlp.down_in"):
        torch.testing.assert_close(a[site].mean, b[site].mean)
