"""What several test files share that is not a fixture (fixtures live in conftest.py).

Test files in every folder import it as `from utils import ...`: tests/ is on sys.path because the
top conftest.py lives there (pytest's default "prepend" import mode).
"""
import importlib.util
import os
import pathlib

import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]

# The PyTorch compositions the kernels are checked against.
ACT = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
       "scaled_tanh": lambda t: 1.7159 * torch.tanh(t * (2 / 3)), "identity": lambda t: t}
# None: no pooling (the kernel size argument is ignored). Trainable subsampling (pool "subsample")
# takes parameters, so it has tests of its own (tests/kernels/test_subsampling.py).
POOL = {"max": F.max_pool2d, "avg": F.avg_pool2d, None: lambda t, size: t}
PARAMETERLESS_POOLS = tuple(POOL)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def reference_dtype(device: torch.device) -> torch.dtype:
    """What a module or model is compared in: float64 on the CPU (the interpreter takes it, so only
    summation order differs), float32 on CUDA."""
    return torch.float64 if device.type == "cpu" else torch.float32


def set_tf32(enabled: bool):
    """Switch TF32 for float32 convolutions and matmuls, the way a user would (the fp32_precision
    API where this torch has it, else the legacy flags); returns a function that restores the
    previous settings."""
    value = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        saved = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
        torch.backends.cudnn.conv.fp32_precision = value
        torch.backends.cuda.matmul.fp32_precision = value

        def restore():
            torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved
    else:
        saved = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
        torch.backends.cudnn.allow_tf32 = enabled
        torch.set_float32_matmul_precision("high" if enabled else "highest")

        def restore():
            torch.backends.cudnn.allow_tf32 = saved[0]
            torch.set_float32_matmul_precision(saved[1])
    return restore


def env_without_interpreter() -> dict:
    """This process's environment less TRITON_INTERPRET (which conftest.py sets on a machine without
    CUDA), for a child process whose kernels are compiled, by Triton's real pipeline and ptxas, rather
    than interpreted."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_cli(capsys, main, *args) -> tuple[int, str, str]:
    """A command-line tool's main() run in-process on `args` (made strings, as a shell passes them):
    its exit status and what it printed to stdout and stderr."""
    capsys.readouterr()  # drop anything printed before
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    """The command-line tools' contract for a user error: exit status 2 and one line `error: ...` on
    stderr, holding each of `fragments`; never a traceback."""
    assert status == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def load_script(path: pathlib.Path):
    """A script that is no package module (bench/*.py), imported as a module of its file's name."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
