"""From `{key: tensor}` + header metadata to factors placed on Flax params trees.

`convert` runs the whole converter side of jlora: detect the format, run its rule
table, resolve alphas, name every module in each component's params tree, convert
layouts and check shapes. It returns per-component placements and a report that
accounts for every source key.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import warnings
from collections import Counter
from typing import Mapping

import numpy as np

import converters.formats  # noqa: F401  (registers the formats)
import converters.schemes  # noqa: F401  (registers the table naming schemes)
import converters.schemes_jax  # noqa: F401  (third-party JAX codebases' schemes)
import converters.schemes_maxdiffusion_dit  # noqa: F401  (maxdiffusion's Z-Image and LTX-2)
from converters import engine, layout, layout_lycoris, plans
from converters.formats import peft
from converters.guess import guess_family
from converters.naming import NamingScheme, Path, Target, detect_scheme, get_scheme, naming_schemes
from converters.records import Placement, Record, algorithm
from converters.errors import InvalidAdapterError, KeyMismatchError, ShapeMismatchError, UnsupportedFormatError

ShapeIndex = Mapping[Path, tuple[tuple[int, ...], np.dtype]]


@dataclasses.dataclass(frozen=True)
class PlacedModule:
    component: str
    module: str
    path: str
    keys: tuple[str, ...]
    rank: int | None
    alpha: float | None
    leaf: str = "lora"
    algorithm: str = ""


@dataclasses.dataclass
class LoadReport:
    """Where every key of a LoRA file went.

    Attributes:
      origin: the file (or `<state dict>`).
      format: detected (or forced) format name.
      schemes: component -> naming scheme used.
      placed: one entry per adapted weight.
      unmatched: keys no rule of the format understands.
      unplaced: key -> why it has no target in the params tree.
      skipped: key -> component it belongs to, when that component was not given.
      malformed: key -> why its module was left out (`strict=False`: bad shapes, missing factors, a bad
        alpha, a fused split that fails); the rest of the file loads.
      outside_prefix: keys left out because they are not under the `prefix=` asked for.
      metadata: the file's `lora_adapter_metadata`.
      redundant: key -> why it was left out as a repeat of other keys of the file (Z-Image's fused `qkv` next
        to the split `to_q`/`to_k`/`to_v` it duplicates, as diffusers 0.42.1 leaves it out).
      also_read_as: other formats that read the same keys for another named family (`family=`), e.g.
        `["z_image (family='z_image')"]` for a file of Lumina-2 / Z-Image shared names detected as `lumina2`.
    """

    origin: str
    format: str
    schemes: dict[str, str] = dataclasses.field(default_factory=dict)
    placed: list[PlacedModule] = dataclasses.field(default_factory=list)
    unmatched: list[str] = dataclasses.field(default_factory=list)
    unplaced: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    metadata: dict = dataclasses.field(default_factory=dict)
    adapter_name: str | None = None
    malformed: dict[str, str] = dataclasses.field(default_factory=dict)
    outside_prefix: list[str] = dataclasses.field(default_factory=list)
    also_read_as: list[str] = dataclasses.field(default_factory=list)
    redundant: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def loaded_keys(self) -> list[str]:
        return sorted({k for p in self.placed for k in p.keys})

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.component for p in self.placed))

    def summary(self) -> str:
        lines = [f"{self.origin}: format {self.format}"
                 + (f" (the keys are also {', '.join(self.also_read_as)})" if self.also_read_as else "")]
        for comp, n in sorted(self.counts().items()):
            mine = [p for p in self.placed if p.component == comp]
            ranks = sorted({p.rank for p in mine if p.rank is not None})
            alphas = sorted({p.alpha for p in mine if p.alpha is not None})
            kinds = dict(Counter(p.algorithm or p.leaf for p in mine))
            lines.append(
                f"  {comp}: {n} weights {kinds}, ranks {ranks}, alphas {alphas}, scheme {self.schemes.get(comp)}"
            )
        for title, keys in (("unmatched", self.unmatched), ("unplaced", list(self.unplaced)), ("skipped", list(self.skipped)),
                            ("malformed", list(self.malformed)), ("outside prefix", self.outside_prefix),
                            ("left out as redundant", list(self.redundant))):
            if keys:
                lines.append(f"  {title}: {len(keys)} keys, e.g. {keys[:3]}")
        return "\n".join(lines)


def _assign_components(records: list[Record], targets: Mapping[str, ShapeIndex], default_component, origin) -> list[Record]:
    out = []
    for rec in records:
        comp = rec.component or default_component
        if comp is None:
            if len(targets) != 1:
                raise KeyMismatchError(
                    f"{origin}: key {rec.keys[0]!r} has no component prefix (unet./text_encoder./...) and "
                    f"several components were given {sorted(targets)}; use load_lora(..., component=...)."
                )
            comp = next(iter(targets))
        out.append(dataclasses.replace(rec, component=comp))
    return out


def module_table(index: ShapeIndex, scheme: NamingScheme) -> dict[str, str | None]:
    """`{module name with dots as underscores: module name}` of every module in a params tree (None: ambiguous)."""
    if scheme.modules is not None:
        names = scheme.modules(index)
    else:
        names = [scheme.to_module(path[:-1]) for path in index if len(path) >= 2]
    table: dict[str, str | None] = {}
    for module in names:
        key = module.replace(".", "_")
        table[key] = module if table.get(key, module) == module else None
    return table


def _scheme_and_table(index: ShapeIndex, scheme) -> tuple[NamingScheme, Mapping[str, str | None]]:
    """The naming scheme (`scheme`, or detected) and read-only module table of one params tree."""
    resolved = get_scheme(scheme) if scheme else detect_scheme(index)
    return resolved, types.MappingProxyType(module_table(index, resolved))


@functools.lru_cache(maxsize=16)
def _cached_scheme_and_table(items: tuple, scheme, registry: tuple):
    return _scheme_and_table(dict(items), scheme)


def _scheme_and_table_of(index: ShapeIndex, scheme):
    """`_scheme_and_table`, cached on the tree's `(path, (shape, dtype))` items, the scheme argument and the
    registered schemes (a params tree loaded onto again costs no second pass over its paths)."""
    try:
        key = (tuple(index.items()), scheme, tuple(naming_schemes().values()))
        hash(key)
    except TypeError:  # unhashable shapes or scheme objects: computed each time
        return _scheme_and_table(index, scheme)
    return _cached_scheme_and_table(*key)


def _schemes_and_tables(targets: Mapping[str, ShapeIndex], schemes=None):
    """`({component: naming scheme}, {component: module_table})`: each scheme as given (name, object, or a
    dict of them per component) or detected from the params."""
    chosen = schemes if isinstance(schemes, Mapping) else {c: schemes for c in targets}
    pairs = {c: _scheme_and_table_of(index, chosen.get(c)) for c, index in targets.items()}
    return {c: p[0] for c, p in pairs.items()}, {c: p[1] for c, p in pairs.items()}


def _modules(tables: Mapping[str, Mapping[str, str | None]]) -> frozenset[str]:
    return frozenset(m for table in tables.values() for m in table.values() if m is not None)


def target_modules(targets: Mapping[str, ShapeIndex], schemes=None) -> frozenset[str]:
    """The module names of every target params tree (for formats whose keys alone do not name the model)."""
    return _modules(_schemes_and_tables(targets, schemes)[1])


def _weight_path(rec: Record, module_path: Path, scheme: NamingScheme) -> Path:
    if rec.kind in ("diff", "set") and rec.tensors[rec.kind].ndim == 1:
        return module_path + ("scale",)
    return module_path + (scheme.weight,)


_LEAF_BUILDERS = {
    "lora": layout.lora_leaf,
    "loha": layout_lycoris.with_dora(layout.loha_leaf),
    "lokr": layout_lycoris.with_dora(layout.lokr_leaf),
    "ia3": layout_lycoris.ia3_leaf,
    "glora": layout_lycoris.glora_leaf,
    "oft": layout_lycoris.oft_leaf,
    "tlora": layout_lycoris.tlora_leaf,
}
_ALPHA_AS_IS = ("lokr", "ia3", "oft")  # kinds where a missing alpha does not mean alpha = rank


def _place(rec: Record, module: str, index: ShapeIndex, scheme: NamingScheme, alpha: float | None) -> tuple[list[Placement], str]:
    """The placements of one record, or no placements and why (a weight missing from the params tree)."""
    target = scheme.target(module)
    if target is None:
        return [], f"naming scheme {scheme.name!r} has no place for module {module!r}"
    out = []
    if rec.kind != "bias":
        path = _weight_path(rec, target.path, scheme)
        if path not in index:
            return [], f"module {module!r} has no {'/'.join(path)} in {rec.component}: " + _suggest(path, index)
        placed = _leaf_at(rec, path, index[path][0], target, alpha)
        if isinstance(placed, str):
            return [], placed
        out.append(placed)
    if "up_bias" in rec.tensors or "diff_b" in rec.tensors:
        role = "up_bias" if "up_bias" in rec.tensors else "diff_b"
        path = target.path + ("bias",)
        if path not in index:
            return [], (
                f"{rec.sources[role]} is a bias delta but {rec.component} has no {'/'.join(path)} "
                f"(the layer has no bias): " + _suggest(path, index)
            )
        factor = 1.0
        if role == "up_bias" and rec.rank:
            factor = (alpha if alpha is not None else rec.rank) / rec.rank
        shape, cols = _part_shape(index[path][0], target, rec, role)
        leaf, fields = layout.bias_leaf(rec, shape, f"{rec.component}:{'/'.join(path)}", factor)
        out.append(Placement(rec, path, leaf, fields, target.layer, cols))
    return out, ""


def _part_shape(shape, target: Target, rec: Record, role: str) -> tuple[tuple[int, ...], tuple]:
    """The shape one torch module sees of a (stacked, fused) weight, and its output column map."""
    shape = tuple(shape)
    if target.layer is not None:
        if len(shape) < 2 or target.layer >= shape[0]:
            raise ShapeMismatchError(
                f"{rec.sources.get(role, rec.keys[0])}: layer {target.layer} of {rec.module!r} does not exist in "
                f"{'/'.join(target.path)} (stacked shape {shape})."
            )
        shape = shape[1:]
    if not target.out_map:
        return shape, ((0, shape[-1], 0),) if target.layer is not None else ()
    if shape[-1] % target.units:
        raise ShapeMismatchError(
            f"{'/'.join(target.path)}: fused output axis {shape[-1]} does not split into {target.units} units."
        )
    unit = shape[-1] // target.units
    cols, width = [], 0
    for start, stop, dst in target.out_map:
        cols.append((start * unit, stop * unit, dst * unit))
        width = max(width, stop * unit)
    return shape[:-1] + (width,), tuple(cols)


def _leaf_at(rec: Record, path: Path, shape, target: Target, alpha: float | None) -> Placement | str:
    where = f"{rec.component}:{'/'.join(path)}"
    role = "down" if rec.kind == "lora" else next(iter(rec.sources))
    part_shape, cols = _part_shape(shape, target, rec, role)
    if rec.kind == "diff":
        leaf, fields = layout.diff_leaf(rec, part_shape, where)
    elif rec.kind == "set":
        leaf, fields = layout.set_leaf(rec, part_shape, where)
    else:
        effective = alpha if alpha is not None or rec.kind in _ALPHA_AS_IS else float(rec.rank)
        leaf, fields = _LEAF_BUILDERS[rec.kind](rec, part_shape, where, effective)
    if not target.is_simple and leaf not in ("lora", "diff", "set"):
        raise UnsupportedFormatError(
            f"{rec.keys[0]}: a {leaf} adapter on a stacked or fused weight ({where}) is not supported; "
            "only LoRA and full diffs are."
        )
    return Placement(rec, path, leaf, fields, target.layer, cols)


def merge_parts(parts: list[Placement], shape) -> Placement:
    """One stacked/fused leaf from the pieces placed on the same weight.

    LoRA pieces are concatenated along the rank axis with their `alpha / r` folded into
    `b` (rank padded with zeros per layer, so a `(L, in, R)`, b `(L, R, out)`); diff
    pieces are written into a zero delta of the weight's shape.
    """
    shape = tuple(shape)
    kinds = {p.leaf for p in parts}
    first = parts[0]
    if len(kinds) > 1:
        raise InvalidAdapterError(
            f"{'/'.join(first.path)}: adapter kinds {sorted(kinds)} on one fused/stacked weight cannot be combined."
        )
    stacked = first.layer is not None
    n_layers = shape[0] if stacked else 1
    layer_of = (lambda p: p.layer) if stacked else (lambda p: 0)
    if kinds == {"set"}:
        value = np.zeros(shape if stacked else (1,) + shape, np.float32)
        mask = np.zeros(value.shape, bool)
        for p in parts:
            cols = p.cols or ((0, shape[-1], 0),)
            for s0, s1, d0 in cols:
                value[layer_of(p), ..., d0 : d0 + s1 - s0] = np.asarray(p.fields["value"], np.float32)[..., s0:s1]
                mask[layer_of(p), ..., d0 : d0 + s1 - s0] = True
        if not stacked:
            value, mask = value[0], mask[0]
        return Placement(first.record, first.path, "set", {"value": value, "mask": mask})
    if kinds == {"diff"}:
        d = np.zeros(shape if stacked else (1,) + shape, np.float32)
        for p in parts:
            for s0, s1, d0 in p.cols:
                d[layer_of(p), ..., d0 : d0 + s1 - s0] += np.asarray(p.fields["diff"], np.float32)[..., s0:s1] * float(p.fields["factor"])
        return Placement(first.record, first.path, "diff", {"diff": d if stacked else d[0], "factor": 1.0})
    ranks = [0] * n_layers
    for p in parts:
        ranks[layer_of(p)] += p.fields["a"].shape[-1]
    R = max(ranks)
    inner = shape[1:] if stacked else shape
    a = np.zeros((n_layers,) + inner[:-1] + (R,), np.float32)
    b = np.zeros((n_layers, R, inner[-1]), np.float32)
    offset = [0] * n_layers
    for p in parts:
        l, pa, pb = layer_of(p), np.asarray(p.fields["a"], np.float32), np.asarray(p.fields["b"], np.float32)
        r = pa.shape[-1]
        o = offset[l]
        a[l, ..., o : o + r] = pa
        for s0, s1, d0 in p.cols:
            b[l, o : o + r, d0 : d0 + s1 - s0] = pb[:, s0:s1] * (float(p.fields["alpha"]) / r)
        offset[l] += r
    dtype = np.result_type(*[p.fields["a"].dtype for p in parts])
    fields = {
        "a": (a if stacked else a[0]).astype(dtype),
        "b": (b if stacked else b[0]).astype(dtype),
        "alpha": np.full((n_layers,), float(R), np.float32) if stacked else float(R),
    }
    return Placement(first.record, first.path, "lora", fields)


def _suggest(path: Path, index: ShapeIndex) -> str:
    """Which part of a missing path the params tree does have."""
    for depth in range(len(path) - 1, 0, -1):
        have = sorted({p[depth] for p in index if p[:depth] == path[:depth] and len(p) > depth})
        if have:
            return f"{'/'.join(path[:depth])} has {have[:8]}{' ...' if len(have) > 8 else ''}, not {path[depth]!r}"
    return f"no {path[0]!r} at the top of the params tree"


def _resolve_module(fmt: engine.Format, rec: Record, table: Mapping[str, str | None], context: Mapping) -> tuple[str | None, str]:
    """The module name of a record in the target's naming (None and a reason if it has none)."""
    module = rec.module
    if fmt.rename is not None:
        module = fmt.rename(rec.component, module, context)
    if fmt.underscored is not True and rec.component not in (fmt.underscored or ()):
        return module, ""
    resolved = table.get(module)
    if resolved is None:
        why = "matches several modules" if module in table else "matches no module"
        return None, f"{module!r} (from {fmt.name} name {rec.module!r}) {why} of {rec.component}"
    return resolved, ""


