#!/usr/bin/env bash
# Issue 13's development grid: every `lfm bench` method beside the LFM-DR candidates, 3 seeds,
# with 50 (MNIST-1D) / 20 (digits) clean examples per class held out of all training for the
# choice (--select-per-class). One process, one thread (a shared 2-core machine).
#   bash benchmarks/issue13_grid.sh evidence/issue13
# (The grid in docs/RESULTS.md section 8 ran on a copy of lfm/ taken at its start, through
# PYTHONPATH from another folder, so that editing the package could not change runs mid-grid.)
set -euo pipefail
OUT=$(realpath -m "${1:-evidence/issue13}")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
M="ce,ce-clean,ce-all,small-loss,focal,cb,l2rw,mwnet,lfm-sn,lfm-w1-val,cand-a,cand-ab,cand-abw"
V="--variant lfm-w1-val=lfm:preset=w1-val --variant cand-a=lfm:preset=w1-val-a-norm \
   --variant cand-ab=lfm:preset=w1-val-a-norm-b-norm --variant cand-abw=lfm:preset=w1-val-a-norm-b-norm-warm"
lfm bench --dataset digits --model mlp --epochs 30 --select-per-class 20 --methods $M $V \
  --noise flip:0.4 --imbalance 1 --seeds 3 --no-progress --out "$OUT/digits-flip0.4"
MN="--dataset mnist1d --model cnn1d --epochs 25 --lr 0.05 --schedule cosine --select-per-class 50"
lfm bench $MN --methods $M $V --noise uniform:0.4 --imbalance 1 --seeds 3 --no-progress --out "$OUT/mnist1d-uniform0.4"
lfm bench $MN --methods $M $V --noise flip:0.2 --imbalance 10 --seeds 3 --no-progress --out "$OUT/mnist1d-imb10-flip0.2"
lfm bench $MN --methods $M $V --noise none --imbalance 50 --seeds 3 --no-progress --out "$OUT/mnist1d-imb50"
lfm bench $MN --methods $M $V --noise flip:0.4 --imbalance 1 --seeds 3 --no-progress --out "$OUT/mnist1d-flip0.4"
# Second stage, added after the first stage's tables were seen (docs/RESULTS.md section 8):
# w1-val-a-norm with b moving less per visit, on the same settings and seeds.
if [[ "${STAGE2:-0}" == 1 ]]; then
  E="$OUT-extra"
  V2="--variant cand-a-slow=lfm:preset=w1-val-a-norm,b_lr=0.02"
  lfm bench --dataset digits --model mlp --epochs 30 --select-per-class 20 --methods cand-a-slow $V2 \
    --noise flip:0.4 --imbalance 1 --seeds 3 --no-progress --out "$E/digits-flip0.4"
  lfm bench $MN --methods cand-a-slow $V2 --noise none --imbalance 50 --seeds 3 --no-progress --out "$E/mnist1d-imb50"
  lfm bench $MN --methods cand-a-slow $V2 --noise flip:0.2 --imbalance 10 --seeds 3 --no-progress --out "$E/mnist1d-imb10-flip0.2"
  lfm bench $MN --methods cand-a-slow $V2 --noise uniform:0.4 --imbalance 1 --seeds 3 --no-progress --out "$E/mnist1d-uniform0.4"
  lfm bench $MN --methods cand-a-slow $V2 --noise flip:0.4 --imbalance 1 --seeds 3 --no-progress --out "$E/mnist1d-flip0.4"
fi
