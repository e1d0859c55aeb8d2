"""linear + bias + activation, y = act(x W^T + b): forward and backward.

Forward is a tiled GEMM with bias and activation on the fp32 accumulator before the single store.
Backward saves nothing beyond x, W and y (act' comes from y) and never materialises dz; it is one
launch, split weight-gradient programs first, then grad input. Why: docs/design.md, "linear_act".
"""
import math
from typing import NamedTuple

import triton
import triton.language as tl

from .accounting import Job, Work, accounts, tensor_bytes
from .activations import act, act_backward
from .launch import PlanCache, cdiv, dot_precision, empty, launch, next_pow2, round_up
from .split_reduce import (WeightGradSizes, arrival_counters, counter_capacity, finish_weight_grad,
                           plan_weight_grad, weight_grad_job, weight_grad_program, weight_grad_sizes,
                           weight_grad_traffic, zero_counters)


@triton.jit
def linear_act_fwd_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, y_ptr, counter_ptr,
    # sizes
    M, N, K, NUM_COUNTERS,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk,
    # meta-parameters
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    zero_counters(counter_ptr, NUM_COUNTERS, tl.program_id(0) + tl.program_id(1))
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(acc_dtype)[None, :]
    y = act(acc, ACTIVATION)
    # y is contiguous [M, N].
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _grad_preact(g_ptr, y_ptr, m, n, mask, N, ACTIVATION: tl.constexpr):
    """dL/dz = g * act'(z) at rows m, columns n (broadcast against each other); g, y contiguous."""
    offs = m * N + n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    return act_backward(g, y, ACTIVATION)  # float32 (float64 for float64) whatever g's dtype


