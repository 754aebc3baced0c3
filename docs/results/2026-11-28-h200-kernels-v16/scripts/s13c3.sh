set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 300 python3 -m pytest -q -m gpu tests/test_rec_pair_mgpu.py "tests/test_pallas.py::test_gpu_compiled_mosaic_recurrent" 2>&1 | tail -15 | tee $OUT/gpu_tests.log
cd tests && timeout 200 python3 - <<'PY' 2>&1 | tail -4 | tee $OUT/seed11_base.log
import jax.numpy as jnp
from test_pallas import check_against_oracle, make_inputs, pallas_fn
from dsla_jax.ops.dsla.pallas_gpu import GpuConfig
args = make_inputs(11, 1, 1000, 4, 4, 128, 128, jnp.bfloat16, ("strong", "logsig"))
try:
    check_against_oracle(pallas_fn("gpu", 64, GpuConfig(rec="mosaic"), interpret=False), args, jnp.bfloat16)
    print("seed 11 base: passed")
except AssertionError as e:
    print("seed 11 base:", e)
PY
