"""`jlora inspect` and `jlora convert`: look into LoRA files and rewrite them, no weights needed.

Both check files against the shape indexes of a family's standard models
(`converters.architectures`), or of models described by config files, so a file is
validated as it would be on real params.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from typing import Any, Mapping

import numpy as np

from converters import architectures, engine, read_state_dict
from converters.convert import convert as _convert
from converters.convert import target_modules
from converters.errors import JloraError, KeyMismatchError, ModelFileNotFoundError, UnsupportedModelError
from converters.formats.peft import component_config, parse_metadata
from converters.guess import guess_family as _guess

# Formats written for one model family only: the format says the family even when the module names do not.
FORMAT_FAMILIES = {
    "kohya_flux": "flux",
    "comfy_flux": "flux",
    "bfl_flux": "flux",
    "xlabs_flux": "flux",
    "fal_kontext": "flux",
    "onetrainer_flux": "flux",
    "wan": "wan",
    "musubi_wan": "wan",
    "hunyuan_video": "hunyuan_video",
    "lumina2": "lumina2",
    "flux2": "flux2",
    "kohya_flux2": "flux2",
    "z_image": "z_image",
    "ltx2": "ltx2",
}
# kohya sd-scripts training metadata shown in the text output (all `ss_*` keys go to --json).
TRAINING_SHOWN = (
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
    "ss_sd_model_name", "ss_output_name", "ss_training_comment", "ss_resolution", "ss_num_train_images",
    "ss_num_reg_images", "ss_num_epochs", "ss_max_train_steps", "ss_learning_rate", "ss_unet_lr",
    "ss_text_encoder_lr",
)


class OutputExistsError(JloraError, FileExistsError):
    """`jlora convert` would overwrite an existing file (pass `--overwrite` / `overwrite=True`)."""


def file_family(records, format_name: str | None = None) -> str | None:
    """The family a file is for (`sd`, `sdxl`, `flux`, `wan`, ...) from its format, else its records; None if unclear."""
    return FORMAT_FAMILIES.get(format_name) or _guess(records)


def guess_family(records, format_name: str | None = None) -> str:
    """`sd`, `sd2`, `sdxl` or `flux` (the families with standard shape indexes) from a file's format and records."""
    found = file_family(records, format_name)
    return found if found in architectures.FAMILY_MODELS else "sd"


def _targets(family: str | None, indexes, overrides) -> dict:
    if indexes is not None:
        out = dict(indexes)
    elif family in architectures.FAMILY_MODELS:
        out = architectures.family_indexes(family)
    else:
        out = {}
    out.update(overrides or {})
    return out


def check_file(path: str, *, family: str | None = None, allow_pickle: bool = False, indexes=None, overrides=None) -> dict:
    """Read a LoRA file and place it on the family's (or given) shape indexes, without building adapters.

    Returns a dict with `tensors`, `header`, `origin`, `format`, `records`, `unmatched`, `family`,
    `guessed` (the family was not given), `targets` (component -> index) and `report` (a `LoadReport`,
    or None with `error` set to the `JloraError` that stopped the check).
    """
    tensors, header, origin = read_state_dict(path, allow_pickle=allow_pickle)
    fmt = engine.detect_format(tensors.keys(), origin)
    records, unmatched = engine.build_records(fmt, tensors)
    out = {"tensors": tensors, "header": header, "origin": origin, "format": fmt.name, "records": records,
           "unmatched": unmatched, "guessed": family is None, "report": None, "error": None}
    if family is None:
        found = file_family(records, fmt.name)
        family = found if found is not None else "sd"
    out["family"] = family
    targets = _targets(family, indexes, overrides)
    out["targets"] = targets
    if not targets:
        out["error"] = UnsupportedModelError(
            f"{origin}: looks like a {family} LoRA; jlora has standard shapes for {sorted(architectures.FAMILY_MODELS)} "
            "only: pass --family, or the model's configs (--unet-config, --text-encoder-config, ...)."
        )
        return out
    try:
        # Keys several families share (Flux.1 and Flux.2 BFL names, Lumina-2 and Z-Image) are read as the targets' family's.
        for_targets = engine.matching_formats(tensors.keys(), target_modules(targets), family)
        if len(for_targets) == 1 and for_targets[0].name != fmt.name:
            fmt = for_targets[0]
            out["records"], out["unmatched"] = engine.build_records(fmt, tensors)
            out["format"] = fmt.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, out["report"] = _convert(tensors, header, targets, strict=False, origin=origin, family=family)
            if out["report"].malformed:  # a module that does not fit: the typed error strict loading raises
                try:
                    _convert(tensors, header, targets, strict=True, origin=origin, family=family)
                except JloraError as e:
                    out["error"] = e
    except JloraError as e:
        out["error"] = e
    return out


