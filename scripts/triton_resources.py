"""Registers and spills of every DSLA GPU kernel, on a machine without a GPU.

Lowers the forward and backward of `dsla_attention_pallas` for CUDA (`lowering_platforms`), captures each kernel's
Triton IR, compiles it for sm_90 with the `triton` pip package (its bundled ptxas) and prints, per kernel, the
registers per thread, the stack (local memory) frame and the count of spill loads / stores (LDL / STL) in the SASS.
Register spills were the main cost of every kernel profiled on the card (docs/kernel_notes.md), so this is the
first check of a kernel change before spending device time.

The figures are indicative: XLA compiles the same IR with its own Triton build, whose passes may differ from the
pip package's; on the H200 the dq / dk kernel showed the same 255 registers and heavy spills as here.

    python -m pip install --target .triton --no-deps triton
    PYTHONPATH=.triton:. python scripts/triton_resources.py grads_order=split block_k=32

Arguments are `GpuConfig` overrides (key=value); `--only NAME` keeps kernels whose name contains NAME.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import pallas_call_registration as registration

from dsla_jax.ops.dsla.pallas import dsla_attention_pallas
from dsla_jax.ops.dsla.pallas_gpu import GpuConfig


def capture(cfg: GpuConfig, B=1, T=1024, H=2, K=128, dtype=jnp.bfloat16) -> list[tuple[str, str, int, int]]:
    """(name, Triton IR text, num_warps, num_stages) of every kernel of one forward + backward."""
    texts = []
    orig = registration.lowering.lower_jaxpr_to_triton_module

    def wrap(*a, **kw):
        r = orig(*a, **kw)
        texts.append(r.module.operation.get_asm(enable_debug_info=False))
        return r

    registration.lowering.lower_jaxpr_to_triton_module = wrap
    try:
        args = [jax.ShapeDtypeStruct((B, T, H, K), dtype)] * 5 + [jax.ShapeDtypeStruct((2,), jnp.float32)]

        def loss(*a):
            return jnp.sum(dsla_attention_pallas(*a, backend="gpu", config=cfg)[0].astype(jnp.float32))

        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = orig
    launch = re.findall(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', hlo.as_text())
    out = []
    for text in texts:
        name = re.search(r"tt.func (?:public )?@(\w+)", text).group(1)
        stages, warps = next((int(s), int(w)) for n, s, w in launch if n == name)
        out.append((name, text, warps, stages))
    return out


def resources(text: str, num_warps: int, num_stages: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ttir")
        with open(src, "w") as f:
            f.write(text)
        k = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
        )
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return dict(
        regs=int(reg.group(1)) if reg else None,
        stack=int(stack.group(1)) if stack else None,
        ldl=len(re.findall(r"\bLDL\b", sass)),
        stl=len(re.findall(r"\bSTL\b", sass)),
        shared=k.metadata.shared,
    )


def main(argv: list[str]) -> None:
    only = None
    kw = {}
    it = iter(argv)
    for a in it:
        if a == "--only":
            only = next(it)
            continue
        key, eq, val = a.partition("=")
        if not eq or key not in GpuConfig.__dataclass_fields__:
            raise SystemExit(
                f"expected GpuConfig overrides as key=value (keys: {sorted(GpuConfig.__dataclass_fields__)}), got {a!r}"
            )
        kw[key] = int(val) if val.isdigit() else val
    cfg = GpuConfig(**kw)
    print(f"GpuConfig overrides: {kw or 'none'}")
    print("| kernel | warps | stages | regs | stack B | LDL | STL | shared B |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, text, warps, stages in capture(cfg):
        if only and only not in name:
            continue
        r = resources(text, warps, stages)
        print(f"| {name} | {warps} | {stages} | {r['regs']} | {r['stack']} | {r['ldl']} | {r['stl']} | {r['shared']} |")


if __name__ == "__main__":
    main(sys.argv[1:])
