"""RBF output scores against fixed prototypes, scores[b, i] = -sum_j (x[b, j] - P[i, j])^2: forward and
backward.

Forward expands the distance, -(||x_b||^2 - 2 x_b.P_i + ||P_i||^2), so it is one tl.dot pass over the
features with the two squared norms summed beside it: a GEMM instead of a [B, C, F] broadcast, at the
price of rounding relative to ||x||^2 + ||P||^2 rather than to the distance. Backward keeps only the
inputs x and P (no scores, no norms) and recomputes nothing: dx = 2 g.P - 2 x * rowsum(g), one launch.
"""
import math
from typing import NamedTuple

import triton
import triton.language as tl

from .accounting import Job, Work, accounts, tensor_bytes
from .activations import to_acc
from .launch import PlanCache, cdiv, dot_precision, empty, launch, next_pow2, round_up


@triton.jit
def rbf_scores_fwd_kernel(
    # pointers
    x_ptr, p_ptr, s_ptr,
    # sizes
    B, C, F,
    # strides
    stride_xb, stride_xf, stride_pc, stride_pf,
    # meta-parameters
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr,
):
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_b = offs_b < B
    mask_c = offs_c < C
    dots = tl.zeros([BLOCK_B, BLOCK_C], dtype=acc_dtype)
    x_norms = tl.zeros([BLOCK_B], dtype=acc_dtype)
    p_norms = tl.zeros([BLOCK_C], dtype=acc_dtype)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_f[None, :] * stride_xf,
                    mask=mask_b[:, None] & mask_f[None, :], other=0.0)
        # P^T tile [BLOCK_F, BLOCK_C]: masked rows and columns are 0, so they add nothing.
        p = tl.load(p_ptr + offs_f[:, None] * stride_pf + offs_c[None, :] * stride_pc,
                    mask=mask_f[:, None] & mask_c[None, :], other=0.0)
        dots = tl.dot(x, p, dots, input_precision=DOT_PRECISION)
        xa = to_acc(x)
        pa = to_acc(p)
        x_norms += tl.sum(xa * xa, axis=1)
        p_norms += tl.sum(pa * pa, axis=0)
    norms = x_norms[:, None] + p_norms[None, :]
    # An infinite feature makes the distance +inf, but the expansion inf - inf: NaN. The norms are
    # +inf exactly then (NaN if a NaN is there too, which the expansion keeps), as the reference's.
    scores = tl.where(norms == float("inf"), -norms, 2.0 * dots - norms)
    # scores is contiguous [B, C].
    tl.store(s_ptr + offs_b[:, None] * C + offs_c[None, :], scores.to(s_ptr.dtype.element_ty),
             mask=mask_b[:, None] & mask_c[None, :])


