"""Model families: which components a family's pipelines have (small data tables)."""

from __future__ import annotations

import dataclasses

from converters.errors import JloraError


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    components: tuple[str, ...]


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd", ("unet", "text_encoder")),
        Family("sdxl", ("unet", "text_encoder", "text_encoder_2")),
        Family("flux", ("transformer", "text_encoder")),
        Family("sd3", ("transformer", "text_encoder", "text_encoder_2")),
    )
}


def get_family(name: str | None) -> Family | None:
    if name is None:
        return None
    if name not in FAMILIES:
        raise JloraError(f"unknown family {name!r}; known families: {sorted(FAMILIES)}.")
    return FAMILIES[name]
