"""Classify your own images: python -m fastlenet.predict CHECKPOINT IMAGE... [flags] (see --help).

Each image (any format Pillow reads: PNG, JPEG, ...; any size and mode) is made to look like the
images the checkpoint was trained on before the model sees it:

1. grayscale (ITU-R 601-2 luma; transparent pixels count as white, as on a page; 16-bit samples
   scaled to 8 bits; a JPEG's EXIF orientation applied);
2. inverted when it is dark-on-light, since MNIST and Fashion-MNIST are light-on-dark: with
   --invert auto, when the mean of its outermost pixels (the one-pixel frame, its background)
   is above 127.5 on the 0-255 scale;
3. fitted into 28x28, aspect ratio kept: the longer side scaled to 28 (Lanczos resampling), the
   image centred and the rest filled with black, the background after step 2;
4. normalised as the checkpoint's network takes its input: with the mean and standard deviation of
   its dataset, or, for lenet5-1998, so that the background (0) is -0.1 and the ink (255) 1.175, the 1998
   paper's scale.

It prints the top class and its probability (softmax of the logits) for each image, or the top K
with --top K, or one JSON document with --json; on stderr, a hint for each image whose top
probability is below 50%. --save-preprocessed DIR writes the 28x28 image the model saw, as a PNG,
for each input. The checkpoint is checked as fastlenet.evaluate checks it and loaded into the
reference model on the CPU unless --fused / --device say otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fastlenet import cli
from fastlenet.checkpoint import checkpoint_model, load_checkpoint
from fastlenet.cli import CLIError
from fastlenet.files import write_bytes

if TYPE_CHECKING:
    import torch
    from PIL import Image

SIZE = 28  # MNIST's and Fashion-MNIST's images are 28x28
LIGHT_BACKGROUND = 127.5  # --invert auto: a border mean above this is a light background
LOW_CONFIDENCE = 0.5  # a top probability below this: the model is more likely wrong than right
# Why an image the model is unsure of often differs from the training images, and what to try.
HINTS = {"mnist": "the digit may be drawn with thin strokes or cropped tightly; try thicker strokes or a "
                  "margin around the digit",
         "fashion-mnist": "the item may be cropped tightly or on a busy background; try one item on a plain "
                          "background with a margin around it"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastlenet.predict", formatter_class=cli.HelpFormatter,
        description="Classify images with a checkpoint written by fastlenet.train. Each image is converted "
                    "as MNIST images are: grayscale (transparent pixels as white), inverted if it is "
                    f"dark-on-light (see --invert), fitted into {SIZE}x{SIZE} with its aspect ratio kept "
                    "and padded with black, and normalised as the checkpoint's network takes its input (its dataset's "
                    "mean and std; lenet5-1998: the 1998 paper's -0.1 to 1.175). "
                    f"A top probability below {LOW_CONFIDENCE:.0%} gets a hint on stderr on what to try.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint.pt or best.pt written by fastlenet.train")
    p.add_argument("images", metavar="IMAGE", nargs="+",
                   help="image files (PNG, JPEG, or any other format Pillow reads)")
    p.add_argument("--top", type=cli.positive_int, default=1, metavar="K", help="print the K most likely classes")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                   help="invert the grayscale image (255 - pixel) to make it light-on-dark like the training "
                        "images; auto: invert when the mean of the image's outermost pixels (its one-pixel "
                        f"frame, on the 0-255 scale) is above {LIGHT_BACKGROUND}, i.e. the background is light")
    p.add_argument("--save-preprocessed", type=Path, metavar="DIR",
                   help=f"write each image as the model sees it ({SIZE}x{SIZE}, after the conversion above) as a PNG "
                        f"in DIR, created if missing: digit.png becomes DIR/digit-{SIZE}x{SIZE}.png")
    p.add_argument("--device", choices=cli.DEVICE_CHOICES, default="cpu",
                   help="auto: CUDA if there is a GPU, else the CPU; a few images need no GPU")
    p.add_argument("--fused", action="store_true",
                   help="run the fused Triton model (CUDA; CPU only under TRITON_INTERPRET=1); by default any "
                        "checkpoint, fused or not, loads into the reference torch.nn model")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(predict, build_parser(), argv)


def predict(args: argparse.Namespace) -> int:
    import torch

    from fastlenet import data, engine

    device = cli.choose_device(args.device)
    path = Path(args.checkpoint)
    checkpoint = load_checkpoint(path)
    dataset = checkpoint["config"].get("dataset", "mnist")
    names = data.CLASS_NAMES[dataset]
    if args.top > len(names):
        raise CLIError(f"--top {args.top}: the model has {len(names)} classes")
    if args.fused:
        cli.check_fused_backend(device)
    model = checkpoint_model(checkpoint, path, args.fused, device)

    images, inverted = [], []
    for name in args.images:
        pixels, was_inverted = prepare(open_image(Path(name)), args.invert)
        images.append(pixels)
        inverted.append(was_inverted)
    mean, std = engine.input_normalization(model.variant, dataset)
    x = data.normalize(torch.stack(images).to(device), mean, std)
    probabilities = torch.softmax(engine.predict(model, x).float(), dim=1).cpu()
    top = probabilities.topk(args.top, dim=1)

    results = [{"image": name, "inverted": inv,
                "top": [{"class": c, "name": names[c], "probability": p}
                        for c, p in zip(classes.tolist(), probs.tolist())]}
               for name, inv, probs, classes in zip(args.images, inverted, top.values, top.indices)]
    saved = None
    if args.save_preprocessed is not None:
        # Only now that every input has been read: a mistyped image name leaves no empty directory.
        saved = preprocessed_paths(args.images, cli.prepare_out_dir(args.save_preprocessed, "--save-preprocessed"))
        save_preprocessed(x, mean, std, saved)
        for result, written in zip(results, saved):
            result["preprocessed"] = str(written)
    if args.json:
        print(json.dumps({"checkpoint": str(path), "epoch": checkpoint["epoch"], "variant": model.variant,
                          "dataset": dataset, "device": str(device), "fused": model.fused, "invert": args.invert,
                          "predictions": results}, indent=2))
    else:
        print(f"checkpoint {path}: {model.variant} on {dataset}, epoch {checkpoint['epoch']} | device {device} | "
              f"{'fused Triton' if model.fused else 'reference torch.nn'} model")
        for result in results:
            ranked = ", ".join(f"{t['name']} {t['probability']:.2%}" for t in result["top"])
            print(f"{result['image']}: {ranked}" + ("  (inverted)" if result["inverted"] else ""))
    # Hints go to stderr: stdout stays one line per image, or one JSON document. Flushed first, so
    # that a log of both streams has them after the predictions.
    sys.stdout.flush()
    for result, probability in zip(results, top.values[:, 0].tolist()):
        if probability < LOW_CONFIDENCE:
            print(low_confidence_hint(result["image"], probability, dataset, result.get("preprocessed")),
                  file=sys.stderr)
    if saved:
        print(f"saved the {SIZE}x{SIZE} image{'s' if len(saved) > 1 else ''} the model saw in "
              f"{args.save_preprocessed}: {', '.join(p.name for p in saved)}",
              file=sys.stderr if args.json else sys.stdout)
    return 0


def low_confidence_hint(image: str, probability: float, dataset: str, preprocessed: str | None) -> str:
    # Truncated, not rounded: 49.96% must not read "50.0%" in a line that says it is below 50%.
    percent = f"{math.floor(probability * 1000) / 10:.1f}%"
    see = (f"{preprocessed} shows what the model sees" if preprocessed else
           "or --save-preprocessed DIR to see what the model sees")
    return f"{image}: low confidence ({percent}): {HINTS[dataset]}{'; ' if preprocessed else ', '}{see}"


def preprocessed_paths(images: list[str], directory: Path) -> list[Path]:
    """DIR/<name>-28x28.png for each input image, with -2, -3, ... where two inputs share a name
    (a/digit.png, b/digit.png); never the path of an input, so that no user image is overwritten."""
    taken = {Path(name).resolve() for name in images}
    paths = []
    for name in images:
        stem = f"{Path(name).stem}-{SIZE}x{SIZE}"
        path, n = directory / f"{stem}.png", 1
        while path.resolve() in taken:
            n += 1
            path = directory / f"{stem}-{n}.png"
        taken.add(path.resolve())
        paths.append(path)
    return paths


def save_preprocessed(x: torch.Tensor, mean: float, std: float, paths: list[Path]) -> None:
    """Write the model's input x [N, 1, 28, 28] as 8-bit grayscale PNGs, one per path: the
    normalisation undone (pixel = 255 * (x * std + mean)), so reading one back and normalising it
    gives the input again."""
    import io

    import torch
    from PIL import Image

    pixels = x.detach().float().cpu()[:, 0].mul(std).add(mean).mul(255).round().clamp(0, 255).to(torch.uint8)
    for image, path in zip(pixels, paths):
        buffer = io.BytesIO()
        Image.fromarray(image.numpy()).save(buffer, format="PNG")
        write_bytes(path, buffer.getvalue())


def open_image(path: Path) -> Image.Image:
    """The image at `path`, decoded in full (so that a truncated file fails here) and turned upright
    as its EXIF orientation says, or one line saying why it cannot be read."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise CLIError(f"image {path} does not exist" if not path.exists() else f"image {path} is not a file")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise CLIError(f"{path} is not an image Pillow can read (PNG, JPEG, ...)") from None
    except Image.DecompressionBombError:
        raise CLIError(f"image {path} has more pixels than Pillow opens (Image.MAX_IMAGE_PIXELS)") from None
    except OSError as e:
        why = e.strerror or f"damaged or truncated: {cli.one_line(e)}"  # Pillow's own have no errno
        raise CLIError(f"cannot read image {path} ({why})") from None
    except Exception as e:  # noqa: BLE001 - Pillow's decoders fail in many ways on damaged files
        raise CLIError(f"cannot read image {path}: damaged or unsupported ({type(e).__name__})") from None


