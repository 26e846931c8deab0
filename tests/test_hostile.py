"""Hostile input: every malformed LoRA file or state dict raises a typed `JloraError`.

Each case feeds one bad file (crafted byte by byte or written with jlora's own writer)
or one bad state dict to the public loaders with the tiny SD-1.5 UNet / CLIP models of
tests/reference.py, and checks three things:

  * the exception is the specific `JloraError` subclass for that problem;
  * its message names the offending key (or the file, when no key is to blame);
  * the caller's params trees and state dicts are the same objects, with the same
    keys and the same array values, after the call.

A hypothesis property test then throws random key sets, shapes, dtypes and alphas at
the loaders (as state dicts and as files) and checks that nothing but a `JloraError`
ever escapes and that nothing the caller passed in changes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import tempfile
import time
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jlora
import reference as R
from converters import safetensors_io
from converters.naming import DIFFUSERS_FLAX
from jlora import errors
from jlora.loading import shape_index
from untouched import untouched

# A square Dense kernel (32, 32) without bias, and its kohya spelling.
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KQ = "lora_unet_" + Q.replace(".", "_")
# A Dense kernel with a bias (32, 32).
OUT = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
# A non-square Dense kernel: Flax (in, out) = (32, 64), torch weight (64, 32).
MID_K = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
# A 3x3 conv kernel (3, 3, 32, 32).
CONV = "down_blocks.0.resnets.0.conv1"
KCONV = "lora_unet_" + CONV.replace(".", "_")
# A 1x1 conv kernel (1, 1, 32, 32) and its sgm (original SD) kohya spelling.
PROJ_IN = "down_blocks.0.attentions.0.proj_in"
KPROJ_IN = "lora_unet_" + PROJ_IN.replace(".", "_")
KPROJ_IN_SGM = "lora_unet_input_blocks_1_1_proj_in"
# A CLIP layer (torch_mirror naming) in kohya text-encoder spelling.
TE_FC1 = "text_model_encoder_layers_0_mlp_fc1"


def ones(*shape, dtype=np.float32):
    return np.ones(shape, dtype)


def peft(module: str, rank: int = 4, n_in: int = 32, n_out: int = 32, prefix: str = "unet.") -> dict:
    return {
        f"{prefix}{module}.lora_A.weight": ones(rank, n_in),
        f"{prefix}{module}.lora_B.weight": ones(n_out, rank),
    }


def kohya(name: str, rank: int = 4, n_in: int = 32, n_out: int = 32) -> dict:
    return {f"{name}.lora_down.weight": ones(rank, n_in), f"{name}.lora_up.weight": ones(n_out, rank)}


# --------------------------------------------------------------------------------------------
# caller data must be left alone
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# file builders
# --------------------------------------------------------------------------------------------


def write(path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> str:
    safetensors_io.save_file(tensors, path, metadata)
    return str(path)


def write_raw(path, header, data: bytes = b"", length: int | None = None) -> str:
    """A safetensors-like file: 8-byte little-endian header length, header bytes, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


A_KEY, B_KEY = f"unet.{Q}.lora_A.weight", f"unet.{Q}.lora_B.weight"


def crafted_header(**changes) -> dict:
    """Header of a valid rank-4 PEFT LoRA on `Q` (1024 data bytes), with entry fields replaced."""
    header = {
        A_KEY: {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]},
        B_KEY: {"dtype": "F32", "shape": [32, 4], "data_offsets": [512, 1024]},
    }
    for which, fields in changes.items():
        header[{"a": A_KEY, "b": B_KEY}[which]].update(fields)
    return header


DATA = np.ones(256, np.float32).tobytes()


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------




@dataclasses.dataclass
class Env:
    tmp: Any
    unet: dict
    clip: dict
    sd_file: str

    def path(self, name: str) -> str:
        return str(self.tmp / name)

    def load(self, src, **kw):
        """`load_lora` onto the UNet."""
        return jlora.load_lora(src, self.unet, "unet", **kw)

    def load_both(self, src, **kw):
        return jlora.load_lora_weights(src, {"unet": self.unet, "text_encoder": self.clip}, **kw)


@pytest.fixture
def env(tmp_path, unet, clip, sd_file):
    return Env(tmp_path, unet.flax_params, clip.flax_params, sd_file)


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """`build(env) -> (call, names, state_dicts)`: `call()` must raise `error` whose message
    contains every string in `names`; `state_dicts` are the dicts handed to jlora."""

    build: Callable
    error: type | tuple
    bug: str | None = None


CASES: dict[str, Case] = {}


def case(error, bug: str | None = None):
    def register(fn):
        CASES[fn.__name__] = Case(fn, error, bug)
        return fn

    return register


# ---- corrupt files ---------------------------------------------------------------------------


@case(errors.CorruptFileError)
def truncated_by_one_byte(env):
    tensors = {**kohya(KQ), f"{KQ}.alpha": np.float32(4)}
    path = write(env.path("kohya.safetensors"), tensors)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1)
    last = max(tensors)  # the writer lays tensors out in sorted key order
    return lambda: env.load(path), [path, last, "truncated"], []


@case(errors.CorruptFileError)
def empty_file_zero_bytes(env):
    path = env.path("empty.safetensors")
    open(path, "wb").close()
    return lambda: env.load_both(path), [path, "0 bytes"], []


@case(errors.UnsupportedFormatError)
def file_with_zero_tensors(env):
    path = write_raw(env.path("no_tensors.safetensors"), b"{}      ")
    return lambda: env.load(path), [path, "no tensors"], []


@case(errors.CorruptFileError)
def header_length_too_big(env):
    path = write_raw(env.path("big.safetensors"), crafted_header(), DATA, length=2**63)
    return lambda: env.load(path), [path, str(2**63)], []


@case(errors.CorruptFileError)
def header_length_all_ones(env):
    path = write_raw(env.path("ffff.safetensors"), crafted_header(), DATA, length=2**64 - 1)
    return lambda: env.load(path), [path, str(2**64 - 1)], []


@case(errors.CorruptFileError)
def header_length_past_eof(env):
    raw = json.dumps(crafted_header()).encode()
    n = len(raw) + len(DATA) + 1
    path = write_raw(env.path("past_eof.safetensors"), raw, DATA, length=n)
    return lambda: env.load(path), [path, str(n)], []


@case(errors.CorruptFileError)
def header_not_utf8(env):
    path = write_raw(env.path("latin1.safetensors"), b"\xff\xfe{\"\xe9\": 1}", DATA)
    return lambda: env.load(path), [path, "JSON"], []


@case(errors.CorruptFileError)
def header_json_null(env):
    path = write_raw(env.path("null.safetensors"), b"null", DATA)
    return lambda: env.load(path), [path, "not a JSON object"], []


@case(errors.CorruptFileError)
def header_json_string(env):
    path = write_raw(env.path("string.safetensors"), b'"unet.lora_A.weight"', DATA)
    return lambda: env.load(path), [path, "not a JSON object"], []


@case(errors.CorruptFileError)
def overlapping_offsets(env):
    path = write_raw(env.path("overlap.safetensors"), crafted_header(b={"data_offsets": [256, 768]}), DATA)
    return lambda: env.load(path), [path, A_KEY, B_KEY, "overlap"], []


@case(errors.CorruptFileError)
def offsets_reversed(env):
    path = write_raw(env.path("reversed.safetensors"), crafted_header(a={"data_offsets": [512, 0]}), DATA)
    return lambda: env.load(path), [path, A_KEY, "[512, 0]"], []


@case(errors.CorruptFileError)
def offsets_negative(env):
    path = write_raw(env.path("negative.safetensors"), crafted_header(a={"data_offsets": [-512, 0]}), DATA)
    return lambda: env.load(path), [path, A_KEY, "-512"], []


@case(errors.CorruptFileError)
def offsets_past_data(env):
    path = write_raw(env.path("past_data.safetensors"), crafted_header(b={"data_offsets": [1024, 1536]}), DATA)
    return lambda: env.load(path), [path, B_KEY, "1536"], []


@case(errors.CorruptFileError)
def shape_negative(env):
    path = write_raw(env.path("neg_shape.safetensors"), crafted_header(a={"shape": [-4, -32]}), DATA)
    return lambda: env.load(path), [path, A_KEY, "[-4, -32]"], []


@case(errors.CorruptFileError)
def unknown_dtype_string(env):
    path = write_raw(env.path("c64.safetensors"), crafted_header(a={"dtype": "C64", "data_offsets": [0, 512]}), DATA)
    return lambda: env.load(path), [path, A_KEY, "C64"], []


