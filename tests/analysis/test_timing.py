"""The timing model (fastlenet.analysis.timing) and what it reads: SASS blocks, loops and dependent
loads (sass.py), the TTGIR's loops and branches per program (trips.py), on literal snippets worked by
hand; the model's bounds on a launch worked by hand; the calibration reproduced from the stored
measurement without a GPU; and, compiled for sm_90, a kernel whose trip count and loop are known and a
serial chain predicted slower than its parallel twin by its length."""
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest

from fastlenet.analysis import predict, sass, timing, trips
from fastlenet.analysis.gpus import GPUS
from fastlenet.analysis.report import main as report_main

from utils import env_without_interpreter, run_cli

# --------------------------------------------------------------------------------------------------
# SASS, in nvdisasm -c -gi's format.
# --------------------------------------------------------------------------------------------------

_SASS = """\
//--------------------- .text.k --------------------------
\t.section\t.text.k,"ax",@progbits
\t.sectionflags\t@"SHF_BARRIERS=1"
k:
.text.k:
\t//## File "/src/k.py", line 10
        /*0000*/                   S2R R0, SR_CTAID.X ;
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x4, PT ;
        /*0020*/               @P0 BRA `(.L_x_1) ;
\t//## File "/src/helper.py", line 3 inlined at "/src/k.py", line 12
\t//## File "/src/k.py", line 12
.L_x_0:
        /*0030*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0040*/                   IMAD.WIDE R6, R4, 0x4, R8 ;
        /*0050*/                   LDG.E R10, desc[UR4][R6.64] ;
        /*0060*/                   IADD3 R2, P1, R2, 0x4, RZ ;
        /*0070*/              @!P2 BRA `(.L_x_0) ;
\t//## File "/src/k.py", line 14
.L_x_1:
        /*0080*/                   EXIT ;
.L_x_2:
        /*0090*/                   BRA `(.L_x_2);
"""


def test_sass_blocks_loops_and_source_chains():
    code = sass.parse(_SASS)
    assert [i.opcode for i in code.instructions] == ["S2R", "ISETP.GE.AND", "BRA", "LDG.E", "IMAD.WIDE", "LDG.E",
                                                     "IADD3", "BRA", "EXIT", "BRA"]
    # Blocks: [0-2] ends in a branch, [3-7] the loop (a branch target to a branch), [8] EXIT, [9] the trap.
    assert [(b.first, b.last) for b in code.blocks] == [(0, 2), (3, 7), (8, 8), (9, 9)]
    loops = [(lp.head, lp.tail) for lp in code.loops]
    assert (3, 7) in loops and (9, 9) in loops  # the second: the lone branch to itself after EXIT
    assert code.blocks[1].loop == loops.index((3, 7)) and code.blocks[0].loop is None
    # An instruction's chain: the inlined frame first, then its call site; unannotated ones keep the last.
    assert code.instructions[3].chain == (("helper.py", 3), ("k.py", 12))
    assert code.instructions[4].chain == code.instructions[3].chain
    assert code.instructions[8].chain == (("k.py", 14),)


