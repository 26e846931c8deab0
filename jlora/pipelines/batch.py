"""Prompts file in, PNGs out: the batch-generation job behind `scripts/generate.py`.

A prompts file has one JSON object per line (a `Request`; blank lines and `#` comments skipped).
For line N (1-based) the job writes `out/NNNNNN.png` and `out/NNNNNN.json` (the request, the model,
the image size and the time it took), and `out/contact_sheet.png` over every image of the file.
An image whose sidecar already records the same request and model is not made again.

Requests are grouped into batches of equal size, steps and guidance mode, up to `batch` each;
within a batch every request keeps its own LoRA set and scale (per-sample LoRAs). A request
that cannot run (a line that is not JSON, a bad field, a LoRA file that is missing or made for
another model) is reported with its line number and skipped; the others still run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from jlora.errors import JloraError
from jlora.pipelines import common, images

SIDECAR_VERSION = 1


@dataclasses.dataclass
class Item:
    """One line of the prompts file: its number, the request (or None) and what went wrong (or None)."""

    line: int
    request: common.Request | None
    error: str | None = None

    @property
    def name(self) -> str:
        return f"{self.line:06d}"


def read_prompts(path: str) -> list[Item]:
    """The requests of a JSONL prompts file; lines that do not parse become items with an error."""
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise common.RequestError(f"{path}: not UTF-8 text ({e}).") from None
    for n, text in enumerate(lines, 1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        try:
            record = json.loads(text)
        except ValueError as e:
            items.append(Item(n, None, f"{path}:{n}: not a JSON object ({e})."))
            continue
        try:
            items.append(Item(n, common.Request.of(record)))
        except common.RequestError as e:
            items.append(Item(n, None, f"{path}:{n}: {e}"))
    return items


def sidecar(item: Item, model: str, height: int, width: int, steps: int, guidance: float, seconds: float) -> dict:
    """The JSON written next to an image."""
    return {"version": SIDECAR_VERSION, "line": item.line, "model": model, "request": item.request.record(),
            "height": height, "width": width, "steps": steps, "guidance": guidance,
            "seconds": round(seconds, 3)}


def finished(out: str, item: Item, model: str) -> bool:
    """Whether `out` already holds this item's image made from the same request and model."""
    png, meta = os.path.join(out, item.name + ".png"), os.path.join(out, item.name + ".json")
    if not (os.path.isfile(png) and os.path.isfile(meta)):
        return False
    try:
        with open(meta, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(old, dict) and old.get("request") == item.request.record() and old.get("model") == model


def _write_json(path: str, data: dict) -> None:
    from converters.safetensors_io import unique_temp_path

    tmp = unique_temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def plan(items: Sequence[Item], batch: int, defaults: Callable[[common.Request], tuple]) -> list[list[Item]]:
    """Batches of at most `batch` items with equal `defaults(request)` keys (size, steps, guidance mode)."""
    groups: dict = {}
    for item in items:
        groups.setdefault(defaults(item.request), []).append(item)
    return [g[i : i + batch] for g in groups.values() for i in range(0, len(g), batch)]


@dataclasses.dataclass
class Summary:
    made: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)  # messages


def check_loras(pipe, cache: common.LoraCache, items: Iterable[Item]) -> None:
    """Load every LoRA set once; items whose set does not load get the error (line, file, reason)."""
    for item in items:
        key = common.lora_key(item.request)
        if not key:
            continue
        for path, _ in key:
            if not os.path.isfile(path):
                item.error = f"line {item.line}: LoRA file {path} does not exist."
                break
        else:
            try:
                cache.adapters(key)
            except (JloraError, OSError, ValueError) as e:
                item.error = (f"line {item.line}: a LoRA of {[p for p, _ in key]} does not load into this "
                              f"{pipe.family} model: {type(e).__name__}: {e}")


def run(pipe, items: Sequence[Item], out: str, *, model: str, batch: int = 4, steps: int | None = None,
        guidance: float | None = None, log: Callable[[str], None] = print, batch_bar=None, step_bar=None,
        lora_mode: str = "auto") -> Summary:
    """Make the images of `items` into `out`; returns what was made, skipped and failed.

    `steps` / `guidance` are the defaults for requests without their own. `batch_bar(n)` and
    `step_bar(n)` make progress bars (objects with `update(k)` and `close()`), or None.
    """
    os.makedirs(out, exist_ok=True)
    summary = Summary()
    default_steps = steps or (28 if pipe.family == "flux" else 30)
    default_guidance = guidance if guidance is not None else {"sd": 7.5, "sdxl": 5.0, "flux": 3.5}[pipe.family]
    for item in items:
        if item.error:
            summary.failed.append(item.error)
    todo = []
    for item in items:
        if item.error:
            continue
        if finished(out, item, model):
            summary.skipped.append(item.name)
        else:
            todo.append(item)
    cache = common.LoraCache(pipe.lora_params, pipe.family)
    check_loras(pipe, cache, todo)
    for item in todo:
        if item.error:
            summary.failed.append(item.error)
    todo = [i for i in todo if not i.error]

    def key(r: common.Request):
        size = pipe.default_size
        g = r.guidance if r.guidance is not None else default_guidance
        merged_only = bool(common.lora_key(r)) and not common.lora_only(cache.adapters(common.lora_key(r)))
        group = (common.lora_key(r), r.lora_scale) if merged_only else None  # LoHa/LoKr sets run merged
        return (r.height or size, r.width or size, r.steps or default_steps, pipe.family != "flux" and g > 1, group)

    batches = plan(todo, batch, key)
    bar = batch_bar(len(batches)) if batch_bar else None
    for group in batches:
        start = time.perf_counter()
        requests = [i.request for i in group]
        n_steps = requests[0].steps or default_steps
        sbar = step_bar(n_steps) if step_bar else None
        try:
            with common.on_step(lambda i: sbar.update(1)) if sbar else _null():
                pics = pipe.generate(requests, cache, default_steps=default_steps, default_guidance=default_guidance,
                                     lora_mode=lora_mode)
        except (JloraError, ValueError) as e:
            for i in group:
                summary.failed.append(f"line {i.line}: {type(e).__name__}: {e}")
            continue
        finally:
            if sbar:
                sbar.close()
        seconds = (time.perf_counter() - start) / len(group)
        pixels = common.to_uint8(pics)
        for i, image in zip(group, pixels):
            r = i.request
            images.write_png(os.path.join(out, i.name + ".png"), image)
            g = r.guidance if r.guidance is not None else default_guidance
            _write_json(os.path.join(out, i.name + ".json"),
                        sidecar(i, model, image.shape[0], image.shape[1], r.steps or default_steps, g, seconds))
            summary.made.append(i.name)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    write_contact_sheet(out, [i for i in items if not i.error])
    return summary


def write_contact_sheet(out: str, items: Sequence[Item]) -> str | None:
    """`out/contact_sheet.png` over the items' images that exist (None when there are none)."""
    paths = [os.path.join(out, i.name + ".png") for i in items]
    pics = [images.read_png(p) for p in paths if os.path.isfile(p)]
    if not pics:
        return None
    path = os.path.join(out, "contact_sheet.png")
    images.write_png(path, images.contact_sheet(pics))
    return path


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
