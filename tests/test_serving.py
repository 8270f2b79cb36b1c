"""Patch files and serving: export, eval.py in a fresh process, mixed-task batches, file safety."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import modelpatch.files.patch_files as serving
from modelpatch.files.patch_files import BASE_FILE, PatchFileError, check_fits, export_patches, read_patch_file
from modelpatch.files.patched_model import load_patched_model, storage_summary
from modelpatch.models import multitask_forward
from modelpatch.models.multitask_forward import forward_by_task as by_task_pass
from modelpatch.models.multitask_forward import mixed_twin
from modelpatch.run import train
from modelpatch.training.weights import load_backbone

from .support import ROOT, assert_close_scaled, tiny_model


@pytest.mark.slow
def test_train_export_then_eval_in_a_fresh_process_gives_the_same_accuracy(make_cfg, tmp_path, data_dir):
    train(make_cfg("task=digits", "task.train_size=200", "patch=bn+dw", "trainer.limit_test_batches=1.0"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    patch_file = tmp_path / "run" / "patches" / "digits.safetensors"
    assert results["patch_files"] == {"base": str(tmp_path / "run" / "patches" / BASE_FILE), "digits": str(patch_file)}
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"patches=[{patch_file}]", f"hydra.run.dir={out}",
         f"paths.data_dir={data_dir}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
         "extras.print_config=false", "data.eval_batch_size=37"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((out / "eval_results.json").read_text())["tasks"]["digits"]
    assert evaluated["test_acc"] == evaluated["trained_test_acc"] == results["tasks"]["digits"]["test_acc"]


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize(
    ("kind", "norm_stats", "by_task"),
    [
        ("bn", "task", False),
        ("bn+dw", "task", False),
        ("logits", "task", False),
        ("bias", "frozen", False),  # per-task BatchNorm bias, shared scale and statistics
        ("dw", "frozen", False),
        ("full", "task", True),
        ("bn+dw+bias", "task", False),
    ],
)
@pytest.mark.parametrize("group", ["small", "large"])
def test_mixed_task_batch_equals_per_task_passes(kind, norm_stats, by_task, channels_last, group, tmp_path,
                                                  monkeypatch):  # fmt: skip
    model = tiny_model(kind, norm_stats=norm_stats, channels_last=channels_last)
    # bn and dw tensors run in the per-sample twin of the backbone; others one pass per task
    assert (mixed_twin(model.model) is None) == by_task
    # 4 samples per task: under BY_TASK_FROM (64) the twin runs; from it (here 4), one pass per task
    if group == "large":
        monkeypatch.setattr(multitask_forward, "BY_TASK_FROM", 4)
    passes = []
    monkeypatch.setattr(multitask_forward, "forward_by_task", lambda *a: passes.append(1) or by_task_pass(*a))
    images = torch.randint(0, 256, (12, 1, 32, 32), dtype=torch.uint8)
    tasks = ["a", "b", "c", "b", "a", "c", "c", "b", "a", "a", "b", "c"]
    export_patches(model, tmp_path)
    served = load_patched_model(sorted(tmp_path.glob("[abc].safetensors")))
    assert served.channels_last is channels_last
    with torch.no_grad():
        mixed = served.forward_mixed(images, tasks)
        for i, task in enumerate(tasks):
            single = model(images[i : i + 1], task)[0]
            k = model.tasks[task].num_classes
            assert_close_scaled(mixed[i, :k], single, rtol=1e-4)
            assert torch.isinf(mixed[i, k:]).all()
        for task in "abc":  # the served model is the trained one, exactly
            assert torch.equal(served(images, task), model(images, task))
    assert bool(passes) == (by_task or group == "large")


class AllocatedBytes(TorchDispatchMode):
    """Sums the bytes of every tensor the ops under it create (views excluded)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            leaves = out if isinstance(out, (tuple, list)) else [out]
            self.total += sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
        return out


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_mixed_batch_of_a_full_patch_costs_what_one_pass_per_task_does(channels_last):
    # no copy of the patched tensors per sample: what the call allocates grows with K, not with the batch
    model = tiny_model("full", channels_last=channels_last)
    patch_bytes = sum(t.numel() * t.element_size() for t in model.model.patches["a"].tensors().values())
    gen = torch.Generator().manual_seed(0)
    for n in (12, 48):
        images = torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=gen)
        tasks = ["abc"[i % 3] for i in range(n)]
        with torch.no_grad():
            with AllocatedBytes() as mixed_bytes:
                mixed = model.forward_mixed(images, tasks)
            with AllocatedBytes() as split_bytes:
                split = {t: model(images[i::3], t) for i, t in enumerate("abc")}
        assert mixed_bytes.total < 1.5 * split_bytes.total + patch_bytes, (n, mixed_bytes.total, split_bytes.total)
        for i, t in enumerate("abc"):
            k = model.tasks[t].num_classes
            assert_close_scaled(mixed[i::3, :k], split[t], rtol=1e-5)