def test_load_depth_follows_the_registers_a_gather_reads():
    code = sass.parse(_SASS)
    loop = code.instructions[3:8]
    # The index load, then the value at it: two waits one after the other.
    assert sass.load_depth(loop) == 2
    independent = sass.parse(_SASS.replace("LDG.E R10, desc[UR4][R6.64]", "LDG.E R10, desc[UR4][R12.64]"))
    assert sass.load_depth(independent.instructions[3:8]) == 1
    # An asynchronous copy (Triton's pipelining) makes no register to wait on; a fence waits for all.
    copied = sass.parse(_SASS.replace("LDG.E R4, desc[UR4][R2.64]", "LDGSTS [R20], desc[UR4][R2.64]"))
    assert sass.load_depth(copied.instructions[3:8]) == 1
    fenced = sass.parse(_SASS.replace("IADD3 R2, P1, R2, 0x4, RZ", "MEMBAR.ALL.GPU"))
    assert sass.load_depth(fenced.instructions[3:8]) == 3
    # An index through shared memory (a layout conversion) is still the index: the chain holds.
    shared = sass.parse(_SASS.replace("IMAD.WIDE R6, R4, 0x4, R8", "STS [R30], R4")
                        .replace("LDG.E R10, desc[UR4][R6.64]", "LDS R6, [R31]")
                        .replace("IADD3 R2, P1, R2, 0x4, RZ", "LDG.E R10, desc[UR4][R6.64]"))
    assert sass.load_depth(shared.instructions[3:8]) == 2
    # A 64-bit result fills both registers of its pair: an address computed over a loaded pair
    # leaves nothing of the load in it (counting the first alone found a second wait a trip in
    # grad-input, where ptxas reused a loaded fragment's registers for the next tap's address).
    pair = sass.parse(_SASS.replace("LDG.E R4, desc[UR4][R2.64]", "LDG.E.64 R6, desc[UR4][R2.64]")
                      .replace("IMAD.WIDE R6, R4, 0x4, R8", "IMAD.WIDE R6, R5, 0x4, R8"))
    assert sass.load_depth(pair.instructions[3:8]) == 1
    assert sass.load_depth(pair.instructions[3:4] + pair.instructions[5:8]) == 2  # without it: the load's


def test_destination_widths():
    widths = {"IMAD": 1, "IMAD.WIDE": 2, "IMAD.WIDE.U32": 2, "UIMAD.WIDE.U32": 2, "CS2R": 2, "CS2R.32": 1,
              "HMMA.1688.F32.TF32": 4, "HMMA.16816.F16": 2, "LDSM.16.M88.4": 4, "LDSM.16.MT88.2": 2,
              "LDG.E.128": 4, "LDS.64": 2, "LDC.64": 2, "DFMA": 2, "F2F.F64.F32": 2, "F2F.F32.F64": 1,
              "I2F.F64.S64": 2, "I2F.S64": 1, "F2I.S64.F64.TRUNC": 2, "F2I.FTZ.U32.TRUNC.NTZ": 1,
              "SHF.L.U64.HI": 1, "ISETP.GE.AND": 1}
    assert {op: sass.destination_width(op) for op in widths} == widths


def test_flops_of_mma_and_fma_instructions():
    assert sass.mma_flops("HMMA.1688.F32.TF32") == 2 * 16 * 8 * 8
    assert sass.mma_flops("HMMA.16816.F32.BF16") == 2 * 16 * 8 * 16
    assert sass.mma_flops("HGMMA.64x32x8.F32.TF32") == 2 * 64 * 32 * 8 // 4  # a quarter per warp of the group
    assert sass.mma_flops("IMAD") == 0
    assert (sass.fma_flops("FFMA"), sass.fma_flops("FADD"), sass.fma_flops("IMAD")) == (64, 32, 0)


# --------------------------------------------------------------------------------------------------
# TTGIR control flow, per program.
# --------------------------------------------------------------------------------------------------