@case(errors.CorruptFileError)
def dtype_not_a_string(env):
    path = write_raw(env.path("dtype_list.safetensors"), crafted_header(a={"dtype": ["F32"]}), DATA)
    return lambda: env.load(path), [path, A_KEY], []


@case(errors.CorruptFileError)
def shape_beyond_int64(env):
    path = write_raw(env.path("shape_huge.safetensors"), crafted_header(a={"shape": [2**70], "data_offsets": [0, 0]}), DATA)
    return lambda: env.load(path), [path, A_KEY], []


@case(errors.CorruptFileError)
def shape_product_wraps_to_zero(env):
    path = write_raw(env.path("wrap.safetensors"), crafted_header(a={"shape": [2**32, 2**32], "data_offsets": [0, 0]}), DATA)
    return lambda: env.load(path), [path, A_KEY], []


@case(errors.CorruptFileError)
def shape_with_json_bool(env):
    header = crafted_header(a={"shape": [True, 4, 32]})
    path = write_raw(env.path("bool_shape.safetensors"), header, DATA)
    return lambda: env.load(path), [path, A_KEY], []


@case(errors.CorruptFileError)
def header_deeply_nested_json(env):
    path = write_raw(env.path("deep.safetensors"), b"[" * 100_000 + b"]" * 100_000, DATA)
    return lambda: env.load(path), [path], []


@case(errors.CorruptFileError)
def adapter_metadata_not_json(env):
    path = write(env.path("md.safetensors"), peft(Q), {"lora_adapter_metadata": "{'r': 4"})
    return lambda: env.load(path), [path, "lora_adapter_metadata"], []


@case(
    (errors.InvalidAdapterError, errors.CorruptFileError),
)
def adapter_metadata_alpha_not_a_number(env):
    path = write(env.path("md_alpha.safetensors"), peft(Q), {"lora_adapter_metadata": json.dumps({"lora_alpha": "eight"})})
    return lambda: env.load(path), [path, "lora_alpha"], []


@case(
    (errors.InvalidAdapterError, errors.CorruptFileError),
)
def adapter_metadata_rank_not_a_number(env):
    path = write(env.path("md_r.safetensors"), peft(Q), {"lora_adapter_metadata": json.dumps({"r": "four"})})
    return lambda: env.load(path), [path, "'r'"], []


@case(errors.InvalidAdapterError)
def adapter_metadata_alpha_nan(env):
    path = write(env.path("md_nan.safetensors"), peft(Q), {"lora_adapter_metadata": json.dumps({"lora_alpha": float("nan")})})
    return lambda: env.load(path), [path, "lora_alpha"], []


@case(
    (errors.InvalidAdapterError, errors.CorruptFileError),
)
def adapter_metadata_alpha_pattern_not_an_object(env):
    md = json.dumps({"lora_alpha": 4, "alpha_pattern": ["to_q", 8]})
    path = write(env.path("md_pattern.safetensors"), peft(Q), {"lora_adapter_metadata": md})
    return lambda: env.load(path), [path, "alpha_pattern"], []


@case(
    (errors.InvalidAdapterError, errors.CorruptFileError),
)
def adapter_metadata_alpha_pattern_bad_regex(env):
    md = json.dumps({"lora_alpha": 4, "alpha_pattern": {"to_(q": 8}})
    path = write(env.path("md_regex.safetensors"), peft(Q), {"lora_adapter_metadata": md})
    return lambda: env.load(path), [path, "to_(q"], []


# ---- tensors of the wrong kind ---------------------------------------------------------------


@case(errors.InvalidAdapterError)
def integer_factor(env):
    path = write(env.path("int.safetensors"), {**peft(Q), A_KEY: ones(4, 32, dtype=np.int32)})
    return lambda: env.load(path), [A_KEY, "int32"], []


@case(errors.InvalidAdapterError)
def bool_factor(env):
    path = write(env.path("bool.safetensors"), {**peft(Q), B_KEY: ones(32, 4, dtype=np.bool_)})
    return lambda: env.load(path), [B_KEY, "bool"], []


@case(errors.UnsafeFusingError)
def nan_factor_fails_safe_fusing(env):
    path = write(env.path("nan.safetensors"), {**peft(Q), B_KEY: np.full((32, 4), np.nan, np.float32)})
    return (
        lambda: jlora.fuse(env.unet, env.load(path), 0.5, safe_fusing=True),
        ["'down_blocks_0'", "'attn1'", "'to_q'", "'kernel'"],
        [],
    )


@case(errors.UnsafeFusingError)
def inf_factor_fails_safe_fusing(env):
    sd = {**kohya(KCONV), f"{KCONV}.lora_down.weight": np.full((4, 32, 3, 3), np.inf, np.float16)}
    return (
        lambda: jlora.fuse(env.unet, env.load(sd), safe_fusing=True),
        ["'resnets_0'", "'conv1'", "'kernel'"],
        [sd],
    )


@case(errors.InvalidAdapterError)
def rank_mismatch_peft_file(env):
    path = write(env.path("rank.safetensors"), {**peft(Q), B_KEY: ones(32, 6)})
    return lambda: env.load(path), [A_KEY, B_KEY, "(4, 32)", "(32, 6)"], []


@case(errors.InvalidAdapterError)
def rank_mismatch_kohya(env):
    sd = {**kohya(KQ), f"{KQ}.lora_up.weight": ones(32, 5)}
    return lambda: env.load(sd), [f"{KQ}.lora_down.weight", f"{KQ}.lora_up.weight", "(32, 5)"], [sd]


@case(errors.InvalidAdapterError)
def three_d_factor(env):
    sd = {**peft(Q), A_KEY: ones(4, 32, 1)}
    return lambda: env.load(sd), [A_KEY, "(4, 32, 1)"], [sd]


@case(errors.InvalidAdapterError)
def conv_up_factor_not_1x1(env):
    sd = {f"{KCONV}.lora_down.weight": ones(4, 32, 3, 3), f"{KCONV}.lora_up.weight": ones(32, 4, 3, 3)}
    return lambda: env.load(sd), [f"{KCONV}.lora_up.weight", "(32, 4, 3, 3)"], [sd]


@case(errors.InvalidAdapterError)
def tucker_mid_of_wrong_shape(env):
    sd = {
        f"{KCONV}.lora_down.weight": ones(4, 32, 1, 1),
        f"{KCONV}.lora_up.weight": ones(32, 4, 1, 1),
        f"{KCONV}.lora_mid.weight": ones(4, 5, 3, 3),
    }
    return lambda: env.load(sd), [f"{KCONV}.lora_mid.weight", "(4, 5, 3, 3)"], [sd]


@case(errors.InvalidAdapterError)
def zero_rank_factors(env):
    sd = {A_KEY: ones(0, 32), B_KEY: ones(32, 0)}
    return lambda: env.load(sd), [A_KEY, "(0, 32)"], [sd]


@case(errors.InvalidAdapterError)
def alpha_vector_kohya(env):
    sd = {**kohya(KQ), f"{KQ}.alpha": np.full((4,), 4.0, np.float32)}
    return lambda: env.load(sd), [f"{KQ}.alpha", "(4,)"], [sd]


@case(errors.InvalidAdapterError)
def alpha_nan_peft_file(env):
    alpha_key = f"unet.{Q}.alpha"
    path = write(env.path("alpha_nan.safetensors"), {**peft(Q), alpha_key: np.array(np.nan, np.float32)})
    return lambda: env.load(path), [alpha_key, "nan"], []


@case(errors.InvalidAdapterError)
def alpha_overflows_float16(env):
    sd = {**kohya(KQ), f"{KQ}.alpha": np.array(1e5, np.float32).astype(np.float16)}
    return lambda: env.load(sd), [f"{KQ}.alpha", "inf"], [sd]


@case(errors.InvalidAdapterError)
def alpha_is_a_string(env):
    sd = {**kohya(KQ), f"{KQ}.alpha": "eight"}
    return lambda: env.load(sd), [f"{KQ}.alpha"], [sd]


@case(errors.InvalidAdapterError)
def alpha_is_complex(env):
    sd = {**kohya(KQ), f"{KQ}.alpha": np.complex64(4 + 3j)}
    return lambda: env.load(sd), [f"{KQ}.alpha"], [sd]


# ---- duplicates and mixed formats ------------------------------------------------------------


@case(errors.InvalidAdapterError)
def duplicate_peft_adapter_name_spelling(env):
    sd = {
        **peft(Q),
        f"unet.{Q}.lora_A.default.weight": ones(4, 32),
        f"unet.{Q}.lora_B.default.weight": ones(32, 4),
    }
    return lambda: env.load(sd), [A_KEY, f"unet.{Q}.lora_A.default.weight", "duplicate"], [sd]


