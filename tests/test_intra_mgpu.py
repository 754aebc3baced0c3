"""The split forward's intra-chunk kernel on Mosaic GPU (`pallas_gpu_intra_mgpu`, `GpuConfig.intra_mosaic`).

On CPU: the kernel in Mosaic GPU's interpreter against its Triton twin (`pallas_gpu.fwd_intra_gpu` with split_dtype
"kd-bf16x2", in the Triton interpreter) and against a plain float32 reference, its lowering for CUDA, and the whole
forward and backward with it through `dsla_attention_pallas`. Tests marked `gpu` run the compiled kernel.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _assert_close import assert_close
from _dsla_inputs import make_gates, random_dsla_inputs
from _lowering import lowered_op

from dsla_jax.ops.dsla import pallas_gpu as kg
from dsla_jax.ops.dsla import pallas_gpu_intra_mgpu as ki
from dsla_jax.ops.dsla.naive import naive_dsla
from dsla_jax.ops.dsla.pallas import dsla_attention_pallas
from dsla_jax.ops.dsla.pallas_gpu import THRESH, GpuConfig, chunk_gate_sums

ON_GPU = jax.default_backend() == "gpu"
f32 = jnp.float32
HI = jax.lax.Precision.HIGHEST
CFG = GpuConfig(chunk=64, split_dtype="kd-bf16x2")  # the Triton twin's storage


def _blocks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, H, D] -> [B * H, N, chunk, D] float32."""
    B, T, H, D = x.shape
    x = x.astype(f32).reshape(B, T // chunk, chunk, H, D)
    return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(B * H, T // chunk, chunk, D)


def intra_reference(q, k, v, g1, g2, w, scale: float, chunk: int = 64) -> tuple[jax.Array, jax.Array]:
    """(A [B H, T, chunk], o_intra [B H, T, V]) in float32 by plain jnp: A = scale sum_s w_s A_s, A_s,ij =
    sum_K q_i k_j exp(b_i - b_j) for j <= i (every exponent <= 0), o_intra = A v."""
    qb, kb, vb = (_blocks(x, chunk) for x in (q, k, v))
    BH, N = qb.shape[:2]
    causal = jnp.tril(jnp.ones((chunk, chunk), f32))
    a = 0.0
    for s, g in enumerate((g1, g2)):
        b = jnp.cumsum(_blocks(g, chunk), axis=2)
        e = jnp.exp(jnp.minimum(b[:, :, :, None, :] - b[:, :, None, :, :], 0.0))  # [BH, N, i, j, K]
        a = a + w[s] * jnp.einsum("znik,znjk,znijk->znij", qb, kb, e, precision=HI) * causal
    a = scale * a
    o = jnp.einsum("znij,znjv->zniv", a, vb, precision=HI)
    return a.reshape(BH, N * chunk, chunk), o.reshape(BH, N * chunk, -1)


def make_case(seed: int, T: int, H: int, K: int, V: int, kind: str):
    """bfloat16 q, k, v, g1, g2 [1, T, H, *] and a mix. kind "logsig": GLA-style gates (no chunk past the decay
    bound); "wide": g1 uniform in [-0.9, 0] (decay ranges ~30-38, near the bound, unflagged) and g2 logsig, with
    gates uniform in [-50, 0] in one (head, chunk) block of each state (flagged chunks, fixed up by Triton);
    "strong": g1 uniform in [-50, 0] in every other chunk (flagged) and logsig elsewhere, g2 logsig."""
    q, k, v, g1, g2, mix, _ = random_dsla_inputs(seed, 1, T, H, H, K, V, jnp.bfloat16, ("logsig", "logsig"), False)
    k1, k2, k3 = jax.random.split(jax.random.key(seed + 100), 3)
    if kind == "wide":
        g1 = jax.random.uniform(k1, g1.shape, minval=-0.9, maxval=0.0)
        strong = [make_gates(kk, g1.shape, "strong").astype(jnp.bfloat16) for kk in (k2, k3)]
        g1 = g1.astype(jnp.bfloat16).at[:, 64:128, 0].set(strong[0][:, 64:128, 0])
        g2 = g2.at[:, 128:192, H - 1].set(strong[1][:, 128:192, H - 1])
    elif kind == "strong":
        odd = (jnp.arange(T) // 64 % 2 == 1)[None, :, None, None]
        g1 = jnp.where(odd, make_gates(k2, g1.shape, "strong").astype(jnp.bfloat16), g1)
    return q, k, v, g1, g2, mix


def unflagged(g1: jax.Array, g2: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the chunks [B H, N] and tokens [B H, T] whose decay range is within the bound (where the Mosaic
    kernel's fast path stands; the others are the Triton fix-up's)."""
    chunks = np.asarray(ki.chunk_flags(chunk_gate_sums(g1, g2, 64))) == 0
    return chunks, np.repeat(chunks, 64, axis=1)


def _kd_sum(kd: jax.Array) -> jax.Array:
    """[4, ...] hi / lo planes -> [2, ...] float32 sums."""
    kd = kd.astype(f32)
    return kd[0::2] + kd[1::2]


def check_outputs(got, want, *, tol_scores: float) -> None:
    """`fwd_intra_gpu`-ordered outputs (qd, kd, ebl, o_intra, A) against another such tuple."""
    assert len(got) == len(want) == 5
    for x, y in zip(got, want):
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, x.dtype, y.shape, y.dtype)
    qd, kd, ebl, oi, a = got
    qd_w, kd_w, ebl_w, oi_w, a_w = want
    assert_close("qd", qd_w, qd, 1e-6)  # both round the same float32 value to tf32
    assert_close("kd (hi + lo)", _kd_sum(kd_w), _kd_sum(kd), 1e-5)
    assert_close("kd hi planes", kd_w[0::2], kd[0::2], 1e-4)  # the plane order: hi first
    assert_close("ebl", ebl_w, ebl, 1e-6)
    assert_close("o_intra", oi_w, oi, tol_scores)
    assert_close("A", a_w, a, tol_scores)


CASES = [
    # T, H, K, V, gates
    (128, 2, 128, 64, "logsig"),
    (192, 2, 64, 128, "wide"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-H{c[1]}-K{c[2]}-V{c[3]}-{c[4]}" for c in CASES])
def test_intra_mgpu_matches_triton_interpret(case):
    """Every output of the Mosaic GPU kernel (interpreter) against the Triton intra kernel's (interpreter) and
    A, o_intra against plain float32: the fast path alone on the chunks within the decay bound, and with the
    Triton fix-up (`fwd_intra_mgpu_fixed`) on every chunk, where the wide case flags some."""
    T, H, K, V, kind = case
    q, k, v, g1, g2, mix = make_case(T + K, T, H, K, V, kind)
    scale = K**-0.5
    want = kg.fwd_intra_gpu(q, k, v, g1, g2, mix, scale=scale, cfg=CFG, interpret=True)
    a_ref, o_ref = intra_reference(q, k, v, g1, g2, mix, scale)

    bl = chunk_gate_sums(g1, g2, 64)
    flags = np.asarray(ki.chunk_flags(bl))
    decay_range = np.asarray(jnp.max(-bl, axis=(0, 3)))  # [B H, N]
    np.testing.assert_array_equal(flags, (decay_range > THRESH).astype(np.float32))
    if kind == "wide":  # chunks on both sides of the bound, and unflagged ones near it (factors up to exp(+-19))
        assert flags.min() == 0.0 and flags.max() == 1.0, flags
        assert decay_range[flags == 0].max() > 30.0, decay_range
    else:
        assert flags.max() == 0.0, flags

    fast = ki.fwd_intra_mgpu(q, k, v, g1, g2, mix, bl, scale=scale, interpret=True)
    keep = np.repeat(flags == 0, 64, axis=1)  # [B H, T]: tokens of unflagged chunks
    fast_k = [x[..., keep, :] for x in (fast[0], fast[1])] + [fast[2][..., flags == 0, :]]
    want_k = [x[..., keep, :] for x in (want[0], want[1])] + [want[2][..., flags == 0, :]]
    check_outputs((*fast_k, fast[3][keep], fast[4][keep]), (*want_k, want[3][keep], want[4][keep]), tol_scores=2e-5)
    assert_close("A (fast) vs float32", a_ref[keep], fast[4][keep], 2e-5)
    assert_close("o_intra (fast) vs float32", o_ref[keep], fast[3][keep], 2e-5)

    fixed = ki.fwd_intra_mgpu_fixed(q, k, v, g1, g2, mix, scale=scale, cfg=CFG, interpret=True)
    check_outputs(fixed, want, tol_scores=2e-5)
    assert_close("A vs float32", a_ref, fixed[4], 2e-5)
    assert_close("o_intra vs float32", o_ref, fixed[3], 2e-5)
    # Without the scores (the forward outside differentiation): the same four outputs.
    no_a = ki.fwd_intra_mgpu_fixed(q, k, v, g1, g2, mix, scale=scale, cfg=CFG, interpret=True, scores=False)
    assert len(no_a) == 4
    for x, y in zip(no_a, fixed[:4]):
        np.testing.assert_array_equal(np.asarray(x.astype(f32)), np.asarray(y.astype(f32)))


def test_intra_mgpu_refuses_what_it_cannot_take():
    """Clear errors for inputs outside the kernel's tiles and dtypes, and for another split_dtype."""
    q, k, v, g1, g2, mix = make_case(1, 128, 1, 64, 64, "logsig")
    bl = chunk_gate_sums(g1, g2, 64)
    with pytest.raises(ValueError, match="bfloat16"):
        ki.fwd_intra_mgpu(q.astype(f32), k, v, g1, g2, mix, bl, scale=0.125, interpret=True)
    with pytest.raises(ValueError, match="chunk 64"):
        ki.fwd_intra_mgpu(q, k, v, g1, g2, mix, chunk_gate_sums(g1, g2, 32), scale=0.125, chunk=32, interpret=True)
    with pytest.raises(ValueError, match="chunk 64"):
        ki.fwd_intra_mgpu(q, k, v[..., :32], g1, g2, mix, bl, scale=0.125, interpret=True)
    with pytest.raises(ValueError, match="kd-bf16x2"):
        ki.fwd_intra_mgpu_fixed(q, k, v, g1, g2, mix, scale=0.125, cfg=GpuConfig(), interpret=True)


def test_intra_mgpu_lowers_for_cuda(monkeypatch):
    """The kernel lowers for CUDA on any host at the benchmark's per-program tiles (K = V = 128) within the shared
    memory of two programs per SM, and the forward takes it (beside the Triton fix-up launch) only when asked."""
    from jax.experimental.mosaic.gpu import core as mgpu_core

    sizes = []
    if hasattr(mgpu_core, "_smem_tree_size"):  # Mosaic GPU's own count of a kernel's shared memory (private)
        count = mgpu_core._smem_tree_size
        monkeypatch.setattr(mgpu_core, "_smem_tree_size", lambda *a, **kw: sizes.append(count(*a, **kw)) or sizes[-1])
    B, T, H, K, V = 1, 256, 2, 128, 128
    sd = jax.ShapeDtypeStruct
    x, y = sd((B, T, H, K), jnp.bfloat16), sd((B, T, H, V), jnp.bfloat16)
    args = (x, x, y, x, x, sd((2,), f32), sd((2, B * H, T // 64, K), f32))
    text = jax.jit(lambda *a: ki.fwd_intra_mgpu(*a, scale=K**-0.5)).trace(*args).lower(lowering_platforms=("cuda",))
    assert "dsla_fwd_intra_mgpu" in text.as_text()
    if sizes:
        # 108,648 bytes with JAX 0.10.2; two programs per SM need <= (228 - 2 x 1 reserved) / 2 KB each.
        assert sizes[-1] <= 113 * 1024, sizes

    cfg = GpuConfig(rec="mosaic", split_dtype="kd-bf16x2", num_segments=2, intra_mosaic=True, rec_pair_min_chunks=1)

    def lowered(config, grad=False):
        return lowered_op(config, B, T, H, K, V, grad)

    text = lowered(cfg)
    assert "dsla_fwd_intra_mgpu" in text and "dsla_fwd_exact" in text and "dsla_fwd_rec_pair_mgpu" in text
    assert "dsla_fwd_intra_mgpu" in lowered(cfg, grad=True)  # with the scores the backward reads
    assert "dsla_fwd_intra_mgpu" not in lowered(dataclasses.replace(cfg, intra_mosaic=False))


def _oracle_check(config, args, tol: float = 2e-3, with_grads: bool = True) -> None:
    """o, both final states and every gradient of `dsla_attention_pallas` with `config` against the float32 token
    loop (`naive_dsla`) on the same bfloat16 inputs (RMS relative error <= tol, the bfloat16 bar of the kernels)."""
    q, k, v, g1, g2, mix, s0 = args
    interpret = not ON_GPU

    def ours(q, k, v, g1, g2, mix, s0):
        o, (s1, s2) = dsla_attention_pallas(
            q, k, v, g1, g2, mix, initial_state=s0, backend="gpu", interpret=interpret, config=config
        )
        return o, s1, s2

    def oracle(q, k, v, g1, g2, mix, s0):
        o, (s1, s2) = naive_dsla(*(x.astype(f32) for x in (q, k, v, g1, g2)), mix, initial_state=s0)
        return o, s1, s2

    ref, out = oracle(*args), jax.jit(ours)(*args)
    for name, r, o in zip(("o", "S1", "S2"), ref, out):
        assert_close(name, r, o, tol)
    if not with_grads:
        return
    cts = [jax.random.normal(jax.random.key(i), r.shape).astype(o.dtype).astype(f32) for i, (r, o) in
           enumerate(zip(ref, out))]  # fmt: skip

    def grads(fn, a):
        loss = lambda *x: sum(jnp.sum(y.astype(f32) * c) for y, c in zip(fn(*x), cts))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=tuple(range(7))))(*a)

    g_ref = grads(oracle, (*(x.astype(f32) for x in args[:5]), *args[5:]))
    g_out = grads(ours, args)
    for name, r, o in zip(("dq", "dk", "dv", "dg1", "dg2", "dmix", "ds0"), g_ref, g_out):
        for i, (rl, ol) in enumerate(zip(jax.tree.leaves(r), jax.tree.leaves(o))):
            assert_close(f"{name}[{i}]", rl, ol, tol)


def test_forward_with_mosaic_intra_interpret(monkeypatch):
    """`dsla_attention_pallas` with `GpuConfig(intra_mosaic=True)` (and the Mosaic recurrent kernels) in the
    interpreters: outputs, final states and every gradient (the backward reads the kernel's A, kd and qd) against
    the float32 token loop, and the outputs against the same forward with the Triton intra kernel; T not a multiple
    of the chunk, two segments, `make_case`'s wide gates (chunks near the decay bound, and one flagged chunk per
    state, through the Triton fix-up)."""
    calls = []
    fixed = ki.fwd_intra_mgpu_fixed
    monkeypatch.setattr(ki, "fwd_intra_mgpu_fixed", lambda *a, **kw: calls.append(kw["scores"]) or fixed(*a, **kw))
    T, H, K, V = 250, 2, 64, 64
    s0 = tuple(jax.random.normal(jax.random.key(i), (1, H, K, V)) for i in (6, 7))
    args = (*make_case(5, T, H, K, V, "wide"), s0)
    cfg = GpuConfig(
        rec="mosaic", split_dtype="kd-bf16x2", intra_mosaic=True, num_segments=2, bwd_dot="ieee", bwd_state_dot=None
    )  # (float32 backward, as the Mosaic recurrent kernel's interpret test: its bfloat16 error is not this kernel's)
    _oracle_check(cfg, args)
    assert calls == [False, True], calls  # the forward, then the forward under differentiation (with A)

    def run(config):
        o, (s1, s2) = dsla_attention_pallas(*args[:6], initial_state=args[6], backend="gpu", interpret=True,
                                            config=config)  # fmt: skip
        return o.astype(f32), s1, s2

    triton = run(dataclasses.replace(cfg, intra_mosaic=False))
    for name, t, m in zip(("o", "S1", "S2"), triton, run(cfg)):
        assert_close(f"{name} vs the Triton intra kernel's", t, m, 2e-4 if name == "o" else 1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Compiled (GPU only)
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("gates", ["logsig", "strong", "wide"])
def test_intra_mgpu_compiled_matches_triton(gates):
    """The compiled kernel (with the Triton fix-up) against the compiled Triton intra kernel at B1 T1024 H4 D128
    bf16 (`make_case`'s gates: none, half or two of the chunks flagged): the decayed q / k and exp(bL) to rounding,
    A and o_intra within the Triton kernel's tf32 error, and, on the unflagged chunks (the fix-up's A v is tf32
    too), against plain float32, where the Mosaic kernel's bf16 halves are ~2^-16 exact."""
    T, H, K, V = 1024, 4, 128, 128
    q, k, v, g1, g2, mix = make_case(T, T, H, K, V, gates)
    scale = K**-0.5
    want = kg.fwd_intra_gpu(q, k, v, g1, g2, mix, scale=scale, cfg=CFG)
    got = jax.jit(lambda *a: ki.fwd_intra_mgpu_fixed(*a, scale=scale, cfg=CFG))(q, k, v, g1, g2, mix)
    for x, y in zip(got, want):
        assert x.shape == y.shape and x.dtype == y.dtype
    assert_close("qd", want[0], got[0], 1e-4)  # the exponentials of the two compilers differ in the last bits
    assert_close("kd (hi + lo)", _kd_sum(want[1]), _kd_sum(got[1]), 1e-4)
    assert_close("ebl", want[2], got[2], 1e-5)
    assert_close("o_intra vs Triton", want[3], got[3], 3e-3)
    assert_close("A vs Triton", want[4], got[4], 3e-3)
    chunks, keep = unflagged(g1, g2)
    assert chunks.any()
    a_ref, o_ref = intra_reference(q, k, v, g1, g2, mix, scale)
    assert_close("A vs float32", a_ref[keep], got[4][keep], 1e-4)
    assert_close("o_intra vs float32", o_ref[keep], got[3][keep], 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_forward_with_mosaic_intra_compiled():
    """The default forward on the card with the Mosaic intra kernel switched on, every gradient, gates uniform in
    [-50, 0] in one state (every chunk of it through the fix-up) and logsig in the other."""
    args = random_dsla_inputs(1000, 1, 1000, 4, 4, 128, 128, jnp.bfloat16, ("strong", "logsig"), True)
    _oracle_check(GpuConfig(rec="mosaic", split_dtype="kd-bf16x2", intra_mosaic=True), args)
    args = random_dsla_inputs(1001, 1, 1000, 4, 4, 128, 128, jnp.bfloat16, ("logsig", "logsig"), True)
    _oracle_check(GpuConfig(rec="mosaic", split_dtype="kd-bf16x2", intra_mosaic=True), args)
