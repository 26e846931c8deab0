"""A check that a call leaves the caller's dict trees and arrays exactly as they were."""

import contextlib
from typing import Mapping

import jax
import numpy as np
import torch


def _snapshot(tree, path=()):
    """[(path, id, keys or a copy of the value)] for every mapping node and leaf."""
    if isinstance(tree, Mapping):
        out = [(path, id(tree), tuple(tree.keys()))]
        for k, v in tree.items():
            out += _snapshot(v, path + (k,))
        return out
    if isinstance(tree, torch.Tensor):
        readable = tree.layout == torch.strided and tree.device.type == "cpu"
        return [(path, id(tree), tree.detach().numpy().copy() if readable else None)]
    if isinstance(tree, (np.ndarray, jax.Array, np.generic)):
        return [(path, id(tree), np.array(tree, copy=True))]
    return [(path, id(tree), None)]


@contextlib.contextmanager
def untouched(*trees):
    """Assert that the given trees keep their dict objects, keys and array values."""
    before = [_snapshot(t) for t in trees]
    yield
    for tree, snap in zip(trees, before):
        after = _snapshot(tree)
        assert [(p, i) for p, i, _ in after] == [(p, i) for p, i, _ in snap], "caller's tree objects or keys changed"
        for (p, _, now), (_, _, was) in zip(after, snap):
            if isinstance(was, tuple):
                assert now == was, p
            elif isinstance(was, np.ndarray):
                assert now.dtype == was.dtype and now.shape == was.shape, p
                assert now.tobytes() == was.tobytes(), p  # bitwise, so NaNs compare equal
