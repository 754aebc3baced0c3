set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
for cfg in rec_pair=false rec_pair=true,num_segments=4 rec_pair=false; do
  timeout 60 python3 -m bench.kernel_profile --pass fwd --shape B1T8192 --config $cfg --out $OUT/profile_$cfg.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_$cfg.txt | head -6
done
timeout 60 python3 -m bench.kernel_profile --pass fwd --shape B1T32768 --config rec_pair=false --out $OUT/profile_T32768_base.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_T32768_base.txt | head -5
timeout 60 python3 -m bench.kernel_profile --pass fwd --shape B1T32768 --config rec_pair=true,num_segments=4 --out $OUT/profile_T32768_pair.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_T32768_pair.txt | head -5
timeout 200 python3 -m pytest -q -m gpu tests/test_rec_pair_mgpu.py 2>&1 | tail -15 | tee $OUT/gpu_tests.log
