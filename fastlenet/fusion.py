"""fuse(model): put fastlenet's fused layers in the place of what they compute, in anyone's model.

What is replaced, and only where it is exactly the same function:
  Conv2d -> activation -> MaxPool2d(2) / AvgPool2d(2)       ConvActPool2d(activation, pool)
  Conv2d -> MaxPool2d(2) -> activation                      the same (max pooling commutes with
                                                            a non-decreasing activation)
  Conv2d -> activation, Conv2d alone                        ConvActPool2d(activation, pool=None)
  Linear -> activation, Linear alone                        LinearAct(activation)
  Linear -> Dropout -> ReLU                                 LinearAct("relu") -> Dropout (dropout
                                                            scales by a non-negative factor, so it
                                                            commutes with ReLU, mask for mask)
Activations are ReLU, Sigmoid, Tanh and Identity, as modules or as functions (F.relu, torch.tanh,
x.sigmoid(), ...), and the 1998 LeNet-5's ScaledTanh module. Its layers fuse too (fastlenet.lenet1998):
  Conv2d / ConnectedConv2d -> [activation] -> Subsampling2d -> [activation]
                                                            ConvActPool2d(activation, "subsample",
                                                            pool_activation[, connections])
  RBFOutput                                                 fastlenet.nn.RBFScores
The absorbed Subsampling2d's Parameters stay under its name, in a SubsamplingParameters module that
passes its input through, and the fused conv reads them there.
Everything else stays stock and the report says why: a pooling of another size or stride, a strided,
dilated or grouped conv, a layer whose output is also used elsewhere (a residual), a BatchNorm
between conv and activation, a subclass of Conv2d or Linear (its forward may differ).

The fused module takes the Conv2d's / Linear's place under the same name and keeps its Parameters,
and absorbed activation/pooling modules become nn.Identity, so state_dict keys do not change: a
checkpoint of the original model loads strictly into the fused one and back.

How the data flow is known: torch.fx traces the model's forward. Where every absorbed operation is a
module used once, the modules are swapped in the model itself (its class and methods are kept).
Where an absorbed operation is a function call (F.relu(self.conv1(x))) or a module used in several
places, the traced graph is rewritten and a torch.fx.GraphModule is returned, with the same
submodules, parameters and state_dict keys; like any fx graph it runs the operations the trace saw.
Checks on the input's shape trace when they live in a function registered with torch.fx.wrap (as
LeNet5's does): the graph calls it. When tracing fails (control flow on tensor values), only runs
of modules inside nn.Sequential containers are fused (a Sequential passes each output to the next
module and nowhere else). A traced graph that calls a train/eval-dependent function
(F.dropout(x, training=...), F.batch_norm) would freeze the mode it was traced in, so then no graph
is rewritten either: only module swaps are made. Either way the report lists every Conv2d / Linear
left stock, including those outside nn.Sequential when tracing failed and those the traced forward
never calls.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fastlenet.functional import MAX_KERNEL_SIZE, MAX_PADDING, supported_dtypes
from fastlenet.lenet1998 import ConnectedConv2d, RBFOutput, ScaledTanh, Subsampling2d

__all__ = ["fuse", "FusionReport", "SubsamplingParameters"]

_ACT_MODULES = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Identity: "identity",
                ScaledTanh: "scaled_tanh"}
# Modules of stock PyTorch and of fastlenet's reference layers that torch.fx records as calls.
_LEAF_MODULES = (ScaledTanh, Subsampling2d, ConnectedConv2d, RBFOutput)
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu",
                  torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                "tanh": "tanh", "tanh_": "tanh"}
# Positional parameter names of the pooling functions, to read an fx node's arguments.
_POOL_FUNCTIONS = {
    F.max_pool2d: ("max", ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                           "return_indices")),
    F.avg_pool2d: ("avg", ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                           "divisor_override")),
}
_POOL_DEFAULTS = dict(stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False,
                      divisor_override=None)
# Functions whose behaviour depends on train/eval mode through an argument fx freezes at trace time.
_MODE_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                   F.feature_alpha_dropout, F.batch_norm, F.instance_norm, F.rrelu}


# --------------------------------------------------------------------------------------------------
# What an operation is, from a module or an fx node
# --------------------------------------------------------------------------------------------------

@dataclass
class _Op:
    """One step of the data flow: a module call (name set) or a function/method call (node only)."""
    kind: str  # "conv" | "linear" | "act" | "pool" | "subsample" | "rbf" | "dropout" | "other"
    label: str  # how the report names it
    name: str | None = None  # qualified module name, for a module call
    node: fx.Node | None = None
    value: str | None = None  # activation or pool name
    problem: str | None = None  # why this op cannot be fused (conv/linear/pool)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _pool_problem(kind, kernel_size, stride, padding, ceil_mode, dilation=1, return_indices=False,
                  divisor_override=None) -> str | None:
    stride = kernel_size if stride is None or stride == () else stride
    if _pair(kernel_size) != (2, 2) or _pair(stride) != (2, 2):
        return f"{_pair(kernel_size)[0]}x{_pair(kernel_size)[1]} window, stride {stride}: only 2x2/2 pooling fuses"
    if _pair(padding) != (0, 0) or _pair(dilation) != (1, 1) or ceil_mode:
        return "padded, dilated or ceil_mode pooling does not fuse"
    if return_indices:
        return "pooling that returns indices does not fuse"
    if kind == "avg" and divisor_override is not None:
        return "avg pooling with divisor_override does not fuse"
    return None


def _conv_problem(m: nn.Conv2d) -> str | None:
    if type(m) not in (nn.Conv2d, ConnectedConv2d):
        return f"{type(m).__name__} is a subclass of Conv2d (its forward may compute something else)"
    k = m.kernel_size
    if m.stride != (1, 1) or m.dilation != (1, 1) or m.groups != 1:
        return (f"stride {m.stride}, dilation {m.dilation}, groups {m.groups}: the kernel computes stride-1, "
                "undilated, ungrouped convolutions")
    if m.padding_mode != "zeros":
        return f"padding_mode {m.padding_mode!r}: the kernel pads with zeros"
    if k[0] != k[1] or not 1 <= k[0] <= MAX_KERNEL_SIZE:
        return f"kernel {k[0]}x{k[1]}: square kernels 1..{MAX_KERNEL_SIZE} fuse"
    p = _conv_padding(m)
    if p is None:
        return f"padding {m.padding!r}: square paddings 0..{MAX_PADDING} fuse"
    return _dtype_problem(m)


def _conv_padding(m: nn.Conv2d) -> int | None:
    """The conv's padding as the one int the kernel takes (ConvActPool2d's reading of it), or None."""
    from fastlenet.nn import kernel_padding

    try:
        p = kernel_padding(m.padding, m.kernel_size[0])
    except ValueError:
        return None
    return p if 0 <= p <= MAX_PADDING else None


def _linear_problem(m: nn.Linear) -> str | None:
    if type(m) is not nn.Linear:
        return f"{type(m).__name__} is a subclass of Linear (its forward may compute something else)"
    return _dtype_problem(m)


def _dtype_problem(m: nn.Module) -> str | None:
    dtypes = {p.dtype for p in m.parameters()}
    allowed = supported_dtypes()
    if dtypes - set(allowed):
        return (f"parameters of dtype {', '.join(sorted(map(str, dtypes)))}: the kernels take "
                f"{', '.join(map(str, allowed))}")
    return None


def _module_op(name: str, m: nn.Module) -> _Op:
    from fastlenet.nn import ConvActPool2d, LinearAct

    label = f"{name} ({type(m).__name__})"
    if isinstance(m, (ConvActPool2d, LinearAct)):  # already fused
        return _Op("other", label, name)
    if isinstance(m, nn.Conv2d):
        return _Op("conv", label, name, problem=_conv_problem(m))
    if isinstance(m, nn.Linear):
        return _Op("linear", label, name, problem=_linear_problem(m))
    if type(m) in _ACT_MODULES:
        return _Op("act", label, name, value=_ACT_MODULES[type(m)])
    if type(m) in (nn.MaxPool2d, nn.AvgPool2d):
        kind = "max" if type(m) is nn.MaxPool2d else "avg"
        extra = (dict(dilation=m.dilation, return_indices=m.return_indices) if kind == "max"
                 else dict(divisor_override=m.divisor_override))
        problem = _pool_problem(kind, m.kernel_size, m.stride, m.padding, m.ceil_mode, **extra)
        return _Op("pool", label, name, value=kind, problem=problem)
    if type(m) is nn.Dropout:
        return _Op("dropout", label, name)
    if type(m) is Subsampling2d:
        return _Op("subsample", label, name, value="subsample", problem=_dtype_problem(m))
    if type(m) is RBFOutput:
        return _Op("rbf", label, name)
    return _Op("other", label, name)


def _node_op(node: fx.Node, modules: dict[str, nn.Module]) -> _Op:
    """The _Op of an fx node; only nodes whose sole tensor input is their first argument can be
    part of a chain, which _chains_from_graph checks."""
    if node.op == "call_module":
        op = _module_op(node.target, modules[node.target])
        op.node = node
        return op
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        return _Op("act", f"{node.name} ({node.target.__name__})", node=node, value=_ACT_FUNCTIONS[node.target])
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return _Op("act", f"{node.name} (.{node.target}())", node=node, value=_ACT_METHODS[node.target])
    if node.op == "call_function" and node.target in _POOL_FUNCTIONS:
        kind, names = _POOL_FUNCTIONS[node.target]
        bound = dict(_POOL_DEFAULTS, **dict(zip(names, node.args)), **node.kwargs)
        settings = {k: v for k, v in bound.items() if k not in ("input", "count_include_pad")}
        if any(isinstance(v, fx.Node) for v in settings.values()):
            problem = "pooling settings computed at run time"
        else:
            problem = _pool_problem(kind, settings.pop("kernel_size"), **settings)
        return _Op("pool", f"{node.name} ({kind}_pool2d)", node=node, value=kind, problem=problem)
    return _Op("other", node.name, node=node)


# --------------------------------------------------------------------------------------------------
# Chains: a conv or linear and the operations after it that its kernel can absorb
# --------------------------------------------------------------------------------------------------

@dataclass
class _Chain:
    layer: _Op
    absorbed: list[_Op] = field(default_factory=list)  # removed (made Identity / erased)
    kept_between: list[_Op] = field(default_factory=list)  # Dropout that stays, before an absorbed ReLU
    activation: str = "identity"
    pool: str | None = None
    pool_activation: str = "identity"  # after a trainable subsampling
    subsampling: _Op | None = None
    stopped_at: _Op | None = None  # the next operation, when it could not be absorbed
    why_stopped: str | None = None


def _extend(chain: _Chain, following) -> None:
    """Absorb what follows chain.layer, reading ops from the iterator `following` (which stops at
    the first op that does not receive the previous one's output alone)."""
    have_act = have_pool = False
    pending_dropout = None
    for op in following:
        if op.kind == "act" and op.value == "identity":
            chain.absorbed.append(op)  # a no-op either way
            continue
        if op.kind == "act" and chain.pool == "subsample":  # the activation after the subsampling
            chain.absorbed.append(op)
            chain.pool_activation = op.value
            return
        if pending_dropout is not None:
            if op.kind == "act" and op.value == "relu" and not have_act:
                chain.kept_between.append(pending_dropout)
                chain.absorbed.append(op)
                chain.activation, have_act = "relu", True
                return
            chain.stopped_at, chain.why_stopped = pending_dropout, None
            return
        if op.kind == "act" and not have_act:
            if have_pool and chain.pool != "max":
                chain.stopped_at = op
                chain.why_stopped = "an activation after average pooling does not commute with it"
                return
            chain.absorbed.append(op)
            chain.activation, have_act = op.value, True
            if have_pool:
                return
            continue
        if op.kind in ("pool", "subsample") and chain.layer.kind == "conv" and not have_pool:
            if op.problem:
                chain.stopped_at, chain.why_stopped = op, op.problem
                return
            chain.absorbed.append(op)
            chain.pool, have_pool = op.value, True
            if op.kind == "subsample":  # an activation may follow it: its pool_activation
                chain.subsampling = op
                continue
            if have_act:
                return
            continue
        if op.kind == "dropout" and chain.layer.kind == "linear" and not have_act:
            pending_dropout = op  # fused only if a ReLU follows it
            continue
        chain.stopped_at = op
        if op.kind == "other" and op.name is not None and "BatchNorm" in op.label and not have_act:
            chain.why_stopped = "a BatchNorm between the layer and its activation keeps them apart"
        return
    if pending_dropout is not None:
        chain.stopped_at = pending_dropout


def _chains_from_graph(graph: fx.Graph, modules: dict[str, nn.Module]) -> list[_Chain]:
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), (nn.Conv2d, nn.Linear)):
            continue
        layer = _node_op(node, modules)
        if layer.kind == "other":  # already fused
            continue
        chain = _Chain(layer)
        chains.append(chain)
        if layer.problem:
            continue

        def following(node=node):
            # Follow the output while it goes to exactly one operation, as its first argument, and
            # nowhere else (a residual or a second use of the activation map stops the chain).
            current = node
            while len(current.users) == 1:
                user = next(iter(current.users))
                uses = [a for a in (*user.args, *user.kwargs.values()) if a is current]
                if not user.args or user.args[0] is not current or len(uses) != 1 or user.op == "output":
                    return
                op = _node_op(user, modules)
                yield op
                current = user

        _extend(chain, following())
        if len(node.users) > 1:
            chain.why_stopped = "its output is used in more than one place"
    return chains


