#!/usr/bin/env bash
# More before/after pairs, right after run.sh, same conventions. "train": two more pairs of the
# training step (run.sh's runs 1-2 disagreed on the before ratio: 1.19x and 1.47x), writing
# train_vgg11_{3,4}_*. "conv": two more pairs of conv_speed, writing conv_speed_{3,4}_*.
set -euo pipefail
BEFORE=${BEFORE:-/tmp/prev5}
O=docs/benchmarks/speed3
WHAT=${1:-train}
date -u +"%Y-%m-%dT%H:%M:%SZ $WHAT" >> $O/date_more.txt
for i in 3 4; do
  for who in before after; do
    tree=.; [ "$who" = before ] && tree=$BEFORE
    if [ "$WHAT" = train ]; then
      (cd "$tree" && PYTHONPATH=. python benchmarks/train_speed.py --no-progress --models vgg11-32 --rounds 3 \
        --json "$OLDPWD/$O/train_vgg11_${i}_$who.json") > "$O/train_vgg11_${i}_$who.log" 2>&1
    else
      (cd "$tree" && PYTHONPATH=. python benchmarks/conv_speed.py --no-progress --repeats 9 \
        --json "$OLDPWD/$O/conv_speed_${i}_$who.json") > "$O/conv_speed_${i}_$who.log" 2>&1
    fi
  done
done
date -u +"%Y-%m-%dT%H:%M:%SZ $WHAT" >> $O/date_more.txt
