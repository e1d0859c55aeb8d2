"""Activation functions and their derivatives, as @triton.jit helpers chosen by a constexpr name.

Every derivative is written in terms of the activation's *output* y = act(z), not its input z. That is
the whole trick that lets the fused layers save nothing extra for backward: relu'(z) = [y > 0],
sigmoid'(z) = y (1 - y), tanh'(z) = 1 - y^2. The output is what the next layer keeps anyway.
"""
import triton
import triton.language as tl

ACTIVATIONS = ("relu", "sigmoid", "tanh", "identity")


@triton.jit
def act(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        # where(z < 0, 0, z) rather than maximum(z, 0): NaN must propagate as it does in torch.relu.
        return tl.where(z < 0, 0.0, z).to(z.dtype)
    elif ACTIVATION == "sigmoid":
        return 1.0 / (1.0 + tl.exp(-z))
    elif ACTIVATION == "tanh":
        # Through exp(-2|z|) <= 1 so large |z| never overflows; the sign is restored afterwards.
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(z < 0, -t, t)
    else:
        tl.static_assert(ACTIVATION == "identity", "unknown ACTIVATION")
        return z


@triton.jit
def act_grad(y, ACTIVATION: tl.constexpr):
    """d act / d z, evaluated from the output y = act(z)."""
    if ACTIVATION == "relu":
        return tl.where(y > 0, 1.0, 0.0).to(y.dtype)
    elif ACTIVATION == "sigmoid":
        return y * (1.0 - y)
    elif ACTIVATION == "tanh":
        return 1.0 - y * y
    else:
        tl.static_assert(ACTIVATION == "identity", "unknown ACTIVATION")
        return tl.full(y.shape, 1.0, y.dtype)
