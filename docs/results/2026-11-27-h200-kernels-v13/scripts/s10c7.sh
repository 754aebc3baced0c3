set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text" timeout 200 python3 .dev/hlo_fwdbwd.py 2>&1 | tail -2
ls /tmp/hlo | grep -i "after_optimizations.txt" | head
mkdir -p $OUT/hlo; for f in /tmp/hlo/*after_optimizations.txt; do s=$(stat -c %s $f); if [ $s -gt 20000 ]; then cp $f $OUT/hlo/; fi; done
ls -la $OUT/hlo
grep -n " copy(\| copy-start\|copy\.[0-9]* = " $OUT/hlo/*.txt | head -20
