#!/usr/bin/env bash
# The training step with OpenBLAS's defaults and with OPENBLAS_THREAD_TIMEOUT=4, alternating,
# on this commit's code. Run from the repository root; writes docs/benchmarks/speed2/timeout_*.
set -euo pipefail
O=docs/benchmarks/speed2
for i in 1 2; do
  for t in default 4; do
    if [ $t = default ]; then unset OPENBLAS_THREAD_TIMEOUT; else export OPENBLAS_THREAD_TIMEOUT=$t; fi
    PYTHONPATH=. python benchmarks/train_speed.py --no-progress --models vgg11-32 --rounds 2 \
      --json $O/timeout_${t}_$i.json > $O/timeout_${t}_$i.log 2>&1
  done
done
