"""Serve a trained minivgg model over HTTP: POST an image to /predict, get the top-k classes as JSON.

    PYTHONPATH=. python examples/serve.py --checkpoint runs/vgg11_bn-fashion-mnist/best.npz --port 8000
    curl -F file=@shirt.png http://127.0.0.1:8000/predict

The server is the standard library's ThreadingHTTPServer (minivgg/deploy/server.py): no extra dependency,
unless --onnx runs the model through onnxruntime (pip install -e '.[export]').
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

try:
    import minivgg  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH=. or pip install -e .
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EPILOG = """\
routes:
  POST /predict[?top=K]  the image as the raw body (Content-Type image/png, image/jpeg, ... or
                         application/octet-stream) or as a multipart/form-data file field
  GET  /health           status, backend, classes and input size

examples:
  python examples/serve.py --checkpoint runs/vgg11_bn-fashion-mnist/best.npz
  curl -F file=@shirt.png http://127.0.0.1:8000/predict
  curl --data-binary @shirt.png -H 'Content-Type: image/png' 'http://127.0.0.1:8000/predict?top=3'
  python examples/serve.py --onnx model.onnx --port 8080 --max-concurrent 8

Every answer is JSON: bad uploads get a 4xx {"error": ...} (other methods on a route 405 with Allow);
more than --max-concurrent requests at once get 503 with Retry-After (docs/DEPLOY.md lists every answer).
A body is read whole before it waits for a classification slot, within 30 s.
exit status: 0 stopped with Ctrl-C, 2 bad input (checkpoint, ONNX file, options, a port out of range,
in use or not bindable).
"""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="An HTTP image classifier around a minivgg checkpoint or its ONNX export.")
    p.add_argument("--checkpoint", metavar="PATH", help="a best.npz or last.npz from train_vgg11.py")
    p.add_argument("--onnx", metavar="PATH", help="serve this .onnx file (from export_onnx.py) with onnxruntime; "
                                                  "its metadata carries the preprocessing, so --checkpoint is optional")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0 picks a free one)")
    p.add_argument("--top", type=int, default=5, metavar="K", help="classes per answer unless ?top=K")
    p.add_argument("--max-bytes", type=int, default=10 * 2**20, metavar="N", help="largest upload accepted")
    p.add_argument("--max-concurrent", type=int, default=4, metavar="N",
                   help="requests classified at once; one more gets 503")
    p.add_argument("--device", default="cpu", help="cpu, gpu or gpu:N for the minivgg backend")
    p.add_argument("--quiet", action="store_true", help="do not log each request")
    return p


def load_predictor(args):
    """(predictor, backend name) from --onnx or --checkpoint."""
    from minivgg.deploy import OnnxPredictor, Predictor
    if args.onnx:
        return OnnxPredictor(args.onnx), "onnxruntime"
    if not args.checkpoint:
        raise ValueError("give --checkpoint PATH (or --onnx PATH)")
    return Predictor(args.checkpoint, args.device), "minivgg"


def stop_on_signals() -> None:
    """Ctrl-C (SIGINT) and a process manager's SIGTERM both stop the server cleanly. Set explicitly:
    a process started in the background by a non-interactive shell inherits SIGINT *ignored*,
    and would otherwise never hear Ctrl-C."""
    def stop(signum, frame):
        raise KeyboardInterrupt
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    from minivgg.deploy.server import make_server
    from minivgg.train import CheckpointError
    try:
        predictor, backend = load_predictor(args)
        server = make_server(predictor, args.host, args.port, backend=backend, top_k=args.top,
                             max_bytes=args.max_bytes, max_concurrent=args.max_concurrent,
                             log=None if args.quiet else sys.stderr)
    except (CheckpointError, FileNotFoundError, ValueError, ImportError, OSError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"serving {backend} model ({len(predictor.classes)} classes, {predictor.channels}x"
          f"{predictor.image_size[0]}x{predictor.image_size[1]}) on {server.url}  (Ctrl-C stops)", flush=True)
    print(f"try: curl -F file=@image.png {server.url}/predict", flush=True)
    stop_on_signals()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
