"""Deterministic cross-program reduction in one launch: the last program to arrive sums the partials.

SPLIT programs each write a partial tile to a workspace and bump an arrival counter; the last arriver
sums them in a fixed order (in two levels for a wide split): bit-reproducible gradients, no float
atomics, no second launch; the forward zeroes the counters. Why: docs/design.md, "Split reduction".
"""
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .accounting import Job
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
def store_partial_and_arrive(ws_ptr, counter_ptr, acc, bias_parts, offs_a, offs_b, counter, slot, arrivals,
                             SIZE_A, SIZE_B, SPLIT, owns_bias, HAS_BIAS: tl.constexpr,
                             BLOCK_R: tl.constexpr):
    """Write a partial tile (rows offs_a, cols offs_b of a SIZE_A x SIZE_B result) to ws[slot] (and,
    when it owns the bias, its [SIZE_A, BLOCK_R] bias partials to the bias region after the SPLIT
    tiles), count it in at counter_ptr[counter] and return True in the program that completed the
    set of `arrivals` partials counted there."""
    mask = (offs_a[:, None] < SIZE_A) & (offs_b[None, :] < SIZE_B)
    ws = ws_ptr + slot.to(tl.int64) * SIZE_A * SIZE_B
    tl.store(ws + offs_a[:, None] * SIZE_B + offs_b[None, :], acc, mask=mask)
    if HAS_BIAS:
        offs_r = tl.arange(0, BLOCK_R)
        bias_ws = ws_ptr + tl.cast(SPLIT, tl.int64) * SIZE_A * SIZE_B + slot.to(tl.int64) * SIZE_A * BLOCK_R
        # A scalar condition folds into the bound (rows < 0 when not owned): Triton 3.9's
        # interpreter refuses a block mask and-ed with a scalar bool ("mask has unsupported dtype").
        tl.store(bias_ws + offs_a[:, None] * BLOCK_R + offs_r[None, :], bias_parts,
                 mask=offs_a[:, None] < tl.where(owns_bias, SIZE_A, 0))
    return arrive(counter_ptr, counter, arrivals)


