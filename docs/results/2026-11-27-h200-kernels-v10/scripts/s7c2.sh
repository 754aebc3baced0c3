set -uo pipefail
export PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
for p in fwd fwdbwd; do
  timeout 200 python3 -m bench.kernel_profile --pass $p --out $OUT/profile_$p.json 2>&1 | grep "^|\|Error\|error" | tee $OUT/profile_$p.txt
done
