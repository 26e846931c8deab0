"""diffusers / PEFT format: `{component}.{module}.lora_A.weight`, `lora_B.weight`, `.alpha`.

Rank and alpha come from the header's `lora_adapter_metadata` (PEFT `LoraConfig`
fields prefixed by component, incl. `rank_pattern`, `alpha_pattern`,
`use_rslora`) when present; else from `.alpha` keys; else alpha = rank.
"""

from __future__ import annotations

import json
import math
from typing import Mapping

from converters.engine import Format, Rule, register_format
from converters.records import Record
from converters.errors import CorruptFileError, InvalidAdapterError
from converters.patterns import first_match

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "transformer_2", "prior",
              "connectors", "transformer_ref", "text_conditioner")
METADATA_KEY = "lora_adapter_metadata"

_PREFIX = r"(?:(?P<component>" + "|".join(COMPONENTS) + r")\.)?(?:base_model\.model\.)?"
_ADAPTER = r"(?:\.[A-Za-z_][\w-]*)?"  # optional PEFT adapter name, e.g. lora_A.default.weight

RULES = (
    Rule(_PREFIX + r"(?P<module>.+?)\.lora_A" + _ADAPTER + r"\.weight", "down"),
    Rule(_PREFIX + r"(?P<module>.+?)\.lora_B" + _ADAPTER + r"\.weight", "up"),
    Rule(_PREFIX + r"(?P<module>.+?)\.lora_B" + _ADAPTER + r"\.bias", "up_bias"),
    Rule(_PREFIX + r"(?P<module>.+?)\.lora_magnitude_vector" + _ADAPTER + r"(?:\.weight)?", "magnitude"),
    Rule(_PREFIX + r"(?P<module>.+?)\.alpha", "alpha"),
    # Flux Control LoRAs also replace the q/k RMSNorm weights
    Rule(_PREFIX + r"(?P<module>.+?\.(?:norm_q|norm_k|norm_added_q|norm_added_k))\.weight", "set"),
)


def _detect(keys: frozenset[str]) -> bool:
    return any(".lora_A." in k or ".lora_B." in k for k in keys)


FORMAT = register_format(
    Format(name="peft", rules=RULES, detect=_detect, description="diffusers / PEFT (lora_A / lora_B)")
)


def parse_metadata(header: Mapping[str, str], origin: str = "<file>") -> dict:
    """The `lora_adapter_metadata` dict of a safetensors header ({} when absent)."""
    raw = header.get(METADATA_KEY)
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{origin}: header {METADATA_KEY!r} is not JSON ({e}).") from None
    if not isinstance(value, dict):
        raise CorruptFileError(f"{origin}: header {METADATA_KEY!r} is not a JSON object.")
    return value


def component_config(metadata: Mapping, component: str | None) -> dict:
    """The LoraConfig fields of one component (`unet.r` -> `r`); unprefixed fields apply to all."""
    plain = {k: v for k, v in metadata.items() if "." not in k}
    if component:
        prefix = f"{component}."
        plain.update({k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)})
    return plain


_FLOAT32_MAX = 3.4028234663852886e38


def _number(value, field: str, where: str) -> float:
    """A metadata number that stays finite as a float32 alpha."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        try:
            value = float(value)
        except OverflowError:
            ok = False
    if not ok or not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        shown = value if not isinstance(value, int) or value.bit_length() < 128 else f"an integer of {len(str(value))} digits"
        raise InvalidAdapterError(
            f"{where}: lora_adapter_metadata field {field!r} must be a finite number within float32 range, got {shown!r}."
        )
    return value


def _rank(value, field: str, where: str) -> float:
    """A metadata rank: an integer >= 1 (a zero rank would silently disable the LoRA)."""
    r = _number(value, field, where)
    if r < 1 or not float(r).is_integer():
        raise InvalidAdapterError(f"{where}: lora_adapter_metadata field {field!r} must be an integer >= 1, got {value!r}.")
    return r


def _pattern_value(pattern, module: str, field: str, where: str):
    """PEFT's rule: the first pattern key that matches a dotted suffix of the module name."""
    if pattern is None:
        return None
    if not isinstance(pattern, Mapping):
        raise InvalidAdapterError(f"{where}: lora_adapter_metadata field {field!r} must be an object, got {pattern!r}.")
    hit = first_match(pattern, module, field, where)
    if hit is None:
        return None
    key, value = hit
    return (_rank if field == "rank_pattern" else _number)(value, f"{field}[{key!r}]", where)


def resolve_alpha(record: Record, config: Mapping, origin: str = "<state dict>") -> float | None:
    """Effective alpha of one module such that alpha / rank is PEFT's scaling.

    Returns None (alpha = rank) when neither the config nor the file gives an alpha.

    Raises:
      InvalidAdapterError: a metadata field has the wrong type or a non-finite value.
    """
    if not config or record.kind not in ("lora", "bias"):
        return record.alpha
    where = f"{origin}: {record.component}.{record.module}"
    if config.get("r") is not None:
        _rank(config["r"], "r", where)
    alpha = _pattern_value(config.get("alpha_pattern"), record.module, "alpha_pattern", where)
    if alpha is None:
        if config.get("lora_alpha") is not None:
            alpha = _number(config["lora_alpha"], "lora_alpha", where)
        elif record.alpha is not None:
            alpha = record.alpha
        elif config.get("r") is not None:
            alpha = _rank(config["r"], "r", where)
    if alpha is None:
        return None
    if config.get("use_rslora") and record.rank:
        return alpha * math.sqrt(record.rank)  # rsLoRA scales by alpha / sqrt(r)
    return alpha
