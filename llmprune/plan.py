"""The Plan: what every layer keeps. Tensor-free, versioned JSON, validated against a Geometry.

Indices always refer to the *base* model's layers and units:
- attention: KV groups 0..n_kv-1 of the layer; inside a kept group, query heads 0..g-1 (local);
- FFN: channels 0..m-1 (rows of gate/up, columns of down).
Compensation (FLAP-style bias) is stored as the calibration means of the removed input channels of
o_proj / down_proj, in ascending channel order, so `apply` can rebuild the bias from the base weights.

Reconstructed weights (least-squares refit / OBS, docs/reconstruction.md) are the one thing that
cannot be JSON: they travel in `Plan.tensors`, a side-car keyed `L{i}.attn.o.weight` [hidden, kept
o_proj inputs, in surgery's order], `L{i}.attn.o.bias` [hidden], `L{i}.mlp.down.weight`
[hidden, kept channels], `L{i}.mlp.down.bias` [hidden]. The JSON lists their names and shapes
(`tensors`); `save` writes them to `<plan>.safetensors` beside the JSON and `load` reads them back.
Surgery applies them after slicing (it stays the only code that writes weights).
`drop` with `compensate` (the means of all input channels) leaves a bias-only sublayer: the constant
b + W·μ added to the residual stream (Geometry: has_attn/has_mlp False with o_bias/down_bias True).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .families.base import Geometry
from .errors import UsageError

TENSOR_KEYS = ("attn.o.weight", "attn.o.bias", "mlp.down.weight", "mlp.down.bias")

PLAN_FORMAT = "llmprune.plan"
PLAN_VERSION = 1


class PlanError(UsageError):
    """A plan does not fit the model it is applied to, or its file is malformed."""


@dataclass
class AttnPlan:
    drop: bool = False  # with compensate: bias-only (the sublayer's mean output stays on the residual)
    keep_kv_groups: list[int] | None = None  # None: all groups
    keep_q: list[list[int]] | None = None  # per kept group, local query heads kept (same count everywhere)
    compensate: list[float] | None = None  # means of the removed o_proj input channels

    def is_identity(self) -> bool:
        return not self.drop and self.keep_kv_groups is None and self.keep_q is None


@dataclass
class MlpPlan:
    drop: bool = False
    keep_channels: list[int] | None = None  # None: all channels
    compensate: list[float] | None = None  # means of the removed down_proj input channels

    def is_identity(self) -> bool:
        return not self.drop and self.keep_channels is None


@dataclass
class LayerPlan:
    attn: AttnPlan = field(default_factory=AttnPlan)
    mlp: MlpPlan = field(default_factory=MlpPlan)

    @property
    def removed(self) -> bool:
        """Both sublayers gone (none bias-only): the block disappears and later blocks are renumbered.

        A block that already is bias-only in the model keeps its bias; `Plan.kept_layers` sees that."""
        return self.attn.drop and self.mlp.drop and self.attn.compensate is None and self.mlp.compensate is None


@dataclass
class Plan:
    layers: list[LayerPlan]
    geometry: list[Geometry]  # of the base model, one per layer
    method: str = "manual"
    base_model: str | None = None
    base_revision: str | None = None
    base_identity: dict[str, Any] | None = None  # where the base came from + fingerprints (identity.py)
    family: str = "llama"
    recipe: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # method-specific report (e.g. removal_order)
    # Reconstructed o_proj / down_proj weights and biases (torch tensors; see the module docstring).
    tensors: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Names and shapes of the side-car tensors a loaded plan expects (from its JSON).
    tensor_manifest: dict[str, list[int]] = field(default_factory=dict, repr=False, compare=False)

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def identity(cls, geometry: list[Geometry], **kw: Any) -> Plan:
        return cls(layers=[LayerPlan() for _ in geometry], geometry=list(geometry), **kw)

    # ---- derived shapes ----------------------------------------------------------------------------
    def geometry_after(self) -> list[Geometry]:
        """Geometry of every base layer after the plan (removed blocks included, with nothing left)."""
        out = [_after(g, lp) for g, lp in zip(self.geometry, self.layers)]
        names = set(self.tensors) | set(self.tensor_manifest)
        for i, g in enumerate(out):  # a refit bias makes a module gain a bias, like compensation
            if f"L{i}.attn.o.bias" in names and g.has_attn and not g.o_bias:
                out[i] = g = g.with_(o_bias=True)
            if f"L{i}.mlp.down.bias" in names and g.has_mlp and not g.down_bias:
                out[i] = g.with_(down_bias=True)
        return out

    def kept_layers(self) -> list[int]:
        """Base layers that still hold something: a sublayer, or a bias-only one (new or already there)."""
        return [i for i, g in enumerate(self.geometry_after()) if g.has_attn or g.has_mlp or g.o_bias or g.down_bias]

    def params_before(self) -> int:
        return sum(g.linear_params() for g in self.geometry)

    def params_after(self) -> int:
        return sum(g.linear_params() for g in self.geometry_after())

    def sparsity(self) -> float:
        """Fraction of decoder-layer linear parameters removed."""
        before = self.params_before()
        return 1.0 - self.params_after() / before if before else 0.0

    def is_identity(self) -> bool:
        return all(lp.attn.is_identity() and lp.mlp.is_identity() for lp in self.layers)

    # ---- validation --------------------------------------------------------------------------------
    def validate(self, geometry: list[Geometry] | None = None) -> None:
        """Raise PlanError unless every index fits `geometry` (default: the plan's own)."""
        geometry = self.geometry if geometry is None else geometry
        if len(geometry) != len(self.layers):
            raise PlanError(f"plan has {len(self.layers)} layers but the model has {len(geometry)}")
        if geometry != self.geometry:
            for i, (a, b) in enumerate(zip(geometry, self.geometry)):
                if a != b:
                    raise PlanError(f"layer {i}: plan was made for {b} but the model has {a}")
        for i, (g, lp) in enumerate(zip(geometry, self.layers)):
            _validate_attn(i, g, lp.attn)
            _validate_mlp(i, g, lp.mlp)
        _validate_tensors(self)
        if self.layers and not self.kept_layers():
            raise PlanError("the plan removes every decoder layer; keep at least one sublayer")

    # ---- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "method": self.method,
            "family": self.family,
            "base_model": self.base_model,
            "base_revision": self.base_revision,
            "base_identity": self.base_identity,
            "params": {"linear_before": self.params_before(), "linear_after": self.params_after(),
                       "sparsity": round(self.sparsity(), 6)},
            "geometry": [g.to_dict() for g in self.geometry],
            "layers": [_layer_to_dict(lp) for lp in self.layers],
            "recipe": self.recipe,
            "extras": self.extras,
        } | ({"tensors": self.manifest()} if self.tensors or self.tensor_manifest else {})

    def manifest(self) -> dict[str, list[int]]:
        """Name -> shape of every side-car tensor (what the JSON records)."""
        if self.tensors:
            return {k: list(self.tensors[k].shape) for k in sorted(self.tensors)}
        return dict(self.tensor_manifest)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if not isinstance(d, dict):
            raise PlanError(f"not an llmprune plan: expected a JSON object, got a {type(d).__name__}")
        if d.get("format") != PLAN_FORMAT:
            raise PlanError(f"not an llmprune plan (format={d.get('format')!r}, expected {PLAN_FORMAT!r})")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {d.get('version')} is not supported (this llmprune reads {PLAN_VERSION})")
        try:
            _check_shape(d)
            layers = [LayerPlan(attn=AttnPlan(**ld.get("attn", {})), mlp=MlpPlan(**ld.get("mlp", {})))
                      for ld in d["layers"]]
            geometry = [Geometry.from_dict(g) for g in d["geometry"]]
        except (KeyError, TypeError, AttributeError) as e:
            raise PlanError(f"malformed plan: {e}") from e
        ident = d.get("base_identity")
        plan = cls(layers=layers, geometry=geometry, method=d.get("method", "manual"),
                   base_model=d.get("base_model"), base_revision=d.get("base_revision"),
                   base_identity=ident if isinstance(ident, dict) else None,
                   family=d.get("family", "llama"), recipe=d.get("recipe") or {}, extras=d.get("extras") or {},
                   tensor_manifest={k: list(v) for k, v in (d.get("tensors") or {}).items()})
        plan.validate()
        return plan

    def save(self, path: str | Path) -> None:
        """Write the JSON; reconstructed tensors (if any) go to `<path without suffix>.safetensors` beside it."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        if self.tensors:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}, str(sidecar_path(path)))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        if p.is_dir():
            p = p / "pruning.json"
        if not p.exists():
            raise PlanError(f"no plan at {path} (expected plan.json or a checkpoint directory with pruning.json)")
        try:
            d = json.loads(p.read_text())
        except UnicodeDecodeError:
            raise PlanError(f"{p} is not a plan: not a text (JSON) file") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"{p} is not valid JSON ({e}); it may be truncated. Re-create it with `llmprune plan`") \
                from None
        try:
            plan = cls.from_dict(d["plan"] if isinstance(d, dict) and isinstance(d.get("plan"), dict) else d)
        except PlanError as e:
            raise PlanError(f"{p}: {e}") from None
        side = sidecar_path(p)
        if plan.tensor_manifest and side.exists():  # absent in a checkpoint: its weights already hold them
            from safetensors.torch import load_file

            plan.tensors = load_file(str(side))
            _validate_tensors(plan)
        return plan

    def missing_tensors(self) -> list[str]:
        """Side-car tensors the JSON lists but this plan does not hold (apply needs them)."""
        return [k for k in self.tensor_manifest if k not in self.tensors]

    # ---- human summary -----------------------------------------------------------------------------
    def summary(self) -> str:
        """Per-layer table: heads, KV heads, FFN width before -> after, and linear parameters."""
        rows = [f"{'layer':>5}  {'attn q/kv heads':>17}  {'ffn width':>13}  {'params':>21}"]
        for i, (b, a) in enumerate(zip(self.geometry, self.geometry_after())):
            att = "removed" if not a.has_attn else f"{b.n_q_heads}/{b.n_kv_heads}->{a.n_q_heads}/{a.n_kv_heads}"
            ffn = "removed" if not a.has_mlp else f"{b.intermediate}->{a.intermediate}"
            rows.append(f"{i:>5}  {att:>17}  {ffn:>13}  {b.linear_params():>10,}->{a.linear_params():<10,}")
        rows.append(f"linear params {self.params_before():,} -> {self.params_after():,} "
                    f"(sparsity {self.sparsity():.2%})")
        return "\n".join(rows)


# ---- helpers ---------------------------------------------------------------------------------------
def sidecar_path(plan_path: str | Path) -> Path:
    """Where a plan's reconstructed tensors live: plan.json -> plan.safetensors."""
    return Path(plan_path).with_suffix(".safetensors")


