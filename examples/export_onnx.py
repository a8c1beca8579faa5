"""Export a trained minivgg checkpoint as an ONNX model, for onnxruntime and other deployment tools.

    PYTHONPATH=. python examples/export_onnx.py --checkpoint runs/vgg11_bn-fashion-mnist/best.npz --out model.onnx

Needs the export extra: pip install -e '.[export]' (onnx and onnxruntime).
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
The graph takes float32 (N, C, H, W) with a dynamic batch N and returns "logits" and "probabilities".
Its metadata_props hold the preprocessing as JSON (image_size, channels, mean, std, scale 1/255),
the class names and the model config. After writing, the file is checked with onnx.checker and
run by onnxruntime on random inputs against minivgg's own forward.

examples:
  python examples/export_onnx.py --checkpoint runs/vgg11_bn-fashion-mnist/best.npz --out model.onnx
  python examples/serve.py --checkpoint runs/vgg11_bn-fashion-mnist/best.npz --onnx model.onnx

exit status: 0 written and verified, 1 onnxruntime disagrees with minivgg, 2 bad input (a checkpoint,
an --out that is the checkpoint), 4 the file could not be written (as train_vgg11.py; the old file stands).
A temp file a killed export left beside --out is removed by the next export to that name.
"""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export_onnx.py", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Write a minivgg checkpoint as an ONNX graph with its preprocessing "
                                            "in the metadata, and verify it with onnxruntime.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a best.npz or last.npz from train_vgg11.py")
    p.add_argument("--out", required=True, metavar="PATH", help="the .onnx file to write")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the onnxruntime comparison after writing")
    return p


def verify(checkpoint, onnx_path, n: int = 4, seed: int = 0) -> float:
    """Largest |onnxruntime - minivgg| logit difference on n random inputs, relative to the largest logit."""
    from minivgg.deploy import OnnxPredictor, Predictor
    ref, ort = Predictor(checkpoint), OnnxPredictor(onnx_path)
    x = np.random.default_rng(seed).standard_normal((n, ref.channels, *ref.image_size)).astype(np.float32)
    a, b = ref.logits(x), ort.logits(x)   # (n, K) each
    return float(np.abs(a - b).max() / max(float(np.abs(a).max()), 1e-30))


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    from minivgg.train import CheckpointError
    try:
        from minivgg.deploy.onnx_export import export_checkpoint
        path = export_checkpoint(args.checkpoint, args.out)
        err = verify(args.checkpoint, path) if args.verify else None
    except (CheckpointError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    except OSError as e:   # the write failed (a folder in the way, permission, disk full): the old file stands
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 4
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if err is not None:
        print(f"onnxruntime vs minivgg on 4 random inputs: max |diff| / max |logit| = {err:.1e}")
        if err > 1e-5:
            print("error: onnxruntime's logits differ from minivgg's beyond float32 tolerance", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
