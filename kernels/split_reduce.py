"""Deterministic cross-program reduction in a single launch ("last program reduces").

A weight gradient is a sum over batch x positions, so its few output tiles are split across SPLIT
programs for parallelism. Float atomics would make training irreproducible, and a second reduction
launch costs a launch per layer. Instead each program writes its partial tile to a workspace, then
bumps a per-tile arrival counter; the program that arrives last sums the SPLIT partials in a fixed
order and stores the result. The sum order never depends on which program finished first: results
are bit-reproducible.

Who zeroes the counters decides what can go wrong. They belong to one forward call: its launch
helper allocates them (no memset) and the forward kernel zeroes them, next to the outputs the
backward reads anyway. So a backward depends only on its own forward, never on counts another
launch left behind: two models, streams or threads never share a counter, a stray count cannot
outlive its step, and a CUDA graph that captures forward and backward re-zeroes on every replay,
with no extra device operation. The last arriver still re-arms its counter, so a second backward
through the same graph (retain_graph=True) finds it at zero.
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import accumulator_dtype, cdiv, empty


@triton.jit
def weight_grad_program(pid, OUT, K, SPLIT, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decode a weight-gradient program id into (split, tile, offs_o, offs_k, owns_bias): which
    slice of the reduction it sums, which [BLOCK_O, BLOCK_K] tile of the [OUT, K] result, and
    whether it also sums the bias gradient of its rows (the tiles of the first K block do).
    Programs of one tile are adjacent, so they run close together and its partials stay in L2."""
    split = pid % SPLIT
    tile = pid // SPLIT
    num_k = tl.cdiv(K, BLOCK_K)
    offs_o = (tile // num_k) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_k = (tile % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    return split, tile, offs_o, offs_k, (tile % num_k) == 0


@triton.jit
def store_partial_and_arrive(ws_ptr, counter_ptr, acc, bias_parts, offs_a, offs_b, tile_id, split_id,
                             SIZE_A, SIZE_B, SPLIT, owns_bias, HAS_BIAS: tl.constexpr,
                             BLOCK_R: tl.constexpr):
    """Write this program's partial tile (rows offs_a, cols offs_b of a SIZE_A x SIZE_B result) to
    ws[split_id] (and, when it owns the bias, its [SIZE_A, BLOCK_R] bias partials to the bias
    region after the SPLIT tiles) and return True in the program that completed the tile's set of
    SPLIT partials."""
    mask = (offs_a[:, None] < SIZE_A) & (offs_b[None, :] < SIZE_B)
    ws = ws_ptr + split_id.to(tl.int64) * SIZE_A * SIZE_B
    tl.store(ws + offs_a[:, None] * SIZE_B + offs_b[None, :], acc, mask=mask)
    if HAS_BIAS:
        offs_r = tl.arange(0, BLOCK_R)
        bias_ws = ws_ptr + tl.cast(SPLIT, tl.int64) * SIZE_A * SIZE_B + split_id.to(tl.int64) * SIZE_A * BLOCK_R
        tl.store(bias_ws + offs_a[:, None] * BLOCK_R + offs_r[None, :], bias_parts,
                 mask=(offs_a[:, None] < SIZE_A) & owns_bias)
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
def finish_weight_grad(acc, bias_parts, dw_ptr, db_ptr, ws_ptr, counter_ptr, offs_o, offs_k, tile,
                       split, owns_bias, OUT, K, SPLIT, HAS_BIAS: tl.constexpr,
                       BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Reduce a [BLOCK_O, BLOCK_K] weight-gradient partial over the SPLIT programs of its tile and
    store it into the contiguous dw [OUT, K]; with HAS_BIAS, the tile that owns the bias also
    reduces its [BLOCK_O, BLOCK_R] bias partials and stores their row sums into db [OUT].

    The bias partials are plain elementwise sums of dL/dz over the program's rows, kept apart from
    the GEMM: a TF32 dot would round each dL/dz to 10 mantissa bits, and cuDNN sums the bias
    gradient in full fp32. They are reduced over their BLOCK_R columns only here, once, by the
    last program: a cross-warp sum in the busy program (before its partial store) made ptxas keep
    registers on the stack."""
    last = store_partial_and_arrive(ws_ptr, counter_ptr, acc, bias_parts, offs_o, offs_k, tile, split,
                                    OUT, K, SPLIT, owns_bias, HAS_BIAS, BLOCK_R)
    if last:
        total = sum_partials(ws_ptr, counter_ptr, offs_o, offs_k, tile, OUT, K, SPLIT,
                             BLOCK_O, BLOCK_K, acc.dtype)
        o = offs_o[:, None]
        k = offs_k[None, :]
        tl.store(dw_ptr + o * K + k, total.to(dw_ptr.dtype.element_ty), mask=(o < OUT) & (k < K))
        if HAS_BIAS:
            if owns_bias:
                bias_ws = ws_ptr + tl.cast(SPLIT, tl.int64) * OUT * K
                parts = sum_partials(bias_ws, counter_ptr, offs_o, tl.arange(0, BLOCK_R), tile, OUT,
                                     BLOCK_R, SPLIT, BLOCK_O, BLOCK_R, acc.dtype)
                tl.store(db_ptr + offs_o, tl.sum(parts, axis=1).to(db_ptr.dtype.element_ty),
                         mask=offs_o < OUT)


@triton.jit
def zero_counters(counter_ptr, NUM_COUNTERS, pid, BLOCK: tl.constexpr = 256):
    """Program 0 of a forward launch zeroes the arrival counters of its backward (see the top of
    this file); NUM_COUNTERS is 0 when no backward will follow. The other programs' stores are
    masked off rather than branched around: a LeNet layer has at most a few dozen counters."""
    for i in range(0, NUM_COUNTERS, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        tl.store(counter_ptr + offs, tl.zeros([BLOCK], dtype=tl.int32), mask=(offs < NUM_COUNTERS) & (pid == 0))


# --------------------------------------------------------------------------------------------------
# Host side: how to split, and the counters.
# --------------------------------------------------------------------------------------------------

def weight_grad_tiles(out_features: int, k: int, block_out: int, block_k: int) -> int:
    """Output tiles of the [out_features, k] weight gradient: one counter each."""
    return cdiv(out_features, block_out) * cdiv(k, block_k)


def _zeroed_counters(num_tiles: int, device):
    return torch.zeros((max(num_tiles, 1),), dtype=torch.int32, device=device)


def arrival_counters(num_tiles: int, like, forward_rows: int):
    """The counters a forward call hands to its backward. Allocated without a memset: the forward
    kernel zeroes them (zero_counters). Inside launch.poison_outputs() they start as garbage, so a
    kernel that forgot to zero them fails the tests. A forward with no output rows launches nothing
    (see launch.launch), so then they are zeroed here."""
    if forward_rows == 0:
        return _zeroed_counters(num_tiles, like.device)
    return empty((max(num_tiles, 1),), dtype=torch.int32, device=like.device)


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


def plan_weight_grad(sizes: tuple[int, int, int, int], like, counters=None) -> WeightGradPlan:
    """The plan of one weight-gradient launch from its weight_grad_sizes (which the launch helpers
    cache per shape): the per-call part, a workspace allocation and a check of the counters.
    `counters` are the ones the forward zeroed; without them (a backward called on its own) fresh
    zeroed counters are allocated, at the cost of a memset."""
    num_tiles, split, rows_per_split, size = sizes
    if counters is None:
        counters = _zeroed_counters(num_tiles, like.device)
    elif counters.numel() < num_tiles:  # num_tiles is 0 when no weight gradient is wanted
        raise ValueError(f"{num_tiles} arrival counters needed, the forward zeroed {counters.numel()}")
    workspace = empty((size,), dtype=accumulator_dtype(like.dtype), device=like.device)
    return WeightGradPlan(num_tiles, split, rows_per_split, workspace, counters)


@functools.lru_cache(maxsize=256)
def weight_grad_sizes(out_features: int, k: int, has_bias: bool, rows: int, block_out: int, block_k: int,
                      block_rows: int, max_split: int, enabled: bool) -> tuple[int, int, int, int]:
    """(num_tiles, split, rows_per_split, workspace elements) of the [out_features, k] weight-gradient
    (and bias-gradient) reduction over `rows` rows: enough splits to fill a GPU at large batch, while
    each program still sums at least 8 row blocks. Integers of integers, so cached (a training loop
    plans the same few shapes every step)."""
    num_tiles = weight_grad_tiles(out_features, k, block_out, block_k) if enabled else 0
    split = max(1, min(max_split, cdiv(rows, 8 * block_rows)))
    rows_per_split = cdiv(cdiv(max(rows, 1), split), block_rows) * block_rows
    split = max(1, cdiv(rows, rows_per_split))
    # The SPLIT [out_features, k] partial tiles, then (with a bias) SPLIT [out_features, block_rows]
    # bias partials.
    size = split * out_features * (k + (block_rows if has_bias else 0)) if enabled else 1
    return num_tiles, split, rows_per_split, size
