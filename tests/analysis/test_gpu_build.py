"""GPU build without a GPU: every kernel configuration users reach is compiled for sm_80 and sm_90 by
Triton's real pipeline and ptxas, and must use no spill memory (LOCAL and STACK bytes, from
cuobjdump) and fit the target's shared memory.

The configurations are recorded, without running the kernels, from the calls users make: a
training step of every LeNet-5 variant at batch 1, 3, 128, 4096 and 65536, and of the tutorial
networks fused by fastlenet.fuse; cross-entropy over 10, 100 and 1000 classes, on its own and after a
linear layer (the forward split over several programs); the drop-in layers at
shapes beyond LeNet, with every activation x pool (no pooling included). Each
is specialised by Triton's own JIT rules (integers equal to 1 become constexprs, integers and
pointers divisible by 16 get a divisibility hint), so what is built is what a GPU run compiles, and
each dot is built in both precisions a GPU run can pick (IEEE fp32 and TF32). Failing
configurations are listed with their registers in the report (see REPORT below); the toolchain
versions are printed at the end of the pytest run.
"""
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest
import torch

from fastlenet import functional as FF
from fastlenet.kernels.activations import ACTIVATIONS
from utils import PARAMETERLESS_POOLS as POOLS
from fastlenet.analysis.gpu_build import describe_result, failures, merge_descriptions
from fastlenet.kernels.launch import describe, record, record_launches
from fastlenet.engine import loss_function
from fastlenet.models import NETWORKS, VARIANTS, LeNet5, build_model

from utils import env_without_interpreter

TARGETS = (80, 90)
LENET_BATCHES = (1, 3, 128, 4096, 65536)
# The tutorial networks' stock layers (BatchNorm, dropout, AlexNet's 3x3 pools) run for real while
# the fused ones are recorded, so AlexNet (large activations) stops at batch 128.
NETWORK_BATCHES = {"cnn": (1, 3, 128, 4096), "convnet-bn": (1, 3, 128, 4096), "alexnet": (1, 3, 128),
                   "lenet5-1998": (1, 3, 128, 4096)}
LOSS_BATCHES = (1, 3, 128, 4096)
LOSS_CLASSES = (10, 100, 1000)
# Logits from a linear layer (the forward then splits from 8 row blocks on): 1024 is the fewest rows
# that split at 10 classes.
HEAD_BATCHES = (128, 1024, 65536)
# The 1998 LeNet-5's RBF output (84 features, 10 classes) beyond its network's batches, and odd
# wider shapes: (batch, classes, features).
RBF_SHAPES = ((65536, 10, 84), (300, 17, 130), (128, 100, 84))
LAYER_BATCHES = (1, 3, 128)
LINEAR_BATCHES = (1, 3, 128, 4096)
# Half precision (float16 and bfloat16 tensors, as under autocast): a LeNet-5 step, the wide
# layers and the loss, at a few batch sizes; each configuration costs compile time.
HALF_DTYPES = (torch.float16, torch.bfloat16)
HALF_LENET_BATCHES = (3, 4096)
HALF_LAYER_BATCHES = (128,)
HALF_LINEAR_BATCHES = (3, 4096)
HALF_LAYER_SETTINGS = (("relu", "max"), ("tanh", "avg"), ("relu", None))
REPORT = pathlib.Path(os.environ.get("FASTLENET_GPU_BUILD_REPORT",
                                     os.path.join(tempfile.gettempdir(), "gpu_build_report.txt")))


def _recorded(origin, fn):
    """Descriptions of the launches fn() makes, recorded without running them, once as a GPU run
    with IEEE float32 dots would launch them and once as one with TF32 dots (convolutions default
    to TF32 on a GPU, matmuls follow torch's matmul precision): tile sizes may differ by precision,
    and both code paths must build spill-free."""
    return [describe(launch, origin) for precision in ("ieee", "tf32") for launch in record(fn, precision)]


