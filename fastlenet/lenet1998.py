"""LeNet-5 as LeCun, Bottou, Bengio and Haffner published it in 1998 ("Gradient-based learning applied
to document recognition", Proc. IEEE 86(11), section II.B), in stock torch.nn: the reference that
fastlenet.fuse turns into fused kernels (build_model("lenet5-1998", fused=True)).

The paper's network is not the LeNet-5 of today's tutorials (fastlenet.models.LeNet5). Its input is a
32x32 image, background -0.1 and ink 1.175 (BACKGROUND, INK: mean about 0, variance about 1), here
MNIST's 28x28 digit padded with background. Then:

    c1  6 maps of 5x5 convolutions                         28x28   156 parameters
    s2  subsampling: each map's 2x2 sums, times a trained   14x14    12
        coefficient, plus a trained bias (Subsampling2d)
    c3  16 maps of 5x5 convolutions, each over the subset   10x10  1,516
        of s2's maps that Table I names (ConnectedConv2d)
    s4  subsampling as s2                                    5x5    32
    c5  120 maps of 5x5 convolutions: 1x1, so in effect      1x1  48,120
        a full layer
    f6  84 units, fully connected                                  10,164
    output  ten Euclidean radial basis function units (RBFOutput): the squared distance of f6's
        84 outputs to a fixed +-1 prototype per class, a stylised 7x12 bitmap of the digit

60,000 trainable parameters. Every layer but the output is followed by the scaled hyperbolic tangent
A tanh(S x) (ScaledTanh: A = 1.7159, S = 2/3, so that f(+-1) = +-1). Why a sparse C3: to break the
symmetry between its maps (each sees a different mix of features) and to keep the connection count
down. Why RBF units: a prototype bitmap makes the output code distributed (similar-looking characters
get similar codes), and f6's 84 units are a 7x12 picture of it.

The paper trained with the MAP criterion (map_loss), which both pulls the right class's distance down
and pushes the others' up (plain mean squared distance would let every prototype collapse onto one
point), with weights initialised uniformly in +-2.4 / fan-in, by stochastic diagonal Levenberg-
Marquardt over 20 passes, to 0.95 % test error (99.05 % accuracy) without distortions.

Here the output returns SCORES, the negated distances, so that the largest score is the predicted
class and accuracy is argmax as everywhere else in fastlenet; map_loss is the paper's criterion over
those scores. The PROTOTYPES are drawn for this project in the paper's manner (Fig. 3 shows its own);
they are not copied from it.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["SCALED_TANH_A", "SCALED_TANH_S", "BACKGROUND", "INK", "MAP_J", "NORMALIZATION", "CONNECTIONS",
           "PROTOTYPES", "ScaledTanh", "Subsampling2d", "ConnectedConv2d", "RBFOutput", "LeNet5_1998", "map_loss"]

SCALED_TANH_A = 1.7159  # the amplitude A of A tanh(S x)
SCALED_TANH_S = 2 / 3  # its slope S: with A, f(1) = 1 and f(-1) = -1
BACKGROUND = -0.1  # the input's background (the paper's white; MNIST's 0 pixel), and the padding to 32x32
INK = 1.175  # the input's ink (the paper's black; MNIST's 255 pixel)
MAP_J = 0.1  # the MAP criterion's constant j: a "rubbish" class of score -j that no target names
# (mean, std) of fastlenet's (pixel/255 - mean)/std that map 0 to BACKGROUND and 255 to INK, whatever the dataset.
NORMALIZATION = (-BACKGROUND / (INK - BACKGROUND), 1 / (INK - BACKGROUND))
INIT_RANGE = 2.4  # weights and biases start uniform in +-INIT_RANGE / fan-in

# Table I of the paper: which of s2's six maps (rows) each of c3's sixteen maps (columns) sees.
_TABLE_I = """
    0123456789012345
