"""Model patches: named selections of a backbone's parameters, one private copy per task.

A patch kind is a selector, a function from a module to the names of the parameters it selects.
Kinds compose with ``+`` (``bn+dw`` is the union). ``PatchedBackbone`` keeps the backbone shared
and frozen, gives every task its own copy of the selected parameters (and of the normalization
statistics, when tasks own them), and runs the backbone with the active task's copy swapped in.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from modelpatch.memory import use_memory_savers

NORM_LAYERS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)
NORM_STATS = ("task", "frozen")


class PatchError(ValueError):
    """A patch is unknown, selects nothing, or does not fit the model."""


def select_logits(model: nn.Module) -> list[str]:
    """Nothing in the backbone: only the task head trains (it is always part of a patch)."""
    return []


def select_bn(model: nn.Module) -> list[str]:
    """Scale and bias of every normalization layer (BatchNorm, GroupNorm, LayerNorm)."""
    return _params_of(model, lambda m: isinstance(m, NORM_LAYERS))


def select_dw(model: nn.Module) -> list[str]:
    """Kernels (and biases) of depthwise convolutions: one filter group per input channel."""
    return _params_of(model, is_depthwise)


def select_bias(model: nn.Module) -> list[str]:
    """Every bias in the model (the BitFit / TinyTL-bias baseline)."""
    return [name for name, _ in model.named_parameters() if name.rpartition(".")[2] == "bias"]


def select_full(model: nn.Module) -> list[str]:
    """Every parameter: full fine-tuning, the baseline a patch tries to match."""
    return [name for name, _ in model.named_parameters()]


SELECTORS: dict[str, Callable[[nn.Module], list[str]]] = {
    "logits": select_logits,
    "bn": select_bn,
    "dw": select_dw,
    "bias": select_bias,
    "full": select_full,
}

WHY_EMPTY = {
    "bn": "it has no normalization layers with affine parameters",
    "dw": "it has no depthwise convolutions",
    "bias": "none of its layers has a bias",
    "full": "it has no parameters",
}


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def _params_of(model: nn.Module, keep: Callable[[nn.Module], bool]) -> list[str]:
    return [
        f"{mod_name}.{p_name}" if mod_name else p_name
        for mod_name, module in model.named_modules()
        if keep(module)
        for p_name, _ in module.named_parameters(recurse=False)
    ]


def list_kinds() -> list[str]:
    return sorted(SELECTORS)


def parse_kind(kind: str) -> tuple[str, ...]:
    """Split ``"bn+dw"`` into its parts, checking each is a known kind."""
    parts = tuple(p.strip() for p in str(kind).split("+"))
    unknown = [p for p in parts if p not in SELECTORS]
    if not parts or unknown:
        raise PatchError(
            f"unknown patch kind {', '.join(map(repr, unknown)) or repr(kind)} in {kind!r}; "
            f"kinds: {', '.join(list_kinds())}, combined with '+' (e.g. bn+dw)"
        )
    if len(set(parts)) != len(parts):
        raise PatchError(f"patch {kind!r} names a kind twice")
    return parts


def norm_stat_buffers(model: nn.Module) -> list[str]:
    """Running statistics of every BatchNorm layer (what a task owns when it re-estimates them)."""
    return [
        f"{mod_name}.{b_name}"
        for mod_name, module in model.named_modules()
        if isinstance(module, _BatchNorm)
        for b_name, buf in module.named_buffers(recurse=False)
        if buf is not None
    ]


@dataclass(frozen=True)
class Patch:
    """The resolved patch: which backbone parameters and buffers every task owns a copy of."""

    kind: str
    params: tuple[str, ...]
    buffers: tuple[str, ...]
    norm_stats: str


def resolve_patch(model: nn.Module, kind: str, *, norm_stats: str = "task", model_name: str = "") -> Patch:
    """Resolve ``kind`` on ``model`` and check it, without touching the model.

    Args:
        model: the backbone.
        kind: a kind or ``+``-combination of kinds.
        norm_stats: ``"task"`` (each task re-estimates and owns BatchNorm statistics) or
            ``"frozen"`` (statistics stay as loaded; normalization layers stay in eval mode).
        model_name: used in error messages.

    Raises:
        PatchError: unknown kind, bad ``norm_stats``, or a part that selects nothing.
    """
    parts = parse_kind(kind)
    if norm_stats not in NORM_STATS:
        raise PatchError(f"norm_stats must be one of {', '.join(NORM_STATS)}, got {norm_stats!r}")
    selected: dict[str, None] = {}
    for part in parts:
        names = SELECTORS[part](model)
        if part != "logits" and not names:
            working = [k for k in list_kinds() if k == "logits" or SELECTORS[k](model)]
            raise PatchError(
                f"patch {part!r} selects nothing on {model_name or type(model).__name__}: "
                f"{WHY_EMPTY[part]}; kinds that select something here: {', '.join(working)}"
            )
        selected.update(dict.fromkeys(names))
    order = [name for name, _ in model.named_parameters()]
    params = tuple(name for name in order if name in selected)
    buffers = tuple(norm_stat_buffers(model)) if norm_stats == "task" else ()
    return Patch("+".join(parts), params, buffers, norm_stats)


def mangle(name: str) -> str:
    """Parameter names with dots cannot be registered; ``__`` never occurs in torchvision names."""
    return name.replace(".", "__")


def unmangle(name: str) -> str:
    return name.replace("__", ".")


class TaskPatch(nn.Module):
    """One task's copy of the patched parameters and owned buffers, initialized from the model."""

    def __init__(self, model: nn.Module, patch: Patch):
        super().__init__()
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for name in patch.params:
            self.register_parameter(mangle(name), nn.Parameter(params[name].detach().clone()))
        for name in patch.buffers:
            self.register_buffer(mangle(name), buffers[name].detach().clone())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Backbone name -> this task's tensor, for ``functional_call``."""
        out = {unmangle(n): p for n, p in self.named_parameters(recurse=False)}
        out.update({unmangle(n): b for n, b in self.named_buffers(recurse=False)})
        return out


