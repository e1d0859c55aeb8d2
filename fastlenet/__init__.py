"""fastlenet: LeNet-5 with fused Triton kernels, forward and backward.

The Triton kernels live in fastlenet.kernels; autograd Functions and the functional API in
fastlenet.functional; drop-in torch.nn modules in fastlenet.nn; the models in fastlenet.models.
Importing fastlenet does not import Triton: the reference path runs wherever torch does.
"""
from fastlenet.models import LeNet5, VARIANTS

__version__ = "0.1.0"
__all__ = ["LeNet5", "VARIANTS", "__version__"]
