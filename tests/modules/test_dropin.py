"""The fused modules are drop-ins: built from nn.Conv2d's / nn.Linear's own argument lists,
positional or keyword, they hold the same parameters and compute the same outputs and gradients as
the stock module, batched and unbatched."""
import pytest
import torch
from torch import nn

from fastlenet.nn import ConvActPool2d, LinearAct

from utils import reference_dtype, rel_err

pytestmark = pytest.mark.usefixtures("poisoned")

# Relative error against the stock module. float64 (the interpreter, on a CPU) differs only in
# summation order over at most C_in*k*k = 75 products; float32 (compiled, on CUDA) by fp32 rounding
# of the same sums, with TF32 off (conftest).
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def built_alike(stock_cls, fused_cls, args, kwargs, device, dtype):
    torch.manual_seed(3)
    stock = stock_cls(*args, **kwargs).to(device, dtype)
    torch.manual_seed(3)
    fused = fused_cls(*args, **kwargs).to(device, dtype)
    return stock, fused


def assert_same_function(stock, fused, x, dtype):
    """Same parameters, same repr up to the fused extras, same output and every gradient."""
    assert fused.state_dict().keys() == stock.state_dict().keys()
    for name, value in stock.state_dict().items():
        assert torch.equal(fused.state_dict()[name], value), name
    assert fused.extra_repr().startswith(stock.extra_repr())
    xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yf = stock(xs), fused(xf)
    assert yf.shape == ys.shape
    assert rel_err(yf, ys) <= TOL[dtype]
    seed = torch.randn_like(ys)
    ys.backward(seed)
    yf.backward(seed)
    assert rel_err(xf.grad, xs.grad) <= TOL[dtype]
    for (name, pf), ps in zip(fused.named_parameters(), stock.parameters()):
        assert rel_err(pf.grad, ps.grad) <= TOL[dtype], name


CONV_ARGUMENTS = [
    # nn.Conv2d's positional order: in, out, kernel_size, stride, padding, dilation, groups, bias,
    # padding_mode. (3, 4, 5, 1, 2) is stride 1, padding 2.
    ((3, 4, 5, 1, 2), {}),
    ((3, 4, 3), {}),
    ((2, 5, 3, 1, 1, 1, 1, False), {}),
    ((2, 3, 3, 1, 0, 1, 1, True, "zeros"), {}),
    ((2, 3, (3, 3), (1, 1), (1, 1), (1, 1)), {}),
    ((), dict(in_channels=2, out_channels=3, kernel_size=5, padding="same")),
    ((2, 3), dict(kernel_size=3, padding="valid", bias=False)),
    ((3, 2, 1), dict(stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros")),
]


@pytest.mark.parametrize("args,kwargs", CONV_ARGUMENTS)
@pytest.mark.parametrize("batched", [True, False])
def test_conv_module_is_nn_conv2d_with_its_arguments(args, kwargs, batched, device):
    dtype = reference_dtype(device)
    stock, fused = built_alike(nn.Conv2d, ConvActPool2d, args, kwargs, device, dtype)
    shape = (2, stock.in_channels, 7, 6) if batched else (stock.in_channels, 7, 6)
    assert_same_function(stock, fused, torch.randn(shape, device=device, dtype=dtype), dtype)
    assert (fused.activation, fused.pool) == ("identity", None)


LINEAR_ARGUMENTS = [
    ((84, 10), {}),
    ((7, 4, False), {}),
    ((), dict(in_features=5, out_features=3)),
    ((5,), dict(out_features=3, bias=False)),
]


@pytest.mark.parametrize("args,kwargs", LINEAR_ARGUMENTS)
@pytest.mark.parametrize("leading", [(3,), (), (2, 3)], ids=["batched", "unbatched", "3-D"])
def test_linear_module_is_nn_linear_with_its_arguments(args, kwargs, leading, device):
    dtype = reference_dtype(device)
    stock, fused = built_alike(nn.Linear, LinearAct, args, kwargs, device, dtype)
    x = torch.randn(*leading, stock.in_features, device=device, dtype=dtype)
    assert_same_function(stock, fused, x, dtype)
    assert fused.activation == "identity"


def test_unbatched_conv_with_activation_and_pooling_is_the_batch_of_one(device):
    dtype = reference_dtype(device)
    conv = ConvActPool2d(2, 3, 3, padding=1, activation="tanh", pool="max").to(device, dtype)
    x = torch.randn(2, 7, 7, device=device, dtype=dtype)
    out = conv(x)
    assert out.shape == (3, 3, 3)
    assert torch.equal(out, conv(x.unsqueeze(0)).squeeze(0))


def test_fused_extras_are_keyword_only():
    with pytest.raises(TypeError):
        ConvActPool2d(3, 4, 3, 1, 0, 1, 1, True, "zeros", None, None, "relu")
    with pytest.raises(TypeError):
        LinearAct(4, 3, True, None, None, "relu")


def test_conv_module_refuses_same_padding_with_an_even_kernel():
    nn.Conv2d(2, 3, 4, padding="same")  # PyTorch pads one side more; the kernel cannot
    with pytest.raises(ValueError, match="even kernel_size 4"):
        ConvActPool2d(2, 3, 4, padding="same")
