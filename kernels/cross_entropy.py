"""Cross-entropy (log-softmax + mean NLL over the targets kept) of class logits, forward and backward.

Forward sums the mean in a fixed order (one program, or one a row block over logits whose linear layer
zeroed a counter for it) and saves the per-row log-sum-exp and kept count, so backward is one
elementwise launch. Bad targets assert on CUDA (debug=True). Why: docs/design.md, "cross_entropy".
A constant extra logit (HAS_CONSTANT_LOGIT: a class no target names, as the 1998 LeNet-5's MAP
criterion) only seeds the online log-sum-exp; backward, p = exp(x - lse), is unchanged.
"""
import functools

import torch
import triton
import triton.language as tl

from .accounting import Work, accounts, tensor_bytes
from .launch import accumulator_dtype, cdiv, empty, launch, next_pow2
from .split_reduce import arrive

TILE = 2048  # elements of a [BLOCK_B, BLOCK_C] tile: 8 a thread at NUM_WARPS warps
MAX_BLOCK_C = 512  # wider rows loop over class blocks (online log-sum-exp)
NUM_WARPS = 8
# The split forward: from SPLIT_MIN_BLOCKS row blocks on (1024 rows at 10 classes), one program a
# row block, at most MAX_PROGRAMS programs; the finisher reduces their partials FINISH_BLOCK at a time.
SPLIT_MIN_BLOCKS = 8
MAX_PROGRAMS = 1024
FINISH_BLOCK: tl.constexpr = tl.constexpr(256)


@triton.jit
def _targets(target_ptr, offs_b, B, C, ignore_index, stride_tb):
    """Targets of rows offs_b; which rows count in the mean (kept: in the batch, not ignored), and
    which kept rows have a target outside [0, C) (bad)."""
    mask_b = offs_b < B
    t = tl.load(target_ptr + offs_b * stride_tb, mask=mask_b, other=ignore_index)
    kept = mask_b & (t != ignore_index)
    bad = kept & ((t < 0) | (t >= C))
    return t, mask_b, kept, bad