def _weight_path(placed_path: str) -> str:
    return placed_path.split("[", 1)[0]


def _component_summary(records, report, metadata) -> dict[str, dict]:
    comps: dict[str, dict] = {}
    for rec in records:
        c = comps.setdefault(rec.component or "?", {"modules": 0, "kinds": Counter(), "ranks": Counter(),
                                                    "file_alphas": Counter()})
        c["modules"] += 1
        c["kinds"][rec.kind] += 1
        if rec.rank is not None:
            c["ranks"][rec.rank] += 1
        if rec.alpha is not None:
            c["file_alphas"][rec.alpha] += 1
    placed = report.placed if report is not None else []
    out = {}
    for name, c in sorted(comps.items()):
        mine = [p for p in placed if p.component == name]
        weights = {_weight_path(p.path) for p in mine}
        fused = {_weight_path(p.path) for p in mine if "[" in p.path}
        with_alpha = sum(c["file_alphas"].values())
        if with_alpha:
            source = "file" if with_alpha == c["modules"] else "file (others: alpha = rank)"
        elif any(component_config(metadata, name).get(k) for k in ("lora_alpha", "alpha_pattern")):
            source = "metadata"
        else:
            source = "none in file (alpha = rank)"
        out[name] = {
            "modules": c["modules"],
            "placed_modules": len({p.keys for p in mine}),
            "placements": len(mine),
            "weights": len(weights),
            "stacked_or_fused_weights": len(fused),
            "kinds": dict(c["kinds"]),
            "ranks": {str(k): v for k, v in sorted(c["ranks"].items())},
            "alphas": sorted({p.alpha for p in mine if p.alpha is not None}),
            "file_alphas": {str(k): v for k, v in sorted(c["file_alphas"].items())},
            "alpha_source": source,
        }
    return out


def inspect_file(path: str, *, family: str | None = None, allow_pickle: bool = False, indexes=None,
                 overrides=None, strengths: bool = False) -> dict[str, Any]:
    """A summary of a LoRA file: format, family, components, placed counts, ranks, alphas, training metadata,
    dtypes, size and the keys that cannot be placed.

    The file is checked against `indexes` (component -> shape index, see `converters.architectures`) or
    else the standard models of `family` (guessed from the format and module names when None), with
    `overrides` (component -> shape index) replacing single components. A file that does not fit has
    `error` and `error_type` set. `strengths`: add `strengths`, the `block_strengths` of the file as
    dicts (when nothing failed).

    >>> info = inspect_file("style.safetensors")  # doctest: +SKIP
    >>> info["format"], info["family"], info["components"]["unet"]["weights"]  # doctest: +SKIP
    ('kohya', 'sd', 192)
    """
    checked = check_file(path, family=family, allow_pickle=allow_pickle, indexes=indexes, overrides=overrides)
    tensors, header, origin, report = checked["tensors"], checked["header"], checked["origin"], checked["report"]
    metadata = parse_metadata(header, origin)
    info: dict[str, Any] = {
        "file": origin,
        "size_bytes": os.path.getsize(origin) if os.path.isfile(origin) else None,
        "tensors": len(tensors),
        "parameters": int(sum(int(np.prod(t.shape)) for t in tensors.values())),
        "dtypes": dict(Counter(str(t.dtype) for t in tensors.values())),
        "has_metadata": bool(metadata),
        "training": {k: header[k] for k in sorted(header) if k.startswith("ss_")},
        "format": checked["format"],
        "family": checked["family"],
        "family_guessed": checked["guessed"],
        "unmatched": checked["unmatched"],
    }
    info["targets"] = len(report.placed) if report is not None else 0
    info["weights"] = len({(p.component, _weight_path(p.path)) for p in report.placed}) if report is not None else 0
    info["unplaced"] = dict(report.unplaced) if report is not None else {}
    info["skipped"] = dict(report.skipped) if report is not None else {}
    info["malformed"] = dict(report.malformed) if report is not None else {}
    info["redundant"] = dict(report.redundant) if report is not None else {}
    info["also_read_as"] = list(report.also_read_as) if report is not None else []
    info["components"] = _component_summary(checked["records"], report, metadata)
    problems = len(info["unmatched"]) + len(info["unplaced"]) + len(info["malformed"])
    if checked["error"] is not None:
        info["error"], info["error_type"] = str(checked["error"]), type(checked["error"]).__name__
    elif problems:
        info["error"] = (
            f"{problems} of {len(tensors)} keys cannot be placed on the {checked['family']} models checked against; "
            "the file is for another model, or pass --family / the model's configs."
        )
        info["error_type"] = KeyMismatchError.__name__
    if strengths and "error" not in info:
        from jlora.plot import strengths_of

        names = ("component", "group", "module", "norm")
        info["strengths"] = [dict(zip(names, row)) for row in strengths_of(checked)]
    return info


