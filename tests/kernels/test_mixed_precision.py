"""float16 and bfloat16: the fused layers and the loss in half precision, and under torch.autocast.

The reference is the PyTorch composition in float64, computed from the same half-precision inputs
(rounded once, as the kernels see them). Errors are relative, ||out - ref|| / ||ref||. Tolerances:
- float16: 2e-3, four units of float16 rounding (2^-11 = 4.9e-4). The kernels accumulate in float32;
  what is left is the rounding of their outputs and, in backward, of dL/dz to float16 before the
  GEMMs, as cuDNN and cuBLAS round their half operands. Measured: 1.4e-4..6e-4.
- bfloat16: 1.6e-2, four units of bfloat16 rounding (2^-8 = 3.9e-3), FlagGems' bfloat16 tolerance
  (Liger uses 5e-2). Measured for cross-entropy: 3.5e-3..4.1e-3.
Triton's interpreter multiplies bfloat16 dot operands as raw bit patterns (triton-lang/triton#11584),
so on the CPU the conv and linear layers refuse bfloat16 with an error that says so, and run it only
on a GPU; cross-entropy has no dot and runs bfloat16 everywhere.
"""
import pytest
import torch
import torch.nn.functional as F

from fastlenet import functional as FF
from fastlenet.kernels.launch import interpreting
from fastlenet.models import LeNet5
from utils import ACT, POOL, rel_err

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
HALF = tuple(TOL)
# bfloat16 GEMMs need a GPU (see the module docstring).
GEMM_DTYPES = (torch.float16,) if interpreting() else HALF

pytestmark = pytest.mark.usefixtures("poisoned")


def half_leaves(*shapes, dtype, device, scale=1.0):
    """Random half-precision leaves and their float64 twins (the same rounded values)."""
    halves = [(torch.randn(*s) * scale).to(device=device, dtype=dtype).requires_grad_() for s in shapes]
    return halves, [h.detach().double().requires_grad_() for h in halves]


def assert_close_rel(got, want, dtype, what):
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}"
    err = rel_err(got, want)
    assert err < TOL[dtype], f"{what}: relative error {err:.2e} >= {TOL[dtype]:.1e}"


