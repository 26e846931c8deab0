"""The conversion engine: rule tables turn a flat `{key: tensor}` dict into records.

A `Format` is data: a detector and a tuple of `Rule`s. Each rule is an anchored
regex with named groups (`component`, `module`) plus the role the matched tensor
plays in its module. The engine applies the rules to every key, groups tensors by
(component, module), checks each group and resolves alpha once for all formats.
Every key is either consumed by a record or returned as unmatched; the caller's
dict is never modified.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import defaultdict
from typing import Callable, Iterable, Mapping

import numpy as np

from converters.errors import InvalidAdapterError, ShapeMismatchError, UnsupportedFormatError
from converters.records import ROLE_KINDS, Record


@dataclasses.dataclass(frozen=True)
class Rule:
    """`pattern` (anchored, named groups `component` and `module`) -> `role` of the tensor.

    `module` and `role` are templates over the match's groups (a matched role goes
    through the format's `roles` table, e.g. `lora_down.weight` -> `down`);
    `component` maps the matched prefix through the format's `components` table.
    """

    pattern: str
    role: str
    module: str = "{module}"

    @property
    def regex(self) -> re.Pattern:
        return _compile(self.pattern)


@dataclasses.dataclass(frozen=True)
class Format:
    """A LoRA file format: how to recognise it and how to read its keys.

    `underscored`: module names have dots replaced by underscores and are resolved
    against the target's modules (True, or the set of components where they are).
    `split(record)`: records in another model's naming -> records in diffusers' naming
    (e.g. one fused qkv LoRA -> to_q, to_k, to_v with the up rows split).
    `supersedes`: names of more generic formats whose detectors also accept this
    format's files; when both detect a file, this one is taken. `context(modules)` computes, once per component,
    what `rename(component, module, context)` needs (e.g. the UNet's layers per block).
    `header_config(header, keys, origin)`: LoraConfig fields (e.g. `lora_alpha`) the format reads from the file's
    other header entries when it has no `lora_adapter_metadata`.
    """

    name: str
    rules: tuple[Rule, ...]
    detect: Callable[[frozenset[str]], bool]
    components: Mapping[str | None, str | None] = dataclasses.field(default_factory=dict)
    roles: Mapping[str, str] = dataclasses.field(default_factory=dict)
    underscored: bool | frozenset[str] = False
    split: Callable[[Record], list[Record]] | None = None
    supersedes: tuple[str, ...] = ()
    context: Callable[[Mapping[str, str | None]], Mapping] | None = None
    rename: Callable[[str | None, str, Mapping], str] | None = None
    description: str = ""
    header_config: Callable[[Mapping[str, str], frozenset[str], str], Mapping] | None = None
    # Also claims `keys` when the target's diffusers module names (`modules`) show its model, for key
    # names that several model families share (Flux.1 and Flux.2 BFL names); None: keys alone decide.
    # `modules` is None when the caller named one of `families` (`family="z_image"`): the model is known.
    detect_for: Callable[[frozenset[str], frozenset[str] | None], bool] | None = None
    families: tuple[str, ...] = ()
    # `redundant(records, malformed)`: {key: why} of records that repeat others of the same file (a fused qkv next
    # to the split to_q/to_k/to_v it duplicates); they are left out and listed in `LoadReport.redundant`. A
    # repeat that is ambiguous raises, or with `malformed` given (strict=False) goes there.
    redundant: Callable[[list[Record], dict[str, str] | None], dict[str, str]] | None = None


_FORMATS: dict[str, Format] = {}
_compiled: dict[str, re.Pattern] = {}


def _compile(pattern: str) -> re.Pattern:
    if pattern not in _compiled:
        _compiled[pattern] = re.compile(pattern)
    return _compiled[pattern]


def register_format(fmt: Format) -> Format:
    """Add a format to the detection registry (later registrations with the same name replace it)."""
    _FORMATS[fmt.name] = fmt
    return fmt


def formats() -> dict[str, Format]:
    """The registered formats by name."""
    return dict(_FORMATS)


def _claims(f: Format, keys: frozenset[str], modules: frozenset[str] | None, family: str | None) -> bool:
    if f.detect(keys):
        return True
    if f.detect_for is None:
        return False
    if family is not None and family in f.families:
        return f.detect_for(keys, None)
    return modules is not None and f.detect_for(keys, modules)


def matching_formats(keys: Iterable[str], modules: Iterable[str] | None = None, family: str | None = None) -> list[Format]:
    """The registered formats that claim these keys, after `supersedes` is applied.

    `modules`: the diffusers module names of the target model, when known; `family`: the model family the
    caller named (see `Format.detect_for`, `Format.families`).

    >>> [f.name for f in matching_formats(["diffusion_model.layers.0.feed_forward.w1.lora_A.weight"], family="z_image")]
    ['z_image']
    """
    keys = frozenset(keys)
    mods = None if modules is None else frozenset(modules)
    hits = [f for f in _FORMATS.values() if _claims(f, keys, mods, family)]
    return [f for f in hits if not any(f.name in g.supersedes for g in hits)]


def detect_format(keys: Iterable[str], origin: str = "<state dict>", modules: Iterable[str] | None = None,
                  family: str | None = None) -> Format:
    """The one registered format whose detector accepts these keys (and, if given, the target's `modules` or the
    named `family`).

    Raises:
      UnsupportedFormatError: no format or more than one format matches.
    """
    keys = frozenset(keys)
    hits = matching_formats(keys, modules, family)
    if len(hits) == 1:
        return hits[0]
    sample = sorted(keys)[:5]
    if not hits:
        raise UnsupportedFormatError(
            f"{origin}: no LoRA format recognised in {len(keys)} keys (first: {sample}). "
            f"Known formats: {sorted(_FORMATS)}. Is this a LoRA file?"
        )
    raise UnsupportedFormatError(
        f"{origin}: keys match several formats {[f.name for f in hits]}; pass format= to choose one."
    )


def shared_with(keys: Iterable[str], chosen: Format) -> list[str]:
    """Formats other than `chosen` that would read these keys for a named family (`family=`): the keys alone
    do not decide between them, so the report names them with the family that picks each.

    >>> shared_with(["diffusion_model.layers.0.feed_forward.w1.lora_A.weight"], get_format("lumina2"))
    ["z_image (family='z_image')"]
    """
    keys = frozenset(keys)
    out = []
    for f in _FORMATS.values():
        if f.name == chosen.name or f.name in chosen.supersedes or f.detect_for is None or not f.families:
            continue
        if f.detect_for(keys, None):
            out.append(f"{f.name} (family={f.families[0]!r})")
    return out


def get_format(name: str) -> Format:
    if name not in _FORMATS:
        raise UnsupportedFormatError(f"unknown format {name!r}; known formats: {sorted(_FORMATS)}.")
    return _FORMATS[name]


def _required_literals(pattern: str) -> tuple[str, ...]:
    """Literal runs (of 3 or more characters) that every match of `pattern` contains: those of its top-level
    sequence, groups included; () when the pattern cannot be read that way (case-insensitive parts, a parser
    this Python does not have). A key without one of them cannot match, so its regex is not run."""
    try:
        from re import _constants as sre, _parser
        parsed = _parser.parse(pattern)
    except Exception:  # noqa: BLE001 - only an optimisation: without it every regex is run
        return ()
    if parsed.state.flags & re.IGNORECASE:
        return ()
    runs, current = [], []

    def flush():
        if len(current) >= 3:
            runs.append("".join(current))
        current.clear()

    def walk(items) -> bool:
        for op, arg in items:
            if op is sre.LITERAL:
                current.append(chr(arg))
            elif op is sre.SUBPATTERN:
                if arg[1] & re.IGNORECASE:
                    return False
                if not walk(arg[3]):
                    return False
            else:
                flush()
        return True

    if not walk(parsed.data):
        return ()
    flush()
    return tuple(runs)


@functools.lru_cache(maxsize=None)
def _compiled_rules(rules: tuple[Rule, ...]) -> tuple[tuple[Rule, re.Pattern, tuple[str, ...]], ...]:
    """Each rule with its compiled regex and `_required_literals`."""
    return tuple((rule, rule.regex, _required_literals(rule.pattern)) for rule in rules)


def match_keys(
    fmt: Format, keys: Iterable[str], malformed: dict[str, str] | None = None
) -> tuple[dict[tuple[str, str], dict[str, str]], list[str]]:
    """Map keys to `{(component, module): {role: key}}`; return it and the unmatched keys.

    `malformed`: when given, a module with two keys for one tensor is left out and its keys are mapped to
    the error's message instead of raising it.
    """
    groups: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    doubled: dict[tuple[str, str], str] = {}
    unmatched: list[str] = []
    compiled = _compiled_rules(fmt.rules)
    for key in sorted(keys):
        hits = [(rule, m) for rule, regex, needed in compiled
                if all(lit in key for lit in needed) and (m := regex.fullmatch(key))]
        if not hits:
            unmatched.append(key)
            continue
        if len(hits) > 1:
            raise UnsupportedFormatError(
                f"key {key!r} matches {len(hits)} rules of format {fmt.name!r} "
                f"({[r.role for r, _ in hits]}); the rule table is ambiguous."
            )
        rule, m = hits[0]
        found = m.groupdict()
        component = fmt.components.get(found.get("component"), found.get("component"))
        values = {k: v for k, v in found.items() if v is not None}
        module = rule.module.format(**values)
        role = rule.role.format(**values)
        role = fmt.roles.get(role, role)
        if role not in ROLE_KINDS:
            raise UnsupportedFormatError(f"format {fmt.name!r}: rule for {key!r} gives unknown role {role!r}.")
        slot = groups[(component, module)]
        if role in slot:
            error = InvalidAdapterError(
                f"keys {slot[role]!r} and {key!r} both give the {role!r} tensor of "
                f"{component}.{module}; the file holds duplicate targets."
            )
            if malformed is None:
                raise error
            malformed[key] = doubled[(component, module)] = str(error)
            continue
        slot[role] = key
    for group, message in doubled.items():
        malformed.update({k: message for k in groups.pop(group).values()})
    return dict(groups), unmatched


_F32_MAX = float(np.finfo(np.float32).max)
_FLOATS = {"float16", "float32", "float64", "bfloat16", "float8_e4m3fn", "float8_e5m2"}


def _alpha_value(key: str, tensor: np.ndarray) -> float:
    arr = np.asarray(tensor)
    if arr.size != 1:
        raise InvalidAdapterError(f"{key}: alpha must be a scalar, got shape {arr.shape}.")
    if arr.dtype.kind not in "iuf" and str(arr.dtype) not in _FLOATS:
        raise InvalidAdapterError(f"{key}: alpha must be a real number, got dtype {arr.dtype}.")
    value = float(arr.reshape(()).astype(np.float64))
    if not math.isfinite(value) or abs(value) > _F32_MAX:
        raise InvalidAdapterError(f"{key}: alpha is {value}; it must be finite within float32 range.")
    return value


def _kind(where: str, roles: Mapping[str, str]) -> str:
    kinds = {ROLE_KINDS[r] for r in roles} - {None}
    if len(kinds) > 1:
        raise InvalidAdapterError(f"{where}: keys mix adapter kinds {sorted(kinds)}: {sorted(roles.values())}.")
    if "dora_scale" in roles and (not kinds or kinds - {"lora", "loha", "lokr"}):
        raise InvalidAdapterError(f"{where}: dora_scale goes with LoRA, LoHa or LoKr factors, not {sorted(kinds) or 'none'}: "
                                  f"{sorted(roles.values())}.")
    if kinds:
        return kinds.pop()
    if "up_bias" in roles or "diff_b" in roles:
        return "bias"
    return "alpha"


def _need(where: str, roles: Mapping[str, str], *groups: tuple[str, ...]) -> None:
    for options in groups:
        if not any(o in roles for o in options):
            have = ", ".join(f"{r}={roles[r]!r}" for r in sorted(roles))
            raise InvalidAdapterError(f"{where}: module has no {' or '.join(options)!r} tensor (found {have}).")


# ndims each role may have (LoKr factors may be conv-shaped; diffs follow their weight).
_NDIMS = {
    "down": (2, 4, 5), "up": (2, 4, 5), "mid": (4,), "magnitude": (1, 2, 4), "dora_scale": (1, 2, 4),
    "w1a": (2,), "w1b": (2,), "w2a": (2,), "w2b": (2,), "t1": (4,), "t2": (4,),
    "lokr_w1": (2,), "lokr_w1a": (2,), "lokr_w1b": (2,), "lokr_w2": (2, 4), "lokr_w2a": (2,), "lokr_w2b": (2, 4),
    "lokr_t2": (4,), "diff": (1, 2, 4, 5), "set": (1, 2, 4, 5), "diff_b": (1,), "up_bias": (1,),
    "ia3_w": (1, 3, 4, 5), "glora_a1": (2, 4), "glora_a2": (2, 4), "glora_b1": (2, 4), "glora_b2": (2, 4),
    "glora_bm": (4,), "oft_blocks": (3, 4), "rescale": (1, 2, 4, 5),
    "tlora_q": (2, 4, 5), "tlora_p": (2, 4, 5), "tlora_lambda": (1, 2),
}
_NOT_FLOAT = ("alpha", "on_input")  # scalars read by value


@functools.lru_cache(maxsize=64)
def _is_float(dtype: np.dtype) -> bool:
    return str(dtype) in _FLOATS


def _check_floats(roles: Mapping[str, str], tensors: Mapping[str, np.ndarray]) -> None:
    for role, key in roles.items():
        if role in _NOT_FLOAT:
            continue
        t = tensors[key]
        if not _is_float(t.dtype):
            raise InvalidAdapterError(f"{key}: tensor has dtype {t.dtype}, expected one of {sorted(_FLOATS)}.")
        if t.size == 0:
            raise InvalidAdapterError(f"{key}: tensor is empty (shape {tuple(t.shape)}).")
        if t.ndim not in _NDIMS[role]:
            raise InvalidAdapterError(
                f"{key}: a {role!r} tensor must have {' or '.join(map(str, _NDIMS[role]))} dims, got shape {tuple(t.shape)}."
            )


def _check_lora(where: str, roles: Mapping[str, str], tensors: Mapping[str, np.ndarray]) -> None:
    _need(where, roles, ("down",), ("up",))
    down, up = tensors[roles["down"]], tensors[roles["up"]]
    r = down.shape[0]
    if up.shape[1] != r:
        raise InvalidAdapterError(
            f"{where}: rank mismatch, {roles['down']} has shape {tuple(down.shape)} (rank {r}) but "
            f"{roles['up']} has shape {tuple(up.shape)} (rank {up.shape[1]})."
        )
    if up.ndim > 2 and any(n != 1 for n in up.shape[2:]):
        raise InvalidAdapterError(f"{roles['up']}: conv LoRA up factor must be 1x1, got shape {tuple(up.shape)}.")
    if up.ndim > 2 and up.ndim != down.ndim:
        raise InvalidAdapterError(
            f"{where}: conv factors {roles['down']} {tuple(down.shape)} and {roles['up']} {tuple(up.shape)} differ in rank."
        )
    if "mid" in roles:
        mid = tensors[roles["mid"]]
        if mid.ndim != 4 or mid.shape[:2] != (r, r) or down.ndim != 4 or down.shape[2:] != (1, 1):
            raise InvalidAdapterError(
                f"{roles['mid']}: Tucker mid {tuple(mid.shape)} must be (rank, rank, kh, kw) = ({r}, {r}, ., .) "
                f"with a 1x1 down factor, got down {tuple(down.shape)}."
            )


def _check_loha(where: str, roles: Mapping[str, str], tensors: Mapping[str, np.ndarray]) -> None:
    _need(where, roles, ("w1a",), ("w1b",), ("w2a",), ("w2b",))
    t = {r: tensors[k] for r, k in roles.items()}
    if ("t1" in t) != ("t2" in t):
        raise InvalidAdapterError(f"{where}: LoHa Tucker needs both hada_t1 and hada_t2 (found {sorted(roles.values())}).")
    for i in ("1", "2"):
        a, b = t[f"w{i}a"], t[f"w{i}b"]
        tucker = f"t{i}" in t
        inner = a.shape[0] if tucker else a.shape[1]
        if inner != b.shape[0]:
            raise InvalidAdapterError(
                f"{where}: rank mismatch between {roles[f'w{i}a']} {tuple(a.shape)} and {roles[f'w{i}b']} {tuple(b.shape)}."
            )
        if tucker and t[f"t{i}"].shape[:2] != (a.shape[0], b.shape[0]):
            raise InvalidAdapterError(
                f"{roles[f't{i}']}: Tucker core {tuple(t[f't{i}'].shape)} must start with the ranks "
                f"({a.shape[0]}, {b.shape[0]}) of {roles[f'w{i}a']} and {roles[f'w{i}b']}."
            )


def _check_lokr(where: str, roles: Mapping[str, str], tensors: Mapping[str, np.ndarray]) -> None:
    _need(where, roles, ("lokr_w1", "lokr_w1a"), ("lokr_w2", "lokr_w2a"))
    for i in ("1", "2"):
        if f"lokr_w{i}a" in roles:
            _need(where, roles, (f"lokr_w{i}b",))
            a, b = tensors[roles[f"lokr_w{i}a"]], tensors[roles[f"lokr_w{i}b"]]
            tucker = f"lokr_t{i}" in roles
            inner = a.shape[0] if tucker else a.shape[-1]
            if inner != b.shape[0]:
                raise InvalidAdapterError(
                    f"{where}: LoKr factors {roles[f'lokr_w{i}a']} {tuple(a.shape)} and {roles[f'lokr_w{i}b']} "
                    f"{tuple(b.shape)} do not multiply."
                )
            if tucker and (b.ndim != 2 or tensors[roles[f"lokr_t{i}"]].shape[:2] != (a.shape[0], b.shape[0])):
                raise InvalidAdapterError(
                    f"{roles[f'lokr_t{i}']}: Tucker core {tuple(tensors[roles[f'lokr_t{i}']].shape)} must start with the "
                    f"ranks ({a.shape[0]}, {b.shape[0]}) of the 2-D factors {roles[f'lokr_w{i}a']} and {roles[f'lokr_w{i}b']}."
                )
        elif f"lokr_t{i}" in roles:
            raise InvalidAdapterError(f"{roles[f'lokr_t{i}']}: a LoKr Tucker core needs decomposed lokr_w{i}_a/_b factors.")


def _trailing_ones(t: np.ndarray) -> bool:
    return all(n == 1 for n in t.shape[2:])


def _check_ia3(where: str, roles: Mapping[str, str], tensors: Mapping[str, np.ndarray]) -> None:
    _need(where, roles, ("ia3_w",), ("on_input",))
    w, flag = tensors[roles["ia3_w"]], np.asarray(tensors[roles["on_input"]])
    if flag.size != 1 or flag.dtype.kind not in "biuf" or float(flag.reshape(())) not in (0.0, 1.0):
        raise InvalidAdapterError(f"{roles['on_input']}: IA3 on_input must be a scalar 0 or 1, got shape "
                                  f"{tuple(flag.shape)} dtype {flag.dtype}.")
    if w.ndim > 1 and (w.shape[0] != 1 or not _trailing_ones(w)):
        raise InvalidAdapterError(f"{roles['ia3_w']}: a conv IA3 weight must be (1, channels, 1, ...), got {tuple(w.shape)}.")


def _check_glora(where: str, roles: Mapping[str, str], tensors: Mapping[str, np.ndarray]) -> None:
    _need(where, roles, ("glora_a1",), ("glora_a2",), ("glora_b1",), ("glora_b2",))
    t = {r: tensors[k] for r, k in roles.items()}
    a1, a2, b1, b2 = t["glora_a1"], t["glora_a2"], t["glora_b1"], t["glora_b2"]
    shapes = ", ".join(f"{roles[r]} {tuple(t[r].shape)}" for r in sorted(t) if r.startswith("glora"))
    ok = (a1.shape[0] == a2.shape[1] and a1.shape[1] == a2.shape[0] and b1.shape[1] == b2.shape[0]
          and all(_trailing_ones(x) for x in (a1, a2, b1)))
    if "glora_bm" in t:
        bm = t["glora_bm"]
        ok = ok and b2.ndim == 4 and _trailing_ones(b2) and bm.shape[:2] == (b1.shape[1], b2.shape[0])
    if not ok:
        raise InvalidAdapterError(
            f"{where}: GLoRA factors do not chain ({shapes}); expected a1 (in, r), a2 (r, in), b1 (out, r), "
            "b2 (r, in[, kh, kw]) and an optional Tucker bm (r, r, kh, kw) with a 1x1 b2."
        )


def _check_oft(where: str, roles: Mapping[str, str], tensors: Mapping[str, np.ndarray]) -> None:
    _need(where, roles, ("oft_blocks",))
    blocks = tensors[roles["oft_blocks"]]
    if blocks.shape[-1] != blocks.shape[-2]:
        raise InvalidAdapterError(f"{roles['oft_blocks']}: OFT blocks must be square, got shape {tuple(blocks.shape)}.")
    if blocks.ndim == 4 and blocks.shape[-1] % 2:
        raise InvalidAdapterError(f"{roles['oft_blocks']}: BOFT blocks must have an even size, got shape {tuple(blocks.shape)}.")
    if "rescale" in roles:
        rescale = tensors[roles["rescale"]]
        if any(n != 1 for n in rescale.shape[1:]) or rescale.shape[0] != blocks.shape[-3] * blocks.shape[-1]:
            raise InvalidAdapterError(
                f"{roles['rescale']}: OFT rescale must be (out, 1, ...) with out = {blocks.shape[-3] * blocks.shape[-1]} "
                f"(blocks {tuple(blocks.shape)}), got {tuple(rescale.shape)}."
            )


def _check_tlora(where: str, roles: Mapping[str, str], tensors: Mapping[str, np.ndarray]) -> None:
    _need(where, roles, ("tlora_q",), ("tlora_p",), ("tlora_lambda",))
    q, p, lam = (tensors[roles[r]] for r in ("tlora_q", "tlora_p", "tlora_lambda"))
    r = q.shape[0]
    if p.shape[1] != r or lam.size != r or lam.ndim == 2 and lam.shape[0] != 1 or not (_trailing_ones(q) and _trailing_ones(p)):
        raise InvalidAdapterError(
            f"{where}: T-LoRA factors do not chain ({roles['tlora_q']} {tuple(q.shape)}, {roles['tlora_p']} "
            f"{tuple(p.shape)}, {roles['tlora_lambda']} {tuple(lam.shape)}); expected q_layer (r, in[, 1, 1]), "
            "p_layer (out, r[, 1, 1]) and lambda_layer (1, r)."
        )


_CHECKS = {"tlora": _check_tlora, "lora": _check_lora, "loha": _check_loha, "lokr": _check_lokr, "ia3": _check_ia3, "glora": _check_glora,
           "oft": _check_oft}


MODULE_ERRORS = (InvalidAdapterError, ShapeMismatchError)
"""Errors that concern one module of a file (with `strict=False` that module is reported, the rest loads)."""


def build_records(
    fmt: Format, tensors: Mapping[str, np.ndarray], malformed: dict[str, str] | None = None
) -> tuple[list[Record], list[str]]:
    """Run `fmt`'s rules over `tensors`; return the records and the keys no rule matched.

    `malformed`: when given, a module whose tensors fail the checks (missing up/down, ranks that do not
    chain, bad dtypes, a bad alpha) is left out and each of its keys is mapped to the error's message;
    otherwise that error is raised.
    """
    groups, unmatched = match_keys(fmt, tensors.keys(), malformed)
    records = []
    for (component, module), roles in sorted(groups.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        where = f"{component}.{module}" if component else module
        try:
            kind = _kind(where, roles)
            if kind == "alpha":
                unmatched.append(roles["alpha"])
                continue
            _check_floats(roles, tensors)
            if kind in _CHECKS:
                _CHECKS[kind](where, roles, tensors)
            alpha = _alpha_value(roles["alpha"], tensors[roles["alpha"]]) if "alpha" in roles else None
        except MODULE_ERRORS as e:
            if malformed is None:
                raise
            malformed.update({k: str(e) for k in roles.values()})
            continue
        records.append(
            Record(
                component=component,
                module=module,
                kind=kind,
                tensors={role: tensors[k] for role, k in roles.items() if role != "alpha"},
                sources=dict(roles),
                alpha=alpha,
            )
        )
    return records, sorted(unmatched)
