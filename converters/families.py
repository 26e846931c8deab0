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
        Family("flux", ("transformer", "text_encoder", "text_encoder_2")),
        Family("flux2", ("transformer", "text_encoder")),
        Family("sd3", ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")),
        Family("wan", ("transformer", "transformer_2", "text_encoder")),
        Family("hunyuan_video", ("transformer", "text_encoder", "text_encoder_2")),
        Family("ltx_video", ("transformer", "text_encoder")),
        Family("lumina2", ("transformer", "text_encoder")),
        Family("hidream", ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")),
        Family("qwen_image", ("transformer", "text_encoder")),
        Family("cogvideox", ("transformer", "text_encoder")),
        Family("mochi", ("transformer", "text_encoder")),
        Family("z_image", ("transformer", "text_encoder")),
        Family("ltx2", ("transformer", "connectors", "text_encoder")),
        Family("flux3", ("transformer", "text_encoder")),
        Family("krea2", ("transformer", "text_encoder")),
        Family("ideogram4", ("transformer", "text_encoder")),
        Family("minimax_h3", ("transformer", "transformer_ref", "text_encoder")),
        Family("cosmos", ("transformer", "text_encoder")),
        Family("anima", ("transformer", "text_conditioner", "text_encoder")),
        Family("ace_step", ("transformer", "text_encoder")),
    )
}


def get_family(name: str | None) -> Family | None:
    if name is None:
        return None
    if name not in FAMILIES:
        raise JloraError(f"unknown family {name!r}; known families: {sorted(FAMILIES)}.")
    return FAMILIES[name]
