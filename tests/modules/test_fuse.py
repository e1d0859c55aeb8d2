"""fastlenet.fuse: the fused model computes the original's function (logits and every parameter's
gradient), keeps its state_dict keys, and leaves stock exactly what its kernels cannot compute.

The networks run in float64 under Triton's interpreter (the kernels take float64 there), so the
comparison is tight: only summation order differs (~1e-15 relative; 1e-10 leaves room for the
depth of AlexNet). On CUDA they run in float32 with TF32 off (conftest.py), at 1e-5 as in
test_functional.py. Dropout and BatchNorm run in training mode with the RNG reseeded before each
forward, so both models draw the same dropout masks.
"""
import copy
import functools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastlenet import fuse
from fastlenet.kernels.launch import interpreting
from fastlenet.models import (MODEL_NAMES, AlexNetMNIST, ConvNetBN, LeNet5, TutorialCNN, TutorialLeNet5,
                              build_model)
from fastlenet.lenet1998 import RBFOutput, Subsampling2d
from fastlenet.nn import ConvActPool2d, LinearAct, RBFScores
from utils import rel_err

DTYPE = torch.float64 if interpreting() else torch.float32
TOL = 1e-10 if DTYPE == torch.float64 else 1e-5


def sequential_lenet5():
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), nn.Sigmoid(), nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120), nn.Sigmoid(), nn.Linear(120, 84), nn.Sigmoid(), nn.Linear(84, 10))


# Every network of fastlenet.models, stock (full-width AlexNet only where nothing runs: the
# interpreter is slow), and two LeNet-5s written as users write them.
NETWORKS = {
    **{name: functools.partial(build_model, name) for name in MODEL_NAMES if name != "alexnet"},
    "alexnet-narrow": lambda: AlexNetMNIST(width=1 / 16),
    "lenet5-tutorial": TutorialLeNet5,
    "lenet5-sequential": sequential_lenet5,
}


def layer_names(model, kind=(nn.Conv2d, nn.Linear)):
    return [name for name, m in model.named_modules() if isinstance(m, kind)]


def assert_fused_whole(original, fused, report):
    """Each of the original's Conv2d / Linear layers is a fused module now, under its own name, and
    the report says so."""
    layers = layer_names(original)
    assert layers and layer_names(fused, (ConvActPool2d, LinearAct)) == layers
    # The 1998 LeNet-5's RBF output is fused too, on its own.
    rbf = layer_names(original, RBFOutput)
    assert layer_names(fused, RBFScores) == rbf and not layer_names(fused, RBFOutput)
    assert sorted(names[0] for names, _ in report.fused) == sorted(layers + rbf)
    assert not [label for label, _ in report.stock if label.split(" ")[0] in layers]


def run(model, x, seed=0):
    torch.manual_seed(seed)
    out = model(x)
    out.square().sum().backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


# Training mode for every network; evaluation mode too where it changes something (Dropout, BatchNorm).
# The tutorial CNN takes the interpreter longest (about 40 s on 2 cores): `slow`.
@pytest.mark.parametrize("name,mode", [pytest.param(name, "train", marks=pytest.mark.slow if name == "cnn" else ())
                                       for name in NETWORKS]
                         + [("convnet-bn", "eval"), ("alexnet-narrow", "eval"), ("lenet5-tutorial", "eval")])
def test_fused_network_matches_the_original(name, mode, device):
    torch.manual_seed(0)
    original = NETWORKS[name]().to(device=device, dtype=DTYPE).train(mode == "train")
    fused, report = fuse(original)
    assert_fused_whole(original, fused, report)
    assert not any(isinstance(m, (ConvActPool2d, LinearAct)) for m in original.modules())
    assert fused.training == (mode == "train")
    x = torch.randn(3, 1, 28, 28, device=device, dtype=DTYPE)
    ref, ref_grads = run(original, x)
    out, grads = run(fused, x)
    assert rel_err(out, ref) <= TOL, rel_err(out, ref)
    assert grads.keys() == ref_grads.keys()
    for key, g in grads.items():
        assert rel_err(g, ref_grads[key]) <= TOL, (key, rel_err(g, ref_grads[key]))


@pytest.mark.parametrize("name", [*NETWORKS, "alexnet"])
def test_checkpoints_load_both_ways(name):
    original = build_model("alexnet") if name == "alexnet" else NETWORKS[name]()
    fused, _ = fuse(original)
    assert list(fused.state_dict()) == list(original.state_dict())
    fused.load_state_dict(original.state_dict(), strict=True)
    copy.deepcopy(original).load_state_dict(fused.state_dict(), strict=True)
    for key, value in fused.state_dict().items():
        assert torch.equal(value, original.state_dict()[key])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_of_fastlenet_traces_and_fuses_whole(name):
    # Structure only (test_fused_network_matches_the_original runs them): full-width AlexNet too.
    original = build_model(name, fused=False)
    fused, report = fuse(original)
    assert report.how == "data flow traced with torch.fx"
    assert_fused_whole(original, fused, report)
    # The fused form (fastlenet's own layers, or fuse's result) is traceable and has nothing left to fuse.
    _, report = fuse(build_model(name, fused=True))
    assert report.how == "data flow traced with torch.fx" and report.fused == [] and report.stock == []


