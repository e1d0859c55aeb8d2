"""bench/throughput.py on the CPU: a tiny run's JSON, table and plot, and honesty about the fused paths.

The benchmark runs in a subprocess, as a user runs it, with --device cpu (so the tests hold on a GPU
machine too). On the CPU it must measure eager, list fused and fused-graph as unavailable with the
reason (never a figure), and under TRITON_INTERPRET=1 may run the fused path through the
interpreter, labelled as such and with no images/s.
"""
import json
import subprocess
import sys

import pytest

from utils import REPO, env_without_interpreter, load_script

BENCH = REPO / "bench" / "throughput.py"
TINY = ["--device", "cpu", "--batch-sizes", "8", "--repeats", "3", "--warmup", "1", "--cpu-threads", "1"]
RESULT_KEYS = {"provider", "batch_size", "mode", "available", "reason", "interpreter",
               "images_per_second", "p20", "p80", "median_step_ms", "first_call_seconds",
               "compile_seconds", "launches_per_step", "ops_breakdown", "achieved_tflops",
               "fraction_of_peak_fp32", "fraction_of_peak_tf32"}
META_KEYS = {"device", "device_name", "gpu", "cpu", "torch", "triton", "cuda", "date", "command",
             "flops_per_image", "peak_tflops", "triton_interpret"}


def run_bench(tmp_path, *args, interpret: bool, tiny=TINY):
    env = env_without_interpreter()
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run([sys.executable, str(BENCH), *tiny, *args, "--json", str(out_json),
                           "--plot", str(out_png)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out_json.read_text()), out_png, proc


def test_cpu_run_measures_eager_and_lists_fused_as_unavailable(tmp_path):
    payload, png, proc = run_bench(tmp_path, "--providers", "eager", "eager-graph", "compile-graph", "fused",
                                   "fused-graph", interpret=False)
    meta, results = payload["meta"], payload["results"]
    assert META_KEYS <= meta.keys()
    assert meta["device"] == "cpu" and meta["gpu"] is None and not meta["triton_interpret"]
    assert meta["flops_per_image"]["train"] == 2_263_920
    providers = ("eager", "eager-graph", "compile-graph", "fused", "fused-graph")
    assert {(r["provider"], r["mode"]) for r in results} == {(p, m) for p in providers for m in ("train", "inference")}
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
                                  "fused-graph/eager": None, "best PyTorch": "eager",
                                  "fused-graph/best PyTorch": None} for m in ("inference", "train")]
    assert {r["compile_mode"] for r in results if r["provider"] == "compile-graph"} == {"reduce-overhead"}
    assert "n/a" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout
    assert "PEAK_TFLOPS" not in proc.stdout and "not in the benchmark's table of peak FLOP/s" in proc.stdout
    report_end = proc.stdout.split("\nwrote ")[0].strip().splitlines()[-1]
    assert report_end.startswith("in short: train: only eager was measured, at best "), report_end
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
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
    # The fused step: 14 Triton launches (5 layers forward and backward, the loss both ways, conv2's
    # dz and grad-input), and the stock BatchNorm, dropout and optimizer ops beside them.
    assert rows["fused"]["ops_breakdown"].startswith(f"{rows['fused']['launches_per_step']} = 14 Triton")
    assert "native_batch_norm" in rows["fused"]["ops_breakdown"]


def test_amp_runs_the_reference_and_says_why_fused_bf16_cannot_here(tmp_path):
    payload, _, _ = run_bench(tmp_path, "--providers", "eager", "fused", "--modes", "train", "--amp", "bf16",
                              interpret=True)
    assert payload["meta"]["amp"] == "bf16"
    rows = {r["provider"]: r for r in payload["results"]}
    assert rows["eager"]["available"] and rows["eager"]["images_per_second"] > 0
    assert not rows["fused"]["available"] and "bfloat16" in rows["fused"]["reason"]


# --------------------------------------------------------------------------------------------------
# The printed report, built in-process from rows of known speeds
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH)


def row(provider, batch_size, mode, images_per_second, **extra):
    measured = images_per_second is not None
    return {"provider": provider, "batch_size": batch_size, "mode": mode, "available": True, "reason": None,
            "interpreter": False, "images_per_second": images_per_second,
            "p20": images_per_second and 0.9 * images_per_second, "p80": images_per_second and 1.1 * images_per_second,
            "launches_per_step": 5 if measured else None, "ops_breakdown": "5 = 5 Triton launches",
            "achieved_tflops": images_per_second and images_per_second * 1e6 / 1e12, **extra}


