"""Fine-tuning adapters with optax and checkpointing them with orbax.

Only the factor arrays of adapter leaves train (`a`, `b` of a LoRA; the LoHa, LoKr
and DoRA factors; a DoRA magnitude); `alpha` and scalar `factor` fields never
change. The adapter stays a plain pytree, so a training step is `jax.grad` and
optax tree maps, and it runs sharded when its inputs are: shard params with
`NamedSharding`s, place the adapter with `jlora.shard_adapter`, shard the batch
over a data axis, and `jit` follows the input shardings.

>>> tx = jlora.training.optimizer(optax.adamw(1e-4))
>>> opt_state = jlora.training.init_opt_state(tx, adapter)
>>> step = jlora.training.make_train_step(loss_fn, tx)
>>> adapter, opt_state, metrics = step(adapter, opt_state, params, batch)
>>> jlora.training.save_checkpoint("ckpt/", 100, {"adapter": adapter, "opt_state": opt_state})
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from jlora.core import apply
from jlora.errors import (CheckpointCorruptError, CheckpointError, CheckpointLockedError, CheckpointMismatchError,
                          CheckpointNotFoundError, InvalidAdapterError)
from jlora.leaf import AdapterLeaf, is_adapter_leaf
from jlora.loading import key_name

PyTree = Any

TRAINABLE_FIELDS = frozenset({"a", "b", "a1", "b1", "a2", "b2", "w1", "w2", "magnitude", "diff"})


def _path_str(path) -> str:
    return "/".join(key_name(k) for k in path)


def trainable_mask(adapter: PyTree) -> PyTree:
    """A tree shaped like `adapter`: True on factor arrays, False on `alpha`, `factor` and masks.

    `None` (no adapter) stays `None`, so the mask has the adapter's exact structure
    (use it with `optax.masked` or to split an adapter).

    Raises:
      InvalidAdapterError: a leaf of `adapter` is neither `None` nor an adapter leaf.

    >>> jlora.training.trainable_mask(adapter)["to_q"]["kernel"]
    LoraLeaf(a=True, b=True, alpha=False)
    """

    def leaf_mask(path, leaf):
        if leaf is None:
            return None
        if not isinstance(leaf, AdapterLeaf):
            raise InvalidAdapterError(
                f"trainable_mask: {_path_str(path)} holds a {type(leaf).__name__}, not an adapter leaf; an adapter "
                "holds None or adapter leaves (build it with jlora.init_adapter or jlora.load_lora)."
            )
        return jax.tree_util.tree_map_with_path(lambda p, _: key_name(p[-1]) in TRAINABLE_FIELDS, leaf)

    return jax.tree_util.tree_map_with_path(leaf_mask, adapter, is_leaf=is_adapter_leaf)


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on the trainable factors of an adapter; every other field gets a zero update.

    The state holds nothing for `alpha` and the like, and weight decay never reaches
    them, so they stay bit-identical however many steps run.

    >>> tx = jlora.training.optimizer(optax.adamw(1e-4, weight_decay=1e-2))
    """

    def labels(adapter):
        return jax.tree.map(lambda m: "train" if m else "freeze", trainable_mask(adapter))

    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def _mesh_of(tree: PyTree):
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def init_opt_state(tx: optax.GradientTransformation, adapter: PyTree) -> PyTree:
    """`tx.init(adapter)` with every array on the adapter's mesh.

    Moments take the shardings of the factors they follow; counters and other
    arrays not on a mesh are replicated over the mesh of the adapter (when it has
    one), so the state can be a restore target and an input of sharded steps.
    """
    state = tx.init(adapter)
    mesh = _mesh_of(adapter)
    if mesh is None:
        return state
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        return x if isinstance(getattr(x, "sharding", None), NamedSharding) else jax.device_put(x, replicated)

    return jax.tree.map(place, state)


def _split(mask: PyTree, adapter: PyTree) -> tuple[PyTree, PyTree]:
    trainable = jax.tree.map(lambda m, x: x if m else None, mask, adapter)
    frozen = jax.tree.map(lambda m, x: None if m else x, mask, adapter)
    return trainable, frozen


