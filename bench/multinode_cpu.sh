# 2 nodes x 1 device (two train.py processes given Lightning's cluster variables, gloo on the CPU) against
# 1 node x 2 devices, same seed, for task.mixing=per_device and all; docs/clusters.md's measured note.
# Run from the repository root: bash bench/multinode_cpu.sh
set -e
export OMP_NUM_THREADS=1 WANDB_MODE=offline
for MIX in per_device all; do
COMMON="task=multi task.tasks=[fmnist_b,digits] task.mixing=$MIX task.catalog.fmnist_b.train_size=1024 task.catalog.digits.train_size=1024 patch=bn patch.train_shared=true backbone.width=0.25 data.batch_size=32 trainer=ddp trainer.accelerator=cpu trainer.max_epochs=5 trainer.enable_progress_bar=false threads=1 seed=0"
for NODE in 0 1; do
  MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 WORLD_SIZE=2 NODE_RANK=$NODE LOCAL_RANK=0 \
    .venv/bin/python train.py $COMMON trainer.num_nodes=2 trainer.devices=1 hydra.run.dir=runs/multinode/$MIX-2nodes &
done
wait
.venv/bin/python train.py $COMMON trainer.num_nodes=1 trainer.devices=2 hydra.run.dir=runs/multinode/$MIX-1node
.venv/bin/python bench/compare_runs.py runs/multinode/$MIX-2nodes runs/multinode/$MIX-1node
done
