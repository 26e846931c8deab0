"""Torch-mirror trees in the DiT format tests: flat `{path tuple: array}` <-> nested dicts."""

import numpy as np


def nested(flat: dict) -> dict:
    """`{("a", "b", "kernel"): x}` -> `{"a": {"b": {"kernel": x}}}`."""
    tree: dict = {}
    for path, a in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = a
    return tree


def flatten(tree, prefix=()) -> dict:
    """The inverse of `nested`, leaves as numpy arrays."""
    if isinstance(tree, dict):
        return {p: v for k, sub in tree.items() for p, v in flatten(sub, prefix + (k,)).items()}
    return {prefix: np.asarray(tree)}


def kernel(module: str) -> tuple[str, ...]:
    """The kernel path of a diffusers module name."""
    return tuple(module.split(".")) + ("kernel",)
