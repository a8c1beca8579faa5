#!/usr/bin/env bash
# Issue 12, third round: before (2b7e5a8, checked out at $BEFORE) and after (this commit), in one
# session, alternating. "after-t0" is this commit with OPENBLAS_THREAD_TIMEOUT=0 (OpenBLAS's own
# default, 2^28 cycles of spinning), to tell the bias trick from the thread timeout. Run from the
# repository root; writes docs/benchmarks/speed3/*.{log,json}.
set -euo pipefail
BEFORE=${BEFORE:-/tmp/prev5}
O=docs/benchmarks/speed3
date -u +%Y-%m-%dT%H:%M:%SZ > $O/date.txt
run() {  # run <who> <name> <script> <args...>
  local who=$1 name=$2 script=$3; shift 3
  local tree=. env=()
  [ "$who" = before ] && tree=$BEFORE
  [ "$who" = after-t0 ] && env=(OPENBLAS_THREAD_TIMEOUT=0)
  (cd "$tree" && env "${env[@]}" PYTHONPATH=. python "benchmarks/$script" "$@" --json "$OLDPWD/$O/${name}_$who.json") \
    > "$O/${name}_$who.log" 2>&1
}
for i in 1 2; do
  for who in before after after-t0; do run $who conv_speed_$i conv_speed.py --no-progress --repeats 9; done
done
for i in 1 2; do
  for who in before after; do run $who train_vgg11_$i train_speed.py --no-progress --models vgg11-32 --rounds 3; done
done
for who in before after; do run $who train_d2l train_speed.py --no-progress --models d2l-224; done
for who in before after; do run $who profile_vgg11 profile_step.py; done
date -u +%Y-%m-%dT%H:%M:%SZ >> $O/date.txt
