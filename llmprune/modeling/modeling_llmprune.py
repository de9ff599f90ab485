"""A Llama-architecture decoder whose layers may differ in shape: per-layer query / KV heads and FFN
width, attention or FFN sublayers removed, optional biases on o_proj / down_proj.

Copied next to the weights of every non-uniform llmprune checkpoint, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works without llmprune.
It builds every layer from the base family's own transformers modules (LlamaAttention,
Qwen3Attention, ...) using that layer's resolved config; nothing here is a copied modeling file.
"""
from __future__ import annotations

import importlib
import inspect

import torch
import transformers
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama import modeling_llama

from .configuration_llmprune import NO_ATTENTION, LlmpruneLlamaConfig

_MIN_TRANSFORMERS = (5, 14)
if tuple(int(p) for p in transformers.__version__.split(".")[:2]) < _MIN_TRANSFORMERS:
    raise ImportError(
        f"this pruned checkpoint needs transformers>={'.'.join(map(str, _MIN_TRANSFORMERS))} "
        f"(per_layer_config support); found {transformers.__version__}. Run: pip install -U transformers"
    )

# The KV cache keyword: `cache` since transformers 5.2x, `past_key_values` before (now deprecated, with a
# FutureWarning). Read from the installed version's own signatures, so this file runs on both.
_CACHE_KW = "cache" if "cache" in inspect.signature(modeling_llama.LlamaAttention.forward).parameters \
    else "past_key_values"
_MASK_CACHE_KW = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
_OUTPUT_CACHE_KW = "cache" if "cache" in getattr(BaseModelOutputWithPast, "__dataclass_fields__", {}) \
    else "past_key_values"

# base_model_type -> (module, class-name prefix) providing Attention, MLP, RMSNorm, RotaryEmbedding
_FAMILY_MODULES = {
    "llama": ("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3"),
}


def _family_class(config: LlmpruneLlamaConfig, part: str) -> type[nn.Module]:
    module_name, prefix = _FAMILY_MODULES[config.base_model_type]
    return getattr(importlib.import_module(module_name), prefix + part)


# A removed sublayer whose mean output is kept (FLAP compensation) is a constant vector added to the
# residual: a module with one `bias` [hidden] parameter, saved as `model.layers.<i>.<name>.bias`.
ATTN_RESIDUAL = "attn_residual"
MLP_RESIDUAL = "mlp_residual"


class ResidualBias(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden))


def _with_bias(linear: nn.Linear) -> nn.Linear:
    # A fresh Linear of the same shape with a (zero) bias; the checkpoint supplies the values.
    out = nn.Linear(linear.in_features, linear.out_features, bias=True, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    nn.init.zeros_(out.bias)
    return out


class LlmpruneDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder layer whose attention and/or FFN sublayer may be absent."""

    def __init__(self, config: LlmpruneLlamaConfig, layer_idx: int):
        super().__init__()
        lc = config.per_layer_config[layer_idx] if config.is_heterogeneous else config
        skip = set(getattr(lc, "skip", None) or [])
        self.has_attn = "attention" not in skip
        self.has_mlp = "mlp" not in skip
        rms_norm = _family_class(config, "RMSNorm")
        if self.has_attn:
            self.input_layernorm = rms_norm(config.hidden_size, eps=config.rms_norm_eps)
            # Original layer_idx: the KV cache and per-layer config are indexed by it.
            self.self_attn = _family_class(config, "Attention")(config=lc, layer_idx=layer_idx)
            # The per-layer config is a copy; forward reads _attn_implementation from the live config.
            self.self_attn.config = config
            if getattr(lc, "o_proj_bias", False) and self.self_attn.o_proj.bias is None:
                self.self_attn.o_proj = _with_bias(self.self_attn.o_proj)
        # skipped attention with o_proj_bias: a bias-only sublayer (attribute name = ATTN_RESIDUAL)
        self.attn_residual = ResidualBias(config.hidden_size) \
            if not self.has_attn and getattr(lc, "o_proj_bias", False) else None
        if self.has_mlp:
            self.post_attention_layernorm = rms_norm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = _family_class(config, "MLP")(lc)
            if getattr(lc, "down_proj_bias", False) and self.mlp.down_proj.bias is None:
                self.mlp.down_proj = _with_bias(self.mlp.down_proj)
        self.mlp_residual = ResidualBias(config.hidden_size) \
            if not self.has_mlp and getattr(lc, "down_proj_bias", False) else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # kwargs: position_ids, use_cache and the cache under the installed version's keyword (_CACHE_KW).
        if self.has_attn:
            attn_out, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            hidden_states = hidden_states + attn_out
        elif self.attn_residual is not None:
            hidden_states = hidden_states + self.attn_residual.bias
        if self.has_mlp:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        elif self.mlp_residual is not None:
            hidden_states = hidden_states + self.mlp_residual.bias
        return hidden_states


class LlmprunePreTrainedModel(modeling_llama.LlamaPreTrainedModel):
    config_class = LlmpruneLlamaConfig
    config: LlmpruneLlamaConfig
    _no_split_modules = ["LlmpruneDecoderLayer"]
    _can_record_outputs = {"hidden_states": LlmpruneDecoderLayer}


class LlmpruneLlamaModel(LlmprunePreTrainedModel):
    def __init__(self, config: LlmpruneLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(LlmpruneDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = _family_class(config, "RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = _family_class(config, "RotaryEmbedding")(config=config)
        self.gradient_checkpointing = False
        self._layer_types = list(config.layer_types)  # derived from per_layer_config: computed once, not per step
        # No attention anywhere: no KV cache, positions and masks are unused.
        self._has_attention = any(t != NO_ATTENTION for t in self._layer_types)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        # Callers name the cache `cache` (transformers >= 5.2x) or `past_key_values` (older): accept both.
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if not self._has_attention:
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past

        masks = attention_mask  # generate() may hand over a ready {layer_type: mask} mapping
        if not self._has_attention:
            masks = {}
        elif not isinstance(masks, dict):
            mask_kwargs = {"config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                           _MASK_CACHE_KW: cache, "position_ids": position_ids}
            masks = {"full_attention": create_causal_mask(**mask_kwargs)}
            if "sliding_attention" in self._layer_types:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        # One kwargs dict for every layer (built once, not per layer): the cache under the installed
        # version's keyword.
        layer_kwargs = {"position_ids": position_ids, "use_cache": use_cache, _CACHE_KW: cache, **kwargs}
        per_type = [masks.get(t) for t in self._layer_types]  # None for attention-free ("mlp") layers
        all_hidden = [hidden_states] if output_hidden_states else None
        for layer, mask in zip(self.layers, per_type):
            hidden_states = layer(hidden_states, mask, position_embeddings, **layer_kwargs)
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden[-1] = hidden_states
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{_OUTPUT_CACHE_KW: cache if use_cache else None},
        )


class LlmpruneLlamaForCausalLM(LlmprunePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlmpruneLlamaConfig):
        super().__init__(config)
        self.model = LlmpruneLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # forward is LlamaForCausalLM's: it only touches self.model, self.lm_head and the loss.
    forward = modeling_llama.LlamaForCausalLM.forward


__all__ = ["LlmpruneLlamaForCausalLM", "LlmpruneLlamaModel", "LlmprunePreTrainedModel"]
