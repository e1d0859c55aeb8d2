"""bench/host_overhead.py runs and writes its schema; the launch helpers' caches never serve a stale
plan when shapes, dtypes or settings change between calls."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastlenet import functional as FF
from fastlenet.kernels.launch import interpreting, record_launches

from utils import REPO


@pytest.mark.skipif(not interpreting(), reason="the bench runs under TRITON_INTERPRET=1")
def test_bench_smoke(tmp_path):
    out = tmp_path / "host.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "host_overhead.py"), "--batch", "4",
                          "--repeats", "3", "--warmup", "1", "--adam", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "NOT included" in run.stdout and "launcher" in run.stdout
    res = json.loads(out.read_text())
    assert res["batch"] == 4 and res["adam"] is True
    assert res["fused"]["launches_per_step"] == 14
    for key in ("fused", "pytorch_floor", "eager_cpu_batch1", "eager_cpu"):
        for stat in ("us_per_step_median", "us_per_step_p10", "us_per_step_p90", "repeats"):
            assert stat in res[key]
    assert res["fused"]["us_per_launch_median"] > 0
    assert isinstance(res["fastlenet_own_us_per_step"], float)
    assert {"machine", "versions", "date", "left_out"} <= set(res)
    assert {"torch", "triton"} <= set(res["versions"])


def test_help_says_what_is_left_out():
    run = subprocess.run([sys.executable, str(REPO / "bench" / "host_overhead.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0
    assert "launcher" in run.stdout and "device time" in run.stdout


def _conv_ref(x, w, b, padding):
    return F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=padding)), 2)


def test_conv_cache_follows_shape_changes(device):
    """Same layer, batch 2 then 3 then 2, then another image size and padding: every call matches
    PyTorch forward and backward, so no cached grid, block size or plan outlives its shape."""
    w = torch.randn(6, 3, 5, 5, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    for n, hw, padding in [(2, 12, 2), (3, 12, 2), (2, 12, 2), (2, 10, 0), (3, 12, 2)]:
        x = torch.randn(n, 3, hw, hw, device=device, requires_grad=True)
        with record_launches() as launches:
            y = FF.conv2d_act_pool(x, w, b, padding=padding)
            g = torch.randn_like(y)
            dx, dw, db = torch.autograd.grad(y, (x, w, b), g)
        assert launches[0].grid[0] > 0 and launches[0].args["N"] == n and launches[1].args["N"] == n
        ref = _conv_ref(x, w, b, padding)
        rdx, rdw, rdb = torch.autograd.grad(ref, (x, w, b), g)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        for got, want in ((dx, rdx), (dw, rdw), (db, rdb)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_linear_and_loss_cache_follow_shape_changes(device):
    w = torch.randn(7, 5, device=device, requires_grad=True)
    b = torch.randn(7, device=device, requires_grad=True)
    for n in (2, 3, 2, 33, 2):
        x = torch.randn(n, 5, device=device, requires_grad=True)
        t = torch.randint(0, 7, (n,), device=device)
        loss = FF.cross_entropy(FF.linear_act(x, w, b, "tanh"), t)
        ref = F.cross_entropy(torch.tanh(F.linear(x, w, b)), t)
        grads = torch.autograd.grad(loss, (x, w, b))
        rgrads = torch.autograd.grad(ref, (x, w, b))
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, rgrads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_checks_still_run_on_cached_configurations(device):
    """A configuration already seen must still reject a bad input."""
    w = torch.randn(6, 3, 5, 5, device=device)
    x = torch.randn(2, 3, 12, 12, device=device)
    FF.conv2d_act_pool(x, w, None, padding=2)
    with pytest.raises(ValueError, match="channels"):
        FF.conv2d_act_pool(torch.randn(2, 4, 12, 12, device=device), w, None, padding=2)
    with pytest.raises(TypeError, match="dtype"):
        FF.conv2d_act_pool(x.to(torch.float16), w, None, padding=2)
    logits = torch.randn(4, 10, device=device)
    FF.cross_entropy(logits, torch.tensor([1, 2, 3, 4], device=device))
    if device.type == "cpu":
        with pytest.raises(IndexError, match="out of"):
            FF.cross_entropy(logits, torch.tensor([1, 2, 30, 4], device=device))
    with pytest.raises(TypeError, match="int64"):
        FF.cross_entropy(logits, torch.tensor([1, 2, 3, 4], device=device, dtype=torch.int32))
