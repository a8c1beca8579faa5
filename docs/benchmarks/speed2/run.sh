#!/usr/bin/env bash
# Before (752df71) and after, back to back in one session. Run from the repository root with a
# checkout of 752df71 at $BEFORE whose benchmarks/train_speed.py is this commit's (for --rounds;
# the library timed is 752df71's). Writes docs/benchmarks/speed2/*.{log,json}.
set -euo pipefail
BEFORE=${BEFORE:-/tmp/prev}
O=docs/benchmarks/speed2
date -u +%Y-%m-%dT%H:%M:%SZ > $O/date.txt
run() {  # run <who> <name> <script> <args...>
  local who=$1 name=$2 script=$3; shift 3
  local tree=.; [ "$who" = before ] && tree=$BEFORE
  (cd "$tree" && PYTHONPATH=. python "benchmarks/$script" "$@" --json "$OLDPWD/$O/${name}_$who.json") \
    > "$O/${name}_$who.log" 2>&1
}
for i in 1 2; do
  for who in before after; do run $who conv_speed_$i conv_speed.py --no-progress --repeats 9; done
done
for i in 1 2; do
  for who in before after; do run $who train_vgg11_$i train_speed.py --no-progress --models vgg11-32 --rounds 3; done
done
for who in before after; do run $who train_d2l train_speed.py --no-progress --models d2l-224; done
for who in before after; do run $who profile_vgg11 profile_step.py; done
date -u +%Y-%m-%dT%H:%M:%SZ >> $O/date.txt
