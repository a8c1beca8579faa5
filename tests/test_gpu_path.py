"""The GPU training path end to end: what one step copies between host and device, and exact resume.

Counted by the CuPy stand-in (minivgg/testing/fakecupy), so these run where the GPU backend is
the stand-in: CI and any machine without a GPU. Targets: one device-to-host copy per step (the
packed loss, correct count and gradient norm), none in the layers, the loss, the optimizer or
the data path; host-to-device copies only for the batch itself.
"""
import numpy as np
import pytest

from minivgg import backend, random_stream
from minivgg.data import DataLoader, transforms
from minivgg.losses import SoftmaxCrossEntropy
from minivgg.models import vgg11_bn
from minivgg.optim import Adam, CosineAnnealingLR, LinearWarmup
from minivgg.train import Trainer, evaluate

fake = getattr(backend.cupy, "is_fake", False)
pytestmark = pytest.mark.skipif(not fake, reason="transfer counts come from the CuPy stand-in")


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)


def tiny_model(seed=0, dropout=0.5):
    random_stream.seed(seed)
    return vgg11_bn(num_classes=10, in_channels=1, width_ratio=32, hidden=(16, 16), pool_size=1, dropout=dropout)


def loader(images, labels, device, augment=False, shuffle=True):
    t = transforms.Compose([transforms.RandomCrop(32, padding=2), transforms.RandomHorizontalFlip()]) \
        if augment else None
    return DataLoader(images, labels, batch_size=8, shuffle=shuffle, seed=3, transform=t,
                      normalize=((0.5,), (0.25,)), device=device, prefetch=0)


@pytest.mark.parametrize("clip_norm", [None, 1.0], ids=["no-clip", "clip"])
def test_one_copy_back_per_training_step(tmp_path, clip_norm):
    images, labels = data()
    train = loader(images, labels, "gpu", augment=True)
    model = tiny_model()
    trainer = Trainer(model, Adam(model, lr=1e-3), train, out_dir=tmp_path, device="gpu", progress=False,
                      plots=False, checkpoints=False, clip_norm=clip_norm)
    with backend.cupy.counting() as c:
        trainer.train_epoch(0, 1)
    steps = len(train)
    assert trainer.global_step == steps == 4
    assert c["d2h"] == steps, c          # the packed (loss, correct[, norm]) read, nothing else
    assert c["h2d"] == 2 * steps, c      # x and y of each batch
    assert c["sync"] == 0, c


def test_no_copies_in_layers_loss_optimizer_or_data_path():
    images, labels = data()
    batches = loader(images, labels, "gpu")
    model = tiny_model()
    opt, loss_fn = Adam(model, lr=1e-3), SoftmaxCrossEntropy(label_smoothing=0.1)
    with backend.cupy.counting() as c:
        x, y = next(iter(batches))
    assert (c["h2d"], c["d2h"]) == (2, 0), c
    with backend.cupy.counting() as c:
        model.to("gpu")
    assert c["d2h"] == 0, c
    with backend.cupy.counting() as c:
        loss = loss_fn(model.forward(x), y)
        model.backward(loss_fn.backward())
        opt.step()
    assert c == {"d2h": 0, "h2d": 0, "sync": 0, "launches": c["launches"]} and c["launches"] > 0, c
    assert isinstance(loss, backend.cupy.ndarray)


def test_evaluation_reads_its_totals_once(tmp_path):
    images, labels = data(n=48)
    model = tiny_model().to("gpu")
    val = loader(images, labels, "gpu", shuffle=False)
    with backend.cupy.counting() as c:
        result = evaluate(model, val)
    assert c["d2h"] == 1, c
    # the same numbers as on the CPU
    cpu = evaluate(tiny_model(), loader(images, labels, "cpu", shuffle=False))
    assert result["top1"] == cpu["top1"] and result["top5"] == cpu["top5"]
    np.testing.assert_array_equal(result["confusion"], cpu["confusion"])
    assert result["loss"] == pytest.approx(cpu["loss"], rel=1e-5)


