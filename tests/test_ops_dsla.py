"""DSLA ops: the chunked paths (fused and two-state), the decode step and "auto" against the float32 token loop."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _assert_close import assert_close, tol
from _dsla_inputs import random_dsla_inputs

from dsla_jax.ops.dsla import XLA_DEFAULT, dsla_attention, dsla_decode_step
from dsla_jax.ops.dsla.chunk import chunk_dsla_fused, chunk_dsla_two
from dsla_jax.ops.gla.chunk import _chunks_per_block

F32 = 1e-5  # float32 tolerance (also of states and gradients: the token loop runs in float32 for every dtype)


def fast_jit(fn, static_argnames=()):
    """jax.jit compiled at XLA CPU backend optimization level 0 (numerics unchanged, compiles ~2.5x faster; the
    tests compile far more than they run), cached per argument shapes and static arguments."""
    jitted = jax.jit(fn, static_argnames=static_argnames)
    cache = {}

    def call(*args, **static):
        leaves, tree = jax.tree.flatten(args)
        key = (tree, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves), tuple(sorted(static.items())))
        if key not in cache:
            opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
            cache[key] = jitted.lower(*args, **static).compile(compiler_options=opts)
        return cache[key](*args)

    call.lower = jitted.lower
    return call


def make_inputs(seed: int, B: int, T: int, H: int, Hk: int, D: int, dtype, gates=("strong", "weak"), init=True):
    return random_dsla_inputs(seed, B, T, H, Hk, D, D, dtype, gates, init)


def _run(q, k, v, g1, g2, mix, s0, impl, chunk_size=64):
    return dsla_attention(q, k, v, g1, g2, mix, initial_state=s0, impl=impl, chunk_size=chunk_size)


run = fast_jit(_run, static_argnames=("impl", "chunk_size"))


def case_id(B, T, H, Hk, D, dtype, *extra) -> str:
    return "-".join([f"B{B}-T{T}-H{H}-Hk{Hk}-D{D}-{jnp.dtype(dtype).name}", *map(str, extra)])


# (B, T, H, Hk, D, dtype, gates, initial state)
FORWARD_CASES = [
    (2, 1, 6, 6, 16, jnp.float32, ("strong", "weak"), True),
    (2, 63, 6, 2, 16, jnp.float32, ("strong", "weak"), False),
    (2, 64, 3, 3, 32, jnp.float32, ("logsig", "strong"), True),
    (2, 65, 6, 2, 16, jnp.float32, ("mixed", "logsig"), True),
    (1, 1000, 3, 1, 16, jnp.float32, ("strong", "weak"), True),
    (1, 1000, 3, 3, 16, jnp.float32, ("logsig", "mixed"), False),
    (2, 1, 6, 2, 16, jnp.bfloat16, ("strong", "weak"), False),
    (2, 65, 6, 6, 16, jnp.bfloat16, ("logsig", "strong"), True),
    (1, 1000, 3, 1, 16, jnp.bfloat16, ("strong", "logsig"), True),
]


@pytest.mark.parametrize(
    "B,T,H,Hk,D,dtype,gates,init",
    FORWARD_CASES,
    ids=[case_id(*c[:6], "-".join(c[6]), "init" if c[7] else "noinit") for c in FORWARD_CASES],
)
def test_chunked_matches_naive(B, T, H, Hk, D, dtype, gates, init):
    q, k, v, g1, g2, mix, s0 = make_inputs(T + H, B, T, H, Hk, D, dtype, gates, init)
    o_ref, (s1_ref, s2_ref) = run(q, k, v, g1, g2, mix, s0, impl="naive")
    assert o_ref.dtype == dtype and s1_ref.dtype == jnp.float32
    for impl in ("xla_fused", "xla_two"):
        o, (s1, s2) = run(q, k, v, g1, g2, mix, s0, impl=impl)
        assert o.dtype == dtype and o.shape == (B, T, H, D)
        assert_close(f"{impl} o", o_ref, o, tol(dtype))
        assert_close(f"{impl} S1", s1_ref, s1, F32)
        assert_close(f"{impl} S2", s2_ref, s2, F32)


def test_fused_equals_two_and_xla_default():
    q, k, v, g1, g2, mix, s0 = make_inputs(1, 2, 65, 6, 2, 16, jnp.float32, ("logsig", "mixed"))
    o_f, s_f = run(q, k, v, g1, g2, mix, s0, impl="xla_fused")
    o_t, s_t = run(q, k, v, g1, g2, mix, s0, impl="xla_two")
    assert_close("o", o_t, o_f, F32)
    assert_close("S1", s_t[0], s_f[0], F32)
    assert_close("S2", s_t[1], s_f[1], F32)
    assert XLA_DEFAULT in ("xla_fused", "xla_two")
    o_x, _ = run(q, k, v, g1, g2, mix, s0, impl="xla")
    np.testing.assert_array_equal(np.asarray(o_x), np.asarray(o_f if XLA_DEFAULT == "xla_fused" else o_t))


@pytest.mark.parametrize("chunk_size", [16, 48])
def test_chunk_sizes(chunk_size):
    q, k, v, g1, g2, mix, s0 = make_inputs(2, 1, 200, 3, 1, 16, jnp.float32, ("mixed", "logsig"))
    o_ref, s_ref = run(q, k, v, g1, g2, mix, s0, impl="naive")
    o, s = run(q, k, v, g1, g2, mix, s0, impl="xla", chunk_size=chunk_size)
    assert_close("o", o_ref, o, F32)
    assert_close("S1", s_ref[0], s[0], F32)
    assert_close("S2", s_ref[1], s[1], F32)


def test_split_sequence_carries_state():
    impl = "xla"
    q, k, v, g1, g2, mix, s0 = make_inputs(3, 2, 150, 6, 2, 16, jnp.float32, ("logsig", "strong"))
    o, s = run(q, k, v, g1, g2, mix, s0, impl=impl)
    cut = 70
    first = [x[:, :cut] for x in (q, k, v, g1, g2)]
    second = [x[:, cut:] for x in (q, k, v, g1, g2)]
    o1, s_mid = run(*first, mix, s0, impl=impl)
    o2, s_end = run(*second, mix, s_mid, impl=impl)
    assert_close("o", o, jnp.concatenate([o1, o2], axis=1), F32)
    assert_close("S1", s[0], s_end[0], F32)
    assert_close("S2", s[1], s_end[1], F32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_decode_steps_reproduce_chunked(dtype):
    B, T, H, Hk, D = 2, 65, 6, 2, 16
    q, k, v, g1, g2, mix, s0 = make_inputs(4, B, T, H, Hk, D, dtype, ("logsig", "strong"))
    o_ref, s_ref = run(q, k, v, g1, g2, mix, s0, impl="xla")

    @fast_jit
    def decode_all(q, k, v, g1, g2, mix, s0):
        def step(state, xs):
            o, state = dsla_decode_step(*xs, mix, state)
            return state, o

        xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g1, g2))
        state, o = jax.lax.scan(step, s0, xs)
        return jnp.moveaxis(o, 0, 1), state

    o, s = decode_all(q, k, v, g1, g2, mix, s0)
    assert o.dtype == dtype
    assert_close("o", o_ref, o, tol(dtype))
    assert_close("S1", s_ref[0], s[0], F32)
    assert_close("S2", s_ref[1], s[1], F32)
    # A python loop of single steps from zero state, against the token loop.
    zeros = (jnp.zeros((B, Hk, D, D)), jnp.zeros((B, Hk, D, D)))
    o_n, s_n = run(q[:, :3], k[:, :3], v[:, :3], g1[:, :3], g2[:, :3], mix, None, impl="naive")
    state = zeros
    for t in range(3):
        o_t, state = dsla_decode_step(q[:, t], k[:, t], v[:, t], g1[:, t], g2[:, t], mix, state)
        assert_close(f"o[{t}]", o_n[:, t], o_t, tol(dtype))
    assert_close("S1", s_n[0], state[0], F32)


@functools.cache
def _loss_grads(impl: str, chunk_size: int = 64):
    def loss(q, k, v, g1, g2, mix, s0, ct_o, ct_s1, ct_s2):
        o, (s1, s2) = dsla_attention(q, k, v, g1, g2, mix, initial_state=s0, impl=impl, chunk_size=chunk_size)
        return jnp.sum(o.astype(jnp.float32) * ct_o) + jnp.sum(s1 * ct_s1) + jnp.sum(s2 * ct_s2)

    return fast_jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5, 6)))


# (B, T, H, Hk, D, dtype, gates, impls compared with the token loop)
GRAD_CASES = [
    (2, 63, 6, 2, 16, jnp.float32, ("strong", "weak"), ("xla_fused", "xla_two", "auto")),
    (1, 130, 3, 3, 16, jnp.float32, ("logsig", "mixed"), ("xla",)),
    (1, 1000, 3, 1, 16, jnp.float32, ("mixed", "logsig"), ("xla",)),
    (1, 65, 3, 1, 16, jnp.bfloat16, ("logsig", "strong"), ("xla",)),
]


@pytest.mark.parametrize(
    "B,T,H,Hk,D,dtype,gates,impls", GRAD_CASES, ids=[case_id(*c[:6], "-".join(c[6])) for c in GRAD_CASES]
)
def test_gradients_match_naive(B, T, H, Hk, D, dtype, gates, impls):
    """Gradients w.r.t. q, k, v, g1, g2, mix and the initial states, with random cotangents of o and both states."""
    q, k, v, g1, g2, mix, s0 = make_inputs(5 + T, B, T, H, Hk, D, dtype, gates)
    ks = jax.random.split(jax.random.key(99), 3)
    ct = (
        jax.random.normal(ks[0], (B, T, H, D)),
        jax.random.normal(ks[1], (B, Hk, D, D)),
        jax.random.normal(ks[2], (B, Hk, D, D)),
    )
    args = (q, k, v, g1, g2, mix, s0, *ct)
    ref = _loss_grads("naive")(*args)
    names = ("dq", "dk", "dv", "dg1", "dg2", "dmix", "ds0")
    for impl in impls:
        got = _loss_grads(impl)(*args)
        for name, r, g in zip(names, ref, got):
            for i, (rl, gl) in enumerate(zip(jax.tree.leaves(r), jax.tree.leaves(g))):
                assert gl.dtype == rl.dtype
                # Gradients of bf16 inputs are rounded to bf16; mix and state gradients are float32 in both.
                rtol = F32 if gl.dtype == jnp.float32 else tol(gl.dtype)
                assert_close(f"{impl} {name}[{i}]", rl, gl, rtol)


@pytest.mark.parametrize("form", ["fused", "two"])
def test_blocked_scan_matches_naive(form):
    """Force several blocks of chunks (the CPU memory bound), incl. a block count that needs padding: 7 chunks in
    blocks of 4; values and gradients against the token loop."""
    B, T, H, Hk, D = 1, 7 * 64 - 5, 3, 1, 16
    q, k, v, g1, g2, mix, s0 = make_inputs(13, B, T, H, Hk, D, jnp.float32, ("mixed", "logsig"))
    fn = {"fused": chunk_dsla_fused, "two": chunk_dsla_two}[form]
    per_chunk = B * Hk * max(H // Hk, 2) * 64 * 16 * (2 * D if form == "fused" else D)  # gla.chunk._chunks_per_block
    assert _chunks_per_block(7, B * Hk, H // Hk, 64, 16, per_chunk // (B * Hk * 3 * 64 * 16), 4 * per_chunk) == 4

    def loss(impl, q, k, v, g1, g2, mix, s0):
        if impl == "naive":
            o, s = dsla_attention(q, k, v, g1, g2, mix, initial_state=s0, impl="naive")
        else:
            o, s = fn(q, k, v, g1, g2, mix, initial_state=s0, sub_chunk=16, block_elems=4 * per_chunk)
        return jnp.sum(jnp.sin(o)) + jnp.sum(s[0] * s[1]), (o, s)

    ref, (o_ref, s_ref) = _grad_with(loss, "naive", q, k, v, g1, g2, mix, s0)
    got, (o, s) = _grad_with(loss, "blocked", q, k, v, g1, g2, mix, s0)
    assert_close("o", o_ref, o, F32)
    assert_close("S1", s_ref[0], s[0], F32)
    for name, r, g in zip(("dq", "dk", "dv", "dg1", "dg2", "dmix", "ds0"), ref, got):
        for rl, gl in zip(jax.tree.leaves(r), jax.tree.leaves(g)):
            assert_close(name, rl, gl, F32)


def _grad_with(loss, impl, *args):
    fn = fast_jit(jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2, 3, 4, 5, 6), has_aux=True))
    return fn(*args)


def test_auto_matches_naive():
    q, k, v, g1, g2, mix, s0 = make_inputs(7, 2, 65, 6, 2, 16, jnp.float32, ("logsig", "strong"))
    o_ref, s_ref = run(q, k, v, g1, g2, mix, s0, impl="naive")
    o, s = run(q, k, v, g1, g2, mix, s0, impl="auto")
    assert_close("o", o_ref, o, F32)
    assert_close("S1", s_ref[0], s[0], F32)


def test_no_nan_with_extreme_gates_and_empty_sequence():
    B, T, H, Hk, D = 1, 64, 3, 3, 16
    q, k, v, _, _, mix, s0 = make_inputs(8, B, T, H, Hk, D, jnp.float32)
    g1 = jnp.full((B, T, Hk, D), -1e4)  # decays underflow to exactly 0
    g2 = jnp.zeros((B, T, Hk, D))  # no decay at all
    o, s = run(q, k, v, g1, g2, mix, s0, impl="xla")
    o_ref, s_ref = run(q, k, v, g1, g2, mix, s0, impl="naive")
    assert_close("o", o_ref, o, F32)
    assert_close("S2", s_ref[1], s[1], F32)
    grads = _loss_grads("xla")(q, k, v, g1, g2, mix, s0, jnp.ones_like(o), s[0], s[1])
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(grads))
    o0, s00 = dsla_attention(q[:, :0], k[:, :0], v[:, :0], g1[:, :0], g2[:, :0], mix, initial_state=s0)
    assert o0.shape == (B, 0, H, D)
    np.testing.assert_array_equal(np.asarray(s00[0]), np.asarray(s0[0]))


def test_pallas_impl_dispatches_to_the_kernels():
    q, k, v, g1, g2, mix, _ = make_inputs(9, 1, 8, 3, 3, 16, jnp.float32)
    # on this CPU the kernels run only in the interpreter (tests/test_pallas.py): the dispatch reaches them and says so
    with pytest.raises(ValueError, match="the DSLA Pallas kernels need a GPU or TPU"):
        dsla_attention(q, k, v, g1, g2, mix, impl="pallas")


def _bad(name: str):
    """Inputs with one thing wrong, named by `name`."""
    q, k, v, g1, g2, mix, s0 = make_inputs(10, 2, 8, 6, 2, 16, jnp.float32)
    if name == "q_rank":
        q = q[0]
    elif name == "heads":
        q = q[:, :, :4]  # 4 query heads over 2... fine; 5 is not a multiple of 2
        q = jnp.concatenate([q, q[:, :, :1]], axis=2)
    elif name == "k_dim":
        k = k[..., :8]
    elif name == "v_time":
        v = v[:, :4]
    elif name == "gate_shape":
        g2 = g2[:, :, :1]
    elif name == "mix":
        mix = jnp.ones((3,))
    elif name == "state_shape":
        s0 = (s0[0], s0[1][:, :1])
    elif name == "state_pair":
        s0 = s0[0]
    elif name == "impl":
        return dict(args=(q, k, v, g1, g2, mix), kw=dict(initial_state=s0, impl="cuda"))
    elif name == "chunk_size":
        return dict(args=(q, k, v, g1, g2, mix), kw=dict(initial_state=s0, chunk_size=0))
    return dict(args=(q, k, v, g1, g2, mix), kw=dict(initial_state=s0))


BAD = ["q_rank", "heads", "k_dim", "v_time", "gate_shape", "mix", "state_shape", "state_pair", "impl", "chunk_size"]


@pytest.mark.parametrize("name", BAD)
def test_bad_shapes_raise(name):
    case = _bad(name)
    with pytest.raises(ValueError, match=r"\S"):
        dsla_attention(*case["args"], **case["kw"])


def test_decode_bad_shapes_raise():
    q, k, v, g1, g2, mix, s0 = make_inputs(11, 2, 1, 6, 2, 16, jnp.float32)
    q, k, v, g1, g2 = (x[:, 0] for x in (q, k, v, g1, g2))
    with pytest.raises(ValueError, match="must equal k shape"):
        dsla_decode_step(q, k, v, g1[:, :1], g2, mix, s0)
    with pytest.raises(ValueError, match="state"):
        dsla_decode_step(q, k, v, g1, g2, mix, s0[0])
    with pytest.raises(ValueError, match="multiple"):
        dsla_decode_step(q[:, :5], k, v, g1, g2, mix, s0)
    with pytest.raises(ValueError, match="3-D"):
        dsla_decode_step(q[:, None], k, v, g1, g2, mix, s0)


def test_auto_falls_back_to_xla_for_head_dims_the_kernels_do_not_take(monkeypatch):
    """On a GPU, impl="auto" runs the Pallas kernels, whose Triton tiles need power-of-two head dims; other dims
    (here 48) run the chunked XLA path instead of failing, and impl="pallas" says why it cannot."""
    from dsla_jax.ops import utils
    from dsla_jax.ops.dsla.pallas import dsla_attention_pallas

    q, k, v, g1, g2, mix, _ = random_dsla_inputs(4, 1, 20, 2, 2, 48, 48, jnp.float32, init=False)
    ref = dsla_attention(q, k, v, g1, g2, mix, impl="xla")[0]
    monkeypatch.setattr(utils, "backend", lambda: "gpu")
    np.testing.assert_allclose(dsla_attention(q, k, v, g1, g2, mix, impl="auto")[0], ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="powers of two"):
        dsla_attention_pallas(q, k, v, g1, g2, mix, backend="gpu", interpret=True)


def test_auto_choice_per_backend(monkeypatch):
    from dsla_jax.ops import utils

    monkeypatch.setattr(utils, "backend", lambda: "gpu")
    assert utils.auto_impls(has_pallas=True) == ("pallas", "pallas")
    assert utils.auto_impls() == ("xla", "xla")
    monkeypatch.setattr(utils, "backend", lambda: "cpu")
    assert utils.auto_impls(has_pallas=True) == ("naive", "xla")
