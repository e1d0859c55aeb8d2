"""The fused ops against the PyTorch composition, forward and every gradient.

Runs the Triton kernels on the CPU through Triton's interpreter (conftest.py), or compiled on CUDA
when present. The reference is the stock PyTorch composition in float64; the error measure is
||out - ref|| / ||ref||. Every kernel output is poisoned with NaN before the launch, so an element a
kernel forgets to write fails the comparison.
"""
import pytest
import torch
import torch.nn.functional as F

from fastlenet import functional as FF
from fastlenet.kernels.launch import poison_outputs, record_launches
from utils import ACT, PARAMETERLESS_POOLS, POOL, rel_err

# Relative-error tolerances, by kernel dtype (TF32 is off here on CUDA: conftest.py; TF32 has its own
# tolerances, derived in test_tf32.py).
#  float64: the interpreter computes in float64 too; only summation order differs (~1e-15).
#  float32 (IEEE dot): fp32 accumulation over K <= a few hundred terms, ~1e-7 * sqrt(K) typical.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


pytestmark = pytest.mark.usefixtures("poisoned")


def conv_reference(x, w, b, padding, activation, pool):
    return POOL[pool](ACT[activation](F.conv2d(x, w, b, padding=padding)), 2)


def leaves(*tensors, dtype, device):
    return [t.to(device=device, dtype=dtype).detach().requires_grad_() if t is not None else None
            for t in tensors]


def check_conv(shape, activation, pool, dtype, device, bias=True, tol=None):
    N, C_in, H, W, C_out, k, p = shape
    x0, w0 = torch.randn(N, C_in, H, W), torch.randn(C_out, C_in, k, k) / k
    b0 = torch.randn(C_out) if bias else None
    x, w, b = leaves(x0, w0, b0, dtype=dtype, device=device)
    xr, wr, br = leaves(x0, w0, b0, dtype=torch.float64, device=device)
    y = FF.conv2d_act_pool(x, w, b, padding=p, activation=activation, pool=pool)
    ref = conv_reference(xr, wr, br, p, activation, pool)
    assert y.shape == ref.shape and y.dtype == dtype
    g = torch.randn_like(ref)
    y.backward(g.to(dtype))
    ref.backward(g)
    tol = tol or TOL[dtype]
    assert rel_err(y, ref) <= tol, ("output", rel_err(y, ref))
    for name, t, r in (("x", x, xr), ("weight", w, wr), ("bias", b, br)):
        if t is not None:
            assert rel_err(t.grad, r.grad) <= tol, (f"grad {name}", rel_err(t.grad, r.grad))


# (N, C_in, H, W, C_out, k, padding): odd H/W, C_out not a power of two, batch 1 and 3, kernels
# 1/3/5/7, paddings 0..3, LeNet's own layers (conv1 at batch 3 also splits the weight-gradient
# reduction over several programs).
CONV_SHAPES = [
    (1, 1, 7, 9, 6, 5, 2),
    (3, 3, 9, 7, 5, 3, 1),
    (2, 2, 5, 6, 7, 1, 0),
    (1, 2, 6, 5, 3, 3, 2),
    (3, 1, 28, 28, 6, 5, 2),
    (2, 6, 14, 14, 16, 5, 0),
    (1, 2, 9, 8, 3, 7, 3),  # the largest supported kernel and padding
]


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv_act_pool_shapes(shape, device):
    check_conv(shape, "relu", "max", torch.float32, device)


# Without pooling the output keeps the odd last row/column that 2x2 pooling drops; 1x1 and 7x7
# kernels, every padding.
@pytest.mark.parametrize("shape", [CONV_SHAPES[i] for i in (0, 2, 3, 6)], ids=lambda s: "x".join(map(str, s)))
def test_conv_act_without_pool_shapes(shape, device):
    check_conv(shape, "tanh", None, torch.float32, device)