def _lenet_step(variant, batch, device, dtype=torch.float32):
    model = LeNet5(variant, fused=True).to(device, dtype)
    x = torch.empty(batch, 1, 28, 28, device=device, dtype=dtype)
    target = torch.zeros(batch, dtype=torch.int64, device=device)
    return lambda: FF.cross_entropy(model(x), target).backward()


def _network_step(name, batch, device):
    model = build_model(name, fused=True).to(device)
    x = torch.zeros(batch, 1, 28, 28, device=device)
    target = torch.zeros(batch, dtype=torch.int64, device=device)
    loss_fn = loss_function(True, name)  # the 1998 LeNet-5's MAP criterion has a constant logit
    return lambda: loss_fn(model(x), target).backward()


def _loss_step(batch, classes, device, dtype=torch.float32):
    logits = torch.empty(batch, classes, device=device, dtype=dtype, requires_grad=True)
    target = torch.zeros(batch, dtype=torch.int64, device=device)
    return lambda: FF.cross_entropy(logits, target).backward()


def _head_step(batch, classes, device, dtype=torch.float32):
    # A classifier head: logits from the linear layer carry the counter that lets the loss forward
    # split the batch over several programs (kernels/cross_entropy.py).
    x = torch.empty(batch, 84, device=device, dtype=dtype, requires_grad=True)
    w = torch.empty(classes, 84, device=device, dtype=dtype, requires_grad=True)
    target = torch.zeros(batch, dtype=torch.int64, device=device)
    return lambda: FF.cross_entropy(FF.linear_act(x, w, None, "identity"), target).backward()


def _rbf_step(batch, classes, features, device, dtype=torch.float32):
    x = torch.empty(batch, features, device=device, dtype=dtype, requires_grad=True)
    prototypes = torch.empty(classes, features, device=device, dtype=dtype)
    return lambda: FF.rbf_scores(x, prototypes).sum().backward()


def _misaligned_loss_step(device):
    # Logits that start 4 bytes into their storage (a column slice): no 16-byte alignment to assume.
    logits = torch.empty(128, 11, device=device, requires_grad=True)
    target = torch.zeros(128, dtype=torch.int64, device=device)
    return lambda: FF.cross_entropy(logits[:, 1:], target).backward()


def _conv_step(batch, activation, pool, bias, device, dtype=torch.float32):
    # A CIFAR-sized first layer of a VGG-style net: 3 -> 64 channels, 3x3, padding 1, 32x32.
    x = torch.empty(batch, 3, 32, 32, device=device, dtype=dtype, requires_grad=True)
    w = torch.empty(64, 3, 3, 3, device=device, dtype=dtype, requires_grad=True)
    b = torch.empty(64, device=device, dtype=dtype, requires_grad=True) if bias else None
    return lambda: FF.conv2d_act_pool(x, w, b, padding=1, activation=activation, pool=pool).sum().backward()


def _linear_step(batch, activation, bias, device, dtype=torch.float32):
    # A classifier head over flattened 3x32x32 images, 1000 classes.
    x = torch.empty(batch, 3 * 32 * 32, device=device, dtype=dtype, requires_grad=True)
    w = torch.empty(1000, 3 * 32 * 32, device=device, dtype=dtype, requires_grad=True)
    b = torch.empty(1000, device=device, dtype=dtype, requires_grad=True) if bias else None
    return lambda: FF.linear_act(x, w, b, activation=activation).sum().backward()


