"""fastlenet.functional.cross_entropy against torch.nn.functional.cross_entropy: loss, gradient,
ignore_index, and the error for an out-of-range target.

Runs the Triton kernels on the CPU through Triton's interpreter (conftest.py), or compiled on CUDA
when present. The reference is F.cross_entropy in float64; the error measure is
||out - ref|| / ||ref||. Every kernel output is poisoned (NaN, integers 127) before the launch, so
an element a kernel forgets to write fails the comparison.
"""
import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastlenet import functional as FF
from fastlenet.kernels import cross_entropy as xent
from fastlenet.kernels import launch as launch_module
from fastlenet.kernels.launch import record_launches
from fastlenet.kernels.linear_act import LOSS_COUNTER_ATTR
from fastlenet.profiling import count_device_ops
from utils import env_without_interpreter, rel_err

# Relative-error tolerances, by kernel dtype.
#  float64 (interpreter only): the reference's arithmetic in another order, ~1e-16 a term.
#  float32: the inputs are exact float32 values, so the error is the kernel's own: exp and log
#    a few ulp (6e-8) each, a row sum of up to 1000 terms in tree order about log2(1000) ulp, and
#    the batch mean as many again; ~1e-6 at worst, 1e-5 leaves a 10x margin.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}

needs_interpreter = pytest.mark.skipif(torch.cuda.is_available(),
                                       reason="float64 and the CPU error path run under the interpreter only")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float32, pytest.param(torch.float64, marks=needs_interpreter)]

# Batch 1, and batches spanning several row blocks with a partial last one, for each class count:
# the tiles (tiles(C)) are 128 x 16 for 10 classes, 16 x 128 for 100, 4 x 512 for 1000 (two class
# blocks, the second partial: the online log-sum-exp).
SHAPES = [(1, 10), (300, 10), (300, 3), (1, 100), (37, 100), (1, 1000), (9, 1000)]


pytestmark = pytest.mark.usefixtures("poisoned")


def loss_and_grad(fn, logits, target, **kwargs):
    """fn's loss and d(2.5 * loss)/dlogits: the upstream gradient is a device tensor, not 1."""
    logits = logits.detach().requires_grad_()
    loss = fn(logits, target, **kwargs)
    (loss * 2.5).backward()
    return loss.detach(), logits.grad


def compare(logits, target, dtype, **kwargs):
    """Loss and gradient of fastlenet in `dtype` vs F.cross_entropy in float64; returns both pairs."""
    loss, grad = loss_and_grad(FF.cross_entropy, logits.to(dtype), target, **kwargs)
    ref_loss, ref_grad = loss_and_grad(F.cross_entropy, logits.double(), target, **kwargs)
    assert loss.shape == () and loss.dtype == dtype and grad.dtype == dtype
    assert rel_err(loss, ref_loss) <= TOL[dtype], (loss.item(), ref_loss.item())
    assert rel_err(grad, ref_grad) <= TOL[dtype]
    return (loss, grad), (ref_loss, ref_grad)


# ---------------------------------------------------------------------------------------------
# values and gradients
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,classes", SHAPES)
def test_matches_reference(batch, classes, dtype, device):
    logits = torch.randn(batch, classes, device=device) * 3
    target = torch.randint(0, classes, (batch,), device=device)
    compare(logits, target, dtype)


def test_strided_logits_and_target(device):
    logits = torch.randn(10, 37, device=device).t()  # (37, 10), strides (1, 37)
    target = torch.randint(0, 10, (37, 2), device=device)[:, 1]  # stride 2
    compare(logits, target, torch.float32)


