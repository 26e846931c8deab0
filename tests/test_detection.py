"""Format detection stays unambiguous and visible.

Every format registered with `converters.engine` has a sample below (a few key names as its writers
spell them); detection on the sample's keys must name that format and no other, and README's format
table must list it. A newly registered format without a sample or a README row fails here: add a row
to SAMPLES (and, for a format that needs the target model to decide, its module names in
SAMPLE_MODULES) and a row to the table under "## Formats" in README.md.

Parity of what each format loads is checked against diffusers / LyCORIS / ComfyUI in that format's
own test file; this file checks only which format the keys are taken for.
"""

import os
import re

import pytest

import converters.convert  # noqa: F401  (registers formats and schemes)
from converters import engine

# format name -> keys of a small real-world file of that format (tensor values do not matter to detection).
SAMPLES = {
    "peft": ["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight"],
    "kohya": ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"],
    "diffusers_old": ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight"],
    "kohya_flux": ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"],
    "comfy_flux": ["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"],
    "onetrainer_flux": ["lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight"],
    "xlabs_flux": ["double_blocks.0.processor.qkv_lora1.down.weight"],
    "fal_kontext": ["base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight"],
    "bfl_flux": ["img_in.lora_A.weight", "img_in.lora_B.weight", "double_blocks.0.img_attn.norm.query_norm.scale"],
    "wan": ["diffusion_model.blocks.0.self_attn.q.lora_down.weight", "diffusion_model.blocks.0.ffn.0.lora_up.weight"],
    "musubi_wan": ["lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_blocks_0_self_attn_q.alpha"],
    "hunyuan_video": ["diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight"],
    "lumina2": ["diffusion_model.layers.0.attention.qkv.lora_A.weight", "diffusion_model.layers.0.attention.out.lora_B.weight",
                "diffusion_model.layers.0.adaLN_modulation.1.lora_A.weight"],
    "prefixed_diffusers": ["diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight"],
    "kohya_dit": ["lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight"],
    "flux3": ["diffusion_model.content_mode_blocks.image.0.q_proj.lora_A.weight"],
    "krea2": ["diffusion_model.blocks.0.attn.wq.lora_A.weight", "diffusion_model.tmlp.0.lora_A.weight"],
    "ideogram4": ["layers.0.attention.qkv.lora_A.weight", "layers.0.attention.o.lora_A.weight",
                  "layers.0.adaln_modulation.lora_A.weight"],
    "minimax_h3": ["blocks.0.attn.qkv_proj.lora_A.weight", "final_layer.video_out.lora_A.weight"],
    "musubi_minimax_h3": ["lora_unet_blocks_0_attn_qkv_proj.lora_down.weight", "lora_unet_blocks_0_attn_qkv_proj.alpha"],
    "diffsynth_minimax_h3": ["blocks.0.attn.qkv_proj.lora_A.default.weight"],
    "anima": ["diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight",
              "diffusion_model.llm_adapter.blocks.0.self_attn.q_proj.lora_A.weight"],
    "ace_step": ["base_model.model.layers.0.self_attn.q_proj.lora_A.weight"],
    "flux2": ["diffusion_model.double_stream_modulation_img.lin.lora_A.weight",
              "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"],
    "kohya_flux2": ["lora_unet_double_stream_modulation_img_lin.lora_down.weight",
                    "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"],
    "lycoris_prefixed": ["lycoris_transformer_blocks_0_attn_to_q.lokr_w1"],
    "diffusers_lokr": ["transformer.transformer_blocks.0.attn.to_q.lokr_w1"],
    "ltx2": ["diffusion_model.patchify_proj.lora_A.weight", "diffusion_model.adaln_single.linear.lora_A.weight"],
    "z_image": ["diffusion_model.layers.0.attention.to_q.lora_A.weight", "diffusion_model.layers.0.attention.to_k.lora_A.weight"],
}

