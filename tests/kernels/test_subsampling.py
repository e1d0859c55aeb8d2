"""The conv kernel's features for the 1998 LeNet-5 against their PyTorch composition: a connection
table (output channel o sees input channel i only where connections[o, i]) and trainable subsampling
(pool "subsample": pool_act(pool_weight[c] * the 2x2 window's sum + pool_bias[c])), forward and
every gradient, with the scaled tanh among the activations.

Runs the Triton kernels on the CPU through Triton's interpreter (conftest.py), or compiled on CUDA.
The reference is the composition in float64 (as fastlenet.lenet1998 writes it: torch.where on the
weight, avg_pool2d * 4); the error measure is ||out - ref|| / ||ref||. Kernel outputs are poisoned
(NaN) before each launch, so an element a kernel forgets to write fails.
"""
import pytest
import torch
import torch.nn.functional as F

from fastlenet import functional as FF
from fastlenet.nn import ConvActPool2d
from utils import ACT, rel_err

# Relative-error tolerances, by kernel dtype.
#  float64 (interpreter only): the same sums in another order, ~1e-16 a term, at most a few hundred
#    terms a sum (C_in*k*k = 150 and the batch's positions): 1e-12 leaves a wide margin.
#  float32 (CUDA, IEEE dots): a sum of K = 150 products rounds by about sqrt(150) ulp ~ 1e-6, the
#    weight gradient's of a few thousand positions ~ 1e-5 at worst; 1e-4 is a 10x margin.
TOL = {torch.float64: 1e-12, torch.float32: 1e-4}

pytestmark = pytest.mark.usefixtures("poisoned")


def kernel_dtype(device):
    return torch.float64 if device.type == "cpu" else torch.float32


def reference(x, w, b, padding, activation, pool, connections=None, pool_weight=None, pool_bias=None,
              pool_activation="identity"):
    if connections is not None:
        w = torch.where(connections[:, :, None, None], w, 0)
    z = ACT[activation](F.conv2d(x, w, b, padding=padding))
    if pool == "subsample":
        return ACT[pool_activation](F.avg_pool2d(z, 2) * 4 * pool_weight[:, None, None] + pool_bias[:, None, None])
    return F.max_pool2d(z, 2) if pool == "max" else F.avg_pool2d(z, 2) if pool == "avg" else z


def random_connections(c_out, c_in, device):
    """A table with every output channel connected to at least one input and some pairs left out."""
    table = torch.rand(c_out, c_in, device=device) < 0.5
    table[torch.arange(c_out), torch.arange(c_out) % c_in] = True
    table[0, -1] = c_in == 1  # one pair out, at least, wherever there are two inputs
    return table


def compare(shape, activation, pool, device, *, bias=True, connect=False, pool_activation="identity"):
    """Output and every gradient of the fused op against the float64 reference; returns the
    fused gradients by name."""
    N, C_in, H, W, C_out, k, padding = shape
    dtype = kernel_dtype(device)
    inputs = {"x": torch.randn(N, C_in, H, W, device=device), "w": torch.randn(C_out, C_in, k, k, device=device)}
    if bias:
        inputs["b"] = torch.randn(C_out, device=device)
    if pool == "subsample":
        inputs["pool_weight"] = torch.randn(C_out, device=device)
        inputs["pool_bias"] = torch.randn(C_out, device=device)
    connections = random_connections(C_out, C_in, device) if connect else None
    ours = {n: t.to(dtype).requires_grad_() for n, t in inputs.items()}
    theirs = {n: t.double().requires_grad_() for n, t in inputs.items()}

    def call(fn, t):
        extra = dict(pool_weight=t.get("pool_weight"), pool_bias=t.get("pool_bias"),
                     pool_activation=pool_activation) if pool == "subsample" else {}
        return fn(t["x"], t["w"], t.get("b"), padding, activation, pool, connections=connections, **extra)

    y, ref = call(FF.conv2d_act_pool, ours), call(reference, theirs)
    assert y.shape == ref.shape and y.dtype == dtype
    assert rel_err(y, ref) <= TOL[dtype]
    g = torch.randn_like(ref)
    y.backward(g.to(dtype))
    ref.backward(g)
    for name in inputs:
        assert rel_err(ours[name].grad, theirs[name].grad) <= TOL[dtype], name
    if connect:  # an unconnected weight takes no part: exactly zero gradient
        assert ours["w"].grad[~connections].abs().max() == 0
    return {name: t.grad for name, t in ours.items()}


