"""diffusers / PEFT format: `{component}.{module}.lora_A.weight`, `lora_B.weight`, `.alpha`.

Rank and alpha come from the header's `lora_adapter_metadata` (PEFT `LoraConfig`
fields prefixed by component, incl. `rank_pattern`, `alpha_pattern`,
`use_rslora`) when present; else from `.alpha` keys; else alpha = rank.
"""

from __future__ import annotations

import json
import math
import re
from typing import Mapping

from converters.engine import Format, Rule, register_format
from converters.records import Record
from converters.errors import CorruptFileError, InvalidAdapterError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "transformer_2", "prior")
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


def _number(value, field: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidAdapterError(
            f"{where}: lora_adapter_metadata field {field!r} must be a finite number, got {value!r}."
        )
    return float(value)


def _pattern_value(pattern, module: str, field: str, where: str):
    """PEFT's rule: the first pattern key that matches a dotted suffix of the module name."""
    if pattern is None:
        return None
    if not isinstance(pattern, Mapping):
        raise InvalidAdapterError(f"{where}: lora_adapter_metadata field {field!r} must be an object, got {pattern!r}.")
    for key, value in pattern.items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", module)
        except (re.error, TypeError) as e:
            raise InvalidAdapterError(f"{where}: {field} key {key!r} is not a valid pattern ({e}).") from None
        if hit:
            return _number(value, f"{field}[{key!r}]", where)
    return None


def resolve_alpha(record: Record, config: Mapping, origin: str = "<state dict>") -> float | None:
    """Effective alpha of one module such that alpha / rank is PEFT's scaling.

    Returns None (alpha = rank) when neither the config nor the file gives an alpha.

    Raises:
      InvalidAdapterError: a metadata field has the wrong type or a non-finite value.
    """
    if not config or record.kind not in ("lora", "bias"):
        return record.alpha
    where = f"{origin}: {record.component}.{record.module}"
    alpha = _pattern_value(config.get("alpha_pattern"), record.module, "alpha_pattern", where)
    if alpha is None:
        if config.get("lora_alpha") is not None:
            alpha = _number(config["lora_alpha"], "lora_alpha", where)
        elif record.alpha is not None:
            alpha = record.alpha
        elif config.get("r") is not None:
            alpha = _number(config["r"], "r", where)
    if alpha is None:
        return None
    if config.get("use_rslora") and record.rank:
        return alpha * math.sqrt(record.rank)  # rsLoRA scales by alpha / sqrt(r)
    return alpha