def convert(
    tensors: Mapping[str, np.ndarray],
    header: Mapping[str, str],
    targets: Mapping[str, ShapeIndex],
    *,
    default_component: str | None = None,
    format: str | None = None,
    schemes: Mapping[str, str | NamingScheme] | str | NamingScheme | None = None,
    strict: bool = True,
    origin: str = "<state dict>",
    family: str | None = None,
) -> tuple[dict[str, list[Placement]], LoadReport]:
    """Place the LoRA in `tensors` onto the components in `targets` (component -> shape index).

    `family`: the model family the caller named; it decides between formats whose keys are the same.

    Raises:
      UnsupportedFormatError: no (or ambiguous) format, or no tensors.
      KeyMismatchError: strict mode and some keys are unknown or name missing modules.
      ShapeMismatchError: factors do not fit the weight they name.
      InvalidAdapterError: incomplete or inconsistent modules.
    """
    if not tensors:
        raise UnsupportedFormatError(f"{origin}: holds no tensors.")
    key = plans.signature(tensors, header, targets, default_component=default_component, format=format,
                          schemes=schemes, strict=strict, family=family)
    replayed = plans.replay(key, tensors)
    if replayed is not None:
        placements, report = replayed
        report.origin = origin
        _check_leftovers(report, strict)  # strict=False: the warning the first conversion gave
        return placements, report
    placements, report = _convert_fresh(tensors, header, targets, default_component, format, schemes, strict, origin,
                                        family)
    plans.keep(key, tensors, placements, report)
    return placements, report