def _chains_from_sequentials(model: nn.Module) -> list[_Chain]:
    chains = []
    for seq_name, seq in model.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        ops = [_module_op(f"{seq_name}.{name}" if seq_name else name, m) for name, m in seq.named_children()]
        i = 0
        while i < len(ops):
            if ops[i].kind not in ("conv", "linear"):
                i += 1
                continue
            chain = _Chain(ops[i])
            chains.append(chain)
            if not chain.layer.problem:
                _extend(chain, iter(ops[i + 1:]))
            i += 1 + len(chain.absorbed) + len(chain.kept_between)
    return chains


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------

@dataclass
class FusionReport:
    """What fuse() did: `fused` lists (layer names, fused module), `stock` lists (name, reason).
    print(report) shows it as a table."""
    how: str
    fused: list[tuple[tuple[str, ...], str]] = field(default_factory=list)
    stock: list[tuple[str, str]] = field(default_factory=list)
    returns: str = ""

    def __str__(self) -> str:
        lines = [f"fastlenet.fuse: {len(self.fused)} layer(s) fused, {len(self.stock)} left stock ({self.how})"]
        for names, module in self.fused:
            lines.append(f"  fused  {' + '.join(names)}  ->  {module}")
        for name, reason in self.stock:
            lines.append(f"  stock  {name}: {reason}")
        if self.returns:
            lines.append(f"  {self.returns}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Rewriting
# --------------------------------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    """fx's default tracer, treating fastlenet's fused modules as leaves (their forward validates
    shapes, which a proxy cannot answer)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from fastlenet.nn import ConvActPool2d, LinearAct

        from fastlenet.nn import RBFScores

        return (isinstance(m, (ConvActPool2d, LinearAct, RBFScores, *_LEAF_MODULES))
                or super().is_leaf_module(m, qualname))


