"""A trained model ready to classify images: rebuilt from a checkpoint (minivgg) or loaded from an
exported .onnx file (onnxruntime), with the preprocessing it was trained with. Used by
examples/predict.py and the HTTP server (minivgg/deploy/server.py).

Preprocessing, the same in both: uint8 (N, C, H, W) images -> x = (images / 255 - mean) / std, float32.
"""
from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..data.folder import _check_channels, _chw, _resize, _size_hw, _to_mode, load_image

MAX_PIXELS = 40_000_000   # a decoded upload larger than this (about 6300x6300) is refused before decoding


def decode_image(data: bytes, image_size, channels: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> uint8 (C, H, W), as load_image does for a file.

    Raises ValueError naming the problem: empty, not an image, truncated, or too many pixels.
    """
    size_hw, channels = _size_hw(image_size), _check_channels(channels)
    if not data:
        raise ValueError("empty image: 0 bytes received")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ValueError(f"image of {w}x{h} pixels is larger than the {max_pixels:,} pixels accepted")
            if size_hw is not None:
                img.draft(None, (max(size_hw),) * 2)   # JPEG only: decode at a reduced scale
            img.load()   # decode now: a truncated file fails here
            ImageOps.exif_transpose(img, in_place=True)
            return _chw(_resize(_to_mode(img, channels), size_hw))
    except ValueError:
        raise
    except UnidentifiedImageError:
        raise ValueError(f"not an image: no image format (JPEG, PNG, GIF, BMP, TIFF, WebP ...) recognised "
                         f"in the {len(data):,} bytes received") from None
    except Exception as e:   # PIL: UnidentifiedImageError, OSError (truncated), SyntaxError ...
        raise ValueError(f"cannot decode the image ({len(data):,} bytes): {type(e).__name__}: {e}") from e


class _Preprocessing:
    """What every predictor shares: classes, input size and normalisation, and the steps around logits()."""

    classes: list
    image_size: tuple
    channels: int
    mean: np.ndarray   # (1, C, 1, 1) float32
    std: np.ndarray    # (1, C, 1, 1) float32

    def _set_preprocessing(self, image_size, channels, mean, std, classes):
        self.image_size = tuple(int(s) for s in image_size)
        self.channels = int(channels)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
        self.classes = [str(c) for c in classes]

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) -> the float32 (N, C, H, W) batch the model was trained on."""
        x = images.astype(np.float32) / np.float32(255)   # (N, C, H, W)
        return (x - self.mean) / self.std

    def preprocess(self, paths, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
        """Image files -> float32 (N, C, H, W); a file over max_pixels is refused before decoding."""
        return self.normalize(np.stack([load_image(p, self.image_size, self.channels, max_pixels)
                                        for p in paths]))

    def logits(self, x: np.ndarray) -> np.ndarray:   # pragma: no cover - each predictor defines it
        raise NotImplementedError

    def probabilities_of(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, C, H, W) -> (N, K) softmax probabilities, float64."""
        from ..train import softmax
        return softmax(np.asarray(self.logits(x), dtype=np.float64))

    def probabilities(self, paths, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
        """Image files -> (N, K) softmax probabilities."""
        return self.probabilities_of(self.preprocess(paths, max_pixels))

    def top_k(self, probs: np.ndarray, k: int) -> list[list[dict]]:
        """(N, K) probabilities -> per image the k best [{"class", "index", "probability"}]."""
        k = min(int(k), probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]    # (N, k)
        return [[{"class": self.classes[c], "index": int(c), "probability": float(p[c])} for c in row]
                for p, row in zip(probs, order)]


def checkpoint_preprocessing(ckpt: dict) -> dict:
    """The preprocessing a train_vgg11.py checkpoint records: image_size, channels, mean, std, classes."""
    from ..train import CheckpointError
    path, extra, config = ckpt.get("path", "checkpoint"), ckpt["extra"], ckpt["config"]
    if not config:
        raise CheckpointError(f"{path}: holds no model config, so the model cannot be rebuilt")
    for key in ("image_size", "channels", "normalize"):
        if key not in extra:
            raise CheckpointError(f"{path}: holds no '{key}' (it was not written by train_vgg11.py)")
    K = config["num_classes"]
    return {"image_size": list(extra["image_size"]), "channels": int(extra["channels"]),
            "mean": list(extra["normalize"]["mean"]), "std": list(extra["normalize"]["std"]),
            "classes": list(extra.get("class_names") or [str(k) for k in range(K)])}


class Predictor(_Preprocessing):
    """A minivgg model rebuilt from a checkpoint (its config and weights), in eval mode.

    Layers keep a cache from their last forward, so one lock lets one thread at a time run the model.
    """

    def __init__(self, path, device="cpu"):
        from ..models import build_model
        from ..train import load_checkpoint, restore
        ckpt = load_checkpoint(path)
        self.meta = checkpoint_preprocessing(ckpt)
        self.config = ckpt["config"]
        self.model = build_model(self.config)
        restore(ckpt, self.model)
        self.model.to(device).eval()
        self.device, self.path = device, Path(path)
        self._set_preprocessing(self.meta["image_size"], self.meta["channels"], self.meta["mean"],
                                self.meta["std"], self.meta["classes"])
        self._lock = threading.Lock()

    def logits(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, C, H, W) -> float32 (N, K) logits, on the host."""
        from .. import backend
        with self._lock:
            return backend.to_numpy(self.model.forward(backend.to_device(x, self.device)))   # (N, K)


class OnnxPredictor(_Preprocessing):
    """An exported .onnx file run by onnxruntime; the preprocessing is read from its metadata."""

    def __init__(self, path):
        import onnxruntime as ort
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX model at {path}")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:   # onnxruntime raises its own exception types
            raise ValueError(f"{path}: onnxruntime cannot load it: {type(e).__name__}: {e}") from e
        props = self.session.get_modelmeta().custom_metadata_map
        try:
            meta = {k: json.loads(props[k]) for k in ("image_size", "channels", "mean", "std", "class_names")}
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: not exported by minivgg (metadata {sorted(props)} lacks the "
                             f"preprocessing; missing or unreadable {e})") from e
        self._set_preprocessing(meta["image_size"], meta["channels"], meta["mean"], meta["std"],
                                meta["class_names"])
        self.config = json.loads(props.get("config", "null"))
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, C, H, W) -> float32 (N, K); onnxruntime sessions may be run from many threads."""
        return self.session.run(["logits"], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