@triton.jit
def arrive(counter_ptr, counter, arrivals):
    """Count this program in at counter_ptr[counter], after its partial stores, and return True in
    the program that completed the set of `arrivals`: the one that sums the partials.

    The barrier orders every thread's partial stores before the (single-thread) counter update;
    acq_rel at GPU scope then publishes them to the other programs before the count, and orders
    the last arriver's reads of their partials after it has seen every count (the split-K
    semaphore pattern; a no-op under the interpreter, whose programs run one after another)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + counter, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    return arrived == arrivals - 1


@triton.jit
def sum_partials(ws_ptr, counter_ptr, offs_a, offs_b, counter, first, stride, count, SIZE_A, SIZE_B,
                 BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Sum the `count` partial tiles in slots first, first + stride, ... in a fixed order and re-arm
    counter_ptr[counter].

    BLOCK_S partials are loaded at once (a block of at most 4096 elements, which stays spill-free)
    so the loads overlap instead of paying one L2 round trip per partial; the in-block tree sum and
    the block order are fixed, so the result does not depend on timing."""
    BLOCK_S: tl.constexpr = max(1, 4096 // (BLOCK_A * BLOCK_B))
    offs_s = tl.arange(0, BLOCK_S)
    mask = (offs_a[None, :, None] < SIZE_A) & (offs_b[None, None, :] < SIZE_B)
    ptrs = ws_ptr + offs_a[None, :, None] * SIZE_B + offs_b[None, None, :]
    total = tl.zeros([BLOCK_A, BLOCK_B], dtype=ACC_DTYPE)
    for s0 in range(0, count, BLOCK_S):
        i = (s0 + offs_s)[:, None, None]
        slot = first + i * stride
        # .cg: read from L2, never from a stale L1 line of this SM.
        block = tl.load(ptrs + slot.to(tl.int64) * SIZE_A * SIZE_B, mask=mask & (i < count),
                        other=0.0, cache_modifier=".cg")
        total += tl.sum(block, axis=0)
    tl.atomic_xchg(counter_ptr + counter, 0)
    return total


@triton.jit
def _sum_tile(ws_ptr, counter_ptr, offs_o, offs_k, counter, first, stride, count, owns_bias, OUT, K, SPLIT,
              HAS_BIAS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
              ACC_DTYPE: tl.constexpr):
    """The sums of `count` weight-gradient partials (first, stride apart) and of their bias partials
    (zeros unless the tile owns the bias)."""
    total = sum_partials(ws_ptr, counter_ptr, offs_o, offs_k, counter, first, stride, count, OUT, K,
                         BLOCK_O, BLOCK_K, ACC_DTYPE)
    parts = tl.zeros([BLOCK_O, BLOCK_R], dtype=ACC_DTYPE)
    if HAS_BIAS:
        if owns_bias:
            bias_ws = ws_ptr + tl.cast(SPLIT, tl.int64) * OUT * K
            parts = sum_partials(bias_ws, counter_ptr, offs_o, tl.arange(0, BLOCK_R), counter, first, stride,
                                 count, OUT, BLOCK_R, BLOCK_O, BLOCK_R, ACC_DTYPE)
    return total, parts


@triton.jit
def channel_sums(a, b, c):
    """Three per-channel sums of [BLOCK_O, BLOCK_R] partials as columns 0, 1, 2 of one such block
    (the rest 0), which the reduction then carries as it carries bias partials (COLUMNS)."""
    col = tl.arange(0, a.shape[1])[None, :]
    return tl.where(col == 0, tl.sum(a, axis=1)[:, None],
                    tl.where(col == 1, tl.sum(b, axis=1)[:, None],
                             tl.where(col == 2, tl.sum(c, axis=1)[:, None], 0.0)))


@triton.jit
def _store_weight_grad(total, bias_parts, dw_ptr, db_ptr, offs_o, offs_k, owns_bias, OUT, K,
                       HAS_BIAS: tl.constexpr, COLUMNS: tl.constexpr):
    o = offs_o[:, None]
    k = offs_k[None, :]
    tl.store(dw_ptr + o * K + k, total.to(dw_ptr.dtype.element_ty), mask=(o < OUT) & (k < K))
    if HAS_BIAS:
        mask = offs_o < tl.where(owns_bias, OUT, 0)
        if COLUMNS:  # channel_sums' three columns, into db [3, OUT]
            col = tl.arange(0, bias_parts.shape[1])[None, :]
            for j in tl.static_range(3):
                tl.store(db_ptr + j * OUT + offs_o,
                         tl.sum(tl.where(col == j, bias_parts, 0.0), axis=1).to(db_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(db_ptr + offs_o, tl.sum(bias_parts, axis=1).to(db_ptr.dtype.element_ty), mask=mask)


@triton.jit
def finish_weight_grad(acc, bias_parts, dw_ptr, db_ptr, ws_ptr, counter_ptr, offs_o, offs_k, tile,
                       split, owns_bias, OUT, K, SPLIT, GROUP, HAS_BIAS: tl.constexpr, LEVELS: tl.constexpr,
                       BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                       COLUMNS: tl.constexpr = False):
    """Reduce a [BLOCK_O, BLOCK_K] weight-gradient partial over the SPLIT programs of its tile and
    store it into the contiguous dw [OUT, K]; with HAS_BIAS, the tile that owns the bias also
    reduces its [BLOCK_O, BLOCK_R] bias partials and stores their row sums into db [OUT].

    The bias partials are plain elementwise sums of dL/dz over the program's rows, kept apart from
    the GEMM: a TF32 dot would round each dL/dz to 10 mantissa bits, and cuDNN sums the bias
    gradient in full fp32. They are reduced over their BLOCK_R columns only here, once, by the
    finishing program: a cross-warp sum in the busy program (before its partial store) made ptxas
    keep registers on the stack.

    COLUMNS: the bias partials are channel_sums' columns (three per-channel gradients, stored into
    db [3, OUT]) rather than elementwise partials of one.

    LEVELS (WeightGradSizes.levels, a constexpr so that each kernel holds only its own path): 0, one
    program a tile, stored directly; 1, the last of SPLIT arrivals at counter `tile` sums them; 2,
    a tile's groups count at tile * (NUM_GROUPS + 1) + group and its group sums at
    tile * (NUM_GROUPS + 1) + NUM_GROUPS."""
    if LEVELS == 0:
        _store_weight_grad(acc, bias_parts, dw_ptr, db_ptr, offs_o, offs_k, owns_bias, OUT, K, HAS_BIAS, COLUMNS)
    elif LEVELS == 1:
        if store_partial_and_arrive(ws_ptr, counter_ptr, acc, bias_parts, offs_o, offs_k, tile, split, SPLIT,
                                    OUT, K, SPLIT, owns_bias, HAS_BIAS, BLOCK_R):
            total, parts = _sum_tile(ws_ptr, counter_ptr, offs_o, offs_k, tile, 0, 1, SPLIT, owns_bias,
                                     OUT, K, SPLIT, HAS_BIAS, BLOCK_O, BLOCK_K, BLOCK_R, acc.dtype)
            _store_weight_grad(total, parts, dw_ptr, db_ptr, offs_o, offs_k, owns_bias, OUT, K, HAS_BIAS, COLUMNS)
    else:
        tl.static_assert(LEVELS == 2, "LEVELS is 0, 1 or 2")
        num_groups = tl.cdiv(SPLIT, GROUP)
        group = split // GROUP
        first = group * GROUP
        counter = tile * (num_groups + 1) + group
        if store_partial_and_arrive(ws_ptr, counter_ptr, acc, bias_parts, offs_o, offs_k, counter, split,
                                    tl.minimum(GROUP, SPLIT - first), OUT, K, SPLIT, owns_bias, HAS_BIAS,
                                    BLOCK_R):
            total, parts = _sum_tile(ws_ptr, counter_ptr, offs_o, offs_k, counter, first, 1,
                                     tl.minimum(GROUP, SPLIT - first), owns_bias, OUT, K, SPLIT, HAS_BIAS,
                                     BLOCK_O, BLOCK_K, BLOCK_R, acc.dtype)
            # The group's sum replaces its first partial, which only this program reads.
            counter = tile * (num_groups + 1) + num_groups
            if store_partial_and_arrive(ws_ptr, counter_ptr, total, parts, offs_o, offs_k, counter, first,
                                        num_groups, OUT, K, SPLIT, owns_bias, HAS_BIAS, BLOCK_R):
                total, parts = _sum_tile(ws_ptr, counter_ptr, offs_o, offs_k, counter, 0, GROUP, num_groups,
                                         owns_bias, OUT, K, SPLIT, HAS_BIAS, BLOCK_O, BLOCK_K, BLOCK_R, acc.dtype)
                _store_weight_grad(total, parts, dw_ptr, db_ptr, offs_o, offs_k, owns_bias, OUT, K, HAS_BIAS, COLUMNS)


@triton.jit
def zero_counters(counter_ptr, NUM_COUNTERS, pid, BLOCK: tl.constexpr = 256):
    """Program 0 of a forward launch zeroes the arrival counters of its backward (docs/design.md,
    "Split reduction"); NUM_COUNTERS is 0 when no backward will follow. The other programs' stores are
    masked off rather than branched around: a LeNet layer has at most a few dozen counters."""
    for i in range(0, NUM_COUNTERS, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        tl.store(counter_ptr + offs, tl.zeros([BLOCK], dtype=tl.int32), mask=offs < tl.where(pid == 0, NUM_COUNTERS, 0))


# --------------------------------------------------------------------------------------------------
# Host side: how to split, and the counters.
# --------------------------------------------------------------------------------------------------

def weight_grad_tiles(out_features: int, k: int, block_out: int, block_k: int) -> int:
    """Output tiles of the [out_features, k] weight gradient."""
    return cdiv(out_features, block_out) * cdiv(k, block_k)


def _zeroed_counters(num_counters: int, device):
    return torch.zeros((max(num_counters, 1),), dtype=torch.int32, device=device)


def arrival_counters(num_counters: int, like, forward_rows: int):
    """The counters a forward call hands to its backward. Allocated without a memset: the forward
    kernel zeroes them (zero_counters). Inside launch.poison_outputs() they start as garbage, so a
    kernel that forgot to zero them fails the tests. A forward with no output rows launches nothing
    (see launch.launch), so then they are zeroed here."""
    if forward_rows == 0:
        return _zeroed_counters(num_counters, like.device)
    return empty((max(num_counters, 1),), dtype=torch.int32, device=like.device)


@dataclass(frozen=True)
class WeightGradSizes:
    """How a weight-gradient reduction splits, from shapes alone: num_tiles output tiles, each summed
    by `split` programs over rows_per_split rows, in groups of `group` splits (docs/design.md,
    "Split reduction"); num_counters arrival counters and `workspace` elements of partials."""
    num_tiles: int
    split: int
    rows_per_split: int
    group: int
    num_counters: int
    workspace: int

    @property
    def levels(self) -> int:
        """The finishing sum's levels (finish_weight_grad's LEVELS): 0 stores directly."""
        return 0 if self.split == 1 else 1 if self.group >= self.split else 2


@dataclass
class WeightGradPlan:
    """One weight-gradient launch: its sizes, and a workspace for the partials and the counters."""
    sizes: WeightGradSizes
    workspace: object  # torch.Tensor
    counters: object  # torch.Tensor

    @property
    def programs(self) -> int:
        return self.sizes.num_tiles * self.sizes.split


def plan_weight_grad(sizes: WeightGradSizes, like, counters=None) -> WeightGradPlan:
    """The plan of one weight-gradient launch from its weight_grad_sizes (which the launch helpers
    cache per shape): the per-call part, a workspace allocation and a check of the counters.
    `counters` are the ones the forward zeroed; without them (a backward called on its own) fresh
    zeroed counters are allocated, at the cost of a memset."""
    if counters is None:
        counters = _zeroed_counters(sizes.num_counters, like.device)
    elif counters.numel() < sizes.num_counters:  # 0 when no weight gradient is wanted
        raise ValueError(f"{sizes.num_counters} arrival counters needed, the forward zeroed {counters.numel()}")
    # A tile summed by one program (levels 0) stores its result directly and never touches the
    # workspace: the counters stand in for its pointer, and the allocation is saved.
    workspace = counters if sizes.levels == 0 else empty((sizes.workspace,), dtype=accumulator_dtype(like.dtype),
                                                          device=like.device)
    return WeightGradPlan(sizes, workspace, counters)


# Partials of one reduction at most, in elements (32 MiB of float32): the bound on its split.
MAX_WORKSPACE = 8 * 2**20
# Up to this many splits a tile is reduced in one level; beyond, in two of about sqrt(split).
ONE_LEVEL_SPLIT = 16


@functools.lru_cache(maxsize=256)
def weight_grad_sizes(out_features: int, k: int, has_bias: bool, rows: int, block_out: int, block_k: int,
                      block_rows: int, min_blocks: int, max_split: int | None, enabled: bool = True,
                      fill: int = 0, fill_blocks: int = 1) -> WeightGradSizes:
    """The WeightGradSizes of the [out_features, k] weight-gradient (and bias-gradient) reduction
    over `rows` rows: the split grows with the rows, each program summing min_blocks row blocks,
    up to max_split (None: no bound but the workspace's, MAX_WORKSPACE). Where that gives fewer than
    `fill` programs, the split grows towards fill, each program then summing at least fill_blocks
    blocks: a program's row blocks are trips one after another, so a small batch is better served by
    more, shorter programs. The forward calls it too (enabled) to know how many counters to zero.
    Cached: a training loop plans the same few shapes every step."""
    num_tiles = weight_grad_tiles(out_features, k, block_out, block_k) if enabled else 0
    # Each split's partials: an [out_features, k] tile, then (with a bias) [out_features, block_rows].
    per_split = out_features * (k + (block_rows if has_bias else 0))
    split = cdiv(rows, min_blocks * block_rows)
    if fill and num_tiles:
        split = max(split, min(cdiv(fill, num_tiles), cdiv(rows, fill_blocks * block_rows)))
    split = max(1, min(max_split or rows, split, MAX_WORKSPACE // per_split))
    rows_per_split = cdiv(cdiv(max(rows, 1), split), block_rows) * block_rows
    split = max(1, cdiv(rows, rows_per_split))
    group = split if split <= ONE_LEVEL_SPLIT else math.isqrt(split - 1) + 1
    num_groups = cdiv(split, group)
    # SPLIT 1 counts nothing; its one counter, unused, is still zeroed like any the forward hands out.
    num_counters = min(num_tiles, 1) if split == 1 else num_tiles * (num_groups + 1 if num_groups > 1 else 1)
    # A tile summed by one program stores its result directly: no workspace.
    workspace = split * per_split if enabled and split > 1 else 1
    return WeightGradSizes(num_tiles, split, rows_per_split, group, num_counters, workspace)


def counter_capacity(out_features: int, k: int, has_bias: bool, block_out: int, block_k: int, block_rows: int,
                     max_split: int | None) -> int:
    """The arrival counters a forward allocates and zeroes for its backward: enough for any number of
    rows, so the count depends on the layer alone, not on the batch. A fake (meta) implementation can
    then give the counters' shape under dynamic batch sizes, where the rows are symbolic. The split
    is at most what the workspace allows (weight_grad_sizes), and the two-level sum's groups number
    at most isqrt(split - 1) + 1, growing with the split."""
    num_tiles = weight_grad_tiles(out_features, k, block_out, block_k)
    per_split = out_features * (k + (block_rows if has_bias else 0))
    split = max(1, min(max_split or MAX_WORKSPACE, MAX_WORKSPACE // per_split))
    groups = math.isqrt(split - 1) + 1 if split > ONE_LEVEL_SPLIT else 0
    return max(num_tiles * (groups + 1 if groups > 1 else 1), 1)


# --------------------------------------------------------------------------------------------------
# Accounting (accounting.py): the weight-gradient job of both backward kernels, and the reduction's
# traffic beyond the GEMM's operands.
# --------------------------------------------------------------------------------------------------

def weight_grad_job(d: dict, programs: int, block_out: int, block_k: int, useful: int) -> Job:
    """The weight-gradient programs: (output tile x split) pairs, each summing ROWS_PER_SPLIT rows
    (the last split's rows past the end included) into a block_out x block_k tile:
        executed = programs * 2 * block_out * block_k * ROWS_PER_SPLIT"""
    executed = programs * 2 * block_out * block_k * d["args"]["ROWS_PER_SPLIT"]
    return Job("dw", "_grad_weight_tile", programs, executed, useful if programs else 0, (block_out, block_k))


def weight_grad_traffic(d: dict, dw_programs: int) -> tuple[list[str], list[str]]:
    """What the weight-gradient reduction reads and writes beyond the GEMM's operands: every
    partial is written to the workspace and read back once by a finishing program, and each
    program counts itself in with one atomic on a counter. A tile summed by one program (SPLIT 1)
    stores its result directly."""
    if not dw_programs:
        return [], []
    results = ["dw_ptr"] + ["db_ptr"] * d["meta"]["HAS_BIAS"]
    if d["args"]["SPLIT"] == 1:
        return [], results
    return ["ws_ptr", "counter_ptr"], results + ["ws_ptr", "counter_ptr"]
