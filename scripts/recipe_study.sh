#!/bin/bash
# The recipe study (docs/results.md#recipes): which optimizer, rates and step budget let each patch kind show
# what it can on a small task. Every stage is a multirun of train.py through the pool launcher (2 jobs at once,
# 1 thread each) from the make-main source; each run's folder is under runs/study/<stage>/<job>.
#   bash scripts/recipe_study.sh                 # every stage (about 3 h on 2 cores)
#   bash scripts/recipe_study.sh s1_sgd old      # some stages
# Then: python scripts/recipe_table.py runs/study
# The sweeps set every rate they study explicitly (optim.patch_lr=null optim.head_lr=null: optim.lr for both) and
# trainer.min_steps, so they mean the same before and after the defaults they chose.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=runs/study
W=$OUT/pretrain/checkpoints/last.ckpt
R18=$OUT/r18_pretrain/checkpoints/last.ckpt  # the same source task on resnet18
mkdir -p $OUT

run() {  # run <stage> <overrides...>: one multirun from $SRC (default $W), its wall time in runs/study/times.txt
  local name=$1 t0
  shift
  t0=$(date +%s)
  echo "$(date +%FT%T) start $name: $*" >>$OUT/times.txt
  $PY train.py -m hydra/launcher=pool hydra.launcher.cpu_jobs=2 experiment=transfer_fmnist_b \
    backbone.weights=${SRC:-$W} "$@" hydra.sweep.dir=$OUT/$name >$OUT/$name.log 2>&1
  echo "$(date +%FT%T) end $name $(($(date +%s) - t0)) s" >>$OUT/times.txt
}

NEW="optim.patch_lr=null optim.head_lr=null trainer.min_steps=300"  # one rate (optim.lr) for patch and head
# the defaults before the study: 8 epochs whatever the size, SGD, patch 0.1, head 0.05
OLD="trainer.min_steps=0 optim.patch_lr=0.1 optim.head_lr=0.05"

stage() {
  case $1 in
  pretrain) [ -f $W ] || $PY train.py experiment=pretrain_fmnist_a hydra.run.dir=$OUT/pretrain >$OUT/pretrain.log 2>&1 ;;
  # 1,000 images: optimizer and rate, one seed
  s1_sgd) run s1_sgd task.train_size=1000 $NEW optim=sgd optim.lr=0.03,0.1,0.3 patch=logits,bias,bn,dw,bn+dw,full ;;
  s1_adam) run s1_adam task.train_size=1000 $NEW optim=adam optim.lr=0.001,0.01 patch=logits,bias,bn,bn+dw ;;
  s1_rmsprop) run s1_rmsprop task.train_size=1000 $NEW optim=rmsprop optim.lr=0.001 patch=bias,bn ;;
  s1_sgd_hi) run s1_sgd_hi task.train_size=1000 $NEW optim=sgd optim.lr=1.0 patch=logits,bias,bn ;;
  # 250 and 5,000 images: the rates that led at 1,000, one seed
  s2_250_a) run s2_250_a task.train_size=250 $NEW optim=sgd optim.lr=0.3,1.0 patch=logits,bias,bn ;;
  s2_250_b) run s2_250_b task.train_size=250 $NEW optim=sgd optim.lr=0.1,0.3 patch=dw,bn+dw,full ;;
  s2_5000_a) run s2_5000_a task.train_size=5000 $NEW optim=sgd optim.lr=0.3 patch=logits,bias,bn ;;
  s2_5000_b) run s2_5000_b task.train_size=5000 $NEW optim=sgd optim.lr=0.1 patch=dw,bn+dw,full ;;
  # 0.3 diverged for bn at 5,000 images: 0.1 there, and 0.3 for bn+dw, and for bn after a warmup epoch
  s2_5000_c) run s2_5000_c task.train_size=5000 $NEW optim=sgd optim.lr=0.1 patch=bn,bias ;;
  s2_5000_d) run s2_5000_d task.train_size=5000 $NEW optim=sgd optim.lr=0.3 patch=bn+dw ;;
  s2_5000_e) run s2_5000_e task.train_size=5000 $NEW optim=sgd optim.lr=0.3 patch=bn optim.warmup_epochs=1 ;;
  s2_250_c) run s2_250_c task.train_size=250 $NEW optim=sgd optim.lr=0.1 patch=bn ;;
  # the new defaults (each kind's rates, trainer.min_steps=300), seeds 1 and 2: seed 0 is the sweeps' point
  seeds) run seeds task.train_size=250,1000,5000 seed=1,2 patch=logits,bias,bn,dw,bn+dw,full ;;
  # the step budget: half and twice the default floor (the default rates)
  s3_steps) run s3_steps task.train_size=250,1000 trainer.min_steps=150,600 patch=logits,bn ;;
  # where the defaults trailed the best swept rate by more than a point (one seed): that rate's seeds 1 and 2
  best_seeds) run best_seeds task.train_size=250 seed=1,2 $NEW optim=sgd optim.lr=0.3 patch=bn,dw,bn+dw ;;
  # after a last batch under half a batch was left out (5,000 images: 8 left at batch 128): the default runs
  # that had collapsed or spread (seeds 1 and 2), and bn at 0.3, which had diverged
  fix_5000) run fix_5000 task.train_size=5000 seed=1,2 patch=bias,bn,dw ;;
  fix_5000_hi) run fix_5000_hi task.train_size=5000 $NEW optim=sgd optim.lr=0.3 patch=bn ;;
  # resnet18: the same source task, then bias and bn at 1,000 images at both rates (0.1 and 0.3)
  r18_pretrain)
    [ -f $R18 ] || $PY train.py experiment=pretrain_fmnist_a backbone=resnet18 hydra.run.dir=$OUT/r18_pretrain \
      >$OUT/r18_pretrain.log 2>&1
    ;;
  r18) SRC=$R18 run r18 backbone=resnet18 task.train_size=1000 $NEW optim=sgd optim.lr=0.1,0.3 patch=bias,bn ;;
  # the old defaults, three seeds (5,000 images: one)
  old) run old task.train_size=250,1000 seed=0,1,2 $OLD patch=logits,bias,bn,dw,bn+dw,full ;;
  old_5000) run old_5000 task.train_size=5000 seed=0 $OLD patch=logits,bias,bn,dw,bn+dw,full ;;
  # Lightning's learning-rate finder instead of a rate (one seed)
  auto) run auto optim.lr=auto trainer.min_steps=300 task.train_size=250,1000 patch=logits,bias,bn ;;
  *) echo "unknown stage $1" >&2 && exit 2 ;;
  esac
}

STAGES=(pretrain s1_sgd s1_adam s1_rmsprop s1_sgd_hi s2_250_a s2_250_b s2_5000_a s2_5000_b s2_5000_c s2_5000_d
  s2_5000_e s2_250_c seeds s3_steps best_seeds fix_5000 fix_5000_hi old old_5000 auto r18_pretrain r18)
for s in "${@:-${STAGES[@]}}"; do stage "$s"; done
