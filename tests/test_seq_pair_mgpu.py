"""The backward's paired sequential passes (`pallas_gpu_seq_pair_mgpu`, `GpuConfig.bwd_pair`): both value tiles of
a head in one program, the state pass and the adjoint pass.

On CPU: each kernel in Mosaic GPU's interpreter against a float64 chunk loop and against its unpaired twin
(`chunk_states_mgpu`, `chunk_adjoints_mgpu`), their checks of bad inputs, and the op's lowering for CUDA. On a GPU:
the whole op, forward and every gradient, against the float32 oracle. (As with the paired recurrent kernel, the
whole op in the interpreter is not run here: its two warpgroup threads stall inside the op's jit on a 2-core host.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.common import rel_err
from dsla_jax.ops.dsla import pallas_gpu_rec_mgpu as km
from dsla_jax.ops.dsla import pallas_gpu_rec_pair_mgpu as kp
from dsla_jax.ops.dsla import pallas_gpu_seq_pair_mgpu as ks
from dsla_jax.ops.dsla.pallas_gpu import GpuConfig

f32 = jnp.float32
ON_GPU = jax.default_backend() == "gpu"


def _inputs(B=1, T=256, H=2, K=128, V=128, P=2, seed=0):
    """x [4, B H, T, K] bfloat16 halves of a float32 x [2, B H, T, K], exp(bL) [2, B H, N, K] in [0.3, 1], y [B, T, H,
    V] bfloat16, entering states [B H, P, 2, K, V] float32."""
    ks_ = jax.random.split(jax.random.key(seed), 4)
    BH, N = B * H, T // 64
    x = km.split_kd(jax.random.normal(ks_[0], (2, BH, T, K), f32))
    ebl = jax.random.uniform(ks_[1], (2, BH, N, K), f32, 0.3, 1.0)
    y = jax.random.normal(ks_[2], (B, T, H, V), f32).astype(jnp.bfloat16)
    s_in = jax.random.normal(ks_[3], (BH, P, 2, K, V), f32)
    return x, ebl, y, s_in


def _loop(x, ebl, y, s_in, P, reverse):
    """float64 chunk loop of M_s <- diag(ebl_s) M_s + x_s^T y, storing M_s before each chunk's update; forward from
    s_in (returns the stored states), or backward from zero (returns the stored adjoints and each segment's last)."""
    x = np.asarray(x.astype(f32), np.float64)
    x = x[0::2] + x[1::2]  # [2, BH, T, K]
    ebl, y = (np.asarray(jnp.asarray(a, f32), np.float64) for a in (ebl, y))
    _, BH, T, K = x.shape
    B, _, H, V = y.shape
    N = T // 64
    NC = N // P
    out, send = np.zeros((2, BH, N, K, V)), np.zeros((BH, P, 2, K, V))
    for bh in range(BH):
        b, h = divmod(bh, H)
        for p in range(P):
            M = [np.zeros((K, V)) for _ in range(2)] if reverse else [s_in[bh, p, s].copy() for s in range(2)]
            for n in range(NC):
                c = p * NC + (NC - 1 - n if reverse else n)
                ts = slice(c * 64, c * 64 + 64)
                for s in range(2):
                    out[s, bh, c] = M[s]
                    M[s] = ebl[s, bh, c][:, None] * M[s] + x[s, bh, ts].T @ y[b, ts, h]
            for s in range(2):
                send[bh, p, s] = M[s]
    return out, send


@pytest.mark.parametrize("K", [64, 128])
def test_state_pass_pair_interpret(K):
    """The paired state pass in the interpreter, two segments of two chunks: the states entering every chunk against
    the float64 loop and against the unpaired kernel."""
    P = 2
    x, ebl, y, s_in = _inputs(K=K, P=P)
    want, _ = _loop(x, ebl, y, np.asarray(s_in, np.float64), P, reverse=False)
    got = ks.chunk_states_pair_mgpu(x, ebl, y, s_in, P=P, interpret=True)
    assert got.shape == want.shape and got.dtype == f32
    assert rel_err(want, got) < 1e-6, rel_err(want, got)
    twin = km.chunk_states_mgpu(x, ebl, y, s_in, P=P, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(twin), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K", [64, 128])
def test_adjoint_pass_pair_interpret(K):
    """The paired adjoint pass in the interpreter, two segments of two chunks: the adjoints of the states leaving every
    chunk and each segment's local adjoint against the float64 loop and against the unpaired kernel (fed the same
    halves)."""
    P = 2
    x, ebl, y, _ = _inputs(K=K, P=P, seed=1)
    want, want_send = _loop(x, ebl, y, None, P, reverse=True)
    dl, send = ks.chunk_adjoints_pair_mgpu(x, ebl, y, P=P, interpret=True)
    assert rel_err(want, dl) < 1e-6 and rel_err(want_send, send) < 1e-6, (rel_err(want, dl), rel_err(want_send, send))
    for a, b in zip((dl, send), km.chunk_adjoints_mgpu(x, ebl, y, P=P, interpret=True)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K", [64, 128])
def test_dv_pair_interpret(K):
    """The paired dv kernel in the interpreter (D_s^T formed from transposed views, dv^T stored through do's tile),
    two segments of two chunks: against the float64 sum_s kd_s (Dloc_s + diag(e_s) dS_end_s) + A^T do within dv's
    own bfloat16 rounding, and against the unpaired kernel."""
    from dsla_jax.ops.dsla import pallas_gpu_bwd_mgpu as kbm
    from dsla_jax.ops.dsla import pallas_gpu_dv_pair_mgpu as kv

    B, T, H, V, P = 1, 256, 2, 128, 2
    BH, N = B * H, T // 64
    kd, ebl, do, _ = _inputs(B, T, H, K, V, P, seed=2)
    ks_ = jax.random.split(jax.random.key(3), 3)
    dl = jax.random.normal(ks_[0], (2, BH, N, K, V), f32)
    ds_end = jax.random.normal(ks_[1], (BH, P, 2, K, V), f32)
    a = jnp.tril(jax.random.normal(ks_[2], (BH, T, 64), f32))
    got = kv.dv_pair_mgpu(kd, dl, ebl, ds_end, a, do, P=P, interpret=True)
    x = np.asarray(kd.astype(f32), np.float64)
    x = x[0::2] + x[1::2]
    dl64, e64, de64, a64, do64 = (np.asarray(jnp.asarray(z, f32), np.float64) for z in (dl, ebl, ds_end, a, do))
    want = np.zeros((B, T, H, V))
    for bh in range(BH):
        b, h = divmod(bh, H)
        for c in range(N):
            ts = slice(c * 64, c * 64 + 64)
            want[b, ts, h] = a64[bh, ts].T @ do64[b, ts, h]
            for s in range(2):
                d = dl64[s, bh, c] + e64[s, bh, c][:, None] * de64[bh, c // (N // P), s]
                want[b, ts, h] += x[s, bh, ts] @ d
    rounding = rel_err(want, jnp.asarray(want, f32).astype(jnp.bfloat16))  # dv's own bfloat16 rounding
    assert got.dtype == jnp.bfloat16 and got.shape == do.shape
    assert rel_err(want, got) <= 1.05 * rounding, (rel_err(want, got), rounding)
    twin = kbm.dv_mgpu(kd, dl, ebl, ds_end, a, do, P=P, interpret=True)
    assert rel_err(want, twin) <= 1.05 * rounding
    with pytest.raises(ValueError, match="halves"):
        kv.dv_pair_mgpu(kd[:2], dl, ebl, ds_end, a, do, P=P, interpret=True)


def test_pair_passes_checks():
    """Clear errors for what the kernels cannot take."""
    x, ebl, y, s_in = _inputs(T=128, P=1)
    with pytest.raises(ValueError, match="bfloat16 v / do"):
        ks.chunk_states_pair_mgpu(x, ebl, y.astype(jnp.float16), s_in, P=1, interpret=True)
    with pytest.raises(ValueError, match="multiple of segments"):
        ks.chunk_adjoints_pair_mgpu(x, ebl, y, P=3, interpret=True)
    with pytest.raises(ValueError, match="halves"):
        ks.chunk_adjoints_pair_mgpu(x[:2].astype(f32), ebl, y, P=1, interpret=True)
    with pytest.raises(ValueError, match="s_in"):
        ks.chunk_states_pair_mgpu(x, ebl, y, s_in[:, :, :1], P=1, interpret=True)
    assert kp.pair_problem(64, 128, 64, jnp.bfloat16, "v / do") is not None  # one value tile: unpaired
    assert kp.pair_problem(64, 256, 128, jnp.bfloat16, "v / do") is not None  # K 256: the staging does not fit
    assert kp.pair_problem(64, 128, 256, jnp.bfloat16, "v / do") is None


def test_pair_passes_lower_in_the_op():
    """The backward with `bwd_pair=True` (the default) lowers for CUDA with both paired passes (the adjoint pass on
    qd's halves, which `rec_pair` has the intra kernel write) and the paired dv kernel; with `bwd_pair=False`, or
    V = 64, the unpaired ones;
    with `rec_pair=False` (float32 qd) the paired state pass and the unpaired adjoint pass; with the Triton state pass
    (`bwd_states_mosaic=False`) the paired adjoint pass still."""
    from _lowering import lowered_op

    def kernels(cfg, V=128):
        text = lowered_op(cfg, 1, 512, 2, 128, V, grad=True)
        names = ("chunk_states", "chunk_adjoints", "dv", "chunk_states_pair", "chunk_adjoints_pair", "dv_pair")
        return {n for n in names if f"dsla_{n}_mgpu" in text}

    base = dict(rec="mosaic", split_dtype="kd-bf16x2", num_segments=2)
    unpaired = {"chunk_states", "chunk_adjoints", "dv"}
    assert kernels(GpuConfig(**base)) == {"chunk_states_pair", "chunk_adjoints_pair", "dv_pair"}
    assert kernels(GpuConfig(**base, bwd_pair=False)) == unpaired
    assert kernels(GpuConfig(**base), V=64) == unpaired
    assert kernels(GpuConfig(**base, rec_pair=False)) == {"chunk_states_pair", "chunk_adjoints", "dv_pair"}
    # the Triton state pass (and Triton dv: it reads no kd halves without the Mosaic state pass's residual)
    assert kernels(GpuConfig(**base, bwd_states_mosaic=False)) == {"chunk_adjoints_pair"}


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("gates", [("strong", "logsig"), ("min", "logsig")])
def test_gpu_compiled_bwd_pair(gates):
    """The whole op with the paired passes, compiled, against the float32 oracle (forward and every gradient),
    bfloat16, gates at -50 in one state; and every gradient against the unpaired passes' (the same residuals: the
    passes' float32 outputs differ only in summation order)."""
    from test_pallas import check_against_oracle, make_inputs, pallas_fn

    args = make_inputs(1000, 1, 1000, 4, 4, 128, 128, jnp.bfloat16, gates)  # `test_gpu_compiled_pair`'s
    cfg = GpuConfig(rec="mosaic", bwd_pair=True)
    check_against_oracle(pallas_fn("gpu", 64, cfg, interpret=False), args, jnp.bfloat16,
                         skip=("dg1",) if gates[0] == "min" else ())  # fmt: skip

    def grads(config):
        f = pallas_fn("gpu", 64, config, interpret=False)
        return jax.grad(lambda *a: jnp.sum(f(*a)[0].astype(f32) ** 2), argnums=(0, 1, 2, 3, 4, 5))(*args)

    for a, b in zip(grads(cfg), grads(GpuConfig(rec="mosaic", bwd_pair=False))):
        assert rel_err(b, a) < 1e-3
