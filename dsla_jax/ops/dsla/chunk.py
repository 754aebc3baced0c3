"""Chunked DSLA in plain XLA: two chunked GLA states sharing q, k, v.

Two equivalent forms:

* `chunk_dsla_two`: two chunked GLA passes (gates g1, g2), outputs mixed: o = mix[0] o1 + mix[1] o2.
* `chunk_dsla_fused`: ONE chunked GLA with key dimension 2K: k' = [k, k], g' = [g1, g2], q' = [mix[0] q, mix[1] q]
  (concatenated along the key dim). Its state [2K, V] is [S1; S2] stacked, and q' S' = mix[0] q S1 + mix[1] q S2.
  Both states share the chunk loop, the within-chunk score matrix and its product with v. The concatenation is
  done per block inside the chunk loop (`chunk_gla_multi`), so no 2K-wide copy of the sequence is made.

Which one `impl="xla"` runs is `XLA_DEFAULT` (measured with `python -m bench.ops`, see there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsla_jax.ops.gla.chunk import chunk_gla_multi
from dsla_jax.ops.utils import check_gla_shapes, check_mix, group_queries, resolve_scale, ungroup_queries

States = tuple[jax.Array, jax.Array]


def _prepare(q, k, v, g1, g2, mix, scale, initial_state):
    s01, s02 = (None, None) if initial_state is None else initial_state
    B, T, H, Hk, K, V = check_gla_shapes(q, k, v, (g1, g2), (s01, s02), gate_names=("g1", "g2"))
    check_mix(mix)
    zeros = jnp.zeros((B, Hk, K, V), jnp.float32)
    s0 = tuple(zeros if s is None else s.astype(jnp.float32) for s in (s01, s02))
    return Hk, K, resolve_scale(scale, K), s0


def chunk_dsla_two(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g1: jax.Array,
    g2: jax.Array,
    mix: jax.Array,
    *,
    scale: float | None = None,
    initial_state: States | None = None,
    chunk_size: int = 64,
    sub_chunk: int | None = None,
    block_elems: int | None = None,
    unroll: int | None = None,
) -> tuple[jax.Array, States]:
    """Chunked DSLA as two GLA passes. Shapes as `dsla_attention`: q [B, T, H, K], k/g1/g2 [B, T, Hk, K],
    v [B, T, Hk, V], mix [2]; returns o [B, T, H, V] in q's dtype and (S1, S2) [B, Hk, K, V] float32."""
    Hk, K, scale, s0 = _prepare(q, k, v, g1, g2, mix, scale, initial_state)
    qg = group_queries(q, Hk)
    kw = dict(scale=scale, chunk_size=chunk_size, sub_chunk=sub_chunk, block_elems=block_elems, unroll=unroll)
    o1, (s1,) = chunk_gla_multi(qg, k, v, (g1,), (s0[0],), None, **kw)
    o2, (s2,) = chunk_gla_multi(qg, k, v, (g2,), (s0[1],), None, **kw)
    w = mix.astype(jnp.float32)
    return ungroup_queries(w[0] * o1 + w[1] * o2).astype(q.dtype), (s1, s2)


def chunk_dsla_fused(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g1: jax.Array,
    g2: jax.Array,
    mix: jax.Array,
    *,
    scale: float | None = None,
    initial_state: States | None = None,
    chunk_size: int = 64,
    sub_chunk: int | None = None,
    block_elems: int | None = None,
    unroll: int | None = None,
) -> tuple[jax.Array, States]:
    """Chunked DSLA as one GLA with key dimension 2K. Shapes as `chunk_dsla_two`."""
    Hk, K, scale, s0 = _prepare(q, k, v, g1, g2, mix, scale, initial_state)
    o, s = chunk_gla_multi(
        group_queries(q, Hk),
        k,
        v,
        (g1, g2),
        s0,
        mix,
        scale=scale,
        chunk_size=chunk_size,
        sub_chunk=sub_chunk,
        block_elems=block_elems,
        unroll=unroll,
    )
    return ungroup_queries(o).astype(q.dtype), s
