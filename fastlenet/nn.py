"""Drop-in torch.nn modules backed by the fused Triton kernels.

They subclass nn.Conv2d / nn.Linear and call their __init__, so constructor arguments,
initialisation, parameter names, state_dict and repr are PyTorch's own: a checkpoint of a plain
torch.nn model loads unchanged. They only add the activation (and pooling) that the kernel fuses.
"""
from __future__ import annotations

from torch import nn

from fastlenet import functional as F
from fastlenet.functional import ACTIVATIONS, MAX_KERNEL_SIZE, MAX_PADDING, POOLS

__all__ = ["ConvActPool2d", "LinearAct"]


def _square(name: str, value) -> int:
    if isinstance(value, tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"ConvActPool2d supports square {name}s only, got {value}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"ConvActPool2d: {name} must be an int, got {value!r}")
    return value


class ConvActPool2d(nn.Conv2d):
    """pool2x2(act(conv2d(x))) as one module: nn.Conv2d's parameters, stride 1, 2x2/2 pooling
    ("max" or "avg"), or act(conv2d(x)) with pool=None.

    Unsupported nn.Conv2d arguments (stride != 1, dilation != 1, groups != 1, padding_mode other
    than "zeros") raise at construction rather than computing something else.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, padding=0, bias: bool = True,
                 activation: str = "relu", pool: str = "max", *, stride=1, dilation=1, groups: int = 1,
                 padding_mode: str = "zeros", device=None, dtype=None):
        for name, value, default in (("stride", stride, 1), ("dilation", dilation, 1), ("groups", groups, 1),
                                     ("padding_mode", padding_mode, "zeros")):
            if value not in (default, (default, default)):
                raise ValueError(f"ConvActPool2d does not support {name}={value!r} (only {default!r}): "
                                 "the fused kernel computes stride-1, undilated, ungrouped, zero-padded "
                                 "convolutions")
        k, p = _square("kernel_size", kernel_size), _square("padding", padding)
        if not 1 <= k <= MAX_KERNEL_SIZE:
            raise ValueError(f"ConvActPool2d: kernel_size {k} is not supported (1..{MAX_KERNEL_SIZE})")
        if not 0 <= p <= MAX_PADDING:
            raise ValueError(f"ConvActPool2d: padding {p} is not supported (0..{MAX_PADDING})")
        if activation not in ACTIVATIONS:
            raise ValueError(f"ConvActPool2d: unknown activation {activation!r}; choose one of {ACTIVATIONS}")
        if pool not in POOLS:
            raise ValueError(f"ConvActPool2d: unknown pool {pool!r}; choose one of {POOLS}")
        super().__init__(in_channels, out_channels, k, stride=1, padding=p, bias=bias,
                         device=device, dtype=dtype)
        self.activation = activation
        self.pool = pool

    def forward(self, x):
        return F.conv2d_act_pool(x, self.weight, self.bias, self.padding[0], self.activation, self.pool)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}, pool={self.pool!r}"


class LinearAct(nn.Linear):
    """act(x @ W.T + b) as one module, with nn.Linear's parameters (weight stays [out, in])."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "relu",
                 *, device=None, dtype=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"LinearAct: unknown activation {activation!r}; choose one of {ACTIVATIONS}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x):
        return F.linear_act(x, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