# (N, C_in, H, W, C_out, k, padding): the 1998 LeNet-5's C1 and C3, odd sizes, batch 1, and a batch
# whose weight gradient is split over several programs (more than 1024 conv positions a tile).
SHAPES = [(2, 1, 32, 32, 6, 5, 0), (3, 6, 14, 14, 16, 5, 0), (1, 3, 9, 7, 5, 3, 1), (3, 2, 21, 22, 3, 3, 2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_subsampling_like_pytorch(shape, device):
    compare(shape, "scaled_tanh", "subsample", device, pool_activation="scaled_tanh")


@pytest.mark.parametrize("activation,pool_activation", [("relu", "sigmoid"), ("identity", "tanh"), ("tanh", "relu")])
def test_subsampling_with_other_activations_like_pytorch(activation, pool_activation, device):
    compare((2, 3, 9, 7, 5, 3, 1), activation, "subsample", device, pool_activation=pool_activation)


@pytest.mark.parametrize("bias", [True, False])
def test_subsampling_with_connections_like_pytorch(bias, device):
    compare((3, 6, 14, 14, 16, 5, 0), "scaled_tanh", "subsample", device, bias=bias, connect=True,
            pool_activation="scaled_tanh")


@pytest.mark.parametrize("pool", ["max", "avg", None])
def test_connections_with_every_pool_like_pytorch(pool, device):
    compare((2, 5, 10, 9, 7, 3, 1), "tanh", pool, device, connect=True)


def test_a_nan_in_an_unconnected_weight_stays_out(device):
    """An unconnected weight is absent, not multiplied by zero: a NaN stored there changes nothing."""
    dtype = kernel_dtype(device)
    x = torch.randn(2, 6, 14, 14, device=device, dtype=dtype)
    w = torch.randn(16, 6, 5, 5, device=device, dtype=dtype)
    connections = random_connections(16, 6, device)
    clean = FF.conv2d_act_pool(x, w, None, 0, "scaled_tanh", None, connections=connections)
    w[~connections] = float("nan")
    w.requires_grad_()
    y = FF.conv2d_act_pool(x, w, None, 0, "scaled_tanh", None, connections=connections)
    assert torch.equal(y, clean)
    y.sum().backward()
    assert not w.grad.isnan().any()


def test_subsampling_propagates_nan_and_inf_like_pytorch(device):
    dtype = kernel_dtype(device)
    x = torch.randn(2, 2, 8, 9, device=device, dtype=dtype)
    x[0, 1, 3, 3] = float("nan")
    x[1, 0, 2, 5] = float("inf")
    w, b = torch.randn(3, 2, 3, 3, device=device, dtype=dtype), torch.randn(3, device=device, dtype=dtype)
    pw, pb = torch.randn(3, device=device, dtype=dtype), torch.randn(3, device=device, dtype=dtype)
    ours = [t.clone().requires_grad_() for t in (x, w, b, pw, pb)]
    theirs = [t.double().requires_grad_() for t in (x, w, b, pw, pb)]
    y = FF.conv2d_act_pool(*ours[:3], 1, "scaled_tanh", "subsample", pool_weight=ours[3], pool_bias=ours[4],
                           pool_activation="scaled_tanh")
    ref = reference(*theirs[:3], 1, "scaled_tanh", "subsample", None, *theirs[3:], "scaled_tanh")
    g = torch.randn_like(ref)
    y.backward(g.to(dtype))
    ref.backward(g)
    for what, out, expected in [("output", y, ref)] + [(f"grad {i}", o.grad, t.grad)
                                                        for i, (o, t) in enumerate(zip(ours, theirs))]:
        assert torch.equal(out.isnan(), expected.isnan()), what
        assert torch.equal(out.isinf(), expected.isinf()), what
        finite = expected.isfinite()
        assert rel_err(out[finite], expected[finite]) <= TOL[dtype], what


def test_subsampling_gradients_are_reproducible(device):
    """Two backward passes over a split weight-gradient reduction are bitwise equal."""
    torch.manual_seed(1)
    first = compare((3, 2, 21, 22, 3, 3, 2), "scaled_tanh", "subsample", device, connect=True,
                    pool_activation="scaled_tanh")
    torch.manual_seed(1)
    second = compare((3, 2, 21, 22, 3, 3, 2), "scaled_tanh", "subsample", device, connect=True,
                     pool_activation="scaled_tanh")
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_module_owns_or_borrows_its_subsampling_parameters(device):
    dtype = kernel_dtype(device)
    own = ConvActPool2d(2, 3, 3, pool="subsample", pool_activation="tanh", device=device, dtype=dtype)
    assert [n for n, _ in own.named_parameters()] == ["weight", "bias", "pool_weight", "pool_bias"]
    assert torch.equal(own.pool_weight, torch.ones(3, dtype=dtype, device=device))  # a plain window sum

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, device=device, dtype=dtype))
            self.bias = torch.nn.Parameter(torch.randn(3, device=device, dtype=dtype))

    holder = Holder()
    borrowed = ConvActPool2d(2, 3, 3, pool="subsample", subsampling=holder, device=device, dtype=dtype)
    assert [n for n, _ in borrowed.named_parameters()] == ["weight", "bias"]  # the holder keeps its own
    x = torch.randn(2, 2, 8, 8, device=device, dtype=dtype)
    borrowed(x).sum().backward()
    assert holder.weight.grad is not None and holder.bias.grad is not None


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(pool="subsample"), ValueError, "needs pool_weight"),
    (dict(pool="subsample", pool_weight=torch.ones(4), pool_bias=torch.ones(3)), ValueError,
     r"pool_weight must have shape \(3,\)"),
    (dict(pool="max", pool_weight=torch.ones(3), pool_bias=torch.ones(3)), ValueError, "belong to pool='subsample'"),
    (dict(pool="max", pool_activation="tanh"), ValueError, "belong to pool='subsample'"),
    (dict(pool="subsample", pool_weight=torch.ones(3), pool_bias=torch.ones(3), pool_activation="gelu"), ValueError,
     "unknown pool_activation"),
    (dict(pool=None, connections=torch.ones(3, 2)), TypeError, "connections must be a bool tensor"),
    (dict(pool=None, connections=torch.ones(2, 3, dtype=torch.bool)), ValueError,
     r"connections must have shape \(3, 2\)"),
])
def test_bad_settings_are_refused_with_a_message(kwargs, error, match, device):
    x, w = torch.randn(1, 2, 6, 6, device=device), torch.randn(3, 2, 3, 3, device=device)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    pool = kwargs.pop("pool")
    with pytest.raises(error, match=match):
        FF.conv2d_act_pool(x, w, None, 0, "relu", pool, **kwargs)
