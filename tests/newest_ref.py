"""Reference side run by the second reference environment (diffusers 0.42.1); see tests/newest.py.

Usage: `python newest_ref.py spec.json`. Writes `out` (npz) and `out.json` beside it. Ops:
* `state_dict`: the seeded model's weights.
* `shapes`: the model's parameter shapes, built on the meta device (`info.shapes`).
* `batch`: several of these in one process (`cases`); outputs are prefixed `<i>/`.
* `fused`: the seeded model's weights (`base/...`), then the LoRA loaded by `<mixin>.lora_state_dict` +
  `load_lora_into_<component>` and fused at `scale` (`fused/...`); `info.loaded` lists PEFT-wrapped modules.
* `peft_file`: a PEFT LoRA on the seeded model, written by `<mixin>.save_lora_weights` to `path`.
"""

import importlib
import json
import logging
import pathlib
import sys

import numpy as np
import torch


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _model(spec):
    import diffusers

    torch.manual_seed(spec.get("seed", 0))
    where = importlib.import_module(spec["module"]) if spec.get("module") else diffusers  # e.g. diffusers.pipelines.ltx2
    model = getattr(where, spec["model"])(**spec["config"])
    return model.to(getattr(torch, spec.get("dtype", "float32"))).eval()


def _arrays(model, prefix):
    return {f"{prefix}{k}": v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def op_state_dict(spec):
    return _arrays(_model(spec), ""), {}


def op_shapes(spec):
    """The parameter shapes of `model` built from `config` on the meta device (no memory: released-model sizes)."""
    import diffusers

    where = importlib.import_module(spec["module"]) if spec.get("module") else diffusers
    with torch.device("meta"):
        model = getattr(where, spec["model"])(**spec["config"])
    return {}, {"shapes": {k: list(v.shape) for k, v in model.state_dict().items()}}


def op_fused(spec):
    from diffusers.loaders import lora_pipeline

    model = _model(spec)
    out = _arrays(model, "base/")
    mixin = getattr(lora_pipeline, spec["mixin"])
    capture = _Capture()
    logger = logging.getLogger("diffusers")
    logger.addHandler(capture)
    logger.setLevel(logging.WARNING)  # DIFFUSERS_VERBOSITY=error would drop the warnings before `capture` sees them
    state = mixin.lora_state_dict(spec["lora"], return_lora_metadata=True)
    state, metadata = state if isinstance(state, tuple) else (state, None)
    component = spec.get("component", "transformer")
    if component == "transformer":
        mixin.load_lora_into_transformer(state, transformer=model, metadata=metadata)
    else:  # e.g. LTX-2's `connectors`: the same PEFT path, under the component's prefix
        model.load_lora_adapter(state, prefix=component, metadata=metadata)
    loaded = sorted({n.rsplit(".base_layer", 1)[0] for n, _ in model.named_modules() if n.endswith("base_layer")})
    logger.removeHandler(capture)
    model.fuse_lora(lora_scale=spec.get("scale", 1.0))
    model.unload_lora()
    out.update(_arrays(model, "fused/"))
    return out, {"loaded": loaded, "warnings": capture.messages}


def op_peft_file(spec):
    """A PEFT LoRA (`r`, `alpha`, `targets`, random factors) saved by `<mixin>.save_lora_weights` to `path`."""
    from diffusers.loaders import lora_pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = _model(spec)
    torch.manual_seed(spec.get("lora_seed", 1))
    config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=spec["targets"],
                        init_lora_weights=False)
    model.add_adapter(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    path = pathlib.Path(spec["path"])
    getattr(lora_pipeline, spec["mixin"]).save_lora_weights(
        str(path.parent), transformer_lora_layers=get_peft_model_state_dict(model), weight_name=path.name,
        transformer_lora_adapter_metadata=config.to_dict())
    return {}, {"file": str(path)}


def op_peft_components(spec):
    """One PEFT LoRA over several components (`parts`: model spec + `r`, `alpha`, `targets`, `lora_seed` each),
    saved by the pipeline saver `<mixin>._save_lora_weights` to `path` with each component's config as metadata."""
    from diffusers.loaders import lora_pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    layers, metadata = {}, {}
    for part in spec["parts"]:
        model = _model(part)
        torch.manual_seed(part.get("lora_seed", 1))
        config = LoraConfig(r=part["r"], lora_alpha=part["alpha"], target_modules=part["targets"], init_lora_weights=False)
        model.add_adapter(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(3.0)
        layers[part["component"]] = get_peft_model_state_dict(model)
        metadata[part["component"]] = config.to_dict()
    path = pathlib.Path(spec["path"])
    getattr(lora_pipeline, spec["mixin"])._save_lora_weights(str(path.parent), layers, metadata, weight_name=path.name)
    return {}, {"file": str(path)}


def op_batch(spec):
    """Several ops in one process (one interpreter start): `cases` is a list of specs; outputs `<i>/...`."""
    arrays, infos = {}, []
    for i, case in enumerate(spec["cases"]):
        got, info = globals()[f"op_{case['op']}"](case)
        arrays.update({f"{i}/{k}": v for k, v in got.items()})
        infos.append(info)
    return arrays, {"cases": infos}


def main():
    spec = json.loads(pathlib.Path(sys.argv[1]).read_text())
    arrays, info = globals()[f"op_{spec['op']}"](spec)
    np.savez(spec["out"], **arrays)
    pathlib.Path(spec["out"]).with_name("out.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
