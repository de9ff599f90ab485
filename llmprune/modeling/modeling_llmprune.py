"""Decoders whose layers may differ in shape: per-layer query / KV heads and FFN width, attention or
FFN sublayers removed, optional biases on o_proj / down_proj. One model class per base family
(Llama-like, Gemma 2, Gemma 3 text, Phi-3, OLMo 2), all sharing one decoder layer and one stack.

Copied next to the weights of every non-uniform llmprune checkpoint, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works without llmprune.
It builds every layer from the base family's own transformers modules (LlamaAttention,
Gemma2Attention, Phi3MLP, ...) using that layer's resolved config; nothing here is a copied
modeling file. What differs between families is data: where the residual-branch norms sit, the
embedding class, and whether rotary embeddings differ per attention type.
"""
from __future__ import annotations

import copy
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
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.llama import modeling_llama
from transformers.models.olmo2 import modeling_olmo2
from transformers.models.phi3 import modeling_phi3

from .configuration_llmprune import (
    LlmpruneGemma2Config,
    LlmpruneGemma3TextConfig,
    LlmpruneLlamaConfig,
    LlmpruneOlmo2Config,
    LlmprunePhi3Config,
    NO_ATTENTION,
    link_layer_config,
)

_MIN_TRANSFORMERS = (5, 14)
if tuple(int(p) for p in transformers.__version__.split(".")[:2]) < _MIN_TRANSFORMERS:
    raise ImportError(
        f"this pruned checkpoint needs transformers>={'.'.join(map(str, _MIN_TRANSFORMERS))} "
        f"(per_layer_config support); found {transformers.__version__}. Run: pip install -U transformers"
    )

# transformers renamed the KV-cache argument `past_key_values` -> `cache` (the old name is deprecated);
# speak whichever this version's modules take.
_CACHE_KW = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def _first_real_layer_lengths() -> None:
    """transformers 5.25 keeps a `DummyLayer` (no `get_seq_length`) in the KV cache for attention-free layers,
    yet `Cache.get_seq_length()` and `generate()` ask layer 0 by default: a checkpoint whose layer 0 lost its
    attention then fails to generate. Where that is so, ask the first layer that holds keys instead (the same
    answer every attention layer gives); nothing changes for caches whose layer 0 attends."""
    try:
        from transformers.cache_utils import DummyLayer
    except ImportError:  # older transformers: placeholders are real cache layers
        return
    if hasattr(DummyLayer, "get_seq_length") or getattr(Cache.get_seq_length, "_llmprune", False):
        return
    original = Cache.get_seq_length

    def get_seq_length(self: Cache, layer_idx: int = 0) -> int:
        layers = getattr(self, "layers", None)
        if layers is not None and layer_idx < len(layers) and isinstance(layers[layer_idx], DummyLayer):
            real = [i for i, layer in enumerate(layers) if not isinstance(layer, DummyLayer)]
            if not real:
                return 0
            layer_idx = real[0]
        return original(self, layer_idx)

    get_seq_length._llmprune = True  # type: ignore[attr-defined]
    Cache.get_seq_length = get_seq_length  # type: ignore[method-assign]


_first_real_layer_lengths()

# base_model_type -> (module, class-name prefix) providing Attention, MLP, RMSNorm, RotaryEmbedding
_FAMILY_MODULES = {
    "llama": ("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3"),
    "gemma2": ("transformers.models.gemma2.modeling_gemma2", "Gemma2"),
    "gemma3_text": ("transformers.models.gemma3.modeling_gemma3", "Gemma3"),
    "phi3": ("transformers.models.phi3.modeling_phi3", "Phi3"),
    "olmo2": ("transformers.models.olmo2.modeling_olmo2", "Olmo2"),
}