def user_launch_configs(device):
    """Every launch configuration the calls above make, deduplicated, each dot in both precisions."""
    descs = []
    for variant in VARIANTS:
        for batch in LENET_BATCHES:
            descs += _recorded(f"{variant} step B={batch}", _lenet_step(variant, batch, device))
    for name in NETWORKS:
        for batch in NETWORK_BATCHES[name]:
            descs += _recorded(f"{name} (fused) step B={batch}", _network_step(name, batch, device))
    for classes in LOSS_CLASSES:
        for batch in LOSS_BATCHES:
            descs += _recorded(f"cross_entropy B={batch} C={classes}", _loss_step(batch, classes, device))
        for batch in HEAD_BATCHES:
            descs += _recorded(f"linear_act + cross_entropy B={batch} C={classes}",
                               _head_step(batch, classes, device))
    descs += _recorded("cross_entropy B=128 C=10 on a misaligned view", _misaligned_loss_step(device))
    for batch, classes, features in RBF_SHAPES:
        descs += _recorded(f"rbf_scores B={batch} C={classes} F={features}",
                           _rbf_step(batch, classes, features, device))
    # Layers without bias (before a norm layer) take another code path; one batch size covers it.
    for activation in ACTIVATIONS:
        for bias, batches in ((True, LAYER_BATCHES), (False, (128,))):
            for batch in batches:
                for pool in POOLS:
                    descs += _recorded(f"conv2d_act_pool 3->64 k3 p1 32x32 {activation}/{pool} bias={bias} "
                                       f"B={batch}", _conv_step(batch, activation, pool, bias, device))
            for batch in LINEAR_BATCHES if bias else (128,):
                descs += _recorded(f"linear_act 3072->1000 {activation} bias={bias} B={batch}",
                                   _linear_step(batch, activation, bias, device))
    descs += half_precision_launches(device)
    return merge_descriptions(descs)


def half_precision_launches(device):
    """The half-precision configurations (HALF_*), recorded as for float32."""
    descs = []
    for dtype in HALF_DTYPES:
        name = str(dtype).removeprefix("torch.")
        for batch in HALF_LENET_BATCHES:
            descs += _recorded(f"lenet5 {name} step B={batch}", _lenet_step("lenet5", batch, device, dtype))
        for batch in HALF_LAYER_BATCHES:
            for activation, pool in HALF_LAYER_SETTINGS:
                descs += _recorded(f"conv2d_act_pool 3->64 k3 p1 32x32 {activation}/{pool} {name} B={batch}",
                                   _conv_step(batch, activation, pool, True, device, dtype))
        for batch in HALF_LINEAR_BATCHES:
            descs += _recorded(f"linear_act 3072->1000 relu {name} B={batch}",
                               _linear_step(batch, "relu", True, device, dtype))
        for classes in (10, 1000):
            descs += _recorded(f"cross_entropy {name} B=128 C={classes}", _loss_step(128, classes, device, dtype))
        for batch in HALF_LINEAR_BATCHES:
            descs += _recorded(f"rbf_scores 84->10 {name} B={batch}", _rbf_step(batch, 10, 84, device, dtype))
    return descs


class _Summary:
    """Writes the build's toolchain and outcome into pytest's terminal summary, so CI's log shows
    which Triton and ptxas produced the verdict (and whether it came from the cache)."""

    def __init__(self, stats, failing):
        self.stats, self.failing = stats, failing

    def pytest_terminal_summary(self, terminalreporter):
        s = self.stats
        terminalreporter.write_sep("-", "GPU build")
        terminalreporter.write_line(f"Triton {s['triton']}, ptxas {s['ptxas']} ({s['ptxas_path']})")
        terminalreporter.write_line(
            f"{s['descriptions']} launch configurations -> {s['compiled_kernels']} compiled kernels for "
            f"sm_{', sm_'.join(map(str, s['targets']))}: {s['from_cache']} from cache, {s['built']} built "
            f"({s['jobs']} processes), {s['seconds']} s; {self.failing} failing; report: {REPORT}")


@pytest.fixture(scope="module")
def build_results(tmp_path_factory, device, request):
    descs = user_launch_configs(device)
    tmp = tmp_path_factory.mktemp("gpu_build")
    (tmp / "launches.json").write_text(json.dumps(descs))
    env = env_without_interpreter()
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "fastlenet.analysis.gpu_build", str(tmp / "launches.json"),
                           "--cc", *map(str, TARGETS), "--report", str(REPORT), "--stats", str(tmp / "stats.json")],
                          capture_output=True, text=True, env=env, timeout=1500)
    # 1 means "built, but some configuration fails": the tests below say which.
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    stats = json.loads((tmp / "stats.json").read_text())
    request.config.pluginmanager.register(_Summary(stats, len(failures(results))), "fastlenet-gpu-build-summary")
    return descs, results


