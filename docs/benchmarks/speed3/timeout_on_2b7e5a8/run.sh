#!/usr/bin/env bash
# OpenBLAS's thread timeout on the code before this round (2b7e5a8, whose benchmarks set nothing):
# conv_speed under OpenBLAS's defaults, OPENBLAS_THREAD_TIMEOUT=4 and MINIVGG_NUM_THREADS=1,
# alternating, twice. Run from the root of a checkout of 2b7e5a8 (2026-11-23 12:20-12:25 UTC,
# before any change of this round was written). A training-step part that followed was stopped:
# the working tree changed under it, so none of its figures are kept.
set -euo pipefail
O=${O:-docs/benchmarks/speed3/timeout_on_2b7e5a8}
date -u +%FT%TZ > $O/date.txt
cfg() { case $1 in default) ;; t4) export OPENBLAS_THREAD_TIMEOUT=4;; mv1) export MINIVGG_NUM_THREADS=1;; esac; }
for i in 1 2; do
  for c in default t4 mv1; do
    ( cfg $c; PYTHONPATH=. python benchmarks/conv_speed.py --no-progress --repeats 9 --json $O/conv_${c}_$i.json > $O/conv_${c}_$i.log 2>&1 )
  done
done