@triton.jit
def _row_logsumexp(logits_ptr, offs_b, mask_b, C, constant_logit, stride_lb, stride_lc,
                   HAS_CONSTANT_LOGIT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """log(sum(exp(x))) of each row, one class block at a time (online: running max and sum); with
    HAS_CONSTANT_LOGIT the sum also holds exp(constant_logit), so it starts from that one term."""
    if HAS_CONSTANT_LOGIT:
        row_max = tl.full([BLOCK_B], constant_logit, dtype=ACC_DTYPE)
        row_sum = tl.full([BLOCK_B], 1.0, dtype=ACC_DTYPE)
    else:
        row_max = tl.full([BLOCK_B], float("-inf"), dtype=ACC_DTYPE)
        row_sum = tl.zeros([BLOCK_B], dtype=ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        x = tl.load(logits_ptr + offs_b[:, None] * stride_lb + offs_c[None, :] * stride_lc,
                    mask=mask_b[:, None] & (offs_c[None, :] < C), other=float("-inf")).to(ACC_DTYPE)
        new_max = tl.maximum(row_max, tl.max(x, axis=1))
        # Rows past B are all -inf and turn NaN here; they are masked out of every store and sum.
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        row_max = new_max
    return row_max + tl.log(row_sum)


@triton.jit
def _loss_rows(logits_ptr, target_ptr, lse_ptr, start, end, B, C, ignore_index, constant_logit,
               stride_lb, stride_lc, stride_tb, HAS_CONSTANT_LOGIT: tl.constexpr,
               ACC_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Walk rows [start, end) in blocks of BLOCK_B, store their log-sum-exp, and return the sum of
    their NLL over the kept rows, the number of kept rows and the first row with a bad target (B if
    none), each summed in a fixed order."""
    total = tl.zeros([BLOCK_B], dtype=ACC_DTYPE)
    kept_rows = tl.zeros([BLOCK_B], dtype=tl.int64)
    first_bad = tl.full([BLOCK_B], B, dtype=tl.int64)
    for b0 in range(start, end, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        t, mask_b, kept, bad = _targets(target_ptr, offs_b, end, C, ignore_index, stride_tb)
        tl.device_assert(~bad, "cross_entropy: a target is outside [0, num_classes) and is not ignore_index")
        lse = _row_logsumexp(logits_ptr, offs_b, mask_b, C, constant_logit, stride_lb, stride_lc,
                             HAS_CONSTANT_LOGIT, ACC_DTYPE, BLOCK_B, BLOCK_C)
        tl.store(lse_ptr + offs_b, lse, mask=mask_b)
        hit = kept & ~bad
        x_t = tl.load(logits_ptr + offs_b * stride_lb + tl.where(hit, t, 0) * stride_lc, mask=hit, other=0.0)
        nll = tl.where(bad, float("nan"), lse - x_t.to(ACC_DTYPE))
        total += tl.where(kept, nll, 0.0)
        kept_rows += kept.to(tl.int64)
        first_bad = tl.minimum(first_bad, tl.where(bad, offs_b, B))
    return tl.sum(total, axis=0), tl.sum(kept_rows, axis=0), tl.min(first_bad, axis=0)


@triton.jit
def _store_loss(loss_ptr, rows_ptr, total, kept, first_bad):
    # No row kept: 0 / 0 = NaN, as F.cross_entropy's mean over no targets.
    tl.store(loss_ptr, (total / kept.to(total.dtype)).to(loss_ptr.dtype.element_ty))
    tl.store(rows_ptr, kept)
    tl.store(rows_ptr + 1, first_bad)


@triton.jit(debug=True)  # compiles the tl.device_assert in _loss_rows (docs/design.md, "cross_entropy")
def cross_entropy_fwd_kernel(
    # pointers
    logits_ptr, target_ptr, lse_ptr, loss_ptr, rows_ptr, ws_ptr, counter_ptr,
    # sizes
    B, C, ignore_index, constant_logit, ROWS_PER_PROGRAM, COUNTER,
    # strides
    stride_lb, stride_lc, stride_tb,
    # meta-parameters
    SPLIT: tl.constexpr, HAS_CONSTANT_LOGIT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ACC_DTYPE: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    if SPLIT:
        # Each program sums its ROWS_PER_PROGRAM rows and writes (NLL sum, rows kept, first bad
        # row) to column pid of the float64 workspace [3, programs] (exact for any row count below
        # 2^53); the last to arrive at counter_ptr[COUNTER] reduces the columns in a fixed order.
        pid = tl.program_id(0).to(tl.int64)
        programs = tl.num_programs(0).to(tl.int64)
        start = pid * ROWS_PER_PROGRAM
        total, kept, first_bad = _loss_rows(logits_ptr, target_ptr, lse_ptr, start,
                                            tl.minimum(start + ROWS_PER_PROGRAM, B), B, C, ignore_index,
                                            constant_logit, stride_lb, stride_lc, stride_tb, HAS_CONSTANT_LOGIT,
                                            ACC_DTYPE, BLOCK_B, BLOCK_C)
        tl.store(ws_ptr + pid, total.to(tl.float64))
        tl.store(ws_ptr + programs + pid, kept.to(tl.float64))
        tl.store(ws_ptr + 2 * programs + pid, first_bad.to(tl.float64))
        if arrive(counter_ptr, COUNTER, programs):
            sums = tl.zeros([FINISH_BLOCK], dtype=tl.float64)
            counts = tl.zeros([FINISH_BLOCK], dtype=tl.float64)
            firsts = tl.full([FINISH_BLOCK], B, dtype=tl.float64)
            for p0 in range(0, programs, FINISH_BLOCK):
                offs = p0 + tl.arange(0, FINISH_BLOCK)
                mask = offs < programs
                # .cg: read from L2, never from a stale L1 line of this SM.
                sums += tl.load(ws_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
                counts += tl.load(ws_ptr + programs + offs, mask=mask, other=0.0, cache_modifier=".cg")
                firsts = tl.minimum(firsts, tl.load(ws_ptr + 2 * programs + offs, mask=mask,
                                                    other=float("inf"), cache_modifier=".cg"))
            _store_loss(loss_ptr, rows_ptr, tl.sum(sums, axis=0), tl.sum(counts, axis=0).to(tl.int64),
                        tl.min(firsts, axis=0).to(tl.int64))
            # Re-armed, as every counter a finisher used (split_reduce): nothing else reads it.
            tl.atomic_xchg(counter_ptr + COUNTER, 0)
    else:
        # One program walks the batch: the mean is summed in a fixed order, no counter needed.
        total, kept, first_bad = _loss_rows(logits_ptr, target_ptr, lse_ptr, 0, B, B, C, ignore_index,
                                            constant_logit, stride_lb, stride_lc, stride_tb, HAS_CONSTANT_LOGIT,
                                            ACC_DTYPE, BLOCK_B, BLOCK_C)
        _store_loss(loss_ptr, rows_ptr, total, kept, first_bad)


@triton.jit
def cross_entropy_bwd_kernel(
    # pointers
    logits_ptr, target_ptr, lse_ptr, rows_ptr, grad_loss_ptr, dlogits_ptr,
    # sizes
    B, C, ignore_index,
    # strides
    stride_lb, stride_lc, stride_tb,
    # meta-parameters
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ACC_DTYPE: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    t, mask_b, kept, bad = _targets(target_ptr, offs_b, B, C, ignore_index, stride_tb)
    lse = tl.load(lse_ptr + offs_b, mask=mask_b, other=0.0)
    scale = tl.load(grad_loss_ptr).to(ACC_DTYPE) / tl.load(rows_ptr).to(ACC_DTYPE)
    # The one-hot compare in int32 (C < 2^31): an int64 compare per element costs registers. A bad
    # target never gets here: its forward raised (CPU) or asserted (CUDA).
    t_hit = tl.where(kept & ~bad, t, -1).to(tl.int32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = mask_b[:, None] & (offs_c[None, :] < C)
        x = tl.load(logits_ptr + offs_b[:, None] * stride_lb + offs_c[None, :] * stride_lc, mask=mask, other=0.0)
        p = tl.exp(x.to(ACC_DTYPE) - lse[:, None])
        d = (p - tl.where(offs_c[None, :] == t_hit[:, None], 1.0, 0.0)) * scale
        # Ignored rows get exactly 0, also when no row is kept and scale is grad / 0.
        d = tl.where(kept[:, None], d, 0.0)
        # dlogits is contiguous [B, C].
        tl.store(dlogits_ptr + offs_b[:, None] * C + offs_c[None, :], d.to(dlogits_ptr.dtype.element_ty),
                 mask=mask)


@functools.lru_cache(maxsize=64)
def tiles(C: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_C) for C classes: a tile of at most TILE elements, classes in blocks of at
    most MAX_BLOCK_C."""
    block_c = min(next_pow2(C), MAX_BLOCK_C)
    return TILE // block_c, block_c


def forward_split(B: int, C: int) -> tuple[int, int]:
    """(programs, rows per program) of the split forward over B rows of C classes: one program a
    row block from SPLIT_MIN_BLOCKS blocks on, up to MAX_PROGRAMS; (1, B) below that."""
    block_b = tiles(C)[0]
    blocks = cdiv(B, block_b)
    if blocks < SPLIT_MIN_BLOCKS:
        return 1, B
    rows = block_b * cdiv(blocks, MAX_PROGRAMS)
    return cdiv(B, rows), rows


def cross_entropy_forward(logits, target, ignore_index: int, counters=None, constant_logit: float | None = None):
    """Returns (loss as a 0-d tensor, per-row log-sum-exp, rows) where rows (int64, on the device)
    is [targets kept, first row whose target is out of range (B if none)]; backward needs the
    first, the caller checks the second where reading it costs no synchronisation.

    `constant_logit`: None, or a finite float: every row's log-sum-exp then also holds one more class
    of that logit, which no target names (the per-row log-sum-exp returned includes it).

    `counters`: int32 arrival counters whose last element a kernel that ran before this one zeroed
    for it and nobody else uses (linear_act_forward hands one out with its output, see there). With
    one, and enough rows (forward_split), the forward runs one program per row block and the last of
    them sums their partials; without, one program walks the batch (the sum then needs no counter)."""
    B, C = logits.shape
    block_b, block_c = tiles(C)
    loss = empty((), device=logits.device, dtype=logits.dtype)
    lse = empty((B,), device=logits.device, dtype=accumulator_dtype(logits.dtype))
    rows = empty((2,), device=logits.device, dtype=target.dtype)
    programs, rows_per_program = forward_split(B, C) if counters is not None else (1, B)
    split = programs > 1
    ws = empty((3 * programs,), device=logits.device, dtype=torch.float64) if split else lse
    launch(cross_entropy_fwd_kernel, (programs,),
           dict(logits_ptr=logits, target_ptr=target, lse_ptr=lse, loss_ptr=loss, rows_ptr=rows,
                ws_ptr=ws, counter_ptr=counters if split else rows,
                B=B, C=C, ignore_index=ignore_index,
                constant_logit=0.0 if constant_logit is None else float(constant_logit),
                ROWS_PER_PROGRAM=rows_per_program,
                COUNTER=counters.numel() - 1 if split else 0,
                stride_lb=logits.stride(0), stride_lc=logits.stride(1), stride_tb=target.stride(0)),
           dict(SPLIT=split, HAS_CONSTANT_LOGIT=constant_logit is not None, BLOCK_B=block_b, BLOCK_C=block_c,
                num_warps=NUM_WARPS))
    return loss, lse, rows


def cross_entropy_backward(grad_loss, logits, target, lse, rows, ignore_index: int):
    B, C = logits.shape
    block_b, block_c = tiles(C)
    dlogits = empty((B, C), device=logits.device, dtype=logits.dtype)
    # grid: row blocks of the batch; each program loops over the class blocks of its rows.
    launch(cross_entropy_bwd_kernel, (-(-B // block_b),),
           dict(logits_ptr=logits, target_ptr=target, lse_ptr=lse, rows_ptr=rows, grad_loss_ptr=grad_loss,
                dlogits_ptr=dlogits, B=B, C=C, ignore_index=ignore_index,
                stride_lb=logits.stride(0), stride_lc=logits.stride(1), stride_tb=target.stride(0)),
           dict(BLOCK_B=block_b, BLOCK_C=block_c, num_warps=NUM_WARPS))
    return dlogits


@accounts(cross_entropy_fwd_kernel)
def _forward_work(d: dict) -> Work:
    """No dot (its exp, log and sums are not counted, as in model_flops). Reads the logits and
    targets; writes the per-row log-sum-exp, the loss and the row counts; split over several
    programs (SPLIT), also writes their partials to the workspace and reads them back once."""
    split = ["ws_ptr"] if d["meta"].get("SPLIT") else []
    return Work((), tensor_bytes(d, "logits_ptr", "target_ptr", *split),
                tensor_bytes(d, "lse_ptr", "loss_ptr", "rows_ptr", *split))


@accounts(cross_entropy_bwd_kernel)
def _backward_work(d: dict) -> Work:
    """No dot. Reads the logits, targets, log-sum-exp, row counts and the upstream gradient;
    writes dlogits."""
    return Work((), tensor_bytes(d, "logits_ptr", "target_ptr", "lse_ptr", "rows_ptr", "grad_loss_ptr"),
                tensor_bytes(d, "dlogits_ptr"))
