"""What a model card says about a checkpoint (`CardFacts`), shared by modelcard.py (metadata, assembly)
and card_sections.py (the Markdown body)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .modeling import LlmpruneLlamaConfig
from .plan import Plan

CUSTOM_MODEL_TYPE = LlmpruneLlamaConfig.model_type  # "llmprune_llama": non-uniform checkpoints


@dataclass
class LicenseInfo:
    license: str | None  # Hub license id (apache-2.0, llama3.1, other, ...) or None when unknown
    source: str  # where it was found, or why it is unknown
    name: str | None = None  # license_name / license_link accompany license: other
    link: str | None = None


@dataclass
class CardFacts:
    """Everything the card says, read from the checkpoint directory."""

    path: Path
    doc: dict[str, Any]  # pruning.json
    plan: Plan
    config: dict[str, Any]
    report: dict[str, Any]
    repo_id: str | None
    revision: str | None
    base_model: str | None  # a Hub id, or None when the base was a local directory
    base_label: str  # what to call the base model in prose
    license: LicenseInfo
    datasets: list[str] = field(default_factory=list)

    @property
    def provenance(self) -> dict[str, Any]:
        return self.doc.get("provenance") or {}

    @property
    def params(self) -> dict[str, Any]:
        return self.doc.get("params") or {}

    @property
    def custom_code(self) -> bool:
        return self.config.get("model_type") == CUSTOM_MODEL_TYPE

    @property
    def model_name(self) -> str:
        return (self.repo_id or self.path.name).split("/")[-1]

    @property
    def method(self) -> str:
        return self.plan.method or self.provenance.get("method") or "unknown"
