"""GLA ops: the chunked path, the decode step and "auto" against the float32 token loop."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from _assert_close import assert_close, tol
from _dsla_inputs import make_gates
from test_ops_dsla import case_id, fast_jit

from dsla_jax.ops.gla import gla_attention, gla_decode_step
from dsla_jax.ops.gla.chunk import cumsum_hi_lo

F32 = 1e-5


def make_inputs(seed: int, B: int, T: int, H: int, Hk: int, D: int, dtype, gate: str = "strong", init: bool = True):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, H, D)).astype(dtype)
    k = (jax.random.normal(ks[1], (B, T, Hk, D)) * D**-0.5).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, Hk, 2 * D)).astype(dtype)  # V != K
    g = make_gates(ks[3], (B, T, Hk, D), gate).astype(dtype)
    s0 = jax.random.normal(ks[4], (B, Hk, D, 2 * D)) if init else None
    return q, k, v, g, s0


def _run(q, k, v, g, s0, impl, chunk_size=64):
    return gla_attention(q, k, v, g, initial_state=s0, impl=impl, chunk_size=chunk_size)


run = fast_jit(_run, static_argnames=("impl", "chunk_size"))

# (B, T, H, Hk, D, dtype, gate, initial state)
CASES = [
    (2, 1, 3, 1, 16, jnp.float32, "strong", True),
    (2, 63, 6, 6, 16, jnp.float32, "weak", False),
    (2, 64, 6, 2, 16, jnp.float32, "mixed", True),
    (1, 65, 3, 3, 32, jnp.float32, "logsig", True),
    (1, 1000, 3, 1, 16, jnp.float32, "strong", True),
    (2, 65, 6, 2, 16, jnp.bfloat16, "mixed", True),
]


@pytest.mark.parametrize(
    "B,T,H,Hk,D,dtype,gate,init",
    CASES,
    ids=[case_id(*c[:6], c[6], "init" if c[7] else "noinit") for c in CASES],
)
def test_chunked_matches_naive(B, T, H, Hk, D, dtype, gate, init):
    q, k, v, g, s0 = make_inputs(T + Hk, B, T, H, Hk, D, dtype, gate, init)
    o_ref, s_ref = run(q, k, v, g, s0, impl="naive")
    o, s = run(q, k, v, g, s0, impl="xla")
    assert o.dtype == dtype and o.shape == (B, T, H, 2 * D) and s.dtype == jnp.float32
    assert_close("o", o_ref, o, tol(dtype))
    assert_close("S", s_ref, s, F32)


def test_split_sequence_and_decode_steps():
    B, T, H, Hk, D = 2, 70, 6, 2, 16
    q, k, v, g, s0 = make_inputs(1, B, T, H, Hk, D, jnp.float32, "mixed")
    o, s = run(q, k, v, g, s0, impl="xla")
    cut = 33
    o1, s_mid = run(q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut], s0, impl="xla")
    o2, s_end = run(q[:, cut:], k[:, cut:], v[:, cut:], g[:, cut:], s_mid, impl="xla")
    assert_close("split o", o, jnp.concatenate([o1, o2], axis=1), F32)
    assert_close("split S", s, s_end, F32)

    @fast_jit
    def decode_all(q, k, v, g, s0):
        def step(state, xs):
            o, state = gla_decode_step(*xs, state)
            return state, o

        state, o = jax.lax.scan(step, s0, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g)))
        return jnp.moveaxis(o, 0, 1), state

    o_d, s_d = decode_all(q, k, v, g, s0)
    assert_close("decode o", o, o_d, F32)
    assert_close("decode S", s, s_d, F32)


@functools.cache
def _loss_grads(impl: str):
    def loss(q, k, v, g, s0, ct_o, ct_s):
        o, s = gla_attention(q, k, v, g, initial_state=s0, impl=impl)
        return jnp.sum(o.astype(jnp.float32) * ct_o) + jnp.sum(s * ct_s)

    return fast_jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def test_gradients_match_naive():
    B, T, H, Hk, D = 1, 150, 6, 2, 16
    q, k, v, g, s0 = make_inputs(2, B, T, H, Hk, D, jnp.float32, "mixed")
    ks = jax.random.split(jax.random.key(3), 2)
    args = (q, k, v, g, s0, jax.random.normal(ks[0], (B, T, H, 2 * D)), jax.random.normal(ks[1], s0.shape))
    ref = _loss_grads("naive")(*args)
    for impl in ("xla", "auto"):
        for name, r, got in zip(("dq", "dk", "dv", "dg", "ds0"), ref, _loss_grads(impl)(*args)):
            assert_close(f"{impl} {name}", r, got, F32)


def test_cumsum_hi_lo_is_exact_for_strong_gates():
    """hi + lo of the within-chunk cumsum keeps differences of cumsums exact where |cumsum| is in the thousands."""
    g = jax.random.uniform(jax.random.key(4), (64, 8), minval=-50.0, maxval=0.0)
    hi, lo = cumsum_hi_lo(g, axis=0)
    exact = jnp.cumsum(g.astype(jnp.float64) if jax.config.jax_enable_x64 else g, axis=0)
    assert float(jnp.max(jnp.abs(hi + lo - exact))) < 1e-2  # exact itself is float32-rounded here
    # Differences of neighbours reproduce the gates to float32 rounding of the gate itself.
    d = (hi[1:] - hi[:-1]) + (lo[1:] - lo[:-1])
    assert float(jnp.max(jnp.abs(d - g[1:]) / jnp.maximum(jnp.abs(g[1:]), 1e-3))) < 1e-6


@pytest.mark.parametrize(
    "what,match",
    [
        ("q_rank", "4-D"),
        ("heads", "multiple"),
        ("v_time", "must agree"),
        ("g_shape", "must equal k shape"),
        ("state", "state 0"),
        ("impl", "impl must be one of"),
        ("chunk_size", "chunk_size"),
    ],
)
def test_bad_shapes_raise(what, match):
    q, k, v, g, s0 = make_inputs(5, 2, 8, 6, 2, 16, jnp.float32)
    kw = dict(initial_state=s0)
    if what == "q_rank":
        q = q[0]
    elif what == "heads":
        q = q[:, :, :5]
    elif what == "v_time":
        v = v[:, :3]
    elif what == "g_shape":
        g = g[..., :4]
    elif what == "state":
        kw["initial_state"] = s0[:, :, :3]
    elif what == "impl":
        kw["impl"] = "cuda"
    elif what == "chunk_size":
        kw["chunk_size"] = -4
    with pytest.raises(ValueError, match=match):
        gla_attention(q, k, v, g, **kw)


def test_decode_bad_shapes_and_pallas():
    q, k, v, g, s0 = make_inputs(6, 2, 1, 6, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="state 0"):
        gla_decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], s0[..., :3])
    with pytest.raises(ValueError, match="3-D"):
        gla_decode_step(q, k[:, 0], v[:, 0], g[:, 0], s0)
    with pytest.raises(NotImplementedError, match="only DSLA has Pallas kernels"):
        gla_attention(q, k, v, g, impl="pallas")
