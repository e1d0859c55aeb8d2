"""Deterministic cross-program reduction in a single launch ("last program reduces").

A weight gradient is a sum over batch x positions, so its few output tiles are split across SPLIT
programs for parallelism. Float atomics would make training irreproducible, and a second reduction
launch costs a launch per layer. Instead each program writes its partial tile to a workspace, then
bumps a per-tile arrival counter; the program that arrives last sums the SPLIT partials in a fixed
order, stores the result and resets the counter, so the next launch (or CUDA-graph replay) finds it
at zero. The sum order never depends on which program finished first: results are bit-reproducible.
"""
from dataclasses import dataclass

import triton
import triton.language as tl


@triton.jit
def weight_grad_program(pid, OUT, K, SPLIT, HAS_BIAS: tl.constexpr,
                        BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decode a weight-gradient program id into (split, tile, offs_o, offs_k): which slice of the
    reduction it sums, and which [BLOCK_O, BLOCK_K] tile of the [OUT, K (+1 bias column)] result.
    Programs of one tile are adjacent, so they run close together and its partials stay in L2."""
    split = pid % SPLIT
    tile = pid // SPLIT
    num_k = tl.cdiv(K + 1 if HAS_BIAS else K, BLOCK_K)
    offs_o = (tile // num_k) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_k = (tile % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    return split, tile, offs_o, offs_k


@triton.jit
def store_partial_and_arrive(ws_ptr, counter_ptr, acc, offs_a, offs_b, tile_id, split_id,
                             SIZE_A, SIZE_B, SPLIT):
    """Write this program's partial tile (rows offs_a, cols offs_b of a SIZE_A x SIZE_B result) to
    ws[split_id] and return True in the program that completed the tile's set of SPLIT partials."""
    mask = (offs_a[:, None] < SIZE_A) & (offs_b[None, :] < SIZE_B)
    ws = ws_ptr + split_id.to(tl.int64) * SIZE_A * SIZE_B
    tl.store(ws + offs_a[:, None] * SIZE_B + offs_b[None, :], acc, mask=mask)
    # The barrier orders every thread's partial stores before the (single-thread) counter update;
    # acq_rel at GPU scope then publishes them to the other programs before the count, and orders
    # the last arriver's reads of their partials after it has seen every count (the split-K
    # semaphore pattern; a no-op under the interpreter, whose programs run one after another).
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    return arrived == SPLIT - 1


@triton.jit
def sum_partials(ws_ptr, counter_ptr, offs_a, offs_b, tile_id, SIZE_A, SIZE_B, SPLIT,
                 BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Sum the SPLIT partial tiles in a fixed order and re-arm the tile's counter.

    BLOCK_S partials are loaded at once (a block of at most 4096 elements, which stays spill-free)
    so the loads overlap instead of paying one L2 round trip per split; the in-block tree sum and
    the block order are fixed, so the result does not depend on timing."""
    BLOCK_S: tl.constexpr = max(1, 4096 // (BLOCK_A * BLOCK_B))
    offs_s = tl.arange(0, BLOCK_S)
    mask = (offs_a[None, :, None] < SIZE_A) & (offs_b[None, None, :] < SIZE_B)
    ptrs = ws_ptr + offs_a[None, :, None] * SIZE_B + offs_b[None, None, :]
    total = tl.zeros([BLOCK_A, BLOCK_B], dtype=ACC_DTYPE)
    for s0 in range(0, SPLIT, BLOCK_S):
        split = (s0 + offs_s)[:, None, None]
        # .cg: read from L2, never from a stale L1 line of this SM.
        block = tl.load(ptrs + split.to(tl.int64) * SIZE_A * SIZE_B, mask=mask & (split < SPLIT),
                        other=0.0, cache_modifier=".cg")
        total += tl.sum(block, axis=0)
    tl.atomic_xchg(counter_ptr + tile_id, 0)
    return total


@triton.jit
def finish_weight_grad(acc, dw_ptr, db_ptr, ws_ptr, counter_ptr, offs_o, offs_k, tile, split,
                       OUT, K, SPLIT, HAS_BIAS: tl.constexpr,
                       BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    """Reduce a [BLOCK_O, BLOCK_K] weight-gradient partial over the SPLIT programs of its tile and
    store it into the contiguous dw [OUT, K]; with HAS_BIAS, column K of the augmented gradient
    (the products with an implicit input of ones) is the bias gradient db [OUT]."""
    k_out = K + 1 if HAS_BIAS else K
    last = store_partial_and_arrive(ws_ptr, counter_ptr, acc, offs_o, offs_k, tile, split,
                                    OUT, k_out, SPLIT)
    if last:
        total = sum_partials(ws_ptr, counter_ptr, offs_o, offs_k, tile, OUT, k_out, SPLIT,
                             BLOCK_O, BLOCK_K, acc.dtype)
        o = offs_o[:, None]
        k = offs_k[None, :]
        tl.store(dw_ptr + o * K + k, total.to(dw_ptr.dtype.element_ty), mask=(o < OUT) & (k < K))
        if HAS_BIAS:
            tl.store(db_ptr + o + 0 * k, total.to(db_ptr.dtype.element_ty), mask=(o < OUT) & (k == K))


# --------------------------------------------------------------------------------------------------
# Host side: how to split, and the counters.
# --------------------------------------------------------------------------------------------------

_counters: dict = {}


def arrival_counters(device, size: int):
    """Zeroed int32 counters, allocated once per device and re-armed by the kernels themselves, so
    steady-state training allocates and zeroes nothing (and CUDA-graph replays stay valid)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    # One grow-only buffer per device: every launch uses its first `size` counters, and launches on
    # one stream run in order, so they never see each other's counts.
    if device not in _counters or _counters[device].numel() < size:
        _counters[device] = torch.zeros(max(size, 64), dtype=torch.int32, device=device)
    return _counters[device]


@dataclass
class WeightGradPlan:
    """How one weight-gradient launch splits its reduction: num_tiles output tiles, each summed by
    `split` programs over rows_per_split rows, with a workspace for the partials and the counters."""
    num_tiles: int
    split: int
    rows_per_split: int
    workspace: object  # torch.Tensor
    counters: object  # torch.Tensor

    @property
    def programs(self) -> int:
        return self.num_tiles * self.split


def plan_weight_grad(out_features: int, k: int, has_bias: bool, rows: int, *, block_out: int,
                     block_k: int, block_rows: int, max_split: int, like, enabled: bool) -> WeightGradPlan:
    """Plan the [out_features, k (+1 bias column)] weight-gradient reduction over `rows` rows: enough
    splits to fill a GPU at large batch, while each program still sums at least 8 row blocks."""
    from .launch import accumulator_dtype, empty

    k_out = k + 1 if has_bias else k
    num_tiles = triton.cdiv(out_features, block_out) * triton.cdiv(k_out, block_k) if enabled else 0
    split = max(1, min(max_split, triton.cdiv(rows, 8 * block_rows)))
    rows_per_split = triton.cdiv(triton.cdiv(max(rows, 1), split), block_rows) * block_rows
    split = max(1, triton.cdiv(rows, rows_per_split))
    workspace = empty((split * out_features * k_out,) if enabled else (1,), dtype=accumulator_dtype(like.dtype),
                      device=like.device)
    return WeightGradPlan(num_tiles, split, rows_per_split, workspace,
                          arrival_counters(like.device, max(num_tiles, 1)))
