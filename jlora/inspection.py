"""`jlora inspect` and `jlora convert`: look into LoRA files and rewrite them, no weights needed.

Both check files against the shape indexes of a family's standard models
(`converters.architectures`), so a file is validated as it would be on real params.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from typing import Any

import numpy as np

from converters import architectures, engine, read_state_dict
from converters.errors import JloraError
from converters.formats.peft import parse_metadata
from converters.guess import guess_family as _guess

def guess_family(records) -> str:
    """`sd`, `sd2` or `sdxl` (the families with standard shape indexes) from a file's records."""
    found = _guess(records)
    return found if found in architectures.FAMILY_MODELS else "sd"


def _load_against_family(path, family, tensors, header, *, strict, allow_pickle, indexes=None):
    import jlora

    indexes = dict(indexes) if indexes is not None else architectures.family_indexes(family)
    params = {c: jlora.abstract_params(idx) for c, idx in indexes.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return jlora.load_lora_weights(
            path, params, strict=strict, return_report=True, allow_pickle=allow_pickle
        )


def inspect_file(path: str, *, family: str | None = None, allow_pickle: bool = False, indexes=None) -> dict[str, Any]:
    """A summary of a LoRA file: format, components, targets, ranks, alphas, dtypes, size, unplaceable keys.

    The file is checked against `indexes` (component -> shape index, see
    `converters.architectures`) or else the family's standard models.
    """
    tensors, header, origin = read_state_dict(path, allow_pickle=allow_pickle)
    info: dict[str, Any] = {
        "file": origin,
        "size_bytes": os.path.getsize(origin) if os.path.isfile(origin) else None,
        "tensors": len(tensors),
        "parameters": int(sum(int(np.prod(t.shape)) for t in tensors.values())),
        "dtypes": dict(Counter(str(t.dtype) for t in tensors.values())),
        "has_metadata": bool(parse_metadata(header, origin)),
    }
    fmt = engine.detect_format(tensors.keys(), origin)
    records, unmatched = engine.build_records(fmt, tensors)
    info["format"] = fmt.name
    info["unmatched"] = unmatched
    family = family or guess_family(records)
    info["family"] = family
    components: dict[str, dict] = {}
    for rec in records:
        c = components.setdefault(rec.component or "?", {"modules": 0, "kinds": Counter(), "ranks": Counter(), "alphas": set()})
        c["modules"] += 1
        c["kinds"][rec.kind] += 1
        if rec.rank is not None:
            c["ranks"][rec.rank] += 1
    try:
        _, report = _load_against_family(
            origin, family, tensors, header, strict=False, allow_pickle=allow_pickle, indexes=indexes
        )
        info["targets"] = len(report.placed)
        info["unplaced"] = dict(report.unplaced)
        info["skipped"] = dict(report.skipped)
        for p in report.placed:
            if p.alpha is not None and p.component in components:
                components[p.component]["alphas"].add(p.alpha)
    except JloraError as e:
        info["targets"] = 0
        info["error"] = str(e)
    info["components"] = {
        name: {
            "modules": c["modules"],
            "kinds": dict(c["kinds"]),
            "ranks": {str(k): v for k, v in sorted(c["ranks"].items())},
            "alphas": sorted(c["alphas"]),
        }
        for name, c in sorted(components.items())
    }
    return info


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable `inspect_file` output."""
    size = f"{info['size_bytes'] / 1e6:.1f} MB" if info.get("size_bytes") else "?"
    lines = [
        f"{info['file']}",
        f"  format      {info['format']}  (checked against family {info['family']})",
        f"  size        {size}, {info['tensors']} tensors, {info['parameters']:,} parameters, dtypes {info['dtypes']}",
        f"  metadata    {'lora_adapter_metadata present' if info['has_metadata'] else 'none'}",
        f"  targets     {info['targets']} weights placed",
    ]
    for name, c in info["components"].items():
        lines.append(f"  {name:<16}{c['modules']} modules {c['kinds']}, ranks {c['ranks']}, alphas {c['alphas']}")
    problems = [(k, "no rule reads this key") for k in info["unmatched"]] + list(info.get("unplaced", {}).items())
    if info.get("error"):
        lines.append(f"  error       {info['error']}")
    if problems:
        lines.append(f"  cannot place {len(problems)} keys:")
        lines += [f"    {k}: {why}" for k, why in problems[:20]]
        if len(problems) > 20:
            lines.append(f"    ... and {len(problems) - 20} more (use --json for all)")
    return "\n".join(lines)


def convert_file(path: str, out_dir: str, *, family: str | None, to: str, strict: bool = True, allow_pickle: bool = False,
                 indexes=None) -> dict:
    """Convert one LoRA file to a diffusers/PEFT file or a jlora adapter file in `out_dir`.

    Module names and shapes are checked against `indexes` or the family's standard models.
    """
    import jlora

    tensors, header, origin = read_state_dict(path, allow_pickle=allow_pickle)
    fmt = engine.detect_format(tensors.keys(), origin)
    records, _ = engine.build_records(fmt, tensors)
    family = family or guess_family(records)
    adapters, report = _load_against_family(
        origin, family, tensors, header, strict=strict, allow_pickle=allow_pickle, indexes=indexes
    )
    stem = os.path.splitext(os.path.basename(origin))[0]
    if to == "diffusers":
        written = jlora.save_lora_weights(out_dir, adapters, weight_name=f"{stem}.safetensors")
    elif to == "flax":
        written = jlora.save_adapters(os.path.join(out_dir, f"{stem}.jlora.safetensors"), adapters)
    else:
        raise JloraError(f"--to must be 'diffusers' or 'flax', not {to!r}.")
    return {"file": origin, "output": written, "format": fmt.name, "family": family, "targets": len(report.placed),
            "unplaced": dict(report.unplaced)}


def indexes_from_configs(family: str | None, unet_config: str | None) -> dict | None:
    """Family indexes with the UNet replaced by one built from a diffusers `config.json` (or None)."""
    if unet_config is None:
        return None
    import json

    from converters.errors import ModelFileNotFoundError, UnsupportedModelError

    try:
        with open(unet_config, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ModelFileNotFoundError(f"--unet-config {unet_config}: no such file.") from None
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"--unet-config {unet_config}: not a JSON config ({type(e).__name__}: {e}).") from None
    if not isinstance(cfg, dict):
        raise UnsupportedModelError(f"--unet-config {unet_config}: not a JSON object.")
    out = architectures.family_indexes(family or "sd")
    try:
        out["unet"] = architectures.unet_index(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise UnsupportedModelError(f"--unet-config {unet_config}: not a diffusers UNet config ({type(e).__name__}: {e}).") from None
    return out
