"""The fused layers as PyTorch operators: torch.library custom ops in the `fastlenet` namespace.

Each layer is a forward op and a backward op (torch.ops.fastlenet.conv2d_act_pool_fwd / _bwd,
linear_act_fwd / _bwd, cross_entropy_fwd / _bwd, rbf_scores_fwd / _bwd), registered per op with what
PyTorch needs to treat it like one of its own: a schema, a fake implementation (output shapes, dtypes
and strides from input shapes alone, no kernel), autograd (on the forward op: setup_context saves
what the backward op reads, the backward calls it) and autocast (the conv, linear and RBF ops run in
the autocast dtype like nn.Conv2d / nn.Linear, cross-entropy in float32 like F.cross_entropy).
torch.compile then traces a model built from fastlenet's layers without a graph break, each op an
opaque node.

Schemas cannot return None, so an output that a setting leaves out (the window index without max
pooling, the pre-pool activations without average pooling, the arrival counters and the gradients
nobody asked for) is an empty tensor. Ops return fresh tensors and change none of their inputs. The
weight-gradient arrival counters are an OUTPUT of a forward op (its kernel zeroes them) and an input
of the backward op, so forward and backward stay one launch each, with no memset between them
(split_reduce.py). The backward kernel counts in them while it runs, but its last-arriving programs
re-arm every counter to zero, so the op leaves them as it found them: to PyTorch they are a
read-only input, and the schema declares no mutation. (Declared as mutated, AOTAutograd would have
to replay a mutation of a forward output inside the backward graph, which its partitioner refuses
when that output is also returned, and eager autograd's version check would refuse a second
backward through the same graph.)

`save` says whether a backward will follow: functional passes it as "grad enabled and an input
requires grad". A forward called with save=False keeps nothing, and a backward through it raises.

Validation is not here: fastlenet.functional checks shapes and dtypes before calling an op, so a bad
input gets the message that names it, and the ops assume valid input.

Two ways in, one implementation. Under torch.compile fastlenet.functional calls the registered ops
(OPS below), which Dynamo traces. In eager mode it calls EAGER: autograd.Functions built from the
same forward implementations, setup_context and backward, calling the backward implementation
directly. Going through the dispatcher costs the host about 16 us per op call in PyTorch's custom-op
and register_autograd wrappers (measured with bench/host_overhead.py: 12 calls a LeNet-5 step took
the host's work from ~230 to ~420 us), which an eager step, bound by host work at LeNet's size, should
not pay for nothing. The eager path applies autocast's cast itself (cast_for_autocast), as the
registered autocast kernels below do for the ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastlenet.kernels import conv_act_pool as _conv
from fastlenet.kernels import cross_entropy as _xent
from fastlenet.kernels import linear_act as _linear
from fastlenet.kernels import rbf_scores as _rbf
from fastlenet.kernels.launch import accumulator_dtype, executing

__all__ = ["conv2d_act_pool_fwd", "conv2d_act_pool_bwd", "linear_act_fwd", "linear_act_bwd",
           "cross_entropy_fwd", "cross_entropy_bwd", "rbf_scores_fwd", "rbf_scores_bwd"]

_LIB = torch.library.Library("fastlenet", "FRAGMENT")  # for the autocast kernels


def _overload(op) -> torch._ops.OpOverload:
    """The op's torch.ops overload: calling it skips the Python layer of the CustomOpDef's __call__."""
    return getattr(torch.ops.fastlenet, op._name).default


def _or_empty(t: Tensor | None, like: Tensor, dtype: torch.dtype) -> Tensor:
    """t, or an empty tensor standing for None (a schema's outputs cannot be None)."""
    return t if t is not None else torch.empty((0,), dtype=dtype, device=like.device)


def _no_zero_gradients(ctx) -> None:
    """The outputs only a backward reads (window index, counters, log-sum-exp...) get no gradient:
    left as None rather than filled with zeros, which would cost a device op each per step."""
    ctx.set_materialize_grads(False)


def _check_saved(counters: Tensor, op: str) -> None:
    """A forward that saves for backward hands over at least one counter; none means save=False."""
    if counters is None or counters.numel() == 0:
        raise RuntimeError(f"{op}: backward through a forward op called with save=False, which kept "
                           "nothing for it; call it with save=True when a gradient is wanted")


# --------------------------------------------------------------------------------------------------
# conv2d + bias + activation [+ 2x2 pooling]
# --------------------------------------------------------------------------------------------------

# The bodies of the ops come in two layers: the *_eager functions return None for what a setting leaves
# out (what the eager twins use, with no allocation for it); the op bodies turn each None into an
# empty tensor, as a schema requires.

def _conv_fwd_eager(x, weight, bias, padding, activation, pool, save, connections, pool_weight, pool_bias,
                    pool_activation):
    return _conv.conv2d_act_pool_forward(x, weight, bias, padding, activation, pool, save, connections,
                                         pool_weight, pool_bias, pool_activation)


def _conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int, activation: str,
              pool: Optional[str], save: bool, connections: Optional[Tensor] = None,
              pool_weight: Optional[Tensor] = None, pool_bias: Optional[Tensor] = None,
              pool_activation: str = "identity") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, window index, pre-pool activations, arrival counters); the last three are what the
    backward op reads, empty where the settings (or save=False) leave them out. connections (bool
    [C_out, C_in]) and subsampling's pool_weight / pool_bias / pool_activation: see
    fastlenet.functional.conv2d_act_pool."""
    y, win, prepool, counters = _conv_fwd_eager(x, weight, bias, padding, activation, pool, save, connections,
                                                pool_weight, pool_bias, pool_activation)
    return (y, _or_empty(win, x, torch.int8), _or_empty(prepool, x, x.dtype),
            _or_empty(counters, x, torch.int32))


conv2d_act_pool_fwd = torch.library.custom_op("fastlenet::conv2d_act_pool_fwd", mutates_args=())(_conv_fwd)


@conv2d_act_pool_fwd.register_fake
def _(x, weight, bias, padding, activation, pool, save, connections=None, pool_weight=None, pool_bias=None,
      pool_activation="identity"):
    N, _, H, W = x.shape
    C_out, C_in, k, _ = weight.shape
    PH, PW = _conv.pooled_size(H, W, k, padding, pool)
    y = x.new_empty((N, C_out, PH, PW))
    win = x.new_empty((N, C_out, PH, PW) if save and _conv.saves_window(pool) else (0,), dtype=torch.int8)
    prepool = x.new_empty((N, C_out, 2 * PH, 2 * PW) if save and _conv.saves_prepool(activation, pool) else (0,))
    counters = x.new_empty((_conv.counters_needed(weight.shape, bias is not None, pool),) if save else (0,),
                           dtype=torch.int32)
    return y, win, prepool, counters


def _conv_bwd_eager(grad_y, x, weight, y, win, prepool, counters, padding, activation, pool, has_bias, need_dx,
                    need_dw, connections, pool_weight, pool_activation):
    return _conv.conv2d_act_pool_backward(grad_y, x, weight, y, win, prepool, padding, activation, pool,
                                          has_bias, need_dx, need_dw, counters, connections, pool_weight,
                                          pool_activation)


def _conv_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, y: Tensor, win: Tensor, prepool: Tensor,
              counters: Tensor, padding: int, activation: str, pool: Optional[str], has_bias: bool,
              need_dx: bool, need_dw: bool, connections: Optional[Tensor] = None,
              pool_weight: Optional[Tensor] = None,
              pool_activation: str = "identity") -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw, db, d pool_weight, d pool_bias), each empty when not asked for (need_dx; need_dw
    covers every parameter) or not there (the pool's without subsampling)."""
    grads = _conv_bwd_eager(grad_y, x, weight, y, win if _conv.saves_window(pool) else None,
                            prepool if _conv.saves_prepool(activation, pool) else None, counters, padding,
                            activation, pool, has_bias, need_dx, need_dw, connections, pool_weight, pool_activation)
    if pool == "subsample":
        # The three per-channel gradients are rows of one buffer (the kernel's); an op's outputs
        # may not alias each other, so here (torch.compile's path) they are copied apart.
        grads = grads[:2] + tuple(None if g is None else g.clone() for g in grads[2:])
    return tuple(_or_empty(g, x, x.dtype if i == 0 else weight.dtype) for i, g in enumerate(grads))


