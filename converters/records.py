"""Canonical records: the seam between file formats and naming schemes.

A format turns source keys into `Record`s (torch module names, torch layouts);
`converters.layout` and a naming scheme turn records into `Placement`s: adapter
leaves (by type name and fields, Flax layout) at paths of a params tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

# role -> kind of the module's weight adapter; None: extras that go with any kind.
ROLE_KINDS: dict[str, str | None] = {
    "down": "lora",
    "up": "lora",
    "mid": "lora",
    "magnitude": "lora",
    "dora_scale": None,  # DoRA magnitude of a LoRA, LoHa or LoKr
    "w1a": "loha",
    "w1b": "loha",
    "w2a": "loha",
    "w2b": "loha",
    "t1": "loha",
    "t2": "loha",
    "lokr_w1": "lokr",
    "lokr_w1a": "lokr",
    "lokr_w1b": "lokr",
    "lokr_w2": "lokr",
    "lokr_w2a": "lokr",
    "lokr_w2b": "lokr",
    "lokr_t2": "lokr",
    "ia3_w": "ia3",
    "on_input": "ia3",
    "glora_a1": "glora",
    "glora_a2": "glora",
    "glora_b1": "glora",
    "glora_b2": "glora",
    "glora_bm": "glora",
    "oft_blocks": "oft",
    "rescale": "oft",
    "tlora_q": "tlora",
    "tlora_p": "tlora",
    "tlora_lambda": "tlora",
    "diff": "diff",
    "set": "set",
    "up_bias": None,
    "diff_b": None,
    "alpha": None,
}


@dataclasses.dataclass(frozen=True)
class Record:
    """One adapted module, as the file describes it.

    Attributes:
      component: `unet`, `text_encoder`, `text_encoder_2` or `transformer`.
      module: diffusers/PyTorch module name, e.g. `down_blocks.0.attentions.0.proj_in`.
      kind: `lora` (incl. LoCon, Tucker, DoRA), `loha`, `lokr`, `ia3`, `glora`, `oft` (diagonal OFT and
        BOFT), `tlora`, `diff` (incl. LyCORIS norms), `set`, or `bias` (bias delta only).
      tensors: role -> tensor in PyTorch layout (roles in `ROLE_KINDS`).
      sources: role -> the source key it came from.
      alpha: alpha from the file, or None (then alpha = rank).
    """

    component: str | None
    module: str
    kind: str
    tensors: Mapping[str, np.ndarray]
    sources: Mapping[str, str]
    alpha: float | None

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(sorted(self.sources.values()))

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == "lora":
            return int(t["down"].shape[0])
        if self.kind == "loha":
            return int(t["w1b"].shape[0])
        if self.kind == "glora":
            return int(t["glora_a2"].shape[0])
        if self.kind == "tlora":
            return int(t["tlora_q"].shape[0])
        if self.kind == "lokr":  # LyCORIS: the last decomposed factor gives the dim
            for role in ("lokr_w2b", "lokr_w1b"):
                if role in t:
                    return int(t[role].shape[0])
        return None


def algorithm(rec: Record) -> str:
    """The algorithm a record's file used, for reports: `lora`, `locon`, `loha`, `lokr`, `ia3`, `glora`,
    `diag-oft`, `boft`, `tlora`, `norm`, `diff`, `set`, `bias`; `+tucker`, `+dora`, `+rescaled` name the variants."""
    t, kind = rec.tensors, rec.kind
    name = kind
    if kind == "lora":
        name = "locon" if t["down"].ndim > 2 else "lora"
    elif kind == "oft":
        name = "boft" if t["oft_blocks"].ndim == 4 else "diag-oft"
    elif kind == "diff" and any(k.endswith(".w_norm") for k in rec.sources.values()):
        name = "norm"
    if any(r in t for r in ("mid", "t1", "lokr_t2", "glora_bm")):
        name += "+tucker"
    if "dora_scale" in t or "magnitude" in t:
        name += "+dora"
    if "rescale" in t:
        name += "+rescaled"
    return name


@dataclasses.dataclass(frozen=True)
class Placement:
    """An adapter leaf for one weight of the params tree.

    Attributes:
      record: where it came from.
      path: path of the weight in the params tree.
      leaf: leaf type name (`lora`, `loha`, `lokr`, `diff`, `dora`).
      fields: the leaf's fields: numpy arrays in Flax layout, floats, and static flags.
      layer: for a piece of a stacked weight, its index on the layer axis.
      cols: for a piece of a fused weight, `(src_start, src_stop, dst_start)` output columns.
    """

    record: Record
    path: tuple[str, ...]
    leaf: str
    fields: Mapping[str, Any]
    layer: int | None = None
    cols: tuple[tuple[int, int, int], ...] = ()

    @property
    def is_part(self) -> bool:
        """True for a piece of a stacked or fused weight (merged with its siblings before use)."""
        return self.layer is not None or bool(self.cols)

    @property
    def alpha(self) -> float | None:
        value = self.fields.get("alpha")
        return None if value is None else float(value)