@pytest.mark.build
def test_every_user_configuration_compiles_for_every_target(build_results):
    descs, results = build_results
    assert {d["kernel"] for d in descs} >= {
        "conv2d_act_pool_fwd_kernel", "conv2d_act_pool_bwd_kernel", "linear_act_fwd_kernel",
        "linear_act_bwd_kernel", "cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel"}
    built = {(origin, r["cc"]) for r in results for origin in r["origins"]}
    origins = {origin for d in descs for origin in d["origins"]}
    missing = sorted({(o, cc) for o in origins for cc in TARGETS} - built)
    assert not missing, f"recorded but not built: {missing[:10]}"
    # Batch 1 launches specialise their size argument to a constant, batch 128 to a multiple of 16.
    assert any(r["constexprs"].get("N") == 1 for r in results if r["kernel"] == "conv2d_act_pool_fwd_kernel")
    assert any("M" in r["divisible_by_16"] for r in results if r["kernel"] == "linear_act_fwd_kernel")
    misaligned = [r for r in results if "cross_entropy B=128 C=10 on a misaligned view" in r["origins"]]
    assert misaligned and all("logits_ptr" not in r["divisible_by_16"] for r in misaligned)
    assert any("logits_ptr" in r["divisible_by_16"] for r in results if r["kernel"] == "cross_entropy_fwd_kernel")


@pytest.mark.build
def test_no_spills_and_shared_memory_within_limits(build_results):
    _, results = build_results
    bad = failures(results)
    assert not bad, (f"{len(bad)} of {len(results)} compiled kernels do not build, spill or overflow "
                     f"shared memory (full list with register counts: {REPORT}):\n"
                     + "\n".join(describe_result(r) for r in sorted(bad, key=lambda r: (r["kernel"], r["cc"]))))


def test_half_precision_configurations_are_recorded(device):
    """float16 and bfloat16 launches reach the build with half-precision pointers (bfloat16 ones
    too, which the interpreter cannot run: recording runs nothing)."""
    descs = merge_descriptions(half_precision_launches(device))
    for dtype in ("float16", "bfloat16"):
        # The first tensor each kernel reads: its input, logits, (dz) the pooled gradient, (dx) dz.
        first = [next(d["args"][k] for k in ("x_ptr", "logits_ptr", "g_ptr", "dz_ptr") if k in d["args"])
                 for d in descs]
        kernels = {d["kernel"] for d, arg in zip(descs, first) if arg["dtype"] == dtype}
        assert kernels == {"conv2d_act_pool_fwd_kernel", "conv2d_act_pool_dz_kernel", "conv2d_act_pool_dx_kernel",
                           "conv2d_act_pool_bwd_kernel", "linear_act_fwd_kernel",
                           "linear_act_bwd_kernel", "cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel",
                           "rbf_scores_fwd_kernel", "rbf_scores_bwd_kernel"}, dtype
    # Each costs two compilations: 84 with the RBF output's, 94 with the dz launches (small kernels),
    # 104 with grad-input in launches of its own.
    assert len(descs) <= 104


def test_recording_without_executing_records_what_a_run_launches(device):
    """execute=False must not change a single recorded launch: same kernels, grids, arguments
    (tensor dtypes, shapes, alignment) and meta-parameters as a step that runs."""
    def step():
        torch.manual_seed(0)
        model = LeNet5("lenet5-classic", fused=True).to(device)
        x = torch.randn(3, 1, 28, 28, device=device)
        FF.cross_entropy(model(x), torch.tensor([1, 0, 9], device=device)).backward()

    with record_launches() as ran:
        step()
    with record_launches(execute=False) as recorded:
        step()
    assert [describe(launch) for launch in recorded] == [describe(launch) for launch in ran]
    assert len(ran) >= 12  # a whole step was recorded


