"""fastlenet.functional.rbf_scores (and fastlenet.nn.RBFScores) against the PyTorch composition
-(x[:, None, :] - P).pow(2).sum(-1): scores, grad input, NaN and Inf, the op's registration, and
the errors for bad input.

Runs the Triton kernels on the CPU through Triton's interpreter (conftest.py), or compiled on CUDA
when present. The reference is computed in float64; the error measure is ||out - ref|| / ||ref||.
Every kernel output is poisoned (NaN) before the launch, so an element a kernel forgets to write
fails the comparison.
"""
import pytest
import torch

from fastlenet import functional as FF
from fastlenet import ops
from fastlenet.kernels import rbf_scores as rbf
from fastlenet.kernels.accounting import work
from fastlenet.kernels.launch import describe, record_launches
from fastlenet.nn import RBFScores
from utils import rel_err

# Relative-error tolerances, by kernel dtype. The kernel computes 2 x.P - ||x||^2 - ||P||^2: each of
# the three is a sum of F products, rounded relative to its own size, and the inputs are random
# normals, for which |x.P| and the norms are about the size of the distance ||x - P||^2 itself.
#  float64 (interpreter only): ~1e-16 a term; 1e-12 is tight.
#  float32: a few ulp (6e-8) of the norms per element at F <= 130 (sums in blocks of 32, then 5
#    blocks), ~2e-7 relative in the worst case, 4e-8 to 6e-8 measured; 1e-5 leaves a 50x margin
#    for inputs whose norms exceed their distance several times.
#  float16 (storage; arithmetic in float32): the inputs are float16 values, so the error is the
#    rounding of each stored result, 2^-11 = 4.9e-4 relative; 1e-3.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3}

needs_interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="float64 runs under the interpreter only")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.float64, marks=needs_interpreter)]

pytestmark = pytest.mark.usefixtures("poisoned")


def reference(x, prototypes):
    return -(x[:, None, :] - prototypes).pow(2).sum(-1)


def scores_and_grad(fn, x, prototypes, g):
    """fn's scores and dL/dx for the upstream gradient g."""
    x = x.detach().requires_grad_()
    scores = fn(x, prototypes)
    scores.backward(g)
    return scores.detach(), x.grad


def compare(x, prototypes, dtype):
    """Scores and dx in `dtype` vs the reference in float64 (same values: x and P made `dtype` first)."""
    x, prototypes = x.to(dtype), prototypes.to(dtype)
    g = torch.randn(x.shape[0], prototypes.shape[0], device=x.device).to(dtype)
    scores, dx = scores_and_grad(FF.rbf_scores, x, prototypes, g)
    ref, ref_dx = scores_and_grad(reference, x.double(), prototypes.double(), g.double())
    assert scores.shape == ref.shape and scores.dtype == dtype and dx.dtype == dtype
    assert rel_err(scores, ref) <= TOL[dtype]
    assert rel_err(dx, ref_dx) <= TOL[dtype]
    return scores, dx


# ---------------------------------------------------------------------------------------------
# values and gradients
# ---------------------------------------------------------------------------------------------