def _convert_fresh(tensors, header, targets, default_component, format, schemes, strict, origin, family):
    resolved, tables = _schemes_and_tables(targets, schemes)
    fmt = engine.get_format(format) if format else engine.detect_format(tensors.keys(), origin, modules=_modules(tables),
                                                                         family=family)
    malformed: dict[str, str] | None = None if strict else {}
    records, unmatched = engine.build_records(fmt, tensors, malformed)
    if not records:
        why = "".join(f"\n  {k}: {e}" for k, e in list((malformed or {}).items())[:12])
        raise UnsupportedFormatError(f"{origin}: format {fmt.name} recognised but no complete LoRA module found.{why}")
    metadata = peft.parse_metadata(header, origin)
    if not metadata and fmt.header_config is not None:
        metadata = dict(fmt.header_config(header, frozenset(tensors), origin))
    report = LoadReport(origin=origin, format=fmt.name, unmatched=list(unmatched), metadata=metadata,
                        malformed=malformed if malformed is not None else {},
                        also_read_as=[] if format else engine.shared_with(tensors.keys(), fmt))
    records = _assign_components(records, targets, default_component, origin)
    if fmt.redundant is not None:
        report.redundant = fmt.redundant(records, None if strict else report.malformed)
        records = [rec for rec in records if not set(rec.keys) & (report.redundant.keys() | report.malformed.keys())]
    if fmt.split is not None:
        records = [piece for rec in records for piece in _per_module(strict, report, rec, fmt.split, rec) or []]

    placements: dict[str, list[Placement]] = {c: [] for c in targets}
    report.schemes = {c: s.name for c, s in resolved.items()}
    contexts = {c: fmt.context(tables[c]) if fmt.context else {} for c in targets}
    seen: dict[tuple[str, Path], str] = {}
    for rec in records:
        if rec.component not in targets:
            report.skipped.update({k: rec.component for k in rec.keys})
            continue
        index, scheme = targets[rec.component], resolved[rec.component]
        module, why = _resolve_module(fmt, rec, tables[rec.component], contexts[rec.component])
        if module is None:
            report.unplaced.update({k: why for k in rec.keys})
            continue
        got = _per_module(strict, report, rec, _alpha_and_place, rec, module, index, scheme, metadata, origin)
        if got is None:
            continue
        placed, why = got
        if not placed:
            report.unplaced.update({k: why for k in rec.keys})
            continue
        if _per_module(strict, report, rec, _check_duplicates, rec, placed, seen, origin) is None:
            continue
        for p in placed:
            seen[_slot(rec, p)] = ", ".join(rec.keys)
            placements[rec.component].append(p)
            where = "/".join(p.path) + (f"[{p.layer}]" if p.layer is not None else "")
            if p.cols:
                where += "[:, " + ", ".join(f"{d0}:{d0 + s1 - s0}" for s0, s1, d0 in p.cols) + "]"
            report.placed.append(PlacedModule(rec.component, module, where, rec.keys, rec.rank, p.alpha, p.leaf,
                                              algorithm(rec)))
    for component, items in placements.items():
        items = [p for p in items if not set(p.record.keys) & set(report.malformed)]  # a fused piece failed
        whole = [p for p in items if not p.is_part]
        parts: dict[Path, list[Placement]] = {}
        for p in items:
            if p.is_part:
                parts.setdefault(p.path, []).append(p)
        merged = [_per_module(strict, report, ps[0].record, merge_parts, ps, targets[component][path][0],
                              keys=[k for p in ps for k in p.record.keys]) for path, ps in parts.items()]
        placements[component] = whole + [m for m in merged if m is not None]
    if report.malformed:
        report.placed = [p for p in report.placed if not set(p.keys) & set(report.malformed)]
    if not report.placed and not report.unplaced and report.skipped:
        found = sorted(set(report.skipped.values()))
        raise KeyMismatchError(
            f"{origin}: the LoRA is for components {found} but params were given for {sorted(targets)}; "
            f"pass those components' params (e.g. component={found[0]!r})."
        )
    _check_leftovers(report, strict, records, targets)
    return placements, report