def _join(mask: PyTree, trainable: PyTree, frozen: PyTree) -> PyTree:
    return jax.tree.map(lambda m, t, f: t if m else f, mask, trainable, frozen)


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    scale=1.0,
    has_aux: bool = False,
    state_shardings: tuple[PyTree, PyTree] | None = None,
    donate: bool = False,
    compiler_options: dict | None = None,
) -> Callable:
    """A jitted step `(adapter, opt_state, params, batch) -> (adapter, opt_state, metrics)`.

    The loss sees `jlora.apply(params, adapter, scale)`; gradients are taken with
    respect to the adapter's trainable factors only (params stay frozen, `alpha` is
    carried over unchanged whatever `tx` does). With sharded inputs the step runs
    sharded: `jit` follows the shardings of its arguments.

    Args:
      loss_fn: `loss_fn(merged_params, batch) -> scalar` (or `(scalar, aux)` with `has_aux`).
      tx: the optimizer; `jlora.training.optimizer(...)` keeps no state for frozen fields.
        `opt_state` must come from `init_opt_state(tx, adapter)` (or `tx.init(adapter)`).
      scale: the LoRA scale during training.
      has_aux: `loss_fn` returns `(loss, aux)`; `aux` is returned as `metrics["aux"]`.
      state_shardings: shardings `(adapter, opt_state)` to return the state with, e.g.
        `jax.tree.map(lambda x: x.sharding, (adapter, opt_state))` of the first state; then
        each step's outputs feed the next one unchanged (no new compilation, no resharding).
        Default: whatever XLA propagates (optimizer moments may drift to other layouts).
      donate: donate the adapter and optimizer state buffers (do not reuse the inputs).
      compiler_options: XLA options for the compiled step (`jax.jit(compiler_options=...)`).

    Returns:
      The jitted step; `metrics` has `loss` and `grad_norm` (global norm of the factor gradients).

    >>> step = jlora.training.make_train_step(lambda p, b: mse(model.apply({"params": p}, b["x"]), b["y"]), tx)
    >>> adapter, opt_state, metrics = step(adapter, opt_state, params, batch)
    """

    def step(adapter, opt_state, params, batch):
        mask = trainable_mask(adapter)
        trainable, frozen = _split(mask, adapter)

        def objective(factors):
            return loss_fn(apply(params, _join(mask, factors, frozen), scale), batch)

        out, grads = jax.value_and_grad(objective, has_aux=has_aux)(trainable)
        loss, aux = out if has_aux else (out, None)
        full_grads = _join(mask, grads, jax.tree.map(jnp.zeros_like, frozen))
        updates, opt_state = tx.update(full_grads, opt_state, adapter)
        updated = optax.apply_updates(adapter, updates)
        adapter = _join(mask, _split(mask, updated)[0], frozen)
        if state_shardings is not None:
            adapter, opt_state = jax.lax.with_sharding_constraint((adapter, opt_state), tuple(state_shardings))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        if has_aux:
            metrics["aux"] = aux
        return adapter, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1) if donate else (), compiler_options=compiler_options)


# ---------------------------------------------------------------------------- orbax checkpoints


