"""Writers of non-PEFT SD / SDXL LoRA files for the format parity tests.

The LoRA factors are PEFT's: a seeded random PEFT LoRA is injected into a deep copy of a reference
torch model (``reference.peft_lora_model``) and read back with ``get_peft_model_state_dict``, which
gives ``lora_A`` / ``lora_B`` in torch layout per diffusers/transformers module name. The writers put
the same factors under another format's key names:

* ``write_kohya``: kohya / A1111 (``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``,
  ``.alpha``; ``lora_te_`` for SD, ``lora_te1_`` / ``lora_te2_`` for SDXL). ``unet_names="sgm"``
  writes the UNet modules with the original Stable Diffusion (sgm) block names, as sd-scripts does
  for SDXL (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``middle_block_1_...``,
  ``output_blocks_3_0_in_layers_2`` ...). 3x3 conv factors (PEFT's LoRA on a 3x3 conv) make a LoCon
  file.
* ``write_diffusers_old``: the attention-processor keys of diffusers before PEFT
  (``unet.<...>.attn1.processor.to_q_lora.down.weight``, ``text_encoder.<...>.self_attn.to_out_lora.up.weight``,
  ``text_encoder.<...>.mlp.fc1.lora_linear_layer.down.weight``).

``Factor.delta()`` is the format's math, ``alpha / r * up @ down`` in torch layout, and
``torch_model_with_deltas`` adds such deltas to a deep copy of a torch model: the weight-level
reference for what diffusers cannot read.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from typing import Callable, Iterable, Mapping, Optional

import numpy as np
import torch

import reference as R

COMPONENT_PREFIXES = {
    "sd": {R.UNET: "lora_unet", R.TEXT_ENCODER: "lora_te"},
    "sdxl": {R.UNET: "lora_unet", R.TEXT_ENCODER: "lora_te1", R.TEXT_ENCODER_2: "lora_te2"},
}


@dataclasses.dataclass(frozen=True, eq=False)
class Factor:
    """One LoRA module in torch layout: ``down`` (r, in[, kh, kw]), ``up`` (out, r[, 1, 1])."""

    down: np.ndarray
    up: np.ndarray
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> np.ndarray:
        """alpha / r * up @ down, in the shape of the torch weight (conv: (out, in, kh, kw))."""
        up = self.up.reshape(self.up.shape[0], self.rank).astype(np.float64)
        down = self.down.reshape(self.rank, -1).astype(np.float64)
        out = (self.alpha / self.rank) * (up @ down)
        return out.reshape((self.up.shape[0],) + self.down.shape[1:])


Factors = dict  # {module name: Factor}


# --------------------------------------------------------------------------------------------
# Factors from PEFT
# --------------------------------------------------------------------------------------------


def peft_factors(
    ref: "R.Ref",
    *,
    rank: int = 4,
    alpha: float = 8,
    rank_pattern: Optional[dict] = None,
    alpha_pattern: Optional[dict] = None,
    seed: int = 0,
    target_modules: Optional[Iterable[str]] = None,
    init_scale: float = 1.0,
) -> Factors:
    """``{module: Factor}`` of a seeded PEFT LoRA on ``ref``; each alpha is PEFT's for that module."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    model, _ = R.peft_lora_model(
        ref,
        rank=rank,
        alpha=alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        seed=seed,
        init_scale=init_scale,
        target_modules=tuple(target_modules) if target_modules else None,
    )
    sd = get_peft_model_state_dict(model)
    alphas = {n: float(m.lora_alpha["default"]) for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    out = {}
    for module, a in sorted(alphas.items()):
        down = sd[f"{module}.lora_A.weight"].detach().cpu().numpy().astype(np.float32)
        up = sd[f"{module}.lora_B.weight"].detach().cpu().numpy().astype(np.float32)
        out[module] = Factor(down=np.ascontiguousarray(down), up=np.ascontiguousarray(up), alpha=a)
    if not out:
        raise ValueError(f"no LoRA module injected into {ref.name}")
    return out


# --------------------------------------------------------------------------------------------
# sgm (original Stable Diffusion) UNet names
# --------------------------------------------------------------------------------------------

_SGM_RESNET = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_SGM_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_out": "out.2",
}


def _resnet_part(rest: str) -> str:
    if rest not in _SGM_RESNET:
        raise ValueError(f"no sgm name for resnet part {rest!r}")
    return _SGM_RESNET[rest]


def sgm_name(module: str, unet_config) -> str:
    """The sgm (ldm ``UNetModel``) name of a diffusers UNet module, dotted.

    Input blocks: ``input_blocks.0`` is ``conv_in``; down block ``b`` layer ``l`` is
    ``input_blocks.{1 + b*(L+1) + l}`` with the resnet at ``.0`` and the transformer at ``.1``; its
    downsampler is ``input_blocks.{(b+1)*(L+1)}.0.op``. Output blocks: up block ``b`` layer ``l`` is
    ``output_blocks.{b*(L+1) + l}``, resnet ``.0``, transformer ``.1``, and the upsampler sits on the
    last layer at ``.2`` after a transformer, else at ``.1``. Mid block: ``middle_block.0/1/2``.
    """
    n = unet_config.layers_per_block
    if not isinstance(n, int):
        raise ValueError("only a uniform layers_per_block is supported")
    if module in _SGM_FIXED:
        return _SGM_FIXED[module]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", module)
    if m:
        b, kind, l, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            if rest != "conv":
                raise ValueError(module)
            return f"input_blocks.{(b + 1) * (n + 1)}.0.op"
        i = 1 + b * (n + 1) + l
        return f"input_blocks.{i}.0.{_resnet_part(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module)
    if m:
        kind, l, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * l}.{_resnet_part(rest)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", module)
    if m:
        b, kind, l, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            if rest != "conv":
                raise ValueError(module)
            has_attention = "CrossAttn" in unet_config.up_block_types[b]
            return f"output_blocks.{b * (n + 1) + n}.{2 if has_attention else 1}.conv"
        i = b * (n + 1) + l
        return f"output_blocks.{i}.0.{_resnet_part(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    raise ValueError(f"no sgm name for UNet module {module!r}")


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def _save(path, tensors: Mapping[str, np.ndarray]) -> str:
    from safetensors.numpy import save_file

    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)
    return path