_MODULE_ERRORS = engine.MODULE_ERRORS + (UnsupportedFormatError,)


def _per_module(strict: bool, report: LoadReport, rec: Record, fn, *args, keys=None):
    """`fn(*args)`; with `strict=False`, None when it fails on this one module, whose keys (or `keys`) are
    then listed in `report.malformed` with the error's message."""
    try:
        return fn(*args)
    except _MODULE_ERRORS as e:
        if strict:
            raise
        report.malformed.update({k: str(e) for k in (keys or rec.keys)})
        return None


def _alpha_and_place(rec: Record, module: str, index: ShapeIndex, scheme: NamingScheme, metadata, origin):
    alpha = peft.resolve_alpha(dataclasses.replace(rec, module=module), peft.component_config(metadata, rec.component), origin)
    return _place(rec, module, index, scheme, alpha)


def _slot(rec: Record, p: Placement) -> tuple:
    return (rec.component, p.path, p.layer, tuple(d0 for _, _, d0 in p.cols))


def _check_duplicates(rec: Record, placed: list[Placement], seen: Mapping[tuple, str], origin: str) -> bool:
    for p in placed:
        if _slot(rec, p) in seen:
            raise InvalidAdapterError(
                f"{origin}: {seen[_slot(rec, p)]!r} and {', '.join(rec.keys)!r} both target {rec.component}:{'/'.join(p.path)} "
                "(duplicate targets after renaming)."
            )
    return True


def _looks_like(records: list[Record], targets: Mapping[str, ShapeIndex], report: LoadReport) -> str:
    family = guess_family(records)
    components = sorted({r.component for r in records if r.component})
    what = f"the file looks like a {family} LoRA" if family else "the file's family is unclear"
    return f"{what} (format {report.format}, components {components}; params given for {sorted(targets)})"


def _check_leftovers(report: LoadReport, strict: bool, records=(), targets=None) -> None:
    problems = [f"{k} (no rule of format {report.format} reads it)" for k in report.unmatched]
    problems += [f"{k} ({why})" for k, why in report.unplaced.items()]
    problems += [f"{k} (malformed: {why})" for k, why in report.malformed.items()]
    if not problems:
        return
    listing = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
    if strict:
        raise KeyMismatchError(
            f"{report.origin}: {len(problems)} keys cannot be loaded:\n  {listing}\n"
            f"{_looks_like(list(records), targets or {}, report)}. Check that the LoRA matches this model "
            "and family; pass strict=False to load the rest (the keys are then listed in the report)."
        )
    warnings.warn(f"{report.origin}: {len(problems)} keys not loaded (strict=False):\n  {listing}", stacklevel=3)
