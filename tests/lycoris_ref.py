"""Reference side of the LyCORIS / kohya-extension format tests.

diffusers cannot read LoHa, LoKr, LoCon Tucker, kohya ``dora_scale`` or full diffs, so the references
here are either PEFT's own adapter layers (LoHa, LoKr, DoRA, lora_bias) injected into a copy of a torch
model from ``tests/reference.py``, or the formats' published formulas written out in torch and applied to
the torch weights (LoCon Tucker, kohya DoRA, diffs).

Writers produce the files jlora reads:

* :func:`lycoris_tensors` takes the LoHa/LoKr parameters of a PEFT-injected model and names them with
  LyCORIS keys (``lora_unet_<module with _>.hada_w1_a`` ...). PEFT's LoHa/LoKr parameters have the
  LyCORIS shapes and orientation (checked against the formulas below by the tests).
* :func:`peft_file` saves a PEFT LoRA/DoRA model the way diffusers' training scripts do.
* :func:`save_kohya` writes a ``{key: tensor}`` dict as a safetensors file.

Formulas (torch layout, weight ``(out, in[, kh, kw])``):

* LoHa: ``ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha / r`` with ``r = w1b.shape[0]``; Tucker:
  ``w·a`` is ``(r, out)``, ``w·b`` is ``(r, in)``, ``t·`` is ``(r, r, kh, kw)`` and each Hadamard factor is
  ``einsum("ijhw,jc,io->ochw", t, wb, wa)``.
* LoKr: ``ΔW = c · kron(w1, w2)``, each factor full or ``a @ b`` (Tucker ``w2`` as in LoHa);
  ``c = alpha / r`` only when a factor is stored decomposed (``r`` = that factor's inner size), else 1.
* LoCon Tucker: ``ΔW = einsum("op,pqhw,qi->oihw", up, mid, down) · alpha / r``.
* kohya/LyCORIS DoRA (``dora_scale`` of shape ``(out, 1[,1,1])`` or ``(1, in[,1,1])``):
  ``V = W + ΔW·alpha/r``, ``W' = m · V / ‖V‖`` with the norm over every axis but the magnitude's,
  then blended by strength ``W + s·(W' − W)``.
* diffs: ``W += s · diff``, ``b += s · diff_b``.
"""

from __future__ import annotations

import copy
import os
from typing import Callable, Mapping, Optional

import torch

import reference as R

KOHYA_PREFIX = {R.UNET: "lora_unet", R.TEXT_ENCODER: "lora_te"}

ADAPTER_PARAM_NAMES = (
    "lora_A",
    "lora_B",
    "lora_magnitude_vector",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
)


def kohya_name(component: str, module: str) -> str:
    """The kohya/LyCORIS key prefix of a torch module: ``lora_unet_down_blocks_0_..._to_q``."""
    return f"{KOHYA_PREFIX[component]}_{module.replace('.', '_')}"


# --------------------------------------------------------------------------------------------
# PEFT models
# --------------------------------------------------------------------------------------------


def inject(ref: R.Ref, config, seed: int) -> torch.nn.Module:
    """A deep copy of ``ref.torch_model`` with ``config`` (any PEFT tuner config) injected as "default"."""
    from peft import inject_adapter_in_model

    model = copy.deepcopy(ref.torch_model)
    torch.manual_seed(seed)
    model = inject_adapter_in_model(config, model, adapter_name="default")
    model.requires_grad_(False)
    model.eval()
    return model


