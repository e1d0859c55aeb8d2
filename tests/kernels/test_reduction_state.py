"""The weight-gradient reduction (kernels/split_reduce.py): how it splits, and that it keeps no state
between calls.

Its arrival counters belong to one forward call: allocated by the forward's launch helper, zeroed by
the forward kernel, used by that call's backward. So nothing a launch leaves behind (a stray count, an
aborted backward, another model's backward in between) can reach a later step.
"""
import torch

from fastlenet import functional as FF
from fastlenet.kernels import conv_act_pool, linear_act, split_reduce
from fastlenet.kernels.launch import poison_outputs
from fastlenet.models import LeNet5


def step_grads(model, x, target):
    model.zero_grad(set_to_none=True)
    FF.cross_entropy(model(x), target).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def batch(device, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 28, 28, generator=g).to(device),
            torch.randint(0, 10, (n,), generator=g).to(device))


def test_forward_zeroes_the_counters_it_hands_to_backward(device):
    # Inside poison_outputs the counters are allocated full of 127s: only the forward kernel's
    # zeroing makes them usable.
    x = torch.randn(3, 1, 28, 28, device=device)
    w = torch.randn(6, 1, 5, 5, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    with poison_outputs():
        y = FF.conv2d_act_pool(x, w, b, padding=2)
        h = FF.linear_act(y.flatten(1), torch.randn(10, 6 * 14 * 14, device=device, requires_grad=True))
    for out in (y, h):
        node = out.grad_fn
        while not hasattr(node, "saved_tensors"):  # linear_act's output is a view of the op's
            node = node.next_functions[0][0]
        counters = node.saved_tensors[-1]
        assert counters.dtype == torch.int32 and counters.numel() >= 1
        assert torch.equal(counters, torch.zeros_like(counters))


def test_a_corrupted_counter_of_an_earlier_step_cannot_reach_a_later_one(device, monkeypatch):
    model = LeNet5("lenet5", fused=True).to(device)
    x, target = batch(device)
    expected = step_grads(model, x, target)

    handed_out = []

    def recording(num_tiles, like, forward_rows):
        counters = split_reduce.arrival_counters(num_tiles, like, forward_rows)
        handed_out.append(counters)
        return counters

    monkeypatch.setattr(conv_act_pool, "arrival_counters", recording)
    monkeypatch.setattr(linear_act, "arrival_counters", recording)
    step_grads(model, x, target)
    assert len(handed_out) == 5  # one set per layer
    # A stray count left behind (two streams racing on shared state, an aborted launch): with shared,
    # self-re-arming counters this made every later weight gradient wrong for good.
    for counters in handed_out:
        counters += 1
    with poison_outputs():
        after = step_grads(model, x, target)
    for name in expected:
        assert torch.equal(after[name], expected[name]), name


def test_interleaved_backward_passes_of_two_models_are_exact(device):
    models = [LeNet5("lenet5", fused=True).to(device) for _ in range(2)]
    batches = [batch(device, seed=s) for s in (1, 2)]
    expected = [step_grads(m, *b) for m, b in zip(models, batches)]
    for m in models:
        m.zero_grad(set_to_none=True)
    with poison_outputs():
        losses = [FF.cross_entropy(m(x), t) for m, (x, t) in zip(models, batches)]
        losses[1].backward()
        losses[0].backward()
    for m, exp in zip(models, expected):
        for name, p in m.named_parameters():
            assert torch.equal(p.grad, exp[name]), name


def test_a_second_backward_through_the_same_graph_gives_the_same_gradient(device):
    model = LeNet5("lenet5", fused=True).to(device)
    x, target = batch(device)
    loss = FF.cross_entropy(model(x), target)
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss.backward()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, first[n]), n


def test_a_small_reduction_is_spread_over_more_shorter_programs():
    # conv1's gradient (one 16 x 32 tile, 16-row blocks): at batch 4096, 64 row blocks a program
    # already make 3,136 programs, so the fill target changes nothing; at batch 3, 64 blocks would be
    # 3 programs, so the split grows towards 512, down to 4 blocks (64 rows) a program: 37.
    def sizes(images, fill):
        return split_reduce.weight_grad_sizes(6, 25, True, images * 784, 16, 32, 16, min_blocks=64,
                                              max_split=None, fill=fill, fill_blocks=4)
    assert (sizes(4096, 512).split, sizes(4096, 512).rows_per_split) == (3136, 1024)
    assert (sizes(3, 0).split, sizes(3, 0).rows_per_split) == (3, 784)
    assert (sizes(3, 512).split, sizes(3, 512).rows_per_split, sizes(3, 512).levels) == (37, 64, 2)
    # Aiming at 512 in all: 256 images give 200,704 rows, 392 a program rounded up to 400.
    assert (sizes(256, 512).split, sizes(256, 512).rows_per_split) == (502, 400)
