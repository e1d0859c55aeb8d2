"""The functional API of the fused layers: validation, autograd Functions, dispatch to the kernels.

Everything here knows autograd and nothing of pointers; fastlenet.kernels knows pointers and nothing
of autograd. There is no PyTorch fallback: a tensor the kernels cannot take raises an error that
says what to do, because a silent fallback would hide exactly what this library exists to show.
"""
from __future__ import annotations

import torch

from fastlenet.kernels import conv_act_pool as _conv
from fastlenet.kernels import cross_entropy as _xent
from fastlenet.kernels import linear_act as _linear
from fastlenet.kernels.activations import ACTIVATIONS
from fastlenet.kernels.conv_act_pool import POOLS
from fastlenet.kernels.launch import executing, interpreting

__all__ = ["conv2d_act_pool", "linear_act", "cross_entropy", "ACTIVATIONS", "POOLS"]

MAX_KERNEL_SIZE = 7
MAX_PADDING = 3


# --------------------------------------------------------------------------------------------------
# Validation shared by the three ops
# --------------------------------------------------------------------------------------------------

def _check_tensors(op: str, **tensors: torch.Tensor | None) -> None:
    """Same device, a device the kernels can run on, and a dtype they support.

    The common case (one device, one supported dtype) costs a few attribute reads; only a tensor
    that fails a check takes the slow path, which builds the message naming it."""
    items = iter(tensors.items())
    _, first = next(items)  # the input (or logits): present, floating point
    device, dtype = first.device, first.dtype
    for name, t in items:
        if t is not None and (t.device != device or (name != "target" and t.dtype != dtype)):
            break
    else:
        if (device.type, dtype) in _allowed_device_dtypes():
            return
    _check_tensors_slow(op, tensors)


def _allowed_device_dtypes() -> frozenset:
    """(device type, dtype) pairs the kernels take: float32 on CUDA; under the interpreter float32
    and float64 (for gradcheck) on the CPU or CUDA. Anything else gets _check_tensors_slow's error."""
    if interpreting():
        return _ALLOWED_INTERPRETED
    return _ALLOWED_COMPILED


_ALLOWED_INTERPRETED = frozenset((d, t) for d in ("cpu", "cuda") for t in (torch.float32, torch.float64))
_ALLOWED_COMPILED = frozenset({("cuda", torch.float32)})


def _check_tensors_slow(op: str, tensors: dict) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise RuntimeError(f"{op}: all tensors must be on one device, got {where}")
    device = devices.pop()
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            f"{op}: fastlenet's fused kernels run on a CUDA GPU, but the inputs are on the CPU. "
            "Move the model and data to CUDA, or set TRITON_INTERPRET=1 in the environment before "
            "Python starts to run the same Triton kernels on the CPU through Triton's interpreter "
            "(slow: for testing and debugging). For a plain CPU model use fastlenet.LeNet5(fused=False).")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{op}: unsupported device {device}; the fused kernels need CUDA (or the "
                           "CPU under TRITON_INTERPRET=1)")
    allowed = supported_dtypes()
    for name, t in present.items():
        if name == "target":
            continue
        if t.dtype not in allowed:
            extra = "" if interpreting() else " (float64 only under TRITON_INTERPRET=1, for gradcheck)"
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; the fused kernels support "
                            f"{', '.join(map(str, allowed))}{extra}. Mixed precision is not built yet.")
    dtypes = {t.dtype for name, t in present.items() if name != "target"}
    if len(dtypes) > 1:
        what = ", ".join(f"{name} {t.dtype}" for name, t in present.items() if name != "target")
        raise TypeError(f"{op}: input, weight and bias must share one dtype, got {what}")


