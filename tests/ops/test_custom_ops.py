"""The fused layers as torch.library custom ops (fastlenet/ops.py): schema, fake implementations and
autograd registration checked by torch.library.opcheck, and torch.compile tracing a model built from
fastlenet's layers without a graph break, training as the uncompiled model does.

Small shapes: every op call runs its kernel through Triton's interpreter on the CPU.
"""
import pytest
import torch
from torch import nn

from fastlenet import functional as FF
from fastlenet import ops
from fastlenet.nn import ConvActPool2d, LinearAct

# opcheck's test utilities: the schema (mutations, aliasing), the fake implementation against the
# real one (shapes, dtypes, strides), autograd registration, and AOT dispatch with dynamic shapes.
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _conv_inputs(device, bias=True, requires_grad=True):
    x = torch.randn(2, 3, 7, 6, device=device, requires_grad=requires_grad)
    w = torch.randn(5, 3, 3, 3, device=device, requires_grad=requires_grad)
    b = torch.randn(5, device=device, requires_grad=requires_grad) if bias else None
    return x, w, b


@pytest.mark.parametrize("activation,pool,bias", [("relu", "max", True), ("tanh", "avg", True),
                                                  ("identity", "avg", False), ("sigmoid", None, True)])
def test_opcheck_conv2d_act_pool(activation, pool, bias, device):
    x, w, b = _conv_inputs(device, bias)
    # save=False is what functional passes when no gradient is wanted: inputs without grad.
    torch.library.opcheck(ops.conv2d_act_pool_fwd, (x, w, b, 1, activation, pool, True), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(ops.conv2d_act_pool_fwd, (*_conv_inputs(device, bias, False), 1, activation, pool,
                                                    False), test_utils=OPCHECK_TESTS)
    y, win, prepool, counters = ops.conv2d_act_pool_fwd(x, w, b, 1, activation, pool, True)
    g = torch.randn_like(y)
    for need_dx, need_dw in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(ops.conv2d_act_pool_bwd,
                              (g, x.detach(), w.detach(), y.detach(), win, prepool.detach(), counters, 1,
                               activation, pool, bias, need_dx, need_dw),
                              test_utils=OPCHECK_TESTS)


def test_opcheck_conv2d_act_pool_with_subsampling_and_connections(device):
    """The 1998 LeNet-5's settings: a connection table and trainable subsampling, whose two
    Parameters are inputs of the op with gradients of their own."""
    x, w, b = _conv_inputs(device)
    connections = torch.rand(5, 3, device=device) < 0.6
    pw = torch.randn(5, device=device, requires_grad=True)
    pb = torch.randn(5, device=device, requires_grad=True)
    args = (x, w, b, 1, "scaled_tanh", "subsample", True, connections, pw, pb, "scaled_tanh")
    torch.library.opcheck(ops.conv2d_act_pool_fwd, args, test_utils=OPCHECK_TESTS)
    y, win, prepool, counters = ops.conv2d_act_pool_fwd(*args)
    g = torch.randn_like(y)
    for need_dx, need_dw in ((True, True), (True, False)):
        torch.library.opcheck(ops.conv2d_act_pool_bwd,
                              (g, x.detach(), w.detach(), y.detach(), win, prepool.detach(), counters, 1,
                               "scaled_tanh", "subsample", True, need_dx, need_dw, connections, pw.detach(),
                               "scaled_tanh"),
                              test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("activation,bias", [("relu", True), ("sigmoid", False)])
def test_opcheck_linear_act(activation, bias, device):
    x = torch.randn(5, 9, device=device, requires_grad=True)
    w = torch.randn(4, 9, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True) if bias else None
    torch.library.opcheck(ops.linear_act_fwd, (x, w, b, activation, True), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(ops.linear_act_fwd, (x.detach(), w.detach(), None if b is None else b.detach(),
                                               activation, False), test_utils=OPCHECK_TESTS)
    y, counters = ops.linear_act_fwd(x, w, b, activation, True)
    g = torch.randn_like(y)
    for need_dx, need_dw in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(ops.linear_act_bwd, (g, x.detach(), w.detach(), y.detach(), counters, activation,
                                                   bias, need_dx, need_dw), test_utils=OPCHECK_TESTS)


def test_opcheck_cross_entropy(device):
    logits = torch.randn(6, 5, device=device, requires_grad=True)
    target = torch.tensor([0, 4, -100, 2, 1, 3], device=device)
    torch.library.opcheck(ops.cross_entropy_fwd, (logits, target, -100), test_utils=OPCHECK_TESTS)
    loss, lse, rows = ops.cross_entropy_fwd(logits, target, -100)
    seed = torch.ones_like(loss).detach()
    torch.library.opcheck(ops.cross_entropy_bwd, (seed, logits.detach(), target, lse.detach(), rows, -100),
                          test_utils=OPCHECK_TESTS)


def test_fake_tensors_get_the_real_shapes_dtypes_and_strides(device):
    """Under FakeTensorMode no kernel runs, and every output looks like the real one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, b = _conv_inputs(device)
    real = ops.conv2d_act_pool_fwd(x, w, b, 1, "relu", "max", True)
    with FakeTensorMode() as mode:
        fake = ops.conv2d_act_pool_fwd(mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b), 1, "relu",
                                       "max", True)
    for r, f in zip(real, fake):
        assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride())


class SmallNet(nn.Module):
    """Not LeNet-5: a conv without pooling, a conv with max pooling, a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = ConvActPool2d(3, 6, 3, padding=1, activation="tanh", pool=None)
        self.conv2 = ConvActPool2d(6, 5, 3, padding=0, activation="relu", pool="max")
        self.fc = LinearAct(5 * 3 * 3, 7, activation="identity")

    def forward(self, x):
        return self.fc(self.conv2(self.conv1(x)).flatten(1))


def _loss(model, x, target):
    return FF.cross_entropy(model(x), target)


def _train(model, step, batches):
    """Losses and, after each step, the gradients of a few SGD steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, grads = [], []
    for x, target in batches:
        opt.zero_grad(set_to_none=True)
        loss = step(model, x, target)
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        opt.step()
    return losses, grads


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_model_trains_as_the_uncompiled_one(backend, device):
    torch._dynamo.reset()
    model = SmallNet().to(device)
    twin = SmallNet().to(device)
    twin.load_state_dict(model.state_dict())
    batches = [(torch.randn(3, 3, 9, 9, device=device), torch.randint(0, 7, (3,), device=device))
               for _ in range(3)]
    want_losses, want_grads = _train(model, _loss, batches)
    got_losses, got_grads = _train(twin, torch.compile(_loss, backend=backend, fullgraph=True), batches)
    for got, want in zip(got_losses, want_losses):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(got_grads, want_grads):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_fused_step_compiles_to_one_graph_with_the_fused_ops(device):
    torch._dynamo.reset()
    model = SmallNet().to(device)
    x, target = torch.randn(2, 3, 9, 9, device=device), torch.randint(0, 7, (2,), device=device)
    explained = torch._dynamo.explain(_loss)(model, x, target)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    targets = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
    assert {"fastlenet.conv2d_act_pool_fwd.default", "fastlenet.linear_act_fwd.default",
            "fastlenet.cross_entropy_fwd.default"} <= targets, targets


def test_bad_input_under_compile_gives_the_same_error(device):
    """Validation is traced: a bad shape raises the eager message. With fullgraph=True Dynamo wraps
    it (an exception is a graph break to it), and the message is still in what it raises."""
    torch._dynamo.reset()
    w = torch.randn(6, 3, 5, 5, device=device)
    message = r"input has 4 channels \(shape \(2, 4, 12, 12\)\) but weight \(6, 3, 5, 5\) expects 3"
    bad = torch.randn(2, 4, 12, 12, device=device)
    with pytest.raises(ValueError, match=message):
        torch.compile(lambda x: FF.conv2d_act_pool(x, w, None, padding=2), backend="eager")(bad)
    with pytest.raises(Exception, match=message):
        torch.compile(lambda x: FF.conv2d_act_pool(x, w, None, padding=2), backend="eager", fullgraph=True)(bad)