def _validate_tensors(plan: Plan) -> None:
    """Every side-car tensor names a partly pruned o_proj / down_proj and has its shape after slicing."""
    pat = re.compile(r"^L(\d+)\.(attn\.o|mlp\.down)\.(weight|bias)$")
    for name, shape in plan.manifest().items():
        m = pat.match(name)
        if m is None or int(m.group(1)) >= len(plan.layers):
            raise PlanError(f"plan tensor {name!r} is not one of L<i>.{{{', '.join(TENSOR_KEYS)}}}")
        i, mod, kind = int(m.group(1)), m.group(2), m.group(3)
        g, lp = plan.geometry[i], plan.layers[i]
        if mod == "attn.o":
            if lp.attn.drop or lp.attn.is_identity():
                raise PlanError(f"plan tensor {name}: layer {i} attention is not partly pruned")
            kept = len(attn_kept_channels(g, lp.attn))
        else:
            if lp.mlp.drop or lp.mlp.is_identity():
                raise PlanError(f"plan tensor {name}: layer {i} FFN is not partly pruned")
            kept = len(lp.mlp.keep_channels)
        want = [g.hidden, kept] if kind == "weight" else [g.hidden]
        if list(shape) != want:
            raise PlanError(f"plan tensor {name} has shape {list(shape)}, expected {want}")


