"""The static report of a training step's compiled kernels (fastlenet.analysis.report): its occupancy
arithmetic against hand-computed cases, its reading of TTGIR layouts (literal snippets and a really
compiled tiny dot), its FLOP and byte formulas against one layer worked by hand and against
model_flops, and its command line (one row per launch; the second run compiles nothing)."""
import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastlenet.analysis.gpu_build import SM_LIMITS
from fastlenet.analysis.report import GPUS, analyse, dot_sites, occupancy, record_step
from fastlenet.kernels import conv_act_pool as conv
from fastlenet.kernels.accounting import work
from fastlenet.kernels.launch import describe, record
from fastlenet.models import LeNet5
from fastlenet.profiling import model_flops, step_launches

from utils import env_without_interpreter

# The step as a default GPU run launches it: TF32 convolutions, IEEE matmuls.
DEFAULT_PRECISION = {"conv": "tf32", "matmul": "ieee"}
LABELS = ["conv1 forward", "conv2 forward", "fc1 forward", "fc2 forward", "fc3 forward", "loss forward",
          "loss backward", "fc3 backward", "fc2 backward", "fc1 backward", "conv2 backward dz", "conv2 backward dx",
          "conv2 backward", "conv1 backward"]


# --------------------------------------------------------------------------------------------------
# Occupancy, worked by hand.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("registers, warps, shared, cc, programs, limiter", [
    # 56 x 32 = 1792 registers a warp (a multiple of 256); 16384 // 1792 = 9 warps a quarter, 36 an
    # SM, 4 programs of 8 warps. Shared: 233472 // (18432 + 1024) = 12; threads: 2048 // 256 = 8.
    (56, 8, 18432, 90, 4, "registers"),
    # 128 x 32 = 4096 a warp: 4 a quarter, 16 an SM, 2 programs.
    (128, 8, 18432, 90, 2, "registers"),
    # 80 x 32 = 2560 a warp: 6 a quarter = 24 warps (65536 // 2560 = 25 would ignore the quarters).
    (80, 1, 0, 90, 24, "registers"),
    # 49 x 32 = 1568, rounded up to 1792: 9 a quarter, 36 warps, 9 programs of 4 (unrounded: 10).
    (49, 4, 0, 90, 9, "registers"),
    # 16 registers, 4 warps: registers allow 32, threads 2048 // 128 = 16.
    (16, 4, 0, 90, 16, "threads"),
    # 16 registers, 1 warp: registers allow 128, threads 64, the block limit 32.
    (16, 1, 0, 90, 32, "blocks"),
    # 100 KiB + 1 KiB reserved = 103424 bytes; 164 KiB = 167936 holds one.
    (32, 4, 100 * 1024, 80, 1, "shared memory"),
    # 38000 + 1024 = 39024, rounded up to 39040: 233472 // 39040 = 5 (6 without the reserved KiB).
    (32, 4, 38000, 90, 5, "shared memory"),
    # 255 registers (8192 a warp) x 16 warps = 131072 > 65536: the block does not fit at all.
    (255, 16, 0, 90, 0, "registers"),
])
def test_occupancy_matches_hand_computed_cases(registers, warps, shared, cc, programs, limiter):
    occ = occupancy(registers, warps, shared, SM_LIMITS[cc])
    assert (occ.programs, occ.limiter) == (programs, limiter), occ


def test_per_sm_limits_are_the_published_ones():
    assert SM_LIMITS[90].shared == 228 * 1024 and SM_LIMITS[80].shared == 164 * 1024
    for sm in SM_LIMITS.values():
        assert (sm.registers, sm.reserved_shared, sm.max_blocks, sm.max_threads) == (65536, 1024, 32, 2048)
    assert (GPUS[90].sms, GPUS[80].sms) == (132, 108)


# --------------------------------------------------------------------------------------------------
# TTGIR: literal snippets.
# --------------------------------------------------------------------------------------------------

_SOURCE = '''\
def kernel():
    helper()


def helper():
    acc = dot()
    out = dot()
'''


