"""Merging vs running LoRAs beside their layers (`jlora.apply(..., strategy=...)`), chosen per module.

Reference: diffusers + PEFT in PyTorch. The LoRA file is written by PEFT/diffusers (tests/reference.py),
loaded by diffusers' own loaders into the torch model and run with `cross_attention_kwargs={"scale": s}`
(UNet) or `scale_lora_layers` (CLIP); jlora loads the same file onto the Flax ports of the same weights
and runs each strategy. The "auto" choices are checked against the cost formulas evaluated on the
shapes each layer sees (the tokens are counted independently from the model's inputs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import reference as R
from jlora import errors
from jlora.strategy import merge_cost, unmerged_cost

SCALE = 0.8
STRATEGIES = ("merge", "unmerged", "auto")


@pytest.fixture(scope="module")
def unet():
    return R.build_sd15_unet()  # conv proj_in/proj_out, 3x3 resnet convs: Dense and Conv LoRAs


@pytest.fixture(scope="module")
def clip():
    return R.build_clip_text()


@pytest.fixture(scope="module")
def cases(tmp_path_factory, unet, clip):
    """{name: (ref, adapter, torch output with the LoRA, torch output without)}."""
    out = {}
    for name, ref in (("unet", unet), ("text_encoder", clip)):
        path = R.make_peft_lora_file(tmp_path_factory.mktemp(name), [ref], rank=4, alpha=8, seed=5, pipeline="sd")
        adapter = jlora.load_lora(path, ref.flax_params, ref.component)
        model = R.torch_model_with_lora(ref, path, pipeline="sd")
        out[name] = (ref, adapter, R.torch_forward(model, ref, scale=SCALE), R.torch_forward(ref.torch_model, ref))
    return out


@pytest.fixture(scope="module")
def outputs(cases):
    """{(name, strategy): jlora's jitted forward at SCALE}, computed once each."""
    cache = {}

    def get(name, strategy):
        if (name, strategy) not in cache:
            ref, adapter, _, _ = cases[name]
            cache[name, strategy] = _run(ref, adapter, strategy)
        return cache[name, strategy]

    return get


def _run(ref, adapter, strategy, scale=SCALE):
    fn = R.flax_apply_fn(ref)
    step = jax.jit(lambda p, a, s, inp: jlora.apply(p, a, s, strategy=strategy, apply_fn=fn)(**inp))
    return np.asarray(step(ref.flax_params, adapter, scale, ref.inputs))


@pytest.mark.parametrize("name", ["unet", "text_encoder"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_matches_diffusers_peft(cases, outputs, name, strategy):
    ref, adapter, torch_lora, torch_base = cases[name]
    effect = np.abs(torch_lora - torch_base).max()
    assert effect > 1e-2, effect  # the LoRA changes the output, so the comparison can fail
    got = outputs(name, strategy)
    assert np.abs(got - torch_lora).max() <= 1e-3 * effect


@pytest.mark.parametrize("name", ["unet", "text_encoder"])
@pytest.mark.parametrize("strategy", ["unmerged", "auto"])
def test_unmerged_equals_the_merged_path(outputs, name, strategy):
    merged = outputs(name, "merge")
    got = outputs(name, strategy)
    assert np.abs(got - merged).max() <= 1e-5 * max(1.0, np.abs(merged).max())


def _tokens(path: str, cfg_sample: int, batch: int, seq: int) -> int | None:
    """The rows a tiny SD UNet layer sees, counted from the architecture (None: not a UNet kernel we count)."""
    level = 0
    if path.startswith("down_blocks_1") or path.startswith("mid_block") or path.startswith("up_blocks_0"):
        level = 1
    if "downsamplers" in path:
        level += 1
    if "upsamplers" in path:
        level -= 1
    positions = batch * (cfg_sample // 2**level) ** 2
    if "time_emb_proj" in path or path.startswith("time_embedding"):
        return batch
    if "attn2/to_k" in path or "attn2/to_v" in path:
        return batch * seq
    return positions


def test_auto_decides_by_tokens_against_weight_size(cases, unet):
    ref, adapter, _, _ = cases["unet"]
    fn = R.flax_apply_fn(ref)
    plan = jlora.strategy_plan(fn, ref.flax_params, adapter, **ref.inputs)
    assert len(plan) == jlora.count(adapter)
    leaves = dict((jax.tree_util.keystr(p, simple=True, separator="/"), l)
                  for p, l in jax.tree_util.tree_flatten_with_path(adapter, is_leaf=jlora.is_adapter_leaf)[0] if l is not None)
    batch, _, size, _ = ref.inputs["sample"].shape
    seq = ref.inputs["encoder_hidden_states"].shape[1]
    checked = 0
    for path, d in plan.items():
        leaf = leaves[path]
        tokens = _tokens(path, size, batch, seq)
        if "upsamplers" in path or "downsamplers" in path:
            continue  # strided / resized positions: covered by the cost check below
        assert d.tokens == tokens, (path, d)
        expected = "unmerged" if unmerged_cost(leaf.shape, leaf.rank, tokens) < merge_cost(leaf.shape, leaf.rank) else "merge"
        assert d.strategy == expected, (path, d)
        checked += 1
    assert checked >= 0.8 * len(plan)
    kinds = {d.strategy for d in plan.values()}
    assert kinds == {"merge", "unmerged"}, kinds  # this UNet has both kinds of layers


def test_more_tokens_merge_more(cases):
    ref, adapter, _, _ = cases["unet"]
    fn = R.flax_apply_fn(ref)
    small = jlora.strategy_plan(fn, ref.flax_params, adapter, **ref.inputs)
    big_inputs = dict(ref.inputs, sample=np.zeros((8,) + ref.inputs["sample"].shape[1:], np.float32),
                      timesteps=np.zeros((8,), np.float32),
                      encoder_hidden_states=np.zeros((8,) + ref.inputs["encoder_hidden_states"].shape[1:], np.float32))
    big = jlora.strategy_plan(fn, ref.flax_params, adapter, **big_inputs)
    merges = lambda plan: sum(d.strategy == "merge" for d in plan.values())  # noqa: E731
    assert merges(big) > merges(small)
    for path, d in small.items():
        if d.strategy == "merge":
            assert big[path].strategy == "merge", path  # more tokens never turn a merge into an unmerged run


def test_fixed_strategies_are_reported(cases):
    ref, adapter, _, _ = cases["text_encoder"]
    fn = R.flax_apply_fn(ref)
    for strategy in ("merge", "unmerged"):
        plan = jlora.strategy_plan(fn, ref.flax_params, adapter, **ref.inputs, strategy=strategy)
        assert {d.strategy for d in plan.values()} == {strategy}
        assert len(plan) == jlora.count(adapter)


def test_scale_is_traced_and_the_step_compiles_once(cases):
    ref, adapter, torch_lora, torch_base = cases["text_encoder"]
    fn = R.flax_apply_fn(ref)
    step = jax.jit(lambda p, a, s, inp: jlora.apply(p, a, s, strategy="auto", apply_fn=fn)(**inp))
    outs = [np.asarray(step(ref.flax_params, adapter, s, ref.inputs)) for s in (0.0, SCALE)]
    assert step._cache_size() == 1
    effect = np.abs(torch_lora - torch_base).max()
    assert np.abs(outs[0] - torch_base).max() <= 1e-3 * effect
    assert np.abs(outs[1] - torch_lora).max() <= 1e-3 * effect


def test_leaves_that_cannot_run_unmerged_are_merged_first(cases):
    """A DoRA leaf (not a plain LoRA) goes through the merge; the reference is jlora's merged path on the
    same adapter, itself checked against diffusers + PEFT in tests/test_parity.py."""
    ref, adapter, _, _ = cases["text_encoder"]
    flat, treedef = jax.tree_util.tree_flatten(adapter, is_leaf=jlora.is_adapter_leaf)
    first = next(i for i, l in enumerate(flat) if l is not None)
    leaf = flat[first]
    flat[first] = jlora.DoraLeaf(a=leaf.a, b=leaf.b, alpha=leaf.alpha, magnitude=jnp.full((1, leaf.shape[-1]), 1.5))
    mixed = jax.tree_util.tree_unflatten(treedef, flat)
    fn = R.flax_apply_fn(ref)
    plan = jlora.strategy_plan(fn, ref.flax_params, mixed, **ref.inputs, strategy="unmerged")
    assert sum(d.reason == "merged before the call" for d in plan.values()) == 1
    assert sum(d.strategy == "unmerged" for d in plan.values()) == jlora.count(adapter) - 1
    merged = _run(ref, mixed, "merge")
    assert np.abs(_run(ref, mixed, "unmerged") - merged).max() <= 1e-5 * max(1.0, np.abs(merged).max())


def test_bad_strategy_or_missing_apply_fn_is_a_typed_error(cases):
    ref, adapter, _, _ = cases["text_encoder"]
    with pytest.raises(errors.InvalidAdapterError, match="strategy must be one of"):
        jlora.apply(ref.flax_params, adapter, 1.0, strategy="fast", apply_fn=R.flax_apply_fn(ref))
    with pytest.raises(errors.InvalidAdapterError, match="needs apply_fn"):
        jlora.apply(ref.flax_params, adapter, 1.0, strategy="auto")