@case(errors.InvalidAdapterError)
def duplicate_peft_base_model_spelling(env):
    path = write(env.path("dup_base.safetensors"), {**peft(Q), **peft(Q, prefix="unet.base_model.model.")})
    return lambda: env.load(path), [A_KEY, f"unet.base_model.model.{Q}.lora_A.weight", "duplicate"], []


@case(errors.InvalidAdapterError)
def duplicate_kohya_sgm_and_diffusers_names(env):
    sd = {
        f"{KPROJ_IN}.lora_down.weight": ones(4, 32, 1, 1),
        f"{KPROJ_IN}.lora_up.weight": ones(32, 4, 1, 1),
        f"{KPROJ_IN_SGM}.lora_down.weight": ones(4, 32, 1, 1),
        f"{KPROJ_IN_SGM}.lora_up.weight": ones(32, 4, 1, 1),
    }
    names = [f"{KPROJ_IN}.lora_down.weight", f"{KPROJ_IN_SGM}.lora_down.weight", "proj_in/kernel", "duplicate"]
    return lambda: env.load(sd), names, [sd]


@case(errors.InvalidAdapterError)
def duplicate_kohya_te_and_te1(env):
    sd = {**kohya(f"lora_te_{TE_FC1}", n_out=64), **kohya(f"lora_te1_{TE_FC1}", n_out=64)}
    call = lambda: jlora.load_lora(sd, env.clip, "text_encoder")  # noqa: E731
    return call, [f"lora_te_{TE_FC1}.lora_down.weight", f"lora_te1_{TE_FC1}.lora_down.weight"], [sd]


@case(errors.InvalidAdapterError)
def duplicate_old_diffusers_processor_spelling(env):
    parent = Q.rsplit(".", 1)[0]
    sd = {
        f"unet.{parent}.processor.to_q_lora.down.weight": ones(4, 32),
        f"unet.{parent}.processor.to_q_lora.up.weight": ones(32, 4),
        f"unet.{parent}.to_q_lora.down.weight": ones(4, 32),
        f"unet.{parent}.to_q_lora.up.weight": ones(32, 4),
    }
    names = [f"unet.{parent}.processor.to_q_lora.down.weight", f"unet.{parent}.to_q_lora.down.weight"]
    return lambda: env.load(sd), names, [sd]


@case(errors.UnsupportedFormatError)
def kohya_and_old_diffusers_in_one_file(env):
    parent = Q.rsplit(".", 1)[0]
    tensors = {
        **kohya(KQ),
        f"unet.{parent}.processor.to_k_lora.down.weight": ones(4, 32),
        f"unet.{parent}.processor.to_k_lora.up.weight": ones(32, 4),
    }
    path = write(env.path("kohya_old.safetensors"), tensors)
    return lambda: env.load(path), [path, "kohya", "diffusers_old", "format="], []


@case(errors.UnsupportedFormatError)
def peft_and_kohya_in_one_state_dict(env):
    sd = {**peft(Q), **kohya(KCONV, n_in=32 * 9)}
    return lambda: env.load_both(sd), ["peft", "kohya", "format="], [sd]


# ---- incomplete modules ----------------------------------------------------------------------


@case(errors.InvalidAdapterError)
def lora_b_without_lora_a(env):
    path = write(env.path("b_only.safetensors"), {B_KEY: ones(32, 4)})
    return lambda: env.load(path), [B_KEY, "'down'"], []


@case(errors.InvalidAdapterError)
def kohya_down_without_up(env):
    sd = {f"{KQ}.lora_down.weight": ones(4, 32), f"{KQ}.alpha": np.float32(4)}
    return lambda: env.load(sd), [f"{KQ}.lora_down.weight", "'up'"], [sd]


@case(errors.InvalidAdapterError)
def loha_without_hada_w2_b(env):
    sd = {f"{KQ}.hada_w1_a": ones(32, 4), f"{KQ}.hada_w1_b": ones(4, 32), f"{KQ}.hada_w2_a": ones(32, 4)}
    return lambda: env.load(sd), [f"{KQ}.hada_w1_a", "'w2b'"], [sd]


@case(errors.InvalidAdapterError)
def loha_tucker_core_of_wrong_shape(env):
    sd = {
        f"{KQ}.hada_w1_a": ones(4, 32),
        f"{KQ}.hada_w1_b": ones(4, 32),
        f"{KQ}.hada_w2_a": ones(32, 4),
        f"{KQ}.hada_w2_b": ones(4, 32),
        f"{KQ}.hada_t1": ones(4, 4),
    }
    return lambda: env.load(sd), [f"{KQ}.hada_t1"], [sd]


@case(errors.ShapeMismatchError)
def lokr_factors_do_not_divide(env):
    sd = {f"{KQ}.lokr_w1": ones(3, 5), f"{KQ}.lokr_w2": ones(8, 8)}
    return lambda: env.load(sd), [f"{KQ}.lokr_w1", "(3, 5)", "(32, 32)"], [sd]


@case(errors.InvalidAdapterError)
def lokr_tucker_core_of_wrong_shape(env):
    sd = {
        f"{KQ}.lokr_w1": ones(4, 4),
        f"{KQ}.lokr_w2_a": ones(2, 8),
        f"{KQ}.lokr_w2_b": ones(2, 8),
        f"{KQ}.lokr_t2": ones(5, 5, 1, 1),
    }
    return lambda: env.load(sd), [f"{KQ}.lokr_t2"], [sd]


@case(errors.InvalidAdapterError)
def lokr_decomposed_factor_0d(env):
    sd = {f"{KQ}.lokr_w1": ones(4, 4), f"{KQ}.lokr_w2_a": np.array(0.5, np.float32), f"{KQ}.lokr_w2_b": ones(1, 8)}
    return lambda: env.load(sd), [f"{KQ}.lokr_w2_a"], [sd]


@case(errors.InvalidAdapterError)
def full_diff_3d(env):
    sd = {f"{KQ}.diff": ones(32, 32, 1)}
    return lambda: env.load(sd), [f"{KQ}.diff", "(32, 32, 1)"], [sd]


@case(errors.ShapeMismatchError)
def dora_magnitude_of_wrong_length(env):
    key = f"unet.{Q}.lora_magnitude_vector"
    sd = {**peft(Q), key: ones(31)}
    return lambda: env.load(sd), [key, "(31,)"], [sd]


@case(errors.ShapeMismatchError)
def kohya_dora_scale_of_wrong_shape(env):
    sd = {**kohya(KQ), f"{KQ}.dora_scale": ones(1, 33)}
    return lambda: env.load(sd), [f"{KQ}.dora_scale", "(1, 33)"], [sd]


@case(errors.ShapeMismatchError)
def lora_b_bias_of_wrong_size(env):
    key = f"unet.{OUT}.lora_B.bias"
    path = write(env.path("bias.safetensors"), {**peft(OUT), key: ones(31)})
    return lambda: env.load(path), [key, "(31,)", "(32,)"], []


@case(errors.KeyMismatchError)
def lora_b_bias_on_module_without_bias(env):
    key = f"unet.{Q}.lora_B.bias"
    sd = {**peft(Q), key: ones(32)}
    return lambda: env.load(sd), [key, "to_q/bias"], [sd]


# ---- state dicts that are not {str: array} ---------------------------------------------------


@case(errors.CorruptFileError)
def state_dict_int_key(env):
    sd = {**peft(Q), 7: ones(4, 32)}
    return lambda: env.load(sd), ["7", "strings"], [sd]


@case(errors.CorruptFileError)
def state_dict_bytes_key(env):
    sd = {**peft(OUT), A_KEY.encode(): ones(4, 32)}
    return lambda: env.load_both(sd), [repr(A_KEY.encode())], [sd]


@case(errors.InvalidAdapterError)
def state_dict_object_value(env):
    sd = {**peft(Q), B_KEY: object()}
    return lambda: env.load(sd), [B_KEY, "object"], [sd]


@case(errors.CorruptFileError)
def state_dict_ragged_list_value(env):
    sd = {**peft(Q), A_KEY: [[1.0] * 32, [1.0] * 31]}
    return lambda: env.load(sd), [A_KEY, "list"], [sd]


@case(errors.UnsupportedFormatError)
def state_dict_empty(env):
    sd = {}
    return lambda: env.load_both(sd), ["<state dict>", "no tensors"], [sd]


@case(errors.CorruptFileError)
def state_dict_torch_meta_tensor(env):
    sd = {**peft(Q), A_KEY: torch.empty(4, 32, device="meta")}
    return lambda: env.load(sd), [A_KEY], [sd]


@case(errors.CorruptFileError)
def state_dict_torch_sparse_tensor(env):
    sd = {**peft(Q), B_KEY: torch.ones(32, 4).to_sparse()}
    return lambda: env.load(sd), [B_KEY], [sd]