_MODULE = textwrap.dedent("""\
    #blocked = #ttg.blocked<{sizePerThread = [4, 4], threadsPerWarp = [2, 16], warpsPerCTA = [8, 1], order = [1, 0]}>
    #blocked1 = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [1, 32], warpsPerCTA = [8, 1], order = [1, 0]}>
    #mma = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 8]}>
    #mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], instrShape = [16, 32, 8]}>
    module attributes {"ttg.num-warps" = 8 : i32} {
      tt.func public @kernel() {
    BODY
        tt.return loc(#loc)
      } loc(#loc)
    } loc(#loc)
    #loc = loc("PATH":1:0)
    #loc1 = loc("PATH":6:15)
    #loc2 = loc("acc"(#loc1))
    #loc3 = loc("PATH":2:5)
    #loc4 = loc(callsite(#loc2 at #loc3))
    #loc5 = loc("PATH":7:11)
    """)


def _ttgir(path, body: str) -> str:
    """A TTGIR module around `body`; #loc4 locates an op at helper's line 6, inlined from line 2,
    #loc3 at kernel's line 2, #loc5 at helper's line 7."""
    return _MODULE.replace("PATH", str(path)).replace("BODY", body)


def test_a_replicated_mma_is_read_from_literal_ttgir(tmp_path):
    # 8 warps of 16 rows each over a 32-row tile: 128 rows covered, each product computed 4 times.
    (tmp_path / "k.py").write_text(_SOURCE)
    body = ("    %z = tt.dot %a, %b, %c, inputPrecision = tf32 : tensor<32x32xf32, #ttg.dot_op<{opIdx = 0, "
            "parent = #mma, kWidth = 1}>> * tensor<32x16xf32, #ttg.dot_op<{opIdx = 1, parent = #mma, kWidth = 1}>> "
            "-> tensor<32x16xf32, #mma> loc(#loc4)")
    [site] = dot_sites(_ttgir(tmp_path / "k.py", body))
    assert (site.function, site.line) == ("helper", 6)
    assert (site.lowering, site.precision, site.tile, site.covers, site.replication) == (
        "MMAv2", "tf32", (32, 16), (128, 8), 4)


def test_an_unreplicated_wgmma_and_a_split_dot_are_read_from_literal_ttgir(tmp_path):
    # wgmma: 4 x 16 rows x 2 x 32 columns cover the 64x64 tile exactly; the wait is not a dot.
    # Two FMA ops at one source line (a dot split along K) are one dot with 2 ops.
    (tmp_path / "k.py").write_text(_SOURCE)
    body = "\n".join([
        "    %acc = ttng.warp_group_dot %x, %w, %c {inputPrecision = 0 : i32, isAsync = true} : "
        "!ttg.memdesc<64x32xf32, #shared, #smem, mutable> * !ttg.memdesc<32x64xf32, #shared1, #smem, mutable> "
        "-> tensor<64x64xf32, #mma1> loc(#loc4)",
        "    %w2:3 = ttng.warp_group_dot_wait %acc, %x, %w {pendings = 1 : i32} : tensor<64x64xf32, #mma1>, "
        "!ttg.memdesc<64x32xf32, #shared, #smem, mutable> loc(#loc4)",
        "    %f = tt.dot %p, %q, %r : tensor<64x8xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * "
        "tensor<8x64xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<64x64xf32, #blocked> loc(#loc3)",
        "    %g = tt.dot %p, %q, %f : tensor<64x8xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * "
        "tensor<8x64xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<64x64xf32, #blocked> loc(#loc3)",
        # An FMA layout can repeat work too: 8 warps x 1 row over a 4-row tile, 32 columns over 16.
        "    %h = tt.dot %p, %q, %r : tensor<4x16xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked1}>> * "
        "tensor<16x16xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked1}>> -> tensor<4x16xf32, #blocked1> loc(#loc5)",
    ])
    wgmma, fma, small = dot_sites(_ttgir(tmp_path / "k.py", body))
    assert (wgmma.function, wgmma.lowering, wgmma.precision, wgmma.covers, wgmma.replication, wgmma.ops) == (
        "helper", "MMAv3", "tf32", (64, 64), 1, 1)
    assert (fma.function, fma.line, fma.lowering, fma.precision, fma.replication, fma.ops) == (
        "kernel", 2, "FMA", "ieee", 1, 2)
    assert (small.function, small.line, small.covers, small.replication) == ("helper", 7, (8, 32), 4)


# --------------------------------------------------------------------------------------------------
# TTGIR: a tiny dot compiled for sm_80 by Triton's real pipeline.
# --------------------------------------------------------------------------------------------------

