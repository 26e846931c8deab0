"""How strong a LoRA is per block and layer: delta norms per placed module, drawn as a PNG bar chart.

The norms come from the file's factors (for LoRA `||(alpha / r) * up @ down||_F` through the
`r x r` Gram matrices, never the full delta); LoHa and LoKr norms come from their leaf's delta.
The chart needs only numpy (`jlora.pipelines.images.write_png`).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from converters import engine, layout
from converters.convert import _assign_components
from converters.errors import JloraError

Strength = tuple[str, str, str, float]  # (component, group, module, norm)

_BLOCK = re.compile(
    r"(?:^|\.)(down_blocks|mid_block|up_blocks|transformer_blocks|single_transformer_blocks|double_blocks|single_blocks"
    r"|blocks|layers)(?:\.(\d+))?(?:\.|$)"
)
_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2, "transformer_blocks": 3, "double_blocks": 3,
          "single_transformer_blocks": 4, "single_blocks": 4, "blocks": 5, "layers": 5}


def block_of(module: str) -> tuple[str, tuple[int, int]]:
    """The group of a module name (`down_blocks.1`, `mid_block`, `transformer_blocks.3`, `layers.0`, `other`)
    and its sort key (UNet down, mid, up; DiT double then single blocks; by index)."""
    m = _BLOCK.search(module)
    if m is None or (m.group(1) != "mid_block" and m.group(2) is None):
        return "other", (9, 0)
    kind, index = m.group(1), m.group(2)
    return (kind if index is None else f"{kind}.{index}"), (_ORDER[kind], int(index or 0))


def _lora_norm(rec, alpha: float | None) -> float:
    t = rec.tensors
    down = layout._tucker_down(t["down"], t["mid"]) if "mid" in t else t["down"]
    r = down.shape[0]
    d = np.asarray(down, np.float64).reshape(r, -1)
    u = np.asarray(t["up"], np.float64).reshape(t["up"].shape[0], r)
    squared = float(np.sum((u.T @ u) * (d @ d.T)))
    return (alpha if alpha is not None else r) / r * float(np.sqrt(max(squared, 0.0)))


def _leaf_norm(rec, kind: str, kernel_shape, where: str, alpha: float | None) -> float:
    from jlora.leaf import LohaLeaf, LokrLeaf

    if kind == "loha":
        _, fields = layout.loha_leaf(rec, kernel_shape, where, alpha if alpha is not None else float(rec.rank))
        leaf = LohaLeaf(**{k: np.asarray(v, np.float32) for k, v in fields.items()})
    else:
        _, fields = layout.lokr_leaf(rec, kernel_shape, where, alpha)
        leaf = LokrLeaf(**{k: np.asarray(v, np.float32) for k, v in fields.items()})
    return float(np.linalg.norm(np.asarray(leaf.delta(), np.float64)))


def _norm(rec, placed, targets) -> float | None:
    if rec.kind == "lora":  # DoRA too: the norm of its low-rank part
        return _lora_norm(rec, placed.alpha)
    if rec.kind == "diff":
        return float(np.linalg.norm(np.asarray(rec.tensors["diff"], np.float64)))
    if rec.kind in ("loha", "lokr"):
        path = tuple(placed.path.split("[", 1)[0].split("/"))
        kernel_shape = targets[rec.component][path][0]
        alpha = placed.alpha if rec.kind == "loha" else rec.alpha
        return _leaf_norm(rec, rec.kind, tuple(kernel_shape), f"{rec.component}:{'/'.join(path)}", alpha)
    return None  # `set` and bias-only modules have no low-rank delta to measure


def strengths_of(checked: dict) -> list[Strength]:
    """`block_strengths` of a `jlora.inspection.check_file` result."""
    report = checked["report"]
    if report is None:
        raise checked["error"] or JloraError(f"{checked['origin']}: nothing placed.")
    fmt = engine.get_format(checked["format"])
    records = _assign_components(checked["records"], checked["targets"], None, checked["origin"])
    if fmt.split is not None:
        records = [piece for rec in records for piece in fmt.split(rec)]
    pieces: dict[tuple, list] = {}
    for rec in records:
        pieces.setdefault((rec.component, rec.keys), []).append(rec)
    rows = []
    for n, placed in enumerate(report.placed):
        if placed.path.split("[", 1)[0].endswith("/bias"):
            continue  # the bias delta of a module measured through its weight
        queue = pieces.get((placed.component, placed.keys), [])
        want = placed.module.replace(".", "_")
        rec = next((r for r in queue if r.module.replace(".", "_") == want), queue[0] if queue else None)
        if rec is None:
            continue
        queue.remove(rec)
        norm = _norm(rec, placed, checked["targets"])
        if norm is not None:
            group, key = block_of(placed.module)
            rows.append(((placed.component, key, n), (placed.component, group, placed.module, norm)))
    return [row for _, row in sorted(rows, key=lambda r: r[0])]


def block_strengths(path: str, *, family: str | None = None, allow_pickle: bool = False, indexes=None,
                    overrides=None) -> list[Strength]:
    """`(component, group, module, norm)` for every placed module of a LoRA file, in block order.

    `norm` is the Frobenius norm of the module's weight delta at strength 1 (LoRA: `||(alpha / r) *
    up @ down||_F`; DoRA: its low-rank part; LoHa/LoKr: the leaf's delta; full diffs: the diff).
    `group` is the UNet block (`down_blocks.0`, `mid_block`, `up_blocks.1`), the transformer block
    (`transformer_blocks.3`, `single_transformer_blocks.20`), the text encoder layer (`layers.5`),
    or `other`. Arguments as for `jlora.inspection.inspect_file`.

    >>> for component, group, module, norm in block_strengths("style.safetensors"):  # doctest: +SKIP
    ...     print(component, group, module, round(norm, 3))
    """
    from jlora.inspection import check_file

    return strengths_of(check_file(path, family=family, allow_pickle=allow_pickle, indexes=indexes, overrides=overrides))


# A 3x5 pixel font for chart labels: rows top to bottom, "1" = ink.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111", "J": "001001001101010",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    ".": "000000000000010", "-": "000000111000000", "_": "000000000000111", ":": "000010000010000",
    "/": "001001010100100", "=": "000111000111000", "+": "000010111010000", " ": "000000000000000",
}
_SHORT = {"down_blocks": "D", "mid_block": "M", "up_blocks": "U", "transformer_blocks": "T", "double_blocks": "T",
          "single_transformer_blocks": "S", "single_blocks": "S", "blocks": "B", "layers": "L", "other": "O"}
_COLORS = np.array([[52, 101, 164], [245, 121, 0], [78, 154, 6], [117, 80, 123], [204, 0, 0], [193, 125, 17]], np.uint8)
_BAR, _GAP, _GROUP_GAP, _PANEL_H, _MARGIN = 3, 1, 5, 150, 12


def _text(img: np.ndarray, x: int, y: int, text: str, scale: int = 1, color=(0, 0, 0)) -> int:
    """Draw `text` (upper-cased; unknown characters as blanks) at (x, y); returns the width drawn."""
    for i, ch in enumerate(text.upper()):
        glyph = np.array([c == "1" for c in _FONT.get(ch, _FONT[" "])]).reshape(5, 3)
        big = np.kron(glyph, np.ones((scale, scale), bool))
        x0 = x + i * 4 * scale
        h, w = big.shape
        region = img[y : y + h, x0 : x0 + w]
        region[big[: region.shape[0], : region.shape[1]]] = color
    return len(text) * 4 * scale


def _label(group: str) -> str:
    kind, _, index = group.partition(".")
    return _SHORT.get(kind, "O") + index


def render(strengths: Sequence[Strength]) -> np.ndarray:
    """An RGB uint8 bar chart of `strengths`: one panel per component (own scale), bars in block order,
    groups in alternating colours with their label (`D0` down_blocks.0, `M` mid, `U1`, `T3`, `S20`, `L5`)."""
    if not strengths:
        raise JloraError("no placed module to plot.")
    panels: dict[str, list[list]] = {}
    for component, group, _module, norm in strengths:
        groups = panels.setdefault(component, [])
        if not groups or groups[-1][0] != group:
            groups.append([group, []])
        groups[-1][1].append(norm)
    widths = {c: sum(len(v) * (_BAR + _GAP) + _GROUP_GAP for _, v in gs) for c, gs in panels.items()}
    title_w = max(len(f"{c} max 0.000e+00") * 8 for c in panels)
    width = 2 * _MARGIN + max(max(widths.values()), title_w)
    height = _MARGIN + len(panels) * (_PANEL_H + 40)
    img = np.full((height, width, 3), 255, np.uint8)
    top = _MARGIN
    for component, groups in panels.items():
        peak = max(max(v) for _, v in groups) or 1.0
        _text(img, _MARGIN, top, f"{component} max {peak:.3e}", scale=2)
        base = top + 14 + _PANEL_H
        img[base, _MARGIN : _MARGIN + widths[component]] = 0
        x = _MARGIN
        for g, (group, values) in enumerate(groups):
            start = x
            for v in values:
                h = int(round((_PANEL_H - 2) * v / peak)) if np.isfinite(v) else _PANEL_H - 2
                if h > 0:
                    img[base - h : base, x : x + _BAR] = _COLORS[g % len(_COLORS)]
                x += _BAR + _GAP
            label = _label(group)
            if len(label) * 4 <= x - start + _GROUP_GAP:
                _text(img, start, base + 3, label)
            x += _GROUP_GAP
        top += _PANEL_H + 40
    return img


def plot_strengths(strengths: Sequence[Strength], path: str) -> str:
    """Write `render(strengths)` as a PNG at `path`; returns the path."""
    from jlora.pipelines.images import write_png

    write_png(path, render(strengths))
    return path