def sublayer_plan(geometry: list[Geometry], gone: set[tuple[int, str]], method: str = "finercut") -> Plan:
    """A Plan dropping the (layer, "attn" | "mlp") sublayers in `gone`, and those the model already lacks."""
    plan = Plan.identity(geometry, method=method)
    for i, (g, lp) in enumerate(zip(geometry, plan.layers)):
        if not g.has_attn or (i, "attn") in gone:
            lp.attn = AttnPlan(drop=True)
        if not g.has_mlp or (i, "mlp") in gone:
            lp.mlp = MlpPlan(drop=True)
    plan.validate()
    return plan


def _after(g: Geometry, lp: LayerPlan) -> Geometry:
    changes: dict[str, Any] = {}
    a = lp.attn
    if a.drop or not g.has_attn:  # o_bias now means a bias-only sublayer: new, or one the model already has
        changes.update(has_attn=False, n_q_heads=0, n_kv_heads=0, qkv_bias=False,
                       o_bias=a.compensate is not None or (not g.has_attn and g.o_bias))
    else:
        n_kv = g.n_kv_heads if a.keep_kv_groups is None else len(a.keep_kv_groups)
        per_group = g.group_size if a.keep_q is None else (len(a.keep_q[0]) if a.keep_q else 0)
        changes.update(n_kv_heads=n_kv, n_q_heads=n_kv * per_group, o_bias=g.o_bias or a.compensate is not None)
    m = lp.mlp
    if m.drop or not g.has_mlp:
        changes.update(has_mlp=False, intermediate=0, mlp_in_bias=False,
                       down_bias=m.compensate is not None or (not g.has_mlp and g.down_bias))
    else:
        width = g.intermediate if m.keep_channels is None else len(m.keep_channels)
        changes.update(intermediate=width, down_bias=g.down_bias or m.compensate is not None)
    return g.with_(**changes)