conv2d_act_pool_bwd = torch.library.custom_op("fastlenet::conv2d_act_pool_bwd", mutates_args=())(_conv_bwd)


@conv2d_act_pool_bwd.register_fake
def _(grad_y, x, weight, y, win, prepool, counters, padding, activation, pool, has_bias, need_dx, need_dw,
      connections=None, pool_weight=None, pool_activation="identity"):
    per_channel = (weight.shape[0],)
    subsample = need_dw and pool == "subsample"
    return (x.new_empty(x.shape if need_dx else (0,)),
            weight.new_empty(weight.shape if need_dw else (0,)),
            weight.new_empty(per_channel if need_dw and has_bias else (0,)),
            weight.new_empty(per_channel if subsample else (0,)),
            weight.new_empty(per_channel if subsample else (0,)))


def _conv_setup_context(ctx, inputs, output):
    # The last four inputs have defaults, which a call through the op may leave out.
    inputs = tuple(inputs) + (None, None, None, "identity")[len(inputs) - 7:]
    x, weight, bias, padding, activation, pool, _, connections, pool_weight, _, pool_activation = inputs
    y, win, prepool, counters = output
    # Saved: x and W (the GEMM operands), the output y (act' is recovered from it), what pooling
    # needs (kernels/conv_act_pool.py says why), the connection table and subsampling weight (the
    # backward's dx and dz read them) and, last as for every op, the arrival counters this forward zeroed.
    ctx.save_for_backward(x, weight, y, win, prepool, connections, pool_weight, counters)
    _no_zero_gradients(ctx)
    ctx.settings = (padding, activation, pool, bias is not None, pool_activation)


