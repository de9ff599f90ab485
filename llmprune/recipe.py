"""Recipes: YAML files validated by pydantic; unknown keys are errors that name their path.

A recipe looks like:

    method: flap                 # a key of llmprune.prune.PRUNERS
    description: FLAP, paper defaults
    sparsity: 0.2                # fraction of decoder-layer linear parameters removed
    calibration: {source: wikitext2, nsamples: 128, seqlen: 512, seed: 0}
    pruner: {metric: wifv, structure: AL-AM}   # validated by the method's own config model

CLI flags and `key.path=value` overrides are applied to the raw data before validation, so a typo
in an override is reported exactly like a typo in the file.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .prune import PRUNERS


class RecipeError(ValueError):
    """A recipe file or override is invalid; the message lists every problem with its key path."""


def recipes_dir() -> Path:
    """Built-in recipes: `recipes/` of a source checkout, or the copy installed with the package."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "recipes", here / "recipes"):
        if cand.is_dir():
            return cand
    return here / "recipes"


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # preset (wikitext2, c4, pile, python-docs), Hub dataset id, or local path; None: the default,
    # resolved once by data.resolve_source (wikitext2, or python-docs with a warning when unreachable)
    source: str | None = None
    split: str = "train"
    text_field: str = "text"
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(512, ge=2)
    seed: int = 0
    batch_size: int = Field(8, ge=1)  # calibration sequences per forward pass


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    description: str = ""
    sparsity: float = 0.2
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    pruner: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in PRUNERS:
            raise ValueError(f"unknown method {v!r}; available: {', '.join(sorted(PRUNERS))}")
        return v

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"must be in [0, 1): the fraction of decoder-layer linear parameters to remove (got {v})")
        return v


@dataclass
class ResolvedRecipe:
    recipe: Recipe
    options: BaseModel  # the method's validated config
    origin: str  # file it came from (or "<dict>")

    @property
    def method(self) -> str:
        return self.recipe.method

    def to_dict(self) -> dict[str, Any]:
        d = self.recipe.model_dump()
        d["pruner"] = self.options.model_dump(mode="json")
        return d


def resolve_recipe_path(name_or_path: str) -> Path:
    """A built-in recipe name (`flap`) or a YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise RecipeError(f"recipe file {name_or_path} does not exist")
        return p
    builtins = builtin_recipes()
    if name_or_path in builtins:
        return builtins[name_or_path]
    hint = difflib.get_close_matches(name_or_path, builtins, n=1)
    raise RecipeError(f"unknown recipe {name_or_path!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                      + f"; built-in recipes: {', '.join(builtins)}; or pass a path to a .yaml file")


def load_recipe(name_or_path: str | None = None, overrides: dict[str, Any] | None = None,
                data: dict[str, Any] | None = None) -> ResolvedRecipe:
    """Read a recipe (built-in name, YAML path, or a dict), apply dotted-key overrides, validate."""
    if data is None:
        if name_or_path is None:
            raise RecipeError("no recipe given: pass --recipe NAME (built-ins: "
                              f"{', '.join(builtin_recipes())}) or a YAML path")
        path = resolve_recipe_path(name_or_path)
        origin = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{origin}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise RecipeError(f"{origin}: a recipe must be a mapping of keys to values")
    else:
        origin = name_or_path or "<dict>"
        data = _deepcopy(data)
    for key, value in (overrides or {}).items():
        _set_path(data, key, value)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format(origin, e, Recipe)) from None
    spec = PRUNERS[recipe.method]
    try:
        options = spec.config.model_validate(recipe.pruner)
    except ValidationError as e:
        raise RecipeError(_format(origin, e, spec.config, prefix="pruner")) from None
    return ResolvedRecipe(recipe=recipe, options=options, origin=origin)


def parse_override(text: str) -> tuple[str, Any]:
    """`pruner.metric=ifv` -> ("pruner.metric", "ifv"); values are parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


# ---- helpers ---------------------------------------------------------------------------------------
def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise RecipeError(f"override {dotted!r}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model at `loc`'s parent."""
    cur: Any = model
    for part in loc[:-1]:
        field = getattr(cur, "model_fields", {}).get(part)
        ann = field.annotation if field is not None else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cur = ann
        else:
            return []
    return list(getattr(cur, "model_fields", {}))


def _format(origin: str, err: ValidationError, model: type[BaseModel], prefix: str | None = None) -> str:
    lines = [f"invalid recipe {origin}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc)
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            if allowed:
                msg += f"; allowed here: {', '.join(allowed)}"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)
