"""Gemma 2 and Gemma 3 (text): sandwich norms, soft-capping, per-type attention, scaled embeddings.

What differs from Llama, and where it is handled:
- four RMSNorms per layer (before/after attention, before/after the FFN), all with Gemma's `1 + weight`
  scale: the views carry `post_norm`, so a removed sublayer takes both its norms with it, and the
  half-block runners apply them;
- `query_pre_attn_scalar`, attention logit soft-capping, `head_dim` free of hidden/heads, the scaled
  embedding and the tied head live in the family's own modules, which the pruned model reuses unchanged;
- alternating sliding / full attention layers (`layer_types`) are kept per surviving layer;
- Gemma 3 normalises q and k per head (`q_norm`/`k_norm` of size head_dim), so pruning heads leaves
  them whole; Gemma 2's final logit soft-capping is reported by `logit_softcap`.
Multimodal Gemma 3 checkpoints (`gemma3`, Gemma3ForConditionalGeneration) are not handled.
"""
from __future__ import annotations

from typing import Any

from ..modeling.configuration_llmprune import LlmpruneGemma2Config, LlmpruneGemma3TextConfig
from .base import UnsupportedModelError
from .decoder import DecoderFamily


class GemmaFamily(DecoderFamily):
    name = "gemma"
    model_types = ("gemma2", "gemma3_text", "llmprune_gemma2", "llmprune_gemma3_text")
    pruned_configs = {"gemma2": LlmpruneGemma2Config, "gemma3_text": LlmpruneGemma3TextConfig}
    attn_norm = "input_layernorm"
    attn_post_norm = "post_attention_layernorm"
    mlp_norm = "pre_feedforward_layernorm"
    mlp_post_norm = "post_feedforward_layernorm"

    def matches(self, config: Any) -> bool:
        if not super().matches(config):
            return False
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                f"{config.model_type} with use_bidirectional_attention=True is an encoder (e.g. EmbeddingGemma), "
                f"not a causal LM; llmprune prunes causal LMs only.")
        return True
