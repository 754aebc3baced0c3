"""The training view of a model: the layer-by-layer forward equals `Llama.__call__` (teacher and hybrids, with the
runtime `active` mask), flat parameter dictionaries round-trip, and the trainable filter picks the right tensors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsla_jax.models.hybrid import convert_to_dsla
from dsla_jax.models.llama import Llama
from dsla_jax.training import params as P
from dsla_jax.training.chain import build_student, make_hybrid
from dsla_jax.training.config import ModelSection
from dsla_jax.training.forward import forward
from dsla_jax.training.tiny import tiny_config

CHAIN = (3, 1)


@pytest.fixture(scope="module")
def teacher():
    return Llama(tiny_config(layers=4), rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def tokens():
    rs = np.random.RandomState(0)
    return jnp.asarray(rs.randint(0, 128, (2, 40))), jnp.asarray(np.arange(40)[None, :] < np.array([[40], [33]]))


def test_forward_with_active_mask_equals_the_real_hybrids(teacher, tokens):
    tok, valid = tokens
    student = build_student(teacher, CHAIN, ModelSection(dsla_impl="xla", dsla_chunk_size=16))
    graph, flat = P.split_model(student)
    run = jax.jit(lambda flat, active: forward(P.merge(graph, flat), tok, valid, active=active).hidden)
    for active_layers in [(), (3,), (3, 1)]:
        active = jnp.asarray([i in active_layers for i in range(4)])
        hybrid = make_hybrid(graph, flat, {}, active_layers)
        assert hybrid.config.dsla_layers == tuple(sorted(active_layers))
        expect = hybrid(tok, valid=valid)[0]
        np.testing.assert_allclose(run(flat, active), expect, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(forward(teacher, tok, valid).hidden, teacher(tok, valid=valid)[0], atol=2e-5)


def test_flat_round_trip_and_capture(teacher, tokens):
    tok, valid = tokens
    graph, flat = P.split_model(teacher)
    assert "layers.2.self_attn.q_proj.kernel" in flat and "embed_tokens.embedding" in flat
    again = P.merge(graph, flat)
    out = forward(again, tok, valid, capture=(0, 2))
    assert set(out.layer_out) == {0, 2} and out.layer_out[0].shape == (2, 40, 64)
    np.testing.assert_array_equal(out.hidden, forward(teacher, tok, valid).hidden)


def test_trainable_filter():
    student = Llama(tiny_config(layers=4), rngs=nnx.Rngs(0))
    for i in CHAIN:
        convert_to_dsla(student, i)
    _, flat = P.split_model(student)
    keys = set(P.partition(flat, P.trainable_filter(CHAIN))[0])
    assert keys == {k for k in flat if k.startswith(("layers.3.self_attn.", "layers.1.self_attn."))}
    assert not any(".parked." in k for k in keys)  # the original attention stays frozen
    gla = set(P.partition(flat, P.trainable_filter(CHAIN, single_state=True))[0])
    assert gla == {k for k in keys if ".g2_proj." not in k and not k.endswith(".alpha")}
    both = set(P.partition(flat, P.trainable_filter(CHAIN, mlp=True, norms=True))[0])
    assert "layers.1.mlp.up_proj.kernel" in both and "layers.3.post_attention_layernorm.weight" in both
    assert "layers.0.mlp.up_proj.kernel" not in both and "norm.weight" not in both


def test_mask_by_layer():
    tree = {"layers.0.a": jnp.ones(2), "layers.1.a": jnp.ones(2), "norm.weight": jnp.ones(2)}
    out = P.mask_by_layer(tree, jnp.asarray([False, True]))
    assert [float(v.sum()) for v in out.values()] == [0.0, 2.0, 2.0]
