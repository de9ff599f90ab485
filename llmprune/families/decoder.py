"""What HF decoder-only families share: `model.model.layers`, self_attn / mlp sublayers, RMSNorms.

`DecoderFamily` turns a model into views and geometries and builds the config of a pruned result
(the stock config when uniform, the family's `llmprune_*` config otherwise). A concrete family
(llama.py, gemma.py, phi3.py, olmo2.py) says where its norms sit, how its projections are laid
out, which biases its stock class creates, and which attention type each layer has.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from .base import AttnView, BlockView, Geometry, MlpView, Projection

# Keys of a base config that describe shapes or identity, which the pruned config sets itself.
_SHAPE_KEYS = {
    "model_type", "architectures", "auto_map", "transformers_version", "per_layer_config",
    "quantization_config", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "head_dim", "layer_types", "base_layer_types", "base_model_type",
    "o_proj_bias", "down_proj_bias", "_name_or_path", "dtype", "torch_dtype",
    "use_sliding_window", "max_window_layers", "sliding_window",
}


class DecoderFamily:
    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # stock model types handled, then the pruned ones
    # base model_type -> the llmprune config class its non-uniform results use
    pruned_configs: ClassVar[dict[str, type[PretrainedConfig]]]
    # residual-branch norm module names: before / after attention, before / after the FFN (None: absent)
    attn_norm: ClassVar[str | None] = "input_layernorm"
    attn_post_norm: ClassVar[str | None] = None
    mlp_norm: ClassVar[str | None] = "post_attention_layernorm"
    mlp_post_norm: ClassVar[str | None] = None
    qk_norm_per_head: ClassVar[bool] = True  # q_norm / k_norm (when present) act on each head separately

    def matches(self, config: Any) -> bool:
        return getattr(config, "model_type", None) in self.model_types

    def is_pruned(self, config: Any) -> bool:
        return any(config.model_type == c.model_type for c in self.pruned_configs.values())

    # ---- module access ---------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _decoder(model).layers

    def block(self, model: nn.Module, index: int) -> BlockView:
        return self.block_of(self.layers(model)[index], index)

    def block_of(self, layer: nn.Module, index: int) -> BlockView:
        attn = mlp = None
        sa = getattr(layer, "self_attn", None)
        if sa is not None:
            q, k, v = self.qkv(sa)
            attn = AttnView(module=sa, norm=_opt(layer, self.attn_norm), q=q, k=k, v=v, o=sa.o_proj,
                            head_dim=sa.head_dim, post_norm=_opt(layer, self.attn_post_norm),
                            q_norm=getattr(sa, "q_norm", None), k_norm=getattr(sa, "k_norm", None),
                            qk_norm_per_head=self.qk_norm_per_head)
        ff = getattr(layer, "mlp", None)
        if ff is not None:
            mlp = MlpView(module=ff, norm=_opt(layer, self.mlp_norm), inputs=self.mlp_inputs(ff), down=ff.down_proj,
                          post_norm=_opt(layer, self.mlp_post_norm))
        return BlockView(index=index, module=layer, attn=attn, mlp=mlp)

    def qkv(self, attn: nn.Module) -> tuple[Projection, Projection, Projection]:
        """The query, key and value projections (row-sliced by pruning)."""
        return attn.q_proj, attn.k_proj, attn.v_proj

    def mlp_inputs(self, mlp: nn.Module) -> list[Projection]:
        """The FFN input projections (row-sliced by pruning), gate first."""
        return [mlp.gate_proj, mlp.up_proj]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return _decoder(model).norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def embed(self, model: nn.Module) -> nn.Module:
        return _decoder(model).embed_tokens

    def logit_softcap(self, config: Any) -> float | None:
        """c in logits = c·tanh(z/c) after the LM head (Gemma 2), None when the head's output is the logits."""
        return getattr(config, "final_logit_softcapping", None)

    # ---- running half a block (what-if evaluation without editing weights) ---------------------------
    def attn_residual(self, block: BlockView, hidden: torch.Tensor, layer_kwargs: dict[str, Any]) -> torch.Tensor:
        """hidden + post_norm(attention(norm(hidden))): the first half of a decoder layer.

        hidden: [b, T, d]; layer_kwargs: what the model passed this layer (masks, position_embeddings, ...).
        """
        a = block.attn
        out = a.module(hidden_states=a.norm(hidden) if a.norm is not None else hidden, **layer_kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return hidden + (a.post_norm(out) if a.post_norm is not None else out)

    def mlp_residual(self, block: BlockView, hidden: torch.Tensor) -> torch.Tensor:
        """hidden + post_norm(mlp(norm(hidden))): the second half of a decoder layer. [b, T, d]."""
        m = block.mlp
        out = m.module(m.norm(hidden) if m.norm is not None else hidden)
        return hidden + (m.post_norm(out) if m.post_norm is not None else out)

    # ---- shapes -------------------------------------------------------------------------------------
    def head_dim(self, config: Any) -> int:
        hd = getattr(config, "head_dim", None)
        return int(hd) if hd else config.hidden_size // config.num_attention_heads

    def geometry(self, model: nn.Module) -> list[Geometry]:
        cfg = model.config
        hd = self.head_dim(cfg)
        out = []
        for i in range(len(self.layers(model))):
            b = self.block(model, i)
            g = dict(hidden=cfg.hidden_size, head_dim=hd, n_q_heads=0, n_kv_heads=0, intermediate=0,
                     has_attn=b.attn is not None, has_mlp=b.mlp is not None)
            if b.attn is not None:
                g.update(n_q_heads=b.attn.q.out_features // hd, n_kv_heads=b.attn.k.out_features // hd,
                         qkv_bias=b.attn.q.bias is not None, o_bias=b.attn.o.bias is not None)
            else:  # a bias-only attention (the pruned model's attn_residual) counts as o_bias
                g.update(o_bias=getattr(b.module, "attn_residual", None) is not None)
            if b.mlp is not None:
                g.update(intermediate=b.mlp.down.in_features, mlp_in_bias=b.mlp.inputs[0].bias is not None,
                         down_bias=b.mlp.down.bias is not None, gated_mlp=len(b.mlp.inputs) == 2)
            else:
                g.update(down_bias=getattr(b.module, "mlp_residual", None) is not None)
            out.append(Geometry(**g))
        return out

    def base_model_type(self, config: Any) -> str:
        return config.base_model_type if self.is_pruned(config) else config.model_type

    def base_layer_types(self, config: Any) -> list[str]:
        """full/sliding attention per layer of the given model, ignoring removed sublayers."""
        n = config.num_hidden_layers
        if self.is_pruned(config):
            return list(config.base_layer_types or ["full_attention"] * n)
        return self.stock_layer_types(config)

    def stock_layer_types(self, config: Any) -> list[str]:
        types = getattr(config, "layer_types", None)
        return list(types) if types else ["full_attention"] * config.num_hidden_layers

    def native_biases(self, config: Any) -> tuple[bool, bool, bool, bool]:
        """(qkv, o, mlp_in, down) biases the stock class of this base creates."""
        att = bool(getattr(config, "attention_bias", False))
        return att, att, False, False

    # ---- configs for pruned models ------------------------------------------------------------------
    def target_config(self, model: nn.Module, geometries: list[Geometry], keep_layers: list[int]) -> PretrainedConfig:
        """The config describing `geometries` (one per kept original layer, in order).

        Uniform results get the stock config of the base architecture, loadable anywhere;
        anything else gets the family's `llmprune_*` config with transformers' native `per_layer_config`.
        """
        base = model.config
        base_types = self.base_layer_types(base)
        kept_types = [base_types[i] for i in keep_layers]
        stock = self._stock_config(base, geometries, kept_types)
        if stock is not None:
            return stock
        return self._pruned_config(base, geometries, kept_types)

    def _stock_config(self, base: Any, geos: list[Geometry], kept_types: list[str]) -> PretrainedConfig | None:
        if self.is_pruned(base) or not geos:
            return None
        first = geos[0]
        native = self.native_biases(base)
        for g in geos:
            if not (g.has_attn and g.has_mlp):
                return None
            if (g.n_q_heads, g.n_kv_heads, g.intermediate) != (first.n_q_heads, first.n_kv_heads, first.intermediate):
                return None
            if (g.qkv_bias, g.o_bias, g.mlp_in_bias, g.down_bias) != native:
                return None
        d = base.to_dict()
        for k in ("per_layer_config", "quantization_config", "auto_map", "transformers_version", "_name_or_path"):
            d.pop(k, None)
        d.update(num_hidden_layers=len(geos), num_attention_heads=first.n_q_heads,
                 num_key_value_heads=first.n_kv_heads, intermediate_size=first.intermediate,
                 head_dim=first.head_dim)
        if "layer_types" in d and d["layer_types"] is not None:
            d["layer_types"] = kept_types
        try:
            return AutoConfig.for_model(**d)
        except (ValueError, TypeError):
            # e.g. LlamaConfig / Gemma2Config insist hidden_size % num_attention_heads == 0: use ours instead.
            return None

    def _pruned_config(self, base: Any, geos: list[Geometry], kept_types: list[str]) -> PretrainedConfig:
        base_type = self.base_model_type(base)
        config_cls = self.pruned_configs[base_type]
        d = {k: v for k, v in base.to_dict().items() if k not in _SHAPE_KEYS}
        attn_geos = [g for g in geos if g.has_attn] or [None]
        mlp_geos = [g for g in geos if g.has_mlp] or [None]

        def most_common(values: list[Any], fallback: Any) -> Any:
            values = [v for v in values if v is not None]
            return Counter(values).most_common(1)[0][0] if values else fallback

        _, native_o, _, native_down = self.native_biases(base)

        def added_o(g: Geometry) -> bool:  # o_proj bias the base class would not create by itself
            return g.o_bias and not native_o

        def added_down(g: Geometry) -> bool:
            return g.down_bias and not native_down

        base_q = _global(base, "num_attention_heads")
        glob = {
            "num_attention_heads": most_common([g and g.n_q_heads for g in attn_geos], base_q),
            "num_key_value_heads": most_common([g and g.n_kv_heads for g in attn_geos],
                                               _global(base, "num_key_value_heads") or base_q),
            "intermediate_size": most_common([g and g.intermediate for g in mlp_geos],
                                             _global(base, "intermediate_size")),
            "o_proj_bias": most_common([g and added_o(g) for g in attn_geos], False),
            "down_proj_bias": most_common([g and added_down(g) for g in mlp_geos], False),
        }
        per_layer: dict[int, dict[str, Any]] = {}
        for i, g in enumerate(geos):
            over: dict[str, Any] = {}
            skip = ([] if g.has_attn else ["attention"]) + ([] if g.has_mlp else ["mlp"])
            if skip:
                over["skip"] = skip
            values: list[tuple[str, Any]] = []
            if g.has_attn:
                values += [("num_attention_heads", g.n_q_heads), ("num_key_value_heads", g.n_kv_heads),
                           ("o_proj_bias", added_o(g))]
            else:  # on a skipped sublayer the flag means bias-only (always resolved explicitly)
                values += [("o_proj_bias", g.o_bias)]
            if g.has_mlp:
                values += [("intermediate_size", g.intermediate), ("down_proj_bias", added_down(g))]
            else:
                values += [("down_proj_bias", g.down_bias)]
            over.update({k: v for k, v in values if v != glob[k]})
            if over:
                per_layer[i] = over
        sliding = getattr(base, "sliding_window", None) if "sliding_attention" in kept_types else None
        cfg = config_cls(
            **d,
            **glob,
            base_model_type=base_type,
            base_layer_types=kept_types,
            sliding_window=sliding,
            num_hidden_layers=len(geos),
            head_dim=geos[0].head_dim,
            per_layer_config=per_layer,
        )
        cfg.architectures = [config_cls.__name__.removesuffix("Config") + "ForCausalLM"]
        return cfg


def _opt(module: nn.Module, name: str | None) -> nn.Module | None:
    return getattr(module, name, None) if name is not None else None


def _global(config: Any, key: str) -> Any:
    """A config attribute's global value, even when a heterogeneous config varies it per layer."""
    if getattr(config, "is_heterogeneous", False):
        return config._getattr_without_heterogeneous_validation(key, None)
    return getattr(config, key, None)


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (`model.model` for *ForCausalLM, the model itself for bare *Model)."""
    return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model
