"""jlora's shape indexes of standard architectures equal the real diffusers/transformers Flax models."""

import jax
import pytest
from diffusers import FlaxUNet2DConditionModel

import reference as R
from converters import architectures as A


def _shapes(tree):
    return {tuple(str(k.key) for k in kp): tuple(x.shape) for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _mine(index):
    return {k: v[0] for k, v in index.items()}


@pytest.mark.parametrize("name", ["sd15_unet", "sdxl_unet"])
def test_tiny_unet_index(name):
    ref = R.ALL_BUILDERS[name]()
    cfg = {k: v for k, v in ref.flax_module.config.items() if not k.startswith("_")}
    assert _mine(A.unet_index(cfg)) == _shapes(ref.flax_params)


@pytest.mark.parametrize("cfg,heads", [(A.SD15_UNET, 8), (A.SD2_UNET, (5, 10, 20, 20)), (A.SDXL_UNET, (5, 10, 20))])
def test_full_size_unet_index(cfg, heads):
    model = FlaxUNet2DConditionModel(**cfg, attention_head_dim=heads)
    real = _shapes(jax.eval_shape(model.init_weights, jax.random.PRNGKey(0)))
    assert _mine(A.unet_index(cfg)) == real
    assert len(real) > 600


@pytest.mark.parametrize("name,projection", [("clip_text", False), ("clip_text_proj", True)])
def test_clip_index(name, projection):
    ref = R.ALL_BUILDERS[name]()
    c = ref.torch_model.config
    index = A.clip_index(
        c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.projection_dim if projection else None,
        c.vocab_size, c.max_position_embeddings,
    )
    assert _mine(index) == _shapes(ref.flax_params)


def test_family_indexes_components():
    assert set(A.family_indexes("sdxl")) == {"unet", "text_encoder", "text_encoder_2"}
    assert ("text_projection", "kernel") in A.family_indexes("sdxl")["text_encoder_2"]


@pytest.mark.parametrize("guidance", [False, True])
def test_flux_index_equals_the_flax_flux(guidance):
    from jlora.models import flux

    tiny = dict(in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    assert _mine(A.flux_index(tiny)) == _shapes(flux.param_shapes(tiny))
    full = dict(A.FLUX_DEV, axes_dims_rope=(16, 56, 56))
    assert _mine(A.flux_index(full)) == _shapes(flux.param_shapes(full))
