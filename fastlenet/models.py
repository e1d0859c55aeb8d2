"""The networks fastlenet trains: LeNet-5 variants, LeNet-5 as published in 1998 (fastlenet.lenet1998),
and the other small CNNs of the PyTorch MNIST tutorials, each reference (stock torch.nn) and fused,
with identical parameter names.

LeNet-5's submodules are named conv1, conv2, fc1, fc2, fc3 as in the usual PyTorch LeNet-5 scripts,
so their state_dicts load unchanged into either path. The reference path applies activation and
pooling as separate torch.nn.functional calls; the fused path folds them into the layer (one kernel
each). The 1998 network and the tutorial networks (NETWORKS) are defined once, in stock torch.nn, and
their fused form is what fastlenet.fuse makes of them (build_model(name, fused=True)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
import torch.nn.functional as F

from fastlenet.lenet1998 import LeNet5_1998
from fastlenet.names import MODEL_NAMES


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


@torch.fx.wrap  # torch.fx records a call instead of tracing into it: a proxy has no shape to check
def _check_lenet5_input(x: torch.Tensor) -> torch.Tensor:
    """x itself, once its shape is LeNet-5's (N, 1, 28, 28). It returns x so that the check sits in
    the data flow of a traced graph, where no pass that drops unused nodes can remove it."""
    if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
        raise ValueError(f"LeNet5 expects input of shape (N, 1, 28, 28), got {tuple(x.shape)}")
    return x


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
        x = _check_lenet5_input(x)
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
    """The trainable parameters: every parameter's entries, less those a module's masked_parameters()
    says its mask removes (the unconnected weights of the 1998 network's c3)."""
    masked = sum(m.masked_parameters() for m in model.modules() if callable(getattr(m, "masked_parameters", None)))
    return sum(p.numel() for p in model.parameters()) - masked


# --------------------------------------------------------------------------------------------------
# The other networks of the PyTorch MNIST tutorials, as they write them (stock torch.nn).
# --------------------------------------------------------------------------------------------------

class TutorialCNN(nn.Module):
    """Three conv blocks and a linear classifier: 28 -> 14 -> 7, 256 x 7 x 7 features."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 5, padding=2), nn.ReLU(),
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 256, 5, padding=2), nn.ReLU(),
        )
        self.classifier = nn.Linear(256 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class ConvNetBN(nn.Module):
    """Two conv blocks (conv, max pool, ReLU, BatchNorm) and three linear layers with dropout."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 10, 5, padding=1), nn.MaxPool2d(2), nn.ReLU(), nn.BatchNorm2d(10),
            nn.Conv2d(10, 20, 5, padding=1), nn.MaxPool2d(2), nn.ReLU(), nn.BatchNorm2d(20),
        )
        self.classifier = nn.Sequential(
            nn.Linear(500, 60), nn.Dropout(0.5), nn.ReLU(),
            nn.Linear(60, 20), nn.Dropout(0.5), nn.ReLU(),
            nn.Linear(20, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class AlexNetMNIST(nn.Module):
    """AlexNet's five conv layers and three linear layers, sized for 28 x 28 input.

    width scales every hidden layer (1.0 is the tutorial's network, 57 million parameters); the
    tests use a narrow one so that Triton's interpreter can run it."""

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        c1, c2, c3, c4, c5, f = (max(1, round(c * width)) for c in (64, 192, 384, 256, 256, 4096))
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 1),
            nn.Conv2d(c1, c2, 3, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(3, 2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(c5 * 6 * 6, f), nn.ReLU(),
            nn.Dropout(), nn.Linear(f, f), nn.ReLU(),
            nn.Linear(f, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class TutorialLeNet5(nn.Module):
    """LeNet-5 written as PyTorch's "Neural Networks" tutorial writes it: layers as modules,
    activation and pooling as function calls in forward (fastlenet.fuse rewrites the traced graph)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


# The stock networks by their command-line names (LeNet-5's variants are in VARIANTS).
NETWORKS: dict[str, type[nn.Module]] = {
    "lenet5-1998": LeNet5_1998,
    "cnn": TutorialCNN,
    "convnet-bn": ConvNetBN,
    "alexnet": AlexNetMNIST,
}
# MODEL_NAMES (fastlenet.names, which the command-line tools read without importing PyTorch) lists
# VARIANTS' names, then NETWORKS'; tests/cli/test_cli.py holds them equal.


def build_model(name: str, fused: bool = False) -> nn.Module:
    """The network `name` (one of MODEL_NAMES), stock or fused. A network of NETWORKS has as its
    fused form fastlenet.fuse of its stock form: the same parameter names."""
    if name in VARIANTS:
        return LeNet5(name, fused=fused)
    if name not in NETWORKS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    model = NETWORKS[name]()
    if fused:
        from fastlenet.fusion import fuse

        model, _ = fuse(model, inplace=True)
    model.variant = name  # what the command-line tools call it (LeNet5 has the attribute too)
    model.fused = fused  # as LeNet5's: which path it is (fastlenet.predict reports it)
    return model