_TTGIR = """\
#loc = loc("/src/k.py":1:0)
#loc1 = loc("/src/k.py":5:10)
#loc2 = loc("/src/k.py":7:20)
#loc3 = loc("/src/k.py":9:20)
#loc4 = loc("/src/helper.py":3:4)
#loc5 = loc(callsite(#loc4 at #loc3))
module attributes {"ttg.num-warps" = 4 : i32} {
  tt.func public @k(%x_ptr: !tt.ptr<f32> loc("x_ptr"(#loc)), %counter_ptr: !tt.ptr<i32> loc("counter_ptr"(#loc)), \
%N: i32 loc("N"(#loc)), %NUM_A: i32 loc("NUM_A"(#loc))) attributes {noinline = false} {
    %c0_i32 = arith.constant 0 : i32 loc(#loc1)
    %c1_i32 = arith.constant 1 : i32 loc(#loc1)
    %c2_i32 = arith.constant 2 : i32 loc(#loc1)
    %c16_i32 = arith.constant 16 : i32 loc(#loc1)
    %true = arith.constant true loc(#loc1)
    %pid = tt.get_program_id x : i32 loc(#loc1)
    %0 = arith.cmpi slt, %pid, %NUM_A : i32 loc(#loc1)
    scf.if %0 {
      %acc = scf.for %k0 = %c0_i32 to %N step %c16_i32 iter_args(%a = %c0_i32) -> (i32)  : i32 {
        %v = tt.load %x_ptr : !tt.ptr<f32> loc(#loc5)
        scf.yield %a : i32 loc(#loc2)
      } loc(#loc2)
    } else {
      %p = tt.addptr %counter_ptr, %c0_i32 : !tt.ptr<i32>, i32 loc(#loc3)
      %arrived = tt.atomic_rmw add, acq_rel, gpu, %p, %c1_i32, %true : (!tt.ptr<i32>, i32, i1) -> i32 loc(#loc3)
      %last = arith.cmpi eq, %arrived, %c2_i32 : i32 loc(#loc3)
      scf.if %last {
        %w = tt.load %x_ptr : !tt.ptr<f32> loc(#loc3)
      } loc(#loc3)
    } loc(#loc1)
    tt.return loc(#loc)
  } loc(#loc)
} loc(#loc)
"""


def test_trip_counts_branches_and_the_last_arrival():
    tree = trips.control_tree(_TTGIR)
    assert tree.kernel == "k" and tree.arguments == ["x_ptr", "counter_ptr", "N", "NUM_A"]
    kinds = [r.kind for r in tree.regions]
    assert kinds == ["function", "then", "for", "else", "then"]
    loop = kinds.index("for")
    assert tree.regions[loop].line == (("k.py", 7),)
    assert tree.regions[loop].id in tree.chains[(("helper.py", 3), ("k.py", 9))]
    args = {"x_ptr": {"dtype": "float32", "shape": [8]}, "counter_ptr": {"dtype": "int32", "shape": [1]},
            "N": 100, "NUM_A": 2}
    grid = (5,)
    ev = trips.Evaluator(tree, args, grid)
    counts = [ev.program(pid) for pid in trips.program_ids(grid)]
    # Programs 0-1 loop ceil(100 / 16) = 7 times; 2-4 arrive at the counter, and only the third to
    # arrive (program 4: arrivals 0, 1, 2) takes the last branch.
    assert [c.get(loop, 0) for c in counts] == [7, 7, 0, 0, 0]
    assert [c.get(3, 0) for c in counts] == [0, 0, 1, 1, 1]
    assert [c.get(4, 0) for c in counts] == [0, 0, 0, 0, 1]
    # The last arrival's branch waits for the others: gated; the role branch (on the program id) is not.
    assert [r.gated for r in tree.regions] == [False, False, False, False, True]
    assert tree.arrival_gated(4) and not tree.arrival_gated(3)


def test_a_bound_on_a_loaded_value_is_refused_with_its_line():
    text = _TTGIR.replace("to %N step", "to %bad step").replace(
        "    %0 = arith.cmpi", "    %bad = tt.load %counter_ptr : !tt.ptr<i32> loc(#loc1)\n    %0 = arith.cmpi")
    tree = trips.control_tree(text)
    with pytest.raises(trips.Unknown, match="k.py:7"):
        trips.Evaluator(tree, {"N": 100, "NUM_A": 2}, (1,)).program((0, 0, 0))


# --------------------------------------------------------------------------------------------------
# The model's arithmetic, on a launch worked by hand.
# --------------------------------------------------------------------------------------------------

_K = {"dram_fraction": 0.8, "issue_efficiency": 0.5, "memory_wait": 1e-6, "launch_gap": 2e-6}


def _launch(classes, registers=32, warps=4, shared=0, nbytes=0):
    return {"label": "x", "kernel": "k", "registers": registers, "shared": shared, "num_warps": warps,
            "bytes": nbytes, "work": {"kernel": "k", "grid": [sum(c["programs"] for c in classes)],
                                      "num_warps": warps, "classes": classes, "regions": {}, "unmapped_loops": 0}}


