"""Metrics against values worked out by hand; plots that open as real, non-blank PNGs."""
import math

import numpy as np
import pytest
from PIL import Image

from minivgg.layers import Layer
from minivgg.train import (confusion_matrix, evaluate, per_class_accuracy, plot_confusion, plot_history,
                           plot_image_grid, topk_accuracy)

# 4 samples, 6 classes. Worked by hand:
#   s0 label 0: argmax 0                              -> top-1 yes, top-5 yes
#   s1 label 1: 4 classes score higher (2, 3, 4, 5)   -> top-1 no (pred 5), top-5 yes
#   s2 label 2: 2 classes score higher (0, 1)         -> top-1 no (pred 0), top-5 yes
#   s3 label 5: 5 classes score higher                -> top-1 no (pred 4), top-5 no
LOGITS = np.array([[5, 1, 0, 0, 0, 0],
                   [0, 1, 2, 3, 4, 5],
                   [6, 5, 4, 3, 2, 1],
                   [1, 2, 3, 4, 5, 0]], dtype=np.float32)
LABELS = np.array([0, 1, 2, 5])


def test_topk_accuracy_by_hand():
    assert topk_accuracy(LOGITS, LABELS, 1) == 0.25
    assert topk_accuracy(LOGITS, LABELS, 5) == 0.75
    assert topk_accuracy(LOGITS, LABELS, 6) == 1.0
    assert topk_accuracy(LOGITS[:, :3], np.array([0, 1, 2, 2]), 5) == 1.0   # k capped at K


def test_confusion_and_per_class_by_hand():
    cm = confusion_matrix(LABELS, LOGITS.argmax(axis=1), 6)
    expected = np.zeros((6, 6), dtype=np.int64)
    expected[0, 0] = expected[1, 5] = expected[2, 0] = expected[5, 4] = 1
    assert np.array_equal(cm, expected)
    acc = per_class_accuracy(cm)
    assert acc[0] == 1.0 and acc[1] == 0.0 and acc[2] == 0.0 and acc[5] == 0.0
    assert np.isnan(acc[3]) and np.isnan(acc[4])          # no samples of classes 3 and 4
    cm2 = confusion_matrix([0, 0, 0, 1], [0, 0, 1, 1], 2)
    assert np.allclose(per_class_accuracy(cm2), [2 / 3, 1.0])


class LookupModel(Layer):
    """Returns LOGITS[i] for an input holding the sample index i: a model with known outputs."""

    def forward(self, x):
        return LOGITS[x[:, 0, 0, 0].astype(int)]


def test_evaluate_combines_batches_and_restores_train_mode():
    x = np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1)
    loader = [(x[:3], LABELS[:3]), (x[3:], LABELS[3:])]      # uneven batches
    model = LookupModel().train()
    out = evaluate(model, loader, keep_examples=2)
    log_p = LOGITS - np.log(np.exp(LOGITS).sum(axis=1, keepdims=True))
    assert math.isclose(out["loss"], -log_p[np.arange(4), LABELS].mean(), rel_tol=1e-5)
    assert out["top1"] == 0.25 and out["top5"] == 0.75 and out["n"] == 4
    assert out["confusion"].sum() == 4 and out["confusion"][1, 5] == 1
    assert model.training
    assert list(out["examples"]["labels"]) == [0, 1]
    assert list(out["mistakes"]["labels"]) == [1, 2] and list(out["mistakes"]["preds"]) == [5, 0]


def assert_png(path, min_w=300, min_h=200):
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= min_w and h >= min_h and w < 4000 and h < 4000, im.size
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.std() > 5, "the image is blank"


def test_history_plot(tmp_path):
    history = [{"epoch": 1, "train_loss": 2.0, "train_acc": 0.3, "val_loss": 1.8, "val_top1": 0.4, "val_top5": 0.8},
               {"epoch": 2, "train_loss": 1.2, "train_acc": 0.6, "val_loss": 1.3, "val_top1": 0.55, "val_top5": 0.9},
               {"epoch": 3, "train_loss": 0.9, "train_acc": 0.7}]          # no validation this epoch
    assert_png(plot_history(history, tmp_path / "history.png"), min_w=600)


def test_confusion_plot(tmp_path):
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 20, (10, 10)) + np.diag(rng.integers(50, 100, 10))
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"]
    assert_png(plot_confusion(cm, names, tmp_path / "confusion.png"))


@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid(tmp_path, channels):
    rng = np.random.default_rng(0)
    mean, std = [0.5] * channels, [0.25] * channels
    images = rng.standard_normal((12, channels, 32, 32)).astype(np.float32)   # normalised pixels
    labels, preds = rng.integers(0, 3, 12), rng.integers(0, 3, 12)
    path = plot_image_grid(images, labels, preds, rng.random(12), ["cat", "dog", "bird"],
                           tmp_path / "grid.png", title="predictions", mean=mean, std=std)
    assert_png(path, min_w=500)
    empty = plot_image_grid(np.zeros((0, channels, 32, 32)), [], [], [], None, tmp_path / "none.png")
    with Image.open(empty) as im:
        assert im.size[0] > 50
