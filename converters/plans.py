"""Conversion plans: a conversion replayed for a file of the same structure.

Files from one trainer share their keys, shapes and dtypes; a server swapping such LoRAs converts
the same structure again and again. At the second conversion of a signature (see `signature`) whose
every LoRA tensor is a view of one source tensor (renames, transposes and reshapes: what PEFT, kohya
and most DiT files need), the result is kept as a plan: the records and placements with each array
replaced by where it lies in its source tensor. A later conversion with that signature binds the plan
to the new file's tensors instead of running the rule tables again; a file loaded once costs no plan.

The signature holds everything a conversion reads apart from the values of large tensors, which
conversions only move: the keys, shapes and dtypes of every tensor, the values of small ones
(alphas and other scalars), a digest of the header, the target trees' shapes and dtypes, the options, and the
registered formats and naming schemes. Conversions that compute arrays (Tucker cores, LyCORIS
products, fused or stacked pieces merged), leave modules out as malformed, or read tensors that
are not dense numpy arrays are not kept.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import dataclasses
import json
import threading
from typing import Any, Mapping

import numpy as np

from converters import engine
from converters.naming import naming_schemes
from converters.records import Placement, Record

SMALL = 64  # tensors of at most this many elements enter the signature by value
SLOTS = 8  # plans kept, the most recently used
_KINDS = frozenset({"lora", "dora"})  # leaf kinds whose fields are views of the file's tensors
_PLAIN = (str, int, float, bool, type(None), np.generic)

_plans: collections.OrderedDict = collections.OrderedDict()
_seen: collections.OrderedDict = collections.OrderedDict()  # signatures converted once, not kept yet
_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class _View:
    """How an array is rebuilt from the source tensor `key`: `tensor.reshape(shape).transpose(perm)` when
    `perm` is set (the reshapes and transposes layout rules make), else
    `np.ndarray(shape, dtype, buffer=tensor, offset, strides)`."""

    key: str
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: np.dtype
    perm: tuple[int, ...] | None = None

    def bind(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        t = tensors[self.key]
        if self.perm is not None:
            return t.reshape(self.shape).transpose(self.perm)
        return np.ndarray(self.shape, self.dtype, buffer=t, offset=self.offset, strides=self.strides)


def _permuted(key: str, source: np.ndarray, x: np.ndarray) -> _View | None:
    """`x` as `source.reshape(shape).transpose(perm)` (every layout rule's transpose or reshape of a whole
    tensor), checked to give exactly its shape and strides; None when it is no such view."""
    if x.size != source.size or x.dtype != source.dtype:
        return None
    shape, strides = x.shape, x.strides
    if shape == source.shape and strides == source.strides:
        return _View(key, 0, shape, strides, x.dtype, tuple(range(x.ndim)))
    if shape == source.shape[::-1] and strides == source.strides[::-1]:  # the common transpose
        return _View(key, 0, source.shape, strides, x.dtype, tuple(range(x.ndim - 1, -1, -1)))
    order = sorted(range(x.ndim), key=x.strides.__getitem__, reverse=True)  # the axes in memory order
    shape = tuple(x.shape[i] for i in order)
    perm = tuple(order.index(i) for i in range(x.ndim))
    y = source.reshape(shape).transpose(perm)
    if y.shape == x.shape and y.strides == x.strides:
        return _View(key, 0, shape, x.strides, x.dtype, perm)
    return None


class _Key:
    """A signature with its hash computed once (it is looked up, moved and stored)."""

    __slots__ = ("value", "hash")

    def __init__(self, value: tuple):
        self.value, self.hash = value, hash(value)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other) -> bool:
        return isinstance(other, _Key) and self.hash == other.hash and self.value == other.value


@dataclasses.dataclass(frozen=True)
class _Plan:
    records: tuple[Record, ...]  # tensors as `_View`s
    placements: dict[str, tuple[tuple[int, Placement], ...]]  # component -> (record index, placement with `_View`s)
    report: Any
    registries: tuple  # the formats and schemes the key names by id, kept alive with it


def _registries() -> tuple:
    return tuple(engine.formats().values()) + tuple(naming_schemes().values())


def _frozen(value):
    """A hashable stand-in for an option or header value (TypeError when there is none)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    hash(value)
    return value


def signature(tensors: Mapping[str, Any], header: Mapping[str, Any], targets: Mapping[str, Mapping], **options) -> _Key | None:
    """The key a conversion's plan is kept under, or None when the conversion cannot be replayed."""
    entries = []
    for key, value in tensors.items():
        if type(value) is not np.ndarray or not value.flags.c_contiguous:
            return None
        entries.append((key, value.shape, value.dtype, value.tobytes() if value.size <= SMALL else None))
    try:
        head = hashlib.blake2b(json.dumps(sorted(header.items()), sort_keys=True).encode("utf-8")).digest()
        shapes = tuple((c, tuple(index.items())) for c, index in targets.items())
        return _Key((tuple(entries), head, shapes, _frozen(options), tuple(id(r) for r in _registries())))
    except (TypeError, ValueError):
        return None


