"""The functional API of the fused layers: validation, then the fused op (fastlenet.ops).

Validation happens here, in Python, before an op is called, so a bad input gets a message naming the
offending shapes and dtypes; the checks read only shapes, dtypes, devices and settings, so
torch.compile traces them into guards. fastlenet.ops holds the torch.library custom ops (schema,
fake implementation, autograd, autocast); fastlenet.kernels knows pointers and nothing of autograd.
There is no PyTorch fallback: a tensor the kernels cannot take raises an error that says what to do,
because a silent fallback would hide exactly what this library exists to show.
"""
from __future__ import annotations

import math
import numbers

import torch

from fastlenet import ops  # noqa: F401  registers the torch.ops.fastlenet ops
from fastlenet.kernels import conv_act_pool as _conv
from fastlenet.kernels import linear_act as _linear
from fastlenet.kernels.activations import ACTIVATIONS
from fastlenet.kernels.conv_act_pool import POOLS
from fastlenet.kernels.launch import executing, interpreting

__all__ = ["conv2d_act_pool", "linear_act", "cross_entropy", "rbf_scores", "ACTIVATIONS", "POOLS"]



def _forward(op: str, cast: torch.dtype | None, device_type: str, *args):
    """The output of `op`'s forward: the registered op where torch.compile traces (Dynamo sees an
    opaque node, autocast is its registered kernel), else its eager twin, with autocast's cast
    applied here (fastlenet/ops.py says why there are two ways in)."""
    if torch.compiler.is_compiling():
        return ops.OPS[op](*args)[0]
    if cast is not None:
        args = ops.cast_for_autocast(args, device_type, cast)
    return ops.EAGER[op](*args)

MAX_KERNEL_SIZE = 7
MAX_PADDING = 3


# --------------------------------------------------------------------------------------------------
# Validation shared by the three ops
# --------------------------------------------------------------------------------------------------

def _check_tensors(op: str, cast: torch.dtype | None, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, names=("input", "weight", "bias")) -> None:
    """Same device, a device the kernels can run on, and a dtype they support, for a layer's input,
    weight and bias (or the tensors `names` says, as the messages name them). `cast` is the dtype
    an autocast region will cast the floating tensors to before the op (_autocast_dtype): then it is
    their dtype that must be supported, and the tensors may differ in dtype.

    The common case (one device, one supported dtype, no autocast) costs a few attribute reads, run
    12 times a training step; a tensor that fails a check, or autocast, takes the slow path, which
    builds the message naming the offending tensor."""
    if cast is None:
        device, dtype = x.device, x.dtype
        if (weight.dtype == dtype and weight.device == device
                and (bias is None or (bias.dtype == dtype and bias.device == device))
                and (device.type, dtype) in _allowed_device_dtypes(op)):
            return
    _check_tensors_slow(op, dict(zip(names, (x, weight, bias))), cast)


def _check_loss_tensors(op: str, cast: torch.dtype | None, logits: torch.Tensor, target: torch.Tensor) -> None:
    """_check_tensors for the loss: the target is an integer tensor on the logits' device."""
    if cast is None:
        device = logits.device
        if target.device == device and (device.type, logits.dtype) in _allowed_device_dtypes(op):
            return
    _check_tensors_slow(op, {"logits": logits, "target": target}, cast)


def _allowed_device_dtypes(op: str) -> frozenset:
    """(device type, dtype) pairs the kernels of `op` take (supported_dtypes, on CUDA; under the
    interpreter on the CPU or CUDA). Anything else gets _check_tensors_slow's error."""
    if interpreting():
        return _ALLOWED_INTERPRETED_XENT if _bf16_interpreted(op) else _ALLOWED_INTERPRETED
    return _ALLOWED_COMPILED


_HALF = (torch.float16, torch.bfloat16)
_ALLOWED_INTERPRETED = frozenset((d, t) for d in ("cpu", "cuda")
                                 for t in (torch.float32, torch.float64, torch.float16))
_ALLOWED_INTERPRETED_XENT = _ALLOWED_INTERPRETED | {(d, torch.bfloat16) for d in ("cpu", "cuda")}
_ALLOWED_COMPILED = frozenset(("cuda", t) for t in (torch.float32, *_HALF))