_TINY = '''\
import triton
import triton.language as tl


@triton.jit
def tiny_dot(a_ptr, b_ptr, c_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + offs_m[:, None] * BLOCK_K + offs_k[None, :])
    b = tl.load(b_ptr + offs_k[:, None] * BLOCK_N + offs_n[None, :])
    c = tl.dot(a, b, input_precision=PRECISION)
    tl.store(c_ptr + offs_m[:, None] * BLOCK_N + offs_n[None, :], c)
'''

_COMPILE_TINY = '''
import dataclasses, json, pathlib, sys
from fastlenet.analysis.gpu_build import compile_for, specialize
from fastlenet.analysis.report import dot_sites
tensor = lambda *shape: {"dtype": "float32", "shape": list(shape), "data_ptr_mod16": 0}
for m, n, k, precision, warps in json.loads(sys.argv[1]):
    desc = {"module": "tiny_dot", "kernel": "tiny_dot", "grid": [1], "origins": [],
            "args": {"a_ptr": tensor(m, k), "b_ptr": tensor(k, n), "c_ptr": tensor(m, n)},
            "meta": {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "PRECISION": precision, "num_warps": warps}}
    ttgir = compile_for(specialize(desc, 80)).asm["ttgir"]
    print(json.dumps([dataclasses.asdict(s) for s in dot_sites(ttgir, pathlib.Path(sys.argv[2]))]))
'''


