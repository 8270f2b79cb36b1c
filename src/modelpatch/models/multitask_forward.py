"""Mixed-task batches for serving: one backbone pass over a batch whose samples belong to different
tasks, each sample through its own task's patch."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from modelpatch.models.patches import PatchedBackbone, is_depthwise

# Samples per task from which one pass per task is as fast as the one-pass twin (bench/serving_crossover.py: on
# 2 CPU threads, mobilenet_v2 channels-last, the twin wins below, by up to 8x with many small groups).
BY_TASK_FROM = 64


def forward_mixed(model: PatchedBackbone, x: torch.Tensor, task_index: torch.Tensor, tasks: list[str]) -> torch.Tensor:
    """One pass over a batch whose samples belong to different tasks (inference only).

    Sample ``i`` uses the patch of ``tasks[task_index[i]]``. When the patch holds only
    BatchNorm and depthwise-convolution tensors (``bn``, ``dw``, statistics) and some task has fewer than
    ``BY_TASK_FROM`` samples, the batch is put in task order
    and a twin of the backbone runs in which each patched BatchNorm is a per-sample scale and shift (computed
    once per task, then gathered) and each patched depthwise convolution one convolution per task over that
    task's consecutive samples (views, in either memory layout). Otherwise (every task's group that large, where
    per-task passes are as fast, or a patch such as ``full``) the samples are grouped
    by task and run one pass per task: no patched tensor is copied, so memory grows with the
    number of tasks K, not with the batch (a per-sample copy of ``full`` on MobileNetV2 is 2.3 GB
    at batch 256).
    """
    if model.training:
        raise RuntimeError("mixed-task batches are for inference: call .eval() first")
    model.freeze_norm_layers()
    per_task = [model.patches[t].tensors() for t in tasks]
    if not per_task[0]:
        return model.backbone(x)
    twin = mixed_twin(model)
    counts = torch.bincount(task_index, minlength=len(tasks))
    groups = counts[counts > 0]
    if twin is None or (len(groups) and int(groups.min()) >= BY_TASK_FROM):
        return forward_by_task(model, x, task_index, tasks)
    stacked = {name: torch.stack([p[name] for p in per_task]) for name in per_task[0]}
    order = torch.argsort(task_index, stable=True)
    in_order = task_index.index_select(0, order)
    x = _keep_layout(x.index_select(0, order), x)
    feats = functional_call(twin, _twin_tensors(twin, stacked, in_order, counts), (x,), strict=False)
    return feats.index_select(0, torch.argsort(order))  # back in batch order


def _keep_layout(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``part`` (rows of ``like``) in ``like``'s memory layout (``index_select`` returns NCHW)."""
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
        return part.contiguous(memory_format=torch.channels_last)
    return part


def forward_by_task(
    model: PatchedBackbone, x: torch.Tensor, task_index: torch.Tensor, tasks: list[str]
) -> torch.Tensor:
    """Features of a mixed-task batch, one pass per task over that task's samples, put back in batch order."""
    out = None
    for k, task in enumerate(tasks):
        rows = (task_index == k).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        feats = model(_keep_layout(x.index_select(0, rows), x), task)
        if out is None:
            out = feats.new_empty((len(x), *feats.shape[1:]))
        out.index_copy_(0, rows, feats)
    return out


def mixed_twin(model: PatchedBackbone) -> nn.Module | None:
    """The backbone with its patched layers replaced by per-sample ones, or ``None`` if the patch
    holds tensors of layers that have no per-sample version (built once; shares all else)."""
    if "_twin" not in model.__dict__:  # PatchedBackbone._apply drops it
        modules = dict(model.backbone.named_modules())
        owners = {name.rpartition(".")[0] for name in (*model.patch.params, *model.patch.buffers)}
        fits = all(_mixable(modules[owner]) for owner in owners)
        # in a list: the twin is not a submodule (no state dict entries, no .to() of its own)
        model.__dict__["_twin"] = [_twin_of(model.backbone, owners) if fits else None]
    return model.__dict__["_twin"][0]


def _mixable(module: nn.Module) -> bool:
    """Layers that have a per-sample version for ``forward_mixed``."""
    if isinstance(module, nn.BatchNorm2d):
        return module.running_mean is not None  # eval mode uses running statistics
    return is_depthwise(module) and module.padding_mode == "zeros"