def report(bench, capsys, results, providers, peak=None) -> list[str]:
    meta = {"peak_tflops": peak, "variant": "lenet5", "flops_convention": "2 per multiply-add"}
    capsys.readouterr()
    bench.print_report(results, bench.ratios(results), providers, meta, {"forward": 1e6, "train": 3e6})
    return capsys.readouterr().out.strip().splitlines()


def test_report_ends_with_the_fastest_provider_per_batch_size(bench, capsys):
    results = [row("eager", 64, "train", 1000.0), row("compile", 64, "train", 1250.0),
               row("fused", 64, "train", 2500.0),
               row("eager", 256, "train", 4000.0), row("compile", 256, "train", 1000.0),
               row("fused", 256, "train", 3000.0),
               row("eager", 64, "inference", 8000.0), row("fused", 64, "inference", 9000.0),
               row("eager", 256, "inference", 20000.0), row("fused", 256, "inference", 30000.0),
               {**row("fused-graph", 4, "train", None), "interpreter": True, "interpreter_seconds_per_step": 2.0},
               {**row("fused-graph", 64, "inference", None), "available": False, "reason": "needs a GPU"}]
    lines = report(bench, capsys, results, ["eager", "compile", "fused", "fused-graph"])
    assert lines[-1] == ("in short: train: fastest fused at batch 64 (2.00x as fast as compile), eager at batch 256 "
                         "(1.33x as fast as fused); inference: fastest fused at every batch size "
                         "(1.12x-1.50x as fast as eager)")
    assert sum(line.startswith("in short:") for line in lines) == 1


def test_fused_graph_is_set_against_the_best_way_pytorch_ran(bench, capsys):
    results = [row("eager", 64, "train", 1000.0), row("eager-graph", 64, "train", 3000.0),
               row("compile-graph", 64, "train", 2500.0), row("fused", 64, "train", 4000.0),
               row("fused-graph", 64, "train", 6000.0),
               row("eager", 256, "train", 4000.0), row("compile-tuned", 256, "train", 5000.0),
               row("fused-graph", 256, "train", 2500.0)]
    rats = {r["batch_size"]: r for r in bench.ratios(results)}
    # fastlenet's own providers are never the peer, however fast: eager-graph at 64, compile-tuned at 256.
    assert (rats[64]["best PyTorch"], rats[64]["fused-graph/best PyTorch"]) == ("eager-graph", 2.0)
    assert (rats[256]["best PyTorch"], rats[256]["fused-graph/best PyTorch"]) == ("compile-tuned", 0.5)
    lines = report(bench, capsys, results, list(bench.PROVIDERS))
    assert any(line.split()[0] == "64" and line.endswith("2.00x (eager-graph)") for line in lines), lines
    assert any(line.split()[0] == "256" and line.endswith("0.50x (compile-tuned)") for line in lines), lines


def test_report_with_one_provider_or_none(bench, capsys):
    lines = report(bench, capsys, [row("eager", 8, "train", 1234.4), row("eager", 16, "train", 2000.0)], ["eager"])
    assert lines[-1] == "in short: train: only eager was measured, at best 2,000 images/s (batch 16)"
    unavailable = {**row("fused", 8, "train", None), "available": False, "reason": "needs a GPU"}
    lines = report(bench, capsys, [unavailable], ["fused"])
    assert lines[-1] == "in short: nothing was measured: no provider could run here"


def test_report_says_why_there_is_no_fraction_of_peak(bench, capsys):
    results = [row("eager", 8, "train", 1000.0)]
    text = "\n".join(report(bench, capsys, results, ["eager"]))
    assert "PEAK_TFLOPS" not in text  # a name in the code, which a reader of the report does not know
    assert ("best achieved per provider and mode (no fraction of peak: this device is not in the benchmark's "
            "table of peak FLOP/s, which lists A100, H100, H200 GPUs):") in text
    known = [{**r, "fraction_of_peak_fp32": 0.01, "fraction_of_peak_tf32": 0.001} for r in results]
    text = "\n".join(report(bench, capsys, known, ["eager"], peak={"fp32": 67.0, "tf32": 494.7, "matched": "H100"}))
    assert "best achieved per provider and mode:\n" in text and "1.00% of FP32 peak" in text