@pytest.mark.parametrize("ignore_index", [-100, 3, 12])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ignore_index(ignore_index, dtype, device):
    """Ignored rows (the default -100, an in-range class, a value outside [0, C)) leave the mean
    and get an exactly zero gradient; the mean divides by the rows kept."""
    batch, classes = 300, 10
    logits = torch.randn(batch, classes, device=device) * 3
    target = torch.randint(0, classes, (batch,), device=device)
    ignored = torch.rand(batch, device=device) < 0.3
    target[ignored] = ignore_index
    kwargs = {} if ignore_index == -100 else {"ignore_index": ignore_index}
    (loss, grad), _ = compare(logits, target, dtype, **kwargs)
    ignored = target == ignore_index
    assert 0 < ignored.sum() < batch
    assert (grad[ignored] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_rows_ignored(dtype, device):
    """As F.cross_entropy: the mean over no targets is NaN, and every gradient is 0."""
    logits = torch.randn(5, 10, device=device, dtype=dtype)
    target = torch.full((5,), -100, device=device)
    loss, grad = loss_and_grad(FF.cross_entropy, logits, target)
    ref_loss, ref_grad = loss_and_grad(F.cross_entropy, logits, target)
    assert torch.isnan(ref_loss) and torch.isnan(loss)
    assert (ref_grad == 0).all() and (grad == 0).all()


@needs_interpreter
@pytest.mark.parametrize("batch,classes,fast", [(3, 10, False), (5, 100, True), (3, 1000, True)])
def test_gradcheck(batch, classes, fast):
    logits = torch.randn(batch, classes, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, classes, (batch,))
    target[1] = -100
    assert torch.autograd.gradcheck(lambda z: FF.cross_entropy(z, target), (logits,), fast_mode=fast)


def test_no_grad_and_inference_mode(device):
    logits = torch.randn(4, 10, device=device)
    target = torch.randint(0, 10, (4,), device=device)
    ref = F.cross_entropy(logits.double(), target)
    with torch.inference_mode():
        assert rel_err(FF.cross_entropy(logits, target), ref) <= TOL[torch.float32]
    assert rel_err(FF.cross_entropy(logits, target), ref) <= TOL[torch.float32]


# ---------------------------------------------------------------------------------------------
# logits from fastlenet's linear layer: the forward split over row blocks (kernels/cross_entropy.py)
# ---------------------------------------------------------------------------------------------

# (batch, classes): 8 row blocks exactly (the fewest that split), 9 with a partial last one at 10
# classes; 100 classes (16-row blocks); 1000 classes (4-row blocks, two class blocks each).
SPLIT_SHAPES = [(1024, 10), (1100, 10), (130, 100), (37, 1000)]


def head_logits(batch, classes, dtype, device, features=12):
    """Logits made by fastlenet's linear layer while recording a graph, so they carry the counter
    its forward zeroed for the loss; returns (logits, the leaf tensors of the layer)."""
    x = torch.randn(batch, features, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(classes, features, device=device, dtype=dtype) * 0.8).requires_grad_()
    b = torch.randn(classes, device=device, dtype=dtype, requires_grad=True)
    return FF.linear_act(x, w, b, "identity"), (x, w, b)


def split_programs(fn):
    """The forward's grid, recorded while fn() runs."""
    with record_launches() as launches:
        out = fn()
    return out, [launch.grid for launch in launches if launch.name == "cross_entropy_fwd_kernel"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,classes", SPLIT_SHAPES)
def test_split_forward_matches_reference(batch, classes, dtype, device):
    """Several programs each sum their rows, the last to arrive sums their partials: the loss, and
    the gradients through the loss and the layer, are F.cross_entropy's (float64 reference)."""
    logits, leaves = head_logits(batch, classes, dtype, device)
    target = torch.randint(0, classes, (batch,), device=device)
    target[::5] = -100
    loss, grids = split_programs(lambda: FF.cross_entropy(logits, target))
    programs = xent.forward_split(batch, classes)[0]
    assert grids == [(programs,)] and programs >= xent.SPLIT_MIN_BLOCKS
    (loss * 2.5).backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    x, w, b = ref_leaves
    ref = F.cross_entropy(x @ w.T + b, target)
    (ref * 2.5).backward()
    assert rel_err(loss, ref) <= TOL[dtype], (loss.item(), ref.item())
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        assert rel_err(leaf.grad, ref_leaf.grad) <= TOL[dtype]


def test_split_forward_is_reproducible_and_its_counter_serves_one_call(device):
    """Bit-identical loss and gradients run to run; the counter hangs on the logits until a loss
    takes it, so a second loss over the same logits walks the batch in one program (and agrees)."""
    _, (x, w, b) = head_logits(2048, 10, torch.float32, device)
    target = torch.randint(0, 10, (2048,), device=device)
    runs = []
    for _ in range(2):
        logits = FF.linear_act(x, w, b, "identity")
        loss, grids = split_programs(lambda logits=logits: FF.cross_entropy(logits, target))
        assert grids == [(16,)]
        loss.backward()
        runs.append((loss.detach(), x.grad.clone(), w.grad.clone(), b.grad.clone()))
        x.grad = w.grad = b.grad = None
    assert all(torch.equal(a, c) for a, c in zip(*runs))
    assert not hasattr(logits, "_fastlenet_loss_counters")  # taken by the loss above
    again, grids = split_programs(lambda: FF.cross_entropy(logits, target))
    assert grids == [(1,)]
    assert rel_err(again, runs[0][0]) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_forward_all_rows_ignored(dtype, device):
    logits, _ = head_logits(1024, 10, dtype, device)
    target = torch.full((1024,), -100, device=device)
    loss, grids = split_programs(lambda: FF.cross_entropy(logits, target))
    assert grids == [(8,)] and torch.isnan(loss)


@needs_interpreter
def test_split_forward_names_the_first_bad_row_across_programs():
    """The first out-of-range row is a minimum over the programs' partials, whichever arrives last."""
    logits, _ = head_logits(1100, 10, torch.float32, "cpu")
    target = torch.randint(0, 10, (1100,))
    target[[1090, 700, 300]] = torch.tensor([-7, 10, -100])  # programs 8, 5 and 2 (128-row blocks)
    with pytest.raises(IndexError, match=r"target 10 \(row 700\)"):
        split_programs(lambda: FF.cross_entropy(logits, target))


def test_split_step_adds_no_device_operation(device, monkeypatch):
    """Linear layer + loss, forward and backward: four launches and backward's seed, nothing else
    (no memset: the counter was zeroed by the layer's forward kernel)."""
    monkeypatch.setattr(launch_module, "_poison", False)  # poisoning fills outputs: ops of its own
    _, (x, w, b) = head_logits(1024, 10, torch.float32, device)
    target = torch.randint(0, 10, (1024,), device=device)
    count = count_device_ops(lambda: torch.autograd.grad(
        FF.cross_entropy(FF.linear_act(x, w, b, "identity"), target), (x, w, b)))
    assert count.triton_launches == ["linear_act_fwd_kernel", "cross_entropy_fwd_kernel",
                                     "cross_entropy_bwd_kernel", "linear_act_bwd_kernel"], count.breakdown()
    assert count.aten_ops == ["ones_like"], count.breakdown()


# ---------------------------------------------------------------------------------------------
# launches: one each way, nothing else on the device, the forward a single program
# ---------------------------------------------------------------------------------------------

def test_one_launch_each_way_and_no_other_device_op(device, monkeypatch):
    """Over logits that carry no zeroed counter, the forward is one single-program launch (its mean
    is summed in one fixed order, so it is reproducible), the backward one launch over row blocks;
    the only other device op is the seed of backward. In particular the out-of-range check adds no
    op (on the CPU it reads a result)."""
    monkeypatch.setattr(launch_module, "_poison", False)  # poisoning fills outputs: ops of its own
    logits = torch.randn(300, 10, device=device, requires_grad=True)
    target = torch.randint(0, 10, (300,), device=device)
    count = count_device_ops(lambda: torch.autograd.grad(FF.cross_entropy(logits, target), logits))
    assert count.triton_launches == ["cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel"], count.breakdown()
    assert count.aten_ops == ["ones_like"], count.breakdown()
    with record_launches() as launches:
        FF.cross_entropy(logits, target).backward()
    assert [launch.grid for launch in launches] == [(1,), (3,)]  # backward: 300 rows in 128-row blocks


@needs_cuda
def test_bitwise_reproducible_on_cuda():
    logits = torch.randn(4096, 100, device="cuda", requires_grad=True)
    target = torch.randint(0, 100, (4096,), device="cuda")
    runs = [loss_and_grad(FF.cross_entropy, logits, target) for _ in range(3)]
    assert all(torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1]) for loss, grad in runs)
    # The split forward (logits from the linear layer): 32 programs, the last sums their partials.
    _, (x, w, b) = head_logits(4096, 100, torch.float32, "cuda")

    def split_run():
        loss = FF.cross_entropy(FF.linear_act(x, w, b, "identity"), target)
        return (loss.detach(), *torch.autograd.grad(loss, (x, w, b)))
    split = [split_run() for _ in range(3)]
    assert all(torch.equal(a, c) for run in split for a, c in zip(run, split[0]))