@case(errors.InvalidAdapterError)
def state_dict_float128_factor(env):
    sd = {**peft(Q), A_KEY: ones(4, 32, dtype=np.longdouble)}
    return lambda: env.load(sd), [A_KEY, "float128"], [sd]


# ---- keys that place nowhere -----------------------------------------------------------------


@case(errors.UnsupportedFormatError)
def format_nonexistent(env):
    return lambda: env.load(env.sd_file, format="nonexistent"), ["'nonexistent'", "peft"], []


@case(errors.KeyMismatchError)
def block_that_does_not_exist(env):
    sd = {**peft(Q), **peft("down_blocks.9.attentions.0.proj_in")}
    key = "unet.down_blocks.9.attentions.0.proj_in.lora_A.weight"
    return lambda: env.load(sd, strict=True), [key, "down_blocks_9", "strict=False"], [sd]


@case(errors.KeyMismatchError)
def kohya_module_that_matches_nothing(env):
    path = write(env.path("kohya_nomatch.safetensors"), {**kohya(KQ), **kohya("lora_unet_down_blocks_0_no_such_proj")})
    return lambda: env.load(path), [path, "lora_unet_down_blocks_0_no_such_proj.lora_down.weight"], []


@case(errors.KeyMismatchError)
def lora_on_a_layer_without_kernel_reports_the_key(env):
    key = "unet.down_blocks.0.resnets.0.norm1.lora_A.weight"
    sd = peft("down_blocks.0.resnets.0.norm1")
    return lambda: env.load(sd), [key], [sd]


@case(errors.KeyMismatchError)
def lora_on_a_layer_without_kernel_says_why(env):
    sd = peft("down_blocks.0.resnets.0.norm1")
    return lambda: env.load(sd), ["norm1/kernel"], [sd]


@case(errors.KeyMismatchError)
def orphan_alpha(env):
    key = f"unet.{PROJ_IN}.alpha"
    sd = {**peft(Q), key: np.float32(8)}
    return lambda: env.load(sd), [key, "no rule"], [sd]


@case(errors.KeyMismatchError)
def unet_lora_onto_clip_params(env):
    tensors, _ = R.read_lora_file(env.sd_file)
    unet_only = {k: v for k, v in tensors.items() if k.startswith("unet.")}
    path = write(env.path("unet_only.safetensors"), unet_only)
    return lambda: jlora.load_lora(path, env.clip, "unet"), [path, "unet.down_blocks.0."], []


@case(errors.KeyMismatchError)
def sd_lora_onto_clip_params(env):
    return lambda: jlora.load_lora_weights(env.sd_file, {"unet": env.clip}), [env.sd_file, "unet.down_blocks.0."], []


@case(errors.KeyMismatchError)
def no_component_prefix_with_several_components(env):
    sd = peft(Q, prefix="")
    return lambda: env.load_both(sd), [f"{Q}.lora_A.weight", "component"], [sd]


@case(errors.KeyMismatchError)
def unknown_component_prefix_with_several_components(env):
    sd = peft(Q, prefix="prior_unet.")
    return lambda: env.load_both(sd), [f"prior_unet.{Q}.lora_A.weight"], [sd]


@case(errors.KeyMismatchError)
def component_that_was_not_given(env):
    sd = peft(Q, prefix="transformer.")
    return lambda: env.load_both(sd), ["'transformer'", "'unet'"], [sd]


@case(errors.ShapeMismatchError)
def in_and_out_swapped(env):
    a_key = f"unet.{MID_K}.lora_A.weight"
    path = write(env.path("transposed.safetensors"), {a_key: ones(4, 64), f"unet.{MID_K}.lora_B.weight": ones(32, 4)})
    return lambda: env.load(path), [a_key, "(64, 32)", "(32, 64)"], []


@case(errors.ShapeMismatchError)
def conv_factor_on_dense_kernel(env):
    sd = {**peft(Q), A_KEY: ones(4, 32, 3, 3)}
    return lambda: env.load(sd), [A_KEY, "(4, 32, 3, 3)", "(32, 32)"], [sd]


@case(errors.ShapeMismatchError)
def dense_factor_on_3x3_conv(env):
    key = f"unet.{CONV}.lora_A.weight"
    sd = peft(CONV)
    return lambda: env.load(sd), [key, "(3, 3, 32, 32)"], [sd]


# ---- patterns from files: bounded and linear-time -----------------------------------------


def _md(**config) -> dict:
    return {"lora_adapter_metadata": json.dumps(config)}


@case(errors.InvalidAdapterError)
def alpha_pattern_key_too_long(env):
    key = "a" * 1001
    path = write(env.path("p_long.safetensors"), peft(Q), _md(r=4, lora_alpha=4, alpha_pattern={key: 8}))
    return lambda: env.load(path), [path, "alpha_pattern", "1001 characters"], []


@case(errors.InvalidAdapterError)
def alpha_pattern_too_many_keys(env):
    path = write(env.path("p_many.safetensors"), peft(Q), _md(r=4, lora_alpha=4, alpha_pattern={f"m{i}": 8 for i in range(50_001)}))
    return lambda: env.load(path), [path, "alpha_pattern", "50001 keys"], []


@case(errors.InvalidAdapterError)
def alpha_pattern_too_many_regex_keys(env):
    path = write(env.path("p_regex.safetensors"), peft(Q), _md(r=4, lora_alpha=4, alpha_pattern={f"m{i}.*x": 8 for i in range(1001)}))
    return lambda: env.load(path), [path, "alpha_pattern", "regular-expression keys"], []


@case(errors.InvalidAdapterError)
def alpha_pattern_backreference(env):
    path = write(env.path("p_backref.safetensors"), peft(Q), _md(r=4, lora_alpha=4, alpha_pattern={r"(a)\1": 8}))
    return lambda: env.load(path), [path, "alpha_pattern", r"(a)\\1"], []


@case(errors.InvalidAdapterError)
def alpha_pattern_lookahead(env):
    path = write(env.path("p_look.safetensors"), peft(Q), _md(r=4, lora_alpha=4, alpha_pattern={"to_q(?=x)": 8}))
    return lambda: env.load(path), [path, "alpha_pattern", "to_q(?=x)"], []


@case(errors.InvalidAdapterError)
def alpha_pattern_unbalanced(env):
    path = write(env.path("p_paren.safetensors"), peft(Q), _md(r=4, lora_alpha=4, alpha_pattern={"to_q(": 8}))
    return lambda: env.load(path), [path, "alpha_pattern", "to_q("], []


@case(errors.InvalidAdapterError)
def alpha_pattern_value_a_string(env):
    path = write(env.path("p_str.safetensors"), peft(Q), _md(r=4, lora_alpha=4, alpha_pattern={"to_q": "8"}))
    return lambda: env.load(path), [path, "alpha_pattern['to_q']"], []


@case(errors.InvalidAdapterError)
def alpha_pattern_value_infinite(env):
    path = write(env.path("p_inf.safetensors"), peft(Q), {"lora_adapter_metadata": '{"r": 4, "alpha_pattern": {"to_q": Infinity}}'})
    return lambda: env.load(path), [path, "alpha_pattern['to_q']", "inf"], []


@case(errors.InvalidAdapterError)
def alpha_pattern_value_beyond_float32(env):
    path = write(env.path("p_big.safetensors"), peft(Q), _md(r=4, alpha_pattern={"attn1.to_q": 1e39}))
    return lambda: env.load(path), [path, "alpha_pattern['attn1.to_q']", "float32"], []


@case(errors.InvalidAdapterError)
def alpha_pattern_regex_value_nan(env):
    path = write(env.path("p_nan.safetensors"), peft(Q), {"lora_adapter_metadata": '{"r": 4, "alpha_pattern": {"attn[12].to_q": NaN}}'})
    return lambda: env.load(path), [path, "attn[12].to_q", "nan"], []


@case(errors.InvalidAdapterError)
def alpha_pattern_a_list(env):
    path = write(env.path("p_list.safetensors"), peft(Q), _md(r=4, alpha_pattern=[["to_q", 8]]))
    return lambda: env.load(path), [path, "alpha_pattern", "must be an object"], []


# ---- numbers that would overflow or vanish --------------------------------------------------


def _kohya_alpha(value, dtype):
    return {**kohya(KQ), f"{KQ}.alpha": np.array(value, dtype)}


@case(errors.InvalidAdapterError)
def alpha_tensor_beyond_float32_in_f64(env):
    sd = _kohya_alpha(1e300, np.float64)
    return lambda: env.load(sd), [f"{KQ}.alpha", "float32"], [sd]


