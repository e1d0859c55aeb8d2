"""LeNet-5 variants, reference (stock torch.nn) and fused (fastlenet.nn), with identical parameter names.

Submodules are named conv1, conv2, fc1, fc2, fc3 as in the usual PyTorch LeNet-5 scripts, so their
state_dicts load unchanged into either path. The reference path applies activation and pooling as
separate torch.nn.functional calls; the fused path folds them into the layer (one kernel each).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Variant:
    conv1_padding: int
    activation: str  # "relu" | "sigmoid"
    pool: str  # "max" | "avg"
    flat_features: int  # 16 * 5 * 5 with padded conv1, 16 * 4 * 4 without


VARIANTS: dict[str, Variant] = {
    # The modern LeNet-5 of most PyTorch tutorials: ReLU + max pooling, 28x28 input padded to 32x32.
    "lenet5": Variant(conv1_padding=2, activation="relu", pool="max", flat_features=400),
    # After the 1998-style tutorials: sigmoid + average ("subsampling") pooling.
    "lenet5-classic": Variant(conv1_padding=2, activation="sigmoid", pool="avg", flat_features=400),
    # conv1 without padding on 28x28 input: 24 -> 12 -> 8 -> 4, so 16*4*4 = 256 features.
    "lenet5-nopad": Variant(conv1_padding=0, activation="relu", pool="max", flat_features=256),
}

_ACT = {"relu": F.relu, "sigmoid": torch.sigmoid}
_POOL = {"max": F.max_pool2d, "avg": F.avg_pool2d}


class LeNet5(nn.Module):
    """LeNet-5 for 1x28x28 input and 10 classes.

    variant: one of VARIANTS ("lenet5", "lenet5-classic", "lenet5-nopad").
    fused: False builds stock torch.nn layers (runs anywhere); True builds fastlenet.nn's fused
        Triton layers (CUDA, or CPU under TRITON_INTERPRET=1). Both have the same state_dict keys.
    """

    def __init__(self, variant: str = "lenet5", fused: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown LeNet-5 variant {variant!r}; choose one of {sorted(VARIANTS)}")
        self.variant = variant
        self.fused = fused
        v = self.spec = VARIANTS[variant]
        if fused:
            from fastlenet.nn import ConvActPool2d, LinearAct

            self.conv1 = ConvActPool2d(1, 6, 5, padding=v.conv1_padding, activation=v.activation, pool=v.pool)
            self.conv2 = ConvActPool2d(6, 16, 5, activation=v.activation, pool=v.pool)
            self.fc1 = LinearAct(v.flat_features, 120, activation=v.activation)
            self.fc2 = LinearAct(120, 84, activation=v.activation)
            self.fc3 = LinearAct(84, 10, activation="identity")
        else:
            self.conv1 = nn.Conv2d(1, 6, 5, padding=v.conv1_padding)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.fc1 = nn.Linear(v.flat_features, 120)
            self.fc2 = nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"LeNet5 expects input of shape (N, 1, 28, 28), got {tuple(x.shape)}")
        if self.fused:
            x = self.conv2(self.conv1(x))
            x = x.flatten(1)
            return self.fc3(self.fc2(self.fc1(x)))
        act, pool = _ACT[self.spec.activation], _POOL[self.spec.pool]
        x = pool(act(self.conv1(x)), 2)
        x = pool(act(self.conv2(x)), 2)
        x = x.flatten(1)
        x = act(self.fc1(x))
        x = act(self.fc2(x))
        return self.fc3(x)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, fused={self.fused}"


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