def tuner_layers(model: torch.nn.Module) -> dict:
    """``{module name: PEFT tuner layer}`` of an injected model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def adapter_params(layer, adapter: str = "default") -> dict:
    """``{PEFT parameter name: tensor}`` of one LoHa/LoKr layer (names are LyCORIS's)."""
    out = {}
    for name in layer.adapter_layer_names:
        store = getattr(layer, name)
        if adapter in store:
            out[name] = store[adapter].detach().clone()
    return out


def lycoris_tensors(model: torch.nn.Module, component: str, alphas: Optional[Mapping[str, float]] = None) -> dict:
    """LyCORIS keys for the LoHa/LoKr layers of a PEFT-injected model.

    Every module gets its factors under their LyCORIS names and an ``alpha`` (the layer's PEFT alpha, or
    ``alphas[module]`` when given).
    """
    out = {}
    for name, layer in tuner_layers(model).items():
        prefix = kohya_name(component, name)
        for pname, t in adapter_params(layer).items():
            out[f"{prefix}.{pname}"] = t.contiguous()
        alpha = (alphas or {}).get(name, layer.alpha["default"])
        out[f"{prefix}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def peft_file(tmp_dir, models: Mapping[str, torch.nn.Module], configs: Mapping[str, object]) -> str:
    """Save PEFT LoRA/DoRA-injected models (``{component: model}``) as a diffusers LoRA file with
    ``<component>_lora_adapter_metadata``, as diffusers' training scripts do."""
    from peft.utils import get_peft_model_state_dict

    kwargs = {}
    for component, model in models.items():
        sd = get_peft_model_state_dict(model)
        kwargs[f"{component}_lora_layers"] = {k: v.detach().clone().contiguous() for k, v in sd.items()}
        kwargs[f"{component}_lora_adapter_metadata"] = configs[component].to_dict()
    os.makedirs(str(tmp_dir), exist_ok=True)
    R._mixin("sd").save_lora_weights(str(tmp_dir), weight_name=R.LORA_WEIGHT_NAME, **kwargs)
    return os.path.join(str(tmp_dir), R.LORA_WEIGHT_NAME)


def save_kohya(path, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> str:
    from safetensors.torch import save_file

    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return str(path)


def plain_state_dict(model: torch.nn.Module) -> dict:
    """The state dict of a (possibly PEFT-injected and merged) model under the plain model's names."""
    out = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if any(p in ADAPTER_PARAM_NAMES for p in parts):
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().clone()
    return out


def peft_merged_state_dict(model: torch.nn.Module, scale: float) -> dict:
    """PEFT's own merge (``layer.merge()``, which uses ``get_delta_weight`` and, for DoRA, its weight
    norm) of every adapter layer at call scale ``scale`` (``scale_lora_layers``), as a plain state dict."""
    from diffusers.utils import scale_lora_layers

    merged = copy.deepcopy(model)
    scale_lora_layers(merged, scale)
    with torch.no_grad():
        for layer in tuner_layers(merged).values():
            layer.merge()
    return plain_state_dict(merged)


# --------------------------------------------------------------------------------------------
# Published formulas (torch layout)
# --------------------------------------------------------------------------------------------


def tucker_factor(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS CP/Tucker rebuild: core (r, r, kh, kw), wa (r, out), wb (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("ijhw,jc,io->ochw", t, wb, wa)


def loha_delta(t: Mapping[str, torch.Tensor], weight_shape) -> torch.Tensor:
    """LyCORIS LoHa delta of one module's tensors (keys without prefix), at strength 1."""
    r = t["hada_w1_b"].shape[0]
    scale = float(t["alpha"]) / r
    if "hada_t1" in t:
        d1 = tucker_factor(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        d2 = tucker_factor(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    else:
        d1 = t["hada_w1_a"] @ t["hada_w1_b"]
        d2 = t["hada_w2_a"] @ t["hada_w2_b"]
    return (d1 * d2 * scale).reshape(weight_shape)


def lokr_delta(t: Mapping[str, torch.Tensor], weight_shape) -> torch.Tensor:
    """LyCORIS LoKr delta of one module's tensors: ``c · kron(w1, w2)`` (c = alpha/r iff decomposed)."""
    dim = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
        dim = t["lokr_w1_b"].shape[0]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = tucker_factor(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        dim = t["lokr_w2_b"].shape[0]
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        dim = t["lokr_w2_b"].shape[0]
    c = float(t["alpha"]) / dim if dim is not None else 1.0
    if len(weight_shape) == 4:
        o1, i1 = w1.shape
        w2 = w2.reshape(weight_shape[0] // o1, weight_shape[1] // i1, *weight_shape[2:])
        w1 = w1[:, :, None, None]
    return (torch.kron(w1.contiguous(), w2.contiguous()) * c).reshape(weight_shape)


def locon_tucker_delta(up: torch.Tensor, mid: torch.Tensor, down: torch.Tensor, alpha: float) -> torch.Tensor:
    """LoCon Tucker: up (out, r, 1, 1), mid (r, r, kh, kw), down (r, in, 1, 1) -> (out, in, kh, kw)."""
    r = down.shape[0]
    return torch.einsum("op,pqhw,qi->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0]) * (alpha / r)


def lora_delta(up: torch.Tensor, down: torch.Tensor, alpha: float) -> torch.Tensor:
    """kohya LoRA/LoCon: up (out, r[, 1, 1]) · down (r, in[, kh, kw]) · alpha / r."""
    r = down.shape[0]
    d = up.reshape(up.shape[0], r) @ down.reshape(r, -1)
    return (d * (alpha / r)).reshape((up.shape[0],) + tuple(down.shape[1:]))


def dora_norm(v: torch.Tensor, per_output: bool) -> torch.Tensor:
    """‖v‖ over every axis but the output (``per_output``) or the input axis, kept broadcastable."""
    if per_output:
        return v.reshape(v.shape[0], -1).norm(dim=1).reshape(v.shape[0], *[1] * (v.dim() - 1))
    n = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1)
    return n.reshape(1, v.shape[1], *[1] * (v.dim() - 2))


def kohya_dora_weight(w: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, strength: float) -> torch.Tensor:
    """kohya/LyCORIS DoRA: ``W' = m · (W + ΔW) / ‖W + ΔW‖``, blended ``W + s·(W' − W)``.

    ``delta`` already carries alpha / r. The magnitude's axis: output when ``dora_scale.shape[0]`` equals
    the weight's output size, else input.
    """
    v = w + delta
    per_output = dora_scale.shape[0] == w.shape[0]
    target = v * (dora_scale.reshape(dora_norm(v, per_output).shape) / dora_norm(v, per_output))
    return w + strength * (target - w)


def dora_inside_weight(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, scale: float) -> torch.Tensor:
    """The other DoRA rule (PEFT's): the call scale multiplies ΔW inside the norm,
    ``m · (W + s·ΔW) / ‖W + s·ΔW‖``, on the magnitude's axis (as in :func:`kohya_dora_weight`)."""
    v = w + scale * delta
    norm = dora_norm(v, magnitude.shape[0] == w.shape[0])
    return v * (magnitude.reshape(norm.shape) / norm)


# --------------------------------------------------------------------------------------------
# Torch models with edited weights
# --------------------------------------------------------------------------------------------


def base_state_dict(ref: R.Ref) -> dict:
    return {k: v.detach().clone() for k, v in ref.torch_model.state_dict().items()}


def model_with_state_dict(ref: R.Ref, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A deep copy of ``ref.torch_model`` with ``state_dict`` loaded (strict)."""
    model = copy.deepcopy(ref.torch_model)
    model.load_state_dict(dict(state_dict), strict=True)
    model.eval()
    return model


def edited_state_dict(ref: R.Ref, edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]) -> dict:
    """``ref``'s state dict with ``edits[key](old) -> new`` applied."""
    sd = base_state_dict(ref)
    for key, fn in edits.items():
        if key not in sd:
            raise KeyError(f"{ref.name} has no weight {key!r}")
        new = fn(sd[key])
        if new.shape != sd[key].shape:
            raise ValueError(f"{key}: edit gives shape {tuple(new.shape)}, weight is {tuple(sd[key].shape)}")
        sd[key] = new.to(sd[key].dtype)
    return sd


def weight_of(ref: R.Ref, module: str, what: str = "weight") -> torch.Tensor:
    return ref.torch_model.state_dict()[f"{module}.{what}"].detach().clone()


def scaled_up(up: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, rel: float) -> torch.Tensor:
    """``up`` rescaled so that the delta it gives has norm ``rel · ‖w‖`` (the delta is linear in ``up``)."""
    return up * (rel * w.norm() / delta.norm())


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(gen: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def modules_of(ref: R.Ref, kinds=(torch.nn.Linear, torch.nn.Conv2d)) -> dict:
    return {n: m for n, m in ref.torch_model.named_modules() if isinstance(m, kinds)}


LINEAR_PARAM = ("lora_B", "hada_w1_a", "lokr_w1", "lokr_w1_a")


def amplify(model: torch.nn.Module, rel: float) -> None:
    """Rescale each adapter layer of a PEFT-injected model so its delta (at its own scaling) has norm
    ``rel · ‖W‖``, by multiplying the one factor the delta is linear in (``lora_B``, ``hada_w1_a``,
    ``lokr_w1`` or ``lokr_w1_a``). The layers stay PEFT's; only their parameter values change."""
    with torch.no_grad():
        for name, layer in tuner_layers(model).items():
            w = layer.get_base_layer().weight
            d = layer.get_delta_weight("default")
            ratio = float(rel * w.norm() / d.norm())
            pname = next(p for p in LINEAR_PARAM if "default" in getattr(layer, p, {}))
            store = getattr(layer, pname)["default"]
            if isinstance(store, torch.nn.Module):
                store.weight.mul_(ratio)
            else:
                store.mul_(ratio)