# Residual-branch norms of a decoder layer, by slot: (before attention, after attention, before FFN,
# after FFN). Names are the base model's, so tensor names stay unchanged; a removed sublayer takes its
# slots' norms with it.
_PRE_NORM = ("input_layernorm", None, "post_attention_layernorm", None)  # Llama, Mistral, Qwen, Phi-3
_SANDWICH = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
_POST_NORM = (None, "post_attention_layernorm", None, "post_feedforward_layernorm")  # OLMo 2
_NORMS = {"gemma2": _SANDWICH, "gemma3_text": _SANDWICH, "olmo2": _POST_NORM}
_SCALED_EMBEDDING = {"gemma2": "TextScaledWordEmbedding", "gemma3_text": "TextScaledWordEmbedding"}  # x·√hidden
_ROPE_PER_LAYER_TYPE = ("gemma3_text",)  # separate rotary tables for sliding and full attention


def _family_class(config: LlmpruneLlamaConfig, part: str) -> type[nn.Module]:
    module_name, prefix = _FAMILY_MODULES[config.base_model_type]
    return getattr(importlib.import_module(module_name), prefix + part)


def _homogeneous(config: LlmpruneLlamaConfig) -> LlmpruneLlamaConfig:
    # The global config without per-layer overrides, for modules that only read global fields
    # (rotary embeddings read layer_types, which then lists every layer's attention type).
    out = copy.copy(config)
    out.__dict__.pop("_heterogeneity_spec", None)
    return out


