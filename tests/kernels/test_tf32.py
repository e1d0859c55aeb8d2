"""TF32: the kernels follow PyTorch's switches, and the TF32 tolerances are derived, not guessed.

On CUDA, float32 dots run in TF32 when PyTorch would use it for the same work (convolutions: on by
default; matmuls: off by default). tl.dot in TF32 feeds the raw fp32 bits to the tensor cores, which
read 10 of the 23 mantissa bits: each operand is truncated (relative error < 2^-10), products and
sums stay fp32. The bias gradient is summed outside the dot, in full fp32.

The tolerances of the CUDA test below come from an emulation that runs anywhere: the PyTorch
composition in float64 with every dot operand truncated to TF32 exactly where the kernels' dots
truncate it (forward: input patches and weights; backward: dL/dz and the weights or the patches;
the bias and its gradient untouched), compared with the exact float64 result over 20 seeds. Besides
the rounding itself, TF32 can flip a max-pooling argmax between two near-equal window values, which
moves that element's gradient to the neighbouring position, and a relu output within rounding
of 0 can land on either side of it, which keeps or drops that element's gradient: rare, but an
error of the order of one gradient element, not of 2^-10. So where a relu or a max pool can flip,
gradients get a loose tolerance; where nothing can flip (smooth activation, average pooling), the
TF32 rounding alone bounds them. Each tolerance is about twice the worst of 20 seeds (2026-11:
output 9.2e-4; gradients 1e-1 with relu / max pooling, 8.4e-4 without).
"""
import pytest
import torch
import torch.nn.functional as F

from fastlenet import functional as FF
from fastlenet.kernels.launch import poison_outputs, tf32_enabled

from utils import ACT, POOL, rel_err, set_tf32


# Relative error ||out - ref|| / ||ref|| allowed with TF32 dots, against the exact float64 result:
# the output; gradients where a relu or max pool can flip, and where nothing can; and the bias
# gradient of a layer where nothing can flip, which no TF32 dot touches (fp32 summation only).
TF32_TOL = {"output": 2e-3, "grad, flips": 2e-1, "grad, smooth": 2e-3, "bias, smooth": 1e-5}

# (N, C_in, H, W, C_out, k, padding, activation, pool): LeNet-5's two convolutions at batch 4, a
# sigmoid + average pool layer, and a linear one (identity + average pool: dL/dz = g / 4 exactly).
TF32_CONV_CASES = [
    (4, 1, 28, 28, 6, 5, 2, "relu", "max"),
    (4, 6, 14, 14, 16, 5, 0, "relu", "max"),
    (4, 3, 12, 12, 8, 3, 1, "sigmoid", "avg"),
    (4, 3, 12, 12, 8, 3, 1, "identity", "avg"),
]


def can_flip(case) -> bool:
    return case[7] == "relu" or case[8] == "max"


def check_tf32_errors(case, err, bias_tol):
    assert err["output"] <= TF32_TOL["output"], err
    grad_tol = TF32_TOL["grad, flips"] if can_flip(case) else TF32_TOL["grad, smooth"]
    assert max(err["grad x"], err["grad weight"], err["bias"]) <= grad_tol, err
    if case[7] == "identity":
        assert err["bias"] <= bias_tol, err


def to_tf32(t: torch.Tensor) -> torch.Tensor:
    """The value the tensor cores read from these fp32 bits: the low 13 mantissa bits dropped."""
    bits = t.float().view(torch.int32) & ~0x1FFF
    return bits.view(torch.float32).to(t.dtype)


class _TruncateGrad(torch.autograd.Function):
    """Identity forward; backward hands on the gradient truncated to TF32 (a dot operand)."""

    @staticmethod
    def forward(ctx, z):
        return z.view_as(z)

    @staticmethod
    def backward(ctx, g):
        return to_tf32(g)


def tf32_operand(t):
    """t as a TF32 dot operand in the forward, with an identity gradient."""
    return t + (to_tf32(t) - t).detach()


def conv_tf32_emulated(x, w, b, padding, activation, pool):
    z = F.conv2d(tf32_operand(x), tf32_operand(w), None, padding=padding)
    z = _TruncateGrad.apply(z) + b[None, :, None, None]
    return POOL[pool](ACT[activation](z), 2)


def conv_exact(x, w, b, padding, activation, pool):
    return POOL[pool](ACT[activation](F.conv2d(x, w, b, padding=padding)), 2)