def _class(programs, instructions, dependent, mma=0, fma=0):
    return {"programs": programs, "instructions": instructions, "dependent": dependent, "mma_flops": mma,
            "fma_flops": fma, "trips": dependent}


def test_bounds_of_a_launch_worked_by_hand():
    h100 = GPUS["h100"]
    assert h100.clock == pytest.approx(1.98e9, rel=1e-3)  # 66.9 TFLOP/s / (132 SMs x 128 lanes x 2)
    # 32 registers x 4 warps: 16 programs an SM by registers, 16 by threads (2048 / 128): 16 x 132 slots.
    one = _launch([_class(1000, 2000, 10, mma=4096)], nbytes=8_000_000)
    b = timing.StepModel([one], h100).predict(_K)[0].bounds
    assert b["dram"] == pytest.approx(8e6 / (3.35e12 * 0.8))
    assert b["tensor"] == pytest.approx(1000 * 4 * 4096 / 494.7e12)
    assert b["issue"] == pytest.approx(1000 * 2000 * 4 / (4 * 132) / h100.clock)
    # One program: 10 waits + 2000 instructions on one scheduler (4 warps over 4) at half a slot a cycle;
    # 1000 programs fit at once (2112 slots), so the slowest program is the launch's latency.
    serial = 10 * 1e-6 + 2000 / (h100.clock * 0.5)
    assert b["latency"] == pytest.approx(serial)
    # 10,000 of them, with 20 waits each, take 10,000 / 2112 "waves" of one, unrounded (more than the
    # 76 us their instructions take to issue).
    many = timing.StepModel([_launch([_class(10_000, 2000, 20)])], h100).predict(_K)[0]
    assert many.bounds["latency"] == pytest.approx(10_000 * (serial + 10e-6) / (16 * 132))
    assert many.seconds == pytest.approx(max(many.bounds.values()) + 2e-6) and many.bound == "latency"


def test_work_gated_on_an_arrival_counter_follows_the_rest():
    h100 = GPUS["h100"]
    # 10,000 programs of 20 waits, one of which also finishes a sum of 50 waits after the others arrive.
    finisher = {**_class(1, 2000, 70), "gated_dependent": 50, "gated_instructions": 0}
    launch = _launch([_class(9_999, 2000, 20), finisher])
    b = timing.StepModel([launch], h100).predict(_K)[0].bounds
    serial = 20 * 1e-6 + 2000 / (h100.clock * 0.5)
    assert b["latency"] == pytest.approx(10_000 * serial / (16 * 132) + 50e-6)


def test_a_step_is_the_sum_of_its_launches_and_atens():
    h100 = GPUS["h100"]
    launches = [_launch([_class(10, 100, 2)]), _launch([_class(5, 50, 1)]),
                {"label": "Adam", "kernel": "_fused_adam_ (ATen)", "aten": True, "dependent": 24, "bytes": 28_000}]
    model = timing.StepModel(launches, h100)
    parts = model.predict(_K)
    assert parts[2].seconds == pytest.approx(24 * 1e-6 + 2e-6)
    assert model.seconds(_K) == pytest.approx(sum(p.seconds for p in parts))


# --------------------------------------------------------------------------------------------------
# The calibration, from the stored measurement and kernels: no GPU, no compiler.
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibrated():
    measurement, kernels = predict.load()
    return measurement, kernels, predict.calibration(measurement, kernels)


# The rows the model misses by more than 30 % (docs/performance.md, "The timing model", says why).
KNOWN_MISS = {(4096, "train"): 0.40}


