"""Classify image files with a trained minivgg checkpoint: the top-5 classes and their probabilities.

    PYTHONPATH=. python examples/predict.py --checkpoint runs/vgg11_bn-fashion-mnist/best.npz shirt.jpg boot.png
    PYTHONPATH=. python examples/predict.py --pretrained vgg16.safetensors cat.jpg   # ImageNet's top-5
    PYTHONPATH=. python examples/predict.py --checkpoint best.npz --explain out/ boot.png   # what it looks at

With --pretrained, the weights are ImageNet VGG weights as torchvision or timm publish them
(.safetensors read without torch; .pth through torch), and the images get ImageNet's
preprocessing (RGB, shorter side 256, centre crop 224, ImageNet's mean and std).

The checkpoint carries everything needed: the model's config (rebuilt with build_model), its
weights, the class names, the image size and channels, and the normalisation statistics.
Images of any size and mode (RGBA, palette, 16-bit, grayscale JPEG ...) are converted and resized.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

try:
    import minivgg  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH=. or pip install -e .
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EPILOG = """\
examples:
  python examples/predict.py --checkpoint runs/vgg11_bn-fashion-mnist/best.npz photo.jpg
  python examples/predict.py --checkpoint best.npz --top 3 --device gpu *.png
  python examples/predict.py --pretrained vgg16_bn.safetensors cat.jpg
  python examples/predict.py --pretrained vgg16.safetensors --explain explained/ cat.jpg

ImageNet weights: torchvision's vgg16-397923af.pth (its VGG16_Weights.IMAGENET1K_V1), or the
.safetensors of timm's vgg16.tv_in1k on the Hugging Face hub (the same weights).

exit status: 0 done, 2 bad input (checkpoint or image), 4 --explain could not write its files.
"""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="predict.py", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Print the most likely classes of each image under a trained "
                                            "minivgg checkpoint (from examples/train_vgg11.py).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="a best.npz or last.npz")
    src.add_argument("--pretrained", metavar="PATH",
                     help="ImageNet VGG weights (.safetensors, .pth or .npz; torchvision's or timm's "
                          "layout): prints ImageNet's classes")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files of any size and mode")
    p.add_argument("--top", type=int, default=5, metavar="K", help="how many classes to show (default 5)")
    p.add_argument("--device", default="cpu", help="cpu, gpu or gpu:N (default cpu)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, metavar="N",
                   help="refuse an image with more pixels than this, before decoding it (default 40,000,000, "
                        "about 6300x6300, as serve.py)")
    p.add_argument("--explain", metavar="OUTDIR", default=None,
                   help="also write, per image, what the network looks at for its top class: "
                        "OUTDIR/<image>_gradcam.png (Grad-CAM on the last conv block), <image>_saliency.png "
                        "(|d score / d pixel|) and <image>_blocks.png (each block's first feature maps)")
    return p


def explain(model, inputs, mean, std, names, out_dir, paths) -> None:
    """Grad-CAM, saliency and block maps of each preprocessed image (1, C, H, W) as PNGs."""
    from minivgg import backend
    from minivgg.models.explain_draw import write_explanations
    mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, np.float32).reshape(-1, 1, 1)
    for path, x in zip(paths, inputs):
        pixels = np.clip((x[0] * std + mean) * 255 + 0.5, 0, 255).astype(np.uint8)   # (C, H, W) as seen
        written = write_explanations(model, backend.to_device(x, backend.device_of(
            next(iter(model.state_dict().values())))), pixels, out_dir, Path(path).stem, names)
        print(f"explained {path}: " + ", ".join(str(w) for w in written))


def pretrained_probabilities(weights, images, max_pixels, device):
    """ImageNet's class names and the (N, 1000) softmax of a pretrained VGG over image files."""
    from PIL import Image

    from minivgg import backend
    from minivgg.data.folder import load_image
    from minivgg.models.pretrained import imagenet_classes, imagenet_preprocess, load_pretrained
    from minivgg.train import softmax
    model = load_pretrained(weights).to(device).eval()
    names = imagenet_classes() if model.config["num_classes"] == 1000 else \
        [str(k) for k in range(model.config["num_classes"])]
    probs, inputs = [], []
    for path in images:
        pixels = load_image(path, None, 3, max_pixels)                  # (3, H, W) uint8, EXIF applied
        x = imagenet_preprocess(Image.fromarray(pixels.transpose(1, 2, 0)))   # (1, 3, 224, 224)
        logits = backend.to_numpy(model.forward(backend.to_device(x, device)))
        probs.append(softmax(logits.astype(np.float64))[0])
        inputs.append(x)
    return names, np.stack(probs), model, inputs


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    from minivgg.deploy import Predictor   # the model rebuilt from the checkpoint, with its preprocessing
    from minivgg.data.folder import TooManyPixelsError
    from minivgg.train import CheckpointError
    try:
        if args.top < 1:
            raise ValueError(f"--top must be >= 1, got {args.top}")
        if args.max_pixels < 1:
            raise ValueError(f"--max-pixels must be >= 1, got {args.max_pixels}")
        if args.pretrained:
            from minivgg.data import IMAGENET_MEAN, IMAGENET_STD
            classes, probs, model, inputs = pretrained_probabilities(args.pretrained, args.images,
                                                                     args.max_pixels, args.device)
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            predictor = Predictor(args.checkpoint, args.device)
            batch = predictor.preprocess(args.images, args.max_pixels)   # (N, C, H, W)
            classes, probs = predictor.classes, predictor.probabilities_of(batch)
            inputs = [batch[i:i + 1] for i in range(len(batch))]
            model, mean, std = predictor.model, predictor.mean.reshape(-1), predictor.std.reshape(-1)
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError, ImportError) as e:
        message = str(e).strip().splitlines()[0]
        if isinstance(e, TooManyPixelsError):
            message += "; pass --max-pixels N to accept it"
        print(f"error: {message}", file=sys.stderr)
        return 2
    k = min(args.top, probs.shape[1])
    width = max(len(classes[c]) for p in probs for c in np.argsort(-p, kind="stable")[:k])
    for path, p in zip(args.images, probs):
        print(path)
        for rank, c in enumerate(np.argsort(-p, kind="stable")[:k], start=1):
            print(f"  {rank}. {classes[c]:<{width}}  {p[c]:7.2%}")
    if args.explain:
        try:
            explain(model, inputs, mean, std, classes, args.explain, args.images)
        except OSError as e:
            print(f"error: --explain {args.explain}: cannot write there ({e.strerror or e})", file=sys.stderr)
            return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
