"""fastlenet: LeNet-5 with fused Triton kernels, forward and backward.

The Triton kernels live in fastlenet.kernels; autograd Functions and the functional API in
fastlenet.functional; drop-in torch.nn modules in fastlenet.nn; the models in fastlenet.models;
fastlenet.fuse(model) puts the fused modules into anyone's model (fastlenet.fusion); the training
step, evaluation and prediction are fastlenet.engine's, which the command-line tools (train,
evaluate, predict) and the benchmarks share.
`import fastlenet` imports neither PyTorch nor Triton: the names below load their modules on first
use, so the command-line tools answer --help at once and the reference path runs wherever torch does.
"""
__version__ = "0.1.0"
__all__ = ["LeNet5", "VARIANTS", "ConvActPool2d", "LinearAct", "fuse", "__version__"]


def __getattr__(name: str):
    if name in ("LeNet5", "VARIANTS"):
        from fastlenet import models

        return getattr(models, name)
    if name in ("ConvActPool2d", "LinearAct"):
        from fastlenet import nn

        return getattr(nn, name)
    if name == "fuse":
        from fastlenet.fusion import fuse

        return fuse
    raise AttributeError(f"module 'fastlenet' has no attribute {name!r}")