@pytest.mark.parametrize("activation", FF.ACTIVATIONS)
@pytest.mark.parametrize("pool", PARAMETERLESS_POOLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_act_pool_every_activation_and_pool(activation, pool, dtype, device):
    if dtype == torch.float64 and device.type == "cuda":
        pytest.skip("float64 is supported under the interpreter only")
    check_conv((3, 2, 9, 7, 5, 3, 1), activation, pool, dtype, device)


def test_conv_act_pool_without_bias(device):
    check_conv((2, 3, 8, 7, 4, 3, 1), "tanh", "avg", torch.float32, device, bias=False)


def test_conv_skips_grad_input_when_not_needed(device):
    x = torch.randn(2, 1, 8, 8, device=device)
    w = torch.randn(3, 1, 3, 3, device=device, requires_grad=True)
    y = FF.conv2d_act_pool(x, w, None, padding=1)
    with record_launches() as launches:
        y.sum().backward()
    assert [launch.name for launch in launches] == ["conv2d_act_pool_bwd_kernel"]  # no dz, no grad-input
    assert x.grad is None and w.grad is not None


# (N, C_in, H, W, C_out, k, padding): two output-channel blocks (20 > 16), odd sizes, paddings 0..2.
TRIP_SHAPES = [(2, 6, 14, 14, 20, 5, 0), (1, 3, 9, 7, 5, 3, 1), (3, 2, 6, 5, 17, 3, 2)]


@pytest.mark.parametrize("pool", ["max", None])
@pytest.mark.parametrize("shape", TRIP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_grad_input_sums_a_filter_row_a_trip_as_a_tap_a_trip(shape, pool, device, monkeypatch):
    """Grad-input takes a whole filter row a trip where its registers allow it (TF32 dots, LeNet's
    conv2) and one tap a trip elsewhere, which is all the interpreter picks (its dots are IEEE).
    Both add the taps' dots in the same order, so in float64 they agree bit for bit, and with the
    reference."""
    from fastlenet.kernels import conv_act_pool as conv

    N, C_in, H, W, C_out, k, p = shape
    x0, w0 = torch.randn(N, C_in, H, W), torch.randn(C_out, C_in, k, k) / k
    xr, wr = leaves(x0, w0, dtype=torch.float64, device=device)
    ref = conv_reference(xr, wr, None, p, "tanh", pool)
    g = torch.randn_like(ref)
    ref.backward(g)
    chosen = conv._grad_input_options
    grads = []
    for taps in (1, k):
        monkeypatch.setattr(conv, "_grad_input_options", lambda *args, taps=taps, **kw: {**chosen(*args, **kw),
                                                                                         "TAPS": taps})
        x, w = leaves(x0, w0, dtype=torch.float64, device=device)
        y = FF.conv2d_act_pool(x, w, None, padding=p, activation="tanh", pool=pool)
        with record_launches() as launches:
            y.backward(g)
        assert [launch.meta["TAPS"] for launch in launches if launch.name == "conv2d_act_pool_dx_kernel"] == [taps]
        assert rel_err(x.grad, xr.grad) <= TOL[torch.float64]
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def test_lenets_conv2_takes_a_filter_row_a_trip_with_tf32_dots():
    from fastlenet.kernels.launch import record

    x = torch.randn(4, 6, 14, 14, requires_grad=True)
    w = torch.randn(16, 6, 5, 5, requires_grad=True)
    taps = {precision: [(launch.meta["TAPS"], launch.meta["BLOCK_N"])
                        for launch in record(lambda: FF.conv2d_act_pool(x, w, None).sum().backward(), precision)
                        if launch.name == "conv2d_act_pool_dx_kernel"]
            for precision in ("tf32", "ieee")}
    assert taps == {"tf32": [(5, 16)], "ieee": [(1, 16)]}


def test_conv_noncontiguous_input(device):
    base = torch.randn(2, 9, 7, 3, device=device)  # NHWC storage, viewed as NCHW
    x = base.permute(0, 3, 1, 2).requires_grad_()
    assert not x.is_contiguous()
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    y = FF.conv2d_act_pool(x, w, None, padding=1)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = conv_reference(xr, wr, None, 1, "relu", "max")
    y.sum().backward()
    ref.sum().backward()
    assert rel_err(y, ref) <= TOL[torch.float32]
    assert rel_err(x.grad, xr.grad) <= TOL[torch.float32]
    assert rel_err(w.grad, wr.grad) <= TOL[torch.float32]


def test_max_pool_ties_send_the_gradient_to_the_first_maximum(device):
    # A constant image through a 1x1 identity conv: every window is a 4-way tie.
    x = torch.ones(1, 1, 4, 6, device=device, requires_grad=True)
    w = torch.ones(1, 1, 1, 1, device=device)
    FF.conv2d_act_pool(x, w, None, activation="identity").sum().backward()
    xr = x.detach().clone().requires_grad_()
    F.max_pool2d(xr, 2).sum().backward()
    assert torch.equal(x.grad, xr.grad)
    assert x.grad[0, 0, 0, :].tolist() == [1, 0, 1, 0, 1, 0]


def test_empty_batch(device):
    x = torch.randn(0, 2, 8, 8, device=device, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    y = FF.conv2d_act_pool(x, w, b)
    assert y.shape == (0, 3, 3, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("layer", [pytest.param("conv", marks=pytest.mark.slow), "linear"])
def test_a_wide_split_reduces_in_two_levels(layer, device):
    """Over 16 splits a tile's partials are summed in groups, then the group sums (split_reduce.py):
    24 x 28 x 28 conv positions take 19 splits, 4200 rows of a linear layer 17."""
    if layer == "conv":
        shape = (24, 1, 28, 28, 6, 5, 2)
        def run():
            check_conv(shape, "relu", "max", torch.float32, device)
    else:
        x0, w0, b0 = torch.randn(4200, 7), torch.randn(5, 7), torch.randn(5)
        (x, w, b), (xr, wr, br) = (leaves(x0, w0, b0, dtype=dt, device=device)
                                   for dt in (torch.float32, torch.float64))

        def run():
            FF.linear_act(x, w, b, "tanh").square().sum().backward()
            torch.tanh(F.linear(xr, wr, br)).square().sum().backward()
            for t, r in ((x, xr), (w, wr), (b, br)):
                assert rel_err(t.grad, r.grad) <= TOL[torch.float32]
    with record_launches() as launches, poison_outputs():
        run()
    [backward] = [launch for launch in launches if launch.name.endswith("_bwd_kernel")]
    split, group = backward.args["SPLIT"], backward.args["GROUP"]
    assert split > 16 and 1 < group < split, (split, group)


@pytest.mark.parametrize("pool", ["max", None])
def test_weight_gradient_is_bitwise_reproducible(pool, device):
    # 4 x 32 x 32 conv positions: the weight-gradient reduction is split over several programs.
    x = torch.randn(4, 1, 32, 32, device=device)
    w = torch.randn(6, 1, 5, 5, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    grads = []
    for _ in range(2):
        w.grad = b.grad = None
        FF.conv2d_act_pool(x, w, b, padding=2, pool=pool).square().sum().backward()
        grads.append((w.grad.clone(), b.grad.clone()))
    assert all(torch.equal(g0, g1) for g0, g1 in zip(*grads))


# ---------------------------------------------------------------------------------------------
# linear + activation
# ---------------------------------------------------------------------------------------------

LINEAR_SHAPES = [((1,), 7, 5), ((3,), 400, 120), ((130,), 84, 10), ((2, 3), 17, 9), ((600,), 33, 17)]


@pytest.mark.parametrize("lead,k,n", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("activation", FF.ACTIVATIONS)
def test_linear_act(lead, k, n, activation, device):
    x0, w0, b0 = torch.randn(*lead, k), torch.randn(n, k) / k**0.5, torch.randn(n)
    x, w, b = leaves(x0, w0, b0, dtype=torch.float32, device=device)
    xr, wr, br = leaves(x0, w0, b0, dtype=torch.float64, device=device)
    y = FF.linear_act(x, w, b, activation)
    ref = ACT[activation](F.linear(xr, wr, br))
    assert y.shape == ref.shape
    g = torch.randn_like(ref)
    y.backward(g.float())
    ref.backward(g)
    assert rel_err(y, ref) <= TOL[torch.float32]
    for t, r in ((x, xr), (w, wr), (b, br)):
        assert rel_err(t.grad, r.grad) <= TOL[torch.float32]


def test_linear_1d_input_and_no_bias(device):
    x = torch.randn(7, device=device, dtype=torch.float64)
    w = torch.randn(5, 7, device=device, dtype=torch.float64)
    if device.type == "cuda":
        x, w = x.float(), w.float()
    y = FF.linear_act(x, w, None, "tanh")
    assert y.shape == (5,)
    assert rel_err(y, torch.tanh(F.linear(x.double(), w.double()))) <= TOL[torch.float32]


def test_linear_noncontiguous_input(device):
    x = torch.randn(9, 6, device=device).t().requires_grad_()  # (6, 9), strides (1, 6)
    w = torch.randn(4, 9, device=device, requires_grad=True)
    y = FF.linear_act(x, w, None, "sigmoid")
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.sigmoid(F.linear(xr, wr))
    y.sum().backward()
    ref.sum().backward()
    assert rel_err(y, ref) <= TOL[torch.float32]
    assert rel_err(x.grad, xr.grad) <= TOL[torch.float32]
    assert rel_err(w.grad, wr.grad) <= TOL[torch.float32]


# ---------------------------------------------------------------------------------------------
# gradcheck (float64 under the interpreter)
# ---------------------------------------------------------------------------------------------

needs_interpreter = pytest.mark.skipif(torch.cuda.is_available(),
                                       reason="float64 kernels run under the interpreter only")


@needs_interpreter
@pytest.mark.parametrize("activation,pool", [("tanh", "max"), ("sigmoid", "avg"), ("tanh", None)])
def test_gradcheck_conv_act_pool(activation, pool):
    # Without pooling every conv position is an output: a smaller input keeps gradcheck's many
    # forward calls (one per input element and direction) as quick as the pooled cases.
    x = torch.randn(*((1, 2, 4, 3) if pool is None else (2, 2, 5, 6)), dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: FF.conv2d_act_pool(x, w, b, padding=1, activation=activation, pool=pool),
        (x, w, b))


@needs_interpreter
def test_gradcheck_linear_act_and_cross_entropy():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 1])
    assert torch.autograd.gradcheck(lambda x, w, b: FF.linear_act(x, w, b, "tanh"), (x, w, b))
    assert torch.autograd.gradcheck(lambda z: FF.cross_entropy(z, target), (x,))


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_conv_errors_name_the_shapes(device):
    x = torch.randn(2, 3, 8, 8, device=device)
    w = torch.randn(4, 3, 3, 3, device=device)
    with pytest.raises(ValueError, match=r"\(N, C_in, H, W\) or unbatched \(C_in, H, W\).*\(8, 8\)"):
        FF.conv2d_act_pool(x[0, 0], w)
    with pytest.raises(ValueError, match=r"input has 2 channels \(shape \(1, 2, 8, 8\)\)"):
        FF.conv2d_act_pool(x[0, :2], w)  # unbatched, named as the batch of one it runs as
    with pytest.raises(ValueError, match=r"2 channels.*\(4, 3, 3, 3\)"):
        FF.conv2d_act_pool(x[:, :2], w)
    with pytest.raises(ValueError, match=r"kernel 7x7 is larger than the padded input 6x6"):
        FF.conv2d_act_pool(torch.randn(1, 3, 4, 4, device=device), torch.randn(2, 3, 7, 7, device=device),
                           padding=1)
    with pytest.raises(ValueError, match="too small for 2x2 pooling"):
        FF.conv2d_act_pool(torch.randn(1, 3, 3, 3, device=device), w)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        FF.conv2d_act_pool(x, w, torch.randn(5, device=device))
    with pytest.raises(ValueError, match="kernel size 9"):
        FF.conv2d_act_pool(torch.randn(1, 3, 20, 20, device=device), torch.randn(2, 3, 9, 9, device=device))
    with pytest.raises(ValueError, match="padding"):
        FF.conv2d_act_pool(x, w, padding=4)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        FF.conv2d_act_pool(x, w, activation="gelu")
    with pytest.raises(ValueError, match="unknown pool 'lp'"):
        FF.conv2d_act_pool(x, w, pool="lp")


def test_dtype_and_device_errors(device):
    x = torch.randn(2, 3, 8, 8, device=device)
    w = torch.randn(4, 3, 3, 3, device=device)
    with pytest.raises(TypeError, match="input has dtype torch.int32; the fused kernels support"):
        FF.conv2d_act_pool(x.int(), w.int())
    # Under the interpreter float32 and float64 are both supported, so mixing them is the error; on
    # CUDA float64 itself is refused first.
    mixed = "share one dtype" if device.type == "cpu" else "weight has dtype torch.float64"
    with pytest.raises(TypeError, match=mixed):
        FF.conv2d_act_pool(x, w.double())
    with pytest.raises(RuntimeError, match="one device.*meta"):
        FF.conv2d_act_pool(x, w.to("meta"))
    with pytest.raises(ValueError, match=r"input \(2, 5\) has 5 features but weight \(4, 6\)"):
        FF.linear_act(torch.randn(2, 5, device=device), torch.randn(4, 6, device=device))
    with pytest.raises(TypeError, match="int64"):
        FF.cross_entropy(torch.randn(2, 10, device=device), torch.tensor([1, 2], device=device, dtype=torch.int32))


def test_cpu_without_interpreter_names_both_options(monkeypatch):
    monkeypatch.setattr(FF, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA.*TRITON_INTERPRET=1"):
        FF.linear_act(torch.randn(2, 3), torch.randn(4, 3))
