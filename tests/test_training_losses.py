"""Distillation loss terms against direct numpy formulas, masks, and the lambda schedule."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dsla_jax.training import losses
from dsla_jax.training.config import LossSection


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture
def batch():
    rs = np.random.RandomState(0)
    return {
        "t": rs.randn(2, 6, 11).astype(np.float32) * 2,
        "s": rs.randn(2, 6, 11).astype(np.float32) * 2,
        "tokens": rs.randint(0, 11, (2, 6)),
        "valid": np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool),
    }


def test_cross_entropy_masks_positions(batch):
    mask = batch["valid"].copy()
    mask[0, 2] = False  # e.g. a document boundary
    got = float(losses.cross_entropy(jnp.asarray(batch["s"]), jnp.asarray(batch["tokens"]), jnp.asarray(mask)))
    logp = _log_softmax(batch["s"][:, :-1])
    nll = -np.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(got, nll[mask[:, :-1]].mean(), rtol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kl_teacher_student_with_temperature(batch, tau):
    got = float(
        losses.kl_divergence(jnp.asarray(batch["t"]), jnp.asarray(batch["s"]), jnp.asarray(batch["valid"]), tau)
    )
    lt, ls = _log_softmax(batch["t"] / tau), _log_softmax(batch["s"] / tau)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    np.testing.assert_allclose(got, kl[batch["valid"]].mean() * tau**2, rtol=1e-5)
    same = losses.kl_divergence(jnp.asarray(batch["t"]), jnp.asarray(batch["t"]), jnp.asarray(batch["valid"]), tau)
    assert abs(float(same)) < 1e-6


def test_hidden_terms(batch):
    t, s, v = batch["t"], batch["s"], batch["valid"]
    mse = float(losses.hidden_term(jnp.asarray(t), jnp.asarray(s), jnp.asarray(v), "mse", 1.0))
    expect = ((s - t) ** 2).mean(-1)[v].mean() / (t * t).mean(-1)[v].mean()
    np.testing.assert_allclose(mse, expect, rtol=1e-5)
    kl = float(losses.hidden_term(jnp.asarray(t), jnp.asarray(s), jnp.asarray(v), "kl", 2.0))
    lt, ls = _log_softmax(t / 2), _log_softmax(s / 2)
    np.testing.assert_allclose(kl, (np.exp(lt) * (lt - ls)).sum(-1)[v].mean(), rtol=1e-5)
    # padding does not count: changing padded positions changes nothing
    s2 = s.copy()
    s2[~v] += 100
    assert float(losses.hidden_term(jnp.asarray(t), jnp.asarray(s2), jnp.asarray(v), "mse", 1.0)) == pytest.approx(mse)


def test_gate_cosine():
    rs = np.random.RandomState(1)
    g1 = -np.abs(rs.randn(2, 5, 3, 4)).astype(np.float32)
    valid = np.ones((2, 5), bool)
    assert float(losses.gate_cosine(jnp.asarray(g1), jnp.asarray(g1), jnp.asarray(valid))) == pytest.approx(1.0)
    g2 = -np.abs(rs.randn(2, 5, 3, 4)).astype(np.float32)
    a, b = g1.reshape(2, 5, -1), g2.reshape(2, 5, -1)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    got = float(losses.gate_cosine(jnp.asarray(g1), jnp.asarray(g2), jnp.asarray(valid)))
    np.testing.assert_allclose(got, cos.mean(), rtol=1e-5)


def test_layer_average_counts_active_layers_only():
    values = {0: jnp.float32(1.0), 2: jnp.float32(3.0), 3: jnp.float32(100.0)}
    active = jnp.asarray([True, False, True, False])
    assert float(losses.layer_average(values, active)) == pytest.approx(2.0)
    assert float(losses.layer_average(values, jnp.zeros(4, bool))) == 0.0


def test_cosine_lambda_decay():
    cfg = LossSection(decay="cosine", decay_final=0.2)
    f = [float(losses.lambda_factor(cfg, jnp.int32(s), 10)) for s in (0, 5, 10)]
    np.testing.assert_allclose(f, [1.0, 0.6, 0.2], atol=1e-6)
    assert float(losses.lambda_factor(LossSection(), jnp.int32(7), 10)) == 1.0


def test_distill_loss_combines_the_terms(batch):
    cfg = LossSection(lambda_ce=0.5, lambda_kl=2.0, lambda_hidden=3.0, lambda_gate=0.1)
    t, s, v = (jnp.asarray(batch[k]) for k in ("t", "s", "valid"))
    g = jnp.asarray(-np.abs(np.random.RandomState(2).randn(2, 6, 1, 11)).astype(np.float32))
    total, terms = losses.distill_loss(
        cfg,
        student_logits=s,
        teacher_logits=t,
        tokens=jnp.asarray(batch["tokens"]),
        valid=v,
        loss_mask=v,
        student_hidden={1: s},
        teacher_hidden={1: t},
        gates={1: (g, g * 0.5)},
        active=jnp.asarray([False, True]),
        factor=jnp.float32(0.5),
    )
    expect = 0.5 * terms["ce"] + 0.5 * (2.0 * terms["kl"] + 3.0 * terms["hidden"] + 0.1 * terms["gate"])
    assert float(total) == pytest.approx(float(expect), rel=1e-6)
    assert float(terms["gate"]) == pytest.approx(1.0, abs=1e-6)