@triton.jit
def _grad_input_tile(pid, w_ptr, g_ptr, y_ptr, dx_ptr, M, N, K, stride_wn, stride_wk,
                     ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[m, k] = sum_n dz[m, n] W[n, k]."""
    acc_dtype = tl.float64 if dx_ptr.dtype.element_ty == tl.float64 else tl.float32
    num_k = tl.cdiv(K, BLOCK_K)
    offs_m = (pid // num_k).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = (pid % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=acc_dtype)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dz = _grad_preact(g_ptr, y_ptr, offs_m[:, None], offs_n[None, :],
                          mask_m[:, None] & mask_n[None, :], N, ACTIVATION)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(dz.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    # dx is contiguous [M, K].
    tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _grad_weight_tile(pid, x_ptr, g_ptr, y_ptr, dw_ptr, db_ptr, ws_ptr, counter_ptr,
                      M, N, K, SPLIT, ROWS_PER_SPLIT, GROUP, stride_xm, stride_xk,
                      ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, LEVELS: tl.constexpr,
                      DOT_PRECISION: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """dW tile = dz^T [N, M] @ x [M, K] and db = the row sums of dz^T, over one slice of the batch."""
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    split, tile, offs_n, offs_k, owns_bias = weight_grad_program(pid, N, K, SPLIT, BLOCK_N, BLOCK_K)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=acc_dtype)
    # dL/dz summed elementwise over this program's rows, for the bias gradient (split_reduce.py).
    bias_parts = tl.zeros([BLOCK_N, BLOCK_R], dtype=acc_dtype)
    r_start = split.to(tl.int64) * ROWS_PER_SPLIT
    for r0 in range(0, ROWS_PER_SPLIT, BLOCK_R):
        offs_r = r_start + r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < M
        dz_t = _grad_preact(g_ptr, y_ptr, offs_r[None, :], offs_n[:, None],
                            mask_r[None, :] & mask_n[:, None], N, ACTIVATION)
        x = tl.load(x_ptr + offs_r[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_r[:, None] & (offs_k[None, :] < K), other=0.0)
        acc = tl.dot(dz_t.to(x.dtype), x, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            bias_parts += dz_t
    finish_weight_grad(acc, bias_parts, dw_ptr, db_ptr, ws_ptr, counter_ptr, offs_n, offs_k, tile, split,
                       owns_bias, N, K, SPLIT, GROUP, HAS_BIAS, LEVELS, BLOCK_N, BLOCK_K, BLOCK_R)


@triton.jit
def linear_act_bwd_kernel(
    # pointers
    x_ptr, w_ptr, g_ptr, y_ptr, dx_ptr, dw_ptr, db_ptr, ws_ptr, counter_ptr,
    # sizes
    M, N, K, NUM_DW, SPLIT, ROWS_PER_SPLIT, GROUP,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk,
    # meta-parameters
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, LEVELS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_DX_M: tl.constexpr, BLOCK_DX_N: tl.constexpr, BLOCK_DX_K: tl.constexpr,
    BLOCK_DW_N: tl.constexpr, BLOCK_DW_K: tl.constexpr, BLOCK_DW_R: tl.constexpr,
):
    # One launch, two jobs: the first NUM_DW programs compute weight-gradient (tile, split) pairs,
    # the others grad-input tiles.
    pid = tl.program_id(0)
    if pid >= NUM_DW:
        _grad_input_tile(pid - NUM_DW, w_ptr, g_ptr, y_ptr, dx_ptr, M, N, K, stride_wn, stride_wk,
                         ACTIVATION, DOT_PRECISION, BLOCK_DX_M, BLOCK_DX_N, BLOCK_DX_K)
    else:
        _grad_weight_tile(pid, x_ptr, g_ptr, y_ptr, dw_ptr, db_ptr, ws_ptr, counter_ptr,
                          M, N, K, SPLIT, ROWS_PER_SPLIT, GROUP, stride_xm, stride_xk,
                          ACTIVATION, HAS_BIAS, LEVELS, DOT_PRECISION, BLOCK_DW_N, BLOCK_DW_K, BLOCK_DW_R)


# --------------------------------------------------------------------------------------------------
# Launch helpers: check, allocate, launch. Autograd lives in fastlenet.functional.
# --------------------------------------------------------------------------------------------------

_MAX_SPLIT = 64  # programs per weight-gradient tile at most


def _weight_grad_sizes(M: int, N: int, K: int, has_bias: bool, enabled: bool = True):
    """The weight-gradient reduction's split over the M rows (split_reduce.weight_grad_sizes), in
    BLOCK_DW_N x BLOCK_DW_K tiles of BLOCK_DW_R rows a step (_weight_grad_blocks); the forward
    needs it too, to zero the backward's arrival counters."""
    block_n, block_k, block_r = _weight_grad_blocks(N)
    return weight_grad_sizes(N, K, has_bias, M, block_out=block_n, block_k=block_k, block_rows=block_r,
                             min_blocks=8, max_split=_MAX_SPLIT, enabled=enabled)


def _weight_grad_blocks(N: int) -> tuple[int, int, int]:
    """(BLOCK_DW_N, BLOCK_DW_K, BLOCK_DW_R) of the weight-gradient programs."""
    return min(max(next_pow2(N), 16), 32), 64, 32


def counters_needed(N: int, K: int, has_bias: bool) -> int:
    """Arrival counters a forward that saves for backward allocates and zeroes: as many as its
    backward needs for any batch (split_reduce.counter_capacity), so fastlenet.ops's fake
    implementation can give their shape from the weight alone, and one more, the last, for a loss
    over this output (LOSS_COUNTER_ATTR)."""
    block_n, block_k, block_r = _weight_grad_blocks(N)
    return counter_capacity(N, K, has_bias, block_n, block_k, block_r, max_split=_MAX_SPLIT) + 1


# A linear layer's output is often a classifier's logits. Its forward zeroes one counter more than
# its backward uses and hangs the counters on the output under this attribute; a cross-entropy
# over exactly that tensor takes them (and removes the attribute: one call per counter), so its
# forward can split the batch over several programs without a memset (kernels/cross_entropy.py).
LOSS_COUNTER_ATTR = "_fastlenet_loss_counters"


class ForwardTile(NamedTuple):
    block_m: int
    block_n: int  # the widest: narrower layers take next_pow2(N), at least 16
    num_warps: int
    num_stages: int


# Forward tiles, largest first, and the programs a launch should have: about two per SM of an H100
# (132 SMs). A layer takes the largest tile that still gives that many programs, or else the
# smallest. Each covers its tile once as a TF32 MMA and as an FMA layout; why these and not others
# (what spilled): docs/design.md, "Compiler configurations".
_FORWARD_TILES = (ForwardTile(64, 64, 8, 2), ForwardTile(32, 32, 4, 1), ForwardTile(16, 32, 2, 1))
_FORWARD_PROGRAMS = 2 * 132


def _forward_tile(M: int, N: int) -> ForwardTile:
    for tile in _FORWARD_TILES:
        tile = tile._replace(block_n=min(max(next_pow2(N), 16), tile.block_n))
        if cdiv(M, tile.block_m) * cdiv(N, tile.block_n) >= _FORWARD_PROGRAMS:
            break
    return tile


class ForwardPlan(NamedTuple):
    """What linear_act_forward derives from shapes and settings alone (cached in _FWD)."""
    M: int
    N: int
    K: int
    num_counters: int  # arrival counters zeroed for the backward and the loss (0 when not saving)
    grid: tuple[int, int]
    meta: dict  # constexprs and launch options; DOT_PRECISION per call


def _forward_config(x_shape, w_shape, activation: str, has_bias: bool, save_for_backward: bool) -> ForwardPlan:
    """The ForwardPlan of a call's shapes and settings."""
    M, K = x_shape
    N = w_shape[0]
    num_counters = counters_needed(N, K, has_bias) if save_for_backward else 0
    tile = _forward_tile(M, N)
    # grid: (row tiles of the batch, tiles of output features)
    grid = (cdiv(M, tile.block_m), cdiv(N, tile.block_n))
    meta = dict(ACTIVATION=activation, HAS_BIAS=has_bias, DOT_PRECISION=None,
                BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=32, num_warps=tile.num_warps,
                num_stages=tile.num_stages)
    return ForwardPlan(M, N, K, num_counters, grid, meta)


_FWD = PlanCache()


def linear_act_forward(x, weight, bias, activation: str, save_for_backward: bool = False):
    """y = act(x @ weight.T + bias) for a 2-D x [M, K]. Returns (y, counters): y a contiguous
    [M, N]; counters the weight-gradient arrival counters this launch zeroes for the backward (when
    saving for backward) or None."""
    key = (x.shape, weight.shape, activation, bias is not None, save_for_backward)
    plan = _FWD.get_or_build(key, _forward_config)
    M, N = plan.M, plan.N
    y = empty((M, N), device=x.device, dtype=x.dtype)
    counters = arrival_counters(plan.num_counters, x, M * N) if save_for_backward else None
    meta = dict(plan.meta)
    meta["DOT_PRECISION"] = dot_precision(x, "matmul")
    sx, sw = x.stride(), weight.stride()
    launch(linear_act_fwd_kernel, plan.grid,
           dict(x_ptr=x, w_ptr=weight, b_ptr=bias if bias is not None else weight, y_ptr=y,
                counter_ptr=counters if save_for_backward else y,
                M=M, N=N, K=plan.K, NUM_COUNTERS=plan.num_counters, stride_xm=sx[0], stride_xk=sx[1],
                stride_wn=sw[0], stride_wk=sw[1]),
           meta)
    if counters is not None:
        setattr(y, LOSS_COUNTER_ATTR, counters)
    return y, counters


@accounts(linear_act_fwd_kernel)
def _forward_work(d: dict) -> Work:
    """A BLOCK_M x BLOCK_N tile of y = x W^T a program, K in steps of BLOCK_K:
        executed = programs * 2 * BLOCK_M * BLOCK_N * ceil(K / BLOCK_K) * BLOCK_K
        useful   = 2 * M * N * K
    Reads x, W (and b); writes y and the backward's arrival counters (zeroed)."""
    a, m = d["args"], d["meta"]
    programs = math.prod(d["grid"])
    executed = programs * 2 * m["BLOCK_M"] * m["BLOCK_N"] * round_up(a["K"], m["BLOCK_K"])
    reads = ["x_ptr", "w_ptr"] + ["b_ptr"] * m["HAS_BIAS"]
    writes = ["y_ptr"] + ["counter_ptr"] * (a["NUM_COUNTERS"] > 0)
    return Work((Job("", "linear_act_fwd_kernel", programs, executed, 2 * a["M"] * a["N"] * a["K"],
                     (m["BLOCK_M"], m["BLOCK_N"])),),
                tensor_bytes(d, *reads), tensor_bytes(d, *writes))


class BackwardPlan(NamedTuple):
    """What linear_act_backward derives from shapes and settings alone (cached in _BWD)."""
    M: int
    N: int
    K: int
    num_dx: int  # grad-input programs, after the weight-gradient ones (0 without dx)
    sizes: WeightGradSizes  # the weight-gradient reduction's split
    meta: dict  # constexprs and launch options; DOT_PRECISION per call


def _backward_config(x_shape, w_shape, activation: str, has_bias: bool, need_dx: bool,
                     need_dw: bool) -> BackwardPlan:
    """The BackwardPlan of a call's shapes and settings."""
    M, K = x_shape
    N = w_shape[0]
    BLOCK_DX_M, BLOCK_DX_N, BLOCK_DX_K = 32, 32, 64
    num_dx = cdiv(M, BLOCK_DX_M) * cdiv(K, BLOCK_DX_K) if need_dx else 0
    BLOCK_DW_N, BLOCK_DW_K, BLOCK_DW_R = _weight_grad_blocks(N)
    plan_sizes = _weight_grad_sizes(M, N, K, has_bias, enabled=need_dw)
    meta = dict(ACTIVATION=activation, HAS_BIAS=has_bias, LEVELS=plan_sizes.levels, DOT_PRECISION=None,
                BLOCK_DX_M=BLOCK_DX_M, BLOCK_DX_N=BLOCK_DX_N, BLOCK_DX_K=BLOCK_DX_K,
                BLOCK_DW_N=BLOCK_DW_N, BLOCK_DW_K=BLOCK_DW_K, BLOCK_DW_R=BLOCK_DW_R,
                # One stage and a register budget of 128, or ptxas spills: docs/design.md,
                # "Compiler configurations".
                num_warps=8, num_stages=1, maxnreg=128)
    return BackwardPlan(M, N, K, num_dx, plan_sizes, meta)


_BWD = PlanCache()


def linear_act_backward(grad_y, x, weight, y, activation: str, has_bias: bool,
                        need_dx: bool, need_dw: bool, counters=None):
    """Returns (dx or None, dw or None, db or None) in one launch; grad_y and y contiguous [M, N].
    `counters` are those the forward returned (zeroed by it); None allocates zeroed ones."""
    key = (x.shape, weight.shape, activation, has_bias, need_dx, need_dw)
    cfg = _BWD.get_or_build(key, _backward_config)
    M, N, K = cfg.M, cfg.N, cfg.K
    device, dtype = x.device, x.dtype
    dx = empty((M, K), device=device, dtype=dtype) if need_dx else None
    dw = empty((N, K), device=device, dtype=dtype) if need_dw else None
    db = empty((N,), device=device, dtype=dtype) if need_dw and has_bias else None
    plan = plan_weight_grad(cfg.sizes, x, counters)
    meta = dict(cfg.meta)
    meta["DOT_PRECISION"] = dot_precision(x, "matmul")
    sx, sw = x.stride(), weight.stride()

    # grid: (weight-gradient tile x split) programs, then NUM_DX grad-input tiles.
    grid = (plan.programs + cfg.num_dx,)
    launch(linear_act_bwd_kernel, grid,
           dict(x_ptr=x, w_ptr=weight, g_ptr=grad_y, y_ptr=y,
                dx_ptr=dx if dx is not None else y, dw_ptr=dw if dw is not None else y,
                db_ptr=db if db is not None else y, ws_ptr=plan.workspace, counter_ptr=plan.counters,
                M=M, N=N, K=K, NUM_DW=plan.programs, SPLIT=plan.sizes.split,
                ROWS_PER_SPLIT=plan.sizes.rows_per_split, GROUP=plan.sizes.group,
                stride_xm=sx[0], stride_xk=sx[1], stride_wn=sw[0], stride_wk=sw[1]),
           meta)
    return dx, dw, db


@accounts(linear_act_bwd_kernel)
def _backward_work(d: dict) -> Work:
    """Two jobs in one grid. dw: the first NUM_DW programs, BLOCK_DW_N x BLOCK_DW_K tiles (see
    split_reduce.weight_grad_job). dx: the remaining NUM_DX programs of BLOCK_DX_M rows x BLOCK_DX_K
    input features, reducing over the N outputs in steps of BLOCK_DX_N:
        executed = NUM_DX * 2 * BLOCK_DX_M * BLOCK_DX_K * ceil(N / BLOCK_DX_N) * BLOCK_DX_N
    Useful: 2 * M * N * K each. Reads grad_y and y, W (dx) and x (dw); writes dx, dW and db, and the
    reduction's workspace and counters."""
    a, m = d["args"], d["meta"]
    useful = 2 * a["M"] * a["N"] * a["K"]
    dw_programs = a["NUM_DW"]
    num_dx = d["grid"][0] - dw_programs
    dx = Job("dx", "_grad_input_tile", num_dx,
             num_dx * 2 * m["BLOCK_DX_M"] * m["BLOCK_DX_K"] * round_up(a["N"], m["BLOCK_DX_N"]),
             useful if num_dx else 0, (m["BLOCK_DX_M"], m["BLOCK_DX_K"]))
    dw = weight_grad_job(d, dw_programs, m["BLOCK_DW_N"], m["BLOCK_DW_K"], useful)
    extra_reads, extra_writes = weight_grad_traffic(d, dw_programs)
    reads = ["g_ptr", "y_ptr"] + ["w_ptr"] * (num_dx > 0) + ["x_ptr"] * (dw_programs > 0) + extra_reads
    writes = ["dx_ptr"] * (num_dx > 0) + extra_writes
    return Work((dx, dw), tensor_bytes(d, *reads), tensor_bytes(d, *writes))
