"""Public entries of the DSLA Pallas kernels: `dsla_attention_pallas` (prefill / training) and
`dsla_decode_step_pallas` (one token).

Layers, as FLA: kernels (`pallas_gpu`: Triton lowering, forward and the older backward; `pallas_gpu_bwd`: the split
backward; `pallas_tpu`: Mosaic TPU; `pallas_decode`) -> `_fwd` / `_bwd` drivers (padding to whole chunks, segment
chaining in XLA, the gate gradient) -> a `jax.custom_vjp` whose residuals are the inputs, one float32 state pair per
segment and (GPU split forms) the forward's mixed intra-chunk scores; the backward recomputes everything else -> the
public functions with shape checks, grouped-query expansion and defaults.

Backward, per state (w its mix weight, B the global inclusive cumsum of its gates):
    dq     = sum_s w_s dq_s,  dq_s = scale * H_s,t dO_t;
    dk, dv = sums over the states of the adjoint recurrence;
    dw_s   = sum_t q_t . dq_s,t;
    dg_s,t = sum_{i >= t} (w_s q_i * dq_s,i - k_i * dk_s,i) + sum_V (S_s,T * dS_s,T),
             evaluated chunk-locally with exact chunk-boundary terms (in the split backward's dq / dk kernel; for
             the other forms in `_finish_grads`).

None of the kernel modules is imported before a kernel is needed, and none needs a GPU to import.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import jax
import jax.numpy as jnp
from jax import lax

from dsla_jax.ops.utils import check_gla_shapes, check_mix, pad_time, resolve_scale

f32 = jnp.float32
BACKENDS = ("gpu", "tpu")


def _hopper_or_newer() -> bool:
    """Whether the default device is an NVIDIA card of compute capability >= 9.0 (TMA, which Mosaic GPU needs)."""
    try:
        return float(jax.devices()[0].compute_capability) >= 9.0
    except (AttributeError, TypeError, ValueError):
        return False


def _resolve_backend(backend: str | None, interpret) -> str:
    if backend is None:
        backend = jax.default_backend()
        if backend == "cuda" or backend == "rocm":
            backend = "gpu"
        if backend == "cpu":
            if not interpret:
                raise ValueError(
                    "the DSLA Pallas kernels need a GPU or TPU; on CPU pass interpret=True and backend='gpu' or 'tpu'"
                )
            backend = "gpu"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def gpu_dims_supported(K: int, V: int) -> bool:
    """Whether the GPU kernels take these head dims: Triton tiles are powers of two (16 .. 256)."""
    return all(16 <= d <= 256 and d & (d - 1) == 0 for d in (K, V))


def _check_chunk(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 for the Pallas kernels, got {chunk_size!r}")


def _expand_heads(x: jax.Array, G: int, axis: int) -> jax.Array:
    """Repeat kv heads for their G query heads (query head h reads kv head h // G)."""
    return x if G == 1 else jnp.repeat(x, G, axis=axis)


# ----------------------------------------------------------------------------------------------------------------
# GPU drivers
# ----------------------------------------------------------------------------------------------------------------


def _chain(h0, s_loc, decay):
    """States entering each segment [B * H, P, 2, K, V] from the initial ones and the first P - 1 summaries:
    s_in[p + 1] = decay[p] * s_in[p] + s_loc[p] (decay [B * H, P - 1, 2, K], per key channel)."""
    s_in = [h0]
    for p in range(s_loc.shape[1]):
        s_in.append(decay[:, p][..., None] * s_in[-1] + s_loc[:, p])
    return jnp.stack(s_in, axis=1)


def _gpu_fwd_split_mosaic(q, k, v, g1, g2, w, h0, *, scale, cfg, P, interpret, keep):
    """The split forward with its segment pass and recurrent kernel on Mosaic GPU (`GpuConfig(rec="mosaic")`):
    the Triton intra kernel (or, with `cfg.intra_mosaic`, `pallas_gpu_intra_mgpu`'s where it applies), then
    `pallas_gpu_rec_mgpu`'s kernels on kd's bfloat16 halves (written by the intra kernel with split_dtype
    "kd-bf16x2", else split here by XLA), the states transposed ([V, K]) in them."""
    from dsla_jax.ops.dsla import pallas_gpu as kg
    from dsla_jax.ops.dsla import pallas_gpu_rec_mgpu as km

    if keep and cfg.save_states:
        raise ValueError("GpuConfig(rec='mosaic') does not store chunk states (save_states=True)")
    from dsla_jax.ops.dsla import pallas_gpu_rec_pair_mgpu as kp

    BH, K, V = h0.shape[0], h0.shape[-2], h0.shape[-1]
    # Both value tiles in one program (not in the interpreter: see `GpuConfig.rec_pair`).
    pair = cfg.rec_pair and not interpret and kp.pair_problem(cfg.chunk, K, V, v.dtype) is None
    pair = pair and (keep or q.shape[1] // (cfg.chunk * P) >= cfg.rec_pair_min_chunks)  # few chunks: unpaired
    icfg = replace(cfg, split_dtype="qkd-bf16x2") if pair else cfg  # the intra kernels write qd's halves too
    intra = kg.fwd_intra_gpu
    if icfg.intra_mosaic and icfg.split_dtype in kg.KD_HALVES:  # the Mosaic intra kernel where it fits
        from dsla_jax.ops.dsla import pallas_gpu_intra_mgpu as ki

        if ki.intra_problem(q, k, v, g1, g2, cfg.chunk) is None:
            intra = ki.fwd_intra_mgpu_fixed
    qd, kd, ebl, oi, *a = intra(q, k, v, g1, g2, w, scale=scale, cfg=icfg, interpret=interpret, scores=keep)
    kd = kd if kd.shape[0] == 4 else km.split_kd(kd)
    tiles = dict(chunk=cfg.chunk, block_v=min(cfg.block_v, V), interpret=interpret)
    if P > 1:
        s_loc = jnp.swapaxes(km.seg_states_mgpu(kd, ebl, v, P=P, count=P - 1, **tiles), -1, -2)
        dec = jnp.prod(ebl.reshape(2, BH, P, -1, K)[:, :, : P - 1], axis=3)  # [2, BH, P - 1, K]
        s_in = _chain(h0, s_loc, jnp.moveaxis(dec, 0, 2))
    else:
        s_in = h0.reshape(BH, 1, *h0.shape[1:])
    if pair:
        from dsla_jax.ops.dsla.pallas_gpu_fused_mgpu import join_states, split_states

        s_h = split_states(jnp.swapaxes(s_in, -1, -2))
        o, s_h = kp.fwd_rec_pair_mgpu(qd, kd, ebl, v, oi, s_h, P=P, chunk=cfg.chunk, interpret=interpret)
        s_T = join_states(s_h)
    else:
        o, s_T = km.fwd_rec_mgpu(qd, kd, ebl, v, oi, jnp.swapaxes(s_in, -1, -2), P=P, **tiles)
    mosaic_res = (kd if cfg.bwd_states_mosaic else None, ebl, qd if cfg.bwd_adjoints_mosaic else None)
    saved = (a[0], None, mosaic_res) if keep else None
    return o.astype(q.dtype), jnp.swapaxes(s_T[:, P - 1], -1, -2), s_in, saved


def _gpu_fwd_fused_mosaic(q, k, v, g1, g2, w, h0, *, scale, cfg, P, interpret):
    """The forward that is not differentiated on Mosaic GPU (`GpuConfig.fwd_fused_mosaic`): the fused kernel's
    segment pass, the segments chained in XLA, then the fused kernel (`pallas_gpu_fused_mgpu`), which writes only o.
    Its intra-chunk factors are exact only within the decay bound, so where any chunk's decay range exceeds
    `cfg.thresh` the split forward (with its exact fix-up) runs instead, chosen on the device by `lax.cond`.
    Returns (o, s_T, None, None): no residuals."""
    from dsla_jax.ops.dsla import pallas_gpu_fused_mgpu as kf
    from dsla_jax.ops.dsla.pallas_gpu import chunk_gate_sums
    from dsla_jax.ops.dsla.pallas_gpu_intra_mgpu import chunk_flags

    BH, K = h0.shape[0], h0.shape[-2]
    bl = chunk_gate_sums(g1, g2, cfg.chunk)

    def fused(_):
        if P > 1:
            s_loc = kf.join_states(kf.seg_states_fused_mgpu(k, v, g1, g2, bl, P=P, count=P - 1, interpret=interpret))
            dec = jnp.exp(jnp.sum(bl.reshape(2, BH, P, -1, K)[:, :, : P - 1], axis=3))  # [2, BH, P - 1, K]
            s_in = _chain(h0, jnp.swapaxes(s_loc, -1, -2), jnp.moveaxis(dec, 0, 2))
        else:
            s_in = h0.reshape(BH, 1, *h0.shape[1:])
        halves = kf.split_states(jnp.swapaxes(s_in, -1, -2))
        o, s_out = kf.fwd_fused_mgpu(q, k, v, g1, g2, w, bl, halves, scale=scale, P=P, interpret=interpret)
        return o.astype(q.dtype), jnp.swapaxes(kf.join_states(s_out[:, P - 1]), -1, -2)

    def split(_):
        o, s_T, _, _ = _gpu_fwd_split_mosaic(
            q, k, v, g1, g2, w, h0, scale=scale, cfg=cfg, P=P, interpret=interpret, keep=False
        )
        return o, s_T

    o, s_T = lax.cond(jnp.any(chunk_flags(bl, cfg.thresh) > 0), split, fused, None)
    return o, s_T, None, None


def _gpu_fwd(q, k, v, g1, g2, w, h0, *, scale, cfg, P, interpret, for_grad=False):
    """Forward on the padded, head-expanded problem. h0: [B * H, 2, K, V]. Returns (o, s_T, s_in, saved): saved is
    None, or (A, hs) for the split backward when for_grad: A the mixed intra-chunk scores its dv kernel reads, hs
    the states entering every chunk (None unless `cfg.save_states`); None where the forward is fused or its chunk
    is not the backward's: the backward then computes them.

    cfg.fwd == "split": `fwd_intra_gpu` (every chunk in parallel) -> segment summaries from its kd, exp(bL) ->
    `fwd_rec_gpu` (loads and matmuls per chunk). "fused": `seg_states_gpu` -> `fwd_gpu` (all per-chunk work in the
    sequential loop).
    """
    from dsla_jax.ops.dsla import pallas_gpu as kg

    BH = h0.shape[0]
    keep = for_grad and cfg.bwd == "split" and cfg.bwd_chunk == cfg.chunk  # the backward reads the scores
    if cfg.rec not in ("triton", "mosaic"):
        raise ValueError(f"GpuConfig.rec must be 'triton' or 'mosaic', got {cfg.rec!r}")
    if cfg.rec == "mosaic" and (cfg.fwd != "split" or cfg.split_dtype not in ("float32", "kd-bf16x2")):
        raise ValueError(
            "GpuConfig(rec='mosaic') needs the split forward (fwd='split') with split_dtype 'float32' or 'kd-bf16x2'"
        )
    if cfg.fwd == "split" and cfg.rec == "mosaic" and not for_grad and cfg.fwd_fused_mosaic:
        from dsla_jax.ops.dsla.pallas_gpu_fused_mgpu import fused_problem

        if fused_problem(q, k, v, g1, g2, cfg.chunk) is None:
            return _gpu_fwd_fused_mosaic(q, k, v, g1, g2, w, h0, scale=scale, cfg=cfg, P=P, interpret=interpret)
    if cfg.fwd == "split" and cfg.rec == "mosaic":
        return _gpu_fwd_split_mosaic(q, k, v, g1, g2, w, h0, scale=scale, cfg=cfg, P=P, interpret=interpret, keep=keep)
    if cfg.fwd == "split":
        qd, kd, ebl, oi, *a = kg.fwd_intra_gpu(
            q, k, v, g1, g2, w, scale=scale, cfg=cfg, interpret=interpret, scores=keep
        )
        if P > 1:
            s_loc, dec = kg.seg_states_split_gpu(kd, ebl, v, P=P, count=P - 1, cfg=cfg, interpret=interpret)
            s_in = _chain(h0, s_loc, dec[:, :, 0])
        else:
            s_in = h0.reshape(BH, 1, *h0.shape[1:])
        save = keep and cfg.save_states
        o, s_T, *hs = kg.fwd_rec_gpu(qd, kd, ebl, v, oi, s_in, cfg=cfg, P=P, interpret=interpret, save_states=save)
        return o.astype(q.dtype), s_T[:, P - 1], s_in, ((a[0], hs[0] if save else None) if keep else None)
    if cfg.fwd == "onepass":
        from dsla_jax.ops.dsla import pallas_gpu_onepass as ko

        if P > 1:
            s_loc, dec = ko.seg_states_onepass_gpu(k, v, g1, g2, P=P, count=P - 1, cfg=cfg, interpret=interpret)
            s_in = _chain(h0, s_loc, dec[:, :, 0])
        else:
            s_in = h0.reshape(BH, 1, *h0.shape[1:])
        oi, *a = kg.fwd_intra_gpu(
            q, k, v, g1, g2, w, scale=scale, cfg=cfg, interpret=interpret, decayed=False, scores=keep
        )
        o, s_T = ko.fwd_onepass_gpu(q, k, v, g1, g2, w, oi, s_in, scale=scale, cfg=cfg, P=P, interpret=interpret)
        return o, s_T[:, P - 1], s_in, ((a[0], None) if keep else None)
    if cfg.fwd != "fused":
        raise ValueError(f"GpuConfig.fwd must be 'split', 'onepass' or 'fused', got {cfg.fwd!r}")
    if P > 1:
        s_loc, dec = kg.seg_states_gpu(k, v, g1, g2, P=P, first=0, count=P - 1, cfg=cfg, interpret=interpret)
        s_in = _chain(h0, s_loc, jnp.exp(dec[:, :, 0]))
    else:
        s_in = h0.reshape(BH, 1, *h0.shape[1:])
    o, s_T = kg.fwd_gpu(q, k, v, g1, g2, w, s_in, scale=scale, cfg=cfg, P=P, interpret=interpret)
    return o, s_T[:, P - 1], s_in, None


def _segment_adjoints(q, do, g1, g2, w, ds_T, *, scale, cfg, P, interpret):
    """Adjoints of the states leaving each segment [B * H, P, 2, K, V]: reverse segment summaries chained in XLA."""
    from dsla_jax.ops.dsla import pallas_gpu as kg

    if P == 1:
        return ds_T[:, None]
    ws = w * scale
    lsum, dec = kg.seg_states_gpu(q, do, g1, g2, P=P, first=1, count=P - 1, cfg=cfg, reverse=True, interpret=interpret)
    dec = dec[:, :, 0]
    ds_end = [ds_T]
    for p in range(P - 2, -1, -1):  # segment p ends where segment p + 1 starts
        ds_end.append(jnp.exp(dec[:, p])[..., None] * ds_end[-1] + ws[None, :, None, None] * lsum[:, p])
    return jnp.stack(ds_end[::-1], axis=1)


def _gpu_bwd_split(res, do, ds_T, *, scale, cfg, P, interpret, kv_f32=False):
    """All gradients by the split backward (`pallas_gpu_bwd`): per-chunk states forward, segment-local adjoints
    backward (chained in XLA), then every chunk in parallel. Returns (dq, dk, dv, dg1, dg2, dw, dh0) of the padded
    problem."""
    from dsla_jax.ops.dsla import pallas_gpu as kg
    from dsla_jax.ops.dsla import pallas_gpu_bwd as kb

    q, k, v, g1, g2, w, s_in, _, saved = res
    a, hs, mosaic_res = (saved + (None,))[:3] if saved is not None else (None, None, None)
    if a is None:  # the scores at the backward's chunk size
        a = kg.fwd_intra_gpu(
            q, k, v, g1, g2, w, scale=scale, cfg=replace(cfg, chunk=cfg.bwd_chunk), interpret=interpret
        )[-1]
    kw = dict(scale=scale, cfg=cfg, P=P, interpret=interpret)
    kd, ebl, qd = mosaic_res if mosaic_res is not None else (None, None, None)
    bv = min(cfg.block_v, v.shape[-1])
    tiles = dict(P=P, chunk=cfg.chunk, block_v=bv, interpret=interpret)
    pair = False  # both value tiles of a head per program (`GpuConfig.bwd_pair`; not in the interpreter)
    if mosaic_res is not None and cfg.bwd_pair and not interpret:
        from dsla_jax.ops.dsla import pallas_gpu_rec_pair_mgpu as kp
        from dsla_jax.ops.dsla import pallas_gpu_seq_pair_mgpu as ks

        pair = kp.pair_problem(cfg.chunk, q.shape[-1], v.shape[-1], v.dtype) is None and do.dtype == v.dtype
    if hs is None and kd is not None:  # from the Mosaic forward's kd halves (`GpuConfig.bwd_states_mosaic`)
        from dsla_jax.ops.dsla import pallas_gpu_rec_mgpu as km

        if pair:
            hs = ks.chunk_states_pair_mgpu(kd, ebl, v, s_in, P=P, chunk=cfg.chunk)
        else:
            hs = km.chunk_states_mgpu(kd, ebl, v, s_in, **tiles)
    if hs is None:  # the states entering every chunk, unless the forward stored them
        hs, _ = kb.chunk_states_gpu(w, k, v, g1, g2, s_in, reverse=False, **kw)
    if qd is not None:  # from the Mosaic forward's decayed queries (`GpuConfig.bwd_adjoints_mosaic`)
        from dsla_jax.ops.dsla import pallas_gpu_rec_mgpu as km

        if pair and qd.shape[0] == 4:  # qd's halves (split_dtype "qkd-bf16x2", with `rec_pair`)
            dl, send = ks.chunk_adjoints_pair_mgpu(qd, ebl, do, P=P, chunk=cfg.chunk)
        else:
            dl, send = km.chunk_adjoints_mgpu(qd, ebl, do, **tiles)
        e, dend = km.adjoint_decays(ebl, P)
    else:
        dl, e, send, dend = kb.chunk_states_gpu(w, q, do, g1, g2, None, reverse=True, **kw)
        dend = dend[:, :, 0]
    ds_end, dh0 = kb.chain_adjoints(ds_T, send, dend)
    dv_mosaic = kd is not None and cfg.bwd_dv_mosaic
    sixteen = all(jnp.dtype(x.dtype).itemsize == 2 for x in (q, k, v, do, g1, g2)) and g1.dtype == g2.dtype
    if mosaic_res is not None and cfg.bwd_dqk_mosaic and cfg.grads_order == "split" and sixteen:
        from dsla_jax.ops.dsla import pallas_gpu_bwd_mgpu as kbm

        bl = kg.chunk_gate_sums(g1, g2, cfg.chunk)
        iflags = None
        if cfg.bwd_intra_mosaic and cfg.bwd_intra_fused:  # the fast path inside the dq / dk kernel
            icfg = replace(cfg, dqk_intra_block_k=64)  # the flags per its programs' 64-key tiles
            iflags = kb.intra_flags(bl, icfg)
            dqi, dki = kb.intra_terms_fixup_gpu(q, k, v, do, g1, g2, iflags, cfg=icfg, interpret=interpret)
        elif cfg.bwd_intra_mosaic:  # the fast path on Mosaic GPU, the exact one on flagged tiles in Triton
            dqi, dki = kbm.dqk_intra_mgpu(q, k, v, do, g1, g2, bl, thresh=cfg.thresh, chunk=cfg.chunk,
                                          interpret=interpret)  # fmt: skip
            flags = kb.intra_flags(bl, cfg)
            dqi, dki = kb.intra_terms_fixup_gpu(q, k, v, do, g1, g2, flags, dqi, dki, cfg=cfg, interpret=interpret)
        else:
            dqi, dki = kb.intra_terms_gpu(q, k, v, do, g1, g2, cfg=cfg, interpret=interpret)
        dq, dk, dg1, dg2, dw = kbm.dqk_mgpu(
            w, q, k, v, do, g1, g2, hs, dl, e[:, :, :, 0], ds_end, dqi, dki, bl, scale=scale, P=P, chunk=cfg.chunk,
            kv_f32=kv_f32, flags=iflags, thresh=cfg.thresh, interpret=interpret,
        )  # fmt: skip
        out = f32 if kv_f32 else q.dtype
        dv = None if dv_mosaic else kb.dv_gpu(k, do, g1, g2, dl, e, ds_end, a, cfg=cfg, P=P, out_dtype=out,
                                              interpret=interpret)  # fmt: skip
    else:
        dq, dk, dv, dg1, dg2, dw = kb.bwd_grads_gpu(
            w, q, k, v, do, g1, g2, hs, dl, e, ds_end, a, kv_f32=kv_f32, with_dv=not dv_mosaic, **kw
        )
    if dv_mosaic:  # from the Mosaic forward's kd halves (`GpuConfig.bwd_dv_mosaic`)
        from dsla_jax.ops.dsla import pallas_gpu_bwd_mgpu as kbm

        out = f32 if kv_f32 else q.dtype
        if pair and out == do.dtype:  # both value tiles per program (`GpuConfig.bwd_pair`)
            from dsla_jax.ops.dsla import pallas_gpu_dv_pair_mgpu as kv

            dv = kv.dv_pair_mgpu(kd, dl, e[:, :, :, 0], ds_end, a, do, P=P, chunk=cfg.chunk)
        else:
            dv = kbm.dv_mgpu(kd, dl, e[:, :, :, 0], ds_end, a, do, out_dtype=out, **tiles)
    return dq, dk, dv, dg1, dg2, jnp.sum(dw, axis=(1, 2, 3)), dh0


def _gpu_bwd(res, do, ds_T, *, scale, cfg, P, interpret):
    """Gradients of the padded problem by the older backward (`GpuConfig.bwd = "fused"`). ds_T: [B * H, 2, K, V].
    Returns per-state (dq_s, dk_s, dv_s), dh0 and the chunk-boundary gate terms."""
    from dsla_jax.ops.dsla import pallas_gpu as kg

    q, k, v, g1, g2, w, s_in, _, _ = res
    ds_end = _segment_adjoints(q, do, g1, g2, w, ds_T, scale=scale, cfg=cfg, P=P, interpret=interpret)
    g = jnp.stack([g1, g2])
    dq_s, s_chunks = kg.bwd_dq_gpu(q, k, v, do, g, s_in, scale=scale, cfg=cfg, P=P, interpret=interpret)
    dk_s, dv_s, ds_start, c = kg.bwd_dkv_gpu(
        w, q, k, v, do, g, ds_end, s_chunks, scale=scale, cfg=cfg, P=P, interpret=interpret
    )
    return dq_s, dk_s, dv_s, ds_start[:, 0], c


def _finish_grads(q, k, v, do, w, dq_s, dk_s, dv_s, c, s_T, ds_T, *, scale, chunk):
    """Input gradients from the kernels' per-state pieces (all float32).

    dq_s, dk_s come without their i = j terms, which carry no decay and are added here: scale (do_t . v_t) k_t to
    dq per state (before the mix weight) and w_s scale (do_t . v_t) q_t to dk. The gate gradient is
        dg_s,t = sum_{i >= t, i in t's chunk} (w_s q_i * dq_s,i - k_i * dk_s,i) + c_s,next,
    c_s,next = sum_V S_in * dS_in at the next chunk's first token (sum_V S_T * dS_T after the last chunk): a
    reverse cumsum over at most one chunk plus an exact boundary term. (The textbook reverse cumsum over the whole
    sequence sums terms that cancel to the tiny gradients of strongly decaying gates; in float32 with tf32 matmuls
    its rounding noise reached 1e-2 relative error at T = 8192.)
    """
    B, T, H, K = q.shape
    N = T // chunk
    q32, k32 = q.astype(f32), k.astype(f32)
    dvd = jnp.einsum("bthv,bthv->bth", do.astype(f32), v.astype(f32))[..., None]  # do_t . v_t
    dq_diag = scale * dvd * k32
    dq_full = [dq_s[s] + dq_diag for s in range(2)]
    dq = w[0] * dq_full[0] + w[1] * dq_full[1]
    dk = dk_s[0] + dk_s[1] + (w[0] + w[1]) * scale * dvd * q32
    dw = jnp.stack([jnp.sum(q32 * dq_full[0]), jnp.sum(q32 * dq_full[1])])
    fin = jnp.sum(s_T * ds_T, axis=-1).reshape(B, H, 2, K)  # [B, H, 2, K]
    c = c.reshape(2, B, H, N, K)
    dg = []
    for s in range(2):
        r = (w[s] * q32 * dq_s[s] - k32 * dk_s[s]).reshape(B, N, chunk, H, K)
        nxt = jnp.concatenate([c[s][:, :, 1:], fin[:, :, None, s]], axis=2)  # [B, H, N, K]
        nxt = jnp.transpose(nxt, (0, 2, 1, 3))[:, :, None]  # [B, N, 1, H, K]
        dg.append((jax.lax.cumsum(r, axis=2, reverse=True) + nxt).reshape(B, T, H, K))
    return dq, dk, dv_s[0] + dv_s[1], dg, dw


# ----------------------------------------------------------------------------------------------------------------
# custom_vjp core: [B, T, H, *] inputs with T padded and heads expanded; states [B * H, 2, K, V]
# ----------------------------------------------------------------------------------------------------------------


@functools.cache
def _core(backend: str, scale: float, cfg, P: int, interpret, G: int = 1):
    """The differentiable kernel call for one static configuration: (q, k, v, g1, g2, w, h0) -> (o, s_T), with k, v,
    g1, g2 per kv head ([B, T, Hk, *]) and repeated to the G query heads of each inside: the backward sums each kv
    head's G gradients in float32 and rounds once to the input dtype (summing G bfloat16-rounded gradients, as
    autodiff of a repeat outside would, put bfloat16 dk at 2.9e-3 against the float32 oracle at SmolLM2's 9 / 3
    heads on an H200, over the 2e-3 bar)."""

    def expand(*xs):
        return tuple(_expand_heads(x, G, 2) for x in xs)

    def group_sum(x, dtype):  # [B, T, Hk * G, D] -> [B, T, Hk, D]: float32 sum, one rounding
        if G == 1:
            return x.astype(dtype)
        B, T, H, D = x.shape
        return jnp.sum(x.astype(f32).reshape(B, T, H // G, G, D), axis=3).astype(dtype)

    def fwd_impl(q, k, v, g1, g2, w, h0, for_grad=False):
        k, v, g1, g2 = expand(k, v, g1, g2)
        if backend == "gpu":
            return _gpu_fwd(q, k, v, g1, g2, w, h0, scale=scale, cfg=cfg, P=P, interpret=interpret, for_grad=for_grad)
        from dsla_jax.ops.dsla import pallas_tpu as kt

        o, s_T = kt.fwd_tpu(q, k, v, g1, g2, w, h0, scale=scale, cfg=cfg, interpret=interpret)
        return o, s_T, h0, None

    @jax.custom_vjp
    def core(q, k, v, g1, g2, w, h0):
        o, s_T, _, _ = fwd_impl(q, k, v, g1, g2, w, h0)
        return o, s_T

    def core_fwd(q, k, v, g1, g2, w, h0):
        o, s_T, s_in, saved = fwd_impl(q, k, v, g1, g2, w, h0, for_grad=True)
        return (o, s_T), (q, k, v, g1, g2, w, s_in, s_T, saved)  # k, v, g1, g2 per kv head

    def core_bwd(res, cts):
        do, ds_T = cts
        q, k0, v0, g10, g20, w, s_in, s_T, saved = res
        k, v, g1, g2 = expand(k0, v0, g10, g20)
        res = (q, k, v, g1, g2, w, s_in, s_T, saved)
        do = do.astype(q.dtype)
        ds_T = ds_T.astype(f32)
        if backend == "gpu" and cfg.bwd == "split":
            dq, dk, dv, dg1, dg2, dw, dh0 = _gpu_bwd_split(
                res, do, ds_T, scale=scale, cfg=cfg, P=P, interpret=interpret, kv_f32=G > 1
            )
            dw = dw.astype(w.dtype)
        else:
            if backend == "gpu":
                if cfg.bwd != "fused":
                    raise ValueError(f"GpuConfig.bwd must be 'split' or 'fused', got {cfg.bwd!r}")
                dq_s, dk_s, dv_s, dh0, c = _gpu_bwd(res, do, ds_T, scale=scale, cfg=cfg, P=P, interpret=interpret)
                chunk = cfg.bwd_chunk
            else:
                from dsla_jax.ops.dsla import pallas_tpu as kt

                dq_s, dk_s, dv_s, dh0, c = kt.bwd_tpu(res[:8], do, ds_T, scale=scale, cfg=cfg, interpret=interpret)
                chunk = cfg.chunk
            dq, dk, dv, dg, dw = _finish_grads(q, k, v, do, w, dq_s, dk_s, dv_s, c, s_T, ds_T, scale=scale, chunk=chunk)
            dq, dg1, dg2, dw = dq.astype(q.dtype), dg[0], dg[1], dw.astype(w.dtype)
        return (
            dq,
            group_sum(dk, k0.dtype),
            group_sum(dv, v0.dtype),
            group_sum(dg1, g10.dtype),
            group_sum(dg2, g20.dtype),
            dw,
            dh0,
        )

    core.defvjp(core_fwd, core_bwd)
    return core


def _gpu_config(chunk_size: int, config, dtype):
    """Default GPU tiles for `chunk_size` (the split backward at the forward's chunk size). bfloat16 runs use tf32
    matmuls in the forward and in the backward's state matmuls, 3-pass tf32 for the backward's intra-chunk ones
    (the gate gradient's cancelling terms); float32 runs exact float32 ones."""
    from dsla_jax.ops.dsla.pallas_gpu import GpuConfig

    if config is None:
        bf16 = dtype == jnp.bfloat16
        dot = "tf32" if bf16 else "ieee"
        config = GpuConfig(
            chunk=chunk_size,
            bwd_chunk=min(64, chunk_size),
            state_dot=dot,
            intra_dot=dot,
            bwd_dot="tf32x3" if bf16 else "ieee",
            bwd_state_dot="tf32" if bf16 else None,
        )
    return config


def resolve_rec(cfg, dtype, K: int, V: int, *, mosaic: bool):
    """`GpuConfig.rec="auto"` made concrete: the Mosaic GPU segment pass and recurrent kernel (with the intra
    kernel writing kd's bfloat16 halves) where they apply and `mosaic` allows them (a Hopper or newer card, not
    interpret mode), else the Triton ones. Explicit choices pass through."""
    import dataclasses

    from dsla_jax.ops.dsla.pallas_gpu_rec_mgpu import tiles_problem

    if cfg.rec != "auto":
        return cfg
    fits = (  # the kernels' own tile rules, and a configuration whose forward they can run
        tiles_problem(cfg.chunk, min(cfg.block_v, V), K, V, dtype) is None
        and cfg.fwd == "split"
        and cfg.split_dtype in ("float32", "kd-bf16x2")
        and not cfg.save_states
    )
    if mosaic and fits:
        return dataclasses.replace(cfg, rec="mosaic", split_dtype="kd-bf16x2")
    return dataclasses.replace(cfg, rec="triton")


def _tpu_config(chunk_size: int, config):
    from dsla_jax.ops.dsla.pallas_tpu import TpuConfig

    return TpuConfig(chunk=chunk_size) if config is None else config


def dsla_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g1: jax.Array,
    g2: jax.Array,
    mix: jax.Array,
    *,
    scale: float | None = None,
    initial_state: tuple[jax.Array, jax.Array] | None = None,
    chunk_size: int = 64,
    backend: str | None = None,
    interpret=False,
    config=None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Dual-state linear attention over a sequence by the Pallas kernels (differentiable).

    Args:
        q: [B, T, H, K] queries (bfloat16 or float32; K = 64 or 128 tested).
        k: [B, T, Hk, K] keys; H % Hk == 0, query head h reads kv head h // (H // Hk).
        v: [B, T, Hk, V] values.
        g1, g2: [B, T, Hk, K] per-channel log forget gates in [-50, 0] (any value <= 0 is exact).
        mix: [2] weights of the two states' outputs.
        scale: output scale, default K ** -0.5.
        initial_state: pair (S1, S2) of [B, Hk, K, V] float32, or None (zeros).
        chunk_size: tokens per chunk (a power of two >= 16); T need not be a multiple of it (padded inside).
        backend: "gpu" (Triton lowering) or "tpu" (Mosaic TPU); default from `jax.default_backend()`.
        interpret: run the kernels in the Pallas interpreter (True, or `pltpu.InterpretParams()` for the TPU kernels).
        config: a `pallas_gpu.GpuConfig` / `pallas_tpu.TpuConfig` overriding tiles and launch parameters.

    Returns:
        o [B, T, H, V] in q's dtype and the final states (S1, S2), each [B, Hk, K, V] float32.

    Example:
        >>> o, (s1, s2) = dsla_attention_pallas(q, k, v, g1, g2, jnp.array([0.5, 0.5]))
    """
    if initial_state is not None and (not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2):
        raise ValueError(f"initial_state must be None or a pair (S1, S2), got {type(initial_state).__name__}")
    s01, s02 = (None, None) if initial_state is None else initial_state
    B, T, H, Hk, K, V = check_gla_shapes(q, k, v, (g1, g2), (s01, s02), gate_names=("g1", "g2"))
    check_mix(mix)
    _check_chunk(chunk_size)
    if q.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"q dtype must be bfloat16 or float32, got {q.dtype}")
    backend = _resolve_backend(backend, interpret)
    scale = resolve_scale(scale, K)
    G = H // Hk
    zeros = jnp.zeros((B, Hk, K, V), f32)
    h0 = jnp.stack([zeros if s is None else s.astype(f32) for s in (s01, s02)], axis=2)  # [B, Hk, 2, K, V]
    if T == 0:
        return jnp.zeros((B, 0, H, V), q.dtype), (h0[:, :, 0], h0[:, :, 1])

    if backend == "gpu":
        from dsla_jax.ops.dsla.pallas_gpu import SEGMENT_PROGRAMS, pick_segments

        if not gpu_dims_supported(K, V):
            raise ValueError(
                f"the GPU kernels need key and value head dims that are powers of two in [16, 256], got K={K}, V={V};"
                ' use impl="xla"'
            )

        cfg = resolve_rec(
            _gpu_config(chunk_size, config, q.dtype), q.dtype, K, V, mosaic=not interpret and _hopper_or_newer()
        )
        BT = cfg.chunk
        n_chunks = math.ceil(T / BT)
        target = SEGMENT_PROGRAMS["mosaic" if cfg.rec == "mosaic" else "triton"]
        P = cfg.num_segments or pick_segments(B * H, n_chunks, V // min(cfg.fwd_block_v, V), target)
        P = max(1, min(P, n_chunks))
        T_pad = P * math.ceil(n_chunks / P) * BT
    else:
        cfg = _tpu_config(chunk_size, config)
        P = 1
        T_pad = cfg.chunk * math.ceil(T / cfg.chunk)

    dt = q.dtype
    k, v, g1, g2 = (pad_time(x.astype(dt), T_pad) for x in (k, v, g1, g2))  # kv heads: `_core` repeats them
    q = pad_time(q, T_pad)
    h0 = _expand_heads(h0, G, 1).reshape(B * H, 2, K, V)
    core = _core(backend, scale, cfg, P, interpret, G)
    o, s_T = core(q, k, v, g1, g2, mix.astype(f32), h0)
    s_T = s_T.reshape(B, H, 2, K, V)[:, ::G]
    return o[:, :T], (s_T[:, :, 0], s_T[:, :, 1])


def dsla_decode_step_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g1: jax.Array,
    g2: jax.Array,
    mix: jax.Array,
    state: tuple[jax.Array, jax.Array],
    *,
    scale: float | None = None,
    backend: str | None = None,
    interpret=False,
    block_v: int | None = None,
    gpu_lowering: str = "auto",
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Advance both DSLA states by one token and read them out, in one kernel (each state byte read and written once).

    Args:
        q: [B, H, K] query of the new token.
        k: [B, Hk, K] key; H % Hk == 0.
        v: [B, Hk, V] value.
        g1, g2: [B, Hk, K] log forget gates (<= 0).
        mix: [2] weights of the two states' outputs.
        state: pair (S1, S2) of [B, Hk, K, V] float32 states before the token.
        scale: output scale, default K ** -0.5.
        backend, interpret: as `dsla_attention_pallas`.
        block_v: value tile of a program (default: 64 on GPU, V on TPU).
        gpu_lowering: on GPU, "triton" (`pallas_decode`, a `pallas_call` lowered through Triton), "mosaic"
            (`pallas_decode_mgpu`, a Mosaic GPU kernel with TMA copies; needs a Hopper or newer card, K % 64 == 0
            and V % 32 == 0) or "auto" (default): Mosaic GPU where it applies (B64 H32 D128 on an H200: 3.33 TB/s
            against 2.89-3.17 for the Triton kernel's tiles in the same call), else Triton.

    Returns:
        o [B, H, V] in q's dtype and the new states (S1, S2), each [B, Hk, K, V] float32.
    """
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(f"state must be a pair (S1, S2) of [B, Hk, K, V] arrays, got {type(state).__name__}")
    B, _, H, Hk, K, V = check_gla_shapes(q, k, v, (g1, g2), state, decode=True, gate_names=("g1", "g2"))
    check_mix(mix)
    backend = _resolve_backend(backend, interpret)
    scale = resolve_scale(scale, K)
    if gpu_lowering not in ("auto", "triton", "mosaic"):
        raise ValueError(f"gpu_lowering must be 'auto', 'triton' or 'mosaic', got {gpu_lowering!r}")
    if gpu_lowering == "auto":
        from dsla_jax.ops.dsla.pallas_decode_mgpu import tiles_problem

        fits = tiles_problem(K, V, block_v) is None
        gpu_lowering = "mosaic" if fits and not interpret and _hopper_or_newer() else "triton"
    if backend == "gpu" and gpu_lowering == "mosaic":
        from dsla_jax.ops.dsla.pallas_decode_mgpu import decode_step_mgpu

        return decode_step_mgpu(
            q,
            k,
            v,
            g1,
            g2,
            mix,
            state[0].astype(f32),
            state[1].astype(f32),
            scale=scale,
            block_v=block_v,
            interpret=bool(interpret),
        )
    from dsla_jax.ops.dsla.pallas_decode import decode_step

    return decode_step(
        q,
        k,
        v,
        g1,
        g2,
        mix.astype(f32),
        state[0].astype(f32),
        state[1].astype(f32),
        scale=scale,
        backend=backend,
        interpret=interpret,
        block_v=block_v,
    )
