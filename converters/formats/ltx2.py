"""LTX-2 LoRA files in the original model's names, read into diffusers' module names.

Keys under `diffusion_model.` are the `transformer` (`LTX2VideoTransformer3DModel`); keys under
`text_embedding_projection.` are the `connectors` (`LTX2TextConnectors`). Most modules already have their
diffusers names (`transformer_blocks.0.attn1.to_q`, `audio_to_video_attn`, `audio_ff.net.0.proj`); the rest
are renamed by the rows below:

* `patchify_proj` / `audio_patchify_proj` -> `proj_in` / `audio_proj_in`;
* the timestep modulations `adaln_single` / `audio_adaln_single` -> `time_embed` / `audio_time_embed`,
  `prompt_adaln_single` -> `prompt_adaln`, and the audio-video cross-attention modulations
  `av_ca_video_scale_shift_adaln_single` -> `av_cross_attn_video_scale_shift` (and the a2v / v2a gates);
* the attention norms `q_norm` / `k_norm` -> `norm_q` / `norm_k`;
* the connectors' `aggregate_embed` -> `text_proj_in`.

Plain diffusers/PEFT files (`transformer.` and `connectors.` prefixes) are read by the `peft` format.
A file with only block keys that LTX-Video shares (`diffusion_model.transformer_blocks.0.attn1.to_q`) is
`prefixed_diffusers`, which gives the same modules.
"""

from __future__ import annotations

import re

from converters.engine import Format, Rule, register_format
from converters.formats import dit
from converters.formats.dit import M
from converters.records import Record

_R = r"\.(?P<r>.+)"
_MODULATIONS = (
    ("adaln_single", "time_embed"),
    ("audio_adaln_single", "audio_time_embed"),
    ("prompt_adaln_single", "prompt_adaln"),
    ("audio_prompt_adaln_single", "audio_prompt_adaln"),
    ("av_ca_video_scale_shift_adaln_single", "av_cross_attn_video_scale_shift"),
    ("av_ca_a2v_gate_adaln_single", "av_cross_attn_video_a2v_gate"),
    ("av_ca_audio_scale_shift_adaln_single", "av_cross_attn_audio_scale_shift"),
    ("av_ca_v2a_gate_adaln_single", "av_cross_attn_audio_v2a_gate"),
)
TRANSFORMER_MAPS = (
    M(r"patchify_proj", "proj_in"),
    M(r"audio_patchify_proj", "audio_proj_in"),
    *(M(src + _R, dst + ".{r}") for src, dst in _MODULATIONS),
    M(r"(?P<p>transformer_blocks\.\d+\.[a-z_0-9]+)\.q_norm", "{p}.norm_q"),
    M(r"(?P<p>transformer_blocks\.\d+\.[a-z_0-9]+)\.k_norm", "{p}.norm_k"),
)
CONNECTORS_MAPS = (M(r"aggregate_embed", "text_proj_in"),)

_SPLITS = {"transformer": dit.splitter(TRANSFORMER_MAPS), "connectors": dit.splitter(CONNECTORS_MAPS)}


def split(rec: Record) -> list[Record]:
    """Original names -> diffusers names, by the record's component."""
    return _SPLITS[rec.component](rec) if rec.component in _SPLITS else [rec]


COMPONENTS = {"diffusion_model": "transformer", "text_embedding_projection": "connectors"}

_ATTN = r"(?:attn[12]|audio_attn[12]|audio_to_video_attn|video_to_audio_attn)"
LTX2_KEY = re.compile(
    r"text_embedding_projection\.|diffusion_model\.(?:"
    r"(?:audio_)?patchify_proj\.|av_ca_\w+\.|(?:audio_)?prompt_adaln_single\.|audio_adaln_single\.|"
    rf"transformer_blocks\.\d+\.(?:audio_attn[12]|audio_to_video_attn|video_to_audio_attn|audio_ff)\.|"
    rf"transformer_blocks\.\d+\.{_ATTN}\.[qk]_norm\.)"
)


def is_ltx2(keys: frozenset[str]) -> bool:
    return any(LTX2_KEY.match(k) for k in keys)


FORMAT = register_format(
    Format(
        name="ltx2",
        supersedes=("peft", "prefixed_diffusers"),
        rules=(Rule(r"(?P<component>diffusion_model|text_embedding_projection)\.(?P<module>[A-Za-z0-9_.]+?)\."
                    + dit._role_pattern(dit.ROLES), "{role}"),),
        detect=is_ltx2,
        components=COMPONENTS,
        roles=dit.ROLES,
        split=split,
        description="LTX-2 original names (diffusion_model.patchify_proj, adaln_single, av_ca_*, text_embedding_projection.)",
    )
)