def conv_case(case, seed, device, dtype):
    N, C_in, H, W, C_out, k, p, activation, pool = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C_in, H, W, generator=g)
    w = torch.randn(C_out, C_in, k, k, generator=g) / k
    b = torch.randn(C_out, generator=g)
    up = torch.randn(N, C_out, (H + 2 * p - k + 1) // 2, (W + 2 * p - k + 1) // 2, generator=g)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, w, b)], up.to(device, dtype)


def errors(fn, case, seed, device, dtype):
    """Relative errors of fn's output and gradients against the exact float64 composition."""
    (x, w, b), up = conv_case(case, seed, device, dtype)
    (xr, wr, br), upr = conv_case(case, seed, device, torch.float64)
    p, activation, pool = case[6:]
    y = fn(x, w, b, p, activation, pool)
    ref = conv_exact(xr, wr, br, p, activation, pool)
    y.backward(up)
    ref.backward(upr)
    return {"output": rel_err(y, ref), "grad x": rel_err(x.grad, xr.grad),
            "grad weight": rel_err(w.grad, wr.grad), "bias": rel_err(b.grad, br.grad)}


@pytest.mark.parametrize("case", TF32_CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_tf32_tolerances_hold_for_20_seeds_of_the_emulated_rounding(case):
    worst = {}
    for seed in range(20):
        for name, err in errors(conv_tf32_emulated, case, seed, "cpu", torch.float64).items():
            worst[name] = max(worst.get(name, 0.0), err)
    # The bias gradient never goes through a TF32 dot: exact in the emulation.
    check_tf32_errors(case, worst, bias_tol=1e-12)
    # The emulation is live: TF32 rounding is visible in every case.
    assert worst["output"] > 1e-5, worst


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists on CUDA only")
@pytest.mark.parametrize("case", TF32_CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv_act_pool_in_tf32_on_cuda(case, device, tf32):
    assert tf32_enabled("conv")
    with poison_outputs():
        err = errors(FF.conv2d_act_pool, case, 0, device, torch.float32)
    # Summed in fp32 beside the dot, the bias gradient keeps float32 accuracy.
    check_tf32_errors(case, err, bias_tol=TF32_TOL["bias, smooth"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists on CUDA only")
def test_linear_act_in_tf32_on_cuda(device, tf32):
    assert tf32_enabled("matmul")
    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(130, 400, generator=g), torch.randn(120, 400, generator=g) / 20
    b0 = torch.randn(120, generator=g)
    x, w, b = (t.to(device).requires_grad_() for t in (x0, w0, b0))
    xr, wr, br = (t.to(device, torch.float64).requires_grad_() for t in (x0, w0, b0))
    with poison_outputs():
        y = FF.linear_act(x, w, b, activation="identity")
    ref = F.linear(xr, wr, br)
    up = torch.randn(ref.shape, generator=g).to(device)
    y.backward(up)
    ref.backward(up.double())
    # Nothing can flip here: the output and gradients carry TF32 rounding only, and the bias
    # gradient (the column sums of the upstream gradient, in fp32) none.
    assert rel_err(y, ref) <= TF32_TOL["output"]
    assert max(rel_err(x.grad, xr.grad), rel_err(w.grad, wr.grad)) <= TF32_TOL["grad, smooth"]
    assert rel_err(b.grad, br.grad) <= TF32_TOL["bias, smooth"]


@pytest.mark.parametrize("kind", ["conv", "matmul"])
def test_tf32_switches_are_read_as_pytorch_reads_them_and_never_raise(kind):
    restore = set_tf32(False)
    try:
        assert not tf32_enabled(kind)
        set_tf32(True)
        assert tf32_enabled(kind)
        if hasattr(torch.backends, "fp32_precision"):
            # Mixing the new API with the legacy one makes PyTorch's legacy getters raise
            # ("...a mix of the legacy and new APIs..."): the kernels must not.
            torch.backends.cudnn.conv.fp32_precision = "ieee"
            torch.backends.cudnn.rnn.fp32_precision = "tf32"
            torch.backends.cuda.matmul.fp32_precision = "ieee"
            with pytest.raises(RuntimeError):
                torch.backends.cudnn.allow_tf32  # noqa: B018 - the read itself is what raises
            assert not tf32_enabled(kind)
    finally:
        restore()
