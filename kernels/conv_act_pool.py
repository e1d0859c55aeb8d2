"""conv2d (stride 1) + bias + activation [+ 2x2/2 pooling]: forward and backward as implicit GEMMs.

Forward rows are pooled positions with four accumulators (one per window position): pooling happens in
registers, only the pooled map is stored. act' comes from the output, so backward needs only a 1-byte
window index (max) or the pre-pool activations (avg). The parameters' gradients are one launch, dz
gathered on the fly; grad-input reads dz k*k times, so where it is wanted dz is gathered once, in a
launch of its own, then read by grad-input's. Why: docs/design.md, "conv_act_pool".
"""
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .accounting import Job, Work, accounts, tensor_bytes
from .activations import ACTIVATIONS, PRODUCT_BACKWARD, act, act_backward, to_acc
from .launch import PlanCache, cdiv, dot_precision, empty, launch, next_pow2, round_up
from .split_reduce import (WeightGradSizes, arrival_counters, channel_sums, counter_capacity, finish_weight_grad,
                           plan_weight_grad, weight_grad_job, weight_grad_program, weight_grad_sizes,
                           weight_grad_traffic, zero_counters)

# The pools the Python API takes; None is no pooling, spelled "none" as the kernels' POOL constexpr.
# "subsample" is the 1998 LeNet-5's trainable subsampling: pool_act(pool_weight[c] * (the 2x2 window's
# sum) + pool_bias[c]).
POOLS = ("max", "avg", "subsample", None)


def _pool_constexpr(pool) -> str:
    return "none" if pool is None else pool


@triton.jit
def _pool_stride(POOL: tl.constexpr):
    """Conv positions per output position along each axis: 2 for a 2x2/2 pooling window, 1 without."""
    return 1 if POOL == "none" else 2


