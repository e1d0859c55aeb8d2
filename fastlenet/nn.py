"""Drop-in torch.nn modules backed by the fused Triton kernels.

They subclass nn.Conv2d / nn.Linear and call their __init__ with the same positional parameters, so
constructor arguments, initialisation, parameter names, state_dict and repr are PyTorch's own: a
checkpoint of a plain torch.nn model loads unchanged. What the kernel fuses after the layer is
keyword-only and off by default (activation="identity", pool=None), so ConvActPool2d(*args) computes
what nn.Conv2d(*args) computes, and LinearAct(*args) what nn.Linear(*args) computes.
"""
from __future__ import annotations

import torch
from torch import nn

from fastlenet import functional as F
from fastlenet.functional import ACTIVATIONS, MAX_KERNEL_SIZE, MAX_PADDING, POOLS

__all__ = ["ConvActPool2d", "LinearAct", "RBFScores"]


def _square(name: str, value) -> int:
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"ConvActPool2d supports square {name}s only, got {value}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"ConvActPool2d: {name} must be an int or a pair of equal ints, got {value!r}")
    return value


def kernel_padding(padding, k: int) -> int:
    """nn.Conv2d's padding argument as the one int the kernel takes (fastlenet.fuse reads it too)."""
    if padding == "valid":
        return 0
    if padding == "same":  # stride 1: k // 2 on each side, which is symmetric only for odd k
        if k % 2 == 0:
            raise ValueError(f"ConvActPool2d: padding='same' with the even kernel_size {k} pads one side "
                             "more than the other; the kernel pads symmetrically (use an odd kernel_size)")
        return k // 2
    if isinstance(padding, str):
        raise ValueError(f"ConvActPool2d: padding {padding!r} is not supported (an int, a pair, 'valid' "
                         "or 'same', as nn.Conv2d)")
    return _square("padding", padding)