@pytest.mark.build
def test_replication_of_a_really_compiled_dot(tmp_path):
    """Triton 3.8 lays a 32x16 TF32 dot at 8 warps out as warpsPerCTA [4, 2]: 64 rows covered, each
    product computed twice; a 128x64 dot at 4 warps covers its tile once; an IEEE dot is FMA."""
    (tmp_path / "tiny_dot.py").write_text(_TINY)
    cases = [[32, 16, 16, "tf32", 8], [128, 64, 16, "tf32", 4], [32, 16, 16, "ieee", 8]]
    env = {**env_without_interpreter(),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_TINY, json.dumps(cases), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sites = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [len(s) for s in sites] == [1, 1, 1], sites
    replicated, whole, fma = (s[0] for s in sites)
    dot_line = _TINY.splitlines().index("    c = tl.dot(a, b, input_precision=PRECISION)") + 1
    assert all((s["function"], s["line"]) == ("tiny_dot", dot_line) for s in (replicated, whole, fma))
    assert "warpsPerCTA = [4, 2], instrShape = [16, 8]" in replicated["layout"]
    assert (replicated["lowering"], replicated["covers"], replicated["replication"]) == ("MMAv2", [64, 16], 2)
    assert (whole["lowering"], whole["replication"]) == ("MMAv2", 1)
    assert (fma["lowering"], fma["precision"], fma["replication"]) == ("FMA", "ieee", 1)


# --------------------------------------------------------------------------------------------------
# FLOPs and bytes.
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def step256(device):
    return {d["origins"][0]: d for d in step_launches("lenet5", 256, DEFAULT_PRECISION, device=device)}


def test_conv1_forward_work_by_hand(step256):
    # 256 images, 14x14 pooled positions: 50176 rows, 32 a program -> 1568 programs, one 16-wide
    # tile of the 6 channels, K = 25 taps padded to 32 (TF32 BLOCK_K), four dots a program.
    w = work(step256["conv1 forward"])
    [job] = w.jobs
    assert (job.programs, job.executed) == (1568, 1568 * 4 * 2 * 32 * 16 * 32)
    assert job.useful == 2 * 256 * 28 * 28 * 6 * 25  # every conv position, 6 channels, 25 taps
    assert w.reads == {"x_ptr": 256 * 28 * 28 * 4, "w_ptr": 6 * 25 * 4, "b_ptr": 6 * 4}
    # The backward's arrival counters, as many as any batch needs (split_reduce.counter_capacity):
    # one tile, 32 MiB of workspace / (6 x (25 + 64) partials: 64 rows a trip) = 15,709 splits at
    # most, in at most 126 groups, so 127 counters, zeroed.
    assert w.writes == {"y_ptr": 256 * 6 * 14 * 14 * 4, "win_ptr": 256 * 6 * 14 * 14, "counter_ptr": 127 * 4}


def test_conv1_backward_work_by_hand(step256):
    # No dx (the image needs no gradient). dw: one 16x32 tile of the 6x25 gradient, 64 rows a trip,
    # split over 256*28*28 = 200704 conv positions. 1024 a split would give 196 programs, fewer than
    # the 512 a small batch is spread over, so the split aims at 512: 392 rows, rounded up to 448 (7
    # trips), make 448 splits, summed in two levels, groups of isqrt(447) + 1 = 22 (21 groups, 22
    # counters); workspace 448 x 6 x (25 + 64).
    d = step256["conv1 backward"]
    assert d["meta"]["BLOCK_DW_R"] == 64
    assert (d["args"]["SPLIT"], d["args"]["ROWS_PER_SPLIT"], d["args"]["GROUP"]) == (448, 448, 22)
    w = work(d)
    [dw] = w.jobs
    assert (dw.programs, dw.executed, dw.useful) == (448, 448 * 2 * 16 * 32 * 448, 2 * 256 * 784 * 6 * 25)
    maps, workspace = 256 * 6 * 14 * 14, 448 * 6 * (25 + 64) * 4
    assert w.reads == {"g_ptr": maps * 4, "y_ptr": maps * 4, "win_ptr": maps, "x_ptr": 256 * 784 * 4,
                       "ws_ptr": workspace, "counter_ptr": 127 * 4}
    assert w.writes == {"dw_ptr": 6 * 25 * 4, "db_ptr": 6 * 4, "ws_ptr": workspace, "counter_ptr": 127 * 4}


def test_the_weight_gradient_counts_what_dz_is_made_of():
    # Without pooling dz = act'(y) * grad_y: the weight gradient reads y as the dz launch does;
    # with max pooling the window index too.
    x, w = torch.empty(2, 3, 12, 12), torch.empty(4, 3, 5, 5)
    for pool, shape, extra in ((None, (2, 4, 8, 8), {"y_ptr"}), ("max", (2, 4, 4, 4), {"y_ptr", "win_ptr"})):
        y, g = torch.empty(shape), torch.empty(shape)
        win = torch.empty(shape, dtype=torch.int8) if pool else None
        [bwd] = record(functools.partial(conv.conv2d_act_pool_backward, g, x, w, y, win, None, 0, "relu", pool,
                                         True, need_dx=False, need_dw=True), "ieee")
        reads = set(work(describe(bwd, "conv")).reads)
        assert {"g_ptr", "x_ptr"} | extra <= reads and "dz_ptr" not in reads, (pool, reads)
        assert ("win_ptr" in reads) == (pool == "max")


def test_a_weight_gradient_of_one_split_is_stored_directly(step256):
    # fc1 at batch 256: 256 rows are one split of 8 row blocks, so no workspace and no counter.
    d = step256["fc1 backward"]
    assert d["args"]["SPLIT"] == 1
    w = work(d)
    assert "ws_ptr" not in w.reads and "ws_ptr" not in w.writes and "counter_ptr" not in w.writes
    assert w.writes["dw_ptr"] == 120 * 400 * 4


def test_fc1_forward_work_by_hand(step256):
    # 256 x 400 @ 400 x 120: too few rows for two programs an SM with larger tiles, so the smallest,
    # 16 x 32 at 2 warps: 16 row tiles x 4 column tiles, K = 400 padded to 416.
    d = step256["fc1 forward"]
    assert (d["meta"]["BLOCK_M"], d["meta"]["BLOCK_N"], d["meta"]["num_warps"]) == (16, 32, 2)
    w = work(d)
    [job] = w.jobs
    assert (job.programs, job.executed, job.useful) == (64, 64 * 2 * 16 * 32 * 416, 2 * 256 * 120 * 400)
    assert w.reads == {"x_ptr": 256 * 400 * 4, "w_ptr": 120 * 400 * 4, "b_ptr": 120 * 4}
    # The counters any batch's backward needs (split_reduce.counter_capacity): 4 x 7 tiles of 32 x 64,
    # split at most 64 ways, in at most 8 groups: 28 x 9, zeroed.
    assert w.writes == {"y_ptr": 256 * 120 * 4, "counter_ptr": (28 * 9 + 1) * 4}  # + the loss's counter


def test_useful_flops_of_the_step_are_model_flops(step256):
    flops = model_flops(LeNet5("lenet5"))
    useful = {label: sum(job.useful for job in work(d).jobs) for label, d in step256.items()}
    assert list(useful) == LABELS
    assert sum(v for k, v in useful.items() if k.endswith("forward")) == 256 * flops["forward"]
    assert sum(useful.values()) == 256 * flops["train"]
    for label, d in step256.items():  # padding only ever adds work
        assert all(job.executed >= job.useful for job in work(d).jobs), label


def test_analysis_checks_the_formula_against_the_ttgir(step256):
    """analyse() counts issued FLOPs with the replication of the job's dot, and refuses a TTGIR
    whose dot tile is not the one the formula multiplies out."""
    import inspect

    from fastlenet.kernels import linear_act

    fn = linear_act.linear_act_fwd_kernel.fn
    source, first = inspect.getsourcelines(fn)
    line = first + next(i for i, text in enumerate(source) if "tl.dot(" in text)

    def compiled(tile):  # a one-dot TTGIR, the dot located at linear_act_fwd_kernel's tl.dot
        ttgir = (f"#mma = #ttg.nvidia_mma<{{versionMajor = 2, versionMinor = 0, warpsPerCTA = [8, 1], "
                 f"instrShape = [16, 8]}}>\n    %acc = tt.dot %x, %w, %c, inputPrecision = tf32 : "
                 f"tensor<64x32xf32, #ttg.dot_op<{{opIdx = 0, parent = #mma, kWidth = 1}}>> * tensor<32x64xf32, "
                 f"#ttg.dot_op<{{opIdx = 1, parent = #mma, kWidth = 1}}>> -> tensor<{tile}xf32, #mma> loc(#loc1)\n"
                 f'#loc1 = loc("{inspect.getsourcefile(fn)}":{line}:15)\n')
        return {"registers": 80, "num_warps": 8, "shared": 16384, "ttgir": ttgir}

    fc1 = step256["fc1 forward"]
    report = analyse(fc1, compiled("16x32"), 90)  # 8 warps x 16 rows over 16 rows: x8
    assert report.jobs[0]["replication"] == 8 and report.issued == 8 * report.executed
    assert report.compute_s == pytest.approx(2 * 256 * 120 * 400 / 494.7e12)  # TF32 tensor cores
    with pytest.raises(ValueError, match="expects 1 dot"):
        analyse(fc1, compiled("64x64"), 90)


def test_a_step_recorded_in_one_precision():
    # The report records in a child process under the interpreter; IEEE dots take the conv
    # forward's IEEE tile (BLOCK_K 16, FMA with operands in registers).
    recorded = record_step("lenet5", 3, "ieee")
    assert recorded["precision"] == {"conv": "ieee", "matmul": "ieee"}
    launches = {d["origins"][0]: d for d in recorded["launches"]}
    assert list(launches) == LABELS
    assert {d["meta"].get("DOT_PRECISION", "ieee") for d in launches.values()} == {"ieee"}
    assert launches["conv1 forward"]["meta"]["BLOCK_K"] == 16


# --------------------------------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The report at batch 64 for sm_90 from an empty cache: as a table, then as JSON."""
    env = {**env_without_interpreter(), "FASTLENET_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    runs = []
    for extra in ([], ["--json"]):
        proc = subprocess.run([sys.executable, "-m", "fastlenet.analysis.report", "--batch", "64", "--arch", "90",
                               *extra], capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs.append(proc.stdout)
    return runs


@pytest.mark.build
def test_cli_prints_one_row_per_launch(cli_runs):
    table = cli_runs[0].splitlines()
    rows = [line for line in table if any(line.startswith(label + " ") for label in LABELS)]
    assert [next(label for label in LABELS if row.startswith(label + " ")) for row in rows] == LABELS
    assert any(line.startswith("total ") and "14 launches" in line for line in table)
    assert "nothing measured" in table[0] and "H100 SXM" in table[1]
    dots = [line for line in table if line.startswith("  ") and "#ttg." in line]  # the dot lines
    assert any("conv2d_act_pool_fwd_kernel" in line for line in dots)
    assert dots and all(line.endswith(", x1") for line in dots), dots  # no warp repeats another's work


@pytest.mark.build
def test_cli_json_and_a_second_run_from_the_cache(cli_runs):
    report = json.loads(cli_runs[1])
    assert report["build"]["built"] == 0 and report["build"]["from_cache"] == report["build"]["compiled_kernels"]
    launches = report["launches"]
    assert [r["label"] for r in launches] == LABELS
    for r in launches:
        assert r["waves"] == pytest.approx(r["programs"] / (r["occupancy"]["programs"] * 132))
        assert r["floor_s"] == pytest.approx(max((r["bytes_read"] + r["bytes_written"]) / 3.35e12, r["compute_s"]))
    assert report["totals"]["useful"] == 64 * model_flops(LeNet5("lenet5"))["train"]
    assert report["precision"] == DEFAULT_PRECISION