@triton.jit
def _im2col(x_ptr, n, oh, ow, row_mask, offs_k,
            C_in, H, W,
            stride_xn, stride_xc, stride_xh, stride_xw,
            KSIZE: tl.constexpr, PADDING: tl.constexpr):
    """Input patch values x[n, ci, oh + kh - p, ow + kw - p] for rows (n, oh, ow) and reduction
    index offs_k = (ci, kh, kw), zero outside the image. Rows and offs_k broadcast against each
    other, so the same gather serves the forward (rows x k) and the weight gradient (k x rows).
    n is int64 (a batch may pass 2^31 elements), oh/ow/offs_k int32 (one image never does).
    Addresses are int64; the position indices they come from are int32 (ROW_INDEX_LIMIT)."""
    K = C_in * KSIZE * KSIZE
    ci = offs_k // (KSIZE * KSIZE)
    kh = (offs_k // KSIZE) % KSIZE - PADDING
    kw = offs_k % KSIZE - PADDING
    # The address splits into a row part and a column part, so each element of the tile costs one
    # 64-bit add instead of a chain of 64-bit multiplies (which spilled registers on sm_80).
    row = n * stride_xn + oh * stride_xh + ow * stride_xw
    col = ci * stride_xc + kh * stride_xh + kw * stride_xw
    ih = oh + kh
    iw = ow + kw
    mask = row_mask & (offs_k < K) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(x_ptr + row + col, mask=mask, other=0.0)


@triton.jit
def _connected(conn_ptr, co, ci, C_in, mask, value, HAS_CONNECTIONS: tl.constexpr):
    """value where output channel co sees input channel ci (the connection table, bool [C_out, C_in],
    contiguous), else 0. A select, not a product: an unconnected weight is absent, so not even a NaN
    stored there reaches a sum, and its gradient is exactly 0."""
    if HAS_CONNECTIONS:
        seen = tl.load(conn_ptr + co * C_in + ci, mask=mask, other=0)
        value = tl.where(seen != 0, value, 0.0)
    return value


@triton.jit
def _weight_tile(w_ptr, conn_ptr, offs_k, offs_co, C_in, C_out,
                 stride_wo, stride_wi, stride_wh, stride_ww, KSIZE: tl.constexpr, HAS_CONNECTIONS: tl.constexpr):
    """w[co, ci, kh, kw] for reduction index offs_k = (ci, kh, kw) and output channels offs_co; zero
    where the connection table (HAS_CONNECTIONS) leaves ci out of co."""
    ci = offs_k // (KSIZE * KSIZE)
    kh = (offs_k // KSIZE) % KSIZE
    kw = offs_k % KSIZE
    mask = (offs_k < C_in * KSIZE * KSIZE) & (offs_co < C_out)
    w = tl.load(w_ptr + offs_co * stride_wo + ci * stride_wi + kh * stride_wh + kw * stride_ww,
                mask=mask, other=0.0)
    return _connected(conn_ptr, offs_co, ci, C_in, mask, w, HAS_CONNECTIONS)


@triton.jit
def _running_max(best, win, z, j: tl.constexpr):
    # As PyTorch's `val > max || isnan(val)`: strictly greater keeps the first maximum on ties, and
    # every NaN replaces what is there, so of several NaNs the last in scan order is kept.
    take = (z > best) | (z != z)
    return tl.where(take, z, best), tl.where(take, j, win).to(tl.int8)


@triton.jit
def _pool_window(z00, z01, z10, z11, POOL: tl.constexpr):
    """Pool the four window positions (row-major in the window). Max pooling also returns the
    window index of the first maximum, or of the last NaN: NaN propagates, and its gradient goes, as
    in PyTorch.
    Without pooling only z00 was computed, and it is the output."""
    if POOL == "none":
        return z00, tl.zeros(z00.shape, dtype=tl.int8)
    elif POOL == "max":
        best, win = _running_max(z00, tl.zeros(z00.shape, dtype=tl.int8), z01, 1)
        best, win = _running_max(best, win, z10, 2)
        best, win = _running_max(best, win, z11, 3)
        return best, win
    elif POOL == "subsample":  # the window's sum; _subsample applies the per-channel affine
        return z00 + z01 + z10 + z11, tl.zeros(z00.shape, dtype=tl.int8)
    else:
        tl.static_assert(POOL == "avg", "unknown POOL")
        return (z00 + z01 + z10 + z11) * 0.25, tl.zeros(z00.shape, dtype=tl.int8)


@triton.jit
def _nan_positions(a00, a01, a10, a11):
    """Bits 2..5 of the window index: which of the four positions (row-major) hold a NaN. PyTorch's
    composition backpropagates a zero through the activation at every position the window did not
    keep, and where the activation's backward is a product (sigmoid, tanh) 0 * act'(NaN) is NaN:
    the backward needs to know those positions to give the same NaN gradients."""
    bits = ((a00 != a00).to(tl.int8) << 2) | ((a01 != a01).to(tl.int8) << 3)
    return bits | ((a10 != a10).to(tl.int8) << 4) | ((a11 != a11).to(tl.int8) << 5)


@triton.jit
def _subsample(s, pw_ptr, pb_ptr, offs_co, mask_co, POOL_ACTIVATION: tl.constexpr):
    """The 1998 LeNet-5's trainable subsampling on window sums s [rows, channels]:
    pool_act(pool_weight[co] * s + pool_bias[co])."""
    coef = to_acc(tl.load(pw_ptr + offs_co, mask=mask_co, other=0.0))
    shift = to_acc(tl.load(pb_ptr + offs_co, mask=mask_co, other=0.0))
    return act(s * coef[None, :] + shift[None, :], POOL_ACTIVATION)


@triton.jit
def _grad_preact(g_ptr, y_ptr, win_ptr, a_ptr, pw_ptr, image, co, oh, ow, mask,
                 C_out, PH, PW,
                 ACTIVATION: tl.constexpr, POOL: tl.constexpr, SAVED_PREPOOL: tl.constexpr,
                 POOL_ACTIVATION: tl.constexpr, MARK_NANS: tl.constexpr):
    """(dz, du, a): dz = dL/dz at full-resolution conv positions (n, co, oh, ow) of the images at
    offsets `image` = n * C_out*PH*PW (int64) of the pooled maps, gathered from the
    pooled grad_output g, the pooled output y and the window index (max) or pre-pool activation
    (avg, subsample). Zero where no pooling window covers (oh, ow): the floor-dropped last
    row/column, or outside. Without pooling the output is the conv map itself (PH, PW its size):
    dz = act'(g) from y. With subsampling, du = dL/du at the window covering (oh, ow), u = the affine
    pool_act undoes, and a the activation there, of which the pool parameters' gradients are sums;
    other pools return dz in their place (unused, compiled away).
    image is int64; co, oh, ow int32; all broadcast against each other. dz is float32 (float64 for
    float64 tensors) whatever the storage dtype; the GEMMs round it to their operand dtype."""
    S: tl.constexpr = _pool_stride(POOL)
    # Positions' parts first, then the channels': where positions and channels broadcast (a tile),
    # each element costs an and, and an add.
    inside = ((oh >= 0) & (ow >= 0) & (oh < S * PH) & (ow < S * PW)) & mask
    # Shifts and masks, not // and %: oh and ow may be negative (masked off), and signed division
    # compiled to sign fix-ups of 8-bit arithmetic, most of the gather's instructions.
    pooled = (image + ((oh >> (S - 1)) * PW + (ow >> (S - 1)))) + co * (PH * PW)
    g = to_acc(tl.load(g_ptr + pooled, mask=inside, other=0.0))
    if POOL == "subsample":
        du = act_backward(g, tl.load(y_ptr + pooled, mask=inside, other=0.0), POOL_ACTIVATION)
        coef = to_acc(tl.load(pw_ptr + co, mask=inside, other=0.0))
        full = (4 * image + (oh * (2 * PW) + ow)) + co * (4 * PH * PW)
        a = to_acc(tl.load(a_ptr + full, mask=inside, other=0.0))
        dz = act_backward(du * coef, a, ACTIVATION)
    elif POOL == "none":
        dz = act_backward(g, tl.load(y_ptr + pooled, mask=inside, other=0.0), ACTIVATION)
        du, a = dz, dz
    elif POOL == "max":
        y = tl.load(y_ptr + pooled, mask=inside, other=0.0)
        pos = (oh & 1) * 2 + (ow & 1)
        if MARK_NANS:  # 0 * act'(NaN) at a NaN the window did not keep, as PyTorch (_nan_positions)
            win = tl.load(win_ptr + pooled, mask=inside, other=0).to(tl.int32)
            kept = inside & ((win & 3) == pos)
            dz = tl.where(kept, act_backward(g, y, ACTIVATION), 0.0)
            dz = tl.where(inside & ~kept & (((win >> (pos + 2)) & 1) != 0), float("nan"), dz)
        else:  # the plain index, compared as it is: the masked-off -1 matches no position
            win = tl.load(win_ptr + pooled, mask=inside, other=-1)
            dz = tl.where(win == pos, act_backward(g, y, ACTIVATION), 0.0)
        du, a = dz, dz
    else:
        dz = g * 0.25
        if SAVED_PREPOOL:
            full = (4 * image + (oh * (2 * PW) + ow)) + co * (4 * PH * PW)
            dz = act_backward(dz, tl.load(a_ptr + full, mask=inside, other=0.0), ACTIVATION)
        du, a = dz, dz
    return dz, du, a


@triton.jit
def conv2d_act_pool_fwd_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, conn_ptr, pw_ptr, pb_ptr, y_ptr, win_ptr, a_ptr, counter_ptr,
    # sizes
    N, C_in, C_out, NUM_COUNTERS,
    # strides
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wi, stride_wh, stride_ww,
    # meta-parameters
    KSIZE: tl.constexpr, PADDING: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, ACTIVATION: tl.constexpr, POOL: tl.constexpr,
    HAS_BIAS: tl.constexpr, SAVE_WIN: tl.constexpr, SAVE_PREPOOL: tl.constexpr,
    HAS_CONNECTIONS: tl.constexpr, POOL_ACTIVATION: tl.constexpr, MARK_NANS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    zero_counters(counter_ptr, NUM_COUNTERS, pid_m + pid_n)

    # Rows: pooled positions (n, ph, pw). See ROW_INDEX_LIMIT for why the index is int32 and n int64.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N * PH * PW
    pw = offs_m % PW
    ph = (offs_m // PW) % PH
    n = (offs_m // (PW * PH)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C_out

    # Top-left conv position of each pooling window, as columns for the patch gather.
    S: tl.constexpr = _pool_stride(POOL)
    n_c, oh_c, ow_c, m_c = n[:, None], S * ph[:, None], S * pw[:, None], mask_m[:, None]
    z00 = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    z01 = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    z10 = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    z11 = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    for k0 in range(0, C_in * KSIZE * KSIZE, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _weight_tile(w_ptr, conn_ptr, offs_k[:, None], offs_n[None, :], C_in, C_out,
                         stride_wo, stride_wi, stride_wh, stride_ww, KSIZE, HAS_CONNECTIONS)
        k_r = offs_k[None, :]
        x00 = _im2col(x_ptr, n_c, oh_c, ow_c, m_c, k_r, C_in, H, W,
                      stride_xn, stride_xc, stride_xh, stride_xw, KSIZE, PADDING)
        z00 = tl.dot(x00, w, z00, input_precision=DOT_PRECISION)
        if POOL != "none":
            x01 = _im2col(x_ptr, n_c, oh_c, ow_c + 1, m_c, k_r, C_in, H, W,
                          stride_xn, stride_xc, stride_xh, stride_xw, KSIZE, PADDING)
            z01 = tl.dot(x01, w, z01, input_precision=DOT_PRECISION)
            x10 = _im2col(x_ptr, n_c, oh_c + 1, ow_c, m_c, k_r, C_in, H, W,
                          stride_xn, stride_xc, stride_xh, stride_xw, KSIZE, PADDING)
            z10 = tl.dot(x10, w, z10, input_precision=DOT_PRECISION)
            x11 = _im2col(x_ptr, n_c, oh_c + 1, ow_c + 1, m_c, k_r, C_in, H, W,
                          stride_xn, stride_xc, stride_xh, stride_xw, KSIZE, PADDING)
            z11 = tl.dot(x11, w, z11, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(acc_dtype)[None, :]
        z00 += b
        z01 += b
        z10 += b
        z11 += b
    a00 = act(z00, ACTIVATION)
    a01 = act(z01, ACTIVATION)
    a10 = act(z10, ACTIVATION)
    a11 = act(z11, ACTIVATION)
    y, win = _pool_window(a00, a01, a10, a11, POOL)
    if MARK_NANS:
        win = win | _nan_positions(a00, a01, a10, a11)
    if POOL == "subsample":
        y = _subsample(y, pw_ptr, pb_ptr, offs_n, mask_n, POOL_ACTIVATION)

    # Outputs are contiguous NCHW: y / win are [N, C_out, PH, PW], a is [N, C_out, 2PH, 2PW].
    mask = mask_m[:, None] & mask_n[None, :]
    pooled = (n * (C_out * PH * PW) + ph * PW + pw)[:, None] + (offs_n * (PH * PW))[None, :]
    tl.store(y_ptr + pooled, y.to(y_ptr.dtype.element_ty), mask=mask)
    if SAVE_WIN:
        tl.store(win_ptr + pooled, win, mask=mask)
    if SAVE_PREPOOL:
        full = ((n * (C_out * 4 * PH * PW) + ph * (4 * PW) + 2 * pw)[:, None]
                + (offs_n * (4 * PH * PW))[None, :])
        a_dtype = a_ptr.dtype.element_ty
        tl.store(a_ptr + full, a00.to(a_dtype), mask=mask)
        tl.store(a_ptr + full + 1, a01.to(a_dtype), mask=mask)
        tl.store(a_ptr + full + 2 * PW, a10.to(a_dtype), mask=mask)
        tl.store(a_ptr + full + 2 * PW + 1, a11.to(a_dtype), mask=mask)


@triton.jit
def conv2d_act_pool_dz_kernel(
    # pointers
    g_ptr, y_ptr, win_ptr, a_ptr, pw_ptr, dz_ptr,
    # sizes
    N, C_out,
    # meta-parameters
    PH: tl.constexpr, PW: tl.constexpr, ACTIVATION: tl.constexpr, POOL: tl.constexpr,
    SAVED_PREPOOL: tl.constexpr, POOL_ACTIVATION: tl.constexpr, MARK_NANS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dz = dL/dz at every conv position a pooling window covers, channels last: [N, S*PH, S*PW, C_out].
    Gathered once here, so grad-input reads one value per tap instead of decoding its pooling
    window 25 times, and a filter row's taps are plain loads that can be in flight together."""
    S: tl.constexpr = _pool_stride(POOL)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < N * (S * PH * S * PW)
    ow = offs_p % (S * PW)
    oh = (offs_p // (S * PW)) % (S * PH)
    n = (offs_p // (S * PH * S * PW)).to(tl.int64)
    mask = mask_p[:, None] & (co < C_out)[None, :]
    dz, _, _ = _grad_preact(g_ptr, y_ptr, win_ptr, a_ptr, pw_ptr, (n * (C_out * PH * PW))[:, None], co[None, :],
                            oh[:, None], ow[:, None], mask, C_out, PH, PW,
                            ACTIVATION, POOL, SAVED_PREPOOL, POOL_ACTIVATION, MARK_NANS)
    tl.store(dz_ptr + offs_p.to(tl.int64)[:, None] * C_out + co[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_input_tile(pid, w_ptr, conn_ptr, dz_ptr, dx_ptr,
                     N, C_in, H, W, C_out, OH, OW,
                     stride_wo, stride_wi, stride_wh, stride_ww,
                     KSIZE: tl.constexpr, PADDING: tl.constexpr, HAS_CONNECTIONS: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     TAPS: tl.constexpr):
    """grad input: rows are input positions (n, ih, iw), columns input channels; the reduction runs
    over (output channel block, kh, kw), reading dz (conv2d_act_pool_dz_kernel's, channels last) at
    conv position (ih + p - kh, iw + p - kw). A trip is TAPS taps of one filter row (1, or all k):
    their loads depend on nothing loaded, so they can all be in flight at once (docs/design.md,
    "conv_act_pool")."""
    tl.static_assert(TAPS == 1 or TAPS == KSIZE, "a trip is one tap or a whole filter row")
    acc_dtype = tl.float64 if dx_ptr.dtype.element_ty == tl.float64 else tl.float32
    num_n = tl.cdiv(C_in, BLOCK_N)
    offs_m = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ci = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = (offs_m < N * H * W)[:, None]
    iw = (offs_m % W)[:, None]
    ih = ((offs_m // W) % H)[:, None]
    n = (offs_m // (W * H)).to(tl.int64)[:, None]
    mask_ci = (offs_ci < C_in)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    TRIPS_PER_ROW: tl.constexpr = KSIZE // TAPS
    for t in range(0, tl.cdiv(C_out, BLOCK_K) * (KSIZE * TRIPS_PER_ROW)):
        kh = (t // TRIPS_PER_ROW) % KSIZE
        co = (t // (KSIZE * TRIPS_PER_ROW)) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_co = co < C_out
        oh = ih + (PADDING - kh)
        # A row's conv position, bounds and address are one value a row; each element adds its channel.
        row_ok = mask_m & (oh >= 0) & (oh < OH)
        row = (n * OH + oh) * OW
        mask_w = mask_co[:, None] & mask_ci
        for j in tl.static_range(TAPS):
            # A whole row's taps are constants; a tap a trip decodes its own.
            if TAPS == KSIZE:
                kw = j
            else:
                kw = t % KSIZE
            ow = iw + (PADDING - kw)
            ok = row_ok & (ow >= 0) & (ow < OW)
            dz = tl.load(dz_ptr + ((row + ow) * C_out + co[None, :]), mask=ok & mask_co[None, :], other=0.0)
            w = tl.load(w_ptr + co[:, None] * stride_wo + offs_ci[None, :] * stride_wi
                        + (kh * stride_wh + kw * stride_ww), mask=mask_w, other=0.0)
            w = _connected(conn_ptr, co[:, None], offs_ci[None, :], C_in, mask_w, w, HAS_CONNECTIONS)
            acc = tl.dot(dz.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    # dx is contiguous NCHW.
    dx = dx_ptr + ((n * C_in + offs_ci[None, :]) * H + ih) * W + iw
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=mask_m & mask_ci)


@triton.jit
def _grad_weight_tile(pid, x_ptr, g_ptr, y_ptr, win_ptr, a_ptr, conn_ptr, pw_ptr, dw_ptr, db_ptr, ws_ptr,
                      counter_ptr, N, C_in, H, W, C_out, PH, PW, SPLIT, ROWS_PER_SPLIT, GROUP,
                      stride_xn, stride_xc, stride_xh, stride_xw,
                      KSIZE: tl.constexpr, PADDING: tl.constexpr, ACTIVATION: tl.constexpr,
                      POOL: tl.constexpr, SAVED_PREPOOL: tl.constexpr, HAS_BIAS: tl.constexpr, LEVELS: tl.constexpr,
                      HAS_CONNECTIONS: tl.constexpr, POOL_ACTIVATION: tl.constexpr, MARK_NANS: tl.constexpr,
                      DOT_PRECISION: tl.constexpr,
                      BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """grad weight: [C_out, K] = dz^T [C_out, R] @ patches [R, K], and grad bias = the row sums of
    dz^T, R = the conv positions covered by a pooling window; this program sums one slice of R.
    With subsampling, db_ptr is [3, C_out]: the conv bias's, the pool weight's and the pool bias's
    gradients (channel_sums)."""
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    K = C_in * KSIZE * KSIZE
    split, tile, offs_co, offs_k, owns_bias = weight_grad_program(pid, C_out, K, SPLIT, BLOCK_CO, BLOCK_K)
    # R runs over the conv positions the output covers (all of them without pooling).
    S: tl.constexpr = _pool_stride(POOL)
    OH2 = S * PH
    OW2 = S * PW
    acc = tl.zeros([BLOCK_CO, BLOCK_K], dtype=acc_dtype)
    # dL/dz summed elementwise over this program's rows, for the bias gradient (split_reduce.py).
    bias_parts = tl.zeros([BLOCK_CO, BLOCK_R], dtype=acc_dtype)
    pw_parts = tl.zeros([BLOCK_CO, BLOCK_R], dtype=acc_dtype)
    pb_parts = tl.zeros([BLOCK_CO, BLOCK_R], dtype=acc_dtype)
    r_start = split * ROWS_PER_SPLIT
    for r0 in range(0, ROWS_PER_SPLIT, BLOCK_R):
        offs_r = r_start + r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < N * OH2 * OW2
        ow = offs_r % OW2
        oh = (offs_r // OW2) % OH2
        n = (offs_r // (OW2 * OH2)).to(tl.int64)
        image = n * (C_out * PH * PW)
        dz, du, a = _grad_preact(g_ptr, y_ptr, win_ptr, a_ptr, pw_ptr, image[None, :], offs_co[:, None],
                                 oh[None, :], ow[None, :], mask_r[None, :] & (offs_co[:, None] < C_out),
                                 C_out, PH, PW, ACTIVATION, POOL, SAVED_PREPOOL, POOL_ACTIVATION, MARK_NANS)
        patches = _im2col(x_ptr, n[:, None], oh[:, None], ow[:, None], mask_r[:, None],
                          offs_k[None, :], C_in, H, W,
                          stride_xn, stride_xc, stride_xh, stride_xw, KSIZE, PADDING)
        acc = tl.dot(dz.to(patches.dtype), patches, acc, input_precision=DOT_PRECISION)
        if POOL == "subsample":
            # Per channel: d pool_weight = sum du * a over every conv position a window covers (u's
            # window sum, spread over its terms); d pool_bias = sum du once a window (its top left).
            corner = ((oh % 2) + (ow % 2) == 0)[None, :]
            pw_parts += du * a
            pb_parts += tl.where(corner, du, 0.0)
        if HAS_BIAS:
            bias_parts += dz
    if HAS_CONNECTIONS:  # each partial is masked, so their sum is: unconnected weights get exactly 0
        acc = _connected(conn_ptr, offs_co[:, None], offs_k[None, :] // (KSIZE * KSIZE), C_in,
                         (offs_co[:, None] < C_out) & (offs_k[None, :] < K), acc, HAS_CONNECTIONS)
    if POOL == "subsample":
        bias_parts = channel_sums(bias_parts, pw_parts, pb_parts)
    # dw is contiguous [C_out, C_in, k, k] == [C_out, K].
    finish_weight_grad(acc, bias_parts, dw_ptr, db_ptr, ws_ptr, counter_ptr, offs_co, offs_k, tile, split,
                       owns_bias, C_out, K, SPLIT, GROUP, HAS_BIAS or POOL == "subsample", LEVELS, BLOCK_CO,
                       BLOCK_K, BLOCK_R, POOL == "subsample")


@triton.jit
def conv2d_act_pool_dx_kernel(
    # pointers
    w_ptr, conn_ptr, dz_ptr, dx_ptr,
    # sizes
    N, C_in, C_out,
    # strides
    stride_wo, stride_wi, stride_wh, stride_ww,
    # meta-parameters
    KSIZE: tl.constexpr, PADDING: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, POOL: tl.constexpr, HAS_CONNECTIONS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TAPS: tl.constexpr,
):
    """Grad-input: one BLOCK_M x BLOCK_N tile of dx a program, from conv2d_act_pool_dz_kernel's dz."""
    S: tl.constexpr = _pool_stride(POOL)
    _grad_input_tile(tl.program_id(0), w_ptr, conn_ptr, dz_ptr, dx_ptr, N, C_in, H, W, C_out, S * PH, S * PW,
                     stride_wo, stride_wi, stride_wh, stride_ww, KSIZE, PADDING, HAS_CONNECTIONS,
                     DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, TAPS)


@triton.jit
def conv2d_act_pool_bwd_kernel(
    # pointers
    x_ptr, g_ptr, y_ptr, win_ptr, a_ptr, conn_ptr, pw_ptr, dw_ptr, db_ptr, ws_ptr, counter_ptr,
    # sizes
    N, C_in, C_out, SPLIT, ROWS_PER_SPLIT, GROUP,
    # strides
    stride_xn, stride_xc, stride_xh, stride_xw,
    # meta-parameters
    KSIZE: tl.constexpr, PADDING: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, ACTIVATION: tl.constexpr, POOL: tl.constexpr,
    SAVED_PREPOOL: tl.constexpr, HAS_BIAS: tl.constexpr, LEVELS: tl.constexpr,
    HAS_CONNECTIONS: tl.constexpr, POOL_ACTIVATION: tl.constexpr, MARK_NANS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_DW_CO: tl.constexpr, BLOCK_DW_K: tl.constexpr, BLOCK_DW_R: tl.constexpr,
):
    """The parameters' gradients: weight and bias (and subsampling's pool weight and bias), one
    (tile, split) pair of the weight-gradient reduction a program, dz gathered on the fly."""
    _grad_weight_tile(tl.program_id(0), x_ptr, g_ptr, y_ptr, win_ptr, a_ptr, conn_ptr, pw_ptr, dw_ptr, db_ptr,
                      ws_ptr, counter_ptr, N, C_in, H, W, C_out, PH, PW, SPLIT, ROWS_PER_SPLIT, GROUP,
                      stride_xn, stride_xc, stride_xh, stride_xw,
                      KSIZE, PADDING, ACTIVATION, POOL, SAVED_PREPOOL, HAS_BIAS, LEVELS, HAS_CONNECTIONS,
                      POOL_ACTIVATION, MARK_NANS, DOT_PRECISION, BLOCK_DW_CO, BLOCK_DW_K, BLOCK_DW_R)


# --------------------------------------------------------------------------------------------------
# Launch helpers: check, allocate, launch. Autograd lives in fastlenet.functional.
# --------------------------------------------------------------------------------------------------

# Every GEMM row index (pooled, conv and input positions: n * positions_per_image + position) is
# int32, and only the image index n derived from it is widened to int64 for addresses. Decomposing
# an int64 index with // and % by a runtime size compiles to a call to a 64-bit division routine,
# whose call frame is stack memory (8-24 bytes on sm_80/sm_90) and its 64-bit work slow; int32 // and
# % inline. The price is this bound on N * H * W, checked by fastlenet.functional with a clear error:
# about 2 million 32x32 images, or 2.7 million of MNIST's 28x28, in one call.
ROW_INDEX_LIMIT = 2**31 - 1024


def pool_stride(pool) -> int:
    """Conv positions per output position along each axis (the host's _pool_stride)."""
    return 1 if pool is None else 2


def saves_window(pool) -> bool:
    """Whether a forward that saves for backward keeps the int8 window index (max pooling)."""
    return pool == "max"


def marks_nans(activation: str, pool) -> bool:
    """Whether the window index also marks the NaN positions of its window (_nan_positions): max
    pooling after an activation whose backward is a product (act_backward)."""
    return pool == "max" and activation in PRODUCT_BACKWARD


def saves_prepool(activation: str, pool) -> bool:
    """Whether a forward that saves for backward keeps the pre-pool activations: average pooling
    needs act' at all four window positions, which the pooled output cannot give back; subsampling
    also sums them into its weight's gradient, so it keeps them even without an activation."""
    return (pool == "avg" and activation != "identity") or pool == "subsample"


def pooled_size(h: int, w: int, ksize: int, padding: int, pool="max") -> tuple[int, int]:
    """(PH, PW) of pool2x2(conv_kxk(padding)) on an h x w input, with PyTorch's floor semantics;
    with pool None, the conv output's size."""
    s = pool_stride(pool)
    return (h + 2 * padding - ksize + 1) // s, (w + 2 * padding - ksize + 1) // s


# Weight-gradient programs a small batch is split into: about four an SM of a 132-SM GPU, all
# resident at once (LeNet's backward fits 5-6 an SM).
WEIGHT_GRAD_PROGRAMS = 512


# Rows a weight-gradient program sums, WEIGHT_GRAD_ROWS // BLOCK_DW_R trips (_weight_grad_blocks).
WEIGHT_GRAD_ROWS = 1024


def _weight_grad_blocks(C_out: int, K: int, pool) -> tuple[int, int, int]:
    """(BLOCK_DW_CO, BLOCK_DW_K, BLOCK_DW_R) of the weight-gradient programs, K = C_in*k*k. A trip's
    rows are one dependent memory wait (its gathers), so the more rows the fewer waits. Where the
    tile is 16 output channels and dz comes from the output and at most a window index (max pooling
    or none), a trip takes 64 rows if the tile is the whole K (a few input channels, as conv1's 25
    taps), else 32 (conv2's); 16 elsewhere, where taller tiles kept registers on the stack
    (docs/design.md, "Compiler configurations")."""
    block_co = min(max(next_pow2(C_out), 16), 32)
    if block_co > 16 or pool not in ("max", None):
        return block_co, 32, 16
    return block_co, 32, 64 if K <= 32 else 32


def channel_grads(has_bias: bool, pool) -> bool:
    """Whether the weight-gradient reduction also carries per-channel gradients: the bias's, and
    with subsampling its weight's and bias's too."""
    return has_bias or pool == "subsample"


def _weight_grad_sizes(N: int, C_in: int, C_out: int, ksize: int, PH: int, PW: int, pool, has_bias: bool,
                       enabled: bool = True):
    """The weight-gradient reduction's split (split_reduce.weight_grad_sizes); the forward needs it
    too, to zero the backward's arrival counters. Its rows are the conv positions a pooling window
    covers; the split grows with them, WEIGHT_GRAD_ROWS a program, so a large batch fills the GPU
    even for conv1, whose gradient is a single tile, bounded by the workspace. A small batch gets
    about WEIGHT_GRAD_PROGRAMS programs of at least 64 rows instead: fewer trips each, so the
    longest program is shorter (docs/design.md, "conv_act_pool")."""
    s = pool_stride(pool)
    block_co, block_k, block_r = _weight_grad_blocks(C_out, C_in * ksize * ksize, pool)
    return weight_grad_sizes(C_out, C_in * ksize * ksize, channel_grads(has_bias, pool), N * s * PH * s * PW,
                             block_out=block_co, block_k=block_k, block_rows=block_r,
                             min_blocks=WEIGHT_GRAD_ROWS // block_r, max_split=None, enabled=enabled,
                             fill=WEIGHT_GRAD_PROGRAMS, fill_blocks=max(64 // block_r, 1))


def counters_needed(w_shape, has_bias: bool, pool=None) -> int:
    """Arrival counters a forward that saves for backward allocates and zeroes for it: as many as
    any batch needs (split_reduce.counter_capacity), so fastlenet.ops's fake implementation can give
    their shape from the weight alone."""
    C_out, C_in, ksize, _ = w_shape
    block_co, block_k, block_r = _weight_grad_blocks(C_out, C_in * ksize * ksize, pool)
    return counter_capacity(C_out, C_in * ksize * ksize, channel_grads(has_bias, pool), block_co, block_k, block_r,
                            max_split=None)


class ForwardPlan(NamedTuple):
    """What conv2d_act_pool_forward derives from shapes and settings alone (cached in _FWD)."""
    N: int
    C_in: int
    C_out: int
    PH: int  # the output's size: pooled, or the conv map's without pooling
    PW: int
    save_win: bool  # keeps the int8 window index (max pooling, saving for backward)
    save_prepool: bool  # keeps the pre-pool activations (avg pooling with an activation, saving)
    num_counters: int  # arrival counters zeroed for the backward (0 when not saving)
    grid: tuple[int, int]
    meta: dict  # constexprs and launch options; DOT_PRECISION, BLOCK_K, num_warps, num_stages per call


def _forward_config(x_shape, w_shape, padding: int, activation: str, pool: str, has_bias: bool,
                    save_for_backward: bool, has_connections: bool, pool_activation: str) -> ForwardPlan:
    """The ForwardPlan of a call's shapes and settings."""
    N, C_in, H, W = x_shape
    C_out, _, ksize, _ = w_shape
    PH, PW = pooled_size(H, W, ksize, padding, pool)
    s = pool_stride(pool)
    save_win = save_for_backward and saves_window(pool)
    save_prepool = save_for_backward and saves_prepool(activation, pool)
    num_counters = counters_needed(w_shape, has_bias, pool) if save_for_backward else 0
    # Four gathered patch tiles and four accumulators are live per K step: 32 rows x at most 32
    # channels. Without pooling one accumulator replaces the four: 4x the rows is the same work
    # and registers. Warps and BLOCK_K by precision (_forward_dots). A conv whose output is 1x1 (the
    # 1998 LeNet-5's C5, in effect a full layer) takes 64 rows: at 128, Triton 3.9's build kept 8
    # bytes on the stack on sm_90 (IEEE dots, 80 registers); 64 builds spill-free on 3.8 and 3.9.
    BLOCK_M, BLOCK_N = (32 * 4 // (s * s)), min(max(next_pow2(C_out), 16), 32)
    if PH * PW == 1 and pool is None:
        BLOCK_M = 64
    # grid: (tiles of pooled positions N*PH*PW, tiles of output channels)
    grid = (cdiv(N * PH * PW, BLOCK_M), cdiv(C_out, BLOCK_N))
    meta = dict(KSIZE=ksize, PADDING=padding, H=H, W=W, PH=PH, PW=PW, ACTIVATION=activation,
                POOL=_pool_constexpr(pool), HAS_BIAS=has_bias, SAVE_WIN=save_win, SAVE_PREPOOL=save_prepool,
                HAS_CONNECTIONS=has_connections, POOL_ACTIVATION=pool_activation,
                MARK_NANS=save_win and marks_nans(activation, pool), DOT_PRECISION=None,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=None,
                num_warps=None, num_stages=None)
    return ForwardPlan(N, C_in, C_out, PH, PW, save_win, save_prepool, num_counters, grid, meta)


def _forward_dots(dtype, precision: str, K: int, BLOCK_M: int, BLOCK_N: int, pooled: bool) -> dict:
    """BLOCK_K and launch options of the forward for its operand dtype, dot precision, reduction
    length K = C_in*k*k and tile: tensor-core dots get BLOCK_M // 16 warps (16 rows a warp covers
    the tile once), IEEE dots (FMA) 8. Each choice, and what spilled instead: docs/design.md,
    "Compiler configurations"."""
    if dtype in (torch.float16, torch.bfloat16):
        return dict(BLOCK_K=16, num_warps=BLOCK_M // 16, num_stages=1)
    if precision == "tf32":
        return dict(BLOCK_K=32 if K <= 32 and BLOCK_N <= 16 else 16, num_warps=BLOCK_M // 16, num_stages=1)
    return dict(BLOCK_K=16, num_warps=8, num_stages=2 if pooled else 1)


def _grad_input_options(precision: str, block_n: int, ksize: int, C_out: int, has_connections: bool) -> dict:
    """BLOCK_K, TAPS and launch options of grad-input for its dot precision and tile, one stage, and
    a register budget (maxnreg) that builds spill-free on both Triton releases and both targets. A
    whole filter row a trip (TAPS = k) where the TF32 tile is narrow and C_out one channel block
    (LeNet's conv2), at 2 warps: Triton lays a chain of dots (the row's k taps) out with every warp
    along the rows, so 4 warps over 32 rows computed each product twice; 128 registers, 168 with a
    connection table (its mask kept 8-16 bytes on sm_80's stack at 128). Elsewhere a tap a trip:
    TF32 at 4 warps (one 16x8 MMA instruction a warp), IEEE (FMA) at 8; a whole row there kept 8-368
    bytes on the stack. Each choice: docs/design.md, "Compiler configurations"."""
    if precision == "tf32":
        row = block_n <= 16 and C_out <= 16
        return dict(BLOCK_K=16, TAPS=ksize if row else 1, num_warps=2 if row else 4, num_stages=1,
                    maxnreg=168 if has_connections or not row else 128)
    return dict(BLOCK_K=32, TAPS=1, num_warps=8, num_stages=1, maxnreg=128)


def _weight_grad_options(precision: str, block_r: int, subsample: bool, wide: bool) -> dict:
    """Launch options of the weight gradient: TF32 at 4 warps, IEEE (FMA) at 8, one stage, and a
    register budget: 96 for 16 rows a trip, 128 with subsampling's two more per-channel sums or a
    32-channel tile (wide), which kept 8-24 bytes on the stack at 96, and for 32 rows a trip; 152
    for 64 rows a trip, which kept 8 bytes on sm_80's stack at 128."""
    if precision == "tf32":
        return dict(num_warps=4, num_stages=1,
                    maxnreg=152 if block_r > 32 else 128 if block_r > 16 or subsample or wide else 96)
    return dict(num_warps=8, num_stages=1, maxnreg=128)


_FWD = PlanCache()


def conv2d_act_pool_forward(x, weight, bias, padding: int, activation: str, pool: str,
                            save_for_backward: bool, connections=None, pool_weight=None, pool_bias=None,
                            pool_activation: str = "identity"):
    """Returns (y, win, prepool, counters): y the pooled output; win the int8 window index (max
    pooling, when saving for backward) or None; prepool the pre-pool activations (avg pooling with a
    non-identity activation, or subsampling, when saving) or None; counters the weight-gradient
    arrival counters this launch zeroes for the backward (when saving) or None. connections: bool
    [C_out, C_in], contiguous, or None (all connected); pool_weight, pool_bias and pool_activation:
    subsampling's (pool "subsample"). Inputs must already be validated."""
    key = (x.shape, weight.shape, padding, activation, pool, bias is not None, save_for_backward,
           connections is not None, pool_activation)
    plan = _FWD.get_or_build(key, _forward_config)
    N, C_out, PH, PW = plan.N, plan.C_out, plan.PH, plan.PW
    device, dtype = x.device, x.dtype
    y = empty((N, C_out, PH, PW), device=device, dtype=dtype)
    win = empty((N, C_out, PH, PW), device=device, dtype=torch.int8) if plan.save_win else None
    prepool = (empty((N, C_out, 2 * PH, 2 * PW), device=device, dtype=dtype)
               if plan.save_prepool else None)
    counters = arrival_counters(plan.num_counters, x, N * PH * PW) if save_for_backward else None
    meta = dict(plan.meta)
    meta["DOT_PRECISION"] = dot_precision(x, "conv")
    meta.update(_forward_dots(dtype, meta["DOT_PRECISION"], plan.C_in * weight.shape[2] ** 2, meta["BLOCK_M"],
                              meta["BLOCK_N"], pool is not None))
    sx, sw = x.stride(), weight.stride()
    launch(conv2d_act_pool_fwd_kernel, plan.grid,
           dict(x_ptr=x, w_ptr=weight, b_ptr=bias if bias is not None else weight,
                conn_ptr=connections if connections is not None else weight,
                pw_ptr=pool_weight if pool_weight is not None else weight,
                pb_ptr=pool_bias if pool_bias is not None else weight, y_ptr=y,
                win_ptr=win if plan.save_win else y, a_ptr=prepool if plan.save_prepool else y,
                counter_ptr=counters if save_for_backward else y,
                N=N, C_in=plan.C_in, C_out=C_out, NUM_COUNTERS=plan.num_counters,
                stride_xn=sx[0], stride_xc=sx[1], stride_xh=sx[2], stride_xw=sx[3],
                stride_wo=sw[0], stride_wi=sw[1], stride_wh=sw[2], stride_ww=sw[3]),
           meta)
    return y, win, prepool, counters


@accounts(conv2d_act_pool_fwd_kernel)
def _forward_work(d: dict) -> Work:
    """GEMM rows are the N*PH*PW pooled positions (BLOCK_M a program), columns the C_out channels
    (BLOCK_N a program), the reduction K = C_in*k*k (BLOCK_K a step). Every program runs four dots,
    one per position of the pooling window:
        executed = programs * 4 * 2 * BLOCK_M * BLOCK_N * ceil(K / BLOCK_K) * BLOCK_K
        useful   = 2 * (N * 4*PH*PW) * C_out * K   (the conv positions the pooling windows cover)
    Reads x, w (and b); writes y, the window index (max pooling), the pre-pool activations (avg
    pooling with an activation) and the backward's arrival counters (zeroed)."""
    a, m = d["args"], d["meta"]
    K = a["C_in"] * m["KSIZE"] ** 2
    programs = math.prod(d["grid"])
    executed = programs * 4 * 2 * m["BLOCK_M"] * m["BLOCK_N"] * round_up(K, m["BLOCK_K"])
    useful = _layer_flops(a, m)
    reads = (["x_ptr", "w_ptr"] + ["b_ptr"] * m["HAS_BIAS"] + ["conn_ptr"] * m["HAS_CONNECTIONS"]
             + ["pw_ptr", "pb_ptr"] * (m["POOL"] == "subsample"))
    writes = (["y_ptr"] + ["win_ptr"] * m["SAVE_WIN"] + ["a_ptr"] * m["SAVE_PREPOOL"]
              + ["counter_ptr"] * (a["NUM_COUNTERS"] > 0))
    return Work((Job("", "conv2d_act_pool_fwd_kernel", programs, executed, useful,
                     (m["BLOCK_M"], m["BLOCK_N"]), dots=4),),
                tensor_bytes(d, *reads), tensor_bytes(d, *writes))


class BackwardPlan(NamedTuple):
    """What conv2d_act_pool_backward derives from shapes and settings alone (cached in _BWD)."""
    N: int
    C_in: int
    C_out: int
    ksize: int
    dz_shape: tuple  # grad-input's dz, channels last [N, S*PH, S*PW, C_out] (computed only with dx)
    dz_grid: tuple[int, int]  # conv2d_act_pool_dz_kernel's: (position blocks, channel blocks)
    dz_meta: dict  # its constexprs and launch options
    dx_grid: tuple[int]  # conv2d_act_pool_dx_kernel's: (input position blocks x input channel blocks,)
    dx_meta: dict  # its constexprs and launch options; DOT_PRECISION and _grad_input_options' per call
    sizes: WeightGradSizes  # the weight-gradient reduction's split
    meta: dict  # conv2d_act_pool_bwd_kernel's; DOT_PRECISION and _weight_grad_options' per call


def _backward_config(x_shape, w_shape, y_shape, padding: int, activation: str, pool: str,
                     saved_prepool: bool, has_bias: bool, need_dx: bool, need_dw: bool, has_connections: bool,
                     pool_activation: str) -> BackwardPlan:
    """The BackwardPlan of a call's shapes and settings."""
    N, C_in, H, W = x_shape
    C_out, _, ksize, _ = w_shape
    PH, PW = y_shape[2], y_shape[3]
    BLOCK_DW_CO, BLOCK_DW_K, BLOCK_DW_R = _weight_grad_blocks(C_out, C_in * ksize * ksize, pool)
    plan_sizes = _weight_grad_sizes(N, C_in, C_out, ksize, PH, PW, pool, has_bias, enabled=need_dw)
    meta = dict(KSIZE=ksize, PADDING=padding, H=H, W=W, PH=PH, PW=PW, ACTIVATION=activation,
                POOL=_pool_constexpr(pool), SAVED_PREPOOL=saved_prepool, HAS_BIAS=has_bias,
                LEVELS=plan_sizes.levels, HAS_CONNECTIONS=has_connections, POOL_ACTIVATION=pool_activation,
                MARK_NANS=marks_nans(activation, pool), DOT_PRECISION=None,
                BLOCK_DW_CO=BLOCK_DW_CO, BLOCK_DW_K=BLOCK_DW_K, BLOCK_DW_R=BLOCK_DW_R,
                num_warps=None, num_stages=None)  # warps, stages by precision: _weight_grad_options
    s = pool_stride(pool)
    dz_shape = (N, s * PH, s * PW, C_out)
    # 1,024 elements a program (8 a thread at 4 warps), a row's channels contiguous.
    BLOCK_C = min(next_pow2(C_out), 64)
    BLOCK_P = 1024 // BLOCK_C
    # grid: (blocks of conv positions N * S*PH * S*PW, blocks of output channels)
    dz_grid = (cdiv(N * s * PH * s * PW, BLOCK_P), cdiv(C_out, BLOCK_C))
    dz_meta = dict(PH=PH, PW=PW, ACTIVATION=activation, POOL=_pool_constexpr(pool), SAVED_PREPOOL=saved_prepool,
                   POOL_ACTIVATION=pool_activation, MARK_NANS=marks_nans(activation, pool), BLOCK_P=BLOCK_P,
                   BLOCK_C=BLOCK_C, num_warps=4)
    # grid: (tiles of input positions N*H*W x tiles of input channels,)
    BLOCK_DX_M, BLOCK_DX_N = 32, min(max(next_pow2(C_in), 16), 64)
    dx_grid = (cdiv(N * H * W, BLOCK_DX_M) * cdiv(C_in, BLOCK_DX_N),)
    dx_meta = dict(KSIZE=ksize, PADDING=padding, H=H, W=W, PH=PH, PW=PW, POOL=_pool_constexpr(pool),
                   HAS_CONNECTIONS=has_connections, DOT_PRECISION=None, BLOCK_M=BLOCK_DX_M, BLOCK_N=BLOCK_DX_N,
                   BLOCK_K=None, TAPS=None, num_warps=None, num_stages=None)  # by precision: _grad_input_options
    return BackwardPlan(N, C_in, C_out, ksize, dz_shape, dz_grid, dz_meta, dx_grid, dx_meta, plan_sizes, meta)


_BWD = PlanCache()


def conv2d_act_pool_backward(grad_y, x, weight, y, win, prepool, padding: int, activation: str,
                             pool: str, has_bias: bool, need_dx: bool, need_dw: bool, counters=None,
                             connections=None, pool_weight=None, pool_activation: str = "identity"):
    """Returns (dx, dw, db, d pool_weight, d pool_bias), each None when not computed. Grad-input is
    two launches, dz gathered once and then the GEMM over it; the parameters' gradients one more, on
    its own, so that each job gets the warps and registers it needs (docs/design.md,
    "conv_act_pool"). need_dw covers every parameter's gradient (the pool's are computed with
    subsampling only). grad_y/y/win/prepool must be contiguous (the caller ensures it); x and
    weight may be strided. `counters` are those the forward returned (zeroed by it); None allocates
    zeroed ones."""
    key = (x.shape, weight.shape, y.shape, padding, activation, pool, prepool is not None, has_bias,
           need_dx, need_dw, connections is not None, pool_activation)
    cfg = _BWD.get_or_build(key, _backward_config)
    C_in, C_out, ksize = cfg.C_in, cfg.C_out, cfg.ksize
    device, dtype = x.device, x.dtype
    precision = dot_precision(x, "conv")
    subsample = pool == "subsample"
    # A stand-in for a pointer the launch does not read (a kernel argument must be a tensor).
    unused = y
    dx = dw = grads = None
    if need_dx:  # dz first, in a launch of its own: grad-input reads each value k*k times
        dz = empty(cfg.dz_shape, dtype=dtype, device=device)
        launch(conv2d_act_pool_dz_kernel, cfg.dz_grid,
               dict(g_ptr=grad_y, y_ptr=y, win_ptr=win if win is not None else unused,
                    a_ptr=prepool if prepool is not None else unused,
                    pw_ptr=pool_weight if pool_weight is not None else unused, dz_ptr=dz, N=cfg.N, C_out=C_out),
               cfg.dz_meta)
        dx = empty(x.shape, dtype=dtype, device=device)
        sw = weight.stride()
        launch(conv2d_act_pool_dx_kernel, cfg.dx_grid,
               dict(w_ptr=weight, conn_ptr=connections if connections is not None else unused, dz_ptr=dz,
                    dx_ptr=dx, N=cfg.N, C_in=C_in, C_out=C_out,
                    stride_wo=sw[0], stride_wi=sw[1], stride_wh=sw[2], stride_ww=sw[3]),
               {**cfg.dx_meta, "DOT_PRECISION": precision,
                **_grad_input_options(precision, cfg.dx_meta["BLOCK_N"], ksize, C_out, connections is not None)})
    if need_dw:
        dw = empty((C_out, C_in, ksize, ksize), device=device, dtype=dtype)
        # With subsampling the reduction's per-channel sums are three: db, d pool_weight, d pool_bias.
        grads = empty((3, C_out) if subsample else (C_out,), device=device, dtype=dtype) \
            if channel_grads(has_bias, pool) else None
        plan = plan_weight_grad(cfg.sizes, x, counters)
        meta = {**cfg.meta, "DOT_PRECISION": precision,
                **_weight_grad_options(precision, cfg.meta["BLOCK_DW_R"], subsample, cfg.meta["BLOCK_DW_CO"] > 16)}
        sx = x.stride()
        # grid: (weight-gradient tile x split,)
        launch(conv2d_act_pool_bwd_kernel, (plan.programs,),
               dict(x_ptr=x, g_ptr=grad_y, y_ptr=y,
                    win_ptr=win if win is not None else unused, a_ptr=prepool if prepool is not None else unused,
                    conn_ptr=connections if connections is not None else unused,
                    pw_ptr=pool_weight if pool_weight is not None else unused, dw_ptr=dw,
                    db_ptr=grads if grads is not None else unused, ws_ptr=plan.workspace, counter_ptr=plan.counters,
                    N=cfg.N, C_in=C_in, C_out=C_out,
                    SPLIT=plan.sizes.split, ROWS_PER_SPLIT=plan.sizes.rows_per_split, GROUP=plan.sizes.group,
                    stride_xn=sx[0], stride_xc=sx[1], stride_xh=sx[2], stride_xw=sx[3]),
               meta)
    if grads is None:
        return dx, dw, None, None, None
    if not subsample:
        return dx, dw, grads, None, None
    return dx, dw, grads[0] if has_bias else None, grads[1], grads[2]


def _layer_flops(a: dict, m: dict) -> int:
    """2 per multiply-add of the layer at the conv positions the pooling windows cover (model_flops'
    convention): the forward's, the weight gradient's and grad-input's alike."""
    return 2 * a["N"] * 4 * m["PH"] * m["PW"] * a["C_out"] * a["C_in"] * m["KSIZE"] ** 2


@accounts(conv2d_act_pool_bwd_kernel)
def _backward_work(d: dict) -> Work:
    """The weight gradient: (tile x split) programs of BLOCK_DW_CO x BLOCK_DW_K tiles (see
    split_reduce.weight_grad_job); its useful FLOPs are the forward's, 2 * (N * 4*PH*PW) * C_out *
    C_in*k*k (model_flops' convention). Reads what dz is made of (_grad_preact_reads) and x; writes
    dw and db, and the reduction's workspace and counters."""
    a, m = d["args"], d["meta"]
    useful = _layer_flops(a, m)
    programs = d["grid"][0]
    extra_reads, extra_writes = weight_grad_traffic(d, programs)
    reads = _grad_preact_reads(m) + ["x_ptr"] + ["conn_ptr"] * m["HAS_CONNECTIONS"] + extra_reads
    # Subsampling's parameter gradients share db_ptr's buffer with the bias's (weight_grad_traffic).
    writes = ["db_ptr"] * (m["POOL"] == "subsample" and not m["HAS_BIAS"]) + extra_writes
    return Work((weight_grad_job(d, programs, m["BLOCK_DW_CO"], m["BLOCK_DW_K"], useful),),
                tensor_bytes(d, *reads), tensor_bytes(d, *writes))


@accounts(conv2d_act_pool_dx_kernel)
def _grad_input_work(d: dict) -> Work:
    """Grad-input: BLOCK_M input positions x BLOCK_N input channels a program, reducing over
    ceil(C_out / BLOCK_K) channel blocks x k*k taps:
        executed = programs * 2 * BLOCK_M * BLOCK_N * BLOCK_K * ceil(C_out / BLOCK_K) * k*k
    useful as the forward's. Reads dz (conv2d_act_pool_dz_kernel's) and w; writes dx."""
    a, m = d["args"], d["meta"]
    useful = _layer_flops(a, m)
    programs = d["grid"][0]
    executed = programs * 2 * m["BLOCK_M"] * m["BLOCK_N"] * round_up(a["C_out"], m["BLOCK_K"]) * m["KSIZE"] ** 2
    reads = ["dz_ptr", "w_ptr"] + ["conn_ptr"] * m["HAS_CONNECTIONS"]
    return Work((Job("dx", "_grad_input_tile", programs, executed, useful, (m["BLOCK_M"], m["BLOCK_N"])),),
                tensor_bytes(d, *reads), tensor_bytes(d, "dx_ptr"))


def _grad_preact_reads(m: dict) -> list[str]:
    """What _grad_preact reads to make dz: grad_y, and y and the window index (max pooling), y alone
    (no pooling: act' from the output), y and the pool weight (subsample), the pre-pool activations
    where they were saved (avg with an activation, subsample)."""
    pool = m["POOL"]
    return (["g_ptr"] + ["y_ptr", "win_ptr"] * (pool == "max") + ["y_ptr"] * (pool == "none")
            + ["y_ptr", "pw_ptr"] * (pool == "subsample") + ["a_ptr"] * m["SAVED_PREPOOL"])


@accounts(conv2d_act_pool_dz_kernel)
def _dz_work(d: dict) -> Work:
    """No dot. Reads what dz is made of (_grad_preact_reads); writes dz."""
    return Work((), tensor_bytes(d, *_grad_preact_reads(d["meta"])), tensor_bytes(d, "dz_ptr"))


__all__ = ["ACTIVATIONS", "POOLS", "ROW_INDEX_LIMIT", "pooled_size", "conv2d_act_pool_forward",
           "conv2d_act_pool_backward", "conv2d_act_pool_fwd_kernel", "conv2d_act_pool_dz_kernel",
           "conv2d_act_pool_dx_kernel", "conv2d_act_pool_bwd_kernel"]