class ConvActPool2d(nn.Conv2d):
    """pool(act(conv2d(x))): nn.Conv2d's parameters, with the activation and the 2x2/2 pooling
    after it computed in the same kernel.

    Positional parameters are nn.Conv2d's, in its order and with its defaults. Keyword-only:
    activation: "identity" (default), "relu", "sigmoid", "tanh" or "scaled_tanh" (1.7159 tanh(2/3 z));
    pool: None (default), "max", "avg" (window 2, stride 2, odd trailing rows/columns dropped) or
    "subsample", the 1998 LeNet-5's trainable subsampling: pool_activation(pool_weight[c] * (the
    window's sum) + pool_bias[c]), its Parameters pool_weight (ones) and pool_bias (zeros) of shape
    (out_channels,); `subsampling` instead takes them from another module's `weight` and `bias`,
    which keeps them in its own state_dict (what fastlenet.fuse does for a Subsampling2d);
    connections: a bool (out_channels, in_channels) table, kept as the buffer `connections`: output
    channel o sees input channel i only where it is True (the 1998 LeNet-5's C3).
    With the defaults the module computes exactly nn.Conv2d's output. Input (N, C, H, W) or
    unbatched (C, H, W), as nn.Conv2d.

    What the kernel does not compute (stride != 1, dilation != 1, groups != 1, padding_mode other
    than "zeros", non-square or larger than 7x7 kernels, padding above 3) raises at construction
    rather than computing something else.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None,
                 *, activation: str = "identity", pool: str | None = None, pool_activation: str = "identity",
                 subsampling: nn.Module | None = None, connections: torch.Tensor | None = None):
        for name, value, default in (("stride", stride, 1), ("dilation", dilation, 1), ("groups", groups, 1),
                                     ("padding_mode", padding_mode, "zeros")):
            if value not in (default, (default, default), [default, default]):
                raise ValueError(f"ConvActPool2d does not support {name}={value!r} (only {default!r}): "
                                 "the fused kernel computes stride-1, undilated, ungrouped, zero-padded "
                                 "convolutions")
        k = _square("kernel_size", kernel_size)
        if not 1 <= k <= MAX_KERNEL_SIZE:
            raise ValueError(f"ConvActPool2d: kernel_size {k} is not supported (1..{MAX_KERNEL_SIZE})")
        p = kernel_padding(padding, k)
        if not 0 <= p <= MAX_PADDING:
            raise ValueError(f"ConvActPool2d: padding {p} is not supported (0..{MAX_PADDING})")
        if activation not in ACTIVATIONS:
            raise ValueError(f"ConvActPool2d: unknown activation {activation!r}; choose one of {ACTIVATIONS}")
        if pool not in POOLS:
            raise ValueError(f"ConvActPool2d: unknown pool {pool!r}; choose one of {POOLS}")
        if pool_activation not in ACTIVATIONS:
            raise ValueError(f"ConvActPool2d: unknown pool_activation {pool_activation!r}; choose one of "
                             f"{ACTIVATIONS}")
        if pool != "subsample" and (pool_activation != "identity" or subsampling is not None):
            raise ValueError("ConvActPool2d: pool_activation and subsampling belong to pool='subsample'")
        if connections is not None and (not isinstance(connections, torch.Tensor) or connections.dtype != torch.bool
                                        or tuple(connections.shape) != (out_channels, in_channels)):
            raise ValueError(f"ConvActPool2d: connections must be a bool tensor of shape ({out_channels}, "
                             f"{in_channels}), got {getattr(connections, 'dtype', type(connections).__name__)} "
                             f"{tuple(getattr(connections, 'shape', ()))}")
        # nn.Conv2d keeps the arguments as given ("same", (2, 2), ...), so repr and state match it.
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self.activation = activation
        self.pool = pool
        self.pool_activation = pool_activation
        self._kernel_padding = p
        if pool == "subsample" and subsampling is None:
            self.pool_weight = nn.Parameter(torch.ones(out_channels, device=device, dtype=dtype))
            self.pool_bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype))
        # Not registered as a submodule: its parameters stay in its own place in the model's state_dict.
        object.__setattr__(self, "_subsampling", subsampling)
        if connections is not None:
            self.register_buffer("connections", connections.to(device=self.weight.device))
        else:
            self.connections = None

    def masked_parameters(self) -> int:
        """The weight entries the connection table leaves out (not trained; models.num_parameters
        does not count them), as fastlenet.lenet1998.ConnectedConv2d."""
        if self.connections is None:
            return 0
        return int((~self.connections).sum()) * self.weight[0, 0].numel()

    def _pool_parameters(self):
        if self.pool != "subsample":
            return None, None
        if self._subsampling is None:
            return self.pool_weight, self.pool_bias
        return self._subsampling.weight, self._subsampling.bias

    def forward(self, x):
        pool_weight, pool_bias = self._pool_parameters()
        return F.conv2d_act_pool(x, self.weight, self.bias, self._kernel_padding, self.activation, self.pool,
                                 connections=self.connections, pool_weight=pool_weight, pool_bias=pool_bias,
                                 pool_activation=self.pool_activation)

    def extra_repr(self) -> str:
        extra = f", pool_activation={self.pool_activation!r}" if self.pool == "subsample" else ""
        extra += ", connections=True" if self.connections is not None else ""
        return f"{super().extra_repr()}, activation={self.activation!r}, pool={self.pool!r}{extra}"


class LinearAct(nn.Linear):
    """act(x @ W.T + b): nn.Linear's parameters (weight stays [out, in]), with the activation
    computed in the same kernel.

    Positional parameters are nn.Linear's, in its order and with its defaults. Keyword-only:
    activation: "identity" (default: exactly nn.Linear's output), "relu", "sigmoid" or "tanh".
    Input (..., in_features), unbatched (in_features,) included, as nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 *, activation: str = "identity"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"LinearAct: unknown activation {activation!r}; choose one of {ACTIVATIONS}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x):
        return F.linear_act(x, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class RBFScores(nn.Module):
    """scores[b, i] = -sum_j (x[b, j] - prototypes[i, j])**2: the 1998 LeNet-5's RBF output units as
    one fused kernel each way, with fastlenet.lenet1998.RBFOutput's buffer `prototypes` ([classes,
    features], fixed: not a Parameter), so its state_dict loads unchanged. Input (batch, features)."""

    def __init__(self, prototypes: torch.Tensor):
        super().__init__()
        if not isinstance(prototypes, torch.Tensor) or prototypes.ndim != 2 or not prototypes.is_floating_point():
            raise ValueError("RBFScores: prototypes must be a floating-point tensor [classes, features], got "
                             f"{tuple(prototypes.shape) if isinstance(prototypes, torch.Tensor) else prototypes!r}")
        self.register_buffer("prototypes", prototypes.detach().clone())

    def forward(self, x):
        return F.rbf_scores(x, self.prototypes)

    def extra_repr(self) -> str:
        classes, features = self.prototypes.shape
        return f"classes={classes}, features={features}"
