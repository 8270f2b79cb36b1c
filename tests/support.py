"""What the tests share besides fixtures (those are in conftest.py): paths, the tiny run, ``train.py`` as a
subprocess, tolerances that scale with the tensors compared, child processes with default signal handling."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torchvision
import yaml
from omegaconf import DictConfig

from modelpatch.config import compose_run_config
from modelpatch.models.patches import resolve_patch
from modelpatch.training.module import PatchModule, TaskInfo
from modelpatch.training.weights import load_backbone

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
START_CLUSTER = "start the local cluster (as root): bash scripts/slurm-local.sh"

# A tiny, fast run: mobilenet_v2 at width 0.25, 32x32 inputs, a few batches on the CPU.
TINY = [
    "backbone.width=0.25",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.max_epochs=1",
    "trainer.min_steps=0",
    "++trainer.limit_train_batches=3",
    "++trainer.limit_val_batches=2",
    "++trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "data.num_workers=0",
    "logger=none",
    "extras.print_config=false",
]
# The same through the command line, with the csv logger, on 200 digits.
CLI_TINY = [o for o in TINY if not o.startswith("logger=")] + ["task=digits", "task.train_size=200"]
DIGITS = ["task=digits", "task.train_size=200"]
SMALL_MIX = [
    "task=multi",
    "task.catalog.fmnist_a.train_size=64",
    "task.catalog.fmnist_b.train_size=64",
    "task.catalog.digits.train_size=64",
    "task.catalog.fmnist_a.val_size=64",
    "task.catalog.fmnist_b.val_size=64",
]


def compose_cfg(overrides: list[str], tmp_path: Path, data_dir: Path) -> DictConfig:
    """Compose conf/train.yaml as train.py would, shrunk by TINY, with outputs under ``tmp_path``."""
    return compose_run_config([*TINY, *overrides], tmp_path, data_dir, config_dir=CONF)


def default_signals() -> None:
    """``preexec_fn`` of a child the test signals: SIGINT and SIGTERM as a terminal gives them. A suite started
    in the background (``make test &``, ``nohup``, many CI runners) inherits SIGINT ignored, and so would the
    child, which then never sees the Ctrl-C a test sends it."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def popen(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` of a child with the default signal dispositions (:func:`default_signals`)."""
    return subprocess.Popen(cmd, preexec_fn=default_signals, **kwargs)


def train_py(*args: str, cwd: Path = ROOT, timeout: int = 600, **kwargs: Any) -> subprocess.CompletedProcess:
    """``python train.py <args>`` in a subprocess, output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=default_signals,
        **kwargs,
    )


def train_py_slurm(*args: str, timeout: int = 300, **kwargs: Any) -> subprocess.CompletedProcess:
    """``python train.py -m hydra/launcher=slurm <args>``: a multirun submitted to the local cluster."""
    return train_py("-m", "hydra/launcher=slurm", *args, timeout=timeout, **kwargs)


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, msg: str = "", scale: float | None = None
) -> None:
    """Equal up to ``rtol`` of the scale of what is compared, element by element: ``scale`` (the largest
    magnitude among all the tensors compared, e.g. every gradient of a model: :func:`largest_magnitude`), else
    the larger of the two tensors' largest magnitudes.

    Two sums of the same terms in another order (ranks reducing, other thread counts) differ by rounding
    proportional to the terms, not to the result: a near-zero element of a gradient can differ by 100% of
    itself, and a gradient that is zero but for rounding (a bias before another normalization) is all noise.
    An absolute tolerance tuned on one machine fails on another; one scaled by the tensors compared does not.
    """
    if scale is None:
        scale = max(largest_magnitude({"a": actual, "e": expected}), torch.finfo(expected.dtype).tiny)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=msg or None)


def largest_magnitude(tensors: dict[str, torch.Tensor]) -> float:
    """The largest absolute value among ``tensors`` (the scale of a set of gradients or statistics)."""
    return max(t.detach().abs().max().item() for t in tensors.values() if t.numel())


# A W&B sweep file the sweep tests run: bayes over the patch learning rate and two patch kinds.
BAYES = {
    "program": "train.py",
    "name": "tiny-bayes",
    "method": "bayes",
    "metric": {"name": "val/acc", "goal": "maximize"},
    "parameters": {
        "optim.patch_lr": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.5},
        "patch": {"values": ["logits", "bn"]},
    },
}


def write_sweep(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def reference_state_dict(name: str) -> dict[str, torch.Tensor]:
    """A state dict shaped like torchvision's pretrained file for ``name``."""
    if name == "ssdlite_mobilenet_v3":
        from torchvision.models.detection import ssdlite320_mobilenet_v3_large

        return ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).state_dict()
    if name == "inception_v3":
        return torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    return torchvision.models.get_model(name, weights=None).state_dict()


def tiny_model(
    kind: str, tasks=(("a", 3), ("b", 5), ("c", 4)), norm_stats: str = "task", channels_last: bool = False
) -> PatchModule:
    torch.manual_seed(0)
    backbone = load_backbone("mobilenet_v2", width=0.25)
    with torch.no_grad():  # shared statistics and scales that differ per channel, as a trained model's
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 1.5), m.weight.uniform_(0.5, 1.5)
    heads = [TaskInfo(n, k, [str(i) for i in range(k)], spec={"name": n, "input_size": 32}) for n, k in tasks]
    patch = resolve_patch(backbone, kind, norm_stats=norm_stats)
    model = PatchModule(backbone, patch, heads, channels_last=channels_last)
    with torch.no_grad():  # make every task's patch and statistics differ
        for name in model.task_names:
            for p in model.model.patches[name].parameters():
                p.add_(0.2 * torch.randn_like(p))
            for b in model.model.patches[name].buffers():
                if b.is_floating_point():
                    b.mul_(1 + 0.3 * torch.rand_like(b))
    return model.eval()
