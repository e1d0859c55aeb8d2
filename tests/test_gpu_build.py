"""GPU build without a GPU: every kernel configuration a fused LeNet-5 training step launches is
compiled for sm_80 and sm_90 by Triton's real pipeline and ptxas, and must use no spill memory
(LOCAL and STACK bytes, from cuobjdump) and fit the target's shared memory.

The configurations are recorded from real float32 training steps of every variant (through the
interpreter here), so a new kernel variant cannot slip past this test. Integer arguments are
compiled unspecialised: the JIT would additionally specialise some (==1, divisible by 16), which
only removes work. Each dot is built in both precisions a GPU run can pick (IEEE fp32 and TF32).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastlenet import functional as FF
from fastlenet.kernels.gpu_build import describe
from fastlenet.kernels.launch import record_launches
from fastlenet.models import VARIANTS, LeNet5


def training_step_launch_configs(device):
    descs = {}
    for variant in VARIANTS:
        model = LeNet5(variant, fused=True).to(device)
        x = torch.randn(2, 1, 28, 28, device=device)
        target = torch.randint(0, 10, (2,), device=device)
        with record_launches() as launches:
            FF.cross_entropy(model(x), target).backward()
        for launch in launches:
            desc = describe(launch)
            # The interpreter computes exactly ("ieee"); on a GPU, float32 convolutions default to
            # TF32 (torch.backends.cudnn.allow_tf32). Both code paths must build spill-free.
            for precision in ("ieee", "tf32") if "DOT_PRECISION" in desc["constexprs"] else (None,):
                variant = json.loads(json.dumps(desc))
                if precision:
                    variant["constexprs"]["DOT_PRECISION"] = precision
                descs[json.dumps(variant, sort_keys=True)] = variant
    return list(descs.values())


@pytest.fixture(scope="module")
def build_results(tmp_path_factory, device):
    descs = training_step_launch_configs(device)
    path = tmp_path_factory.mktemp("gpu_build") / "launches.json"
    path.write_text(json.dumps(descs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "fastlenet.kernels.gpu_build", str(path), "80", "90"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    return descs, results


def test_every_launched_configuration_compiles_for_sm80_and_sm90(build_results):
    descs, results = build_results
    kernels = {d["kernel"] for d in descs}
    assert {"conv2d_act_pool_fwd_kernel", "conv2d_act_pool_bwd_kernel", "linear_act_fwd_kernel",
            "linear_act_bwd_kernel", "cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel"} <= kernels
    assert len(results) == 2 * len(descs)


def test_no_spills_and_shared_memory_within_limits(build_results):
    _, results = build_results
    bad = [r for r in results if r["local"] or r["stack"] or r["shared"] > r["shared_limit"]]
    assert not bad, "\n".join(json.dumps(r) for r in bad)
