"""Training-memory savers: layers that keep less for backward than PyTorch's own, same gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _FrozenConv2d(torch.autograd.Function):
    """``conv2d`` whose weight gets no gradient: it saves only the weight, not the input (which only
    a weight gradient needs); the input gradient is computed from the weight alone."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, x.dtype, stride, padding, dilation, groups)
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, dtype, stride, padding, dilation, groups = ctx.conv
        # only the input's shape and layout are read; a real (uninitialized) buffer in the layout of
        # `grad` keeps oneDNN on its fast path, where an expanded 1-element tensor does not
        layout = torch.channels_last if _is_channels_last(grad) else torch.contiguous_format
        placeholder = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=layout)
        grad_input = torch.ops.aten.convolution_backward(
            grad, placeholder, weight.to(grad.dtype), None, stride, padding, dilation, False, [0], groups,
            (True, False, False),
        )[0]  # fmt: skip
        return grad_input.to(dtype), None, None, None, None, None  # .to: autocast ran the forward in bf16/fp16


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


class LeanConv2d(nn.Conv2d):
    """A ``Conv2d`` that, while its weight is frozen and its input needs a gradient, does not keep its
    input for backward: a third less activation memory for ``bn``/``bias`` patches on MobileNetV2, at
    a few percent of step time (docs/benchmarks.md). A trainable weight (``dw`` patch, ``full``,
    ``train_shared``) runs the plain convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lean = (
            torch.is_grad_enabled() and x.requires_grad and not self.weight.requires_grad
            and self.padding_mode == "zeros" and not isinstance(self.padding, str)
        )  # fmt: skip
        if not lean:
            return super().forward(x)
        out = _FrozenConv2d.apply(x, self.weight, self.stride, self.padding, self.dilation, self.groups)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


def use_lean_convs(model: nn.Module) -> None:
    """Make every plain ``Conv2d`` of ``model`` a ``LeanConv2d`` (same parameters and state dict)."""
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = LeanConv2d