def _autocast_dtype(op: str, device_type: str) -> torch.dtype | None:
    """The dtype torch.autocast makes the op run in on device_type, or None outside autocast: the
    conv and linear ops take the region's dtype (as nn.Conv2d / nn.Linear), cross-entropy float32
    (as F.cross_entropy). fastlenet.ops registers the casts; this lets validation see them."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.float32 if op == "cross_entropy" else torch.get_autocast_dtype(device_type)


def _check_tensors_slow(op: str, tensors: dict, cast: torch.dtype | None = None) -> None:
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
    # What each tensor's dtype is when the op runs: autocast casts floating tensors but float64.
    dtypes = {name: cast if cast is not None and t.is_floating_point() and t.dtype != torch.float64
              else t.dtype for name, t in present.items() if name != "target"}
    allowed = supported_dtypes(op)
    for name, dtype in dtypes.items():
        if dtype == torch.bfloat16 and interpreting() and dtype not in allowed:
            raise TypeError(f"{op}: {name} is bfloat16, which needs a CUDA GPU: Triton's interpreter "
                            "computes bfloat16 dot products wrongly (it multiplies their bit patterns), "
                            "so under TRITON_INTERPRET=1 the fused conv and linear layers take float16, "
                            "float32 and float64")
        if dtype not in allowed:
            extra = "" if interpreting() else " (float64 only under TRITON_INTERPRET=1, for gradcheck)"
            how = f" (autocast to {cast})" if cast is not None and dtype == cast else ""
            raise TypeError(f"{op}: {name} has dtype {dtype}{how}; the fused kernels support "
                            f"{', '.join(map(str, allowed))}{extra}")
    if len(set(dtypes.values())) > 1:
        what = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
        *others, last = dtypes
        raise TypeError(f"{op}: {', '.join(others)} and {last} must share one dtype, got {what}")


def supported_dtypes(op: str | None = None) -> tuple[torch.dtype, ...]:
    """The dtypes the fused kernels take: float32, float16 and bfloat16 (each kernel computes in
    float32 and stores in its inputs' dtype). Under Triton's interpreter also float64 (for gradcheck
    and tight tests), but bfloat16 only for cross_entropy (op="cross_entropy"): the interpreter
    computes bfloat16 dot products wrongly, and the conv and linear kernels are dot products.
    (Launches recorded without running, record_launches(execute=False), take bfloat16 too: they
    compute nothing, and the GPU build compiles them for real targets.)"""
    if not interpreting():
        return (torch.float32, torch.float16, torch.bfloat16)
    if _bf16_interpreted(op):
        return (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    return (torch.float32, torch.float64, torch.float16)


def _bf16_interpreted(op: str | None) -> bool:
    """Whether the interpreter may take bfloat16 for op: cross-entropy has no dot product, and a
    launch that is only recorded computes nothing."""
    return op == "cross_entropy" or not executing()


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


def _grad_wanted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    # Spelled out, not any() over a generator: it runs for every layer call of every step.
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


# --------------------------------------------------------------------------------------------------
# conv2d + bias + activation + 2x2 pooling
# --------------------------------------------------------------------------------------------------

_CONV_SHAPES_OK: set = set()


def _check_conv_shapes(op, x, weight, bias, padding, activation, pool, connections=None, pool_weight=None,
                       pool_bias=None, pool_activation="identity") -> None:
    _check_choice(op, "activation", activation, ACTIVATIONS)
    _check_choice(op, "pool", pool, POOLS)
    _check_choice(op, "pool_activation", pool_activation, ACTIVATIONS)
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
    _check_subsampling(op, C_out, pool, pool_weight, pool_bias, pool_activation)
    if connections is not None:
        if not isinstance(connections, torch.Tensor) or connections.dtype != torch.bool:
            raise TypeError(f"{op}: connections must be a bool tensor (True where an output channel sees an "
                            f"input channel), got {getattr(connections, 'dtype', type(connections).__name__)}")
        if tuple(connections.shape) != (C_out, C_in):
            raise ValueError(f"{op}: connections must have shape ({C_out}, {C_in}) (output x input channels of "
                             f"weight {tuple(weight.shape)}), got {tuple(connections.shape)}")
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


def _check_subsampling(op, C_out, pool, pool_weight, pool_bias, pool_activation) -> None:
    """Subsampling's parameters come with pool="subsample", and only with it."""
    if pool != "subsample":
        if pool_weight is not None or pool_bias is not None or pool_activation != "identity":
            raise ValueError(f"{op}: pool_weight, pool_bias and pool_activation belong to pool='subsample' "
                             f"(got pool={pool!r})")
        return
    for name, t in (("pool_weight", pool_weight), ("pool_bias", pool_bias)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: pool='subsample' needs {name}, a ({C_out},) tensor (one per output "
                             f"channel), got {type(t).__name__}")
        if tuple(t.shape) != (C_out,):
            raise ValueError(f"{op}: {name} must have shape ({C_out},), one per output channel, got "
                             f"{tuple(t.shape)}")


def conv2d_act_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    padding: int = 0, activation: str = "relu", pool: str = "max", *,
                    connections: torch.Tensor | None = None, pool_weight: torch.Tensor | None = None,
                    pool_bias: torch.Tensor | None = None, pool_activation: str = "identity") -> torch.Tensor:
    """pool2x2(act(conv2d(x, weight, bias, stride=1, padding))) in one Triton kernel each way.

    x: (N, C_in, H, W), or unbatched (C_in, H, W) as F.conv2d takes it; weight: (C_out, C_in, k, k)
    with 1 <= k <= 7; bias: (C_out,) or None; padding: 0..3; activation: relu | sigmoid | tanh |
    scaled_tanh (1.7159 tanh(2/3 z), the 1998 LeNet-5's) | identity; pool: "max" | "avg" (window 2,
    stride 2, odd trailing rows/columns dropped as in PyTorch), "subsample" or None for act(conv2d(x))
    without pooling. Returns (N, C_out, PH, PW) (without N for unbatched input), the pooled (or,
    without pooling, the conv) output size.

    Keyword-only, for the 1998 LeNet-5: connections, a bool (C_out, C_in) table: output channel o
    sees input channel i only where connections[o, i] (the other weights are left out, as if zero,
    and get a zero gradient). pool="subsample" is trainable subsampling: pool_activation(pool_weight[c]
    * (the 2x2 window's sum) + pool_bias[c]), pool_weight and pool_bias (C_out,) tensors.
    """
    op = "conv2d_act_pool"
    extra = dict(connections=connections, pool_weight=pool_weight, pool_bias=pool_bias,
                 pool_activation=pool_activation)
    if isinstance(x, torch.Tensor) and x.ndim == 3:  # unbatched: a batch of one, as F.conv2d does
        return conv2d_act_pool(x.unsqueeze(0), weight, bias, padding, activation, pool, **extra).squeeze(0)
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"{op}: input must be (N, C_in, H, W) or unbatched (C_in, H, W), got shape "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    # Every check below depends only on shapes and settings: a combination that passed once passes
    # again. type(padding) is in the key because True == 1 (and hashes alike) but is refused.
    key = (x.shape, weight.shape, None if bias is None else bias.shape, padding, type(padding),
           activation, pool)
    if connections is not None or pool_weight is not None or pool_bias is not None or pool_activation != "identity":
        key += tuple((getattr(t, "shape", t), getattr(t, "dtype", None)) for t in extra.values())
    _check_once(_CONV_SHAPES_OK, key, _check_conv_shapes, op, x, weight, bias, padding, activation, pool,
                connections, pool_weight, pool_bias, pool_activation)
    cast = _autocast_dtype(op, x.device.type)
    _check_tensors(op, cast, x, weight, bias)
    grad = _grad_wanted(x, weight, bias)
    if pool_weight is not None:  # pool="subsample" (checked above)
        _check_tensors(op, cast, x, pool_weight, pool_bias, ("input", "pool_weight", "pool_bias"))
        grad = grad or (torch.is_grad_enabled() and (pool_weight.requires_grad or pool_bias.requires_grad))
    if connections is not None:
        if connections.device != x.device:
            raise RuntimeError(f"{op}: connections are on {connections.device}, the input on {x.device}")
        connections = connections.contiguous()
    return _forward(op, cast, x.device.type, x, weight, bias, padding, activation, pool, grad,
                    connections, pool_weight, pool_bias, pool_activation)


# --------------------------------------------------------------------------------------------------
# linear + bias + activation
# --------------------------------------------------------------------------------------------------

def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               activation: str = "relu") -> torch.Tensor:
    """act(x @ weight.T + bias) for x of shape (..., in_features), like nn.Linear + activation."""
    op = "linear_act"
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise ValueError(f"{op}: input must have shape (..., in_features), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    key = (x.shape, weight.shape, None if bias is None else bias.shape, activation)
    _check_once(_LINEAR_SHAPES_OK, key, _check_linear_shapes, op, x, weight, bias, activation)
    cast = _autocast_dtype(op, x.device.type)
    _check_tensors(op, cast, x, weight, bias)
    if x.ndim == 2:  # LeNet's case: no reshape either way
        return _forward(op, cast, x.device.type, x, weight, bias, activation, _grad_wanted(x, weight, bias))
    # Leading dimensions fold into the GEMM's rows: a view for contiguous input, a copy otherwise.
    x2 = x.reshape(-1, x.shape[-1])
    y = _forward(op, cast, x.device.type, x2, weight, bias, activation, _grad_wanted(x, weight, bias))
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

def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, *,
                  constant_logit: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of class logits (B, C) against integer targets (B,), as
    torch.nn.functional.cross_entropy with its defaults, one Triton kernel each way.

    constant_logit: None, or a finite float c: each row's softmax then has one more class, of logit
    c, which no target names, i.e. F.cross_entropy(torch.cat([logits, full((B, 1), c)], 1), target).
    The 1998 LeNet-5's MAP criterion, -s_target + log(exp(-j) + sum_i exp(s_i)), is c = -j.

    Rows whose target is ignore_index are left out of the mean and get a zero gradient (every row
    ignored: NaN, as PyTorch). Any other target outside [0, C) is an error: an IndexError naming it
    on the CPU (under TRITON_INTERPRET=1); on CUDA a device-side assert, as PyTorch's, reported at
    the next synchronisation, so no step waits for the device to check its targets.

    Logits that are the output of fastlenet's linear layer (linear_act, LinearAct, the last layer of
    the fused networks) let the forward split a large batch over several programs, with the same
    result up to rounding and still reproducible run to run (kernels/cross_entropy.py)."""
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
    if constant_logit is not None:
        constant_logit = _check_constant_logit(op, constant_logit)
    if logits.shape[0] == 0:
        raise ValueError(f"{op}: empty batch (the mean of no losses is undefined)")
    cast = _autocast_dtype(op, logits.device.type)
    _check_loss_tensors(op, cast, logits, target)
    if torch.compiler.is_compiling():
        return _forward(op, cast, logits.device.type, logits, target, ignore_index, constant_logit)
    # Logits straight from fastlenet's linear layer carry arrival counters it zeroed for this loss
    # (kernels/linear_act.py, LOSS_COUNTER_ATTR); taken here, they serve this call only.
    counters = logits.__dict__.pop(_linear.LOSS_COUNTER_ATTR, None)
    return _forward(op, cast, logits.device.type, logits, target, ignore_index, constant_logit, counters)


def _check_constant_logit(op: str, value) -> float:
    """A finite real number (a Python or NumPy float or int, not a bool or a tensor: the kernel takes
    it as a launch argument), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: constant_logit must be a float or None, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{op}: constant_logit must be finite, got {value}")
    return value


