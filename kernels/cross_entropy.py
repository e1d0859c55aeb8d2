"""Cross-entropy (log-softmax + mean NLL) over class logits, forward and backward.

Forward runs as a single program that walks the batch in row blocks, so the mean is summed in a
fixed order (reproducible, no atomics) and the loss is one launch. A LeNet batch is at most a few
thousand rows of 10 logits: one program streams that in microseconds. It saves the per-row
log-sum-exp (4 bytes a row) so backward needs no second reduction: dlogits = (softmax - onehot)
* grad / B, one launch over row blocks, reading the upstream gradient from device memory (no sync).
A target outside [0, C) yields a NaN loss (and NaN gradients for that row) instead of a device-side
assert: checking on the host would cost a synchronisation every step.
"""
import triton
import triton.language as tl

from .launch import accumulator_dtype, empty, launch, next_pow2


@triton.jit
def _row_block(logits_ptr, target_ptr, offs_b, B, C, stride_lb, stride_lc, BLOCK_C: tl.constexpr):
    """Logits tile [rows, BLOCK_C] in float32/64 (padding = -inf), targets, and the in-range mask."""
    offs_c = tl.arange(0, BLOCK_C)
    mask_b = offs_b < B
    x = tl.load(logits_ptr + offs_b[:, None] * stride_lb + offs_c[None, :] * stride_lc,
                mask=mask_b[:, None] & (offs_c[None, :] < C), other=-float("inf"))
    t = tl.load(target_ptr + offs_b, mask=mask_b, other=0)
    valid = (t >= 0) & (t < C)
    return x, t, offs_c, mask_b, valid


@triton.jit
def cross_entropy_fwd_kernel(
    # pointers
    logits_ptr, target_ptr, lse_ptr, loss_ptr,
    # sizes
    B, C,
    # strides
    stride_lb, stride_lc,
    # meta-parameters
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_dtype = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    total = tl.zeros([BLOCK_B], dtype=acc_dtype)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        x, t, offs_c, mask_b, valid = _row_block(logits_ptr, target_ptr, offs_b, B, C,
                                                 stride_lb, stride_lc, BLOCK_C)
        x = x.to(acc_dtype)
        row_max = tl.max(x, axis=1)
        lse = row_max + tl.log(tl.sum(tl.exp(x - row_max[:, None]), axis=1))
        x_t = tl.sum(tl.where(offs_c[None, :] == t[:, None], x, 0.0), axis=1)
        nll = tl.where(valid, lse - x_t, float("nan"))
        tl.store(lse_ptr + offs_b, lse, mask=mask_b)
        total += tl.where(mask_b, nll, 0.0)
    tl.store(loss_ptr, (tl.sum(total, axis=0) / B).to(loss_ptr.dtype.element_ty))


@triton.jit
def cross_entropy_bwd_kernel(
    # pointers
    logits_ptr, target_ptr, lse_ptr, grad_loss_ptr, dlogits_ptr,
    # sizes
    B, C,
    # strides
    stride_lb, stride_lc,
    # meta-parameters
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_dtype = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    x, t, offs_c, mask_b, valid = _row_block(logits_ptr, target_ptr, offs_b, B, C,
                                             stride_lb, stride_lc, BLOCK_C)
    lse = tl.load(lse_ptr + offs_b, mask=mask_b, other=0.0)
    scale = tl.load(grad_loss_ptr).to(acc_dtype) / B
    p = tl.exp(x.to(acc_dtype) - lse[:, None])
    d = (p - tl.where(offs_c[None, :] == t[:, None], 1.0, 0.0)) * scale
    d = tl.where(valid[:, None], d, float("nan"))
    # dlogits is contiguous [B, C].
    tl.store(dlogits_ptr + offs_b[:, None] * C + offs_c[None, :], d.to(dlogits_ptr.dtype.element_ty),
             mask=mask_b[:, None] & (offs_c[None, :] < C))


def cross_entropy_forward(logits, target):
    """Returns (loss as a 0-d tensor, per-row log-sum-exp saved for backward)."""
    B, C = logits.shape
    loss = empty((), device=logits.device, dtype=logits.dtype)
    lse = empty((B,), device=logits.device, dtype=accumulator_dtype(logits.dtype))
    # grid: one program; it walks the batch so the mean is summed in a fixed order.
    launch(cross_entropy_fwd_kernel, (1,),
           dict(logits_ptr=logits, target_ptr=target, lse_ptr=lse, loss_ptr=loss, B=B, C=C,
                stride_lb=logits.stride(0), stride_lc=logits.stride(1)),
           dict(BLOCK_B=256, BLOCK_C=next_pow2(C), num_warps=4))
    return loss, lse


def cross_entropy_backward(grad_loss, logits, target, lse):
    B, C = logits.shape
    dlogits = empty((B, C), device=logits.device, dtype=logits.dtype)
    BLOCK_B = 256
    # grid: row blocks of the batch
    launch(cross_entropy_bwd_kernel, (triton.cdiv(B, BLOCK_B),),
           dict(logits_ptr=logits, target_ptr=target, lse_ptr=lse, grad_loss_ptr=grad_loss,
                dlogits_ptr=dlogits, B=B, C=C, stride_lb=logits.stride(0), stride_lc=logits.stride(1)),
           dict(BLOCK_B=BLOCK_B, BLOCK_C=next_pow2(C), num_warps=4))
    return dlogits