def removed_indices(kept: list[int] | None, n: int) -> list[int]:
    if kept is None:
        return []
    keep = set(kept)
    return [i for i in range(n) if i not in keep]


def attn_kept_channels(g: Geometry, a: AttnPlan) -> list[int]:
    """o_proj input channels (= q_proj output rows) that survive, in new order (grouped by KV group)."""
    groups = range(g.n_kv_heads) if a.keep_kv_groups is None else a.keep_kv_groups
    out: list[int] = []
    for gi, k in enumerate(groups):
        local = range(g.group_size) if a.keep_q is None else a.keep_q[gi]
        for j in local:
            head = k * g.group_size + j
            out.extend(range(head * g.head_dim, (head + 1) * g.head_dim))
    return out


def _check_indices(where: str, idx: list[int], n: int) -> None:
    if any(not isinstance(i, int) for i in idx):
        raise PlanError(f"{where}: indices must be integers")
    if idx != sorted(set(idx)):
        raise PlanError(f"{where}: indices must be sorted and unique")
    if idx and (idx[0] < 0 or idx[-1] >= n):
        raise PlanError(f"{where}: indices must lie in [0, {n})")


def _validate_attn(i: int, g: Geometry, a: AttnPlan) -> None:
    where = f"layer {i} attention"
    if not g.has_attn:
        if not a.drop or a.keep_kv_groups is not None or a.keep_q is not None or a.compensate is not None:
            raise PlanError(f"{where}: the model has no attention here; the plan may only say drop")
        return
    if a.drop:
        if a.keep_kv_groups is not None or a.keep_q is not None:
            raise PlanError(f"{where}: drop excludes keep_kv_groups / keep_q")
        if a.compensate is not None and len(a.compensate) != g.n_q_heads * g.head_dim:
            raise PlanError(f"{where}: a dropped sublayer's compensate needs the means of all "
                            f"{g.n_q_heads * g.head_dim} o_proj input channels, got {len(a.compensate)}")
        return
    n_groups = g.n_kv_heads
    if a.keep_kv_groups is not None:
        _check_indices(f"{where} keep_kv_groups", a.keep_kv_groups, g.n_kv_heads)
        if not a.keep_kv_groups:
            raise PlanError(f"{where}: keeps no KV group; use drop: true to remove the sublayer")
        n_groups = len(a.keep_kv_groups)
    if a.keep_q is not None:
        if len(a.keep_q) != n_groups:
            raise PlanError(f"{where}: keep_q has {len(a.keep_q)} entries for {n_groups} kept KV groups")
        sizes = {len(q) for q in a.keep_q}
        if len(sizes) != 1 or 0 in sizes:
            raise PlanError(f"{where}: every KV group must keep the same, non-zero number of query heads")
        for q in a.keep_q:
            _check_indices(f"{where} keep_q", q, g.group_size)
    n_removed = g.n_q_heads * g.head_dim - len(attn_kept_channels(g, a))
    if a.compensate is not None and len(a.compensate) != n_removed:
        raise PlanError(f"{where}: compensate has {len(a.compensate)} means for {n_removed} removed channels")


