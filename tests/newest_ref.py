"""Reference side run by the second reference environment (diffusers 0.42.1); see tests/newest.py.

Usage: `python newest_ref.py spec.json`. Writes `out` (npz) and `out.json` beside it. Ops:
* `state_dict`: the seeded model's weights.
* `batch`: several of these in one process (`cases`); outputs are prefixed `<i>/`.
* `fused`: the seeded model's weights (`base/...`), then the LoRA loaded by `<mixin>.lora_state_dict` +
  `load_lora_into_<component>` and fused at `scale` (`fused/...`); `info.loaded` lists PEFT-wrapped modules.
"""

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
    model = getattr(diffusers, spec["model"])(**spec["config"])
    return model.to(getattr(torch, spec.get("dtype", "float32"))).eval()


def _arrays(model, prefix):
    return {f"{prefix}{k}": v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def op_state_dict(spec):
    return _arrays(_model(spec), ""), {}


def op_fused(spec):
    from diffusers.loaders import lora_pipeline

    model = _model(spec)
    out = _arrays(model, "base/")
    mixin = getattr(lora_pipeline, spec["mixin"])
    capture = _Capture()
    logging.getLogger("diffusers").addHandler(capture)
    state = mixin.lora_state_dict(spec["lora"], return_lora_metadata=True)
    state, metadata = state if isinstance(state, tuple) else (state, None)
    component = spec.get("component", "transformer")
    if component == "transformer":
        mixin.load_lora_into_transformer(state, transformer=model, metadata=metadata)
    else:  # e.g. LTX-2's `connectors`: the same PEFT path, under the component's prefix
        model.load_lora_adapter(state, prefix=component, metadata=metadata)
    loaded = sorted({n.rsplit(".base_layer", 1)[0] for n, _ in model.named_modules() if n.endswith("base_layer")})
    model.fuse_lora(lora_scale=spec.get("scale", 1.0))
    model.unload_lora()
    out.update(_arrays(model, "fused/"))
    return out, {"loaded": loaded, "warnings": capture.messages}


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