# ---------------------------------------------------------------------------------------------
# out-of-range targets: an error, never a silent NaN
# ---------------------------------------------------------------------------------------------

@needs_interpreter
@pytest.mark.parametrize("bad", [12, 10, -1, -101])
def test_out_of_range_target_is_an_error(bad):
    logits = torch.randn(3, 10)
    with pytest.raises(IndexError, match=rf"target {bad} \(row 1\) is out of bounds for 10 classes"):
        FF.cross_entropy(logits, torch.tensor([1, bad, 2]))


@needs_interpreter
def test_error_names_the_first_bad_row_and_follows_ignore_index():
    logits = torch.randn(300, 10)
    target = torch.randint(0, 10, (300,))
    target[[5, 200, 250]] = torch.tensor([-100, 11, -5])  # the first bad row is in the second row block
    with pytest.raises(IndexError, match=r"target 11 \(row 200\) .* ignore_index \(-100\)"):
        FF.cross_entropy(logits, target)
    target[200] = 3
    with pytest.raises(IndexError, match=r"target -100 \(row 5\) .* ignore_index \(-5\)"):
        FF.cross_entropy(logits, target, ignore_index=-5)  # -100 is only ignored by default


def test_kernel_reports_bad_rows_and_makes_them_nan(device):
    """What the error paths rest on: the forward's `rows` output is [targets kept, first row out of
    range (B if none)], and without the check or the assert the loss would still be NaN, not a
    number that looks right."""
    logits = torch.randn(300, 10, device=device)
    target = torch.randint(0, 10, (300,), device=device)
    target[[7, 8]] = -100
    loss, lse, rows = xent.cross_entropy_forward(logits, target, -100)
    assert rows.tolist() == [298, 300]
    assert rel_err(lse, torch.logsumexp(logits.double(), 1)) <= TOL[torch.float32]
    assert torch.isfinite(loss)
    if device.type == "cuda":
        return  # a bad target would fire the device-side assert: see test_device_side_assert_on_cuda
    target[[150, 260]] = torch.tensor([10, -1], device=device)
    loss, lse, rows = xent.cross_entropy_forward(logits, target, -100)
    assert rows.tolist() == [298, 150]
    assert torch.isnan(loss)