def test_lenet5_input_check_survives_fuse():
    fused, report = fuse(LeNet5())
    assert isinstance(fused, torch.fx.GraphModule) and len(report.fused) == 5  # the rewritten graph
    for model in (fused, copy.deepcopy(fused)):
        for shape in ((2, 3, 28, 28), (1, 28, 28)):
            message = f"LeNet5 expects input of shape (N, 1, 28, 28), got {shape}"
            with pytest.raises(ValueError, match=re.escape(message)):
                model(torch.randn(shape))


def fused_names(report):
    return [names for names, _ in report.fused]


def test_report_of_the_tutorial_networks():
    _, report = fuse(AlexNetMNIST())
    # Five conv + ReLU pairs and three linear layers; the three 3x3 pools stay stock.
    assert len(report.fused) == 8 and all(len(names) == 2 for names in fused_names(report)[:5])
    assert [name for name, _ in report.stock] == ["features.2 (MaxPool2d)", "features.5 (MaxPool2d)",
                                                  "features.12 (MaxPool2d)"]
    assert all("only 2x2/2 pooling fuses" in why for _, why in report.stock)
    _, report = fuse(ConvNetBN())
    # conv -> max pool -> ReLU fuses (max pooling commutes with ReLU); linear -> dropout -> ReLU too,
    # the dropout staying where it is.
    assert fused_names(report)[:3] == [("features.0", "features.1", "features.2"),
                                       ("features.4", "features.5", "features.6"),
                                       ("classifier.0", "classifier.2")]
    text = str(report)
    assert "5 layer(s) fused, 0 left stock" in text and "classifier.1 (Dropout) between stays" in text


# The interpreter cannot run bfloat16 dot products; compiled kernels take it, but not float64.
UNSUPPORTED = torch.bfloat16 if interpreting() else torch.float64


def test_what_stays_stock_and_why():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(),  # strided
        nn.Conv2d(4, 4, 3, dilation=2), nn.ReLU(),  # dilated
        nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(),  # grouped
        nn.Conv2d(4, 4, 3, padding_mode="reflect", padding=1),
        nn.Conv2d(4, 4, 9),  # kernel too large
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),  # BatchNorm between conv and activation
        nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2, stride=1),  # pooling of another stride
        nn.Conv2d(4, 4, 1), nn.AvgPool2d(2), nn.Tanh(),  # tanh does not commute with avg pooling
        nn.Conv2d(4, 4, 1).to(UNSUPPORTED),  # a dtype the kernels do not take
    )
    fused, report = fuse(model)
    stock = dict(report.stock)
    for i, text in ((0, "stride (2, 2)"), (2, "dilation (2, 2)"), (4, "groups 2"), (6, "padding_mode 'reflect'"),
                    (7, "kernel 9x9"), (17, str(UNSUPPORTED))):
        assert text in stock[f"{i} ({type(model[i]).__name__})"]
    assert "BatchNorm" in stock["9 (BatchNorm2d)"]
    assert "stride 1" in stock["13 (MaxPool2d)"]
    assert "does not commute" in stock["16 (Tanh)"]
    # The conv before the BatchNorm fuses alone; its ReLU stays after the BatchNorm.
    assert isinstance(fused[8], ConvActPool2d) and fused[8].activation == "identity"
    assert isinstance(fused[10], nn.ReLU) and isinstance(fused[11], ConvActPool2d)
    assert (fused[11].activation, fused[11].pool) == ("relu", None) and isinstance(fused[12], nn.Identity)
    assert isinstance(fused[13], nn.MaxPool2d)
    assert fused[14].pool == "avg" and fused[14].activation == "identity" and isinstance(fused[16], nn.Tanh)
    for i in (0, 2, 4, 6, 7, 17):
        assert type(fused[i]) is nn.Conv2d


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        return self.relu(y) + y  # the conv's output is used twice: ReLU cannot be absorbed


class SharedActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)
        self.act = nn.Tanh()  # one module called twice

    def forward(self, x):
        return self.act(self.conv2(self.act(self.conv1(x))))


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.dropout(F.relu(self.fc(x)), 0.5, self.training)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(2 * 3 * 3, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.sum() > 1e9:  # control flow on a value: torch.fx cannot trace it
            return x
        return self.act(self.head(self.body(x).flatten(1)))


def test_data_flow_decides(device):
    fused, report = fuse(Residual())
    assert isinstance(fused.conv, ConvActPool2d) and fused.conv.activation == "identity"
    assert isinstance(fused.relu, nn.ReLU)
    assert dict(report.stock)["the output of conv (Conv2d)"] == "its output is used in more than one place"

    original = SharedActivation()
    fused, report = fuse(original)
    assert isinstance(fused, torch.fx.GraphModule) and "GraphModule" in str(report)
    assert [m.activation for m in (fused.conv1, fused.conv2)] == ["tanh", "tanh"]
    x = torch.randn(2, 1, 9, 9, device=device, dtype=DTYPE)
    original.to(device=device, dtype=DTYPE)
    fused.to(device=device, dtype=DTYPE)
    assert rel_err(fused(x), original(x)) <= TOL

    # A rewritten graph would freeze F.dropout's training flag: the layer stays stock instead.
    fused, report = fuse(FunctionalDropout())
    assert type(fused.fc) is nn.Linear and not isinstance(fused, torch.fx.GraphModule)
    assert "train/eval" in dict(report.stock)["fc (Linear)"]

    # Untraceable: only the Sequential's run of modules is fused, the rest stays as it was.
    fused, report = fuse(Untraceable())
    assert "could not be traced" in report.how
    assert isinstance(fused.body[0], ConvActPool2d)
    assert (fused.body[0].activation, fused.body[0].pool) == ("relu", "max")
    assert isinstance(fused.body[1], nn.Identity) and isinstance(fused.body[2], nn.Identity)
    assert type(fused.head) is nn.Linear and type(fused.act) is nn.ReLU


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


class Branching(nn.Module):
    """Untraceable, with layers inside and outside an nn.Sequential."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(2, 2, 3, stride=2))  # strided: stock for its own reason
        self.side = nn.Conv2d(1, 4, 3)
        self.head = Head()

    def forward(self, x):
        if x.sum() > 1e9:  # control flow on a value: torch.fx cannot trace it
            return self.body(x).flatten(1)
        return self.head(torch.relu(self.side(x)))


def test_untraceable_model_lists_every_layer_it_leaves_stock():
    fused, report = fuse(Branching())
    assert "could not be traced (TraceError: " in report.how
    conv = fused.body[0]
    assert isinstance(conv, ConvActPool2d) and (conv.activation, conv.pool) == ("relu", "max")
    stock = dict(report.stock)
    assert "stride (2, 2)" in stock["body.3 (Conv2d)"]
    for label in ("side (Conv2d)", "head.fc (Linear)"):
        assert stock[label].startswith("forward could not be traced: TraceError: "), stock[label]
    left = [name for name, m in fused.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert sorted(label.split(" ")[0] for label in stock) == sorted(left) == ["body.3", "head.fc", "side"]
    assert "1 layer(s) fused, 3 left stock" in str(report)


class UnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.spare = nn.Linear(4, 2)  # registered, never called

    def forward(self, x):
        return F.relu(self.fc(x))


def test_a_layer_the_traced_forward_never_calls_is_listed_and_kept():
    original = UnusedLayer()
    fused, report = fuse(original)
    assert isinstance(fused, torch.fx.GraphModule) and isinstance(fused.fc, LinearAct)
    assert report.stock == [("spare (Linear)", "not called in the traced forward")]
    assert type(fused.spare) is nn.Linear and list(fused.state_dict()) == list(original.state_dict())


def test_inplace_and_copy():
    original = TutorialCNN()
    params = list(original.parameters())
    fused, _ = fuse(original)
    assert type(original.features[0]) is nn.Conv2d  # untouched
    assert all(p is not q for p, q in zip(fused.parameters(), params))
    same, _ = fuse(original, inplace=True)
    assert same is original and isinstance(original.features[0], ConvActPool2d)
    assert all(p is q for p, q in zip(original.parameters(), params))  # an optimizer still holds them
    again, report = fuse(original)  # fused layers are left alone
    assert report.fused == [] and report.stock == []
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fuse(lambda x: x)


def test_subsampling_fuses_in_a_rewritten_graph_too(device):
    """Function-call activations around the 1998 LeNet-5's Subsampling2d: the graph is rewritten,
    the Subsampling2d stays (uncalled) under its name and the fused conv reads its Parameters."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 4, 3)
            self.s2 = Subsampling2d(4)
            self.fc = nn.Linear(4 * 13 * 13, 10)

        def forward(self, x):
            x = torch.tanh(self.s2(torch.tanh(self.c1(x))))
            return self.fc(x.flatten(1))

    torch.manual_seed(0)
    original = Net().to(device=device, dtype=DTYPE)
    fused, report = fuse(original)
    assert isinstance(fused, torch.fx.GraphModule)
    assert [names for names, _ in report.fused][0] == ("c1", "tanh", "s2", "tanh_1")
    assert list(fused.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 1, 28, 28, device=device, dtype=DTYPE)
    ref, ref_grads = run(original, x)
    out, grads = run(fused, x)
    assert rel_err(out, ref) <= TOL
    assert grads.keys() == ref_grads.keys()
    for key, g in grads.items():
        assert rel_err(g, ref_grads[key]) <= TOL, key
