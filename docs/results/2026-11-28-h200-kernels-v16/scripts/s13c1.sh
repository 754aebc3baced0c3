set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
git log --oneline -1 > $OUT/commit.txt
MOSAIC_GPU_DUMP_TO=/tmp/dump MOSAIC_GPU_DUMP_PTXAS=1 timeout 150 python3 .dev/t_s13c1.py ptx > $OUT/ptx.log 2>&1; tail -3 $OUT/ptx.log
ls /tmp/dump | head -30 > $OUT/dump_ls.txt
for f in /tmp/dump/*pair*; do echo "== $f"; grep -i "spill\|registers\|smem\|bytes" $f | head -8; done 2>&1 | tee $OUT/ptxas_pair.txt | head -30
timeout 330 python3 .dev/t_s13c1.py ab 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|error" | head -40
timeout 60 python3 -m bench.kernel_profile --pass fwd --shape B1T8192 --config rec_pair=true,num_segments=4 --out $OUT/profile_pair_p4.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_pair_p4.txt | head -10
timeout 60 python3 -m bench.kernel_profile --pass fwd --shape B1T8192 --config rec_pair=true,num_segments=8 --out $OUT/profile_pair_p8.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_pair_p8.txt | head -10