@pytest.fixture
def interpreter_debug(monkeypatch):
    """Triton's interpreter compiles tl.device_assert out whatever the kernel's debug flag (its
    builder's options say debug=False); switch it on to run the CUDA error path on the CPU."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))


@needs_interpreter
def test_device_assert_fires_for_bad_targets_only(interpreter_debug):
    from triton.runtime.errors import InterpreterError

    logits = torch.randn(300, 10)
    target = torch.randint(0, 10, (300,))
    target[[3, 299]] = -100  # ignored rows and the padding past row 300 must not trip it
    compare(logits, target, torch.float32)
    target[200] = 10
    with pytest.raises(InterpreterError, match=r"target is outside \[0, num_classes\)"):
        FF.cross_entropy(logits, target)


@pytest.mark.build
def test_forward_kernel_is_compiled_with_its_device_assert():
    """On CUDA the assert exists only in a debug build: the kernel asks for one, and compiled for
    sm_90 with that flag (as the JIT does: kwargs debug defaults to the kernel's) it holds the
    assert. Compiled in a subprocess, where TRITON_INTERPRET is unset."""
    code = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastlenet.kernels import cross_entropy as xent
from fastlenet.kernels import launch as launch_module
k = xent.cross_entropy_fwd_kernel
ptrs = dict(logits_ptr="*fp32", target_ptr="*i64", lse_ptr="*fp32", loss_ptr="*fp32", rows_ptr="*i64",
            ws_ptr="*fp64", counter_ptr="*i32", constant_logit="fp32")
meta = ("SPLIT", "HAS_CONSTANT_LOGIT", "BLOCK_B", "BLOCK_C")
sig = {name: ptrs.get(name, "i32") for name in k.arg_names if name not in meta} | dict.fromkeys(meta, "constexpr")
asserts = []
for split in (False, True):
    constexprs = {"SPLIT": split, "HAS_CONSTANT_LOGIT": split, "BLOCK_B": 128, "BLOCK_C": 16}
    compiled = triton.compile(ASTSource(k, sig, constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": xent.NUM_WARPS, "debug": k.debug})
    asserts.append("tt.assert" in compiled.asm["ttir"])
print(k.debug, *asserts)
"""
    env = env_without_interpreter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True", "True"]


@needs_cuda
def test_device_side_assert_on_cuda():
    """In a subprocess: a failed device assert leaves the CUDA context unusable."""
    code = """
import torch
from fastlenet import functional as FF
x = torch.randn(300, 10, device="cuda")
t = torch.randint(0, 10, (300,), device="cuda")
t[7] = -100
FF.cross_entropy(x, t).item()
t[200] = 12
FF.cross_entropy(x, t)
torch.cuda.synchronize()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "device-side assert triggered" in proc.stdout + proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------

def test_argument_errors(device):  # constant_logit's: test_bad_constant_logit_is_refused
    logits = torch.randn(3, 10, device=device)
    target = torch.tensor([1, 2, 3], device=device)
    with pytest.raises(ValueError, match=r"logits must be \(batch, classes\), got \(3, 10, 1\)"):
        FF.cross_entropy(logits[..., None], target)
    with pytest.raises(ValueError, match=r"target must be \(3,\) to match logits \(3, 10\), got \(2,\)"):
        FF.cross_entropy(logits, target[:2])
    with pytest.raises(TypeError, match="int64"):
        FF.cross_entropy(logits, target.int())
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        FF.cross_entropy(logits, target, ignore_index=1.0)
    with pytest.raises(ValueError, match="empty batch"):
        FF.cross_entropy(logits[:0], target[:0])


# ---------------------------------------------------------------------------------------------
# constant_logit: one more class of a fixed logit that no target names (the 1998 MAP criterion)
# ---------------------------------------------------------------------------------------------

def with_constant(constant):
    """The reference: F.cross_entropy over the logits with a column of `constant` appended."""
    def reference(logits, target, **kwargs):
        column = logits.new_full((logits.shape[0], 1), constant)
        return F.cross_entropy(torch.cat([logits, column], 1), target, **kwargs)
    return reference


def compare_constant(logits, target, dtype, constant, **kwargs):
    """compare() against the reference with the constant column."""
    loss, grad = loss_and_grad(FF.cross_entropy, logits.to(dtype), target, constant_logit=constant, **kwargs)
    ref_loss, ref_grad = loss_and_grad(with_constant(constant), logits.double(), target, **kwargs)
    assert loss.shape == () and loss.dtype == dtype and grad.shape == logits.shape and grad.dtype == dtype
    assert rel_err(loss, ref_loss) <= TOL[dtype], (loss.item(), ref_loss.item())
    assert rel_err(grad, ref_grad) <= TOL[dtype]
    return (loss, grad), (ref_loss, ref_grad)


# -0.1: the MAP criterion's -j; 0; 8.0, above most logits (the running max starts at the constant
# and mostly stays there); -7.5, below them all.
CONSTANTS = [-0.1, 0.0, 8.0, -7.5]


@pytest.mark.parametrize("constant", CONSTANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,classes", SHAPES)
def test_constant_logit_matches_reference(batch, classes, dtype, constant, device):
    logits = torch.randn(batch, classes, device=device) * 3
    target = torch.randint(0, classes, (batch,), device=device)
    (loss, _), _ = compare_constant(logits, target, dtype, constant)
    # The extra class takes probability mass: never less loss than without it.
    assert loss >= FF.cross_entropy(logits.to(dtype), target)


def test_constant_logit_changes_only_the_log_sum_exp(device):
    """The per-row log-sum-exp the forward saves includes the constant; backward reads only it."""
    logits = torch.randn(300, 10, device=device)
    target = torch.randint(0, 10, (300,), device=device)
    _, lse, rows = xent.cross_entropy_forward(logits, target, -100, constant_logit=-0.1)
    ref = torch.logsumexp(torch.cat([logits.double(), logits.new_full((300, 1), -0.1).double()], 1), 1)
    assert rel_err(lse, ref) <= TOL[torch.float32]
    assert rows.tolist() == [300, 300]


@pytest.mark.parametrize("ignore_index", [-100, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_logit_with_ignored_rows(ignore_index, dtype, device):
    batch, classes = 300, 10
    logits = torch.randn(batch, classes, device=device) * 3
    target = torch.randint(0, classes, (batch,), device=device)
    target[torch.rand(batch, device=device) < 0.3] = ignore_index
    (_, grad), _ = compare_constant(logits, target, dtype, -0.1, ignore_index=ignore_index)
    ignored = target == ignore_index
    assert 0 < ignored.sum() < batch and (grad[ignored] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,classes", SPLIT_SHAPES)
def test_constant_logit_in_the_split_forward(batch, classes, dtype, device):
    """The split forward (one program a row block over the linear layer's logits) seeds every row
    with the constant too: loss and the gradients through the layer are the reference's."""
    logits, leaves = head_logits(batch, classes, dtype, device)
    target = torch.randint(0, classes, (batch,), device=device)
    target[::5] = -100
    loss, grids = split_programs(lambda: FF.cross_entropy(logits, target, constant_logit=-0.1))
    programs = xent.forward_split(batch, classes)[0]
    assert grids == [(programs,)] and programs >= xent.SPLIT_MIN_BLOCKS
    (loss * 2.5).backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    x, w, b = ref_leaves
    ref = with_constant(-0.1)(x @ w.T + b, target)
    (ref * 2.5).backward()
    assert rel_err(loss, ref) <= TOL[dtype], (loss.item(), ref.item())
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        assert rel_err(leaf.grad, ref_leaf.grad) <= TOL[dtype]


def same_special_values(out, ref):
    """Same NaN positions, same infinities (with their signs), the rest within float32's TOL."""
    out, ref = out.double(), ref.double()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (out, ref)
    assert torch.equal(torch.isinf(out), torch.isinf(ref)) and torch.equal(out[torch.isinf(out)],
                                                                            ref[torch.isinf(ref)]), (out, ref)
    finite = torch.isfinite(ref)
    assert rel_err(out[finite], ref[finite]) <= TOL[torch.float32], (out, ref)


NAN, INF = float("nan"), float("inf")
# One special row among finite ones (its first logits; the rest finite), its target class 0: a NaN
# (the row's loss and gradient NaN); +Inf (PyTorch's log-softmax makes the whole row NaN); -Inf
# away from the target (a finite loss, zero probability there); every logit -Inf (the constant is
# the only class left: the loss is +Inf, the gradient finite); -Inf at the target (loss +Inf).
SPECIAL_ROWS = {"nan": [0.5, NAN, 1.0], "+inf": [0.5, INF, 1.0], "-inf": [0.5, -INF, 1.0],
                "all -inf": [-INF] * 10, "-inf target": [-INF, 0.5, 1.0]}


@pytest.mark.parametrize("row", SPECIAL_ROWS)
@pytest.mark.parametrize("split", [False, True], ids=["single", "split"])
def test_constant_logit_nan_and_inf_like_pytorch(row, split, device):
    batch, classes = (1100, 10) if split else (5, 10)
    logits = torch.randn(batch, classes, device=device) * 3
    special = torch.tensor(SPECIAL_ROWS[row], device=device)
    logits[2, :len(special)] = special
    target = torch.randint(0, classes, (batch,), device=device)
    target[2] = 0
    logits.requires_grad_()
    if split:  # a zeroed counter, as the linear layer hangs on its output: the forward splits
        setattr(logits, LOSS_COUNTER_ATTR, torch.zeros(1, dtype=torch.int32, device=device))
    loss, grids = split_programs(lambda: FF.cross_entropy(logits, target, constant_logit=-0.1))
    (loss * 2.5).backward()
    assert grids == [(xent.forward_split(batch, classes)[0] if split else 1,)] and (grids[0][0] > 1) == split
    ref_loss, ref_grad = loss_and_grad(with_constant(-0.1), logits.detach().double(), target)
    same_special_values(loss.detach(), ref_loss)
    same_special_values(logits.grad, ref_grad)
    if row in ("all -inf", "-inf target"):
        assert loss == INF


@needs_interpreter
@pytest.mark.parametrize("batch,classes,constant", [(3, 10, -0.1), (5, 100, 4.0), (3, 1000, -0.1)])
def test_constant_logit_gradcheck(batch, classes, constant):
    logits = torch.randn(batch, classes, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, classes, (batch,))
    target[1] = -100
    assert torch.autograd.gradcheck(lambda z: FF.cross_entropy(z, target, constant_logit=constant), (logits,),
                                    fast_mode=classes > 10)


def test_constant_logit_takes_ints_and_numpy_floats(device):
    import numpy as np

    logits = torch.randn(4, 10, device=device)
    target = torch.randint(0, 10, (4,), device=device)
    for constant in (1, np.float32(-0.5), np.float64(2.0)):
        ref = with_constant(float(constant))(logits.double(), target)
        assert rel_err(FF.cross_entropy(logits, target, constant_logit=constant), ref) <= TOL[torch.float32]


def test_bad_constant_logit_is_refused(device):
    logits = torch.randn(3, 10, device=device)
    target = torch.tensor([1, 2, 3], device=device)
    for bad in ("0.1", torch.tensor(0.1), True, [0.1], 1j):
        with pytest.raises(TypeError, match=r"constant_logit must be a float or None, got"):
            FF.cross_entropy(logits, target, constant_logit=bad)
    for bad in (NAN, INF, -INF):
        with pytest.raises(ValueError, match=rf"constant_logit must be finite, got {bad}"):
            FF.cross_entropy(logits, target, constant_logit=bad)
    with pytest.raises(TypeError, match="positional"):
        FF.cross_entropy(logits, target, -100, -0.1)  # keyword-only: never mistaken for ignore_index


def test_constant_logit_op_and_compiled(device):
    """The op's schema, fake implementation and autograd with the constant (opcheck), and under
    torch.compile the same loss and gradient as eager (the constant is traced as a constant)."""
    from fastlenet import ops

    logits = torch.randn(6, 5, device=device, requires_grad=True)
    target = torch.tensor([0, 4, -100, 2, 1, 3], device=device)
    torch.library.opcheck(ops.cross_entropy_fwd, (logits, target, -100, -0.1),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
    torch._dynamo.reset()
    step = torch.compile(lambda z: FF.cross_entropy(z, target, constant_logit=-0.1), backend="aot_eager",
                         fullgraph=True)
    got = loss_and_grad(lambda z, t: step(z), logits, target)
    want = loss_and_grad(FF.cross_entropy, logits, target, constant_logit=-0.1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    ref = loss_and_grad(with_constant(-0.1), logits.double(), target)
    assert rel_err(got[0], ref[0]) <= TOL[torch.float32] and rel_err(got[1], ref[1]) <= TOL[torch.float32]


def test_constant_logit_under_autocast(device):
    """Under autocast the loss runs in float32 as F.cross_entropy does, constant included."""
    logits = torch.randn(8, 10, device=device).half()
    target = torch.randint(0, 10, (8,), device=device)
    with torch.autocast(device.type, dtype=torch.float16):
        loss = FF.cross_entropy(logits, target, constant_logit=-0.1)
    assert loss.dtype == torch.float32
    assert rel_err(loss, with_constant(-0.1)(logits.double(), target)) <= TOL[torch.float32]