def test_patch_for_another_backbone_or_base_is_refused(tmp_path):
    model = tiny_model("bn")
    files = export_patches(model, tmp_path)
    pf = read_patch_file(files["a"])
    with pytest.raises(PatchFileError, match="backbone: patch file has mobilenet_v2, base has resnet18"):
        check_fits(load_backbone("resnet18"), pf)
    other = tmp_path / "other"
    export_patches(tiny_model("bn", tasks=(("z", 2),)), other)  # same architecture, new random base
    torch.manual_seed(1)
    serving.atomic_save(
        dict(load_backbone("mobilenet_v2", width=0.25).state_dict()),
        other / BASE_FILE,
        serving.base_metadata(load_backbone("mobilenet_v2", width=0.25)),
    )
    with pytest.raises(PatchFileError, match="fingerprint: patch file has"):
        load_patched_model([files["a"]], base=str(other / BASE_FILE))


def test_truncated_tampered_and_foreign_files_are_clear_errors(tmp_path):
    path = export_patches(tiny_model("bn"), tmp_path)["a"]
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PatchFileError, match="truncated or not a safetensors file"):
        read_patch_file(tmp_path / "cut.safetensors")
    tampered = bytearray(data)
    tampered[-3] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(tampered))
    with pytest.raises(PatchFileError, match="modified after it was written"):
        read_patch_file(tmp_path / "bad.safetensors")
    with pytest.raises(PatchFileError, match="not a modelpatch patch file"):
        read_patch_file(tmp_path / BASE_FILE)


def test_writes_are_atomic(tmp_path, monkeypatch):
    model = tiny_model("bn")
    path = export_patches(model, tmp_path)["a"]
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(serving, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_patches(model, tmp_path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", BASE_FILE, "c.safetensors"]


@pytest.mark.slow
def test_storage_summary_and_cli(tmp_path):
    model = tiny_model("bn")
    files = export_patches(model, tmp_path)
    summary = storage_summary(tmp_path)
    assert summary["tasks"] == 3 and summary["base_bytes"] == files["base"].stat().st_size
    assert summary["base_plus_patches_bytes"] < 0.5 * summary["separate_models_bytes"]
    out = tmp_path / "merged" / "a.safetensors"
    cli = [sys.executable, "-m", "modelpatch.serving"]
    proc = subprocess.run([*cli, "apply", str(files["a"]), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    merged = load_file(out)
    head = {k.removeprefix("head."): merged.pop(k) for k in list(merged) if k.startswith("head.")}
    standalone = load_backbone("mobilenet_v2", width=0.25).eval()
    standalone.load_state_dict(merged)
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(images, "a")
        got = torch.nn.functional.linear(standalone(model.prepare(images)), head["weight"], head["bias"])
    torch.testing.assert_close(got, expected)
    info = subprocess.run([*cli, "info", str(files["b"])], capture_output=True, text=True)
    assert json.loads(info.stdout)["task"] == "b"
    bad = subprocess.run([*cli, "info", str(tmp_path / "missing.safetensors")], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_mixed_batches_follow_the_model_to_another_dtype():
    model = tiny_model("bn+dw", norm_stats="frozen")  # shared statistics: the backbone's buffers
    images = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8)
    tasks = ["a", "b", "c", "c", "b", "a"]
    with torch.no_grad():
        model.forward_mixed(images, tasks)  # builds the twin in float32
        model.double()
        mixed = model.forward_mixed(images, tasks)
        assert mixed.dtype == torch.float64
        for i, task in enumerate(tasks):
            k = model.tasks[task].num_classes
            assert_close_scaled(mixed[i, :k], model(images[i : i + 1], task)[0], rtol=1e-9)


@pytest.mark.parametrize("channels_last", [False, True])
def test_served_model_runs_in_the_layout_it_was_trained_in(tmp_path, channels_last):
    model = tiny_model("bn")
    model.channels_last = channels_last  # as PatchModule(..., channels_last=...) records it
    export_patches(model, tmp_path)
    assert read_patch_file(tmp_path / "a.safetensors").meta["channels_last"] is channels_last
    files = sorted(tmp_path.glob("[abc].safetensors"))
    assert load_patched_model(files).channels_last is channels_last
    assert load_patched_model(files, channels_last=not channels_last).channels_last is not channels_last