# F = 84 (LeNet's), 5 (less than one 16-wide tile), 130 (five feature blocks, the last partial);
# C = 10 (LeNet's), 3, 17 (a 32-wide class tile); B = 1, 37 (a partial row block), 300 (ten).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [10, 3, 17])
@pytest.mark.parametrize("features", [84, 5, 130])
@pytest.mark.parametrize("batch", [1, 37, 300])
def test_matches_reference(batch, features, classes, dtype, device):
    x = torch.randn(batch, features, device=device)
    prototypes = torch.randn(classes, features, device=device)
    compare(x, prototypes, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lenet_prototypes(dtype, device):
    """The 1998 network's case: scaled-tanh outputs in (-1.7159, 1.7159) against +-1 bitmaps."""
    x = 1.7159 * torch.tanh(torch.randn(128, 84, device=device) * 2)
    prototypes = torch.randint(0, 2, (10, 84), device=device).float() * 2 - 1
    compare(x, prototypes, dtype)


def test_many_classes_take_several_tiles(device):
    """More classes than one tile (MAX_BLOCK_C): forward over two class tiles, backward two steps."""
    classes = rbf.MAX_BLOCK_C + 9
    x = torch.randn(40, 20, device=device)
    prototypes = torch.randn(classes, 20, device=device)
    with record_launches() as launches:
        compare(x, prototypes, torch.float32)
    assert [launch.grid for launch in launches] == [(2, 2), (2, 1)]


def test_strided_inputs(device):
    x = torch.randn(84, 37, device=device).t()  # (37, 84), strides (1, 37)
    prototypes = torch.randn(10, 168, device=device)[:, ::2]  # (10, 84), strides (168, 2)
    assert not x.is_contiguous() and not prototypes.is_contiguous()
    compare(x, prototypes, torch.float32)


def test_scores_are_largest_at_the_nearest_prototype(device):
    prototypes = torch.randint(0, 2, (10, 84), device=device).float() * 2 - 1
    x = prototypes[[3, 7, 0]] + 0.1 * torch.randn(3, 84, device=device)
    assert FF.rbf_scores(x, prototypes).argmax(1).tolist() == [3, 7, 0]
    assert (FF.rbf_scores(prototypes, prototypes).diagonal().abs() <= 1e-5).all()  # distance 0 to itself


@needs_interpreter
@pytest.mark.parametrize("batch,features,classes", [(3, 5, 3), (4, 84, 10), (2, 37, 17)])
def test_gradcheck(batch, features, classes):
    x = torch.randn(batch, features, dtype=torch.float64, requires_grad=True)
    prototypes = torch.randn(classes, features, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: FF.rbf_scores(t, prototypes), (x,))


def test_deterministic(device):
    """Every element is one program's fixed-order sum: two runs agree bit for bit."""
    x = torch.randn(300, 84, device=device)
    prototypes = torch.randn(10, 84, device=device)
    g = torch.randn(300, 10, device=device)
    first, second = (scores_and_grad(FF.rbf_scores, x, prototypes, g) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_one_launch_each_way(device):
    x = torch.randn(300, 84, device=device, requires_grad=True)
    prototypes = torch.randn(10, 84, device=device)
    with record_launches() as launches:
        FF.rbf_scores(x, prototypes).sum().backward()
    assert [(launch.name, launch.grid) for launch in launches] == [
        ("rbf_scores_fwd_kernel", (10, 1)), ("rbf_scores_bwd_kernel", (10, 3))]  # 32-row, 32-feature blocks


def test_no_grad_and_inference_mode(device):
    x = torch.randn(5, 84, device=device, requires_grad=True)
    prototypes = torch.randn(10, 84, device=device)
    ref = reference(x.detach().double(), prototypes.double())
    with torch.inference_mode():
        assert rel_err(FF.rbf_scores(x, prototypes), ref) <= TOL[torch.float32]
    with torch.no_grad():
        out = FF.rbf_scores(x, prototypes)
    assert not out.requires_grad and rel_err(out, ref) <= TOL[torch.float32]


# ---------------------------------------------------------------------------------------------
# NaN and Inf, as the reference
# ---------------------------------------------------------------------------------------------

def assert_same_special_values(out, ref, what, tol):
    out, ref = out.double(), ref.double()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (what, "NaN positions differ", out, ref)
    assert torch.equal(torch.isinf(out), torch.isinf(ref)), (what, "Inf positions differ", out, ref)
    assert torch.equal(out[torch.isinf(out)], ref[torch.isinf(ref)]), (what, "Inf signs differ")
    finite = torch.isfinite(ref)
    assert rel_err(out[finite], ref[finite]) <= tol, what


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_like_pytorch(dtype, device):
    """A NaN makes its row's scores NaN; an infinite feature makes them -Inf (the expanded form alone
    would give inf - inf); a row with both, NaN. Grad input: NaN at a NaN, and at an infinite x
    NaN unless the row's upstream gradients share one sign (then +-Inf), as the reference's sum of
    -2 g_i (x - P_i); the row's other features stay finite."""
    x = torch.randn(8, 84, device=device)
    x[1, 3] = NAN
    x[2, 5] = INF
    x[3, 0] = -INF
    x[4, 7], x[4, 8] = INF, -INF
    x[5, 2], x[5, 9] = INF, NAN
    x[6, 1] = INF
    x[7, 4] = -INF
    prototypes = torch.randint(0, 2, (10, 84), device=device).float() * 2 - 1
    prototypes[4, 5] = 0.0  # inf * 0 in the dot: still -Inf
    x, prototypes = x.to(dtype), prototypes.to(dtype)
    g = torch.randn(8, 10, device=device).to(dtype)
    g[6] = g[6].abs() + 0.1  # one sign: dx = -Inf at the +Inf
    g[7] = -g[7].abs() - 0.1  # one sign: dx = -Inf at the -Inf
    g[3, 4] = 0.0  # a zero: 0 * inf, NaN
    scores, dx = scores_and_grad(FF.rbf_scores, x, prototypes, g)
    ref, ref_dx = scores_and_grad(reference, x.double(), prototypes.double(), g.double())
    assert ref[[2, 3, 4, 6, 7]].eq(-INF).all() and ref[[1, 5]].isnan().all()
    assert ref_dx[6, 1] == -INF and ref_dx[7, 4] == -INF and ref_dx[[2, 3], [5, 0]].isnan().all()
    assert_same_special_values(scores, ref, "scores", TOL[dtype])
    assert_same_special_values(dx, ref_dx, "grad input", TOL[dtype])


# ---------------------------------------------------------------------------------------------
# the op, the module, the accounting
# ---------------------------------------------------------------------------------------------

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck(device):
    x = torch.randn(5, 9, device=device, requires_grad=True)
    prototypes = torch.randn(4, 9, device=device)
    torch.library.opcheck(ops.rbf_scores_fwd, (x, prototypes), test_utils=OPCHECK_TESTS)
    g = torch.randn(5, 4, device=device)
    torch.library.opcheck(ops.rbf_scores_bwd, (g, x.detach(), prototypes), test_utils=OPCHECK_TESTS)


class _Head(torch.nn.Module):
    """A linear layer with tanh into the RBF units, as the 1998 network's F6 and output."""

    def __init__(self, device):
        super().__init__()
        from fastlenet.nn import LinearAct

        self.f6 = LinearAct(12, 84, activation="tanh").to(device)
        self.output = RBFScores(torch.randint(0, 2, (10, 84), device=device).float() * 2 - 1)

    def forward(self, x):
        return self.output(self.f6(x))


def _loss(model, x, target):
    return FF.cross_entropy(model(x), target, constant_logit=-0.1)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_trains_as_eager(backend, device):
    torch._dynamo.reset()
    model, twin = _Head(device), _Head(device)
    twin.load_state_dict(model.state_dict())
    batches = [(torch.randn(6, 12, device=device), torch.randint(0, 10, (6,), device=device)) for _ in range(2)]
    step = torch.compile(_loss, backend=backend, fullgraph=True)
    for x, target in batches:
        for m, fn in ((model, _loss), (twin, step)):
            m.zero_grad(set_to_none=True)
            fn(m, x, target).backward()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    explained = torch._dynamo.explain(_loss)(model, *batches[0])
    assert explained.graph_break_count == 0
    targets = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
    assert "fastlenet.rbf_scores_fwd.default" in targets, targets


def test_autocast_runs_in_the_region_dtype(device):
    """As the linear layer: float32 input and prototypes computed in the autocast dtype."""
    x = torch.randn(6, 84, device=device, requires_grad=True)
    prototypes = torch.randn(10, 84, device=device)
    with torch.autocast(device.type, dtype=torch.float16):
        scores = FF.rbf_scores(x, prototypes)
    assert scores.dtype == torch.float16
    ref = reference(x.detach().half().double(), prototypes.half().double())
    assert rel_err(scores, ref) <= TOL[torch.float16]
    scores.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_module(device):
    prototypes = torch.randint(0, 2, (10, 84), device=device).float() * 2 - 1
    module = RBFScores(prototypes)
    assert repr(module) == "RBFScores(classes=10, features=84)"
    assert list(module.state_dict()) == ["prototypes"] and list(module.parameters()) == []
    prototypes[0, 0] = 5.0  # the module keeps its own copy
    assert module.prototypes[0, 0] != 5.0
    x = torch.randn(7, 84, device=device, requires_grad=True)
    out = module(x)
    assert rel_err(out, reference(x.detach().double(), module.prototypes.double())) <= TOL[torch.float32]
    out.sum().backward()
    assert x.grad is not None and module.prototypes.grad is None
    assert module.double().prototypes.dtype == torch.float64  # a buffer: .to() moves it
    with pytest.raises(ValueError, match=r"prototypes must be a floating-point tensor \[classes, features\]"):
        RBFScores(torch.ones(84))
    with pytest.raises(ValueError, match="floating-point"):
        RBFScores(torch.ones(10, 84, dtype=torch.int64))


def test_module_loads_the_reference_state_dict(device):
    lenet1998 = pytest.importorskip("fastlenet.lenet1998")
    stock = lenet1998.RBFOutput(lenet1998.PROTOTYPES).to(device)
    fused = RBFScores(torch.zeros_like(stock.prototypes))
    fused.load_state_dict(stock.state_dict())
    x = torch.randn(5, stock.prototypes.shape[1], device=device)
    assert rel_err(fused(x), stock(x).double()) <= TOL[torch.float32]


def test_accounting(device):
    x = torch.randn(300, 84, device=device, requires_grad=True)
    prototypes = torch.randn(10, 84, device=device)
    with record_launches(execute=False) as launches:
        FF.rbf_scores(x, prototypes).sum().backward()
    fwd, bwd = (work(describe(launch)) for launch in launches if launch.name.startswith("rbf_scores"))
    useful = 2 * 300 * 10 * 84
    (job,) = fwd.jobs
    assert (job.programs, job.useful, job.tile) == (10, useful, (32, 16))
    assert job.executed == 10 * 2 * 32 * 16 * 96  # 84 features in 3 steps of 32
    assert set(fwd.reads) == {"x_ptr", "p_ptr"} and fwd.writes == {"s_ptr": 300 * 10 * 4}
    (job,) = bwd.jobs
    assert (job.programs, job.useful, job.tile) == (30, useful, (32, 32))
    assert job.executed == 30 * 2 * 32 * 32 * 16  # 10 classes padded to 16
    assert bwd.reads["g_ptr"] == 300 * 10 * 4 and bwd.writes == {"dx_ptr": 300 * 84 * 4}


# ---------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------

def test_argument_errors(device):
    x = torch.randn(3, 84, device=device)
    prototypes = torch.randn(10, 84, device=device)
    with pytest.raises(ValueError, match=r"input must be \(batch, features\), got \(3, 84, 1\)"):
        FF.rbf_scores(x[..., None], prototypes)
    with pytest.raises(ValueError, match=r"input must be \(batch, features\), got \(84,\)"):
        FF.rbf_scores(x[0], prototypes)
    with pytest.raises(ValueError, match=r"prototypes must be \(classes, features\) .*, got \(84,\)"):
        FF.rbf_scores(x, prototypes[0])
    with pytest.raises(ValueError, match=r"prototypes must be .*, got \(0, 84\)"):
        FF.rbf_scores(x, prototypes[:0])
    with pytest.raises(ValueError, match=r"input \(3, 84\) has 84 features but prototypes \(10, 80\) have 80"):
        FF.rbf_scores(x, prototypes[:, :80])
    with pytest.raises(TypeError, match="prototypes must be a tensor"):
        FF.rbf_scores(x, [[1.0] * 84])
    with pytest.raises(TypeError, match=r"input and prototypes must share one dtype, got input torch.float32, "
                                        r"prototypes torch.float16"):
        FF.rbf_scores(x, prototypes.half())
    with pytest.raises(TypeError, match=r"input has dtype torch.int64"):
        FF.rbf_scores(x.long(), prototypes.long())
    with pytest.raises(ValueError, match=r"the prototypes are fixed and get no gradient.*prototypes.detach\(\)"):
        FF.rbf_scores(x, prototypes.requires_grad_())
    with pytest.raises(ValueError, match="the prototypes are fixed"):
        FF.rbf_scores(x, torch.nn.Parameter(prototypes.detach()))


def test_devices_must_match(device):
    x = torch.randn(3, 84, device=device)
    with pytest.raises(RuntimeError, match=r"all tensors must be on one device, got input on .*, prototypes on meta"):
        FF.rbf_scores(x, torch.randn(10, 84, device="meta"))