def _handler() -> ocp.PyTreeCheckpointHandler:
    """orbax's PyTree handler without replica-parallel writes.

    Replica-parallel saving slices every replicated array into one piece per replica,
    one dispatched op each; for adapter-sized states (hundreds of small arrays,
    replicated over the data axis) that costs several times the write itself.
    """
    scalar = ocp.type_handlers.ScalarHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (int, scalar),
        (float, scalar),
        (np.number, scalar),
        (str, ocp.type_handlers.StringHandler()),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _path(directory) -> epath.Path:
    """A local folder made absolute, or a cloud path (`gs://...`) as it is."""
    path = os.fspath(directory)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def _manager(directory, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(_path(directory), options=options, item_handlers=_handler())


COMMIT_MARKER = "_CHECKPOINT_METADATA"


def committed_steps(directory) -> list[int]:
    """The steps of `directory` that orbax finished writing (a step folder with its metadata file);
    stray or half-written folders with a number for a name are not steps."""
    root = _path(directory)
    if not root.exists() or not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        name = child.name
        if name.isdigit() and child.is_dir() and (child / COMMIT_MARKER).exists():
            steps.append(int(name))
    return sorted(steps)


def _check_directory(directory) -> None:
    root = _path(directory)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory; pass a checkpoint directory.")


class _Lock:
    """An exclusive, non-blocking lock on a local checkpoint directory (single-process runs); a second
    writer gets `CheckpointLockedError` instead of interleaving its files with the first's."""

    def __init__(self, directory):
        self.path = None if "://" in os.fspath(directory) or jax.process_count() > 1 else os.path.join(
            os.path.abspath(os.fspath(directory)), ".jlora-checkpoint.lock")
        self.fd = None

    def __enter__(self):
        if self.path is None:
            return self
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise CheckpointLockedError(
                f"{os.path.dirname(self.path)}: another process is writing checkpoints here; give each run its own "
                "directory.") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        return False


def save_checkpoint(directory, step: int, state: PyTree, *, max_to_keep: int | None = None) -> str:
    """Save a training state (e.g. `{"adapter": A, "opt_state": S, "step": n}`) as checkpoint `step`.

    Every process calls it (orbax writes each array's shards from the processes
    that hold them); it returns once the checkpoint is complete on disk.

    Args:
      directory: the checkpoint directory (created if missing); each step is a subfolder.
      step: the step number naming the checkpoint (an integer >= 0).
      state: a pytree of arrays, Python/numpy scalars and `None`: adapters and optax states.
      max_to_keep: keep only the newest checkpoints (default: keep all).

    Returns:
      The folder of this step.

    Raises:
      CheckpointError: `directory` already holds this step or a later one (orbax would skip the save),
        is a file, or the write failed.
      CheckpointLockedError: another process is saving into `directory`.

    >>> jlora.training.save_checkpoint("ckpt/", 100, {"adapter": adapter, "opt_state": opt_state, "step": 100})
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise CheckpointError(f"save_checkpoint: step must be an integer >= 0, got {step!r}.")
    _check_directory(directory)
    with _Lock(directory):
        steps = committed_steps(directory)
        if steps and steps[-1] >= int(step):
            raise CheckpointError(
                f"{directory} already holds step {steps[-1]}, so step {step} would not be saved; resume from it "
                "(restore_checkpoint) or save the run to another directory."
            )
        try:
            with _manager(directory, max_to_keep) as mngr:
                mngr.save(int(step), args=ocp.args.PyTreeSave(state), force=True)
                mngr.wait_until_finished()
                return os.fspath(mngr.directory / str(int(step)))
        except CheckpointError:
            raise
        except Exception as e:  # orbax and tensorstore raise many kinds
            raise CheckpointError(f"{directory}: writing checkpoint {step} failed ({type(e).__name__}: {e}).") from None


def latest_step(directory) -> int | None:
    """The newest committed checkpoint step in `directory`, or None when it holds none (or does not exist)."""
    steps = committed_steps(directory)
    return steps[-1] if steps else None


def _abstract(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def _check_target(saved: PyTree, target: PyTree, where: str) -> None:
    def shapes(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {_path_str(p): tuple(x.shape) if hasattr(x, "shape") else np.shape(x) for p, x in flat}

    have, want = shapes(saved), shapes(target)
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    wrong = [f"{k}: saved {have[k]}, target {want[k]}" for k in sorted(want.keys() & have.keys()) if have[k] != want[k]]
    if missing or extra or wrong:
        raise CheckpointMismatchError(
            f"{where} does not fit the restore target: target arrays not in the checkpoint {missing[:5]}, "
            f"checkpoint arrays not in the target {extra[:5]}, shape mismatches {wrong[:5]}. Build the target "
            "as the saved state was built (same params, adapter targets and rank, same optimizer)."
        )


def restore_checkpoint(directory, target: PyTree, step: int | None = None) -> PyTree:
    """Restore a checkpoint onto the structure, dtypes and shardings of `target`.

    Args:
      directory: the checkpoint directory.
      target: a state shaped like the saved one: concrete arrays (their shardings
        are used) or `jax.ShapeDtypeStruct`s with shardings, e.g. the fresh state a
        run starts from (a `ShapeDtypeStruct` without a sharding restores as a numpy
        array). `None` leaves of adapters are kept.
      step: the step to restore (default: the newest).

    Returns:
      The restored state, each array with the sharding of its target.

    Raises:
      CheckpointNotFoundError: no checkpoint, or not `step`, in `directory`.
      CheckpointMismatchError: the checkpoint's tree or shapes differ from `target`'s.

    >>> state = jlora.training.restore_checkpoint("ckpt/", {"adapter": adapter, "opt_state": opt_state, "step": 0})
    """
    if not _path(directory).exists():
        raise CheckpointNotFoundError(f"{directory}: no such checkpoint directory.")
    _check_directory(directory)
    steps = committed_steps(directory)
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer))):
        raise CheckpointError(f"restore_checkpoint: step must be an integer, got {step!r}.")
    step = (steps[-1] if steps else None) if step is None else int(step)
    if step is None or step not in steps:
        raise CheckpointNotFoundError(
            f"{directory}: no committed checkpoint for step {step}; the directory holds steps {steps}."
        )
    where = f"checkpoint {step} in {directory}"
    try:
        with _manager(directory) as mngr:
            metadata = mngr.item_metadata(step)
            tree = getattr(metadata, "tree", None)
            if tree is None:
                raise CheckpointCorruptError(f"{where}: its metadata is missing or unreadable.")
            abstract = jax.tree.map(_abstract, target)
            _check_target(tree, abstract, where)
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
            return mngr.restore(step, args=ocp.args.PyTreeRestore(abstract, restore_args=restore_args))
    except CheckpointError:
        raise
    except Exception as e:  # truncated or deleted files surface as many kinds of errors
        raise CheckpointCorruptError(f"{where}: cannot be read ({type(e).__name__}: {str(e)[:300]}).") from None
