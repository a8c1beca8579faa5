"""The final exercise: VGG-11-BN on Fashion-MNIST with the learner's layers in place of
minivgg's, trained by the project's Trainer through its public API."""
from __future__ import annotations

from pathlib import Path

from .. import random_stream
from ..data import FASHION_MNIST_CLASSES, DataLoader, load_fashion_mnist, prepare_images, transforms
from ..data.transforms import compute_mean_std
from ..models.vgg import VGG
from ..optim import make_scheduler
from ..train import Trainer
from ..train.metrics import evaluate
from .generate import EXERCISES
from .grade import check_workspace, load

# The quick start's model (examples/train_vgg11.py defaults): VGG-11-BN at 1/8 width,
# 32x32 inputs, a 256-256 head on a 1x1 pool, no dropout, Xavier init; Adam 2e-3.
MODEL = dict(arch="vgg11_bn", num_classes=10, in_channels=1, width_ratio=8, head="classic",
             hidden=(256, 256), pool_size=1, dropout=0.0, init="xavier")


def learner_classes(directory) -> dict:
    """{shipped class name: the learner's class} for every exercise file in the workspace."""
    found = {}
    for ex in EXERCISES:
        path = Path(directory) / f"{ex.name}.py"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the workspace needs every exercise to train")
        found[ex.cls] = getattr(load(path), ex.cls)
    return found


def substitute(model, classes: dict):
    """Put the learner's classes in place of minivgg's, in every layer of `model`.

    The learner's class is cut from the same source as the shipped one, so a layer keeps its
    state (params, buffers, settings) and only its methods change: its class is swapped. A
    tuned engine (TunedConv2d) becomes the learner's textbook class it derives from.
    Returns the number of layers swapped.
    """
    swapped = 0
    for _, layer in model.modules():
        # by the class or the nearest base named like an exercise: the models build the tuned
        # engine (TunedConv2d, a Conv2d), and the learner's Conv2d is the textbook one
        mine = next((classes[c.__name__] for c in type(layer).__mro__ if c.__name__ in classes), None)
        if mine is not None and type(layer) is not mine:
            layer.__class__ = mine
            swapped += 1
    return swapped


def train(directory, epochs: int = 12, batch_size: int = 128, lr: float = 2e-3, train_subset=None,
          test_subset=None, seed: int = 0, out_dir=None, data_dir=None, progress: bool = True,
          device: str = "cpu") -> dict:
    """Train on the learner's layers; returns {'history', 'test', 'swapped'}.

    Refuses (ValueError) unless every exercise passes `check` first: a gap or a wrong gradient
    would otherwise surface as a crash, or a run that learns nothing, minutes in.
    """
    unfinished = [f"{r.name} ({r.status})" for r in check_workspace(directory, device=device)
                  if r.status != "passed"]
    if unfinished:
        raise ValueError(f"training needs every exercise to pass check first; not yet: {', '.join(unfinished)}")
    classes = learner_classes(directory)
    random_stream.seed(seed)
    images, labels = load_fashion_mnist("train", data_dir=data_dir)
    test_images, test_labels = load_fashion_mnist("test", data_dir=data_dir)
    if train_subset:
        images, labels = images[:train_subset], labels[:train_subset]
    if test_subset:
        test_images, test_labels = test_images[:test_subset], test_labels[:test_subset]
    x = prepare_images(images, size=(32, 32))                              # (N, 1, 32, 32) uint8
    xt = prepare_images(test_images, size=(32, 32))
    norm = compute_mean_std(x)
    flips = transforms.RandomHorizontalFlip()                              # the quick start's augmentation
    train_loader = DataLoader(x, labels, batch_size, shuffle=True, seed=seed, normalize=norm, transform=flips,
                              device=device)
    test_loader = DataLoader(xt, test_labels, batch_size, shuffle=False, normalize=norm, device=device)
    model = VGG(**MODEL)          # on the host; the Trainer moves it to `device`
    swapped = substitute(model, classes)
    optimizer = classes["Adam"](model, lr=lr)
    schedule = make_scheduler("cosine", optimizer, epochs, len(train_loader))
    out = Path(out_dir) if out_dir is not None else Path(directory) / "run"
    trainer = Trainer(model, optimizer, train_loader, loss_fn=classes["SoftmaxCrossEntropy"](), scheduler=schedule,
                      out_dir=out, class_names=FASHION_MNIST_CLASSES, plots=False, progress=progress,
                      checkpoints=False, device=device)
    history = trainer.fit(epochs)
    test = evaluate(model, test_loader, classes["SoftmaxCrossEntropy"]())
    return {"history": history, "test": {"loss": float(test["loss"]), "top1": float(test["top1"]),
                                         "n": int(test["n"])}, "swapped": swapped}
