"""bench/device_times.py without a GPU: one line and status 2; and its labelling of a step's kernels
(the part a GPU run depends on to set each measured kernel beside the timing model's prediction)."""
import subprocess
import sys

import pytest

from utils import REPO, env_without_interpreter, load_script

SCRIPT = REPO / "bench" / "device_times.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


def test_without_a_gpu_it_says_so_in_one_line(bench):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--batch-sizes", "8"], capture_output=True, text=True,
                          env=env_without_interpreter(), timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "CUDA GPU" in proc.stderr


TRAIN = (["conv2d_act_pool_fwd_kernel"] * 2 + ["linear_act_fwd_kernel"] * 3 + ["cross_entropy_fwd_kernel",
         "void at::native::vectorized_elementwise_kernel<ones_like>", "cross_entropy_bwd_kernel"]
         + ["linear_act_bwd_kernel"] * 3 + ["conv2d_act_pool_dz_kernel", "conv2d_act_pool_dx_kernel"]
         + ["conv2d_act_pool_bwd_kernel"] * 2
         + ["void at::native::multi_tensor_apply_kernel<foreach_add>", "void at::native::fused_adam"])


def test_a_training_steps_kernels_take_the_reports_labels_in_order(bench):
    labels = bench.label_kernels(TRAIN, "train")
    assert [lbl for lbl in labels if lbl] == bench.launch_labels("train")
    assert labels[TRAIN.index("conv2d_act_pool_bwd_kernel")] == "conv2 backward"  # the first one launched
    assert labels[TRAIN.index("conv2d_act_pool_dz_kernel")] == "conv2 backward dz"  # conv1's input needs none
    assert labels[TRAIN.index("conv2d_act_pool_dx_kernel")] == "conv2 backward dx"
    assert labels[6] is None and labels[-1] is None  # ATen's kernels have no label


def test_a_sequence_that_is_not_the_step_is_refused(bench):
    with pytest.raises(ValueError, match="where the step launches"):
        bench.label_kernels(["linear_act_fwd_kernel", *TRAIN[1:]], "train")
    with pytest.raises(ValueError, match="of its 14 Triton kernels"):
        bench.label_kernels(TRAIN[:5], "train")


def test_per_step_times_are_the_mean_over_identical_steps(bench):
    names = TRAIN[:5]
    events = [(n, float(i + 10 * s)) for s in range(3) for i, n in enumerate(names)]
    kernels = bench.per_step_kernels(events, 3, "inference", fastlenet=True)
    assert [k["label"] for k in kernels] == bench.launch_labels("inference")
    assert [k["device_us"] for k in kernels] == [10.0, 11.0, 12.0, 13.0, 14.0]
    with pytest.raises(ValueError, match="different kernels"):
        bench.per_step_kernels(events[:-1] + [("other", 1.0)], 3, "inference", fastlenet=True)