def kohya_module_name(component: str, module: str, family: str, unet_names: str = "diffusers", unet_config=None) -> str:
    """``lora_unet_down_blocks_0_...``, ``lora_te1_text_model_...`` (no tensor suffix)."""
    prefix = COMPONENT_PREFIXES[family][component]
    if component == R.UNET and unet_names == "sgm":
        module = sgm_name(module, unet_config)
    elif unet_names not in ("diffusers", "sgm"):
        raise ValueError(unet_names)
    return f"{prefix}_{module.replace('.', '_')}"


def kohya_state_dict(
    factors: Mapping[str, Factors],
    family: str,
    *,
    omit_alpha: Callable[[str, str], bool] = lambda component, module: False,
    unet_names: str = "diffusers",
    unet_config=None,
) -> dict:
    """``{key: array}`` of a kohya file holding ``factors`` (``{component: {module: Factor}}``).

    ``omit_alpha(component, module)`` drops that module's ``.alpha`` key; the format reads a missing
    alpha as alpha = rank, so it is only allowed where the factor's alpha equals its rank.
    """
    out = {}
    for component, mods in factors.items():
        for module, f in mods.items():
            name = kohya_module_name(component, module, family, unet_names, unet_config)
            if f"{name}.lora_down.weight" in out:
                raise ValueError(f"two modules map to {name}")
            out[f"{name}.lora_down.weight"] = f.down
            out[f"{name}.lora_up.weight"] = f.up
            if omit_alpha(component, module):
                if f.alpha != f.rank:
                    raise ValueError(f"{component}.{module}: alpha {f.alpha} != rank {f.rank} cannot be omitted")
            else:
                out[f"{name}.alpha"] = np.asarray(f.alpha, dtype=np.float32)
    return out


def write_kohya(path, factors: Mapping[str, Factors], family: str, **kwargs) -> str:
    """Write ``kohya_state_dict(factors, family, **kwargs)`` to ``path`` (safetensors)."""
    return _save(path, kohya_state_dict(factors, family, **kwargs))


_OLD_UNET_ATTN = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
_OLD_TE_ATTN = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}


def diffusers_old_state_dict(factors: Mapping[str, Factors]) -> dict:
    """``{key: array}`` of an old diffusers attention-processor LoRA (no alphas: scale 1).

    UNet: attention projections only, ``<attn>.processor.to_q_lora.down.weight``. Text encoders:
    ``self_attn.to_q_lora`` ... ``to_out_lora`` and ``<module>.lora_linear_layer`` for the rest (fc1, fc2).
    """
    out = {}
    for component, mods in factors.items():
        for module, f in mods.items():
            parent, _, leaf = module.rpartition(".")
            if component == R.UNET:
                if module.endswith(".to_out.0"):
                    parent, leaf = module[: -len(".to_out.0")], "to_out.0"
                if leaf not in _OLD_UNET_ATTN:
                    raise ValueError(f"the old UNet format holds attention projections only, not {module}")
                name = f"unet.{parent}.processor.{_OLD_UNET_ATTN[leaf]}"
            elif leaf in _OLD_TE_ATTN:
                name = f"{component}.{parent}.{_OLD_TE_ATTN[leaf]}"
            else:
                name = f"{component}.{module}.lora_linear_layer"
            if f.alpha != f.rank:
                raise ValueError(f"{component}.{module}: the old format has no alphas (alpha {f.alpha} != {f.rank})")
            out[f"{name}.down.weight"] = f.down
            out[f"{name}.up.weight"] = f.up
    return out


def write_diffusers_old(path, factors: Mapping[str, Factors]) -> str:
    return _save(path, diffusers_old_state_dict(factors))


# --------------------------------------------------------------------------------------------
# Weight-level reference
# --------------------------------------------------------------------------------------------


def torch_model_with_deltas(ref: "R.Ref", factors: Factors, scale: float = 1.0) -> torch.nn.Module:
    """A deep copy of ``ref.torch_model`` with ``scale * alpha / r * up @ down`` added to each
    module's weight (the format's math, no LoRA layers)."""
    model = copy.deepcopy(ref.torch_model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, f in factors.items():
            w = modules[name].weight
            d = torch.from_numpy(scale * f.delta()).to(w.dtype)
            if tuple(d.shape) != tuple(w.shape):
                raise ValueError(f"{name}: delta {tuple(d.shape)} does not fit weight {tuple(w.shape)}")
            w.add_(d)
    model.eval()
    return model


def flax_params_with_deltas(ref: "R.Ref", factors: Factors, scale: float = 1.0) -> dict:
    """The weights of ``torch_model_with_deltas`` in the Flax layout (numpy), via the reference's
    torch -> Flax converters."""
    import jax

    model = torch_model_with_deltas(ref, factors, scale)
    return jax.tree_util.tree_map(np.asarray, R.torch_state_dict_to_flax(ref, model.state_dict()))