def test_a_bad_label_on_the_gpu_is_named_not_reported_as_divergence(tmp_path):
    images, labels = data()
    labels[5] = 10
    model = tiny_model()
    trainer = Trainer(model, Adam(model, lr=1e-3), loader(images, labels, "gpu", shuffle=False),
                      out_dir=tmp_path, device="gpu", progress=False, plots=False, checkpoints=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\] for 10 classes, got min \d, max 10"):
        trainer.train_epoch(0, 1)


def run(out_dir, max_steps=None, resume=None):
    """Adam + warmup + cosine, BatchNorm, dropout drawn on the device, augmentation: all the state."""
    images, labels = data(n=48)
    model = tiny_model(seed=1)
    opt = Adam(model, lr=1e-2)
    sched = LinearWarmup(opt, warmup_steps=3, after=CosineAnnealingLR(opt, T_max=2))
    random_stream.seed(99)   # a resumed process starts from some other generator state
    trainer = Trainer(model, opt, loader(images, labels, "gpu", augment=True), out_dir=out_dir, device="gpu",
                      scheduler=sched, max_steps=max_steps, progress=False, plots=False)
    trainer.fit(2, resume=resume)
    return model


def test_gpu_resume_is_exact(tmp_path):
    """N steps + save + load + N steps equals 2N steps bit for bit, dropout's device stream included."""
    whole = run(tmp_path / "whole")
    run(tmp_path / "part", max_steps=7)
    resumed = run(tmp_path / "part", resume=tmp_path / "part" / "last.npz")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b), err_msg=name)


def test_gpu_resume_needs_the_saved_device_stream(tmp_path, monkeypatch):
    """The test above can fail: restore everything but the GPU stream and the weights differ."""
    whole = run(tmp_path / "whole")
    run(tmp_path / "part", max_steps=7)
    restore = random_stream.set_rng_state
    monkeypatch.setattr(random_stream, "set_rng_state",
                        lambda state: restore({"cpu": state["cpu"], "gpu": {"seed": 99, "offset": 0}}))
    resumed = run(tmp_path / "part", resume=tmp_path / "part" / "last.npz")
    assert any(not np.array_equal(backend.to_numpy(a), backend.to_numpy(b))
               for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))


def test_one_copy_back_per_data_parallel_step_with_sync_batchnorm(tmp_path):
    """Data parallel on the GPU: SyncBatchNorm2d's statistics and the gradient buckets' global
    count stay on the device (no read per BatchNorm layer, none per step in the all-reduce):
    the step's one packed read is still the only one. One rank, whose all-reduce is the identity."""
    from minivgg.distributed import Distributed
    from minivgg.layers.sync_norm import convert_sync_batchnorm

    class OneRank:   # the sum over one rank, on the device (as NCCL would do it)
        name = "nccl"

        def allreduce_sum_(self, buf):
            return buf

    dist = Distributed.__new__(Distributed)   # no MPI job: the pieces a training step uses
    dist.rank, dist.world, dist.device, dist.bucket_mb, dist._buckets = 0, 1, "gpu", 0.01, None
    dist.engine = OneRank()
    images, labels = data()
    train = loader(images, labels, "gpu")
    model = tiny_model()
    assert convert_sync_batchnorm(model, dist.engine) == 8
    trainer = Trainer(model, Adam(model, lr=1e-3), train, out_dir=tmp_path, device="gpu", progress=False,
                      plots=False, checkpoints=False, clip_norm=1.0, distributed=dist)
    with backend.cupy.counting() as c:
        trainer.train_epoch(0, 1)
    steps = len(train)
    assert trainer.global_step == steps == 4 and len(dist._buckets.buffers) > 1
    assert c["d2h"] == steps, c          # the packed (loss, correct, norm) read, nothing else
    assert c["sync"] == 0, c
