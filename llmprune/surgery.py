"""The only code that edits weights: apply a Plan, or simulate it without editing anything.

`apply` slices the base tensors (q/k/v/gate/up rows, o/down columns), adds FLAP-style bias
compensation, drops removed sublayers' tensors, renumbers fully removed blocks away, and loads the
result into the target architecture (the stock class when the result is uniform, `llmprune_llama`
otherwise). Unchanged tensors are shared with the input model, not copied.
"""
from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from .families import Family, family_for
from .families.base import BlockView, Geometry
from .modeling.modeling_llmprune import ATTN_RESIDUAL, MLP_RESIDUAL
from .plan import AttnPlan, MlpPlan, Plan, attn_kept_channels, removed_indices


# ---- apply -----------------------------------------------------------------------------------------
@torch.no_grad()
def apply(model: nn.Module, plan: Plan, family: Family | None = None) -> nn.Module:
    """Return the pruned model described by `plan`. The input model is left unchanged."""
    family = family or family_for(model.config)
    plan.validate(family.geometry(model))
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    state = dict(model.state_dict(keep_vars=False))
    after = plan.geometry_after()
    for i, (g, lp) in enumerate(zip(plan.geometry, plan.layers)):
        block = family.block(model, i)
        if block.attn is not None:
            if lp.attn.drop:
                _forget(state, names, [block.attn.module, block.attn.norm])
                if lp.attn.compensate is not None:  # bias-only: the sublayer's mean output b + W·μ
                    state[_layer_prefix(names, block) + ATTN_RESIDUAL + ".bias"] = _compensation(
                        block.attn.o, list(range(g.n_q_heads * g.head_dim)), lp.attn.compensate)
            elif not lp.attn.is_identity() or lp.attn.compensate is not None:
                _slice_attention(state, names, block, g, lp.attn)
        if block.mlp is not None:
            if lp.mlp.drop:
                _forget(state, names, [block.mlp.module, block.mlp.norm])
                if lp.mlp.compensate is not None:
                    state[_layer_prefix(names, block) + MLP_RESIDUAL + ".bias"] = _compensation(
                        block.mlp.down, list(range(g.intermediate)), lp.mlp.compensate)
            elif not lp.mlp.is_identity() or lp.mlp.compensate is not None:
                _slice_mlp(state, names, block, g, lp.mlp)
    kept = plan.kept_layers()
    state = _renumber(state, model, family, kept)
    config = family.target_config(model, [after[i] for i in kept], kept)
    return _materialize(model, config, state)


def _name(names: dict[int, str], p: torch.Tensor) -> str:
    return names[id(p)]


def _layer_prefix(names: dict[int, str], block: BlockView) -> str:
    """State-dict prefix of a decoder layer ("model.layers.3."), from any of its parameters."""
    view = block.attn or block.mlp
    sub = view.module
    name = names[id(next(sub.parameters()))]
    inner = next(n for n, p in sub.named_parameters() if p is next(sub.parameters()))
    sub_name = name[: -len(inner) - 1]  # "model.layers.3.self_attn"
    return sub_name.rsplit(".", 1)[0] + "."


def _forget(state: dict[str, torch.Tensor], names: dict[int, str], modules: list[nn.Module]) -> None:
    for m in modules:
        for p in m.parameters():
            state.pop(_name(names, p), None)


def _bias_name(names: dict[int, str], linear: nn.Linear) -> str:
    return re.sub(r"weight$", "bias", _name(names, linear.weight))


def _compensation(linear: nn.Linear, removed: list[int], means: list[float]) -> torch.Tensor:
    """Bias that stands in for removed input channels at their calibration mean: b + W[:, P]·μ_P."""
    w = linear.weight
    mu = torch.tensor(means, dtype=torch.float64, device=w.device)
    bias = w[:, removed].double() @ mu  # [out]
    if linear.bias is not None:
        bias = bias + linear.bias.double()
    return bias.to(w.dtype)


def _slice_attention(state: dict, names: dict, block: BlockView, g: Geometry, a: AttnPlan) -> None:
    att = block.attn
    ch = attn_kept_channels(g, a)  # q rows / o columns, grouped by kept KV group
    groups = range(g.n_kv_heads) if a.keep_kv_groups is None else a.keep_kv_groups
    kv_rows = [r for k in groups for r in range(k * g.head_dim, (k + 1) * g.head_dim)]
    idx_q = torch.tensor(ch, device=att.q.weight.device)
    idx_kv = torch.tensor(kv_rows, device=att.k.weight.device)
    for lin, idx in ((att.q, idx_q), (att.k, idx_kv), (att.v, idx_kv)):
        state[_name(names, lin.weight)] = lin.weight.index_select(0, idx).contiguous()
        if lin.bias is not None:
            state[_name(names, lin.bias)] = lin.bias.index_select(0, idx).contiguous()
    state[_name(names, att.o.weight)] = att.o.weight.index_select(1, idx_q).contiguous()
    if a.compensate is not None:
        removed = removed_indices(ch, g.n_q_heads * g.head_dim)
        state[_bias_name(names, att.o)] = _compensation(att.o, removed, a.compensate)


