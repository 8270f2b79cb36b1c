"""The ``logits`` patch with cached backbone features against uncached: epoch time and accuracy.

Both runs are built by the platform itself (``modelpatch.run.build`` on the composed
``conf/train.yaml``: ``task=fmnist_b task.train_size=1000 patch=logits``, mobilenet_v2 1.0),
differing only in ``data.cache_features``, trained by a Lightning Trainer for a few epochs
(no validation, so an epoch is training only) and tested on the full test split.

    .venv/bin/python bench/feature_cache.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from common import (
    FASHION_MNIST,
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
from torch.nn.modules.batchnorm import _BatchNorm

from modelpatch.config import compose_run_config
from modelpatch.data.embedded import read_fashion_mnist, resize
from modelpatch.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from modelpatch.run import build
from modelpatch.training.weights import load_backbone

TARGET = 20.0  # cached epoch >= 20x faster than uncached
TRAIN_SIZE = 1000


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def calibrated_backbone(work: Path, images: int = 1024) -> Path:
    """A stand-in for a pretrained backbone, made in seconds and offline: random init with every
    BatchNorm's running statistics estimated on Fashion-MNIST images of classes 0-4 (not the
    task's classes). With the init statistics (mean 0, variance 1) a random mobilenet_v2 in eval
    mode outputs features of about 1e-10, and a head trained on them stays at chance."""
    x, y, _ = read_fashion_mnist(work / "data", True, {"system_dir": str(FASHION_MNIST)})
    x = resize(x[y < 5][:images], 32).float().div(255).expand(-1, 3, -1, -1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.manual_seed(0)
    backbone = load_backbone("mobilenet_v2")
    for m in backbone.modules():
        if isinstance(m, _BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all batches
    backbone.train()
    with torch.no_grad():
        for chunk in x.split(256):
            backbone(chunk)
    path = work / "mobilenet_v2-bn-calibrated.pt"
    torch.save(backbone.state_dict(), path)
    return path


def one_run(cache: bool, epochs: int, device: str, work: Path, weights: Path) -> dict:
    overrides = [
        "backbone=mobilenet_v2",
        "backbone.width=1.0",
        f"backbone.weights={weights}",
        "patch=logits",
        "task=fmnist_b",
        f"task.train_size={TRAIN_SIZE}",
        f"data.cache_features={str(cache).lower()}",
        f"data.root={work / 'data'}",
        f"trainer.max_epochs={epochs}",
        "trainer.limit_val_batches=0",
        *trainer_overrides(device),
    ]
    cfg = compose_run_config(overrides, work / f"run-cache-{cache}", work / "data")
    capture = _Capture()
    logger = logging.getLogger("modelpatch")
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    try:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        start = time.perf_counter()
        datamodule, model = build(cfg)
        build_s = time.perf_counter() - start
    finally:
        logger.removeHandler(capture)
    cached_msg = next((m for m in capture.messages if "features cached" in m), None)
    caching_s = float(re.search(r"\(([\d.]+)s\)", cached_msg).group(1)) if cached_msg else None
    if cache != datamodule.features_cached:
        raise RuntimeError(f"data.cache_features={cache} but features_cached={datamodule.features_cached}")
    timer = EpochTimer()
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=[timer], logger=False, enable_checkpointing=False
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    test_s = time.perf_counter() - start
    return {
        "cache": cache,
        "epochs": timer.epochs,
        "steps": timer.steps,
        "build_s": build_s,
        "caching_s": caching_s,
        "fit_s": fit_s,
        "test_s": test_s,
        "test_acc": metrics["test/acc"],
        "train_samples": len(datamodule.data["fmnist_b"].train.labels),
        "cached_images": sum(len(s.labels) for d in datamodule.data.values() for s in (d.train, d.val, d.test)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 4; --quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="cached/uncached pairs, ABBA order (default 2)")
    args = parser.parse_args()
    device = check_device(args.device)
    apply_threads(args)
    epochs = args.epochs or (2 if args.quick else 4)
    repeats = args.repeats or (1 if args.quick else 2)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    info = machine_info(device)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        work = Path(tmp)
        weights = calibrated_backbone(work)  # also extracts Fashion-MNIST, outside every timing
        load_note = wait_for_quiet(max_wait=args.max_wait)
        print(f"[feature_cache] {load_note}", file=sys.stderr)
        with CpuMonitor() as monitor:
            for r in range(repeats):
                for cache in (True, False) if r % 2 == 0 else (False, True):
                    run = one_run(cache, epochs, device, work, weights)
                    runs.append(run)
                    print(
                        f"[feature_cache] cache={cache}: epochs {[round(e, 3) for e in run['epochs']]} s, "
                        f"caching {run['caching_s']} s, test acc {run['test_acc']:.4f}",
                        file=sys.stderr,
                        flush=True,
                    )
    by = {c: [r for r in runs if r["cache"] is c] for c in (True, False)}
    epoch = {c: median(e for r in by[c] for e in r["epochs"]) for c in by}
    acc = {c: median(r["test_acc"] for r in by[c]) for c in by}
    speedup = epoch[False] / epoch[True]
    caching = median(r["caching_s"] for r in by[True])
    steps = by[True][0]["steps"][0]
    rows = []
    for c, label in ((False, "uncached (`data.cache_features=false`)"), (True, "cached (`data.cache_features=true`)")):
        rows.append(
            [
                label,
                f"{1000 * epoch[c]:,.1f}",
                f"{1000 * min(e for r in by[c] for e in r['epochs']):,.1f}",
                f"{speedup:.1f}x" if c else "1.0x",
                f"{TRAIN_SIZE / epoch[c]:,.0f}",
                f"{caching:.1f} s" if c else "-",
                f"{median(r['build_s'] for r in by[c]):.1f} s",
                f"{median(r['test_s'] for r in by[c]):.2f} s",
                " / ".join(f"{r['test_acc']:.4f}" for r in by[c]),
            ]
        )
    tab = md_table(
        [
            "run",
            "epoch ms (median)",
            "epoch ms (min)",
            "speed-up",
            "train images/s",
            "one-time caching",
            "build (incl. caching)",
            "test",
            "test acc (each run)",
        ],
        rows,
    )
    acc_diff = abs(acc[True] - acc[False])
    n_test = 5000
    intro = (
        f"`modelpatch.run.build` on the composed config `backbone=mobilenet_v2 backbone.weights=<file> "
        f"patch=logits task=fmnist_b "
        f"task.train_size={TRAIN_SIZE} trainer.limit_val_batches=0` (batch 128: {steps} steps per epoch), with "
        f"`data.cache_features=true` or `false`; Lightning `Trainer.fit` for {epochs} epochs, then "
        f"`Trainer.test` on the {n_test:,} test images. {repeats} pair(s) of runs in one process (order "
        f"cached, uncached{', uncached, cached' if repeats > 1 else ''}), same seed. Epoch time = "
        f"`on_train_epoch_start` to `on_train_epoch_end` (median over all epochs of all runs); the one-time "
        f"caching (features of all {by[True][0]['cached_images']:,} train + val + test images, computed once "
        f"inside `build`, as logged by it) is reported apart and is not in the epoch time. The backbone "
        f"file is a stand-in for a pretrained one, made offline in seconds: random init with every BatchNorm's "
        f"running statistics estimated on 1,024 Fashion-MNIST images of classes 0-4 (with the init statistics, "
        f"a random mobilenet_v2 in eval mode outputs features of ~1e-10 and every head stays at chance)."
    )
    notes = (
        f"Test accuracy, cached vs uncached: {acc[True]:.4f} vs {acc[False]:.4f} (difference {acc_diff:.4f}; "
        f"one test image is {1 / n_test:.4f}). Caching pays for itself after "
        f"{caching / max(epoch[False] - epoch[True], 1e-9):.1f} epochs' worth of uncached training "
        f"(it also spares the backbone pass at every validation and test)."
    )
    header = section_header("feature-cache", "Feature caching for the `logits` patch", info, load_note, monitor)
    content = "\n\n".join([header, intro, tab, notes])
    target = (
        f"cached `logits` epoch >= {TARGET:.0f}x faster than uncached (test acc equal)",
        f"{speedup:.0f}x; test acc {acc[True]:.4f} vs {acc[False]:.4f}",
        speedup >= TARGET and acc_diff <= 5 / n_test,
    )
    finish("feature-cache", content, args, target)


if __name__ == "__main__":
    main()