# --------------------------------------------------------------------------------------------------
# RBF output scores against fixed prototypes
# --------------------------------------------------------------------------------------------------

def rbf_scores(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """scores[b, i] = -sum_j (x[b, j] - prototypes[i, j])**2 for x (B, F) and prototypes (C, F): the
    negated squared distances of the 1998 LeNet-5's RBF output units, one Triton kernel each way.

    The prototypes are fixed (a buffer, as in fastlenet.lenet1998.RBFOutput): they get no gradient,
    and a prototypes tensor that requires one is refused. Computed as 2 x.P - ||x||^2 - ||P||^2 in
    the accumulator (float32, float64 for float64), so a score's rounding error is relative to the
    norms rather than to the distance (kernels/rbf_scores.py)."""
    op = "rbf_scores"
    for name, t in (("input", x), ("prototypes", prototypes)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    key = (x.shape, prototypes.shape)
    _check_once(_RBF_SHAPES_OK, key, _check_rbf_shapes, op, x, prototypes)
    if prototypes.requires_grad:
        raise ValueError(f"{op}: the prototypes are fixed and get no gradient, but this tensor requires one; "
                         "pass prototypes.detach() (or keep them as a buffer, as fastlenet.nn.RBFScores does)")
    cast = _autocast_dtype(op, x.device.type)
    _check_tensors(op, cast, x, prototypes, None, ("input", "prototypes", None))
    return _forward(op, cast, x.device.type, x, prototypes)


_RBF_SHAPES_OK: set = set()


def _check_rbf_shapes(op, x, prototypes) -> None:
    if x.ndim != 2:
        raise ValueError(f"{op}: input must be (batch, features), got {tuple(x.shape)}")
    if prototypes.ndim != 2 or 0 in prototypes.shape:
        raise ValueError(f"{op}: prototypes must be (classes, features) with at least one of each, "
                         f"got {tuple(prototypes.shape)}")
    if x.shape[1] != prototypes.shape[1]:
        raise ValueError(f"{op}: input {tuple(x.shape)} has {x.shape[1]} features but prototypes "
                         f"{tuple(prototypes.shape)} have {prototypes.shape[1]}")