@case(errors.InvalidAdapterError)
def alpha_tensor_infinite(env):
    sd = _kohya_alpha(np.inf, np.float32)
    return lambda: env.load(sd), [f"{KQ}.alpha", "inf"], [sd]


@case(errors.InvalidAdapterError)
def alpha_tensor_negative_infinite_f16(env):
    sd = _kohya_alpha(-np.inf, np.float16)
    return lambda: env.load(sd), [f"{KQ}.alpha", "-inf"], [sd]


@case(errors.InvalidAdapterError)
def alpha_tensor_nan_in_file(env):
    path = write(env.path("alpha_nan.safetensors"), _kohya_alpha(np.nan, np.float32))
    return lambda: env.load(path), [f"{KQ}.alpha", "nan"], []


@case(errors.InvalidAdapterError)
def metadata_alpha_beyond_float32(env):
    path = write(env.path("md_1e39.safetensors"), peft(Q), _md(r=4, lora_alpha=1e39))
    return lambda: env.load(path), [path, "lora_alpha", "float32"], []


@case(errors.InvalidAdapterError)
def metadata_alpha_huge_integer(env):
    path = write(env.path("md_int.safetensors"), peft(Q), {"lora_adapter_metadata": '{"r": 4, "lora_alpha": 1' + "0" * 400 + "}"})
    return lambda: env.load(path), [path, "lora_alpha", "401 digits"], []


@case(errors.InvalidAdapterError)
def metadata_alpha_infinity_literal(env):
    path = write(env.path("md_infl.safetensors"), peft(Q), {"lora_adapter_metadata": '{"r": 4, "lora_alpha": -Infinity}'})
    return lambda: env.load(path), [path, "lora_alpha", "-inf"], []


@case(errors.InvalidAdapterError)
def metadata_component_alpha_nan(env):
    path = write(env.path("md_cnan.safetensors"), peft(Q), {"lora_adapter_metadata": '{"unet.r": 4, "unet.lora_alpha": NaN}'})
    return lambda: env.load(path), [path, "lora_alpha"], []


@case(errors.InvalidAdapterError)
def metadata_rank_zero(env):
    path = write(env.path("md_r0.safetensors"), peft(Q), _md(r=0))
    return lambda: env.load(path), [path, "'r'", ">= 1"], []


@case(errors.InvalidAdapterError)
def metadata_rank_zero_with_alpha(env):
    path = write(env.path("md_r0a.safetensors"), peft(Q), _md(r=0, lora_alpha=8))
    return lambda: env.load(path), [path, "'r'", ">= 1"], []


@case(errors.InvalidAdapterError)
def metadata_rank_negative(env):
    path = write(env.path("md_rneg.safetensors"), peft(Q), _md(r=-4))
    return lambda: env.load(path), [path, "'r'"], []


@case(errors.InvalidAdapterError)
def metadata_rank_fractional(env):
    path = write(env.path("md_rfrac.safetensors"), peft(Q), _md(r=2.5))
    return lambda: env.load(path), [path, "'r'", "2.5"], []


@case(errors.InvalidAdapterError)
def metadata_rank_bool(env):
    path = write(env.path("md_rbool.safetensors"), peft(Q), _md(r=True))
    return lambda: env.load(path), [path, "'r'"], []


@case(errors.InvalidAdapterError)
def metadata_rank_huge_integer(env):
    path = write(env.path("md_rhuge.safetensors"), peft(Q), {"lora_adapter_metadata": '{"r": 9' + "9" * 400 + "}"})
    return lambda: env.load(path), [path, "'r'"], []


# ---- scales and arguments -------------------------------------------------------------------


def _adapter(env):
    return jlora.load_lora(peft(Q), env.unet, "unet")


@case(errors.InvalidAdapterError)
def apply_scale_none(env):
    a = _adapter(env)
    return lambda: jlora.apply(env.unet, a, None), ["apply", "None"], []


@case(errors.InvalidAdapterError)
def apply_scale_string(env):
    a = _adapter(env)
    return lambda: jlora.apply(env.unet, a, "0.8"), ["apply", "'0.8'"], []


@case(errors.InvalidAdapterError)
def apply_scale_vector(env):
    a = _adapter(env)
    return lambda: jlora.apply(env.unet, a, np.ones(32, np.float32)), ["apply", "(32,)", "per_sample"], []


@case(errors.InvalidAdapterError)
def apply_scale_nan(env):
    a = _adapter(env)
    return lambda: jlora.apply(env.unet, a, float("nan")), ["apply", "nan"], []


@case(errors.InvalidAdapterError)
def fuse_scale_infinite(env):
    a = _adapter(env)
    return lambda: jlora.fuse(env.unet, a, float("inf")), ["fuse", "inf"], []


@case(errors.InvalidAdapterError)
def unfuse_scale_string(env):
    a = _adapter(env)
    return lambda: jlora.unfuse(env.unet, a, "0.8"), ["unfuse", "'0.8'"], []


@case(errors.InvalidAdapterError)
def delta_scale_list(env):
    a = _adapter(env)
    return lambda: jlora.delta(a, [1.0, 2.0]), ["delta", "[1.0, 2.0]"], []


@case(errors.InvalidAdapterError)
def apply_scale_bool(env):
    a = _adapter(env)
    return lambda: jlora.apply(env.unet, a, True), ["apply", "True"], []


@case(errors.JloraError)
def init_adapter_rank_zero(env):
    return lambda: jlora.init_adapter(env.unet, _prng_key(), rank=0), ["rank", ">= 1", "0"], []


@case(errors.JloraError)
def init_adapter_rank_negative(env):
    return lambda: jlora.init_adapter(env.unet, _prng_key(), rank=-2), ["rank", "-2"], []


@case(errors.JloraError)
def init_adapter_rank_fractional(env):
    return lambda: jlora.init_adapter(env.unet, _prng_key(), rank=2.5), ["rank", "2.5"], []


@case(errors.JloraError)
def init_adapter_alpha_nan(env):
    return lambda: jlora.init_adapter(env.unet, _prng_key(), rank=2, alpha=float("nan")), ["alpha", "nan"], []


@case(errors.JloraError)
def init_adapter_b_std_infinite(env):
    return lambda: jlora.init_adapter(env.unet, _prng_key(), rank=2, b_std=float("inf")), ["b_std", "inf"], []


@case(errors.JloraError)
def init_adapter_bad_regex(env):
    return lambda: jlora.init_adapter(env.unet, _prng_key(), rank=2, targets="to_(q"), ["targets", "to_(q"], []


@case(errors.KeyMismatchError)
def hotswap_template_bad_regex(env):
    return lambda: jlora.hotswap_template(env.unet, 4, targets="[to_q"), ["targets", "[to_q"], []


@case(errors.ShapeMismatchError)
def hotswap_template_rank_zero(env):
    return lambda: jlora.hotswap_template(env.unet, 0), ["rank", ">= 1"], []


def _prng_key():
    import jax

    return jax.random.key(0)


# ---- work bounded by the target: no product before the shape check --------------------------


@case(errors.ShapeMismatchError)
def lokr_decomposed_w2_would_be_16_gib(env):
    sd = {f"{KQ}.lokr_w1": ones(1, 1), f"{KQ}.lokr_w2_a": ones(65536, 1), f"{KQ}.lokr_w2_b": ones(1, 65536)}
    return lambda: env.load(sd), [f"{KQ}.lokr_w2_a", "(32, 32)"], [sd]


@case(errors.ShapeMismatchError)
def lokr_decomposed_w1_would_be_16_gib(env):
    sd = {f"{KQ}.lokr_w1_a": ones(65536, 1), f"{KQ}.lokr_w1_b": ones(1, 65536), f"{KQ}.lokr_w2": ones(1, 1)}
    return lambda: env.load(sd), [f"{KQ}", "(32, 32)"], [sd]


@case(errors.ShapeMismatchError)
def lokr_tucker_core_with_huge_spatial(env):
    sd = {f"{KCONV}.lokr_w1": ones(1, 1), f"{KCONV}.lokr_t2": ones(1, 1, 256, 256),
          f"{KCONV}.lokr_w2_a": ones(1, 32), f"{KCONV}.lokr_w2_b": ones(1, 32)}
    return lambda: env.load(sd), [f"{KCONV}", "(3, 3, 32, 32)"], [sd]


@case(errors.InvalidAdapterError)
def lokr_w2_factors_do_not_chain(env):
    sd = {f"{KQ}.lokr_w1": ones(2, 2), f"{KQ}.lokr_w2_a": ones(16, 4), f"{KQ}.lokr_w2_b": ones(8, 16)}
    return lambda: env.load(sd), [f"{KQ}.lokr_w2_a", "do not multiply"], [sd]