# format name -> diffusers module names of the target model, for formats whose keys alone do not decide
# (`Format.detect_for`); detection then also gets these.
SAMPLE_MODULES: dict = {}

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_every_registered_format_has_a_sample():
    missing = sorted(set(engine.formats()) - set(SAMPLES))
    assert not missing, (
        f"registered formats without a detection sample: {missing}. Add a row (a few of the format's key names) "
        "to SAMPLES in tests/test_detection.py."
    )
    stale = sorted(set(SAMPLES) - set(engine.formats()))
    assert not stale, f"SAMPLES names formats that are not registered: {stale}"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_is_detected_as_its_format_only(name):
    """Auto-detection on the sample's keys names the format, no other format claims the keys, and the
    format's rule table reads every sample key."""
    if name not in engine.formats():
        pytest.fail(f"{name} has a sample but is not registered")
    keys = SAMPLES[name]
    modules = SAMPLE_MODULES.get(name)
    claimed = [f.name for f in engine.matching_formats(keys, modules)]
    assert claimed == [name], f"{name} sample {keys} is claimed by {claimed}"
    fmt = engine.detect_format(keys, modules=modules)
    assert fmt.name == name
    _, unmatched = engine.match_keys(fmt, keys)
    assert not unmatched, f"the {name} rule table reads none of {unmatched}: the sample is not a {name} file"


def _readme_format_names() -> set:
    text = open(README, encoding="utf-8").read()
    section = text.split("\n## Formats", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            first = line.split("|")[1]
            names.update(re.findall(r"`([a-z0-9_]+)`", first))
    return names


def test_readme_format_table_lists_every_registered_format():
    listed = _readme_format_names()
    missing = sorted(set(engine.formats()) - listed)
    assert not missing, (
        f"README.md's format table (under '## Formats') does not list {missing}: add a row with the format's "
        "name in backticks, its keys and the kinds it loads."
    )


def _example(items, rng, out) -> None:
    """Append to `out` the characters of one random string the parsed regex `items` accepts (best effort)."""
    from re import _constants as sre

    for op, arg in items:
        if op is sre.LITERAL:
            out.append(chr(arg))
        elif op is sre.NOT_LITERAL:
            out.append("x" if chr(arg) != "x" else "y")
        elif op is sre.ANY:
            out.append(rng.choice("._aZ09"))
        elif op is sre.IN:
            chars = []
            for kind, value in arg:
                if kind is sre.LITERAL:
                    chars.append(chr(value))
                elif kind is sre.RANGE:
                    chars += [chr(value[0]), chr(value[1])]
                elif kind is sre.CATEGORY:
                    chars += {"CATEGORY_DIGIT": ["3"], "CATEGORY_WORD": ["a", "_", "7"]}.get(str(value), [])
            if chars and not any(kind is sre.NEGATE for kind, _ in arg):
                out.append(rng.choice(chars))
            else:
                out.append("q")
        elif op is sre.BRANCH:
            _example(rng.choice(arg[1]), rng, out)
        elif op is sre.SUBPATTERN:
            _example(arg[3], rng, out)
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", None)):
            low, high, body = arg
            for _ in range(rng.randint(low, min(high, low + 3))):
                _example(body, rng, out)


def test_required_literals_are_in_every_key_a_rule_matches():
    """The literal runs match_keys checks before running a rule's regex occur in every key the regex accepts:
    random keys drawn from each rule's own pattern, for every rule of every registered format."""
    import random
    from re import _parser

    rng, checked = random.Random(0), 0
    for fmt in engine.formats().values():
        for rule in fmt.rules:
            needed = engine._required_literals(rule.pattern)
            tree = _parser.parse(rule.pattern).data
            for _ in range(40):
                out = []
                _example(tree, rng, out)
                key = "".join(out)
                if rule.regex.fullmatch(key):
                    checked += 1
                    assert all(lit in key for lit in needed), (fmt.name, rule.pattern, key, needed)
    assert checked > 1000


def test_required_literals_of_patterns_that_need_none():
    assert engine._required_literals(r"(?P<module>.+)\.(?:lora_down|lora_up)\.weight") == (".lora_", ".weight")  # the branches share "lora_"
    assert engine._required_literals(r"(?i)lora_unet_.+") == ()
    assert engine._required_literals(r"ab(?:cd|ef)gh") == ()
    assert engine._required_literals(r"abc(?:def)?ghi") == ("abc", "ghi")
