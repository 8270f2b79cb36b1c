"""What a Lightning training epoch costs beyond the model's own compute (data, hooks, logging).

The model and data are built by the platform (``modelpatch.run.build`` on the composed
``conf/train.yaml``: ``patch=bn task=fmnist_b task.train_size=2048``, mobilenet_v2 1.0). In one
process, interleaved and repeated: (a) one epoch of ``Trainer.fit`` (no validation), (b) the same
number of forward/backward/optimizer steps in a plain loop over batches sliced beforehand, and
(c) one pass over the epoch's dataloader alone, with no model.

    .venv/bin/python bench/data_overhead.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from common import (
    CpuMonitor,
    add_common_args,
    apply_threads,
    check_device,
    finish,
    machine_info,
    md_table,
    median,
    section_header,
    trainer_overrides,
    wait_for_quiet,
)
from probes import EpochTimer

from modelpatch.config import compose_run_config
from modelpatch.run import build

TARGET = 0.10  # overhead <= 10% of the Lightning epoch
TRAIN_SIZE = 2048
TASK = "fmnist_b"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def platform_optimizer(model) -> torch.optim.Optimizer:
    """The optimizer ``PatchModule.configure_optimizers`` makes (conf/optim/sgd.yaml), minus the schedule."""
    o = model.optim
    groups = [
        {"params": [p for p in model.model.patches.parameters() if p.requires_grad], "lr": o.patch_lr or o.lr},
        {"params": [p for p in model.heads.parameters() if p.requires_grad], "lr": o.head_lr or o.lr},
    ]
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0)


def pure_epoch(model, optimizer, batches, device: str) -> float:
    """The model's own work for one epoch: forward, loss, backward, step, on ready batches."""
    model.to(device).train()  # Lightning's teardown may have moved it back to the CPU
    sync(device)
    start = time.perf_counter()
    for images, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images, TASK), labels)
        loss.backward()
        optimizer.step()
    sync(device)
    return time.perf_counter() - start


def data_epoch(datamodule) -> tuple[float, int]:
    """One pass over the training dataloader Lightning gets (``TaskDataModule.train_dataloader``), no model."""
    loader = datamodule.train_dataloader()
    start = time.perf_counter()
    n = 0
    for batch in loader:
        item = batch[0] if isinstance(batch, tuple) else batch
        n += len(item[TASK][1])
    return time.perf_counter() - start, n


def lightning_epoch(cfg, model, datamodule) -> tuple[float, float, int]:
    timer = EpochTimer()
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=[timer], logger=False, enable_checkpointing=False
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    return timer.epochs[0], time.perf_counter() - start, timer.steps[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    parser.add_argument("--train-size", type=int, default=TRAIN_SIZE)
    args = parser.parse_args()
    device = check_device(args.device)
    apply_threads(args)
    rounds = args.rounds or (1 if args.quick else 3)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    info = machine_info(device)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        overrides = [
            "backbone=mobilenet_v2",
            "backbone.width=1.0",
            "patch=bn",
            f"task={TASK}",
            f"task.train_size={args.train_size}",
            f"data.root={work / 'data'}",
            "trainer.max_epochs=1",
            "trainer.limit_val_batches=0",
            *trainer_overrides(device),
        ]
        cfg = compose_run_config(overrides, work / "run", work / "data")
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule, model = build(cfg)
        model.to(device)
        split = datamodule.data[TASK].train
        bs = cfg.data.batch_size
        order = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(0))
        batches = [
            (split.images[idx].to(device), split.labels[idx].to(device)) for idx in order.split(bs)
        ]  # sliced (and moved) before any timing
        optimizer = platform_optimizer(model)
        pure_epoch(model, optimizer, batches[:1], device)  # warm-up step
        load_note = wait_for_quiet(max_wait=args.max_wait)
        print(f"[data_overhead] {load_note}", file=sys.stderr)
        lit, fits, pure, data = [], [], [], []
        with CpuMonitor() as monitor:
            for r in range(rounds):
                pair = ("lightning", "pure") if r % 2 == 0 else ("pure", "lightning")
                for what in pair:
                    if what == "lightning":
                        epoch_s, fit_s, steps = lightning_epoch(cfg, model, datamodule)
                        lit.append(epoch_s)
                        fits.append(fit_s)
                    else:
                        pure.append(pure_epoch(model, optimizer, batches, device))
                data.append(data_epoch(datamodule)[0])
                print(
                    f"[data_overhead] round {r + 1}/{rounds}: lightning epoch {lit[-1]:.2f}s (fit {fits[-1]:.2f}s), "
                    f"pure {pure[-1]:.2f}s, dataloader alone {1000 * data[-1]:.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    epoch, compute, loader = median(lit), median(pure), median(data)
    overhead = (epoch - compute) / epoch
    n = len(split.labels)
    rows = [
        ["Lightning epoch (`Trainer.fit`, 1 epoch, no validation)", f"{epoch:.2f}", f"{n / epoch:,.0f}", "100.0%"],
        ["pure model compute (same steps, batches sliced beforehand)", f"{compute:.2f}", f"{n / compute:,.0f}",
         f"{100 * compute / epoch:.1f}%"],
        ["overhead (epoch - compute)", f"{epoch - compute:.2f}", "", f"{100 * overhead:.1f}%"],
        ["of which: dataloader pass alone (no model)", f"{loader:.3f}", f"{n / loader:,.0f}",
         f"{100 * loader / epoch:.1f}%"],
        ["whole `Trainer.fit` call (setup + epoch + teardown)", f"{median(fits):.2f}", "", ""],
    ]  # fmt: skip
    tab = md_table(["what", "seconds (median)", "images/s", "share of epoch"], rows)
    intro = (
        f"`modelpatch.run.build` on the composed config `backbone=mobilenet_v2 patch=bn task={TASK} "
        f"task.train_size={args.train_size} trainer.max_epochs=1 trainer.limit_val_batches=0` (batch {bs}: "
        f"{steps} steps). {rounds} interleaved round(s) in one process, each: one `Trainer.fit` epoch (timed from "
        f"`on_train_epoch_start` to `on_train_epoch_end`: data loading, `training_step` with its metrics and "
        f"logging, optimizer and LR-scheduler steps, hooks), the same number of steps in a plain loop "
        f"(`zero_grad`, `model(images, task)`, cross-entropy, `backward`, SGD step with the platform's momentum "
        f"and Nesterov setting) over batches sliced from the in-memory split beforehand, and one pass over the "
        f"training dataloader alone. The same model object is trained throughout (its patch keeps learning)."
    )
    header = section_header("data-overhead", "Data and Lightning overhead of a training epoch", info, load_note,
                            monitor)  # fmt: skip
    content = "\n\n".join([header, intro, tab])
    target = (
        f"data + Lightning overhead <= {100 * TARGET:.0f}% of a `bn` epoch (mobilenet_v2, fmnist_b, {device})",
        f"{100 * overhead:.1f}% (dataloader alone {100 * loader / epoch:.1f}%)",
        overhead <= TARGET,
    )
    finish("data-overhead", content, args, target)


if __name__ == "__main__":
    main()