@case(errors.ShapeMismatchError)
def loha_tucker_core_with_huge_spatial(env):
    sd = {f"{KCONV}.hada_w1_a": ones(1, 32), f"{KCONV}.hada_w1_b": ones(1, 32), f"{KCONV}.hada_t1": ones(1, 1, 256, 256),
          f"{KCONV}.hada_w2_a": ones(1, 32), f"{KCONV}.hada_w2_b": ones(1, 32), f"{KCONV}.hada_t2": ones(1, 1, 256, 256)}
    return lambda: env.load(sd), [f"{KCONV}", "(3, 3, 32, 32)"], [sd]


@case(errors.ShapeMismatchError)
def loha_tucker_wide_factors(env):
    sd = {f"{KCONV}.hada_w1_a": ones(1, 65536), f"{KCONV}.hada_w1_b": ones(1, 65536), f"{KCONV}.hada_t1": ones(1, 1, 3, 3),
          f"{KCONV}.hada_w2_a": ones(1, 32), f"{KCONV}.hada_w2_b": ones(1, 32), f"{KCONV}.hada_t2": ones(1, 1, 3, 3)}
    return lambda: env.load(sd), [f"{KCONV}", "(3, 3, 32, 32)"], [sd]


@case(errors.ShapeMismatchError)
def loha_wide_down_factor(env):
    sd = {f"{KQ}.hada_w1_a": ones(32, 1), f"{KQ}.hada_w1_b": ones(1, 65536),
          f"{KQ}.hada_w2_a": ones(32, 1), f"{KQ}.hada_w2_b": ones(1, 32)}
    return lambda: env.load(sd), [f"{KQ}.hada_w1_b", "(32, 32)"], [sd]


@case(errors.ShapeMismatchError)
def locon_tucker_core_with_huge_spatial(env):
    sd = {f"{KCONV}.lora_down.weight": ones(1, 32, 1, 1), f"{KCONV}.lora_mid.weight": ones(1, 1, 256, 256),
          f"{KCONV}.lora_up.weight": ones(32, 1, 1, 1)}
    return lambda: env.load(sd), [f"{KCONV}", "(3, 3, 32, 32)"], [sd]


@case(errors.InvalidAdapterError)
def locon_tucker_core_rank_mismatch(env):
    sd = {f"{KCONV}.lora_down.weight": ones(4, 32, 1, 1), f"{KCONV}.lora_mid.weight": ones(4, 2, 3, 3),
          f"{KCONV}.lora_up.weight": ones(32, 4, 1, 1)}
    return lambda: env.load(sd), [f"{KCONV}"], [sd]


@case(errors.ShapeMismatchError)
def sparse_file_of_16_gib(env):
    """A valid header for a 16 GiB tensor over a sparse file: refused from the header, nothing read."""
    n = 2**16
    header = json.dumps({A_KEY: {"dtype": "F32", "shape": [n, n], "data_offsets": [0, 4 * n * n]}}).encode()
    header += b" " * (-len(header) % 8)
    path = env.path("sparse.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * n * n)
    return lambda: env.load(path), [path, A_KEY, "(65536, 65536)", "not read"], []


@case(errors.ShapeMismatchError)
def state_dict_view_far_larger_than_any_weight(env):
    """A (4096, 4096) broadcast view (no memory of its own): refused from its shape, never copied."""
    sd = {A_KEY: np.broadcast_to(np.float32(1), (2**12, 2**12)), B_KEY: ones(32, 4)}
    return lambda: env.load(sd), [A_KEY, "(4096, 4096)"], [sd]


def _adapter_file(env, name, change_tensors=None, header=None):
    """A `save_adapters` file of a LoRA on Q, with tensors and header changed."""
    path = env.path(name)
    jlora.save_adapters(path, {"unet": _adapter(env)})
    tensors, meta = safetensors_io.load_file(path)
    key = next(k for k in tensors if k.endswith("/a"))
    tensors = change_tensors(tensors, key) if change_tensors else tensors
    safetensors_io.save_file(tensors, path, header if header is not None else meta)
    return path, key


@case(errors.ShapeMismatchError)
def adapter_file_factor_of_the_wrong_shape(env):
    path, key = _adapter_file(env, "af_shape.safetensors", lambda t, k: {**t, k: ones(4, 5)})
    return lambda: jlora.load_adapters(path, {"unet": env.unet}), [path, key[: -len("/a")], "(5,)"], []


@case(errors.ShapeMismatchError)
def adapter_file_saved_for_other_params(env):
    path, key = _adapter_file(env, "af_other.safetensors", lambda t, k: {**t, k: ones(16, 4), k[:-1] + "b": ones(4, 16)})
    return lambda: jlora.load_adapters(path, {"unet": env.unet}), [path, "(16, 16)", "(32, 32)"], []


@case(errors.InvalidAdapterError)
def adapter_file_alpha_nan(env):
    path, key = _adapter_file(env, "af_nan.safetensors", lambda t, k: {**t, k[:-1] + "alpha": np.array(np.nan, np.float32)})
    return lambda: jlora.load_adapters(path, {"unet": env.unet}), [path, "alpha", "non-finite"], []


@case(errors.CorruptFileError)
def adapter_file_layout_not_json(env):
    path, _ = _adapter_file(env, "af_json.safetensors", header={"jlora_adapters": "{"})
    return lambda: jlora.load_adapters(path, {"unet": env.unet}), [path, "jlora_adapters", "not JSON"], []


@case(errors.CorruptFileError)
def adapter_file_layout_a_list(env):
    path, _ = _adapter_file(env, "af_list.safetensors", header={"jlora_adapters": "[]"})
    return lambda: jlora.load_adapters(path, {"unet": env.unet}), [path, "not a JSON object"], []


@case(errors.CorruptFileError)
def adapter_file_unknown_leaf_kind(env):
    name = "unet/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel"
    path, _ = _adapter_file(env, "af_kind.safetensors", header={"jlora_adapters": json.dumps({name: {"kind": "vera"}})})
    return lambda: jlora.load_adapters(path, {"unet": env.unet}), [path, name, "'vera'"], []


@case(errors.CorruptFileError)
def adapter_file_missing_tensor(env):
    path, key = _adapter_file(env, "af_missing.safetensors", lambda t, k: {x: v for x, v in t.items() if x != k})
    return lambda: jlora.load_adapters(path, {"unet": env.unet}), [path, key], []


@case(errors.CorruptFileError)
def adapter_file_bad_static_fields(env):
    name = "unet/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel"
    header = {"jlora_adapters": json.dumps({name: {"kind": "lora", "static": {"bogus": 1}}})}
    path, _ = _adapter_file(env, "af_static.safetensors", header=header)
    return lambda: jlora.load_adapters(path, {"unet": env.unet}), [path, name, "bogus"], []


# ---- saving paths ---------------------------------------------------------------------------


def _save(env, weight_name):
    a = _adapter(env)
    return lambda: jlora.save_lora_weights(env.path("save"), {"unet": a}, weight_name=weight_name)


@case(errors.JloraError)
def weight_name_parent_directory(env):
    return _save(env, "../escape.safetensors"), ["weight_name", "../escape.safetensors"], []


@case(errors.JloraError)
def weight_name_absolute(env):
    return _save(env, "/tmp/escape.safetensors"), ["weight_name", "/tmp/escape.safetensors"], []


@case(errors.JloraError)
def weight_name_subdirectory(env):
    return _save(env, "sub/x.safetensors"), ["weight_name", "sub/x.safetensors"], []


@case(errors.JloraError)
def weight_name_empty(env):
    return _save(env, ""), ["weight_name", "''"], []


@case(errors.JloraError)
def weight_name_dot_dot(env):
    return _save(env, ".."), ["weight_name", "'..'"], []


@case(errors.JloraError)
def weight_name_none(env):
    return _save(env, None), ["weight_name", "None"], []


# ---- key names: long, control characters ----------------------------------------------------


@case(errors.InvalidAdapterError)
def one_megabyte_key(env):
    key = "unet." + "a." * 500_000 + "lora_A.weight"
    sd = {key: ones(4, 32)}
    return lambda: env.load(sd), ["unet.a.a.a", "more characters", "lora_A.weight"], [sd]


@case(errors.InvalidAdapterError)
def key_of_8000_parts(env):
    key = "unet." + ".".join(["x"] * 8000) + ".lora_A.weight"
    sd = {key: ones(4, 32)}
    return lambda: env.load(sd), ["unet.x.x.x", "more characters"], [sd]


@case(errors.InvalidAdapterError)
def key_with_terminal_escape(env):
    key = "unet.x\x1b[2Jy.lora_A.weight"
    sd = {key: ones(4, 32)}
    return lambda: env.load(sd), ["\\x1b[2Jy"], [sd]


@case(errors.InvalidAdapterError)
def key_with_nul_byte(env):
    key = "unet.x\x00y.lora_A.weight"
    sd = {key: ones(4, 32)}
    return lambda: env.load(sd), ["\\x00y"], [sd]


# ---- files that are not regular files -------------------------------------------------------


@case(errors.CorruptFileError)
def fifo_inside_lora_directory(env):
    folder = env.path("fifo_dir")
    os.mkdir(folder)
    os.mkfifo(os.path.join(folder, "pytorch_lora_weights.safetensors"))
    return lambda: env.load(folder), ["pytorch_lora_weights.safetensors", "FIFO"], []


@case(errors.CorruptFileError)
def fifo_as_the_file(env):
    path = env.path("fifo.safetensors")
    os.mkfifo(path)
    return lambda: env.load(path), [path, "FIFO"], []


@case((errors.CorruptFileError, errors.LoraFileNotFoundError))
def character_device_as_the_file(env):
    return lambda: env.load("/dev/zero"), ["/dev/zero"], []


@case(errors.CorruptFileError)
def symlink_loop(env):
    path = env.path("loop.safetensors")
    os.symlink(path, path)
    return lambda: env.load(path), [path, "symlink loop"], []


def _params():
    out = []
    for name, c in CASES.items():
        marks = [pytest.mark.xfail(strict=True, reason=c.bug)] if c.bug else []
        out.append(pytest.param(name, id=name, marks=marks))
    return out


@pytest.mark.parametrize("name", _params())
def test_hostile_input(env, name):
    c = CASES[name]
    call, names, state_dicts = c.build(env)
    with untouched(env.unet, env.clip, *state_dicts), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        with pytest.raises(c.error) as e:
            call()
        seconds = time.perf_counter() - start
    assert isinstance(e.value, jlora.JloraError)
    assert seconds < TIME_BOUND, f"{name} took {seconds:.1f} s"
    assert len(str(e.value)) < 20_000
    msg = str(e.value)
    for text in names:
        assert text in msg, f"{text!r} not in message:\n{msg}"


TIME_BOUND = 20.0  # seconds: a hang or a quadratic blow-up, not a speed claim


def test_case_count():
    assert len(CASES) >= 130


# --------------------------------------------------------------------------------------------
# property: random key sets, shapes, dtypes and alphas never escape as anything but JloraError
# --------------------------------------------------------------------------------------------


def _unet_modules() -> dict[str, tuple[int, ...]]:
    index = shape_index(R.build_sd15_unet().flax_params)
    return {DIFFUSERS_FLAX.to_module(p[:-1]): s for p, (s, _) in index.items() if p[-1] == "kernel"}


MODULES = _unet_modules()
MODULE_NAMES = sorted(MODULES)
GARBAGE_MODULES = ("x", "down_blocks.9.attentions.0.proj_in", "mid_block", "ünet.block", "to_q", "a.b.c.d.e", "conv_in.kernel")

PEFT_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "alpha", "lora_magnitude_vector", "lora_A.default.weight")
KOHYA_SUFFIXES = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_up.bias", "alpha", "dora_scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b",
)
FLOATS = (np.float32, np.float16, ml_dtypes.bfloat16, np.float64)
DTYPES = FLOATS + (np.int32, np.uint8, np.bool_, ml_dtypes.float8_e4m3fn)
DIMS = (0, 1, 2, 3, 4, 8, 32, 64)