def _conv_backward(bwd):
    """The backward of the conv forward, calling `bwd` (the backward op, or its implementation)."""
    def backward(ctx, grad_y, _grad_win, _grad_prepool, _grad_counters):
        inputs = len(ctx.needs_input_grad)  # 7 to 11: the op's defaults may be left out
        if grad_y is None:
            return (None,) * inputs
        x, weight, y, win, prepool, connections, pool_weight, counters = ctx.saved_tensors
        padding, activation, pool, has_bias, pool_activation = ctx.settings
        _check_saved(counters, "conv2d_act_pool")
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        need_dpw, need_dpb = (tuple(ctx.needs_input_grad[8:10]) + (False, False))[:2]
        dx, dw, db, dpw, dpb = bwd(grad_y.contiguous(), x, weight, y, win, prepool, counters, padding, activation,
                                   pool, has_bias, need_dx, need_dw or need_db or need_dpw or need_dpb,
                                   connections, pool_weight, pool_activation)
        return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
                None, None, None, None, None, dpw if need_dpw else None, dpb if need_dpb else None, None)[:inputs]
    return backward


conv2d_act_pool_fwd.register_autograd(_conv_backward(_overload(conv2d_act_pool_bwd)),
                                      setup_context=_conv_setup_context)


# --------------------------------------------------------------------------------------------------
# linear + bias + activation
# --------------------------------------------------------------------------------------------------

def _linear_fwd_eager(x, weight, bias, activation, save):
    return _linear.linear_act_forward(x, weight, bias, activation, save_for_backward=save)


def _linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                   save: bool) -> tuple[Tensor, Tensor]:
    """(y, arrival counters) for a 2-D x; the counters empty unless save."""
    y, counters = _linear_fwd_eager(x, weight, bias, activation, save)
    return y, _or_empty(counters, x, torch.int32)


linear_act_fwd = torch.library.custom_op("fastlenet::linear_act_fwd", mutates_args=())(_linear_fwd)


