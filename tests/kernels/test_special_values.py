"""NaN and Inf travel through the fused layers as they do through PyTorch's own ops.

The activation derivative is taken from the layer's output y (activations.py), so these are the cases
where that shortcut could differ from PyTorch: relu's backward is threshold_backward, a select on
y <= 0, so a NaN output passes its gradient through and an infinite upstream gradient at a dead
unit gives 0 (a product act'(y) * g would give 0 and NaN). Every activation x pool is compared with
the PyTorch composition in float64: the same elements NaN, the same infinite, the rest close.
"""
import pytest
import torch
import torch.nn.functional as F

from fastlenet import functional as FF
from utils import ACT, PARAMETERLESS_POOLS, POOL


pytestmark = pytest.mark.usefixtures("poisoned")


def assert_same_special_values(out, ref, what):
    out, ref = out.double(), ref.double()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (what, "NaN positions differ", out, ref)
    assert torch.equal(torch.isinf(out), torch.isinf(ref)), (what, "Inf positions differ", out, ref)
    assert torch.equal(out[torch.isinf(out)], ref[torch.isinf(ref)]), (what, "Inf signs differ")
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-5, atol=1e-6, msg=what)


def special_input(device):
    """One channel: a NaN, a +Inf, and a window whose every value is negative (a dead relu unit)."""
    x = torch.randn(1, 1, 6, 6, device=device)
    x[0, 0, 1, 1] = float("nan")
    x[0, 0, 4, 4] = float("inf")
    x[0, 0, 2:4, 2:4] = -torch.rand(2, 2, device=device) - 0.5
    return x


@pytest.mark.parametrize("activation", FF.ACTIVATIONS)
@pytest.mark.parametrize("pool", PARAMETERLESS_POOLS)
def test_conv_act_pool_nan_and_inf_like_pytorch(activation, pool, device):
    # A 1x1 convolution with weight 1 and bias 0 computes z = x exactly, so every special value
    # reaches the activation and the pooling as it would in PyTorch.
    x = special_input(device).requires_grad_()
    w = torch.ones(1, 1, 1, 1, device=device, requires_grad=True)
    b = torch.zeros(1, device=device, requires_grad=True)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    y = FF.conv2d_act_pool(x, w, b, activation=activation, pool=pool)
    ref = POOL[pool](ACT[activation](F.conv2d(xr, wr, br)), 2)
    assert_same_special_values(y, ref, "output")
    # Upstream gradient: finite, plus an infinite one on the dead window (row 1, col 1 of the output).
    g = torch.randn_like(ref)
    g[0, 0, 1, 1] = float("inf")
    y.backward(g.float())
    ref.backward(g)
    assert_same_special_values(x.grad, xr.grad, "grad input")
    assert_same_special_values(w.grad, wr.grad, "grad weight")
    assert_same_special_values(b.grad, br.grad, "grad bias")


NAN, INF = float("nan"), float("inf")
# 2x2 windows (row-major) with several NaNs, and NaN beside +-Inf. PyTorch's max pooling updates on
# every NaN it meets (its CPU and CUDA kernels test `val > max || isnan(val)`), so the last NaN in
# scan order is the one kept, and the one that gets the gradient.
NAN_WINDOWS = [[NAN, 1.0, NAN, 2.0], [NAN, INF, -INF, NAN], [INF, NAN, 5.0, -INF], [1.0, NAN, NAN, NAN],
               [NAN, NAN, 0.5, 0.25], [-INF, -INF, NAN, INF]]