def supported_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes the fused kernels take: float32; also float64 under Triton's interpreter (for
    gradcheck and tight tests)."""
    return (torch.float32, torch.float64) if interpreting() else (torch.float32,)


def _check_choice(op: str, what: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: unknown {what} {value!r}; choose one of {', '.join(map(repr, choices))}")


def _check_once(checked: set, key, check, *args) -> None:
    """check(*args) unless this combination of shapes and settings (key) already passed it: the
    shape checks depend on nothing else, so a combination that passed once passes again. Bounded,
    so cycling through many shapes cannot grow the set. An unhashable setting in key is always
    checked (the check names it)."""
    try:
        if key in checked:
            return
    except TypeError:
        pass
    check(*args)
    if len(checked) >= 1024:
        checked.clear()
    checked.add(key)


def _grad_wanted(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


# --------------------------------------------------------------------------------------------------
# conv2d + bias + activation + 2x2 pooling
# --------------------------------------------------------------------------------------------------

class _Conv2dActPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, activation, pool, save):
        y, win, prepool, counters = _conv.conv2d_act_pool_forward(x, weight, bias, padding, activation,
                                                                  pool, save_for_backward=save)
        # Saved: x and W (the GEMM operands), the pooled output y (the activation derivative is
        # recovered from it), and only for pooling's sake a 1-byte window index (max) or the
        # pre-pool activations (avg with a non-identity activation). y and x are tensors the network
        # keeps anyway, so max pooling costs one extra byte per output element. The arrival
        # counters of the weight-gradient reduction, zeroed by this forward launch, go with them:
        # the backward then depends on nothing but its own forward.
        ctx.save_for_backward(x, weight, y, win, prepool, counters)
        ctx.settings = (padding, activation, pool, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, y, win, prepool, counters = ctx.saved_tensors
        padding, activation, pool, has_bias = ctx.settings
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = _conv.conv2d_act_pool_backward(
            _contiguous(grad_y), x, weight, y, win, prepool, padding, activation, pool,
            has_bias=has_bias, need_dx=need_dx, need_dw=need_dw or need_db, counters=counters)
        return dx, dw if need_dw else None, db if need_db else None, None, None, None, None


_CONV_SHAPES_OK: set = set()


def _check_conv_shapes(op, x, weight, bias, padding, activation, pool) -> None:
    _check_choice(op, "activation", activation, ACTIVATIONS)
    _check_choice(op, "pool", pool, POOLS)
    if weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"{op}: weight must be (C_out, C_in, k, k) with a square kernel, "
                         f"got {tuple(weight.shape)}")
    C_out, C_in, k, _ = weight.shape
    if x.shape[1] != C_in:
        raise ValueError(f"{op}: input has {x.shape[1]} channels (shape {tuple(x.shape)}) but weight "
                         f"{tuple(weight.shape)} expects {C_in}")
    if not 1 <= k <= MAX_KERNEL_SIZE:
        raise ValueError(f"{op}: kernel size {k} is not supported (1..{MAX_KERNEL_SIZE})")
    if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= padding <= MAX_PADDING:
        raise ValueError(f"{op}: padding must be an int in 0..{MAX_PADDING}, got {padding!r}")
    if bias is not None and tuple(bias.shape) != (C_out,):
        raise ValueError(f"{op}: bias must have shape ({C_out},) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(bias.shape)}")
    H, W = x.shape[2], x.shape[3]
    if H + 2 * padding < k or W + 2 * padding < k:
        raise ValueError(f"{op}: kernel {k}x{k} is larger than the padded input {H + 2 * padding}x"
                         f"{W + 2 * padding} (input {tuple(x.shape)}, padding {padding})")
    PH, PW = _conv.pooled_size(H, W, k, padding, pool)
    if PH == 0 or PW == 0:
        raise ValueError(f"{op}: the {H + 2 * padding - k + 1}x{W + 2 * padding - k + 1} convolution "
                         f"output of input {tuple(x.shape)} is too small for 2x2 pooling")
    per_image = max(H * W, (H + 2 * padding - k + 1) * (W + 2 * padding - k + 1))
    positions = x.shape[0] * per_image
    if positions > _conv.ROW_INDEX_LIMIT:
        raise ValueError(f"{op}: input {tuple(x.shape)} has {positions:,} positions in one call; the "
                         f"kernels index at most {_conv.ROW_INDEX_LIMIT:,}, i.e. "
                         f"{_conv.ROW_INDEX_LIMIT // per_image:,} images of this size: split the batch")


def conv2d_act_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    padding: int = 0, activation: str = "relu", pool: str = "max") -> torch.Tensor:
    """pool2x2(act(conv2d(x, weight, bias, stride=1, padding))) in one Triton kernel each way.

    x: (N, C_in, H, W); weight: (C_out, C_in, k, k) with 1 <= k <= 7; bias: (C_out,) or None;
    padding: 0..3; activation: relu | sigmoid | tanh | identity; pool: "max" | "avg" (window 2,
    stride 2, odd trailing rows/columns dropped as in PyTorch) or None for act(conv2d(x)) without
    pooling. Returns (N, C_out, PH, PW), the pooled (or, without pooling, the conv) output size.
    """
    op = "conv2d_act_pool"
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"{op}: input must be 4-D (N, C_in, H, W), got shape "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    # Every check below depends only on shapes and settings: a combination that passed once passes
    # again. type(padding) is in the key because True == 1 (and hashes alike) but is refused.
    key = (x.shape, weight.shape, None if bias is None else bias.shape, padding, type(padding),
           activation, pool)
    _check_once(_CONV_SHAPES_OK, key, _check_conv_shapes, op, x, weight, bias, padding, activation, pool)
    _check_tensors(op, input=x, weight=weight, bias=bias)
    return _Conv2dActPool.apply(x, weight, bias, padding, activation, pool,
                                _grad_wanted(x, weight, bias))


# --------------------------------------------------------------------------------------------------
# linear + bias + activation
# --------------------------------------------------------------------------------------------------

class _LinearAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, activation, save):
        y, counters = _linear.linear_act_forward(x, weight, bias, activation, save_for_backward=save)
        # Saved: x and W (the GEMM operands) and the output y, from which act' is recovered; y is
        # the next layer's input, which it saves anyway. And the weight-gradient arrival counters
        # this forward zeroed (see the conv op).
        ctx.save_for_backward(x, weight, y, counters)
        ctx.settings = (activation, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, y, counters = ctx.saved_tensors
        activation, has_bias = ctx.settings
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = _linear.linear_act_backward(_contiguous(grad_y), x, weight, y, activation,
                                                 has_bias=has_bias, need_dx=need_dx,
                                                 need_dw=need_dw or need_db, counters=counters)
        return dx, dw if need_dw else None, db if need_db else None, None, None


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               activation: str = "relu") -> torch.Tensor:
    """act(x @ weight.T + bias) for x of shape (..., in_features), like nn.Linear + activation."""
    op = "linear_act"
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise ValueError(f"{op}: input must have shape (..., in_features), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    key = (x.shape, weight.shape, None if bias is None else bias.shape, activation)
    _check_once(_LINEAR_SHAPES_OK, key, _check_linear_shapes, op, x, weight, bias, activation)
    _check_tensors(op, input=x, weight=weight, bias=bias)
    if x.ndim == 2:  # LeNet's case: no reshape either way
        return _LinearAct.apply(x, weight, bias, activation, _grad_wanted(x, weight, bias))
    # Leading dimensions fold into the GEMM's rows: a view for contiguous input, a copy otherwise.
    x2 = x.reshape(-1, x.shape[-1])
    y = _LinearAct.apply(x2, weight, bias, activation, _grad_wanted(x, weight, bias))
    return y.reshape(*x.shape[:-1], weight.shape[0])


_LINEAR_SHAPES_OK: set = set()


def _check_linear_shapes(op, x, weight, bias, activation) -> None:
    _check_choice(op, "activation", activation, ACTIVATIONS)
    if weight.ndim != 2:
        raise ValueError(f"{op}: weight must be (out_features, in_features), got {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: input {tuple(x.shape)} has {x.shape[-1]} features but weight "
                         f"{tuple(weight.shape)} expects {weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},) to match weight "
                         f"{tuple(weight.shape)}, got {tuple(bias.shape)}")


# --------------------------------------------------------------------------------------------------
# cross-entropy (log-softmax + mean NLL)
# --------------------------------------------------------------------------------------------------

class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index):
        loss, lse, rows = _xent.cross_entropy_forward(logits, target, ignore_index)
        # On the CPU reading rows costs no device synchronisation (see the kernel's docstring); a
        # launch that was only recorded (record_launches(execute=False)) wrote nothing to read.
        if rows.device.type == "cpu" and executing():
            _check_targets_in_range(rows, target, logits.shape[1], ignore_index)
        # Saved: the logits, the per-row log-sum-exp and the count of targets kept (in rows), so
        # backward is one elementwise pass with no reduction.
        ctx.save_for_backward(logits, target, lse, rows)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        logits, target, lse, rows = ctx.saved_tensors
        dlogits = _xent.cross_entropy_backward(_contiguous(grad_loss), logits, target, lse, rows,
                                               ctx.ignore_index)
        return dlogits, None, None


def _check_targets_in_range(rows: torch.Tensor, target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """Raise for the first out-of-range target the forward kernel found (rows[1] < batch)."""
    first_bad = int(rows[1])
    if first_bad < target.shape[0]:
        raise IndexError(f"cross_entropy: target {int(target[first_bad])} (row {first_bad}) is out of "
                         f"bounds for {classes} classes: targets must be in [0, {classes}) or equal "
                         f"ignore_index ({ignore_index})")


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of class logits (B, C) against integer targets (B,), as
    torch.nn.functional.cross_entropy with its defaults, one Triton kernel each way.

    Rows whose target is ignore_index are left out of the mean and get a zero gradient (every row
    ignored: NaN, as PyTorch). Any other target outside [0, C) is an error: an IndexError naming it
    on the CPU (under TRITON_INTERPRET=1); on CUDA a device-side assert, as PyTorch's, reported at
    the next synchronisation, so no step waits for the device to check its targets."""
    op = "cross_entropy"
    if logits.ndim != 2:
        raise ValueError(f"{op}: logits must be (batch, classes), got {tuple(logits.shape)}")
    if target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"{op}: target must be ({logits.shape[0]},) to match logits "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    if target.dtype != torch.int64:
        raise TypeError(f"{op}: target must be int64 class indices, got {target.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
    if logits.shape[0] == 0:
        raise ValueError(f"{op}: empty batch (the mean of no losses is undefined)")
    _check_tensors(op, logits=logits, target=target)
    return _CrossEntropy.apply(logits, target, ignore_index)