0   X...XXX..XXXX.XX
1   XX...XXX..XXXX.X
2   XXX...XXX..X.XXX
3   .XXX..XXXX..X.XX
4   ..XXX..XXXX.XX.X
5   ...XXX..XXXX.XXX
"""
CONNECTIONS = torch.tensor([[c == "X" for c in line.split()[1]] for line in _TABLE_I.strip().splitlines()[1:]]).T
"""bool [16, 6]: CONNECTIONS[o, i] is whether c3's map o sees s2's map i (60 of the 96 pairs)."""

# Ten stylised digits on a 7x12 grid ('#' = +1, '.' = -1), rows top to bottom: f6's 84 units read as a
# picture. Drawn for this project in the manner of the paper's Fig. 3 (stylised one-pixel strokes),
# not copied from it.
_BITMAPS = """
0        1        2        3        4        5        6        7        8        9
.......  .......  .......  .......  .......  .......  .......  .......  .......  .......
..###..  ...#...  .#####.  #######  ....#..  #######  ..####.  #######  .#####.  .#####.
.#...#.  ..##...  #.....#  .....#.  ...##..  #......  .#.....  ......#  #.....#  #.....#
#.....#  .#.#...  ......#  ....#..  ..#.#..  #......  #......  .....#.  #.....#  #.....#
#.....#  ...#...  .....#.  ...#...  .#..#..  ######.  ######.  ....#..  .#...#.  #.....#
#.....#  ...#...  ....#..  ..###..  #...#..  ......#  #.....#  ...#...  ..###..  .######
#.....#  ...#...  ...#...  .....#.  #######  ......#  #.....#  ..#....  .#...#.  ......#
#.....#  ...#...  ..#....  ......#  ....#..  ......#  #.....#  ..#....  #.....#  ......#
.#...#.  ...#...  .#.....  #.....#  ....#..  #.....#  #.....#  ..#....  #.....#  .....#.
..###..  .#####.  #######  .#####.  ....#..  .#####.  .#####.  ..#....  .#####.  .####..
.......  .......  .......  .......  .......  .......  .......  .......  .......  .......
.......  .......  .......  .......  .......  .......  .......  .......  .......  .......
"""
PROTOTYPE_SHAPE = (12, 7)  # rows, columns
PROTOTYPES = torch.tensor([[[1.0 if c == "#" else -1.0 for c in line.split()[digit]]
                            for line in _BITMAPS.strip().splitlines()[1:]] for digit in range(10)]).flatten(1)
"""float [10, 84] of +-1: the output's fixed prototype of each digit, its 7x12 bitmap row by row."""


class ScaledTanh(nn.Module):
    """A tanh(S x), the paper's squashing function (A = 1.7159, S = 2/3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SCALED_TANH_A * torch.tanh(SCALED_TANH_S * x)

    def extra_repr(self) -> str:
        return f"A={SCALED_TANH_A}, S={SCALED_TANH_S:.4g}"


class Subsampling2d(nn.Module):
    """The paper's subsampling: out[n, c] = weight[c] * (sum of each 2x2, stride-2 window of x[n, c])
    + bias[c], one trained coefficient and one bias per map. An odd last row or column is dropped, as
    pooling drops it."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = INIT_RANGE / 4  # each unit sums four inputs
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sums = F.avg_pool2d(x, 2) * 4  # a mean times 4: exact in binary floating point
        return sums * self.weight[:, None, None] + self.bias[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.channels}"


class ConnectedConv2d(nn.Conv2d):
    """nn.Conv2d in which output map o sees only the input maps i with connections[o, i] (bool
    [out_channels, in_channels]), as the paper's C3 sees the subsets of S2 its Table I names.

    The weights of the pairs that are not connected stay in `weight` (so that the shape and the
    state_dict are nn.Conv2d's) but are structurally absent: forward uses torch.where(connections,
    weight, 0), so they take no part in the output, get a zero gradient, and a NaN there cannot
    leak; they start at zero. masked_parameters() is how many entries that removes, which
    fastlenet.models.num_parameters does not count.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, connections: torch.Tensor, **kwargs):
        if kwargs.get("groups", 1) != 1:
            raise ValueError("ConnectedConv2d takes its connections instead of groups; got groups="
                             f"{kwargs['groups']}")
        connections = torch.as_tensor(connections)
        if connections.shape != (out_channels, in_channels):
            raise ValueError(f"connections must be [out_channels, in_channels] = [{out_channels}, {in_channels}], "
                             f"got {list(connections.shape)}")
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self.register_buffer("connections", connections.to(device=self.weight.device, dtype=torch.bool, copy=True))
        self.reset_parameters()  # again, now that the unconnected weights are known

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "connections"):  # nn.Conv2d.__init__ calls this before the buffer exists
            with torch.no_grad():
                self.weight.masked_fill_(~self.connections[:, :, None, None], 0)

    def masked_weight(self) -> torch.Tensor:
        return torch.where(self.connections[:, :, None, None], self.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)

    def masked_parameters(self) -> int:
        """The number of weight entries the connections remove (not trained, not counted)."""
        return int((~self.connections).sum()) * self.weight[0, 0].numel()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, connections={int(self.connections.sum())}/{self.connections.numel()}"


class RBFOutput(nn.Module):
    """Euclidean radial basis function units, one per class, with fixed prototypes (a buffer
    [classes, features], not trained). Returns SCORES, the negated squared distances,
    scores[b, i] = -sum_j (x[b, j] - prototypes[i, j])**2: the largest score is the nearest prototype,
    the predicted class."""

    def __init__(self, prototypes: torch.Tensor):
        super().__init__()
        if prototypes.ndim != 2:
            raise ValueError(f"prototypes must be [classes, features], got {list(prototypes.shape)}")
        self.register_buffer("prototypes", prototypes.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The differences themselves, not |x|^2 - 2 x.p + |p|^2: no cancellation in the reference.
        return -(x[:, None, :] - self.prototypes).square().sum(-1)

    def extra_repr(self) -> str:
        classes, features = self.prototypes.shape
        return f"classes={classes}, features={features}"


@torch.fx.wrap  # torch.fx records a call instead of tracing into it: a proxy has no shape to check
def _check_input(x: torch.Tensor) -> torch.Tensor:
    """x itself, once its shape is (N, 1, 28, 28); returned so that the check stays in a traced graph's data flow."""
    if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
        raise ValueError(f"LeNet5_1998 expects input of shape (N, 1, 28, 28), got {tuple(x.shape)}")
    return x