def check_layer(y, inputs, ref, ref_inputs, dtype):
    """The output and the gradient of every input (one upstream gradient for both) within TOL."""
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, g)
    ref_grads = torch.autograd.grad(ref, ref_inputs, g.double())
    assert_close_rel(y, ref, dtype, "output")
    for name, got, want in zip(("input", "weight", "bias"), grads, ref_grads):
        assert_close_rel(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
@pytest.mark.parametrize("shape,activation,pool,padding", [
    ((2, 3, 9, 7, 5, 3), "relu", "max", 1),  # odd H and W
    ((1, 4, 12, 12, 6, 5), "tanh", "avg", 2),  # batch 1, LeNet's kernel size
    ((3, 5, 8, 11, 7, 3), "sigmoid", None, 0),  # no pooling, channels not powers of two
    ((2, 1, 10, 10, 20, 1), "identity", "avg", 0),  # kernel size 1
])
def test_conv_half(shape, activation, pool, padding, dtype, device):
    N, C_in, H, W, C_out, k = shape
    (x, w, b), (xd, wd, bd) = half_leaves((N, C_in, H, W), (C_out, C_in, k, k), (C_out,), dtype=dtype,
                                          device=device, scale=0.5)
    y = FF.conv2d_act_pool(x, w, b, padding, activation, pool)
    ref = POOL[pool](ACT[activation](F.conv2d(xd, wd, bd, padding=padding)), 2)
    check_layer(y, (x, w, b), ref, (xd, wd, bd), dtype)


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
@pytest.mark.parametrize("m,k,n,activation", [(5, 33, 17, "tanh"), (64, 16, 10, "relu"), (1, 7, 3, "sigmoid")])
def test_linear_half(m, k, n, activation, dtype, device):
    (x, w, b), (xd, wd, bd) = half_leaves((m, k), (n, k), (n,), dtype=dtype, device=device, scale=0.5)
    y = FF.linear_act(x, w, b, activation)
    ref = ACT[activation](F.linear(xd, wd, bd))
    check_layer(y, (x, w, b), ref, (xd, wd, bd), dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("batch,classes", [(6, 10), (33, 100)])
def test_cross_entropy_half(batch, classes, dtype, device):
    (logits,), (ld,) = half_leaves((batch, classes), dtype=dtype, device=device, scale=2.0)
    target = torch.randint(0, classes, (batch,), device=device)
    target[0] = -100
    loss = FF.cross_entropy(logits, target)
    ref = F.cross_entropy(ld, target)
    (d,), (rd,) = torch.autograd.grad(loss, (logits,)), torch.autograd.grad(ref, (ld,))
    assert_close_rel(loss, ref, dtype, "loss")
    assert_close_rel(d, rd, dtype, "grad logits")


@pytest.mark.skipif(not interpreting(), reason="the interpreter's bfloat16 limitation")
def test_bfloat16_gemms_are_refused_under_the_interpreter_with_the_reason(device):
    x, w = torch.randn(2, 3, 8, 8, device=device), torch.randn(4, 3, 3, 3, device=device)
    with pytest.raises(TypeError, match="bfloat16, which needs a CUDA GPU: Triton's interpreter"):
        FF.conv2d_act_pool(x.bfloat16(), w.bfloat16())
    with pytest.raises(TypeError, match="bfloat16, which needs a CUDA GPU"):
        FF.linear_act(torch.randn(2, 5, device=device).bfloat16(), torch.randn(4, 5, device=device).bfloat16())


def test_mixed_dtypes_outside_autocast_are_refused(device):
    with pytest.raises(TypeError, match="share one dtype, got input torch.float16, weight torch.float32"):
        FF.linear_act(torch.randn(2, 5, device=device).half(), torch.randn(4, 5, device=device))


def _autocast_device(device):
    return device.type  # autocast on the CPU runs the same registration as on CUDA


def test_autocast_runs_the_layers_in_half_and_the_loss_in_float32(device):
    """Under autocast the fused layers take float32 master weights, compute in the autocast dtype,
    and the weights' gradients come back float32; the loss runs in float32, as F.cross_entropy."""
    torch.manual_seed(0)
    model = LeNet5("lenet5", fused=True).to(device)
    reference = LeNet5("lenet5", fused=False).to(device).double()
    reference.load_state_dict({k: v.half().double() for k, v in model.state_dict().items()})
    x = torch.randn(3, 1, 28, 28, device=device)
    target = torch.tensor([1, 0, 9], device=device)
    with torch.autocast(_autocast_device(device), dtype=torch.float16):
        logits = model(x)
        loss = FF.cross_entropy(logits, target)
    assert logits.dtype == torch.float16 and loss.dtype == torch.float32
    loss.backward()
    ref_loss = F.cross_entropy(reference(x.half().double()), target)
    ref_loss.backward()
    ref_grads = dict(reference.named_parameters())
    assert rel_err(loss, ref_loss) < TOL[torch.float16]
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32, name
        # Half-precision activations between layers: a few roundings more than one layer.
        assert rel_err(p.grad, ref_grads[name].grad) < 5 * TOL[torch.float16], name


def test_autocast_bfloat16_under_the_interpreter_names_the_reason(device):
    if not interpreting():
        pytest.skip("compiled kernels take bfloat16")
    model = LeNet5("lenet5", fused=True).to(device)
    with torch.autocast(_autocast_device(device), dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"input has dtype torch.bfloat16|bfloat16, which needs a CUDA GPU"):
            model(torch.randn(2, 1, 28, 28, device=device))


def test_compiled_autocast_step(device):
    """torch.compile traces the autocast casts of the ops (no graph break) and trains as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LeNet5("lenet5", fused=True).to(device)
    x = torch.randn(2, 1, 28, 28, device=device)
    target = torch.tensor([3, 7], device=device)

    def step(model, x, target):
        with torch.autocast(_autocast_device(device), dtype=torch.float16):
            return FF.cross_entropy(model(x), target)

    eager = step(model, x, target)
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(model, x, target)
    got.backward()
    torch.testing.assert_close(got, eager)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=n)
