"""Model patches: named selections of a backbone's parameters, one private copy per task.

A patch kind is a selector, a function from a module to the names of the parameters it selects.
Kinds compose with ``+`` (``bn+dw`` is the union). ``PatchedBackbone`` keeps the backbone shared
and frozen, gives every task its own copy of the selected parameters (and of the normalization
statistics, when tasks own them), and runs the backbone with the active task's copy swapped in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from modelpatch.models.memory import use_memory_savers

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
            (``memory.use_memory_savers``; the same gradients): ``"auto"``, ``True`` or ``False``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        patch: Patch,
        tasks: Iterable[str],
        *,
        train_shared: bool = False,
        lean_backward: bool | str = "auto",
    ):
        super().__init__()
        use_memory_savers(backbone, lean_backward)
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
        self.freeze_norm_layers()

    def add_task(self, task: str) -> TaskPatch:
        """Give ``task`` its own patch, copied from the shared backbone."""
        if task in self.patches:
            raise PatchError(f"task {task!r} already has a patch")
        self.patches[task] = TaskPatch(self.backbone, self.patch)
        return self.patches[task]

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        self.freeze_norm_layers()
        return functional_call(self.backbone, self.patches[task].tensors(), (x,), strict=False)

    def _apply(self, fn, recurse: bool = True):
        # .to(), .half(), ... make new buffers: the mixed-batch twin (multitask_forward.py) must see them
        self.__dict__.pop("_twin", None)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> PatchedBackbone:
        super().train(mode)
        self.freeze_norm_layers()
        return self

    def freeze_norm_layers(self) -> None:
        # Also checked on every forward: trainers may restore saved `.training` flags directly.
        if self.patch.norm_stats == "frozen" or self.fixed_backbone:
            for module in self._norm_layers:
                module.training = False

    def shared_parameters(self) -> list[nn.Parameter]:
        """Backbone parameters used by every task as they are (not shadowed by a patch)."""
        patched = set(self.patch.params)
        return [p for n, p in self.backbone.named_parameters() if n not in patched]
