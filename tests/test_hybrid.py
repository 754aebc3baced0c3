"""Hybrid Llama: any subset of layers runs DSLA; caches, swaps and parameters behave."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import hf_state_dict, tiny_hf_llama

from dsla_jax.config import LlamaConfig
from dsla_jax.generate import Generator, SamplingParams
from dsla_jax.layers.context import MixerInputs
from dsla_jax.layers.dsla import DSLA
from dsla_jax.models.hybrid import convert_to_attention, convert_to_dsla, dsla_state_dict, load_dsla_state_dict
from dsla_jax.models.weights import llama_state_dict, load_llama
from dsla_jax.training.calibrate import scale_output

N_LAYERS = 4


@pytest.fixture(scope="module")
def base():
    hf = tiny_hf_llama(kv_heads=2, tied=True, layers=N_LAYERS, seed=7)
    return LlamaConfig.from_hf_dict(hf.config.to_dict()), hf_state_dict(hf)


def _hybrid(base, layers, grouped=True):
    config, sd = base
    return load_llama(config.replace(dsla_layers=tuple(layers), dsla_grouped=grouped), sd)


LAYER_SETS = [(), (0,), tuple(range(0, N_LAYERS, 2)), tuple(range(N_LAYERS))]


@pytest.mark.parametrize("layers", LAYER_SETS, ids=lambda s: "L" + ("-".join(map(str, s)) or "none"))
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "expanded"])
def test_prefill_and_decode_equal_full_forward(base, layers, grouped):
    model = _hybrid(base, layers, grouped)
    assert model.config.dsla_layers == layers
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 100)))
    full = np.asarray(model.logits(model(tokens)[0]))
    cache = model.init_cache(2, 128)
    h, cache = model(tokens[:, :90], cache=cache)
    parts = [model.logits(h)]
    for t in range(90, 100):
        h, cache = model(tokens[:, t : t + 1], positions=jnp.full((2, 1), t), cache=cache)
        parts.append(model.logits(h))
    np.testing.assert_allclose(np.concatenate(parts, 1), full, atol=2e-4, rtol=1e-4)


def test_convert_and_back_restores_logits_exactly(base):
    config, sd = base
    model = load_llama(config, sd)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 128, (1, 40)))
    before = np.asarray(model.logits(model(tokens)[0]))
    convert_to_dsla(model, 1)
    convert_to_dsla(model, 3)
    assert model.config.dsla_layers == (1, 3)
    during = np.asarray(model.logits(model(tokens)[0]))
    assert np.abs(during - before).max() > 1e-3  # DSLA really runs
    convert_to_attention(model, 1)
    convert_to_attention(model, 3)
    assert model.config.dsla_layers == ()
    np.testing.assert_array_equal(np.asarray(model.logits(model(tokens)[0])), before)
    # the parked DSLA layer comes back with its parameters
    again = convert_to_dsla(model, 1)
    assert isinstance(again, DSLA) and model.config.dsla_layers == (1,)


def test_exported_state_dict_keeps_teacher_weights_and_dsla_params(base):
    config, sd = base
    model = _hybrid(base, (0, 2))
    model.layers[0].self_attn.alpha.set_value(jnp.asarray([0.3, -0.2]))
    out = llama_state_dict(model)
    for k, v in sd.items():
        if k in out:
            np.testing.assert_array_equal(out[k], v, err_msg=f"teacher weight {k} changed")
    dsla = dsla_state_dict(model)
    assert set(dsla) <= set(out) and any(k.startswith("model.layers.2.self_attn.dsla.g2_proj") for k in dsla)
    fresh = load_llama(config, sd)
    load_dsla_state_dict(fresh, dsla)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 128, (1, 30)))
    np.testing.assert_array_equal(
        np.asarray(fresh.logits(fresh(tokens)[0])), np.asarray(model.logits(model(tokens)[0]))
    )
    reloaded = load_llama(config.replace(dsla_layers=(0, 2)), out)
    np.testing.assert_array_equal(
        np.asarray(reloaded.logits(reloaded(tokens)[0])), np.asarray(model.logits(model(tokens)[0]))
    )


def test_bad_dsla_params_and_indices(base):
    config, sd = base
    model = load_llama(config, sd)
    with pytest.raises(ValueError, match="layer 9 out of range"):
        convert_to_dsla(model, 9)
    with pytest.raises(ValueError, match="'g1_proj.bias' has shape"):
        params = convert_to_dsla(model, 0).extra_state_dict()
        params["g1_proj.bias"] = np.zeros(3, np.float32)
        convert_to_dsla(model, 0, params)
    with pytest.raises(ValueError, match="out of range"):
        config.replace(dsla_layers=(N_LAYERS,))


def test_generation_with_dsla_layers_batches_like_single_rows(base):
    model = _hybrid(base, (1, 3))
    gen = Generator(model)
    rs = np.random.RandomState(3)
    prompts = [rs.randint(1, 128, n).tolist() for n in (4, 23)]
    params = SamplingParams(max_new_tokens=12, greedy=True)
    batched = gen.generate(prompts, params).tokens
    assert batched == [gen.generate([p], params).tokens[0] for p in prompts]


def test_generator_refresh_after_swap(base):
    config, sd = base
    model = load_llama(config, sd)
    gen = Generator(model)
    params = SamplingParams(max_new_tokens=8, greedy=True)
    before = gen.generate([[3, 4, 5]], params).tokens
    convert_to_dsla(model, 0)
    gen.refresh()
    during = gen.generate([[3, 4, 5]], params).tokens
    convert_to_attention(model, 0)
    gen.refresh()
    assert gen.generate([[3, 4, 5]], params).tokens == before
    assert isinstance(during[0], list)


def test_dsla_checkpoint_round_trip_and_wrong_model(base, tmp_path):
    from dsla_jax.checkpoints import CheckpointError
    from dsla_jax.checkpoints.dsla_params import check_compatible, load_dsla_params, save_dsla_params

    config, sd = base
    model = _hybrid(base, (1, 2))
    model.layers[2].self_attn.g1_proj.bias.set_value(jnp.full((32,), 0.5))
    path = save_dsla_params(tmp_path / "dsla", dsla_state_dict(model), model.config, base_model="tiny")
    meta, tensors = load_dsla_params(path)
    assert meta["dsla_layers"] == [1, 2] and meta["dsla_grouped"] is True
    fresh = load_llama(config, sd)
    load_dsla_state_dict(fresh, tensors)
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, 128, (1, 30)))
    np.testing.assert_array_equal(
        np.asarray(fresh.logits(fresh(tokens)[0])), np.asarray(model.logits(model(tokens)[0]))
    )
    with pytest.raises(CheckpointError, match="trained on a different model.*hidden_size: checkpoint 64 vs model 96"):
        check_compatible(meta, config.replace(hidden_size=96, head_dim=24), path)
    with pytest.raises(CheckpointError, match="is not a DSLA checkpoint"):
        load_dsla_params(tmp_path)
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        save_dsla_params(path, dsla_state_dict(model), model.config, base_model="tiny")


def test_layer_specs():
    from dsla_jax.config import ConfigError, parse_layers

    assert parse_layers("every-other", 5) == (0, 2, 4)
    assert parse_layers("frac:0.5", 30) == tuple(range(15))
    assert parse_layers("last:2", 4) == (2, 3)
    assert parse_layers("3, 1", 4) == (1, 3)
    assert parse_layers(None, 4) == ()
    with pytest.raises(ConfigError, match=r"layers \[7\] out of range for a model with 4 layers"):
        parse_layers("1,7", 4)
    with pytest.raises(ConfigError, match="bad layer spec 'x'"):
        parse_layers("x", 4)


def test_load_model_with_dsla_params_and_shared_tensors(base, tmp_path, smollm2_path):
    """`load_model(..., dsla_params=DIR)` (what every CLI's --dsla-params does) applies DSLA and shared tensors."""
    from safetensors.numpy import save_file

    from dsla_jax.checkpoints import save_hf
    from dsla_jax.checkpoints.dsla_params import SHARED_FILE, save_dsla_params
    from dsla_jax.loading import load_model
    from dsla_jax.tokenizer import load_tokenizer

    config, sd = base
    base_dir = save_hf(tmp_path / "base", config, sd, tokenizer_dir_files=load_tokenizer(smollm2_path).to_files())
    model = _hybrid(base, (3,))
    model.layers[3].self_attn.alpha.set_value(jnp.asarray([1.0, -1.0]))
    ckpt = save_dsla_params(tmp_path / "dsla", dsla_state_dict(model), model.config, base_model=str(base_dir))
    trained_mlp = {"model.layers.3.mlp.up_proj.weight": sd["model.layers.3.mlp.up_proj.weight"] * 1.5}
    save_file(trained_mlp, str(ckpt / SHARED_FILE))
    loaded, _ = load_model(base_dir, dsla_params=ckpt)
    assert loaded.config.dsla_layers == (3,)
    np.testing.assert_array_equal(np.asarray(loaded.layers[3].self_attn.alpha[...]), [1.0, -1.0])
    np.testing.assert_allclose(
        np.asarray(loaded.layers[3].mlp.up_proj.kernel[...]).T, trained_mlp["model.layers.3.mlp.up_proj.weight"]
    )


def test_output_gain_scales_the_layer_and_old_checkpoints_load(base):
    """exp(log_scale) multiplies a DSLA layer's output; calibration moves it, not o_proj; a checkpoint written
    before the gain existed (no `log_scale` tensor) loads with gain 1."""
    model = _hybrid(base, (1,))
    layer = model.layers[1].self_attn
    x = jnp.asarray(np.random.RandomState(3).randn(1, 20, model.config.hidden_size), jnp.float32)
    zeros = jnp.zeros((1, 20, model.config.head_dim), jnp.float32)  # DSLA reads no RoPE tables
    info = MixerInputs(jnp.arange(20)[None], jnp.ones((1, 20), bool), zeros, zeros, jnp.zeros((), jnp.int32), None)
    y0 = np.asarray(layer(x, info)[0])
    o_proj = np.asarray(layer.o_proj.kernel[...])
    scale_output(layer, 0.01)
    np.testing.assert_array_equal(np.asarray(layer.o_proj.kernel[...]), o_proj)
    np.testing.assert_allclose(float(layer.log_scale[...][0]), np.log(0.01), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(layer(x, info)[0]), 0.01 * y0, rtol=1e-4, atol=1e-6 * np.abs(y0).max())
    old = {k: v for k, v in dsla_state_dict(model).items() if not k.endswith("log_scale")}
    assert len(old) < len(dsla_state_dict(model))
    load_dsla_state_dict(model, old)
    np.testing.assert_allclose(np.asarray(layer(x, info)[0]), y0, rtol=1e-5, atol=1e-6 * np.abs(y0).max())