@linear_act_fwd.register_fake
def _(x, weight, bias, activation, save):
    N, K = weight.shape
    return (x.new_empty((x.shape[0], N)),
            x.new_empty((_linear.counters_needed(N, K, bias is not None),) if save else (0,), dtype=torch.int32))


def _linear_bwd_eager(grad_y, x, weight, y, counters, activation, has_bias, need_dx, need_dw):
    return _linear.linear_act_backward(grad_y, x, weight, y, activation, has_bias=has_bias, need_dx=need_dx,
                                       need_dw=need_dw, counters=counters)


def _linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, y: Tensor, counters: Tensor, activation: str,
                   has_bias: bool, need_dx: bool, need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _linear_bwd_eager(grad_y, x, weight, y, counters, activation, has_bias, need_dx, need_dw)
    return _or_empty(dx, x, x.dtype), _or_empty(dw, x, weight.dtype), _or_empty(db, x, weight.dtype)


linear_act_bwd = torch.library.custom_op("fastlenet::linear_act_bwd", mutates_args=())(_linear_bwd)


@linear_act_bwd.register_fake
def _(grad_y, x, weight, y, counters, activation, has_bias, need_dx, need_dw):
    return (x.new_empty(x.shape if need_dx else (0,)),
            weight.new_empty(weight.shape if need_dw else (0,)),
            weight.new_empty((weight.shape[0],) if need_dw and has_bias else (0,)))


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, activation, _ = inputs
    y, counters = output
    # Saved: x and W (the GEMM operands) and y, from which act' is recovered; y is the next layer's
    # input, which it saves anyway; and the arrival counters this forward zeroed.
    ctx.save_for_backward(x, weight, y, counters)
    _no_zero_gradients(ctx)
    ctx.settings = (activation, bias is not None)


def _linear_backward(bwd):
    def backward(ctx, grad_y, _grad_counters):
        if grad_y is None:
            return None, None, None, None, None
        x, weight, y, counters = ctx.saved_tensors
        activation, has_bias = ctx.settings
        _check_saved(counters, "linear_act")
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = bwd(grad_y.contiguous(), x, weight, y, counters, activation, has_bias,
                         need_dx, need_dw or need_db)
        return dx if need_dx else None, dw if need_dw else None, db if need_db else None, None, None
    return backward


linear_act_fwd.register_autograd(_linear_backward(_overload(linear_act_bwd)), setup_context=_linear_setup_context)


# --------------------------------------------------------------------------------------------------
# cross-entropy
# --------------------------------------------------------------------------------------------------

def _xent_fwd_eager(logits, target, ignore_index, constant_logit, counters):
    """The forward with `counters` zeroed for it by the linear layer that made the logits, or None
    (kernels/cross_entropy.py: with them a large batch is split over several programs). The
    registered op never gets them: torch.compile traces no tensor attributes."""
    loss, lse, rows = _xent.cross_entropy_forward(logits, target, ignore_index, counters, constant_logit)
    # On the CPU reading rows costs no device synchronisation (see the kernel's docstring); a
    # launch that was only recorded (record_launches(execute=False)) wrote nothing to read.
    if rows.device.type == "cpu" and executing():
        _check_targets_in_range(rows, target, logits.shape[1], ignore_index)
    return loss, lse, rows


