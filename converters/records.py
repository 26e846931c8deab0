"""Canonical records: the seam between file formats and naming schemes.

A format turns source keys into `Record`s (torch module names, torch layouts);
a naming scheme turns records into `Placement`s on a Flax params tree.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Record:
    """One adapted module, as the file describes it.

    Attributes:
      component: `unet`, `text_encoder`, `text_encoder_2` or `transformer`.
      module: diffusers/PyTorch module name, e.g. `down_blocks.0.attentions.0.proj_in`.
      kind: adapter kind; `lora` for now.
      tensors: role -> tensor in PyTorch layout (`down` (r, in[, kh, kw]), `up` (out, r[, 1, 1])).
      alpha: LoRA alpha, or None when the file gives none (then alpha = rank).
      keys: the source keys this record consumed.
    """

    component: str
    module: str
    kind: str
    tensors: Mapping[str, np.ndarray]
    alpha: float | None
    keys: tuple[str, ...]

    @property
    def rank(self) -> int:
        return int(self.tensors["down"].shape[0])


@dataclasses.dataclass(frozen=True)
class Placement:
    """A record mapped onto one weight of the params tree, factors in Flax layout.

    `a` has the kernel's shape with the last axis replaced by the rank; `b` is (rank, out).
    """

    record: Record
    path: tuple[str, ...]
    a: np.ndarray
    b: np.ndarray
    alpha: float