def _slice_mlp(state: dict, names: dict, block: BlockView, g: Geometry, m: MlpPlan) -> None:
    mlp = block.mlp
    keep = list(range(g.intermediate)) if m.keep_channels is None else m.keep_channels
    idx = torch.tensor(keep, device=mlp.down.weight.device)
    for lin in mlp.inputs:
        state[_name(names, lin.weight)] = lin.weight.index_select(0, idx).contiguous()
        if lin.bias is not None:
            state[_name(names, lin.bias)] = lin.bias.index_select(0, idx).contiguous()
    state[_name(names, mlp.down.weight)] = mlp.down.weight.index_select(1, idx).contiguous()
    if m.compensate is not None:
        removed = removed_indices(keep, g.intermediate)
        state[_bias_name(names, mlp.down)] = _compensation(mlp.down, removed, m.compensate)


def _renumber(state: dict[str, torch.Tensor], model: nn.Module, family: Family, kept: list[int]) -> dict:
    """Rename `<layers>.<old>.` to `<layers>.<new>.` so removed blocks leave no gap."""
    layers = family.layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    new_index = {old: new for new, old in enumerate(kept)}
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        m = pat.match(key)
        if m is None:
            out[key] = t
        elif int(m.group(1)) in new_index:
            out[f"{prefix}.{new_index[int(m.group(1))]}.{m.group(2)}"] = t
    return out


def _materialize(model: nn.Module, config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """Build `config`'s architecture without allocating weights, then adopt the tensors in `state`."""
    config._attn_implementation = model.config._attn_implementation
    dtype = next(model.parameters()).dtype
    with init_empty_weights():  # parameters on meta; buffers (rotary inv_freq) stay real
        new = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=config._attn_implementation)
    expected = set(new.state_dict().keys())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise RuntimeError(f"surgery produced a state dict that does not fit {type(new).__name__}: "
                           f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    new.load_state_dict(state, strict=True, assign=True)
    new.tie_weights()
    device = next(model.parameters()).device
    for mod in new.modules():  # buffers were created on CPU by init_empty_weights
        for bname, buf in list(mod._buffers.items()):
            if buf is not None and buf.device != device:
                mod._buffers[bname] = buf.to(device)
    new.generation_config = copy.deepcopy(model.generation_config)
    new.name_or_path = getattr(model, "name_or_path", "")
    new.eval()
    return new


# ---- simulate --------------------------------------------------------------------------------------
@contextlib.contextmanager
def simulate(model: nn.Module, plan: Plan, family: Family | None = None) -> Iterator[nn.Module]:
    """Make the model behave as if `plan` were applied, without editing weights.

    Dropped sublayers return zeros (and are not computed), or their mean output when the plan
    compensates (a bias-only sublayer); removed input channels of o_proj /
    down_proj are zeroed, or set to their calibration mean when the plan compensates — which is
    exactly what the compensation bias stands for. Meant for full-sequence scoring: a dropped
    attention sublayer writes nothing into a KV cache.
    """
    family = family or family_for(model.config)
    plan.validate(family.geometry(model))
    undo: list[Any] = []
    try:
        for i, (g, lp) in enumerate(zip(plan.geometry, plan.layers)):
            block = family.block(model, i)
            if block.attn is not None:
                if lp.attn.drop:
                    const = None if lp.attn.compensate is None else _compensation(
                        block.attn.o, list(range(g.n_q_heads * g.head_dim)), lp.attn.compensate)
                    undo.append(_silence(block.attn.module, returns_tuple=True, const=const))
                elif not lp.attn.is_identity():
                    removed = removed_indices(attn_kept_channels(g, lp.attn), g.n_q_heads * g.head_dim)
                    undo.append(_mask_inputs(block.attn.o, removed, lp.attn.compensate))
            if block.mlp is not None:
                if lp.mlp.drop:
                    const = None if lp.mlp.compensate is None else _compensation(
                        block.mlp.down, list(range(g.intermediate)), lp.mlp.compensate)
                    undo.append(_silence(block.mlp.module, returns_tuple=False, const=const))
                elif not lp.mlp.is_identity():
                    removed = removed_indices(lp.mlp.keep_channels, g.intermediate)
                    undo.append(_mask_inputs(block.mlp.down, removed, lp.mlp.compensate))
        yield model
    finally:
        for fn in reversed(undo):
            fn()


def _silence(module: nn.Module, returns_tuple: bool, const: torch.Tensor | None = None) -> Any:
    """Make a sublayer output zeros, or the constant `const` [hidden] (a bias-only sublayer)."""
    def forward(*args: Any, **kwargs: Any) -> Any:
        h = kwargs.get("hidden_states", args[0] if args else None)
        z = torch.zeros_like(h) if const is None else const.to(h.dtype).expand_as(h)
        return (z, None) if returns_tuple else z

    module.forward = forward

    def restore() -> None:
        del module.forward

    return restore


def _mask_inputs(linear: nn.Linear, removed: list[int], means: list[float] | None) -> Any:
    idx = torch.tensor(removed, dtype=torch.long, device=linear.weight.device)
    fill = None if means is None else torch.tensor(means, dtype=torch.float64, device=linear.weight.device)

    def pre_hook(_mod: nn.Module, args: tuple) -> tuple:
        x = args[0].clone()  # [..., in]
        x[..., idx] = 0 if fill is None else fill.to(x.dtype)
        return (x, *args[1:])

    return linear.register_forward_pre_hook(pre_hook).remove