def _twin_of(module: nn.Module, owners: set[str], prefix: str = "") -> nn.Module:
    """A copy of the module tree in which the layers named in ``owners`` are per-sample versions;
    subtrees without one are the original modules, shared."""
    if prefix in owners:
        return MixedBatchNorm(module) if isinstance(module, nn.BatchNorm2d) else MixedDepthwiseConv(module)
    children = {name: _twin_of(child, owners, f"{prefix}.{name}" if prefix else name)
                for name, child in module.named_children()}  # fmt: skip
    if all(children[name] is child for name, child in module.named_children()):
        return module
    twin = copy.copy(module)
    twin.__dict__.update(
        _modules=children, _parameters=dict(module._parameters), _buffers=dict(module._buffers)
    )  # own dicts: functional_call swaps tensors in the twin's, never in the original's
    return twin


def _twin_tensors(
    twin: nn.Module, stacked: dict[str, torch.Tensor], task_index: torch.Tensor, counts: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The tensors each per-sample layer of ``twin`` needs for this batch (samples in task order: ``counts``
    of each task), from each task's patch tensors (``stacked``: name -> ``[K, ...]``) and the shared ones it
    does not patch."""
    out = {}
    for owner, layer in twin.named_modules():
        if isinstance(layer, MixedBatchNorm):
            bn = layer.source[0]

            def get(attr: str, owner=owner, bn=bn) -> torch.Tensor | None:
                return stacked.get(f"{owner}.{attr}", getattr(bn, attr))

            scale = torch.rsqrt(get("running_var") + bn.eps)
            if bn.weight is not None:
                scale = get("weight") * scale
            shift = -get("running_mean") * scale
            if bn.bias is not None:
                shift = shift + get("bias")
            # [K, C] when a tensor of this layer is patched, [C] when all it uses here are shared
            out[f"{owner}.scale"], out[f"{owner}.shift"] = _gather(scale, task_index), _gather(shift, task_index)
        elif isinstance(layer, MixedDepthwiseConv):
            for attr in ("weight", "bias"):
                if f"{owner}.{attr}" in stacked:
                    out[f"{owner}.{attr}"] = stacked[f"{owner}.{attr}"]
            out[f"{owner}.counts"] = counts
    return out


def _gather(t: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
    """Rows of a per-task ``[K, C]`` tensor for each sample; a shared ``[C]`` one as it is."""
    return t.index_select(0, task_index) if t.dim() == 2 else t


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    """``[C]`` (shared) or ``[N, C]`` (per sample) -> broadcastable over ``[N, C, H, W]``."""
    return t.view(t.shape[0] if t.dim() == 2 else 1, -1, 1, 1)


class MixedBatchNorm(nn.Module):
    """Eval-mode ``BatchNorm2d`` as a per-sample ``x * scale + shift`` (``[N, C]`` each, one row per
    sample, supplied through ``functional_call``; ``_twin_tensors`` computes them)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.source = [bn]  # in a list: not a submodule
        self.register_buffer("scale", torch.empty(0), persistent=False)
        self.register_buffer("shift", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(_per_sample(self.shift), x, _per_sample(self.scale))


class MixedDepthwiseConv(nn.Module):
    """A depthwise ``Conv2d`` whose kernel ``[K, C, 1, kh, kw]`` and bias ``[K, C]`` may be per task, over a
    batch in task order (``counts`` samples of each): one convolution per task over its consecutive samples."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.source = [conv]  # in a list: not a submodule; its tensors are read at call time
        # supplied through functional_call when patched; None: the shared conv's own
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)
        self.register_buffer("counts", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.source[0]
        weight = conv.weight if self.weight is None else self.weight
        bias = conv.bias if self.bias is None else self.bias
        if weight.dim() == 4 and (bias is None or bias.dim() == 1):
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        parts = []
        for k, rows in enumerate(torch.split(x, self.counts.tolist())):
            if len(rows):
                w = weight[k] if weight.dim() == 5 else weight
                b = bias[k] if bias is not None and bias.dim() == 2 else bias
                parts.append(F.conv2d(rows, w, b, self.stride, self.padding, self.dilation, self.groups))
        return torch.cat(parts)