def _xent_fwd(logits: Tensor, target: Tensor, ignore_index: int,
              constant_logit: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, per-row log-sum-exp, rows = [targets kept, first out-of-range row]); with a
    constant_logit, each row has one more class of that logit, which no target names."""
    return _xent_fwd_eager(logits, target, ignore_index, constant_logit, None)


def _check_targets_in_range(rows: Tensor, target: Tensor, classes: int, ignore_index: int) -> None:
    """Raise for the first out-of-range target the forward kernel found (rows[1] < batch)."""
    first_bad = int(rows[1])
    if first_bad < target.shape[0]:
        raise IndexError(f"cross_entropy: target {int(target[first_bad])} (row {first_bad}) is out of "
                         f"bounds for {classes} classes: targets must be in [0, {classes}) or equal "
                         f"ignore_index ({ignore_index})")


cross_entropy_fwd = torch.library.custom_op("fastlenet::cross_entropy_fwd", mutates_args=())(_xent_fwd)


@cross_entropy_fwd.register_fake
def _(logits, target, ignore_index, constant_logit=None):
    return (logits.new_empty(()), logits.new_empty((logits.shape[0],), dtype=accumulator_dtype(logits.dtype)),
            target.new_empty((2,)))


def _xent_bwd(grad_loss: Tensor, logits: Tensor, target: Tensor, lse: Tensor, rows: Tensor,
                      ignore_index: int) -> Tensor:
    return _xent.cross_entropy_backward(grad_loss, logits, target, lse, rows, ignore_index)


cross_entropy_bwd = torch.library.custom_op("fastlenet::cross_entropy_bwd", mutates_args=())(_xent_bwd)


@cross_entropy_bwd.register_fake
def _(grad_loss, logits, target, lse, rows, ignore_index):
    return logits.new_empty(logits.shape)


def _xent_setup_context(ctx, inputs, output):
    logits, target, ignore_index = inputs[:3]  # the eager twin also gets the counters
    _, lse, rows = output
    # Saved: the logits, the per-row log-sum-exp and the count of targets kept (in rows), so
    # backward is one elementwise pass with no reduction.
    ctx.save_for_backward(logits, target, lse, rows)
    ctx.ignore_index = ignore_index
    _no_zero_gradients(ctx)


def _xent_backward(bwd):
    def backward(ctx, grad_loss, _grad_lse, _grad_rows):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        logits, target, lse, rows = ctx.saved_tensors
        # The constant logit changes only lse, which backward reads: p = exp(x - lse) as without it.
        return bwd(grad_loss.contiguous(), logits, target, lse, rows, ctx.ignore_index), None, None, None
    return backward


cross_entropy_fwd.register_autograd(_xent_backward(_overload(cross_entropy_bwd)), setup_context=_xent_setup_context)


# --------------------------------------------------------------------------------------------------
# RBF output scores against fixed prototypes
# --------------------------------------------------------------------------------------------------

def _rbf_fwd_eager(x, prototypes):
    return (_rbf.rbf_scores_forward(x, prototypes),)  # a tuple, as the other forwards' (_eager_function)


def _rbf_fwd(x: Tensor, prototypes: Tensor) -> Tensor:
    """scores[b, i] = -sum_j (x[b, j] - prototypes[i, j])^2 for a 2-D x."""
    return _rbf_fwd_eager(x, prototypes)[0]


rbf_scores_fwd = torch.library.custom_op("fastlenet::rbf_scores_fwd", mutates_args=())(_rbf_fwd)


@rbf_scores_fwd.register_fake
def _(x, prototypes):
    return x.new_empty((x.shape[0], prototypes.shape[0]))


def _rbf_bwd(grad_scores: Tensor, x: Tensor, prototypes: Tensor) -> Tensor:
    return _rbf.rbf_scores_backward(grad_scores, x, prototypes)


rbf_scores_bwd = torch.library.custom_op("fastlenet::rbf_scores_bwd", mutates_args=())(_rbf_bwd)


@rbf_scores_bwd.register_fake
def _(grad_scores, x, prototypes):
    return x.new_empty(x.shape)


def _rbf_setup_context(ctx, inputs, output):
    # Saved: the inputs only; dx = 2 g P - 2 x rowsum(g) needs neither the scores nor the norms.
    ctx.save_for_backward(*inputs)


def _rbf_backward(bwd):
    def backward(ctx, grad_scores):
        # The prototypes are a buffer (functional refuses ones that require grad): no gradient.
        if grad_scores is None or not ctx.needs_input_grad[0]:
            return None, None
        x, prototypes = ctx.saved_tensors
        return bwd(grad_scores.contiguous(), x, prototypes), None
    return backward


rbf_scores_fwd.register_autograd(_rbf_backward(_overload(rbf_scores_bwd)), setup_context=_rbf_setup_context)


def _rbf_op(x, prototypes):
    """The registered forward, its one output in a tuple as fastlenet.functional reads every op's."""
    return (_overload(rbf_scores_fwd)(x, prototypes),)


