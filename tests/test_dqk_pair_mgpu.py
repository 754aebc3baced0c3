"""The backward's paired dq / dk kernel (`pallas_gpu_dqk_pair_mgpu`, `GpuConfig.dqk_pair`): two warpgroups per
program, 32 key columns each.

On CPU: the kernel in Mosaic GPU's interpreter against its unpaired twin (`pallas_gpu_bwd_mgpu.dqk_mgpu` with the
intra-chunk terms inside; itself tested against the Triton kernels in `test_pallas`), on inputs with gates near -50
in part of the channels (so both the fast path and the exact path's tiles are read); its checks of bad inputs; and
the op's lowering for CUDA. On a GPU: the whole op with it, every gradient, against the float32 oracle and against
the unpaired kernel. (As with the other paired kernels, the whole op in the interpreter is not run here: the
warpgroup threads stall inside the op's jit on a 2-core host.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from bench.common import rel_err
from dsla_jax.ops.dsla import pallas_gpu_bwd as kb
from dsla_jax.ops.dsla import pallas_gpu_bwd_mgpu as kbm
from dsla_jax.ops.dsla import pallas_gpu_dqk_pair_mgpu as kq
from dsla_jax.ops.dsla.pallas_gpu import GpuConfig, chunk_gate_sums
from tests._lowering import lowered_op
from tests.test_pallas import make_inputs

f32 = jnp.float32
ON_GPU = jax.default_backend() == "gpu"


def _problem(K, B=1, T=256, H=2, V=128, P=2, seed=3):
    """The dq / dk kernels' inputs: bf16 q, k, v, do, gates (strong ones in 10% of the channels), random float32
    states and adjoints of plausible size, the exact path's intra terms on the flagged tiles."""
    q, k, v, g1, g2, _, _ = make_inputs(seed, B, T, H, H, K, V, jnp.bfloat16, ("logsig", "strong"))
    r = jax.random.split(jax.random.key(seed + 1), 6)
    BH, N = B * H, T // 64
    do = jax.random.normal(r[0], v.shape).astype(jnp.bfloat16)
    hs = jax.random.normal(r[1], (2, BH, N, K, V), f32)
    dl = jax.random.normal(r[2], (2, BH, N, K, V), f32)
    e = jax.random.uniform(r[3], (2, BH, N, K), f32, 0.0, 1.0)
    ds_end = jax.random.normal(r[4], (BH, P, 2, K, V), f32)
    bl = chunk_gate_sums(g1, g2, 64)
    cfg = GpuConfig(chunk=64, dqk_intra_block_k=64)
    flags = kb.intra_flags(bl, cfg)
    dqi, dki = kb.intra_terms_fixup_gpu(q, k, v, do, g1, g2, flags, cfg=cfg, interpret=True)
    w = jnp.array([0.3, 0.7], f32)
    args = (w, q, k, v, do, g1, g2, hs, dl, e, ds_end, dqi, dki, bl)
    return args, flags, dict(scale=K**-0.5, P=P, thresh=cfg.thresh)


@pytest.mark.parametrize("K", [64, 128])
def test_dqk_pair_interpret(K):
    """Every output against the unpaired kernel's, both in the interpreter: dq, dk, dg1, dg2 within bfloat16
    rounding of each other (the boundary term enters the gate gradient as bfloat16 halves here, in float32 there),
    the mix gradient's pieces to float32 rounding (their sum: the pieces are laid out per warpgroup here)."""
    args, flags, kw = _problem(K)
    assert 0 < float(jnp.sum(flags)) < flags.size  # both paths
    want = kbm.dqk_mgpu(*args, flags=flags, interpret=True, **kw)
    got = kq.dqk_pair_mgpu(*args, flags, interpret=True, **kw)
    for name, x, y in zip(("dq", "dk", "dg1", "dg2"), want[:4], got[:4]):
        assert x.shape == y.shape and x.dtype == y.dtype, name
        err = rel_err(x, y)
        assert err < 2e-3, (name, err)  # (one bfloat16 rounding apart at most, on a few elements)
    dw_want, dw_got = (jnp.sum(x[4], axis=(1, 2, 3)) for x in (want, got))
    assert got[4].shape[-1] == 2 * want[4].shape[-1]
    assert rel_err(dw_want, dw_got) < 1e-5


def test_dqk_pair_checks():
    """Bad inputs get a clear error: float32 gates, K not a multiple of 64, a wrong flags shape."""
    args, flags, kw = _problem(64, T=128, P=1)
    w, q, k, v, do, g1, g2, *rest = args
    with pytest.raises(ValueError, match="16-bit"):
        kq.dqk_pair_mgpu(w, q, k, v, do, g1.astype(f32), g2.astype(f32), *rest, flags, interpret=True, **kw)
    with pytest.raises(ValueError, match="flags"):
        kq.dqk_pair_mgpu(*args, flags[:1], interpret=True, **kw)
    assert kq.dqk_pair_problem(96, 128, jnp.bfloat16, False) is not None
    assert kq.dqk_pair_problem(128, 128, jnp.bfloat16, True) is not None  # grouped heads' float32 dk, dg
    assert kq.dqk_pair_problem(128, 128, jnp.bfloat16, False) is None


def test_dqk_pair_lowers_in_the_op():
    """The op's gradient launches the paired dq / dk kernel by default (CUDA lowering on any host), the unpaired one
    with `dqk_pair=False`; grouped heads (float32 dk, dg per query head) keep the unpaired one."""
    cfg = GpuConfig(rec="mosaic", split_dtype="kd-bf16x2")
    text = lowered_op(cfg, 1, 512, 2, 128, 128, grad=True)
    assert "dsla_dqk_pair_mgpu" in text and "dsla_dqk_mgpu" not in text
    text = lowered_op(dataclasses.replace(cfg, dqk_pair=False), 1, 512, 2, 128, 128, grad=True)
    assert "dsla_dqk_mgpu" in text and "dsla_dqk_pair_mgpu" not in text


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("gates", [("strong", "logsig"), ("min", "logsig")])
def test_gpu_compiled_dqk_pair(gates):
    """On the card: the whole op with the paired dq / dk kernel against the float32 oracle (forward and every
    gradient), bfloat16, gates at -50 in one state; and every gradient against the unpaired kernel's."""
    from test_pallas import check_against_oracle, make_inputs, pallas_fn

    args = make_inputs(1000, 1, 1000, 4, 4, 128, 128, jnp.bfloat16, gates)  # `test_gpu_compiled_bwd_pair`'s
    cfg = GpuConfig(rec="mosaic", dqk_pair=True)
    check_against_oracle(pallas_fn("gpu", 64, cfg, interpret=False), args, jnp.bfloat16,
                         skip=("dg1",) if gates[0] == "min" else ())  # fmt: skip

    def grads(config):
        f = pallas_fn("gpu", 64, config, interpret=False)
        return jax.grad(lambda *a: jnp.sum(f(*a)[0].astype(f32) ** 2), argnums=(0, 1, 2, 3, 4, 5))(*args)

    for a, b in zip(grads(cfg), grads(GpuConfig(rec="mosaic", dqk_pair=False))):
        assert rel_err(b, a) < 2e-3
