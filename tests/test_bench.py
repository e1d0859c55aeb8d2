"""bench/throughput.py on the CPU: a tiny run's JSON, table and plot, and honesty about the fused paths.

The benchmark runs in a subprocess, as a user runs it, with --device cpu (so the tests hold on a GPU
machine too). On the CPU it must measure eager, list fused and fused-graph as unavailable with the
reason (never a figure), and under TRITON_INTERPRET=1 may run the fused path through the
interpreter, labelled as such and with no images/s.
"""
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "throughput.py"
TINY = ["--device", "cpu", "--batch-sizes", "8", "--repeats", "3", "--warmup", "1", "--cpu-threads", "1"]
RESULT_KEYS = {"provider", "batch_size", "mode", "available", "reason", "interpreter",
               "images_per_second", "p20", "p80", "median_step_ms", "first_call_seconds",
               "compile_seconds", "launches_per_step", "ops_breakdown", "achieved_tflops",
               "fraction_of_peak_fp32", "fraction_of_peak_tf32"}
META_KEYS = {"device", "device_name", "gpu", "cpu", "torch", "triton", "cuda", "date", "command",
             "flops_per_image", "peak_tflops", "triton_interpret"}


def run_bench(tmp_path, *args, interpret: bool, tiny=TINY):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run([sys.executable, str(BENCH), *tiny, *args, "--json", str(out_json),
                           "--plot", str(out_png)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out_json.read_text()), out_png, proc


def test_cpu_run_measures_eager_and_lists_fused_as_unavailable(tmp_path):
    payload, png, proc = run_bench(tmp_path, "--providers", "eager", "fused", "fused-graph",
                                   interpret=False)
    meta, results = payload["meta"], payload["results"]
    assert META_KEYS <= meta.keys()
    assert meta["device"] == "cpu" and meta["gpu"] is None and not meta["triton_interpret"]
    assert meta["flops_per_image"]["train"] == 2_263_920
    assert {(r["provider"], r["mode"]) for r in results} == {
        (p, m) for p in ("eager", "fused", "fused-graph") for m in ("train", "inference")}
    for r in results:
        assert RESULT_KEYS <= r.keys(), r
        assert r["batch_size"] == 8
        if r["provider"] == "eager":
            assert r["available"] and r["reason"] is None
            assert 0 < r["p20"] <= r["images_per_second"] <= r["p80"], r
            assert r["launches_per_step"] == {"train": 35, "inference": 11}[r["mode"]]
            assert r["fraction_of_peak_fp32"] is None  # no peak known for a CPU
        else:
            assert not r["available"] and not r["interpreter"]
            assert "CUDA" in r["reason"], r
            assert r["images_per_second"] is None and r["p20"] is None and r["launches_per_step"] is None
    assert payload["ratios"] == [{"batch_size": 8, "mode": m, "fused/eager": None, "fused/compile": None,
                                  "fused-graph/eager": None} for m in ("inference", "train")]
    assert "n/a" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interpreter_run_is_labelled_and_gives_no_speed_figure(tmp_path):
    payload, _, proc = run_bench(tmp_path, "--providers", "fused", interpret=True)
    rows = {row["mode"]: row for row in payload["results"]}
    assert payload["meta"]["triton_interpret"] is True and rows.keys() == {"train", "inference"}
    for row in rows.values():
        assert row["provider"] == "fused" and row["interpreter"] is True and row["available"]
        assert row["images_per_second"] is None and row["p20"] is None and row["achieved_tflops"] is None
        assert row["interpreter_seconds_per_step"] > 0
    assert rows["inference"]["launches_per_step"] == 5, rows["inference"]["ops_breakdown"]
    assert rows["train"]["launches_per_step"] > 5, rows["train"]["ops_breakdown"]
    assert "not a speed figure" in proc.stdout
    # The training step runs the loss, whose masked-off lanes make numpy warn in the interpreter:
    # none of that reaches the log.
    assert "RuntimeWarning" not in proc.stderr, proc.stderr


def test_cpu_floor_runs_the_required_computation(mnist_dir):
    """bench/cpu_floor.py (the lower bound beside bench/cpu_epoch.py) on a few batches: it runs the
    forward/backward steps it says, tests all 10,000 images and reports each phase's seconds."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "cpu_floor.py"), "--data-dir", str(mnist_dir),
                           "--limit-train", "200"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("4 steps of 64, "), line  # 200 images: three batches of 64 and one of 8
    right = int(line.split(", ")[1].split()[0])
    assert 0 <= right <= 10_000
    for phase in ("import", "data", "epoch", "test"):
        assert f"{phase} " in line and " s" in line.split(f"{phase} ")[1], line


def test_a_log_of_the_bench_holds_no_progress_bar_or_cuda_home_noise(tmp_path):
    """stderr is not a terminal here, as in a log: no progress bar, and no "No CUDA runtime is found"
    from torch.compile's toolchain, which a CPU user has no use for."""
    tiny = ["--device", "cpu", "--batch-sizes", "8", "--repeats", "1", "--warmup", "0", "--cpu-threads", "1"]
    payload, _, proc = run_bench(tmp_path, "--providers", "eager", "compile", "--modes", "inference",
                                 interpret=False, tiny=tiny)
    assert {r["provider"] for r in payload["results"]} == {"eager", "compile"}
    for noise in ("\r", "measuring", "it/s", "No CUDA runtime"):
        assert noise not in proc.stderr, proc.stderr


def test_help_shows_no_empty_defaults():
    proc = subprocess.run([sys.executable, str(BENCH), "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 50)" in text  # the informative ones stay


def test_a_tutorial_network_is_benched_fused_and_eager(tmp_path):
    # --model takes any network; under the interpreter its fused form (fastlenet.fuse) is counted.
    payload, _, proc = run_bench(tmp_path, "--model", "convnet-bn", "--providers", "eager", "fused",
                                 "--modes", "train", interpret=True)
    rows = {r["provider"]: r for r in payload["results"]}
    assert payload["meta"]["flops_per_image"]["forward"] == 2 * (10 * 25 * 26 * 26 + 20 * 250 * 11 * 11
                                                                 + 500 * 60 + 60 * 20 + 20 * 10)
    assert rows["eager"]["available"] and rows["fused"]["interpreter"]
    # The fused step: 12 Triton launches (5 layers forward and backward, the loss both ways), and the
    # stock BatchNorm, dropout and optimizer ops beside them.
    assert rows["fused"]["ops_breakdown"].startswith(f"{rows['fused']['launches_per_step']} = 12 Triton")
    assert "native_batch_norm" in rows["fused"]["ops_breakdown"]


def test_amp_runs_the_reference_and_says_why_fused_bf16_cannot_here(tmp_path):
    payload, _, _ = run_bench(tmp_path, "--providers", "eager", "fused", "--modes", "train", "--amp", "bf16",
                              interpret=True)
    assert payload["meta"]["amp"] == "bf16"
    rows = {r["provider"]: r for r in payload["results"]}
    assert rows["eager"]["available"] and rows["eager"]["images_per_second"] > 0
    assert not rows["fused"]["available"] and "bfloat16" in rows["fused"]["reason"]