class LeNet5_1998(nn.Module):
    """The paper's LeNet-5 (see the module docstring) for 1x28x28 input, padded to 32x32 with
    BACKGROUND; normalise the input with NORMALIZATION so that a 0 pixel is BACKGROUND and a 255 pixel
    INK. Returns the ten output scores (negated RBF distances). Initialised as the paper did:
    weights and biases uniform in +-2.4 / fan-in (reset_parameters)."""

    normalization = NORMALIZATION  # what fastlenet.engine.input_normalization gives for it

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5)
        self.c1_act = ScaledTanh()
        self.s2 = Subsampling2d(6)
        self.s2_act = ScaledTanh()
        self.c3 = ConnectedConv2d(6, 16, 5, CONNECTIONS)
        self.c3_act = ScaledTanh()
        self.s4 = Subsampling2d(16)
        self.s4_act = ScaledTanh()
        self.c5 = nn.Conv2d(16, 120, 5)
        self.c5_act = ScaledTanh()
        self.f6 = nn.Linear(120, 84)
        self.f6_act = ScaledTanh()
        self.output = RBFOutput(PROTOTYPES)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in +-2.4 / fan-in, each unit by its own fan-in: a c3 map's is its connected input
        maps x 25 (75, 100 or 150); its unconnected weights start, and stay, at zero."""
        for layer in (self.c1, self.c3, self.c5, self.f6):
            weight = layer.weight
            inputs = layer.connections.sum(1) if isinstance(layer, ConnectedConv2d) else weight.shape[1]
            fan_in = torch.as_tensor(inputs * weight[0, 0].numel(), dtype=weight.dtype).expand(weight.shape[0])
            bound = INIT_RANGE / fan_in.to(weight.device)
            with torch.no_grad():
                weight.uniform_(-1, 1).mul_(bound.view(-1, *(1,) * (weight.ndim - 1)))
                layer.bias.uniform_(-1, 1).mul_(bound)
                if isinstance(layer, ConnectedConv2d):
                    weight.masked_fill_(~layer.connections[:, :, None, None], 0)
        self.s2.reset_parameters()
        self.s4.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_input(x)
        x = F.pad(x, (2, 2, 2, 2), value=BACKGROUND)
        x = self.s2_act(self.s2(self.c1_act(self.c1(x))))
        x = self.s4_act(self.s4(self.c3_act(self.c3(x))))
        x = self.c5_act(self.c5(x)).flatten(1)
        return self.output(self.f6_act(self.f6(x)))


def map_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's maximum a posteriori criterion over the output scores (negated distances y = -scores):
    E = mean over the batch of  y[target] + log(exp(-MAP_J) + sum_i exp(-y_i)),
    which is cross-entropy over the scores with one more column fixed at -MAP_J that no target names
    (targets must be class indices below scores.shape[1]). Its second term pushes the wrong classes'
    distances up, so that the prototypes cannot all be matched at once."""
    rubbish = scores.new_full((scores.shape[0], 1), -MAP_J)
    return F.cross_entropy(torch.cat([scores, rubbish], 1), target)