# A removed sublayer whose mean output is kept (FLAP compensation of a fully pruned module) is a
# residual: a module with one `bias` [hidden] parameter, saved as `model.layers.<i>.<name>.bias`; it
# holds the sublayer's whole constant contribution (after its post-norm, for families that have one).
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
    """Decoder layer (pre-norm, sandwich-norm or post-norm) whose attention and/or FFN sublayer may be absent."""

    def __init__(self, config: LlmpruneLlamaConfig, layer_idx: int):
        super().__init__()
        # The per-layer config is a copy; linked, it reads _attn_implementation from the live config.
        lc = link_layer_config(config.per_layer_config[layer_idx], config) if config.is_heterogeneous else config
        skip = set(getattr(lc, "skip", None) or [])
        self.has_attn = "attention" not in skip
        self.has_mlp = "mlp" not in skip
        self.norm_names = _NORMS.get(config.base_model_type, _PRE_NORM)
        rms_norm = _family_class(config, "RMSNorm")
        present = (self.has_attn, self.has_attn, self.has_mlp, self.has_mlp)
        for name, keep in zip(self.norm_names, present):
            if name is not None and keep:
                setattr(self, name, rms_norm(config.hidden_size, eps=config.rms_norm_eps))
        # a skipped sublayer with its bias flag set is bias-only (attribute names = ATTN_/MLP_RESIDUAL)
        self.attn_residual = ResidualBias(config.hidden_size) \
            if not self.has_attn and getattr(lc, "o_proj_bias", False) else None
        self.mlp_residual = ResidualBias(config.hidden_size) \
            if not self.has_mlp and getattr(lc, "down_proj_bias", False) else None
        if self.has_attn:
            # Original layer_idx: the KV cache and per-layer config are indexed by it.
            self.self_attn = _family_class(config, "Attention")(config=lc, layer_idx=layer_idx)
            if getattr(lc, "o_proj_bias", False) and self.self_attn.o_proj.bias is None:
                self.self_attn.o_proj = _with_bias(self.self_attn.o_proj)
        if self.has_mlp:
            self.mlp = _family_class(config, "MLP")(lc)
            if getattr(lc, "down_proj_bias", False) and self.mlp.down_proj.bias is None:
                self.mlp.down_proj = _with_bias(self.mlp.down_proj)

    def _norm(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        name = self.norm_names[slot]
        return x if name is None else getattr(self, name)(x)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_values", None)
        if self.has_attn:
            attn_out, _ = self.self_attn(
                hidden_states=self._norm(0, hidden_states),
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **{_CACHE_KW: cache},
                **kwargs,
            )
            hidden_states = hidden_states + self._norm(1, attn_out)
        elif self.attn_residual is not None:
            hidden_states = hidden_states + self.attn_residual.bias
        if self.has_mlp:
            hidden_states = hidden_states + self._norm(3, self.mlp(self._norm(2, hidden_states)))
        elif self.mlp_residual is not None:
            hidden_states = hidden_states + self.mlp_residual.bias
        return hidden_states


class _DecoderStack:
    """The body of every Llmprune*Model: embeddings, the layers, the final norm, rotary embeddings."""

    def __init__(self, config: LlmpruneLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        if config.base_model_type in _SCALED_EMBEDDING:
            self.embed_tokens = _family_class(config, _SCALED_EMBEDDING[config.base_model_type])(
                config.vocab_size, config.hidden_size, self.padding_idx, embed_scale=config.hidden_size**0.5)
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(LlmpruneDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = _family_class(config, "RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = _family_class(config, "RotaryEmbedding")(config=_homogeneous(config))
        self.gradient_checkpointing = False
        self.post_init()

    def _position_embeddings(self, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> list:
        """(cos, sin) per layer; None for attention-free layers. Computed once per distinct table."""
        layer_types = self.config.layer_types
        if self.config.base_model_type not in _ROPE_PER_LAYER_TYPE:
            shared = self.rotary_emb(hidden_states, position_ids)
            return [None if t == NO_ATTENTION else shared for t in layer_types]
        tables = {t: self.rotary_emb(hidden_states, position_ids, t) for t in set(layer_types) - {NO_ATTENTION}}
        return [tables.get(t) for t in layer_types]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)  # the pre-rename name
        kwargs.pop("past_key_values", None)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        layer_types = self.config.layer_types
        has_attention = any(t != NO_ATTENTION for t in layer_types)
        if not has_attention:  # nothing to cache (and a cache of placeholders cannot tell its length)
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            # ask an attention layer: a placeholder (transformers' DummyLayer) may not know a length
            past = 0
            if cache is not None:  # (only with attention: see has_attention above)
                past = cache.get_seq_length(next(i for i, t in enumerate(layer_types) if t != NO_ATTENTION))
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past

        masks = attention_mask  # generate() may hand over a ready {layer_type: mask} mapping
        if not has_attention:
            masks = {}
        elif not isinstance(masks, dict):
            mask_kwargs = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               position_ids=position_ids, **{_CACHE_KW: cache})
            masks = {"full_attention": create_causal_mask(**mask_kwargs)}
            if "sliding_attention" in layer_types:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self._position_embeddings(hidden_states, position_ids)
        all_hidden = [hidden_states] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            hidden_states = layer(
                hidden_states,
                attention_mask=masks.get(layer_types[i]),  # None for attention-free ("mlp") layers
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings[i],
                **kwargs,
            )
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden[-1] = hidden_states
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{_CACHE_KW: cache if use_cache else None},
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


class _CausalLM:
    """The body of every Llmprune*ForCausalLM: the stack plus an LM head; forward is the family's own."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    model_class: type[nn.Module]

    def __init__(self, config: LlmpruneLlamaConfig):
        super().__init__(config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


# ---- one set of classes per base family: its config class, its PreTrainedModel (weight init, attention
# support flags), and its *ForCausalLM.forward (which only touches self.model, self.lm_head, the loss and,
# for Gemma 2, the final logit soft-capping).
class LlmprunePreTrainedModel(modeling_llama.LlamaPreTrainedModel):
    config_class = LlmpruneLlamaConfig
    config: LlmpruneLlamaConfig
    _no_split_modules = ["LlmpruneDecoderLayer"]
    _can_record_outputs = {"hidden_states": LlmpruneDecoderLayer}


class LlmpruneLlamaModel(_DecoderStack, LlmprunePreTrainedModel):
    pass


class LlmpruneLlamaForCausalLM(_CausalLM, LlmprunePreTrainedModel, GenerationMixin):
    model_class = LlmpruneLlamaModel
    forward = modeling_llama.LlamaForCausalLM.forward


class LlmpruneGemma2PreTrainedModel(modeling_gemma2.Gemma2PreTrainedModel):
    config_class = LlmpruneGemma2Config
    config: LlmpruneGemma2Config
    _no_split_modules = ["LlmpruneDecoderLayer"]
    _can_record_outputs = {"hidden_states": LlmpruneDecoderLayer}


class LlmpruneGemma2Model(_DecoderStack, LlmpruneGemma2PreTrainedModel):
    pass


class LlmpruneGemma2ForCausalLM(_CausalLM, LlmpruneGemma2PreTrainedModel, GenerationMixin):
    model_class = LlmpruneGemma2Model
    forward = modeling_gemma2.Gemma2ForCausalLM.forward


class LlmpruneGemma3TextPreTrainedModel(modeling_gemma3.Gemma3PreTrainedModel):
    config_class = LlmpruneGemma3TextConfig
    config: LlmpruneGemma3TextConfig
    input_modalities = ("text",)
    _no_split_modules = ["LlmpruneDecoderLayer"]
    _can_record_outputs = {"hidden_states": LlmpruneDecoderLayer}


class LlmpruneGemma3TextModel(_DecoderStack, LlmpruneGemma3TextPreTrainedModel):
    pass


class LlmpruneGemma3TextForCausalLM(_CausalLM, LlmpruneGemma3TextPreTrainedModel, GenerationMixin):
    model_class = LlmpruneGemma3TextModel
    forward = modeling_gemma3.Gemma3ForCausalLM.forward


class LlmprunePhi3PreTrainedModel(modeling_phi3.Phi3PreTrainedModel):
    config_class = LlmprunePhi3Config
    config: LlmprunePhi3Config
    _no_split_modules = ["LlmpruneDecoderLayer"]
    _can_record_outputs = {"hidden_states": LlmpruneDecoderLayer}


class LlmprunePhi3Model(_DecoderStack, LlmprunePhi3PreTrainedModel):
    pass


class LlmprunePhi3ForCausalLM(_CausalLM, LlmprunePhi3PreTrainedModel, GenerationMixin):
    model_class = LlmprunePhi3Model
    forward = modeling_phi3.Phi3ForCausalLM.forward


class LlmpruneOlmo2PreTrainedModel(modeling_olmo2.Olmo2PreTrainedModel):
    config_class = LlmpruneOlmo2Config
    config: LlmpruneOlmo2Config
    _no_split_modules = ["LlmpruneDecoderLayer"]
    _can_record_outputs = {"hidden_states": LlmpruneDecoderLayer}


class LlmpruneOlmo2Model(_DecoderStack, LlmpruneOlmo2PreTrainedModel):
    pass


class LlmpruneOlmo2ForCausalLM(_CausalLM, LlmpruneOlmo2PreTrainedModel, GenerationMixin):
    model_class = LlmpruneOlmo2Model
    forward = modeling_olmo2.Olmo2ForCausalLM.forward


# config class -> (AutoModel class, AutoModelForCausalLM class)
MODEL_CLASSES = {
    LlmpruneLlamaConfig: (LlmpruneLlamaModel, LlmpruneLlamaForCausalLM),
    LlmpruneGemma2Config: (LlmpruneGemma2Model, LlmpruneGemma2ForCausalLM),
    LlmpruneGemma3TextConfig: (LlmpruneGemma3TextModel, LlmpruneGemma3TextForCausalLM),
    LlmprunePhi3Config: (LlmprunePhi3Model, LlmprunePhi3ForCausalLM),
    LlmpruneOlmo2Config: (LlmpruneOlmo2Model, LlmpruneOlmo2ForCausalLM),
}

__all__ = ["MODEL_CLASSES", "LlmpruneDecoderLayer"] + [c.__name__ for pair in MODEL_CLASSES.values() for c in pair]
