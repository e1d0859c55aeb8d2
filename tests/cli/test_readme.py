"""The Python snippets of the README and of docs/ run as written (on a CPU where they say how), and
docs/testing.md tells a contributor what they need."""
import re
import tomllib

import torch

from utils import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def snippet(containing: str) -> str:
    """The one ```python block, in README.md and docs/*.md together, holding `containing`."""
    blocks = [b for path in DOCS for b in re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
              if containing in b]
    assert len(blocks) == 1, (containing, len(blocks))
    return blocks[0]


def test_checkpoint_snippet_loads_what_train_writes(mnist_dir, tmp_path, capsys):
    from fastlenet import train

    out = tmp_path / "run"
    status = train.main(["--limit-train", "64", "--limit-test", "32", "--epochs", "1", "--batch-size", "32",
                         "--data-dir", str(mnist_dir), "--out", str(out), "--no-plot", "--device", "cpu"])
    assert status == 0, capsys.readouterr().err
    code = snippet('["model"]')
    # The block's path and .cuda() are the only things a CPU reader changes.
    code = code.replace("runs/lenet5/checkpoint.pt", str(out / "checkpoint.pt")).replace(".cuda()", "")
    start = code.index("# LeNet-5, fused")
    scope = {}
    exec("import torch, fastlenet\n" + code[start:], scope)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(scope["model"].state_dict()[k], v) for k, v in saved.items())


def test_drop_in_snippet_builds_what_it_says(device):
    import fastlenet

    code = snippet("fastlenet.ConvActPool2d(")
    scope = {}
    start = code.index("# Drop-in modules")
    end = code.index("# LeNet-5, fused")
    exec("import torch, fastlenet\n" + code[start:end], scope)
    assert scope["conv"].stride == (1, 1) and scope["conv"].padding == (2, 2)
    assert scope["logits"].activation == "identity"
    assert isinstance(scope["fc"], fastlenet.LinearAct)


def test_autocast_snippet_casts_on_a_cpu(device):
    """Run as written, on this machine's device: the layers run in float16, the loss in float32,
    the float32 weights get float32 gradients."""
    import fastlenet
    from fastlenet import functional as FF

    model = fastlenet.LeNet5("lenet5", fused=True).to(device)
    scope = dict(torch=torch, FF=FF, model=model, x=torch.randn(3, 1, 28, 28, device=device),
                 target=torch.tensor([1, 0, 7], device=device),
                 optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    exec(snippet("torch.autocast(device"), scope)
    assert scope["logits"].dtype == torch.float16
    assert scope["loss"].dtype == torch.float32
    assert model.conv1.weight.grad.dtype == torch.float32


def test_tests_section_says_how_long_and_how_to_go_faster():
    """docs/testing.md (the README links to it) says how long the suite takes, how to go faster, and
    where the tests find MNIST."""
    assert "(docs/testing.md)" in (REPO / "README.md").read_text()
    section = (REPO / "docs" / "testing.md").read_text()
    assert "FASTLENET_TEST_DATA" in section
    assert re.search(r"\d+ minutes", section), "how long the whole suite takes on a CPU"
    quick = re.search(r"python -m pytest -m \"([^\"]+)\"", section)
    assert quick, "a quick subset"
    markers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    declared = {m.split(":")[0] for m in markers}
    used = set(re.findall(r"\b(?!not\b|and\b|or\b)(\w+)\b", quick.group(1)))
    assert used and used <= declared, (used, declared)