def _roles(kind: str, kernel: tuple[int, ...], r: int) -> dict[str, tuple[int, ...]]:
    """Suffix -> torch-layout shape of a complete, consistent module of `kind` for `kernel`."""
    n_in, n_out = kernel[-2], kernel[-1]
    k = tuple(kernel[:2]) if len(kernel) == 4 else ()
    flat_in = n_in * int(np.prod(k, dtype=np.int64))
    if kind == "peft":
        return {"lora_A.weight": (r, n_in) + k, "lora_B.weight": (n_out, r) + ((1, 1) if k else ())}
    if kind in ("lora", "old"):
        down, up = ("lora_down.weight", "lora_up.weight") if kind == "lora" else ("down.weight", "up.weight")
        return {down: (r, n_in) + k, up: (n_out, r) + ((1, 1) if k else ())}
    if kind == "loha":
        return {"hada_w1_a": (n_out, r), "hada_w1_b": (r, flat_in), "hada_w2_a": (n_out, r), "hada_w2_b": (r, flat_in)}
    if kind == "lokr":
        o2, i2 = n_out // 4, n_in // 4
        return {"lokr_w1": (4, 4), "lokr_w2_a": (o2, r), "lokr_w2_b": (r, i2) + k}
    return {"diff": (n_out, n_in) + k}


def _key(fmt: str, module: str, suffix: str) -> str:
    if fmt == "peft":
        return f"unet.{module}.{suffix}"
    if fmt == "kohya":
        return f"lora_unet_{module.replace('.', '_')}.{suffix}"
    parent, _, leaf = module.rpartition(".")
    if leaf in ("to_q", "to_k", "to_v") and parent:
        return f"unet.{parent}.processor.{leaf}_lora.{suffix}"
    if module.endswith(".to_out.0"):
        return f"unet.{module[: -len('.to_out.0')]}.processor.to_out_lora.{suffix}"
    return f"unet.{module}.lora.{suffix}"


