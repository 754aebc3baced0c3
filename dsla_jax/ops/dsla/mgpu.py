"""What the DSLA Mosaic GPU kernels share (`pallas_decode_mgpu`, `pallas_gpu_rec_mgpu`): the launch (Lane
semantics, the interpreter on CPU), the shared-memory swizzles, and register loads and WGMMAs that also run in
Mosaic GPU's interpreter.

The interpreter has neither `plgpu.load` (with a layout), `run_state` nor transposed refs: there tiles are read with
`ref[...]` (the same values; the layout only matters to the compiler) and the products are float32 matmuls.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

f32 = jnp.float32


# Fast exponentials in every Mosaic GPU kernel here: exp(x) as ex2.approx(x log2 e) (relative error ~2^-22, far
# below the tf32 / bf16 roundings around it) instead of the precise libdevice sequence. Read when a kernel is
# traced: benchmarks flip it to compare.
APPROX_MATH = True


def lane_semantics(**params):
    """Mosaic GPU compiler parameters with per-lane (`Lane`) lowering semantics: JAX 0.10's default, and what the
    kernels here are written and checked for (JAX 0.11 defaults to `Warpgroup`, whose lowering rejects the
    recurrent kernel's `run_state` accumulators), and `APPROX_MATH`. `params`: further `plgpu.CompilerParams`
    fields."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    params.setdefault("approx_math", APPROX_MATH)
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane, **params)


def interpret_params():
    """Mosaic GPU interpret parameters: public as `plgpu.InterpretGPUParams` from JAX 0.11, private in 0.10."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


def launch(body: Callable, *, name: str, interpret: bool, reduction_scratch_bytes: int | None = None, **kernel_kw):
    """`plgpu.kernel(body, ...)` with Lane semantics, named, in the interpreter when `interpret`;
    `reduction_scratch_bytes`: shared memory for reductions across warps (None: Mosaic GPU's default, 2 KB)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    extra = {} if reduction_scratch_bytes is None else dict(reduction_scratch_bytes=reduction_scratch_bytes)
    return plgpu.kernel(
        body,
        interpret=interpret_params() if interpret else None,
        kernel_name=name,
        compiler_params=lane_semantics(**extra),
        **kernel_kw,
    )


def launch_pair(body: Callable, *, name: str, interpret: bool, **kernel_kw):
    """`launch` for the paired kernels: two warpgroups per program (thread axis "wg"), no reduction scratch; `body`
    runs `per_warpgroup(thread)`."""
    return launch(
        body, name=name, interpret=interpret, reduction_scratch_bytes=0, num_threads=2, thread_name="wg", **kernel_kw
    )


def per_warpgroup(thread: Callable[[int], None]) -> None:
    """Inside a `launch_pair` body: thread(w) on warpgroup w (w a Python int, so each traces its own code)."""
    from jax.experimental import pallas as pl

    wg = lax.axis_index("wg")
    for w in range(2):
        pl.when(wg == w)(lambda w=w: thread(w))


def swizzles() -> tuple[tuple, tuple]:
    """Shared-memory transforms (128-byte swizzle) for float32 and for 16-bit tiles: rows of 32 / 64 elements."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return (
        (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)),
        (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)),
    )


def swizzle_for(dtype) -> tuple:
    """`swizzles()`'s transforms for a tile of this dtype: the float32 ones for 4-byte, else the 16-bit ones."""
    sw32, sw16 = swizzles()
    return sw32 if jnp.dtype(dtype).itemsize == 4 else sw16


def kernel_ops(interpret: bool):
    """(ld, mma) for kernel bodies.

    ld(ref, layout): a shared-memory tile into registers in a layout.
    mma(init, pairs): init + sum of a @ b over (a, b) in pairs, each operand a shared-memory ref or ("T", ref) for
    its transpose: WGMMA into an accumulator that starts at init.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def ld(ref, layout):
        return ref[...] if interpret else plgpu.load(ref, (), layout=layout)

    def mma(init, pairs):
        if interpret:
            val = lambda x: x[1][...].T if isinstance(x, tuple) else x[...]  # noqa: E731
            hi = lax.Precision.HIGHEST
            return init + sum(jnp.dot(val(a).astype(f32), val(b_).astype(f32), precision=hi) for a, b_ in pairs)
        ref = lambda x: plgpu.transpose_ref(x[1], (1, 0)) if isinstance(x, tuple) else x  # noqa: E731

        def products(acc_ref):
            for a, b_ in pairs:
                plgpu.wgmma(acc_ref, ref(a), ref(b_))

        return pl.run_state(products)(plgpu.ACC.init(init))

    return ld, mma


def zeros(shape: tuple[int, ...], layout, interpret: bool) -> jax.Array:
    """A float32 zero array in a register layout (plain zeros in the interpreter)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    z = jnp.zeros(shape, f32)
    return z if interpret else plgpu.layout_cast(z, layout)


def iota(shape: tuple[int, ...], dim: int, layout, interpret: bool) -> jax.Array:
    """int32 indices along `dim` in a register layout (a plain iota in the interpreter)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=layout)


def row_minus_col(n: int, layout, interpret: bool) -> jax.Array:
    """[n, n] float32 i - j (row minus column index) in a register layout: the kernels' 0 / 1 triangles are its clips
    (clip(1 + d, 0, 1): j <= i; clip(1 - d, 0, 1): j >= i; clip(d, 0, 1): j < i)."""
    return (iota((n, n), 0, layout, interpret) - iota((n, n), 1, layout, interpret)).astype(f32)


def halves(x: jax.Array, dtype=jnp.bfloat16) -> tuple[jax.Array, jax.Array]:
    """float32 x as 16-bit halves (hi, lo), x = hi + lo to ~2^-16 relative in bfloat16 (exact for tf32-rounded x):
    register operands of bf16 WGMMAs, or plain arrays in XLA."""
    hi = x.astype(dtype)
    return hi, (x - hi.astype(f32)).astype(dtype)


def split_halves(x: jax.Array, hi_ref, lo_ref) -> None:
    """Store float32 x into shared memory as its `halves`, for bf16 WGMMAs where a float32 operand would be read
    transposed (tf32 WGMMA reads both operands K-major only)."""
    hi_ref[...], lo_ref[...] = halves(x, hi_ref.dtype)


def load_transposed(ref, interpret: bool) -> jax.Array:
    """The transpose of a swizzled 2-D shared-memory tile [R, C] as a [C, R] register array in the WGMMA layout (an
    accumulator's): read through a transposed view in the WGMMA_TRANSPOSED layout, then one shuffle per register
    pair. In the interpreter, `ref[...].T`."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if interpret:
        return ref[...].T
    lay = plgpu.Layout
    x = plgpu.load(plgpu.transpose_ref(ref, (1, 0)), (), layout=lay.WGMMA_TRANSPOSED)
    return plgpu.layout_cast(x, lay.WGMMA)


def store_transposed(ref, x: jax.Array, interpret: bool) -> None:
    """Store the transpose of x [C, R] (WGMMA layout) into a swizzled 2-D shared-memory tile [R, C], through the
    WGMMA_TRANSPOSED layout (one shuffle per register pair) and a transposed view. In the interpreter, `ref[...] =
    x.T`."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if interpret:
        ref[...] = x.T.astype(ref.dtype)
        return
    x = plgpu.layout_cast(x.astype(ref.dtype), plgpu.Layout.WGMMA_TRANSPOSED)
    plgpu.transpose_ref(ref, (1, 0))[...] = x