def test_calibration_predicts_each_held_out_batch_within_30_percent(calibrated):
    measurement, kernels, cal = calibrated
    graph = [(r["batch_size"], r["mode"]) for r in measurement["results"] if r["provider"] == "fused-graph"]
    assert sorted((r["batch"], r["mode"]) for r in cal.rows) == sorted(graph) and len(graph) == 8
    for r in cal.rows:
        assert abs(r["held_out"] / r["measured"] - 1) <= KNOWN_MISS.get((r["batch"], r["mode"]), 0.30), r
    for c in timing.CONSTANTS:
        assert c.low <= cal.constants[c.name] <= c.high
        for held in cal.held_out.values():
            assert c.low <= held[c.name] <= c.high
    # The kernels the measurement ran, compiled from the commit it names, with the Triton it ran.
    assert kernels["commit"].startswith("62b2439") and kernels["cc"] == 90
    assert kernels["toolchain"]["triton"] == measurement["meta"]["triton"] == "3.6.0"


def test_calibration_is_deterministic_and_fits_better_than_its_neighbours(calibrated):
    measurement, kernels, cal = calibrated
    again = predict.calibration(measurement, kernels)
    assert again.constants == cal.constants and again.rows == cal.rows
    rows = timing.calibration_rows(measurement, kernels, GPUS["h100"])
    pairs = [(r.model, r.measured) for r in rows]
    best = timing._error(pairs, cal.constants)
    for c in timing.CONSTANTS:
        for factor in (0.9, 1.1):
            moved = {**cal.constants, c.name: min(c.high, max(c.low, cal.constants[c.name] * factor))}
            assert timing._error(pairs, moved) >= best * (1 - 1e-6)  # flat to a millionth at most


def test_calibration_command(capsys):
    status, out, err = run_cli(capsys, report_main, "--calibration")
    assert status == 0, err
    assert "Worst held-out error" in out and "memory_wait" in out and "62b2439" in out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+ (train|inference) ", line)]
    assert len(rows) == 8
    status, out, err = run_cli(capsys, report_main, "--calibration", "--json")
    data = json.loads(out)
    assert data["worst_held_out_error"] <= max(KNOWN_MISS.values()) and set(data["constants"]) == set(timing.NAMES)


def test_calibration_command_names_a_missing_file(capsys, tmp_path):
    status, out, err = run_cli(capsys, report_main, "--calibration", "--kernels", tmp_path / "none.json")
    assert status == 2 and "none.json not found" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# Compiled for sm_90: a known loop, and a serial chain against its parallel twin.
# --------------------------------------------------------------------------------------------------

_KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def block_sum(x_ptr, out_ptr, K, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in range(0, K, BLOCK):
            acc += tl.load(x_ptr + pid * K + k + offs, mask=k + offs < K, other=0.0)
        tl.store(out_ptr + pid, tl.sum(acc))


    @triton.jit
    def chase(next_ptr, out_ptr, STEPS, BLOCK: tl.constexpr):
        # Each index is where the previous load pointed: every trip waits for the one before.
        i = tl.program_id(0)
        for _ in range(0, STEPS):
            i = tl.load(next_ptr + i)
        tl.store(out_ptr + tl.program_id(0), i)
''')

_WORK = '''
import json, sys
from fastlenet.analysis.gpu_build import compile_for, disassemble, resources, specialize
from fastlenet.analysis.programs import launch_work
out = []
for desc in json.loads(sys.argv[1]):
    compiled = compile_for(specialize(desc, 90))
    text = disassemble(compiled.asm["cubin"])
    w = launch_work(desc, compiled.asm["ttgir"], text, compiled.metadata.num_warps, compiled.asm["ptx"])
    r = resources(compiled, 90)
    out.append({"work": w.to_json(), "sass": text, "ptx": compiled.asm["ptx"], "registers": r["registers"],
                "shared": r["shared"]})
print(json.dumps(out))
'''


def _tensor(dtype, *shape):
    return {"dtype": dtype, "shape": list(shape), "data_ptr_mod16": 0}


def _desc(kernel, grid, args, **meta):
    return {"module": "timing_kernels", "kernel": kernel, "grid": list(grid), "args": args,
            "meta": {"num_warps": 4, **meta}, "origins": [kernel]}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("timing")
    (path / "timing_kernels.py").write_text(_KERNELS)
    descs = [_desc("block_sum", (3,), {"x_ptr": _tensor("float32", 3000), "out_ptr": _tensor("float32", 3),
                                       "K": 1000}, BLOCK=128),
             _desc("chase", (1,), {"next_ptr": _tensor("int32", 4096), "out_ptr": _tensor("int32", 1),
                                   "STEPS": 200}, BLOCK=1),
             _desc("chase", (200,), {"next_ptr": _tensor("int32", 4096), "out_ptr": _tensor("int32", 200),
                                     "STEPS": 1}, BLOCK=1)]
    env = {**env_without_interpreter(), "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _WORK, json.dumps(descs)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.build
def test_a_known_loop_counted_from_its_sass(compiled):
    work, text, ptx = compiled[0]["work"], compiled[0]["sass"], compiled[0]["ptx"]
    # Independently of sass.py: the instructions from the backward branch's target label to it ...
    lines = text.splitlines()
    instruction = re.compile(r"\s*/\*[0-9a-f]{4,}\*/")
    branch = next(n for n, line in enumerate(lines) if re.search(r"BRA `\(\.L_x_\d+\)", line)
                  and any(lines[m].startswith(re.search(r"\.L_x_\d+", line).group(0) + ":") for m in range(n)))
    label = re.search(r"\.L_x_\d+", lines[branch]).group(0)
    head = next(n for n in range(branch) if lines[n].startswith(label + ":"))
    body = [line for line in lines[head:branch + 1] if instruction.match(line)]
    total = [line for line in lines if instruction.match(line)]
    # ... and how many copies of the source loop's body ptxas put in it: its loads over the PTX loop's one.
    ptx_loads = sum("ld.global" in line for line in ptx.splitlines())
    unroll = sum(" LDG" in line for line in body) // 1
    assert ptx_loads == 1 and unroll >= 1
    outside_loads = sum(" LDG" in line for line in total) - unroll
    [cls] = work["classes"]
    assert cls["programs"] == 3 and cls["trips"] == math.ceil(1000 / 128) == 8
    # Every instruction outside the loop once (the unrolled remainder and the trap included), the
    # loop's SASS 8 // unroll times; one wait a source trip (its loads do not feed each other; the
    # copies of an unrolled body are not assumed to overlap theirs), and one for the code around it.
    assert cls["instructions"] == (len(total) - len(body)) + 8 // unroll * len(body)
    assert cls["dependent"] == 8 + (outside_loads > 0)


@pytest.mark.build
def test_a_serial_chain_is_predicted_slower_than_its_parallel_twin_by_its_length(compiled):
    serial, parallel = compiled[1], compiled[2]
    [s], [p] = serial["work"]["classes"], parallel["work"]["classes"]
    # The twin's loop of one trip is gone: the JIT makes an argument equal to 1 a constexpr.
    assert (s["programs"], s["trips"]) == (1, 200) and (p["programs"], p["trips"]) == (200, 0)
    # 200 waits in a row in the loop (however ptxas unrolled it), and the few of the code around it.
    assert 200 <= s["dependent"] <= 203 and p["dependent"] == 1
    h100 = GPUS["h100"]
    launches = [{"label": name, "kernel": "chase", "registers": c["registers"], "shared": c["shared"],
                 "num_warps": 4, "bytes": 4096 * 4, "work": c["work"]} for name, c in (("serial", serial),
                                                                                     ("parallel", parallel))]
    ps, pp = timing.StepModel(launches, h100).predict(_K)
    assert ps.bound == pp.bound == "latency"
    # Both wait for memory once a trip; the serial one does it 200 times in a row, the twin once in each
    # of 200 programs running at once: the ratio of their latencies is the chain's length, less the
    # (small) serial issue that both pay once a trip.
    ratio = ps.bounds["latency"] / pp.bounds["latency"]
    assert 0.8 * 200 < ratio <= 200 * 1.05, ratio