def prepare(image: Image.Image, invert: str = "auto") -> tuple[torch.Tensor, bool]:
    """The image as a uint8 tensor [28, 28], light-on-dark like MNIST (steps 1-3 of the module's
    docstring), and whether it was inverted."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    gray = grayscale(image)
    pixels = np.asarray(gray)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    inverted = invert == "yes" or (invert == "auto" and border.mean() > LIGHT_BACKGROUND)
    if inverted:
        gray = ImageOps.invert(gray)
    width, height = gray.size
    scale = SIZE / max(width, height)
    fitted = (max(1, round(width * scale)), max(1, round(height * scale)))
    if fitted != gray.size:
        gray = gray.resize(fitted, Image.Resampling.LANCZOS)
    canvas = Image.new("L", (SIZE, SIZE), 0)
    canvas.paste(gray, ((SIZE - fitted[0]) // 2, (SIZE - fitted[1]) // 2))
    return torch.from_numpy(np.array(canvas)), bool(inverted)


def grayscale(image: Image.Image) -> Image.Image:
    """8-bit grayscale ("L"): transparency composited over white, 16- and 32-bit integer samples
    scaled from 0-65535 (Pillow's own conversion would clip them at 255)."""
    import numpy as np
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        samples = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(samples / 257), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("L")


if __name__ == "__main__":
    sys.exit(main())
