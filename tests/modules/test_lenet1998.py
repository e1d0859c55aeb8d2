"""LeNet-5 as published in 1998 (fastlenet.lenet1998), the stock reference: its structure and
parameter counts against the paper, Table I, the masked C3 weights, the RBF output, the MAP loss,
the paper's initialisation, the input scaling, and the prototype picture."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastlenet import data, engine, lenet1998, plots
from fastlenet.lenet1998 import (BACKGROUND, CONNECTIONS, INK, MAP_J, PROTOTYPES, ConnectedConv2d, LeNet5_1998,
                                 RBFOutput, ScaledTanh, Subsampling2d, map_loss)
from fastlenet.engine import input_normalization
from fastlenet.models import build_model, num_parameters

# The paper's trainable parameters per layer (section II.B), and the output's none (fixed prototypes).
PAPER_COUNTS = {"c1": 156, "s2": 12, "c3": 1516, "s4": 32, "c5": 48120, "f6": 10164, "output": 0}

# Table I, written out as the paper prints it: the s2 maps each c3 map sees.
TABLE_I = [{0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {3, 4, 5}, {0, 4, 5}, {0, 1, 5},
           {0, 1, 2, 3}, {1, 2, 3, 4}, {2, 3, 4, 5}, {0, 3, 4, 5}, {0, 1, 4, 5}, {0, 1, 2, 5},
           {0, 1, 3, 4}, {1, 2, 4, 5}, {0, 2, 3, 5}, {0, 1, 2, 3, 4, 5}]


def test_structure_is_the_papers():
    model = LeNet5_1998()
    kinds = {"c1": nn.Conv2d, "s2": Subsampling2d, "c3": ConnectedConv2d, "s4": Subsampling2d, "c5": nn.Conv2d,
             "f6": nn.Linear, "output": RBFOutput}
    expected = [name for layer in kinds for name in (layer, f"{layer}_act")][:-1]  # no activation after the output
    assert [name for name, _ in model.named_children()] == expected
    for name, module in model.named_children():
        assert isinstance(module, ScaledTanh if name.endswith("_act") else kinds[name]), name
    c1 = model.c1
    assert (c1.in_channels, c1.out_channels, c1.kernel_size, c1.padding) == (1, 6, (5, 5), (0, 0))
    assert (model.c3.in_channels, model.c3.out_channels) == (6, 16) and model.s4.channels == 16
    assert (model.c5.in_channels, model.c5.out_channels, model.f6.out_features) == (16, 120, 84)
    # The paper's map sizes: 32 -> 28 -> 14 -> 10 -> 5 -> 1.
    sizes, x = [], F.pad(torch.randn(2, 1, 28, 28), (2, 2, 2, 2))
    for name in ("c1", "s2", "c3", "s4", "c5"):
        x = getattr(model, name)(x)
        sizes.append(tuple(x.shape[1:]))
    assert sizes == [(6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5), (120, 1, 1)]


def test_parameter_counts_are_the_papers_layer_by_layer():
    model = LeNet5_1998()
    assert {name: num_parameters(getattr(model, name)) for name in PAPER_COUNTS} == PAPER_COUNTS
    assert num_parameters(model) == num_parameters(build_model("lenet5-1998")) == 60_000
    assert model.c3.masked_parameters() == (96 - 60) * 25
    assert "output.prototypes" in model.state_dict() and "output.prototypes" not in dict(model.named_parameters())


def test_connections_are_table_one():
    assert CONNECTIONS.dtype == torch.bool and CONNECTIONS.shape == (16, 6)
    assert [set(row.nonzero().flatten().tolist()) for row in CONNECTIONS] == TABLE_I
    assert int(CONNECTIONS.sum()) == 60
    assert torch.equal(LeNet5_1998().c3.connections, CONNECTIONS)


def test_masked_weights_stay_zero_and_get_no_gradient():
    model = LeNet5_1998()
    absent = ~model.c3.connections[:, :, None, None].expand_as(model.c3.weight)
    assert torch.all(model.c3.weight[absent] == 0) and torch.all(model.c3.weight[~absent] != 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        map_loss(model(x), y).backward()
        assert torch.all(model.c3.weight.grad[absent] == 0)
        assert model.c3.weight.grad[~absent].abs().sum() > 0
        optimizer.step()
    assert torch.all(model.c3.weight[absent] == 0)
    # Structurally absent: a NaN there changes nothing.
    before = model(x)
    with torch.no_grad():
        model.c3.weight[absent] = float("nan")
    assert torch.equal(model(x), before)


def test_connected_conv_is_a_conv_over_its_connected_inputs_only():
    torch.manual_seed(1)
    conv = ConnectedConv2d(6, 16, 5, CONNECTIONS, padding=1).double()
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    out = conv(x)
    for o in (0, 7, 14, 15):
        inputs = TABLE_I[o]
        ref = sum(F.conv2d(x[:, [i]], conv.weight[[o]][:, [i]], padding=1) for i in inputs) + conv.bias[o]
        assert torch.allclose(out[:, [o]], ref, rtol=0, atol=1e-12), o
    with pytest.raises(ValueError, match=r"\[16, 6\], got \[6, 16\]"):
        ConnectedConv2d(6, 16, 5, CONNECTIONS.T)
    with pytest.raises(ValueError, match="groups"):
        ConnectedConv2d(6, 16, 5, CONNECTIONS, groups=2)


def test_subsampling_is_a_trained_coefficient_times_each_window_sum_plus_a_bias():
    layer = Subsampling2d(3).double()
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)  # odd: the last row and column are dropped
    out = layer(x)
    assert out.shape == (2, 3, 3, 4)
    sums = x[:, :, 0:6:2, 0:8:2] + x[:, :, 1:6:2, 0:8:2] + x[:, :, 0:6:2, 1:8:2] + x[:, :, 1:6:2, 1:8:2]
    ref = sums * layer.weight.view(1, 3, 1, 1) + layer.bias.view(1, 3, 1, 1)
    assert torch.allclose(out, ref, rtol=1e-14, atol=0)
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]


def test_scaled_tanh_is_the_papers():
    x = torch.randn(100, dtype=torch.float64)
    assert torch.allclose(ScaledTanh()(x), 1.7159 * torch.tanh(2 / 3 * x), rtol=1e-15, atol=0)
    ones = torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert ScaledTanh()(ones).sub(ones).abs().max() < 1e-4  # f(+-1) = +-1, the point of A and S


def test_rbf_output_is_the_negated_squared_distances():
    x = torch.randn(5, 84, dtype=torch.float64)
    scores = RBFOutput(PROTOTYPES).double()(x)
    distances = torch.cdist(x, PROTOTYPES.double()).square()
    assert torch.allclose(scores, -distances, rtol=1e-12, atol=0)
    # The nearest prototype wins: a prototype itself scores 0 on its own class, and is predicted.
    assert torch.equal(RBFOutput(PROTOTYPES)(PROTOTYPES).argmax(1), torch.arange(10))
    assert RBFOutput(PROTOTYPES)(PROTOTYPES).diagonal().abs().max() == 0
    assert list(RBFOutput(PROTOTYPES).state_dict()) == ["prototypes"] and not list(RBFOutput(PROTOTYPES).parameters())


def test_prototypes_are_ten_distinct_seven_by_twelve_bitmaps():
    assert PROTOTYPES.shape == (10, 84) and PROTOTYPES.dtype == torch.float32
    assert set(PROTOTYPES.unique().tolist()) == {-1.0, 1.0}
    hamming = (PROTOTYPES[:, None] != PROTOTYPES[None]).sum(-1)
    assert hamming.masked_fill(torch.eye(10, dtype=torch.bool), 84).min() >= 8  # no two digits nearly alike
    ink = PROTOTYPES.view(10, 12, 7).eq(1)
    assert ink.any(2).sum(1).min() >= 8  # each glyph spans most of the grid's height


def test_map_loss_is_the_papers_criterion():
    scores = -20 * torch.rand(6, 10, dtype=torch.float64)
    target = torch.tensor([0, 3, 9, 9, 5, 1])
    distances = -scores
    by_row = [distances[p, target[p]] + torch.log(torch.exp(torch.tensor(-MAP_J, dtype=torch.float64))
                                                  + torch.exp(-distances[p]).sum()) for p in range(6)]
    expected = torch.stack(by_row).mean()
    assert torch.allclose(map_loss(scores, target), expected, rtol=1e-14, atol=0)
    # Not plain cross-entropy: the constant class counts (most where every score is near -MAP_J).
    assert not torch.allclose(map_loss(scores, target), F.cross_entropy(scores, target), rtol=1e-3)


def test_loss_function_gives_the_map_loss_for_the_1998_network_only():
    assert engine.loss_function(False, "lenet5-1998") is map_loss
    assert engine.loss_function(False, "lenet5") is F.cross_entropy and engine.loss_function(False) is F.cross_entropy


def test_fused_loss_function_is_the_map_loss():
    scores = -20 * torch.rand(6, 10)
    target = torch.tensor([0, 3, 9, 9, 5, 1])
    fused = engine.loss_function(True, "lenet5-1998")(scores, target)
    assert torch.allclose(fused, map_loss(scores, target), rtol=1e-5, atol=0)


def test_initialisation_is_uniform_within_the_papers_bounds():
    model = LeNet5_1998()
    fan_in = {"c1": torch.full((6,), 25.0), "c5": torch.full((120,), 400.0), "f6": torch.full((84,), 120.0),
              "c3": torch.tensor([len(s) * 25.0 for s in TABLE_I])}
    for name, fans in fan_in.items():
        layer = getattr(model, name)
        bound = 2.4 / fans
        weight = layer.weight.detach().flatten(1)
        assert torch.all(weight.abs() <= bound[:, None]) and torch.all(layer.bias.abs() <= bound), name
        # Uniform over the whole range, each unit by its own fan-in (not one bound for the layer).
        assert torch.all(weight.abs().amax(1) > 0.5 * bound), name
    for name in ("s2", "s4"):
        for p in getattr(model, name).parameters():
            assert torch.all(p.abs() <= 0.6) and p.abs().max() > 0.3, name
    assert model.c3.weight.detach().flatten(1).abs().amax(1)[:6].max() <= 2.4 / 75  # 3-input maps: the tightest


def test_input_is_checked_and_padded_with_background():
    model = LeNet5_1998()
    with pytest.raises(ValueError, match=r"LeNet5_1998 expects input of shape \(N, 1, 28, 28\), got \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    # A blank image is the background everywhere, padding included: c1's output is then constant.
    blank = torch.full((1, 1, 28, 28), BACKGROUND)
    c1 = model.c1(F.pad(blank, (2, 2, 2, 2), value=BACKGROUND))
    assert torch.allclose(c1, c1[:, :, :1, :1].expand_as(c1), rtol=0, atol=1e-6)
    seen = {}
    model.c1.register_forward_hook(lambda module, args, out: seen.update(x=args[0]))
    model(blank)
    assert seen["x"].shape == (1, 1, 32, 32) and torch.all(seen["x"] == BACKGROUND)


@pytest.mark.parametrize("dataset", data.DATASETS)
def test_input_scaling_is_the_papers_on_any_dataset(dataset):
    mean, std = input_normalization("lenet5-1998", dataset)
    image = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    image[:, 14, 14] = 0
    x = data.normalize(image, mean, std)
    assert torch.allclose(x.unique(), torch.tensor([BACKGROUND, INK]), rtol=0, atol=1e-6)
    assert input_normalization("lenet5", dataset) == data.NORMALIZATION[dataset]
    # The augmentation shifts in the background: every pixel is still ink or background, and the
    # shifted images have more background than the one pixel.
    shifted = data.random_shift(x.expand(16, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    assert torch.equal(shifted.unique(), x.unique())
    assert (shifted == x.min()).flatten(1).sum(1).max() > 28


def test_prototype_picture(tmp_path):
    path = tmp_path / "prototypes.png"
    plots.plot_prototypes(path)
    from PIL import Image

    with Image.open(path) as image:
        assert image.width > 2 * image.height  # the ten digits side by side
    assert lenet1998.PROTOTYPE_SHAPE == (12, 7)