def test_a_misaligned_view_is_recorded_as_misaligned(device):
    with record_launches(execute=False) as launches:
        _misaligned_loss_step(device)()
    assert describe(launches[0])["args"]["logits_ptr"]["data_ptr_mod16"] == 4


@pytest.mark.build
def test_a_second_build_comes_from_the_cache(tmp_path, device):
    descs = _recorded("cross_entropy B=3 C=10", _loss_step(3, 10, device))[:1]
    (tmp_path / "launches.json").write_text(json.dumps(descs))
    env = env_without_interpreter()
    env["FASTLENET_CACHE_DIR"] = str(tmp_path / "cache")
    stats = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "fastlenet.analysis.gpu_build", str(tmp_path / "launches.json"),
                               "--stats", str(tmp_path / "stats.json")], capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        stats.append(json.loads((tmp_path / "stats.json").read_text()))
    assert [(s["built"], s["from_cache"]) for s in stats] == [(2, 0), (0, 2)]


_SAME_AS_JIT = """
import json, sys
from fastlenet.analysis.gpu_build import compile_for, jit_compile, specialize
for desc in json.load(open(sys.argv[1])):
    for cc in (80, 90):
        jit, ours = jit_compile(desc, cc), compile_for(specialize(desc, cc))
        print(json.dumps([desc["kernel"], cc, jit.hash == ours.hash, jit.asm["ttgir"] == ours.asm["ttgir"]]))
"""


@pytest.mark.build
def test_build_compiles_what_the_jit_launch_path_compiles(tmp_path, device):
    """Without a GPU: for the same launch and target, compile_for (specialisation data -> preload)
    yields the kernel the JIT's launch path compiles itself, byte for byte in TTGIR, same hash."""
    descs = []
    for origin, step in [("lenet5 B=1", _lenet_step("lenet5", 1, device)),
                         ("misaligned", _misaligned_loss_step(device))]:
        descs += _recorded(origin, step)
    (tmp_path / "launches.json").write_text(json.dumps(descs[:1] + descs[-2:]))
    env = env_without_interpreter()
    proc = subprocess.run([sys.executable, "-c", _SAME_AS_JIT, str(tmp_path / "launches.json")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    checks = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(checks) == 6 and all(same_hash and same_ttgir for _, _, same_hash, same_ttgir in checks), checks


@pytest.mark.build
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compares with what the JIT compiled")
def test_build_compiles_exactly_what_the_jit_compiled():
    """After real launches on this GPU, each kernel the JIT compiled (found in its own cache under
    the key our specialisation predicts) has the same Triton hash and TTGIR as compile_for's."""
    from fastlenet.analysis.gpu_build import compile_for, jit_function, specialize

    cc = int("".join(map(str, torch.cuda.get_device_capability())))
    descs = []
    for origin, step in [("lenet5 B=1", _lenet_step("lenet5", 1, "cuda")),
                         ("lenet5-classic B=3", _lenet_step("lenet5-classic", 3, "cuda")),
                         ("lenet5-nopad B=128", _lenet_step("lenet5-nopad", 128, "cuda")),
                         ("cross_entropy B=3 C=100", _loss_step(3, 100, "cuda")),
                         ("cross_entropy on a misaligned view", _misaligned_loss_step("cuda"))]:
        with record_launches() as launches:
            step()
        torch.cuda.synchronize()
        descs += [describe(launch, origin) for launch in launches]

    checked = 0
    for desc in merge_descriptions(descs):
        spec = specialize(desc, cc)
        kernel = jit_function(desc["module"], desc["kernel"])
        jit_cache = kernel.device_caches[torch.cuda.current_device()][0]
        assert spec["key"] in jit_cache, (
            f"{desc['kernel']} from {desc['origins']}: the JIT compiled none under our key {spec['key']};"
            f" it holds {list(jit_cache)}")
        ours, theirs = compile_for(spec), jit_cache[spec["key"]]
        assert ours.hash == theirs.hash, f"{desc['kernel']} from {desc['origins']}: hashes differ"
        assert ours.asm["ttgir"] == theirs.asm["ttgir"]
        checked += 1
    assert checked >= 12
