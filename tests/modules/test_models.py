"""LeNet-5: the reference and fused models, their parameters, checkpoints, and drop-in modules."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlenet
from fastlenet import functional as FF
from fastlenet.models import VARIANTS, LeNet5, num_parameters
from fastlenet.nn import ConvActPool2d, LinearAct

from utils import reference_dtype, rel_err

pytestmark = pytest.mark.usefixtures("poisoned")

# Fused vs reference model, relative error per dtype: float64 agrees to summation order; float32
# compounds five layers of fp32 GEMMs (K <= 400) and the loss.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


# ---------------------------------------------------------------------------------------------
# the reference model (issue #2)
# ---------------------------------------------------------------------------------------------

# lenet5: conv1 6*(1*25+1)=156, conv2 16*(6*25+1)=2416, fc1 120*401=48120, fc2 84*121=10164,
# fc3 10*85=850 -> 61,706. nopad: fc1 120*257=30840 -> 44,426.
@pytest.mark.parametrize("variant,count", [("lenet5", 61706), ("lenet5-classic", 61706),
                                           ("lenet5-nopad", 44426)])
def test_parameter_counts(variant, count):
    assert num_parameters(LeNet5(variant)) == count


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_forward_shape(variant):
    assert LeNet5(variant)(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_reference_state_dict_keys_match_the_usual_script():
    keys = [f"{layer}.{p}" for layer in ("conv1", "conv2", "fc1", "fc2", "fc3") for p in ("weight", "bias")]
    assert list(LeNet5().state_dict()) == keys


def test_model_errors():
    with pytest.raises(ValueError, match="unknown LeNet-5 variant 'lenet6'"):
        LeNet5("lenet6")
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\), got \(2, 3, 28, 28\)"):
        LeNet5()(torch.randn(2, 3, 28, 28))


# ---------------------------------------------------------------------------------------------
# the fused model (issue #3)
# ---------------------------------------------------------------------------------------------

def plain_torch_lenet5() -> nn.Module:
    """The LeNet-5 of the usual PyTorch scripts, written independently of fastlenet."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.fc1 = nn.Linear(16 * 5 * 5, 120)
            self.fc2 = nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)
            x = torch.flatten(x, 1)
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    return Net()


def test_fused_model_loads_a_plain_torch_checkpoint_and_gives_the_same_logits(tmp_path, device):
    dtype = reference_dtype(device)
    net = plain_torch_lenet5().to(device, dtype)
    torch.save(net.state_dict(), tmp_path / "lenet.pt")
    fused = LeNet5(fused=True).to(device, dtype)
    fused.load_state_dict(torch.load(tmp_path / "lenet.pt", weights_only=True), strict=True)
    assert list(fused.state_dict()) == list(net.state_dict())
    x = torch.randn(3, 1, 28, 28, device=device, dtype=dtype)
    with torch.no_grad():
        assert rel_err(fused(x), net(x)) <= TOL[dtype]


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_matches_reference_logits_and_every_gradient(variant, device):
    dtype = reference_dtype(device)
    ref = LeNet5(variant).to(device, dtype)
    fused = LeNet5(variant, fused=True).to(device, dtype)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 1, 28, 28, device=device, dtype=dtype)
    target = torch.randint(0, 10, (3,), device=device)
    logits_f, logits_r = fused(x), ref(x)
    assert rel_err(logits_f, logits_r) <= TOL[dtype]
    FF.cross_entropy(logits_f, target).backward()
    F.cross_entropy(logits_r, target).backward()
    for (name, pf), pr in zip(fused.named_parameters(), ref.parameters()):
        assert rel_err(pf.grad, pr.grad) <= TOL[dtype], name


@pytest.mark.slow
def test_fused_and_reference_take_the_same_optimizer_steps(device):
    """The convergence test: same weights, same batches, SGD with momentum then Adam."""
    dtype = reference_dtype(device)
    ref = LeNet5().to(device, dtype)
    fused = LeNet5(fused=True).to(device, dtype)
    fused.load_state_dict(ref.state_dict())
    for make_opt in (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                     lambda p: torch.optim.Adam(p, lr=1e-3)):
        opt_r, opt_f = make_opt(ref.parameters()), make_opt(fused.parameters())
        for _ in range(3):
            x = torch.randn(4, 1, 28, 28, device=device, dtype=dtype)
            target = torch.randint(0, 10, (4,), device=device)
            for model, opt, loss_fn in ((ref, opt_r, F.cross_entropy), (fused, opt_f, FF.cross_entropy)):
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), target).backward()
                opt.step()
        for (name, pf), pr in zip(fused.named_parameters(), ref.parameters()):
            assert rel_err(pf, pr) <= TOL[dtype], name
    assert not torch.equal(ref.fc3.weight, LeNet5().to(device, dtype).fc3.weight)


# ---------------------------------------------------------------------------------------------
# drop-in modules
# ---------------------------------------------------------------------------------------------

def test_modules_match_torch_layers_in_init_names_and_state_dict():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    torch.manual_seed(1)
    fused_conv = ConvActPool2d(3, 5, 3, padding=1, activation="tanh", pool="avg")
    assert isinstance(fused_conv, nn.Conv2d)
    assert fused_conv.state_dict().keys() == conv.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fused_conv.state_dict().values(), conv.state_dict().values()))
    torch.manual_seed(2)
    lin = nn.Linear(7, 4, bias=False)
    torch.manual_seed(2)
    fused_lin = LinearAct(7, 4, bias=False, activation="sigmoid")
    assert isinstance(fused_lin, nn.Linear) and fused_lin.bias is None
    assert torch.equal(fused_lin.weight, lin.weight) and fused_lin.weight.shape == (4, 7)
    assert "activation='tanh', pool='avg'" in repr(fused_conv)
    assert "activation='sigmoid'" in repr(fused_lin)
    assert fastlenet.ConvActPool2d is ConvActPool2d and fastlenet.LinearAct is LinearAct


@pytest.mark.parametrize("kwargs,match", [
    (dict(stride=2), "stride=2"), (dict(dilation=2), "dilation=2"), (dict(groups=3), "groups=3"),
    (dict(padding_mode="reflect"), "padding_mode='reflect'"), (dict(kernel_size=(3, 5)), "square"),
    (dict(kernel_size=9), "kernel_size 9"), (dict(padding=5), "padding 5"),
    (dict(activation="gelu"), "gelu"), (dict(pool="lp"), "'lp'"),
])
def test_conv_module_rejects_what_the_kernel_does_not_compute(kwargs, match):
    args = dict(in_channels=3, out_channels=3, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ConvActPool2d(**args)


def test_modules_compute_the_functional_op(device):
    conv = ConvActPool2d(2, 3, 3, padding=1, activation="sigmoid", pool="max").to(device)
    x = torch.randn(2, 2, 7, 7, device=device)
    assert torch.equal(conv(x), FF.conv2d_act_pool(x, conv.weight, conv.bias, 1, "sigmoid", "max"))
    lin = LinearAct(6, 4, activation="identity").to(device)
    z = torch.randn(5, 6, device=device)
    assert torch.equal(lin(z), FF.linear_act(z, lin.weight, lin.bias, "identity"))
