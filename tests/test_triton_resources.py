"""scripts/triton_resources.py's capture step (lowering for CUDA and reading each kernel's Triton IR and launch
parameters) runs on the CPU; the compile step needs the optional `triton` package and is exercised by hand."""

import importlib.util
from pathlib import Path

from dsla_jax.ops.dsla.pallas_gpu import GpuConfig

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("triton_resources", ROOT / "scripts" / "triton_resources.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_capture_lists_every_kernel_with_its_launch_parameters():
    cfg = GpuConfig(dqk_intra_num_warps=2, grads_num_warps=8, dv_num_warps=4, rec_num_warps=8)
    kernels = {name: (text, warps, stages) for name, text, warps, stages in _module().capture(cfg)}
    assert set(kernels) == {
        "dsla_fwd_intra", "dsla_fwd_exact", "dsla_seg_states_split", "dsla_fwd_rec", "dsla_bwd_states",
        "dsla_bwd_adjoints",
        "dsla_bwd_dqk_intra", "dsla_bwd_dqk_exact", "dsla_bwd_dqk", "dsla_bwd_dv",
    }  # fmt: skip
    assert kernels["dsla_bwd_dqk_intra"][1:] == (2, 1)
    assert kernels["dsla_bwd_dqk"][1] == 8 and kernels["dsla_bwd_dv"][1] == 4
    assert all(text.startswith("module") and "tt.func" in text for text, _, _ in kernels.values())
