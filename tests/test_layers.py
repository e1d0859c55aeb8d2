"""The layer order, as a test: kernels -> ops/functional -> nn/models -> engine -> CLIs, benches and
reports. Every import in the shipped code and the benches (lazy ones inside functions, and code in
strings run as `python -c`, included) goes down the order or stays in its room; no CLI imports
another; no module imports another room's private `_module`."""
import ast
import re

import pytest

from utils import REPO

# Each room and what it may import of fastlenet: its own room and the rooms listed ("room:module"
# grants one module of a room). A module of the shipped code or the benches that is in no room
# fails the test: place it when you add it.
ROOMS = {
    "base": {"members": ("fastlenet.names", "fastlenet.files"), "may_use": ()},
    "kernels": {"members": ("fastlenet.kernels",), "may_use": ()},
    "ops": {"members": ("fastlenet.ops", "fastlenet.functional"), "may_use": ("kernels", "base")},
    # Modules and models call the functional API only: no pointers, no ops.
    "modules": {"members": ("fastlenet.nn", "fastlenet.models", "fastlenet.fusion", "fastlenet.lenet1998"),
                "may_use": ("ops:fastlenet.functional", "base")},
    "data": {"members": ("fastlenet.data",), "may_use": ("base",)},
    "package": {"members": ("fastlenet",), "may_use": ("modules",)},  # the façade's lazy names
    "engine": {"members": ("fastlenet.engine", "fastlenet.distributed", "fastlenet.plots", "fastlenet.profiling"),
               "may_use": ("modules", "ops", "data", "base", "package", "kernels:fastlenet.kernels.launch")},
    # What the command-line tools share: argument handling, user errors, run directories and
    # checkpoints (whose problems are the user's, reported as one line).
    "cli": {"members": ("fastlenet.cli", "fastlenet.checkpoint"),
            "may_use": ("engine", "modules", "ops", "data", "base", "package", "kernels:fastlenet.kernels.launch")},
    "top": {"members": ("fastlenet.train", "fastlenet.evaluate", "fastlenet.predict", "fastlenet.analysis",
                        "bench"),
            "may_use": ("cli", "engine", "modules", "ops", "data", "base", "kernels", "package")},
}
CLIS = ("fastlenet.train", "fastlenet.evaluate", "fastlenet.predict")
IMPORT_IN_STRING = re.compile(r"^\s*(?:from\s+(fastlenet[\w.]*)\s+import|import\s+(fastlenet[\w.]*))", re.M)


def module_name(root, path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] == "kernels":  # shipped as fastlenet.kernels (pyproject's package-dir)
        parts = ["fastlenet", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources(root):
    paths = [*root.glob("fastlenet/**/*.py"), *root.glob("kernels/*.py"), *root.glob("bench/*.py")]
    return sorted(p for p in paths if "__pycache__" not in p.parts)


def room_of(module: str) -> str | None:
    best = None
    for room, spec in ROOMS.items():
        for member in spec["members"]:
            # The package room holds only fastlenet/__init__; every other member its submodules too.
            inside = module.startswith(member + ".") and member != "fastlenet"
            if (module == member or inside) and (best is None or len(member) > len(best[1])):
                best = (room, member)
    return best[0] if best else None


def imports(path, module: str):
    """(imported module, line) for every import in the file, code strings included."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from fastlenet import functional` imports the module fastlenet.functional.
                sub = f"{base}.{alias.name}"
                yield (sub if base in ("fastlenet", "fastlenet.kernels", "fastlenet.analysis", "bench")
                       and alias.name != "*" else base), node.lineno
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            for m in IMPORT_IN_STRING.finditer(node.value):
                yield m.group(1) or m.group(2), node.lineno


def allowed(importer_room: str, imported: str) -> bool:
    target = room_of(imported)
    if target == importer_room:
        return True
    for grant in ROOMS[importer_room]["may_use"]:
        room, _, only = grant.partition(":")
        if room == target and (not only or imported == only or imported.startswith(only + ".")):
            return True
    return False


def violations(root=REPO) -> list[str]:
    found = {}
    for path in sources(root):
        module = module_name(root, path)
        room = room_of(module)
        where = path.relative_to(root)
        if room is None:
            found[f"{where}: {module} is in no room (add it to ROOMS)"] = None
            continue
        for imported, line in imports(path, module):
            if not (imported == "fastlenet" or imported.startswith(("fastlenet.", "bench."))):
                continue
            if imported == "fastlenet" and room in ("top", "cli", "engine"):
                continue  # the package's version and lazy names
            if not allowed(room, imported):
                found[f"{where}:{line}: {module} ({room}) imports {imported} ({room_of(imported)})"] = None
            if module.startswith(CLIS) and imported.startswith(CLIS) and not imported.startswith(module):
                found[f"{where}:{line}: the CLI {module} imports the CLI {imported}"] = None
            leaf = imported.rsplit(".", 1)[-1]
            if leaf.startswith("_") and not leaf.startswith("__") and room_of(imported) != room:
                found[f"{where}:{line}: {module} imports {imported}, private to another room"] = None
    return list(found)  # in file order, each once


def test_every_import_goes_down_the_layer_order():
    assert violations() == []


def test_an_upward_import_is_caught(tmp_path):
    """The check itself: imports that climb, lazily or in a code string, or cross between CLIs or
    into another room's private module, are each red."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "fastlenet").mkdir()
    (tmp_path / "kernels" / "bad.py").write_text(
        "def f():\n    from fastlenet.models import LeNet5\n"
        "CODE = '''\nfrom fastlenet.profiling import step_launches\n'''\n")
    (tmp_path / "fastlenet" / "nn.py").write_text("from fastlenet.ops import OPS\n")
    (tmp_path / "fastlenet" / "evaluate.py").write_text("from fastlenet.train import main\n")
    (tmp_path / "fastlenet" / "predict.py").write_text("from fastlenet import _secret\n")
    (tmp_path / "fastlenet" / "newthing.py").write_text("")
    found = "\n".join(violations(tmp_path))
    for expected in ("imports fastlenet.models (modules)", "imports fastlenet.profiling (engine)",
                     "fastlenet.nn (modules) imports fastlenet.ops (ops)",
                     "the CLI fastlenet.evaluate imports the CLI fastlenet.train",
                     "imports fastlenet._secret, private to another room", "newthing is in no room"):
        assert expected in found, (expected, found)


@pytest.mark.parametrize("module,room", [("fastlenet.kernels.launch", "kernels"), ("fastlenet.nn", "modules"),
                                         ("bench.throughput", "top"), ("fastlenet.analysis.report", "top"),
                                         ("fastlenet", "package"), ("fastlenet._cli", None)])
def test_rooms_are_read_as_written(module, room):
    assert room_of(module) == room


def test_every_kernel_has_its_accounting_in_its_own_file():
    """Every launched @triton.jit kernel (a *_kernel) registers its FLOP/byte formulas, from the
    module that defines it, so a retiling and its accounting change in one diff."""
    import importlib

    from fastlenet.kernels import accounting

    kernels = []
    for path in sorted((REPO / "kernels").glob("*.py")):
        module = importlib.import_module(f"fastlenet.kernels.{path.stem}")
        kernels += [(module.__name__, name) for name, value in vars(module).items()
                    if name.endswith("_kernel") and hasattr(value, "fn") and value.fn.__module__ == module.__name__]
    assert len(kernels) == 10, kernels
    missing = [k for k in kernels if k not in accounting.WORK]
    assert not missing, f"kernels without FLOP/byte formulas: {missing}"
    for (module, _), formulas in accounting.WORK.items():
        assert formulas.__module__ == module
