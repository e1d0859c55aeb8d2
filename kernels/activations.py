"""Activation functions and their derivatives, as @triton.jit helpers chosen by a constexpr name.

Each derivative is written in terms of the activation's *output* y = act(z) (relu' = [y > 0], sigmoid'
= y (1 - y), tanh' = 1 - y^2, scaled_tanh' = S (A - y^2 / A)), so the fused layers save nothing extra
for backward. Both compute in float32 (float64 for float64 tensors). Why: docs/design.md, "Activations".
"""
import triton
import triton.language as tl

ACTIVATIONS = ("relu", "sigmoid", "tanh", "scaled_tanh", "identity")
# Those whose act_backward is a product with the upstream gradient: 0 * act'(NaN) there is NaN.
PRODUCT_BACKWARD = ("sigmoid", "tanh", "scaled_tanh")

# The 1998 LeNet-5's squashing function A * tanh(S * z) (LeCun et al., 1998, appendix A): f(1) = 1, f(-1) = -1.
SCALED_TANH_A: tl.constexpr = tl.constexpr(1.7159)
SCALED_TANH_S: tl.constexpr = tl.constexpr(2.0 / 3.0)


@triton.jit
def _tanh(z):
    # Through exp(-2|z|) <= 1 so large |z| never overflows; the sign is restored afterwards.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def act(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        # where(z < 0, 0, z) rather than maximum(z, 0): NaN must propagate as it does in torch.relu.
        return tl.where(z < 0, 0.0, z).to(z.dtype)
    elif ACTIVATION == "sigmoid":
        return 1.0 / (1.0 + tl.exp(-z))
    elif ACTIVATION == "tanh":
        return _tanh(z)
    elif ACTIVATION == "scaled_tanh":
        return _tanh(z * SCALED_TANH_S) * SCALED_TANH_A
    else:
        tl.static_assert(ACTIVATION == "identity", "unknown ACTIVATION")
        return z


@triton.jit
def to_acc(x):
    """x in the kernels' arithmetic type: float64 stays float64, every other float becomes float32
    (float16 and bfloat16 tensors are stored in half precision, computed on in float32)."""
    if x.dtype == tl.float64:
        return x
    else:
        return x.to(tl.float32)


@triton.jit
def act_backward(g, y, ACTIVATION: tl.constexpr):
    """dL/dz from the upstream gradient g = dL/dy and the output y = act(z), computed as PyTorch's
    own backward formulas do, so NaN and Inf travel the same way: relu is a select, never a product
    (threshold_backward: a NaN output passes g through, and an infinite g at y <= 0 gives 0, not
    inf * 0), sigmoid is g (1 - y) y and tanh g (1 - y^2). Returns float32 (float64 for float64)."""
    g = to_acc(g)
    y = to_acc(y)
    if ACTIVATION == "relu":
        return tl.where(y <= 0, 0.0, g).to(g.dtype)
    elif ACTIVATION == "sigmoid":
        return g * (1.0 - y) * y
    elif ACTIVATION == "tanh":
        return g * (1.0 - y * y)
    elif ACTIVATION == "scaled_tanh":
        # y = A tanh(S z): dy/dz = A S (1 - tanh^2) = S (A - y^2 / A).
        return g * ((y * y * (-1.0 / SCALED_TANH_A) + SCALED_TANH_A) * SCALED_TANH_S)
    else:
        tl.static_assert(ACTIVATION == "identity", "unknown ACTIVATION")
        return g