def _validate_mlp(i: int, g: Geometry, m: MlpPlan) -> None:
    where = f"layer {i} mlp"
    if not g.has_mlp:
        if not m.drop or m.keep_channels is not None or m.compensate is not None:
            raise PlanError(f"{where}: the model has no FFN here; the plan may only say drop")
        return
    if m.drop:
        if m.keep_channels is not None:
            raise PlanError(f"{where}: drop excludes keep_channels")
        if m.compensate is not None and len(m.compensate) != g.intermediate:
            raise PlanError(f"{where}: a dropped sublayer's compensate needs the means of all "
                            f"{g.intermediate} down_proj input channels, got {len(m.compensate)}")
        return
    if m.keep_channels is not None:
        _check_indices(f"{where} keep_channels", m.keep_channels, g.intermediate)
        if not m.keep_channels:
            raise PlanError(f"{where}: keeps no channel; use drop: true to remove the sublayer")
    n_removed = len(removed_indices(m.keep_channels, g.intermediate))
    if m.compensate is not None and len(m.compensate) != n_removed:
        raise PlanError(f"{where}: compensate has {len(m.compensate)} means for {n_removed} removed channels")


def _check_shape(d: dict[str, Any]) -> None:
    """Types of a plan read from JSON (hand-edited files), before any index is looked at."""
    for key in ("layers", "geometry"):
        if not isinstance(d.get(key), list):
            raise PlanError(f"{key!r} must be a list, got {type(d.get(key)).__name__}")
    for i, ld in enumerate(d["layers"]):
        if not isinstance(ld, dict):
            raise PlanError(f"layers[{i}] must be an object with attn / mlp, got {type(ld).__name__}")
        for part, lists in (("attn", ("keep_kv_groups", "keep_q", "compensate")), ("mlp", ("keep_channels", "compensate"))):
            sub = ld.get(part, {})
            if not isinstance(sub, dict):
                raise PlanError(f"layers[{i}].{part} must be an object, got {type(sub).__name__}")
            for k in lists:
                v = sub.get(k)
                if v is not None and not isinstance(v, list):
                    raise PlanError(f"layers[{i}].{part}.{k} must be a list (or absent), got {v!r}")
            if not isinstance(sub.get("drop", False), bool):
                raise PlanError(f"layers[{i}].{part}.drop must be true or false, got {sub.get('drop')!r}")
            q = sub.get("keep_q")
            if part == "attn" and isinstance(q, list) and any(not isinstance(x, list) for x in q):
                raise PlanError(f"layers[{i}].attn.keep_q must be a list of lists (query heads per kept KV group)")
    for i, g in enumerate(d["geometry"]):
        if not isinstance(g, dict):
            raise PlanError(f"geometry[{i}] must be an object, got {type(g).__name__}")


def _layer_to_dict(lp: LayerPlan) -> dict[str, Any]:
    def clean(obj: Any) -> dict[str, Any]:
        return {k: v for k, v in obj.__dict__.items() if v is not None and v is not False}

    return {"attn": clean(lp.attn), "mlp": clean(lp.mlp)}