class SubsamplingParameters(nn.Module):
    """Where fuse leaves the Parameters of a Subsampling2d that a fused conv computes: under the same
    name, so state_dict keys do not change. Passes its input through (the conv did the work)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x):
        return x

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, computed by the fused conv before it"


def _fused_module(layer: nn.Module, chain: _Chain, subsampling: nn.Module | None = None) -> nn.Module:
    from fastlenet.nn import ConvActPool2d, LinearAct

    # Built on the meta device (no initialisation work), then given the layer's own Parameters.
    if isinstance(layer, nn.Conv2d):
        connections = layer.connections if isinstance(layer, ConnectedConv2d) else None
        fused = ConvActPool2d(layer.in_channels, layer.out_channels, layer.kernel_size[0],
                              padding=_conv_padding(layer), bias=layer.bias is not None,
                              activation=chain.activation, pool=chain.pool, pool_activation=chain.pool_activation,
                              subsampling=subsampling, device="meta",
                              connections=None if connections is None else connections.to("meta"))
        if connections is not None:
            fused.connections = connections  # the layer's own buffer, on its device
    else:
        fused = LinearAct(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          activation=chain.activation, device="meta")
    fused.weight = layer.weight
    fused.bias = layer.bias
    fused.train(layer.training)
    return fused


def _describe(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        extra = f" + {m.pool_activation}" if m.pool == "subsample" else ""
        extra += ", connection table" if m.connections is not None else ""
        return (f"{type(m).__name__}({m.in_channels}->{m.out_channels}, {m.kernel_size[0]}x{m.kernel_size[0]}, "
                f"padding {m.padding[0]}, {m.activation}, pool {m.pool}{extra})")
    if not hasattr(m, "in_features"):
        return f"{type(m).__name__}({m.prototypes.shape[1]}->{m.prototypes.shape[0]})"
    return f"{type(m).__name__}({m.in_features}->{m.out_features}, {m.activation})"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _module_uses(model: nn.Module, graph: fx.Graph | None) -> dict[str, int]:
    """How many times each module is called (from the graph) or registered (without one)."""
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    uses = {name: counts[id(m)] for name, m in model.named_modules()}
    if graph is not None:
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        uses = {name: max(n, calls.get(name, 0)) for name, n in uses.items()}
    return uses


def _unchained_layers(model: nn.Module, graph: fx.Graph | None, chains: list[_Chain],
                      trace_error: str | None) -> list[tuple[str, str]]:
    """(label, reason) for each Conv2d / Linear that no chain starts at, so that the report names
    every layer left stock: without a graph, those outside nn.Sequential; with one, those it never
    calls (or calls inside a leaf module, which the trace does not enter)."""
    from fastlenet.nn import ConvActPool2d, LinearAct

    chained = {id(model.get_submodule(chain.layer.name)) for chain in chains}
    called = {n.target for n in graph.nodes if n.op == "call_module"} if graph is not None else set()
    stock = []
    for name, m in model.named_modules():
        if (not isinstance(m, (nn.Conv2d, nn.Linear)) or isinstance(m, (ConvActPool2d, LinearAct))
                or id(m) in chained):
            continue
        leaf = next((c for c in called if name.startswith(f"{c}.")), None)
        if graph is None:
            why = f"forward could not be traced: {trace_error}"
        elif leaf is not None:
            why = f"called inside {leaf} ({type(model.get_submodule(leaf)).__name__}), which the trace does not enter"
        else:
            why = "not called in the traced forward"
        stock.append((f"{name} ({type(m).__name__})", why))
    return stock


def _graph_module(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    # fx copies into a GraphModule only what the graph uses, into new containers; put the model's
    # own back, so that modules the forward never calls stay and the state_dict keeps its keys.
    for attr in ("_modules", "_parameters", "_buffers"):
        ours, theirs = getattr(model, attr), getattr(gm, attr)
        merged = {**ours, **{k: v for k, v in theirs.items() if k not in ours}}
        theirs.clear()
        theirs.update(merged)
    gm._non_persistent_buffers_set |= model._non_persistent_buffers_set
    gm.training = model.training  # a new Module starts in training mode; its submodules keep theirs
    return gm


def _fuse_rbf_outputs(model: nn.Module, modules: dict[str, nn.Module], uses: dict[str, int],
                      report: FusionReport) -> None:
    """Each RBFOutput becomes fastlenet.nn.RBFScores, the same function of the same buffer: a swap
    of modules, which a traced graph calls by name as well."""
    from fastlenet.nn import RBFScores

    for name, m in modules.items():
        if type(m) is not RBFOutput:
            continue
        label = f"{name} ({type(m).__name__})"
        problem, dtype = None, m.prototypes.dtype
        if dtype not in supported_dtypes():
            problem = f"prototypes of dtype {dtype}: the kernels take {', '.join(map(str, supported_dtypes()))}"
        if uses.get(name, 1) > 1:
            problem = "the module is called in more than one place"
        if problem:
            report.stock.append((label, problem))
            continue
        fused = RBFScores(m.prototypes)
        fused.prototypes = m.prototypes  # the module's own buffer
        fused.train(m.training)
        _set_submodule(model, name, fused)
        report.fused.append(((name,), _describe(fused)))


def fuse(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, FusionReport]:
    """Replace every Conv2d / Linear (and the activation and 2x2 pooling after it) that fastlenet's
    kernels compute exactly by a fused layer. Returns (fused model, report); print(report) says what
    was fused and what was left stock, and why.

    inplace=False (the default) works on a deep copy and leaves `model` untouched; inplace=True
    swaps the modules of `model` itself (keeping its Parameters, so an optimizer built on them still
    holds the right tensors). Use the returned model either way: where function calls were absorbed
    it is a torch.fx.GraphModule (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: expected a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    graph, how, trace_error = None, "data flow traced with torch.fx", None
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: use the Sequential structure
        trace_error = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
        how = f"forward could not be traced ({trace_error}); fused inside nn.Sequential containers only"
    chains = _chains_from_graph(graph, modules) if graph is not None else _chains_from_sequentials(model)
    uses = _module_uses(model, graph)
    frozen_mode = graph is not None and any(
        n.op == "call_function" and n.target in _MODE_FUNCTIONS for n in graph.nodes)

    report = FusionReport(how)
    rewrite_graph = False
    for chain in chains:
        layer = chain.layer
        if layer.problem:
            report.stock.append((layer.label, layer.problem))
            continue
        if uses.get(layer.name, 1) > 1:
            report.stock.append((layer.label, "the module is called in more than one place"))
            continue
        needs_graph = any(op.name is None or uses.get(op.name, 1) > 1 for op in chain.absorbed)
        if needs_graph and frozen_mode:
            report.stock.append((layer.label, "fusing it needs a rewritten fx graph, which would freeze the "
                                 "train/eval mode of this model's F.dropout/F.batch_norm calls; use modules "
                                 "(nn.ReLU, nn.MaxPool2d) for the operations after it"))
            continue
        rewrite_graph |= needs_graph
        holder = None
        if chain.subsampling is not None:  # its Parameters stay under its name (SubsamplingParameters)
            original = modules[chain.subsampling.name]
            holder = original if needs_graph else SubsamplingParameters(original.weight, original.bias)
        fused = _fused_module(modules[layer.name], chain, holder)
        _set_submodule(model, layer.name, fused)
        names = (layer.name, *(op.name or op.node.name for op in chain.absorbed))
        kept = "".join(f" (the {op.label} between stays)" for op in chain.kept_between)
        report.fused.append((names, _describe(fused) + kept))
        for op in chain.absorbed:
            if not needs_graph:
                _set_submodule(model, op.name, holder if op is chain.subsampling else nn.Identity())
            else:
                op.node.replace_all_uses_with(op.node.args[0])
                graph.erase_node(op.node)
        if chain.why_stopped:  # what comes next stays stock; without a next op, the output's other uses
            where = chain.stopped_at.label if chain.stopped_at is not None else f"the output of {layer.label}"
            report.stock.append((where, chain.why_stopped))
    _fuse_rbf_outputs(model, modules, uses, report)
    report.stock += _unchained_layers(model, graph, chains, trace_error)
    if rewrite_graph:
        graph.lint()
        model = _graph_module(model, graph)
        report.returns = "returned a torch.fx.GraphModule (function calls were absorbed)"
    return model, report