class PatchedBackbone(nn.Module):
    """A shared backbone plus one ``TaskPatch`` per task.

    Args:
        backbone: the shared model; its own parameters stay untouched unless ``train_shared``.
        patch: from ``resolve_patch`` on this backbone.
        tasks: task names; each gets a patch initialized from the backbone's current values.
        train_shared: also train the parameters no patch selects (joint multi-task training).
        lean_backward: keep for backward only what the trained parameters' gradients read
            (``memory.use_memory_savers``; the same gradients).
    """

    def __init__(
        self,
        backbone: nn.Module,
        patch: Patch,
        tasks: Iterable[str],
        *,
        train_shared: bool = False,
        lean_backward: bool = True,
    ):
        super().__init__()
        if lean_backward:
            use_memory_savers(backbone)
        self.backbone = backbone
        self.patch = patch
        self.train_shared = train_shared
        self.patches = nn.ModuleDict()
        patched = set(patch.params)
        for name, param in backbone.named_parameters():
            param.requires_grad_(train_shared and name not in patched)
        # Nothing of the backbone trains and its statistics are fixed: it is a fixed function, kept
        # in eval mode whole (dropout and stochastic depth off too), so its features can be cached.
        self.fixed_backbone = not patch.params and patch.norm_stats == "frozen" and not train_shared
        self._norm_layers = [m for m in backbone.modules() if self.fixed_backbone or isinstance(m, _BatchNorm)]
        for task in tasks:
            self.add_task(task)
        self._freeze_norm_layers()

    def add_task(self, task: str) -> TaskPatch:
        """Give ``task`` its own patch, copied from the shared backbone."""
        if task in self.patches:
            raise PatchError(f"task {task!r} already has a patch")
        self.patches[task] = TaskPatch(self.backbone, self.patch)
        return self.patches[task]

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        self._freeze_norm_layers()
        return functional_call(self.backbone, self.patches[task].tensors(), (x,), strict=False)

    def forward_mixed(self, x: torch.Tensor, task_index: torch.Tensor, tasks: list[str]) -> torch.Tensor:
        """One pass over a batch whose samples belong to different tasks (inference only).

        Sample ``i`` uses the patch of ``tasks[task_index[i]]``. When the patch holds only
        BatchNorm and depthwise-convolution tensors (``bn``, ``dw``, statistics), a twin of the
        backbone runs in which each patched BatchNorm is a per-sample scale and shift (computed
        once per task, then gathered) and each patched depthwise convolution one grouped
        convolution over all samples' channels. Any other patch runs the backbone vectorized over
        samples (``torch.func.vmap``), several times slower.
        """
        if self.training:
            raise RuntimeError("mixed-task batches are for inference: call .eval() first")
        self._freeze_norm_layers()
        per_task = [self.patches[t].tensors() for t in tasks]
        if not per_task[0]:
            return self.backbone(x)
        stacked = {name: torch.stack([p[name] for p in per_task]) for name in per_task[0]}
        twin = self._mixed_twin()
        if twin is not None:
            return functional_call(twin, _twin_tensors(twin, stacked, task_index), (x,), strict=False)

        def one(tensors: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
            return functional_call(self.backbone, tensors, (sample.unsqueeze(0),), strict=False).squeeze(0)

        return vmap(one)({name: t.index_select(0, task_index) for name, t in stacked.items()}, x)

    def _mixed_twin(self) -> nn.Module | None:
        """The backbone with its patched layers replaced by per-sample ones, or ``None`` if the patch
        holds tensors of layers that have no per-sample version (built once; shares all else)."""
        if "_twin" not in self.__dict__:
            modules = dict(self.backbone.named_modules())
            owners = {name.rpartition(".")[0] for name in (*self.patch.params, *self.patch.buffers)}
            fits = all(_mixable(modules[owner]) for owner in owners)
            # in a list: the twin is not a submodule (no state dict entries, no .to() of its own)
            self._twin = [_twin_of(self.backbone, owners) if fits else None]
        return self._twin[0]

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_twin", None)  # .to(), .half(), ... make new buffers: the twin must see them
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> PatchedBackbone:
        super().train(mode)
        self._freeze_norm_layers()
        return self

    def _freeze_norm_layers(self) -> None:
        # Also checked on every forward: trainers may restore saved `.training` flags directly.
        if self.patch.norm_stats == "frozen" or self.fixed_backbone:
            for module in self._norm_layers:
                module.training = False

    def shared_parameters(self) -> list[nn.Parameter]:
        """Backbone parameters used by every task as they are (not shadowed by a patch)."""
        patched = set(self.patch.params)
        return [p for n, p in self.backbone.named_parameters() if n not in patched]


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
    twin: nn.Module, stacked: dict[str, torch.Tensor], task_index: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The tensors each per-sample layer of ``twin`` needs for this batch, from each task's patch
    tensors (``stacked``: name -> ``[K, ...]``) and the shared ones it does not patch."""
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
                    out[f"{owner}.{attr}"] = stacked[f"{owner}.{attr}"].index_select(0, task_index)
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
    """A depthwise ``Conv2d`` whose kernel ``[N, C, 1, kh, kw]`` and bias ``[N, C]`` may be per sample:
    one grouped convolution over the channels of all samples."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.source = [conv]  # in a list: not a submodule; its tensors are read at call time
        # supplied through functional_call when patched; None: the shared conv's own
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.source[0]
        weight = conv.weight if self.weight is None else self.weight
        bias = conv.bias if self.bias is None else self.bias
        if weight.dim() == 5:
            n, c, h, w = x.shape
            out = F.conv2d(
                x.reshape(1, n * c, h, w), weight.flatten(0, 1), None, self.stride, self.padding,
                self.dilation, n * self.groups,
            )  # fmt: skip
            out = out.view(n, -1, *out.shape[2:])
        else:
            out = F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)
        return out if bias is None else out + _per_sample(bias)
