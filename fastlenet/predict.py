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
4. normalised with the mean and standard deviation of the checkpoint's dataset.

It prints the top class and its probability (softmax of the logits) for each image, or the top K
with --top K, or one JSON document with --json. The checkpoint is checked as fastlenet.evaluate
checks it and loaded into the reference model on the CPU unless --fused / --device say otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fastlenet import _cli
from fastlenet._cli import CLIError

if TYPE_CHECKING:
    import torch
    from PIL import Image

SIZE = 28  # MNIST's and Fashion-MNIST's images are 28x28
LIGHT_BACKGROUND = 127.5  # --invert auto: a border mean above this is a light background


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastlenet.predict", formatter_class=_cli.HelpFormatter,
        description="Classify images with a checkpoint written by fastlenet.train. Each image is converted "
                    "as MNIST images are: grayscale (transparent pixels as white), inverted if it is "
                    f"dark-on-light (see --invert), fitted into {SIZE}x{SIZE} with its aspect ratio kept "
                    "and padded with black, and normalised with the mean and std of the checkpoint's dataset.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint.pt or best.pt written by fastlenet.train")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (PNG, JPEG, or any other format Pillow reads)")
    p.add_argument("--top", type=_cli.positive_int, default=1, metavar="K", help="print the K most likely classes")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                   help="invert the grayscale image (255 - pixel) to make it light-on-dark like the training "
                        "images; auto: invert when the mean of the image's outermost pixels (its one-pixel "
                        f"frame, on the 0-255 scale) is above {LIGHT_BACKGROUND}, i.e. the background is light")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="auto: CUDA if there is a GPU, else the CPU; a few images need no GPU")
    p.add_argument("--fused", action="store_true",
                   help="run the fused Triton model (CUDA; CPU only under TRITON_INTERPRET=1); by default any "
                        "checkpoint, fused or not, loads into the reference torch.nn model")
    return p


def main(argv: list[str] | None = None) -> int:
    return _cli.run(predict, build_parser(), argv)


def predict(args: argparse.Namespace) -> int:
    import torch

    from fastlenet import data, train

    device = _cli.choose_device(args.device)
    path = Path(args.checkpoint)
    checkpoint = _cli.load_checkpoint(path)
    dataset = checkpoint["config"].get("dataset", "mnist")
    names = data.CLASS_NAMES[dataset]
    if args.top > len(names):
        raise CLIError(f"--top {args.top}: the model has {len(names)} classes")
    if args.fused:
        _cli.check_fused_backend(device)
    model = _cli.checkpoint_model(checkpoint, path, args.fused, device)

    images, inverted = [], []
    for name in args.images:
        pixels, was_inverted = prepare(open_image(Path(name)), args.invert)
        images.append(pixels)
        inverted.append(was_inverted)
    x = data.normalize(torch.stack(images).to(device), *data.NORMALIZATION[dataset])
    probabilities = torch.softmax(train.predict(model, x).float(), dim=1).cpu()
    top = probabilities.topk(args.top, dim=1)

    results = [{"image": name, "inverted": inv,
                "top": [{"class": c, "name": names[c], "probability": p}
                        for c, p in zip(classes.tolist(), probs.tolist())]}
               for name, inv, probs, classes in zip(args.images, inverted, top.values, top.indices)]
    if args.json:
        print(json.dumps({"checkpoint": str(path), "epoch": checkpoint["epoch"], "variant": model.variant,
                          "dataset": dataset, "device": str(device), "fused": model.fused, "invert": args.invert,
                          "predictions": results}, indent=2))
        return 0
    print(f"checkpoint {path}: {model.variant} on {dataset}, epoch {checkpoint['epoch']} | device {device} | "
          f"{'fused Triton' if model.fused else 'reference torch.nn'} model")
    for result in results:
        ranked = ", ".join(f"{t['name']} {t['probability']:.2%}" for t in result["top"])
        print(f"{result['image']}: {ranked}" + ("  (inverted)" if result["inverted"] else ""))
    return 0


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
        why = e.strerror or f"damaged or truncated: {_cli.one_line(e)}"  # Pillow's own have no errno
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
