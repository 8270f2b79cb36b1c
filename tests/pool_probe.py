"""A Hydra app on the project's config that records what a pool job was given, instead of training.

python tests/pool_probe.py -m hydra/launcher=pool seed=0,1,2 +probe.sleep=1 +probe.fail_seed=1: each job
writes ``started.json`` into its output folder (its CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS, pid and start
time), waits until ``probe.started`` jobs of the sweep have started (a barrier: jobs the pool runs at once
overlap however slow the machine), sleeps, writes ``probe.json`` (the same and its end time); the job whose
seed is ``probe.fail_seed`` then raises.
"""

import json
import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    record = {
        "seed": cfg.seed,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "pid": os.getpid(),
        "start": time.time(),
    }
    out = Path(cfg.paths.output_dir)
    (out / "started.json").write_text(json.dumps(record))
    probe = cfg.get("probe", {})
    deadline = time.monotonic() + 300
    while len(list(out.parent.glob("*/started.json"))) < int(probe.get("started", 0)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {probe.started} jobs started in 300 s: the pool runs fewer at once")
        time.sleep(0.05)
    time.sleep(float(probe.get("sleep", 1.0)))
    (out / "probe.json").write_text(json.dumps({**record, "end": time.time()}))
    if cfg.seed == probe.get("fail_seed"):
        raise RuntimeError(f"probe job with seed {cfg.seed} fails on purpose")
    return float(cfg.seed)


if __name__ == "__main__":
    main()
