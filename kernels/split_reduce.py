"""Deterministic cross-program reduction in a single launch ("last program reduces").

A weight gradient is a sum over batch x positions, so its few output tiles are split across SPLIT
programs for parallelism. Float atomics would make training irreproducible, and a second reduction
launch costs a launch per layer. Instead each program writes its partial tile to a workspace, then
bumps a per-tile arrival counter; the program that arrives last sums the SPLIT partials in a fixed
order, stores the result and resets the counter, so the next launch (or CUDA-graph replay) finds it
at zero. The sum order never depends on which program finished first: results are bit-reproducible.
"""
import triton
import triton.language as tl


@triton.jit
def store_partial_and_arrive(ws_ptr, counter_ptr, acc, offs_a, offs_b, tile_id, split_id,
                             SIZE_A, SIZE_B, SPLIT):
    """Write this program's partial tile (rows offs_a, cols offs_b of a SIZE_A x SIZE_B result) to
    ws[split_id] and return True in the program that completed the tile's set of SPLIT partials."""
    mask = (offs_a[:, None] < SIZE_A) & (offs_b[None, :] < SIZE_B)
    ws = ws_ptr + split_id.to(tl.int64) * SIZE_A * SIZE_B
    tl.store(ws + offs_a[:, None] * SIZE_B + offs_b[None, :], acc, mask=mask)
    # acq_rel at GPU scope: our partial is published before the count, and the last arriver's
    # reads below are ordered after it has seen every other program's count.
    arrived = tl.atomic_add(counter_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
    return arrived == SPLIT - 1


@triton.jit
def sum_partials(ws_ptr, counter_ptr, offs_a, offs_b, tile_id, SIZE_A, SIZE_B, SPLIT,
                 BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Sum the SPLIT partial tiles in split order and re-arm the tile's counter."""
    mask = (offs_a[:, None] < SIZE_A) & (offs_b[None, :] < SIZE_B)
    ptrs = ws_ptr + offs_a[:, None] * SIZE_B + offs_b[None, :]
    total = tl.zeros([BLOCK_A, BLOCK_B], dtype=ACC_DTYPE)
    for s in range(0, SPLIT):
        # .cg: read from L2, never from a stale L1 line of this SM.
        total += tl.load(ptrs + s * SIZE_A * SIZE_B, mask=mask, other=0.0, cache_modifier=".cg")
    tl.atomic_xchg(counter_ptr + tile_id, 0)
    return total