def windows_input(device):
    """One channel, 4 x 6: the six windows of NAN_WINDOWS side by side over two rows of windows."""
    x = torch.empty(1, 1, 4, 6, device=device)
    for n, (a, b, c, d) in enumerate(NAN_WINDOWS):
        r, col = 2 * (n // 3), 2 * (n % 3)
        x[0, 0, r:r + 2, col:col + 2] = torch.tensor([[a, b], [c, d]])
    return x


# PyTorch's composition backpropagates a zero through sigmoid / tanh at every position a window
# did not select, and 0 * act'(NaN) is NaN: each NaN a window holds besides the one kept makes NaN
# gradients. The fused backward gives the same NaNs (its window index marks the NaN positions).
SPREADS_UNSELECTED_NANS = ("sigmoid", "tanh", "scaled_tanh")


def check_like_pytorch(x, w, b, padding, activation, pool="max"):
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    y = FF.conv2d_act_pool(x, w, b, padding=padding, activation=activation, pool=pool)
    ref = POOL[pool](ACT[activation](F.conv2d(xr, wr, br, padding=padding)), 2)
    assert_same_special_values(y, ref, "output")
    g = torch.randn_like(ref)
    y.backward(g.float())
    ref.backward(g)
    for what, out, expected in (("grad input", x.grad, xr.grad), ("grad weight", w.grad, wr.grad),
                                ("grad bias", b.grad, br.grad)):
        assert_same_special_values(out, expected, what)


def nan_windows_case(device):
    # z = x exactly (1x1 kernel, weight 1, bias 0): each window holds the values written.
    return windows_input(device), torch.ones(1, 1, 1, 1, device=device), torch.zeros(1, device=device), 0


def nan_patch_case(device):
    """The common case: one NaN pixel makes a 3x3 patch of the conv output NaN, so windows hold two
    or four NaNs; an Inf pixel beside them."""
    x = torch.randn(2, 2, 7, 8, device=device)
    x[0, 1, 3, 3] = NAN
    x[1, 0, 2, 5] = INF
    x[1, 0, 4, 1] = NAN
    return x, torch.randn(3, 2, 3, 3, device=device), torch.randn(3, device=device), 1


@pytest.mark.parametrize("case", [nan_windows_case, nan_patch_case], ids=["windows", "patch"])
@pytest.mark.parametrize("activation", FF.ACTIVATIONS)
def test_max_pool_keeps_the_last_nan_of_a_window_like_pytorch(case, activation, device):
    check_like_pytorch(*case(device), activation)


@pytest.mark.parametrize("activation", SPREADS_UNSELECTED_NANS)
def test_nan_gradients_of_unselected_positions_as_pytorch(activation, device):
    """The NaN positions a window did not keep get NaN gradients, as in PyTorch's composition;
    grad input alone, so that no other NaN hides a position's."""
    x, w, b, padding = nan_windows_case(device)
    x.requires_grad_()
    xr = x.detach().double().requires_grad_()
    y = FF.conv2d_act_pool(x, w, b, padding=padding, activation=activation, pool="max")
    ref = POOL["max"](ACT[activation](F.conv2d(xr, w.double(), b.double(), padding=padding)), 2)
    y.backward(torch.ones_like(y))
    ref.backward(torch.ones_like(ref))
    assert xr.grad.isnan().sum() > ref.isnan().sum()  # some NaN positions were not kept
    assert torch.equal(x.grad.isnan(), xr.grad.isnan())


@pytest.mark.parametrize("activation", FF.ACTIVATIONS)
def test_linear_act_nan_and_inf_like_pytorch(activation, device):
    x = torch.randn(4, 3, device=device)
    x[1, 0] = float("nan")
    x[2, 1] = float("inf")
    w = torch.eye(3, device=device)  # y = act(x) exactly, so the special values reach act
    x.requires_grad_()
    w.requires_grad_()
    xr, wr = (t.detach().double().requires_grad_() for t in (x, w))
    y = FF.linear_act(x, w, None, activation=activation)
    ref = ACT[activation](F.linear(xr, wr))
    assert_same_special_values(y, ref, "output")
    g = torch.randn_like(ref)
    g[3, 2] = float("inf")
    y.backward(g.float())
    ref.backward(g)
    assert_same_special_values(x.grad, xr.grad, "grad input")
    assert_same_special_values(w.grad, wr.grad, "grad weight")


@pytest.mark.skipif(torch.cuda.is_available(), reason="numpy computes only under the interpreter")
def test_the_interpreter_does_not_warn_users_about_nan_and_inf(device):
    """numpy does the interpreter's arithmetic, on masked-off lanes too: its RuntimeWarnings reach
    anyone running the kernels under TRITON_INTERPRET=1 unless the launch silences them."""
    import warnings

    x = special_input(device)
    weight = torch.randn(2, 1, 3, 3, device=device, requires_grad=True)
    logits = torch.tensor([[1e30, -float("inf")], [float("nan"), 0.0]], device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # over pytest's own filters, inside this block
        FF.conv2d_act_pool(x, weight, None, 1, "sigmoid", "max").sum().backward()
        FF.linear_act(x.flatten(1)[:, :8], torch.randn(3, 8, device=device), None, "tanh")
        FF.cross_entropy(logits, torch.tensor([0, 1], device=device))
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