# --------------------------------------------------------------------------------------------------
# Autocast: conv, linear and RBF in the autocast dtype (as nn.Conv2d / nn.Linear), cross-entropy in float32
# (as F.cross_entropy). torch.library.register_autocast casts to one fixed dtype; these follow the
# dtype of the autocast region (float16 or bfloat16), so they are registered on the Autocast keys.
# --------------------------------------------------------------------------------------------------

def cast_for_autocast(args, device_type: str, dtype: torch.dtype):
    """Floating tensors of device_type cast to dtype, as autocast does (float64 left alone)."""
    return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64
                 and a.device.type == device_type else a for a in args)


def _register_autocast(op, device_type: str, fixed_dtype: torch.dtype | None = None) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    exclude = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    overload = op._opoverload

    def kernel(_keyset, *args):
        dtype = fixed_dtype or torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            return overload(*cast_for_autocast(args, device_type, dtype))

    _LIB.impl(op._name, kernel, key, with_keyset=True)


for _device_type in ("cuda", "cpu"):
    _register_autocast(conv2d_act_pool_fwd, _device_type)
    _register_autocast(linear_act_fwd, _device_type)
    _register_autocast(cross_entropy_fwd, _device_type, torch.float32)
    _register_autocast(rbf_scores_fwd, _device_type)


# --------------------------------------------------------------------------------------------------
# The two ways in (see the top of this file): the registered ops, for torch.compile, and eager
# autograd.Functions made of the same parts, for everything else.
# --------------------------------------------------------------------------------------------------

def _eager_function(name: str, implementation, setup_context, backward, outputs: int,
                    extra_inputs: int = 0) -> type[torch.autograd.Function]:
    """An autograd.Function running `implementation` (a forward op's body, `outputs` outputs) with
    the op's setup_context and backward. Only the layer's output leaves the Function, the rest stays
    on ctx: every output costs autograd host work. forward(ctx, ...) calls setup_context itself:
    with a separate setup_context staticmethod, Function.apply binds each call's arguments through
    inspect.signature, which costs more host time than the dispatcher this path avoids.
    extra_inputs: trailing inputs the twin takes beyond the op's (they get no gradient)."""
    def forward(ctx, *inputs):
        output = implementation(*inputs)
        setup_context(ctx, inputs, output)
        return output[0]

    def backward_of_output(ctx, grad):
        return backward(ctx, grad, *(None,) * (outputs - 1)) + (None,) * extra_inputs

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward_of_output),
        "__doc__": f"Eager twin of torch.ops.fastlenet.{name}: the same implementation, no dispatcher."})


OPS = {"conv2d_act_pool": _overload(conv2d_act_pool_fwd), "linear_act": _overload(linear_act_fwd),
       "cross_entropy": _overload(cross_entropy_fwd), "rbf_scores": _rbf_op}
EAGER = {
    "conv2d_act_pool": _eager_function("conv2d_act_pool_fwd", _conv_fwd_eager, _conv_setup_context,
                                       _conv_backward(_conv_bwd_eager), outputs=4).apply,
    "linear_act": _eager_function("linear_act_fwd", _linear_fwd_eager, _linear_setup_context,
                                  _linear_backward(_linear_bwd_eager), outputs=2).apply,
    "cross_entropy": _eager_function("cross_entropy_fwd", _xent_fwd_eager, _xent_setup_context,
                                     _xent_backward(_xent_bwd), outputs=3, extra_inputs=1).apply,
    "rbf_scores": _eager_function("rbf_scores_fwd", _rbf_fwd_eager, _rbf_setup_context,
                                  _rbf_backward(_rbf_bwd), outputs=1).apply,
}