def _short(value: str, n: int = 100) -> str:
    value = " ".join(str(value).split())
    return value if len(value) <= n else value[: n - 3] + "..."


def _component_line(name: str, c: dict) -> str:
    placed = f"{c['modules']} modules" + ("" if c["placed_modules"] == c["modules"] else f" ({c['placed_modules']} placed)")
    counts = f"{placed} -> {c['weights']} weights"
    if c["stacked_or_fused_weights"]:
        counts = (f"{placed} -> {c['placements']} module weights on {c['weights']} weights "
                  f"({c['stacked_or_fused_weights']} stacked/fused)")
    if c["alpha_source"].startswith("file"):
        alphas = f"alphas {sorted(float(a) for a in c['file_alphas'])} from .alpha tensors"
        missing = c["modules"] - sum(c["file_alphas"].values())
        if missing:
            alphas += f" ({missing} without: alpha = rank)"
    elif c["alpha_source"] == "metadata":
        alphas = f"alphas {c['alphas']} from metadata"
    else:
        alphas = "no alphas in file (alpha = rank)"
    return f"  {name:<16}{counts} {c['kinds']}, ranks {c['ranks']}, {alphas}"


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable `inspect_file` output."""
    size = f"{info['size_bytes'] / 1e6:.1f} MB" if info.get("size_bytes") else "?"
    how = "guessed" if info.get("family_guessed") else "given"
    meta = [name for name, present in (("lora_adapter_metadata", info["has_metadata"]),
                                        (f"kohya training metadata ({len(info['training'])} ss_* keys)", info["training"]))
            if present]
    lines = [
        f"{info['file']}",
        f"  format      {info['format']}  (checked against family {info['family']}, {how})",
        f"  size        {size}, {info['tensors']} tensors, {info['parameters']:,} parameters, dtypes {info['dtypes']}",
        f"  metadata    {', '.join(meta) if meta else 'none'}",
        f"  placed      {info['targets']} module weights on {info['weights']} weights",
    ]
    for key in TRAINING_SHOWN:
        if key in info["training"]:
            lines.append(f"    {key[3:]:<22}{_short(info['training'][key])}")
    for name, c in info["components"].items():
        lines.append(_component_line(name, c))
    if info.get("redundant"):
        lines.append(f"  left out   {len(info['redundant'])} keys that repeat split keys of the file (as diffusers does)")
    if info.get("also_read_as"):
        lines.append(f"  also read  as {', '.join(info['also_read_as'])}")
    if info.get("skipped"):
        comps = sorted(set(info["skipped"].values()))
        lines.append(f"  not checked {len(info['skipped'])} keys of components {comps} (no shapes for them)")
    problems = ([(k, "no rule reads this key") for k in info["unmatched"]] + list(info.get("unplaced", {}).items())
                + list(info.get("malformed", {}).items()))
    if info.get("error"):
        lines.append(f"  error       {info['error']}")
    if problems:
        lines.append(f"  cannot place {len(problems)} keys:")
        lines += [f"    {k}: {why}" for k, why in problems[:20]]
        if len(problems) > 20:
            lines.append(f"    ... and {len(problems) - 20} more (use --json for all)")
    return "\n".join(lines)


def _output_path(origin: str, out_dir: str, to: str) -> str:
    stem = os.path.splitext(os.path.basename(origin))[0]
    if to == "diffusers":
        return os.path.join(out_dir, f"{stem}.safetensors")
    if to == "flax":
        return os.path.join(out_dir, f"{stem}.jlora.safetensors")
    raise JloraError(f"--to must be 'diffusers' or 'flax', not {to!r}.")


def convert_file(path: str, out_dir: str, *, family: str | None, to: str, strict: bool = True, allow_pickle: bool = False,
                 indexes=None, overrides=None, overwrite: bool = False) -> dict:
    """Convert one LoRA file to a diffusers/PEFT file or a jlora adapter file in `out_dir`.

    Module names and shapes are checked against `indexes` or the family's standard models (with
    `overrides` replacing single components).

    Raises:
      OutputExistsError: the output file exists and `overwrite` is False.
    """
    import jlora

    tensors, header, origin = read_state_dict(path, allow_pickle=allow_pickle)
    output = _output_path(origin, out_dir, to)
    if os.path.exists(output) and not overwrite:
        raise OutputExistsError(f"{output}: exists; pass --overwrite (overwrite=True) to replace it.")
    fmt = engine.detect_format(tensors.keys(), origin)
    records, _ = engine.build_records(fmt, tensors)
    family = family or guess_family(records, fmt.name)
    targets = _targets(family, indexes, overrides)
    params = {c: jlora.abstract_params(idx) for c, idx in targets.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapters, report = jlora.load_lora_weights(
            origin, params, strict=strict, return_report=True, allow_pickle=allow_pickle
        )
    if to == "diffusers":
        written = jlora.save_lora_weights(out_dir, adapters, weight_name=os.path.basename(output))
    else:
        written = jlora.save_adapters(output, adapters)
    return {"file": origin, "output": written, "format": fmt.name, "family": family, "targets": len(report.placed),
            "unplaced": dict(report.unplaced)}


def _read_config(path: str, option: str) -> dict:
    """The config a CLI option names (a `config.json` or the folder holding one); errors name the option."""
    from converters.checkpoints import read_json_object

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        where = f"{path} has no config.json" if os.path.isdir(path) else f"{path}: no such file or folder"
        raise ModelFileNotFoundError(f"{option} {where}.")
    try:
        return read_json_object(file)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{option} {e}") from None


def clip_config_index(cfg: Mapping, projection: bool = False, dtype=np.float32) -> architectures.Index:
    """The shape index of a transformers-Flax CLIP text model for a transformers `CLIPTextConfig` dict.

    The model has a `text_projection` when the config's `architectures` name `CLIPTextModelWithProjection`,
    or, for a config without `architectures`, when `projection` is True.
    """
    text = cfg["text_config"] if isinstance(cfg.get("text_config"), Mapping) else cfg
    archs = cfg.get("architectures")
    with_projection = any("WithProjection" in str(a) for a in archs) if archs else projection
    return architectures.clip_index(
        hidden_size=int(text["hidden_size"]), intermediate_size=int(text["intermediate_size"]),
        num_hidden_layers=int(text["num_hidden_layers"]),
        projection_dim=int(text.get("projection_dim") or cfg.get("projection_dim") or 0) if with_projection else None,
        vocab_size=int(text.get("vocab_size", 49408)), max_position_embeddings=int(text.get("max_position_embeddings", 77)),
        dtype=dtype,
    )


def config_indexes(unet_config: str | None = None, text_encoder_config: str | None = None,
                   text_encoder_2_config: str | None = None) -> dict[str, architectures.Index]:
    """Shape indexes of the components described by config files or folders holding a `config.json`.

    `unet_config`: a diffusers UNet config; `text_encoder_config` / `text_encoder_2_config`: transformers
    CLIP text configs (text_encoder_2 has a projection unless its `architectures` say otherwise, as in
    SDXL). Components without a config are left out.

    >>> config_indexes(unet_config="my-model/unet")  # doctest: +SKIP
    """
    out = {}
    for component, path, option, build, what in (
        ("unet", unet_config, "--unet-config", architectures.unet_index, "a diffusers UNet config"),
        ("text_encoder", text_encoder_config, "--text-encoder-config", clip_config_index, "a transformers CLIP text config"),
        ("text_encoder_2", text_encoder_2_config, "--text-encoder-2-config",
         lambda cfg: clip_config_index(cfg, projection=True), "a transformers CLIP text config"),
    ):
        if path is None:
            continue
        cfg = _read_config(path, option)
        try:
            out[component] = build(cfg)
        except (KeyError, TypeError, ValueError) as e:
            raise UnsupportedModelError(f"{option} {path}: not {what} ({type(e).__name__}: {e}).") from None
    return out


def block_strengths(path: str, **kwargs) -> list[tuple[str, str, str, float]]:
    """`(component, group, module, norm)` per placed module: the Frobenius norm of its weight delta.

    See `jlora.plot.block_strengths` (same arguments as `inspect_file`).
    """
    from jlora.plot import block_strengths as strengths

    return strengths(path, **kwargs)
