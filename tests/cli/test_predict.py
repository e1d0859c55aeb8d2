"""python -m fastlenet.predict, run in-process on images written by the tests, on the CPU.

The checkpoints come from one short training run (the way users get theirs); the images are real
MNIST test images saved as PNG, and variations of them a user might have instead: dark ink on light
paper, colour, another size, JPEG, transparency, 16 bits, a rotated photo. What the tool prints is
checked against the model's own softmax on the expected input tensor, computed here without the
tool's code wherever the expected input is known exactly.
"""
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from fastlenet import data, engine, predict, train
from fastlenet.models import LeNet5

from utils import REPO, assert_one_line_error, run_cli

FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]


@pytest.fixture(scope="module")
def run_dir(mnist_dir, tmp_path_factory):
    """A short --val-split run: its directory holds checkpoint.pt and best.pt."""
    out = tmp_path_factory.mktemp("trained")
    assert train.main(["--limit-train", "2048", "--limit-test", "100", "--epochs", "2", "--val-split", "0.1",
                       "--no-plot", "--data-dir", str(mnist_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def digits(mnist_dir):
    """Four MNIST test images (uint8 [4, 28, 28]) of four different digits."""
    test = data.load("mnist", mnist_dir, splits=("test",), log=lambda _: None).test
    return test.images[:4]


def probabilities(checkpoint_path, images: torch.Tensor, dataset: str = "mnist") -> torch.Tensor:
    """The softmax of the checkpoint's model, loaded as a plain LeNet5, on uint8 images [N, 28, 28]."""
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    model = LeNet5(checkpoint["config"]["variant"]).eval()
    model.load_state_dict(checkpoint["model"])
    mean, std = data.NORMALIZATION[dataset]
    with torch.no_grad():
        return torch.softmax(model((images.float() / 255 - mean).div(std).unsqueeze(1)), dim=1)


def save_png(path, pixels) -> pathlib.Path:
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)
    return path


def run(capsys, *args):
    return run_cli(capsys, predict.main, *args)


def run_json(capsys, *args) -> list[dict]:
    status, out, err = run(capsys, *args, "--json")
    assert status == 0, err
    return json.loads(out)["predictions"]


def assert_matches(prediction: dict, expected: torch.Tensor, names=None) -> None:
    """prediction's top K are the K most likely classes of `expected` (probabilities [10]), in order."""
    k = len(prediction["top"])
    values, classes = expected.topk(k)
    assert [t["class"] for t in prediction["top"]] == classes.tolist()
    assert [t["probability"] for t in prediction["top"]] == pytest.approx(values.tolist(), abs=1e-6)
    assert [t["name"] for t in prediction["top"]] == [(names or [str(d) for d in range(10)])[c] for c in classes]


# --------------------------------------------------------------------------------------------------
# What it prints
# --------------------------------------------------------------------------------------------------

def test_mnist_pngs_give_the_models_own_probabilities(run_dir, digits, tmp_path, capsys):
    paths = [save_png(tmp_path / f"digit{i}.png", image) for i, image in enumerate(digits)]
    expected = probabilities(run_dir / "best.pt", digits)
    predictions = run_json(capsys, run_dir / "best.pt", *paths, "--top", 3)
    assert [p["image"] for p in predictions] == [str(p) for p in paths]
    for prediction, probs in zip(predictions, expected):
        assert prediction["inverted"] is False  # MNIST is light-on-dark already
        assert_matches(prediction, probs)

    status, out, err = run(capsys, run_dir / "checkpoint.pt", *paths)
    header, *lines = out.strip().splitlines()
    assert header.startswith(f"checkpoint {run_dir / 'checkpoint.pt'}: lenet5 on mnist, epoch 2")
    assert "reference torch.nn model" in header
    expected = probabilities(run_dir / "checkpoint.pt", digits)
    # stderr: a hint for each image the short run's model is unsure of, nothing else.
    unsure = [f"{path}: low confidence (" for path, probs in zip(paths, expected) if probs.max() < 0.5]
    assert status == 0 and len(err.splitlines()) == len(unsure)
    assert all(line.startswith(start) for line, start in zip(err.splitlines(), unsure)), err
    assert len(lines) == len(paths)
    for line, path, probs in zip(lines, paths, expected):
        name, percent = re.fullmatch(rf"{re.escape(str(path))}: (\S+) ([\d.]+)%", line).groups()
        assert int(name) == probs.argmax().item()
        assert float(percent) == pytest.approx(100 * probs.max().item(), abs=0.0051)


def test_top_k(run_dir, digits, tmp_path, capsys):
    path = save_png(tmp_path / "digit.png", digits[0])
    (prediction,) = run_json(capsys, run_dir / "best.pt", path, "--top", 10)
    assert_matches(prediction, probabilities(run_dir / "best.pt", digits[:1])[0])
    assert sorted(t["class"] for t in prediction["top"]) == list(range(10))
    assert sum(t["probability"] for t in prediction["top"]) == pytest.approx(1, abs=1e-5)
    status, out, _ = run(capsys, run_dir / "best.pt", path, "--top", 3)
    assert status == 0 and out.strip().splitlines()[-1].count("%") == 3


def test_json_is_one_document(run_dir, digits, tmp_path, capsys):
    paths = [save_png(tmp_path / f"{i}.png", image) for i, image in enumerate(digits[:2])]
    status, out, _ = run(capsys, run_dir / "best.pt", *paths, "--json")
    assert status == 0
    document = json.loads(out)  # the whole of stdout
    best_epoch = torch.load(run_dir / "best.pt", weights_only=True)["epoch"]
    assert {k: document[k] for k in ("checkpoint", "epoch", "variant", "dataset", "device", "fused", "invert")} == {
        "checkpoint": str(run_dir / "best.pt"), "epoch": best_epoch, "variant": "lenet5", "dataset": "mnist",
        "device": "cpu", "fused": False, "invert": "auto"}
    assert len(document["predictions"]) == 2


def checkpoint_with_top_probability(run_dir, path, probability: float) -> pathlib.Path:
    """The short run's checkpoint with its last layer replaced by constant logits: for every input,
    class 7 has `probability` and the other nine share the rest equally."""
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    probs = torch.full((10,), (1 - probability) / 9, dtype=torch.float64)
    probs[7] = probability
    checkpoint["model"]["fc3.weight"] = torch.zeros_like(checkpoint["model"]["fc3.weight"])
    checkpoint["model"]["fc3.bias"] = probs.log().float()
    torch.save(checkpoint, path)
    return path


def test_low_confidence_gets_one_hint_per_image_on_stderr(run_dir, digits, tmp_path, capsys):
    paths = [save_png(tmp_path / f"digit{i}.png", image) for i, image in enumerate(digits[:2])]
    unsure = checkpoint_with_top_probability(run_dir, tmp_path / "unsure.pt", 0.3849)
    status, out, err = run(capsys, unsure, *paths)
    assert status == 0 and len(out.strip().splitlines()) == 1 + len(paths)  # stdout as without hints
    hints = err.strip().splitlines()
    assert len(hints) == len(paths)
    for hint, path in zip(hints, paths):
        assert hint.startswith(f"{path}: low confidence (38.4%): ")
        assert "thicker strokes" in hint and hint.endswith("or --save-preprocessed DIR to see what the model sees")

    # --json: stdout stays one document; the hints are still on stderr.
    status, out, err = run(capsys, unsure, *paths, "--json")
    assert status == 0 and len(json.loads(out)["predictions"]) == len(paths)
    assert len(err.strip().splitlines()) == len(paths)

    # Just under 50% is low, and says so: the percentage is truncated, never rounded up to 50.0%.
    status, _, err = run(capsys, checkpoint_with_top_probability(run_dir, tmp_path / "edge.pt", 0.49996), paths[0])
    assert status == 0 and err.startswith(f"{paths[0]}: low confidence (49.9%): ")

    # With --save-preprocessed the hint points at the picture of what the model saw.
    saved = tmp_path / "seen"
    status, _, err = run(capsys, unsure, paths[0], "--save-preprocessed", saved)
    assert status == 0 and err.strip().endswith(f"; {saved / 'digit0-28x28.png'} shows what the model sees")


def test_high_confidence_gets_no_hint(run_dir, digits, tmp_path, capsys):
    sure = checkpoint_with_top_probability(run_dir, tmp_path / "sure.pt", 0.9)
    paths = [save_png(tmp_path / f"digit{i}.png", image) for i, image in enumerate(digits[:2])]
    status, out, err = run(capsys, sure, *paths)
    assert status == 0 and err == ""
    assert out.strip().splitlines()[1] == f"{paths[0]}: 7 90.00%"  # the constant logits did reach the output
    status, _, err = run(capsys, checkpoint_with_top_probability(run_dir, tmp_path / "half.pt", 0.5001), paths[0])
    assert status == 0 and err == ""


# --------------------------------------------------------------------------------------------------
# --save-preprocessed: a picture of what the model sees
# --------------------------------------------------------------------------------------------------

def test_saved_images_are_the_models_input(run_dir, digits, tmp_path, capsys, monkeypatch):
    """Read back and normalised, each saved PNG is the tensor the model got, within rounding; two
    inputs of the same name get two files; the directory is created."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [save_png(tmp_path / "a" / "digit.png", digits[0]),
             save_png(tmp_path / "b" / "digit.png", 255 - digits[1]),  # inverted by the tool
             tmp_path / "photo.jpg"]  # colour, not square, resized by the tool
    ink = Image.fromarray(255 - digits[2].numpy()).resize((60, 90), Image.Resampling.BICUBIC)
    ImageOps.colorize(ink, black=(20, 20, 80), white=(250, 245, 220)).save(paths[2], quality=95)
    inputs = []
    real_predict = engine.predict
    monkeypatch.setattr(engine, "predict", lambda model, x: inputs.append(x.clone()) or real_predict(model, x))
    out_dir = tmp_path / "out" / "seen"  # two levels that do not exist yet

    status, out, err = run(capsys, run_dir / "best.pt", *paths, "--save-preprocessed", out_dir)
    assert status == 0, err
    names = ["digit-28x28.png", "digit-28x28-2.png", "photo-28x28.png"]
    assert out.strip().splitlines()[-1] == f"saved the 28x28 images the model saw in {out_dir}: {', '.join(names)}"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(names)  # no temporary files left
    (x,) = inputs
    mean, std = data.NORMALIZATION["mnist"]
    saved = []
    for i, name in enumerate(names):
        with Image.open(out_dir / name) as image:
            assert image.format == "PNG" and image.mode == "L" and image.size == (28, 28)
            saved.append(torch.from_numpy(np.array(image)))
        again = data.normalize(saved[-1][None], mean, std)[0]
        assert (again - x[i]).abs().max() <= 0.5 / 255 / std, name  # half a grey level
    assert torch.equal(saved[0], digits[0]) and torch.equal(saved[1], digits[1])  # known exactly
    # 60x90 scaled to 19x28 and centred: the columns beside it are black, the ink is there.
    assert saved[2][:, :4].eq(0).all() and saved[2][:, 23:].eq(0).all() and saved[2][:, 4:23].max() > 200

    # --json: stdout stays one document that names each file; the line saying where goes to stderr.
    predictions = json.loads(run(capsys, run_dir / "best.pt", *paths, "--save-preprocessed", out_dir, "--json")[1])
    assert [p["preprocessed"] for p in predictions["predictions"]] == [str(out_dir / n) for n in names]
    assert capsys.readouterr() == ("", "")  # run() already took both streams
    status, _, err = run(capsys, run_dir / "best.pt", paths[0], "--save-preprocessed", out_dir, "--json")
    assert status == 0 and err.strip().splitlines()[-1].startswith(f"saved the 28x28 image the model saw in {out_dir}")


def test_saving_into_the_inputs_folder_overwrites_no_input(run_dir, digits, tmp_path, capsys):
    first = save_png(tmp_path / "digit.png", digits[0])
    second = save_png(tmp_path / "digit-28x28.png", digits[1])  # the name the first one's picture would take
    before = second.read_bytes()
    status, out, err = run(capsys, run_dir / "best.pt", first, second, "--save-preprocessed", tmp_path)
    assert status == 0, err
    assert second.read_bytes() == before
    assert out.strip().endswith(": digit-28x28-2.png, digit-28x28-28x28.png")
    with Image.open(tmp_path / "digit-28x28-2.png") as image:
        assert np.array_equal(np.array(image), digits[0].numpy())


def test_save_preprocessed_into_a_file(run_dir, digits, tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("not a directory")
    status, out, err = run(capsys, run_dir / "best.pt", save_png(tmp_path / "d.png", digits[0]),
                           "--save-preprocessed", a_file)
    assert_one_line_error(status, err, f"--save-preprocessed {a_file}", "not a directory")
    assert out == ""


# --------------------------------------------------------------------------------------------------
# Making a user's image look like MNIST
# --------------------------------------------------------------------------------------------------

def test_dark_on_light_is_inverted(run_dir, digits, tmp_path, capsys):
    light = save_png(tmp_path / "light.png", digits[0])
    dark_on_light = save_png(tmp_path / "dark-on-light.png", 255 - digits[0])
    original, negative = probabilities(run_dir / "best.pt", torch.stack([digits[0], 255 - digits[0]]))
    auto = run_json(capsys, run_dir / "best.pt", light, dark_on_light, "--top", 10)
    assert [p["inverted"] for p in auto] == [False, True]
    for prediction in auto:
        assert_matches(prediction, original)  # inverted back exactly
    (kept,) = run_json(capsys, run_dir / "best.pt", dark_on_light, "--invert", "no", "--top", 10)
    assert kept["inverted"] is False
    assert_matches(kept, negative)
    (forced,) = run_json(capsys, run_dir / "best.pt", light, "--invert", "yes", "--top", 10)
    assert forced["inverted"] is True
    assert_matches(forced, negative)
    status, out, _ = run(capsys, run_dir / "best.pt", dark_on_light)
    assert status == 0 and out.strip().endswith("(inverted)")


def test_inversion_is_decided_by_the_border():
    """A light frame means a light background, whatever the middle holds; a mean-based rule would
    call this mostly-dark image light-on-dark."""
    pixels = np.zeros((28, 28), np.uint8)
    pixels[[0, -1], :] = pixels[:, [0, -1]] = 200
    assert predict.prepare(Image.fromarray(pixels))[1] is True
    pixels[[0, -1], :] = pixels[:, [0, -1]] = 120
    assert predict.prepare(Image.fromarray(pixels))[1] is False


@pytest.mark.parametrize("size, placed", [((28, 14), (slice(7, 21), slice(None))),  # wide: rows padded
                                          ((14, 28), (slice(None), slice(7, 21)))])  # tall: columns padded
def test_non_square_rgb_is_fitted_and_centred(digits, size, placed):
    content = np.asarray(Image.fromarray(digits[1].numpy()).resize(size, Image.Resampling.NEAREST))
    image = Image.fromarray(content).convert("RGB")
    pixels, inverted = predict.prepare(image)
    assert pixels.shape == (28, 28) and pixels.dtype == torch.uint8 and not inverted
    assert np.array_equal(pixels[placed].numpy(), content)  # already fits: not resampled
    padding = torch.ones(28, 28, dtype=torch.bool)
    padding[placed] = False
    assert pixels[padding].eq(0).all()
    # Twice the size: scaled down to the same place, close to the content.
    bigger, _ = predict.prepare(image.resize((2 * size[0], 2 * size[1]), Image.Resampling.NEAREST))
    assert bigger[padding].eq(0).all()
    assert np.corrcoef(bigger[placed].numpy().ravel(), content.ravel())[0, 1] > 0.97


def test_colour_jpeg_photo_of_a_digit(run_dir, digits, tmp_path, capsys):
    """Dark blue ink on cream paper, 3x MNIST's size, saved as JPEG: inverted, scaled down, close to
    the MNIST image it came from, and classified as the tool's own preprocessing says."""
    enlarged = Image.fromarray(255 - digits[2].numpy()).resize((84, 84), Image.Resampling.BICUBIC)
    ink_on_paper = ImageOps.colorize(enlarged, black=(20, 20, 80), white=(250, 245, 220))
    path = tmp_path / "photo.jpg"
    ink_on_paper.save(path, quality=95)
    pixels, inverted = predict.prepare(predict.open_image(path))
    assert inverted
    assert np.corrcoef(pixels.numpy().ravel(), digits[2].numpy().ravel())[0, 1] > 0.99
    (prediction,) = run_json(capsys, run_dir / "best.pt", path, "--top", 10)
    assert prediction["inverted"] is True
    assert_matches(prediction, probabilities(run_dir / "best.pt", pixels[None])[0])


def test_transparent_background_counts_as_white(digits, tmp_path):
    """Black ink whose opacity is the digit, on a transparent background (as drawing programs save it)."""
    alpha = digits[0].numpy()
    rgba = np.stack([np.zeros_like(alpha)] * 3 + [alpha], axis=-1)
    path = tmp_path / "transparent.png"
    Image.fromarray(rgba, "RGBA").save(path)
    pixels, inverted = predict.prepare(predict.open_image(path))
    assert inverted
    assert np.abs(pixels.numpy().astype(int) - alpha).max() <= 1


def test_16_bit_grayscale_is_scaled_not_clipped(digits, tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(digits[3].numpy().astype(np.uint16) * 257).save(path)
    image = predict.open_image(path)
    assert image.mode.startswith("I")
    assert np.array_equal(predict.prepare(image)[0].numpy(), digits[3].numpy())


def test_exif_orientation_is_applied(digits, tmp_path):
    """A phone stores a photo sideways with an EXIF orientation tag; a viewer shows it upright."""
    upright = Image.fromarray(digits[0].numpy())
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "sideways.png"
    upright.rotate(90, expand=True).save(path, exif=exif)  # stored turned 90 degrees counter-clockwise
    assert np.array_equal(predict.prepare(predict.open_image(path))[0].numpy(), digits[0].numpy())


# --------------------------------------------------------------------------------------------------
# Checkpoints of other kinds
# --------------------------------------------------------------------------------------------------

def test_fashion_mnist_checkpoint_uses_its_class_names_and_normalisation(run_dir, digits, tmp_path, capsys):
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    checkpoint["config"]["dataset"] = "fashion-mnist"  # as a --dataset fashion-mnist run writes it
    torch.save(checkpoint, tmp_path / "fashion.pt")
    path = save_png(tmp_path / "item.png", digits[0])
    (prediction,) = run_json(capsys, tmp_path / "fashion.pt", path, "--top", 10)
    assert data.CLASS_NAMES["fashion-mnist"] == FASHION_NAMES
    assert_matches(prediction, probabilities(tmp_path / "fashion.pt", digits[:1], "fashion-mnist")[0], FASHION_NAMES)
    status, out, _ = run(capsys, tmp_path / "fashion.pt", path)
    top = FASHION_NAMES[prediction["top"][0]["class"]]
    assert status == 0 and f"{path}: {top} " in out and "on fashion-mnist" in out


def test_checkpoint_of_a_fused_run_loads_into_the_reference_model(run_dir, digits, tmp_path, capsys):
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    checkpoint["config"]["fused"] = True  # as a --fused run writes it: the same state_dict keys
    torch.save(checkpoint, tmp_path / "fused.pt")
    path = save_png(tmp_path / "digit.png", digits[1])
    expected = probabilities(tmp_path / "fused.pt", digits[1:2])[0]
    from fastlenet.kernels.launch import record_launches

    with record_launches() as launches:
        status, out, _ = run(capsys, tmp_path / "fused.pt", path)
    assert status == 0 and "reference torch.nn model" in out
    assert launches == []  # no Triton kernel ran
    assert_matches(run_json(capsys, tmp_path / "fused.pt", path, "--top", 10)[0], expected)


def test_fused_flag_runs_the_fused_model(run_dir, digits, tmp_path, capsys):
    from fastlenet.kernels.launch import interpreting, record_launches

    if not torch.cuda.is_available() and not interpreting():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    path = save_png(tmp_path / "digit.png", digits[1])
    with record_launches() as launches:
        status, out, _ = run(capsys, run_dir / "best.pt", path, "--fused", "--device", "auto", "--json", "--top", 10)
    assert status == 0 and json.loads(out)["fused"] is True
    assert len(launches) == 5  # one Triton kernel per layer: the fused model ran
    got = {t["class"]: t["probability"] for t in json.loads(out)["predictions"][0]["top"]}
    expected = probabilities(run_dir / "best.pt", digits[1:2])[0]
    assert [got[c] for c in range(10)] == pytest.approx(expected.tolist(), abs=1e-4)


# --------------------------------------------------------------------------------------------------
# User errors: exit status 2, one line, nothing on stdout
# --------------------------------------------------------------------------------------------------

def _text(path):
    path.write_text("not an image")


def _empty(path):
    path.write_bytes(b"")


def _truncated(path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)  # incompressible
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[:2000])


def _directory(path):
    path.mkdir()


BAD_IMAGES = {
    "missing": (lambda path: None, "does not exist"),
    "a directory": (_directory, "is not a file"),
    "text": (_text, "is not an image Pillow can read"),
    "empty": (_empty, "is not an image Pillow can read"),
    "truncated": (_truncated, "damaged or truncated"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_image(case, run_dir, digits, tmp_path, capsys):
    make, fragment = BAD_IMAGES[case]
    bad = tmp_path / "bad.png"
    make(bad)
    good = save_png(tmp_path / "good.png", digits[0])
    status, out, err = run(capsys, run_dir / "best.pt", good, bad)
    assert_one_line_error(status, err, fragment, str(bad))
    assert out == ""  # every image is read before anything is printed


def _state_dict_only(run_dir, path):
    torch.save(torch.load(run_dir / "best.pt", weights_only=True)["model"], path)


def _other_variant(run_dir, path):
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    checkpoint["config"]["variant"] = "lenet5-nopad"
    torch.save(checkpoint, path)


BAD_CHECKPOINTS = {
    "missing": (lambda run_dir, path: None, "does not exist"),
    "an image": (lambda run_dir, path: Image.new("L", (28, 28)).save(path, format="PNG"), "not a zip archive"),
    "truncated": (lambda run_dir, path: path.write_bytes((run_dir / "best.pt").read_bytes()[:5000]), "truncated"),
    "a list": (lambda run_dir, path: torch.save([1, 2, 3], path), "holds a list"),
    "a bare state_dict": (_state_dict_only, "no model, config, epoch entry"),
    "another variant": (_other_variant, "does not fit a 'lenet5-nopad' model"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint(case, run_dir, digits, tmp_path, capsys):
    make, fragment = BAD_CHECKPOINTS[case]
    path = tmp_path / "model.pt"
    make(run_dir, path)
    status, out, err = run(capsys, path, save_png(tmp_path / "digit.png", digits[0]))
    assert_one_line_error(status, err, fragment, str(path))
    assert out == ""


def test_top_beyond_the_classes(run_dir, digits, tmp_path, capsys):
    status, _, err = run(capsys, run_dir / "best.pt", save_png(tmp_path / "d.png", digits[0]), "--top", 11)
    assert_one_line_error(status, err, "--top 11", "10 classes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(run_dir, digits, tmp_path, capsys):
    status, _, err = run(capsys, run_dir / "best.pt", save_png(tmp_path / "d.png", digits[0]), "--device", "cuda")
    assert_one_line_error(status, err, "no CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fused_without_cuda_or_interpreter(run_dir, digits, tmp_path, capsys, monkeypatch):
    from fastlenet.kernels import launch

    monkeypatch.setattr(launch, "interpreting", lambda: False)
    status, _, err = run(capsys, run_dir / "best.pt", save_png(tmp_path / "d.png", digits[0]), "--fused")
    assert_one_line_error(status, err, "need a CUDA GPU", "TRITON_INTERPRET=1")


# --------------------------------------------------------------------------------------------------
# Before anything runs: --help, the console script
# --------------------------------------------------------------------------------------------------

def test_help_says_how_images_are_converted_without_importing_torch_or_pillow():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "fastlenet.predict", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())
    for needed in ("--top K", "--json", "--invert {auto,yes,no}", "--device {auto,cpu,cuda}", "--fused",
                   "--save-preprocessed DIR", "below 50%",
                   "outermost pixels", "above 127.5", "aspect ratio", "(default: cpu)"):
        assert needed in text, needed
    imported = re.findall(r"^import time:.*\|\s*([\w.]+)\s*$", proc.stderr, re.M)
    assert "argparse" in imported
    assert not [m for m in imported if m.split(".")[0] in ("torch", "numpy", "triton", "PIL")]


def test_console_scripts_name_real_entry_points():
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fastlenet-predict"] == "fastlenet.predict:main"
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target
