"""jlora: LoRA loading, applying, fusing and saving for JAX/Flax diffusion models."""

from jlora import errors
from jlora.adapters import Adapters
from jlora.adapters import delete_adapters
from jlora.adapters import disable_lora
from jlora.adapters import enable_lora
from jlora.adapters import get_active_adapters
from jlora.adapters import get_list_adapters
from jlora.adapters import resolve
from jlora.adapters import set_adapters
from jlora.adapters import set_lora_device
from jlora.adapter_file import load_adapters
from jlora.adapter_file import save_adapters
from jlora.core import apply
from jlora.core import combine
from jlora.core import count
from jlora.core import delta
from jlora.core import fuse
from jlora.core import summary
from jlora.core import unfuse
from jlora.errors import JloraError
from jlora.hotswap import hotswap_lora
from jlora.hotswap import hotswap_template
from jlora.hotswap import pad_adapter
from jlora.hotswap import stack_adapters
from jlora.init import init_adapter
from jlora.leaf import AdapterLeaf
from jlora.leaf import DiffLeaf
from jlora.leaf import DoraLeaf
from jlora.leaf import LohaLeaf
from jlora.leaf import LokrLeaf
from jlora.leaf import LoraLeaf
from jlora.leaf import SetLeaf
from jlora.leaf import SumLeaf
from jlora.leaf import is_adapter_leaf
from jlora.loading import abstract_params
from jlora.loading import apply_pipeline
from jlora.loading import load_lora
from jlora.loading import load_lora_weights
from jlora.loading import lora_state_dict
from jlora.per_sample import NO_LORA
from jlora.per_sample import per_sample
from jlora.per_sample import per_sample_apply
from jlora.per_sample import per_sample_variables
from jlora.saving import save_lora_weights
from jlora.sharding import adapter_shardings
from jlora.sharding import adapter_specs
from jlora.sharding import shard_adapter
from jlora.strategy import strategy_plan
from jlora.strategy import with_lora

__version__ = "0.1.0"

__all__ = [
    "NO_LORA",
    "Adapters",
    "AdapterLeaf",
    "DiffLeaf",
    "DoraLeaf",
    "JloraError",
    "LohaLeaf",
    "LokrLeaf",
    "LoraLeaf",
    "SetLeaf",
    "SumLeaf",
    "abstract_params",
    "adapter_shardings",
    "adapter_specs",
    "apply",
    "apply_pipeline",
    "combine",
    "count",
    "delete_adapters",
    "delta",
    "disable_lora",
    "enable_lora",
    "errors",
    "fuse",
    "get_active_adapters",
    "get_list_adapters",
    "hotswap_lora",
    "hotswap_template",
    "init_adapter",
    "is_adapter_leaf",
    "load_adapters",
    "load_lora",
    "load_lora_weights",
    "lora_state_dict",
    "pad_adapter",
    "resolve",
    "per_sample",
    "per_sample_apply",
    "per_sample_variables",
    "save_adapters",
    "save_lora_weights",
    "set_adapters",
    "set_lora_device",
    "shard_adapter",
    "stack_adapters",
    "strategy_plan",
    "summary",
    "unfuse",
    "with_lora",
]