@triton.jit
def rbf_scores_bwd_kernel(
    # pointers
    g_ptr, x_ptr, p_ptr, dx_ptr,
    # sizes
    B, C, F,
    # strides
    stride_xb, stride_xf, stride_pc, stride_pf,
    # meta-parameters
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr,
):
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_b = offs_b < B
    mask_f = offs_f < F
    dots = tl.zeros([BLOCK_B, BLOCK_F], dtype=acc_dtype)
    g_sums = tl.zeros([BLOCK_B], dtype=acc_dtype)
    # The least and greatest upstream gradient of each row, for infinite x (see below).
    g_min = tl.full([BLOCK_B], float("inf"), dtype=acc_dtype)
    g_max = tl.full([BLOCK_B], float("-inf"), dtype=acc_dtype)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        # g is contiguous [B, C].
        mask_g = mask_b[:, None] & mask_c[None, :]
        g = tl.load(g_ptr + offs_b[:, None] * C + offs_c[None, :], mask=mask_g, other=0.0)
        p = tl.load(p_ptr + offs_c[:, None] * stride_pc + offs_f[None, :] * stride_pf,
                    mask=mask_c[:, None] & mask_f[None, :], other=0.0)
        dots = tl.dot(g.to(p.dtype), p, dots, input_precision=DOT_PRECISION)
        ga = to_acc(g)
        g_sums += tl.sum(ga, axis=1)
        g_min = tl.minimum(g_min, tl.min(tl.where(mask_g, ga, float("inf")), axis=1))
        g_max = tl.maximum(g_max, tl.max(tl.where(mask_g, ga, float("-inf")), axis=1))
    x = to_acc(tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_f[None, :] * stride_xf,
                       mask=mask_b[:, None] & mask_f[None, :], other=0.0))
    dx = 2.0 * dots - 2.0 * x * g_sums[:, None]
    # At an infinite x the reference sums -2 g_i (x - P_i) = -inf * sign(x) g_i: NaN unless every g_i
    # of the row has one sign (a zero gives 0 * inf), where the factored form gives +-inf or 0 * inf.
    one_sign = (g_min > 0) | (g_max < 0)
    dx = tl.where((tl.abs(x) == float("inf")) & ~one_sign[:, None], float("nan"), dx)
    # dx is contiguous [B, F].
    tl.store(dx_ptr + offs_b[:, None] * F + offs_f[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=mask_b[:, None] & mask_f[None, :])


# --------------------------------------------------------------------------------------------------
# Launch helpers: check, allocate, launch. Autograd lives in fastlenet.functional / fastlenet.ops.
# --------------------------------------------------------------------------------------------------

BLOCK_B = 32  # rows a program: 2048 programs at batch 65536, and at LeNet's 84 x 10 few registers
BLOCK_F = 32  # features a step (forward) or a program (backward): 84 features pad to 96, not 128
MAX_BLOCK_C = 32  # more classes take several tiles (forward) or steps (backward); 64 spills in fp32 on sm_80
NUM_WARPS = 4
# One stage, not Triton's default three: pipelined (two or three), ptxas spills a loop-invariant
# to the stack in some forward builds (LeNet's 32 x 16 float32 tile among them, sm_80 and sm_90);
# the loops are a few steps long (84 features are three), so there is little to overlap anyway.
NUM_STAGES = 1


class Plan(NamedTuple):
    """What a launch helper derives from the shapes alone (cached in _PLANS)."""
    grid: tuple[int, int]
    meta: dict  # constexprs and launch options; DOT_PRECISION per call


def _plan(x_shape, p_shape, backward: bool) -> Plan:
    B, F = x_shape
    C = p_shape[0]
    block_c = min(max(next_pow2(C), 16), MAX_BLOCK_C)  # tl.dot needs every dimension >= 16
    # grid: forward (row blocks, class tiles), each looping over the features; backward (row
    # blocks, feature tiles), each looping over the classes. No program reads another's output.
    grid = (cdiv(B, BLOCK_B), cdiv(F, BLOCK_F) if backward else cdiv(C, block_c))
    meta = dict(DOT_PRECISION=None, BLOCK_B=BLOCK_B, BLOCK_C=block_c, BLOCK_F=BLOCK_F, num_warps=NUM_WARPS,
                num_stages=NUM_STAGES)
    return Plan(grid, meta)


_PLANS = PlanCache()


def _launch(kernel, plan: Plan, x, args: dict):
    meta = dict(plan.meta)
    meta["DOT_PRECISION"] = dot_precision(x, "matmul")
    launch(kernel, plan.grid, args, meta)


def rbf_scores_forward(x, prototypes):
    """scores [B, C] (contiguous, x's dtype) of x [B, F] against prototypes [C, F], same dtype."""
    B, F = x.shape
    C = prototypes.shape[0]
    plan = _PLANS.get_or_build((x.shape, prototypes.shape, False), _plan)
    scores = empty((B, C), device=x.device, dtype=x.dtype)
    _launch(rbf_scores_fwd_kernel, plan, x,
            dict(x_ptr=x, p_ptr=prototypes, s_ptr=scores, B=B, C=C, F=F,
                 stride_xb=x.stride(0), stride_xf=x.stride(1),
                 stride_pc=prototypes.stride(0), stride_pf=prototypes.stride(1)))
    return scores


def rbf_scores_backward(grad_scores, x, prototypes):
    """dx [B, F] (contiguous) for the upstream gradient grad_scores, a contiguous [B, C]."""
    B, F = x.shape
    C = prototypes.shape[0]
    plan = _PLANS.get_or_build((x.shape, prototypes.shape, True), _plan)
    dx = empty((B, F), device=x.device, dtype=x.dtype)
    _launch(rbf_scores_bwd_kernel, plan, x,
            dict(g_ptr=grad_scores, x_ptr=x, p_ptr=prototypes, dx_ptr=dx, B=B, C=C, F=F,
                 stride_xb=x.stride(0), stride_xf=x.stride(1),
                 stride_pc=prototypes.stride(0), stride_pf=prototypes.stride(1)))
    return dx


@accounts(rbf_scores_fwd_kernel)
def _forward_work(d: dict) -> Work:
    """A BLOCK_B x BLOCK_C tile of x P^T a program, F in steps of BLOCK_F (the squared norms beside
    the dot are not counted, as a bias is not):
        executed = programs * 2 * BLOCK_B * BLOCK_C * ceil(F / BLOCK_F) * BLOCK_F
        useful   = 2 * B * C * F
    Reads x and P; writes the scores."""
    a, m = d["args"], d["meta"]
    programs = math.prod(d["grid"])
    executed = programs * 2 * m["BLOCK_B"] * m["BLOCK_C"] * round_up(a["F"], m["BLOCK_F"])
    return Work((Job("", "rbf_scores_fwd_kernel", programs, executed, 2 * a["B"] * a["C"] * a["F"],
                     (m["BLOCK_B"], m["BLOCK_C"])),),
                tensor_bytes(d, "x_ptr", "p_ptr"), tensor_bytes(d, "s_ptr"))


@accounts(rbf_scores_bwd_kernel)
def _backward_work(d: dict) -> Work:
    """A BLOCK_B x BLOCK_F tile of dx = 2 g P - 2 x rowsum(g) a program, C in steps of BLOCK_C:
        executed = programs * 2 * BLOCK_B * BLOCK_F * ceil(C / BLOCK_C) * BLOCK_C
        useful   = 2 * B * C * F
    Reads the upstream gradient, x and P; writes dx."""
    a, m = d["args"], d["meta"]
    programs = math.prod(d["grid"])
    executed = programs * 2 * m["BLOCK_B"] * m["BLOCK_F"] * round_up(a["C"], m["BLOCK_C"])
    return Work((Job("dx", "rbf_scores_bwd_kernel", programs, executed, 2 * a["B"] * a["C"] * a["F"],
                     (m["BLOCK_B"], m["BLOCK_F"])),),
                tensor_bytes(d, "g_ptr", "x_ptr", "p_ptr"), tensor_bytes(d, "dx_ptr"))
