"""The fused forward on Mosaic GPU (`pallas_gpu_fused_mgpu`, `GpuConfig.fwd_fused_mosaic`).

On CPU: the kernel and its segment pass in Mosaic GPU's interpreter against the float32 token loop, the whole
forward through `dsla_attention_pallas` (including the `lax.cond` that hands chunks past the decay bound to the split
forward), clear errors on inputs it cannot take, and its lowering for CUDA within an SM's shared memory. Tests marked
`gpu` run the compiled kernel.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from _assert_close import assert_close, rms_rel_error
from _dsla_inputs import random_dsla_inputs
from _lowering import lowered_op

from dsla_jax.ops.dsla import pallas_gpu_fused_mgpu as kf
from dsla_jax.ops.dsla.naive import naive_dsla
from dsla_jax.ops.dsla.pallas import dsla_attention_pallas
from dsla_jax.ops.dsla.pallas_gpu import GpuConfig, chunk_gate_sums

ON_GPU = jax.default_backend() == "gpu"
f32 = jnp.float32
CFG = GpuConfig(rec="mosaic", split_dtype="kd-bf16x2", fwd_fused_mosaic=True)


def _oracle(q, k, v, g1, g2, mix, s0, upto=None):
    """The float32 token loop on the first `upto` tokens: o and the states [B H, 2, K, V]."""
    xs = [x.astype(f32)[:, :upto] for x in (q, k, v, g1, g2)]
    o, (s1, s2) = naive_dsla(*xs, mix, initial_state=s0)
    B, H, K, V = s1.shape
    return o, jnp.stack([s1.reshape(B * H, K, V), s2.reshape(B * H, K, V)], axis=1)


def test_fused_kernel_interpret():
    """The kernel in Mosaic GPU's interpreter, two segments, each from its true entering states (the token loop's),
    against the token loop: o within the bfloat16 bar (its own rounding is most of it), the final states and the
    segment pass's summary (from zero) to ~2^-16 (their bfloat16 halves)."""
    T, H, K, V, P = 256, 2, 64, 64, 2
    q, k, v, g1, g2, mix, s0 = random_dsla_inputs(3, 1, T, H, H, K, V, jnp.bfloat16, ("logsig", "logsig"), True)
    o_ref, s_end = _oracle(q, k, v, g1, g2, mix, s0)
    s_in = jnp.stack([_oracle(q, k, v, g1, g2, mix, s0, upto=p * T // P)[1] for p in range(P)], axis=1)
    bl = chunk_gate_sums(g1, g2, 64)
    halves = kf.split_states(jnp.swapaxes(s_in, -1, -2))
    o, s_out = kf.fwd_fused_mgpu(q, k, v, g1, g2, mix, bl, halves, scale=K**-0.5, P=P, interpret=True)
    assert o.dtype == jnp.bfloat16 and s_out.shape == (H, P, 2, 2, V, K)
    assert_close("o", o_ref, o, 2e-3)
    assert_close("final states", s_end, jnp.swapaxes(kf.join_states(s_out[:, P - 1]), -1, -2), 1e-4)
    seg = kf.seg_states_fused_mgpu(k, v, g1, g2, bl, P=P, count=P - 1, interpret=True)
    zero = _oracle(q, k, v, g1, g2, mix, None, upto=T // P)[1]
    assert_close("segment summary", zero, jnp.swapaxes(kf.join_states(seg[:, 0]), -1, -2), 1e-4)


@pytest.mark.parametrize("gates", [("logsig", "logsig"), ("strong", "logsig")])
def test_fused_forward_interpret(gates, monkeypatch):
    """`dsla_attention_pallas` with `fwd_fused_mosaic` in the interpreters, T not a multiple of the chunk, two
    segments, initial states: o and both final states against the token loop. With gates uniform in [-50, 0] in one
    state (every chunk past the decay bound) the kernel alone is wrong, so the forward must have taken the split one
    through its `lax.cond`."""
    calls = []
    fused = kf.fwd_fused_mgpu
    monkeypatch.setattr(kf, "fwd_fused_mgpu", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    T, H, K, V = 250, 2, 64, 64
    q, k, v, g1, g2, mix, s0 = random_dsla_inputs(4, 1, T, H, H, K, V, jnp.bfloat16, gates, True)
    o_ref, (r1, r2) = naive_dsla(*(x.astype(f32) for x in (q, k, v, g1, g2)), mix, initial_state=s0)
    cfg = dataclasses.replace(CFG, num_segments=2)
    o, (s1, s2) = dsla_attention_pallas(
        q, k, v, g1, g2, mix, initial_state=s0, backend="gpu", interpret=True, config=cfg
    )
    assert calls, "the fused kernel was not traced"
    assert_close("o", o_ref, o, 2e-3)
    assert_close("S1", r1, s1, 1e-4)
    assert_close("S2", r2, s2, 1e-4)
    if gates[0] == "strong":  # the kernel alone past the bound: finite but far off (what the cond guards against)
        pad = [(0, 0), (0, 256 - T), (0, 0), (0, 0)]
        qp, kp, vp, g1p, g2p = (jnp.pad(x, pad) for x in (q, k, v, g1, g2))
        h0 = jnp.stack([s.reshape(H, K, V) for s in s0], axis=1)[:, None]
        alone, _ = fused(
            qp, kp, vp, g1p, g2p, mix, chunk_gate_sums(g1p, g2p, 64), kf.split_states(jnp.swapaxes(h0, -1, -2)),
            scale=K**-0.5, P=1, interpret=True,
        )  # fmt: skip
        assert rms_rel_error(o_ref, alone[:, :T]) > 1e-2


def test_fused_rejects_what_it_cannot_take():
    q, k, v, g1, g2, mix, _ = random_dsla_inputs(5, 1, 128, 1, 1, 64, 64, jnp.bfloat16, ("logsig", "logsig"), False)
    bl = chunk_gate_sums(g1, g2, 64)
    s_in = jnp.zeros((1, 1, 2, 2, 64, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        kf.fwd_fused_mgpu(q.astype(f32), k, v, g1, g2, mix, bl, s_in, scale=0.125, P=1, interpret=True)
    with pytest.raises(ValueError, match="multiple of segments"):
        kf.fwd_fused_mgpu(q, k, v, g1, g2, mix, bl, s_in, scale=0.125, P=4, interpret=True)
    wide = jnp.zeros((1, 128, 1, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="K in"):
        kf.seg_states_fused_mgpu(wide, v, wide, wide, bl, P=1, count=1, interpret=True)


def test_fused_lowers_for_cuda(monkeypatch):
    """The kernel lowers for CUDA at the benchmark's tiles (K = V = 128) within an SM's shared memory, and the forward
    takes it (with its segment pass) only when asked and only when not differentiated."""
    from jax.experimental.mosaic.gpu import core as mgpu_core

    sizes = []
    if hasattr(mgpu_core, "_smem_tree_size"):  # Mosaic GPU's own count of a kernel's shared memory (private)
        count = mgpu_core._smem_tree_size
        monkeypatch.setattr(mgpu_core, "_smem_tree_size", lambda *a, **kw: sizes.append(count(*a, **kw)) or sizes[-1])
    B, T, H, K, V = 1, 512, 2, 128, 128
    cfg = dataclasses.replace(CFG, num_segments=2, rec_pair_min_chunks=4)  # 4 chunks a segment: paired

    def lowered(config, grad=False):
        return lowered_op(config, B, T, H, K, V, grad)

    text = lowered(cfg)
    assert "dsla_fwd_fused_mgpu" in text and "dsla_seg_fused_mgpu" in text
    assert "dsla_fwd_rec_pair_mgpu" in text  # the split forward, the cond's other branch
    if sizes:
        assert max(sizes) <= 227 * 1024, sizes  # one program per SM
    assert "dsla_fwd_fused_mgpu" not in lowered(cfg, grad=True)
    assert "dsla_fwd_fused_mgpu" not in lowered(dataclasses.replace(cfg, fwd_fused_mosaic=False))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("gates", [("logsig", "logsig"), ("strong", "logsig")])
@pytest.mark.parametrize("P", [1, 4])
def test_fused_forward_compiled(gates, P):
    """The compiled forward with `fwd_fused_mosaic` at B1 T1000 H4 D128 bf16 (padding inside), initial states, against
    the token loop: the fused kernel for logsig gates, the split forward through the cond for gates in [-50, 0]."""
    q, k, v, g1, g2, mix, s0 = random_dsla_inputs(1000 + P, 1, 1000, 4, 4, 128, 128, jnp.bfloat16, gates, True)
    o_ref, (r1, r2) = jax.jit(naive_dsla)(*(x.astype(f32) for x in (q, k, v, g1, g2)), mix, initial_state=s0)
    cfg = dataclasses.replace(CFG, num_segments=P)
    o, (s1, s2) = jax.jit(lambda *a: dsla_attention_pallas(*a[:6], initial_state=a[6], config=cfg))(
        q, k, v, g1, g2, mix, s0
    )
    assert_close("o", o_ref, o, 2e-3)
    assert_close("S1", r1, s1, 1e-4)
    assert_close("S2", r2, s2, 1e-4)