def replay(key: _Key | None, tensors: Mapping[str, np.ndarray]):
    """`(placements, report)` of the plan kept under `key`, bound to `tensors`; None when there is none.
    The report is a copy the caller may change (its `origin` is the first file's)."""
    if key is None:
        return None
    with _lock:
        plan = _plans.get(key)
        if plan is None:
            return None
        _plans.move_to_end(key)
    records = [Record(r.component, r.module, r.kind, {role: v.bind(tensors) for role, v in r.tensors.items()},
                      r.sources, r.alpha) for r in plan.records]
    placements = {
        c: [Placement(records[i], p.path, p.leaf, {f: v.bind(tensors) if isinstance(v, _View) else v
                                                  for f, v in p.fields.items()}, p.layer, p.cols)
            for i, p in items]
        for c, items in plan.placements.items()
    }
    r = plan.report
    report = dataclasses.replace(
        r, schemes=dict(r.schemes), placed=list(r.placed), unmatched=list(r.unmatched), unplaced=dict(r.unplaced),
        skipped=dict(r.skipped), metadata=copy.deepcopy(r.metadata), malformed={}, outside_prefix=[],
        also_read_as=list(r.also_read_as), redundant=dict(r.redundant))
    return placements, report


def keep(key: _Key | None, tensors: Mapping[str, np.ndarray], placements: Mapping[str, list[Placement]], report) -> None:
    """Keep the plan of a finished conversion under `key`, when every array it holds is a view of one tensor
    of `tensors` (else nothing is kept). A signature's first conversion only marks it seen; its second one
    makes the plan."""
    if key is None or report.malformed:
        return
    with _lock:  # a plan is made at a structure's second conversion: a file loaded once costs no plan
        first = key not in _seen
        _seen[key] = None
        _seen.move_to_end(key)
        while len(_seen) > 4 * SLOTS:
            _seen.popitem(last=False)
    if first:
        return
    locate = _locator(tensors)
    records: dict[int, tuple[int, Record]] = {}
    kept: dict[str, list] = {}
    for component, items in placements.items():
        out = kept.setdefault(component, [])
        for p in items:
            if p.leaf not in _KINDS:
                return
            rec = p.record
            if id(rec) not in records:
                views = {role: locate(t) for role, t in rec.tensors.items()}
                if any(v is None for v in views.values()) or not isinstance(rec.alpha, _PLAIN):
                    return
                records[id(rec)] = (len(records), dataclasses.replace(rec, tensors=views))
            fields = {}
            for name, value in p.fields.items():
                if isinstance(value, np.ndarray):
                    value = locate(value)
                    if value is None:
                        return
                elif not isinstance(value, _PLAIN):
                    return
                fields[name] = value
            out.append((records[id(rec)][0], Placement(None, p.path, p.leaf, fields, p.layer, p.cols)))
    plan = _Plan(
        records=tuple(r for _, r in sorted(records.values(), key=lambda x: x[0])),
        placements={c: tuple(v) for c, v in kept.items()},
        report=dataclasses.replace(report, placed=list(report.placed), metadata=copy.deepcopy(report.metadata)),
        registries=_registries(),
    )
    with _lock:
        _plans[key] = plan
        _plans.move_to_end(key)
        while len(_plans) > SLOTS:
            _plans.popitem(last=False)


def _locator(tensors: Mapping[str, np.ndarray]):
    """A function from an array to the `_View` that rebuilds it from one tensor of `tensors`, or None when it is
    not a view of exactly one of them (a computed array, or tensors sharing memory)."""
    owners: dict[int, tuple[str, np.ndarray] | None] = {}
    for key, t in tensors.items():  # a view's base is the array owning the memory it views
        base = id(t if t.base is None else t.base)
        owners[base] = None if base in owners else (key, t)

    def span_of(t: np.ndarray) -> tuple[int, int]:
        ptr = t.__array_interface__["data"][0]
        lo = ptr + sum(st * (n - 1) for st, n in zip(t.strides, t.shape) if st < 0)
        hi = ptr + sum(st * (n - 1) for st, n in zip(t.strides, t.shape) if st > 0) + t.itemsize
        return ptr, lo, hi

    def locate(x) -> _View | None:
        if type(x) is not np.ndarray or x.nbytes == 0:
            return None
        owner = owners.get(id(x if x.base is None else x.base))
        if owner is None:
            return None
        key, t = owner
        if t.base is None or (t.flags.c_contiguous and t.nbytes == getattr(t.base, "nbytes", -1)):
            view = _permuted(key, t, x)  # the owner holds exactly t's bytes: a whole-size view is t reshaped
            if view is not None:
                return view
        ptr, lo, hi = span_of(x)
        t_ptr, t_lo, t_hi = span_of(t)
        if not (t.flags.c_contiguous and t_lo <= lo and hi <= t_hi):
            return None
        return _View(key, ptr - t_ptr, x.shape, x.strides, x.dtype)

    return locate


def clear() -> None:
    """Forget every kept plan."""
    with _lock:
        _plans.clear()
        _seen.clear()