def _avoid_known_crashes(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if key.endswith((".lokr_w1_a", ".lokr_w2_a")) and shape == ():
        return (1,)
    if key.endswith(".diff") and len(shape) not in (1, 2, 4):
        return shape[:2] if len(shape) > 2 else (1,)
    return shape


def _fill(shape, dtype, value=0.25) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.full(shape, value, np.float32).astype(dtype)


@st.composite
def hostile_state_dicts(draw):
    """A LoRA state dict of 1-3 complete modules in one format, then 0-3 corruptions."""
    fmt = draw(st.sampled_from(("peft", "peft", "kohya", "kohya", "old")))
    dtype = draw(st.sampled_from(FLOATS))
    out: dict[str, Any] = {}
    owner: dict[str, str] = {}  # key -> module it was made for
    for _ in range(draw(st.integers(1, 3))):
        module = draw(st.sampled_from(MODULE_NAMES) | st.sampled_from(GARBAGE_MODULES))
        kernel = MODULES.get(module, (32, 32))
        r = draw(st.sampled_from((1, 2, 4)))
        kind = {"peft": "peft", "old": "old"}.get(fmt) or draw(st.sampled_from(("lora", "lora", "loha", "lokr", "diff")))
        for suffix, shape in _roles(kind, kernel, r).items():
            out[_key(fmt, module, suffix)] = _fill(shape, dtype)
            owner[_key(fmt, module, suffix)] = module
        if fmt != "old" and draw(st.booleans()):
            out[_key(fmt, module, "alpha")] = np.array(draw(st.sampled_from((1.0, 4.0, 8.0, 0.5))), np.float32)
        if fmt != "old" and kind in ("peft", "lora") and draw(st.integers(0, 3)) == 0:
            extra = "lora_magnitude_vector" if fmt == "peft" else "dora_scale"
            out[_key(fmt, module, extra)] = _fill((kernel[-1],), dtype, 1.0)
        if fmt == "peft" and draw(st.integers(0, 3)) == 0:
            out[_key(fmt, module, "lora_B.bias")] = _fill((kernel[-1],), dtype)

    suffixes = {"peft": PEFT_SUFFIXES, "kohya": KOHYA_SUFFIXES, "old": ("down.weight", "up.weight")}[fmt]
    for _ in range(draw(st.integers(0, 3))):
        ops = ("drop", "dtype", "shape", "rank", "transpose", "nan", "alpha", "extra", "other_format", "zero")
        op = draw(st.sampled_from(ops))
        key = draw(st.sampled_from(sorted(out))) if out else None
        if key is None or op == "extra":
            module = draw(st.sampled_from(MODULE_NAMES) | st.sampled_from(GARBAGE_MODULES))
            shape = tuple(draw(st.sampled_from(DIMS)) for _ in range(draw(st.integers(0, 4))))
            new = _key(fmt, module, draw(st.sampled_from(suffixes)))
            out[new] = _fill(_avoid_known_crashes(new, shape), draw(st.sampled_from(DTYPES)))
        elif op == "drop":
            del out[key]
        elif op == "dtype":
            with np.errstate(invalid="ignore", over="ignore"):
                out[key] = np.asarray(out[key]).astype(draw(st.sampled_from(DTYPES)))
        elif op == "shape":
            shape = tuple(draw(st.sampled_from(DIMS)) for _ in range(draw(st.integers(0, 4))))
            out[key] = _fill(_avoid_known_crashes(key, shape), dtype)
        elif op == "rank" and np.ndim(out[key]) >= 2:
            shape = list(np.shape(out[key]))
            axis = draw(st.sampled_from((0, 1)))
            shape[axis] = max(0, shape[axis] + draw(st.sampled_from((-1, 1, 2))))
            out[key] = _fill(tuple(shape), dtype)
        elif op == "transpose" and np.ndim(out[key]) == 2:
            out[key] = np.ascontiguousarray(np.asarray(out[key]).T)
        elif op == "nan":
            out[key] = _fill(np.shape(out[key]), dtype, draw(st.sampled_from((float("nan"), float("inf")))))
        elif op == "alpha" and key in owner:
            alpha = draw(st.sampled_from((float("nan"), float("inf"), -3.0, 0.0, 1e30)))
            shape = draw(st.sampled_from(((), (1,), (2,), (1, 1))))
            out[_key(fmt, owner[key], "alpha")] = _fill(shape, np.float32, alpha)
        elif op == "other_format":
            other = draw(st.sampled_from([f for f in ("peft", "kohya", "old") if f != fmt]))
            down = {"peft": "lora_A.weight", "kohya": "lora_down.weight", "old": "down.weight"}[other]
            out[_key(other, draw(st.sampled_from(MODULE_NAMES)), down)] = _fill((4, 32), dtype)
        elif op == "zero":
            out[key] = _fill(tuple(0 if i == 0 else d for i, d in enumerate(np.shape(out[key]))), dtype)
    return out


def _load_everything(src, unet, clip, use_pipeline: bool, strict: bool, fmt):
    kwargs = {"strict": strict, "format": fmt}
    if use_pipeline:
        return jlora.load_lora_weights(src, {"unet": unet, "text_encoder": clip}, **kwargs)
    return jlora.load_lora(src, unet, "unet", **kwargs)


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(
    sd=hostile_state_dicts(),
    use_pipeline=st.booleans(),
    fmt=st.sampled_from((None, None, None, None, "peft", "kohya", "diffusers_old")),
)
def test_random_inputs_raise_only_jlora_errors(unet, clip, sd, use_pipeline, fmt):
    params = {"unet": unet.flax_params, "text_encoder": clip.flax_params}
    with tempfile.TemporaryDirectory() as tmp:
        path = write(os.path.join(tmp, "random.safetensors"), sd)
        for src in (sd, path):
            for strict in (True, False):
                with untouched(params, sd), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        _load_everything(src, params["unet"], params["text_encoder"], use_pipeline, strict, fmt)
                    except jlora.JloraError as e:
                        assert str(e), type(e)


# --------------------------------------------------------------------------------------------
# patterns from files: PEFT's matching, in linear time
# --------------------------------------------------------------------------------------------

_SEGMENTS = ("down_blocks", "0", "1", "attentions", "attn1", "attn2", "to_q", "to_k", "to_out", "proj_in", "ff", "net")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keys=st.lists(st.one_of(
        st.lists(st.sampled_from(_SEGMENTS), min_size=1, max_size=4).map(".".join),
        st.sampled_from([r"attn[12]\.to_q", r"to_(q|k)", r".*proj_in", r"down_blocks\.\d+\.attentions\.0\.to_q", r"to_\w"]),
    ), min_size=1, max_size=8, unique=True),
    module=st.lists(st.sampled_from(_SEGMENTS), min_size=1, max_size=6).map(".".join),
)
def test_pattern_lookup_matches_peft(keys, module):
    """Reference: PEFT's own `get_pattern_key` (Python `re`) on the same keys and module name."""
    from peft.utils.other import get_pattern_key

    from converters.patterns import first_match

    pattern = {k: float(i + 1) for i, k in enumerate(keys)}
    want = get_pattern_key(list(pattern), module)
    got = first_match(pattern, module, "alpha_pattern", "<test>")
    assert (got[0] if got else module) == want


def test_catastrophic_and_numerous_patterns_load_quickly(sd_file, unet):
    """`(.*.*)*X` backtracks exponentially in Python's `re`; 20,000 plain keys cost one lookup per
    name suffix. Both loads finish and give the same adapter as without the patterns."""
    tensors, header = R.read_lora_file(sd_file)
    plain = jlora.load_lora(sd_file, unet.flax_params, "unet")
    meta = json.loads(header["lora_adapter_metadata"])
    for extra in ({"(.*.*)*X": 1.0}, {f"blocks.{i}.nowhere": 1.0 for i in range(20_000)}):
        config = {**meta, **{f"unet.alpha_pattern": {**meta.get("unet.alpha_pattern", {}), **extra}}}
        with tempfile.TemporaryDirectory() as d:
            path = write(os.path.join(d, "p.safetensors"), tensors, {"lora_adapter_metadata": json.dumps(config)})
            start = time.perf_counter()
            got = jlora.load_lora(path, unet.flax_params, "unet")
            assert time.perf_counter() - start < TIME_BOUND
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(plain)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


_BOMB = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
sys.path[:0] = {paths!r}
import numpy as np
import jlora, reference as R
from jlora import errors
unet = R.build_sd15_unet().flax_params
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
C = "lora_unet_down_blocks_0_resnets_0_conv1"
one = lambda *s: np.ones(s, np.float32)
bombs = {{
    "lokr_w2": {{K + ".lokr_w1": one(1, 1), K + ".lokr_w2_a": one(65536, 1), K + ".lokr_w2_b": one(1, 65536)}},
    "lokr_w1": {{K + ".lokr_w1_a": one(65536, 1), K + ".lokr_w1_b": one(1, 65536), K + ".lokr_w2": one(1, 1)}},
    "lokr_tucker": {{C + ".lokr_w1": one(1, 1), C + ".lokr_t2": one(1, 1, 256, 256), C + ".lokr_w2_a": one(1, 32),
                     C + ".lokr_w2_b": one(1, 32)}},
    "loha_tucker": {{C + ".hada_w1_a": one(1, 65536), C + ".hada_w1_b": one(1, 65536), C + ".hada_t1": one(1, 1, 256, 256),
                     C + ".hada_w2_a": one(1, 32), C + ".hada_w2_b": one(1, 32), C + ".hada_t2": one(1, 1, 3, 3)}},
    "locon_tucker": {{C + ".lora_down.weight": one(1, 65536, 1, 1), C + ".lora_mid.weight": one(1, 1, 256, 256),
                      C + ".lora_up.weight": one(65536, 1, 1, 1)}},
}}
for name, sd in bombs.items():
    try:
        jlora.load_lora(sd, unet, "unet")
        print(name, "loaded")
    except errors.JloraError as e:
        print(name, type(e).__name__)
    except MemoryError:
        print(name, "MemoryError")
"""


def test_factor_bombs_fail_under_a_memory_cap():
    """Factors whose products would need 16 GiB (or 4 GiB Tucker cores) are refused from their shapes,
    in a process capped at 3 GiB of address space."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = _BOMB.format(paths=[here, os.path.dirname(here)])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split() for line in out.stdout.splitlines())
    assert lines == {"lokr_w2": "ShapeMismatchError", "lokr_w1": "ShapeMismatchError", "lokr_tucker": "ShapeMismatchError",
                     "loha_tucker": "ShapeMismatchError", "locon_tucker": "ShapeMismatchError"}, out.stdout


def test_a_one_megabyte_key_fails_within_a_second(unet):
    key = "unet." + "a." * 500_000 + "lora_A.weight"
    sd = {key: np.ones((4, 32), np.float32)}
    start = time.perf_counter()
    with pytest.raises(errors.InvalidAdapterError) as e:
        jlora.load_lora(sd, unet.flax_params, "unet")
    assert time.perf_counter() - start < 1.0
    assert len(str(e.value)) < 2_000


def test_unplaceable_keys_cost_linear_time(unet):
    """8,000 unplaceable modules (non-strict) against 1,000: the time grows with the count, not its square."""
    def sd(n):
        return {f"unet.elsewhere_{i}.proj.lora_{r}.weight": np.ones((1, 8) if r == "A" else (8, 1), np.float32)
                for i in range(n) for r in "AB"}

    def seconds(n):
        d = sd(n)
        start = time.perf_counter()
        with warnings.catch_warnings(), pytest.raises(errors.JloraError):
            warnings.simplefilter("ignore")
            jlora.load_lora(d, unet.flax_params, "unet")
        return time.perf_counter() - start

    small, large = seconds(1000), seconds(8000)
    assert large < 8 * 4 * max(small, 0.05)  # quadratic growth would be 64x
