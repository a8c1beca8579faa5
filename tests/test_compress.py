"""Compression's training loop and command: the sparsity and teacher terms, a pruned network as an ordinary
checkpoint (predict, export, resume), examples/compress.py's bad input refused before any compute, and
the whole command on a few real Fashion-MNIST images."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import minivgg
from deploy_helpers import fashion_checkpoint, small_model

from minivgg.data import DataLoader
from minivgg.distill import DistillationLoss
from minivgg.layers import BatchNorm2d
from minivgg.models.prune import prune
from minivgg.optim import SGD
from minivgg.train import Trainer
from minivgg.train.compress_trainer import CompressTrainer

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _compress_cli():
    spec = importlib.util.spec_from_file_location("compress_cli", ROOT / "examples" / "compress.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)


def _grads_after_one_batch(trainer_cls, **kw):
    model = small_model(in_channels=1, dropout=0.0)   # no dropout masks: the losses compare exactly
    images, labels = _data()
    loader = DataLoader(images, labels, batch_size=16, shuffle=False, normalize=((0.3,), (0.3,)))
    t = trainer_cls(model, SGD(model, lr=0.0), loader, checkpoints=False, plots=False, progress=False, **kw)
    model.train()
    x, y = next(iter(loader))
    loss, _ = t._micro_batch(x, y)
    return model, float(loss), {n: {k: g.copy() for k, g in m.grads.items()} for n, m in model.modules()
                                if isinstance(m, BatchNorm2d)}


def test_sparsity_adds_lambda_sign_gamma_to_every_batchnorm_scale_and_its_loss():
    lam = 1e-3
    model, plain_loss, plain = _grads_after_one_batch(Trainer)
    model2, loss, slim = _grads_after_one_batch(CompressTrainer, sparsity=lam)
    gammas = {n: m.params["weight"] for n, m in model2.modules() if isinstance(m, BatchNorm2d)}
    assert len(gammas) == 8
    for n, g in gammas.items():
        np.testing.assert_allclose(slim[n]["weight"], plain[n]["weight"] + lam * np.sign(g), rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(slim[n]["bias"], plain[n]["bias"])
    penalty = lam * sum(float(np.abs(g).sum()) for g in gammas.values())
    assert loss == pytest.approx(plain_loss + penalty, rel=1e-5)


def test_teacher_term_is_the_distillation_loss_and_the_teacher_is_left_alone():
    teacher = small_model(in_channels=1, seed=7)
    before = {k: v.copy() for k, v in teacher.state_dict().items()}
    model, loss, _ = _grads_after_one_batch(CompressTrainer, teacher=teacher, temperature=3.0, alpha=0.6)
    assert not teacher.training
    images, labels = _data()
    x = (images.astype(np.float32) / 255 - 0.3) / 0.3
    model.train()
    want = DistillationLoss(3.0, 0.6).forward(model.forward(x), labels, teacher.forward(x))
    assert loss == pytest.approx(float(want), rel=1e-5)
    for k, v in teacher.state_dict().items():
        np.testing.assert_array_equal(v, before[k])          # eval mode: not even running statistics move
    assert all(not m.grads for _, m in teacher.modules() if m.params)   # no backward ran through it
    with pytest.raises(ValueError, match="sparsity must be >= 0"):
        CompressTrainer(model, SGD(model, lr=0.1), [], sparsity=-1.0)


def test_a_pruned_network_is_an_ordinary_checkpoint(tmp_path):
    """Fine-tuned, saved, loaded by the predictor, exported to ONNX, resumed: all from its own config."""
    ort = pytest.importorskip("onnxruntime")   # noqa: F841
    from minivgg.deploy import OnnxPredictor, Predictor
    from minivgg.deploy.onnx_export import export_checkpoint
    _, model = fashion_checkpoint(tmp_path / "base.npz")
    small = prune(model, 0.5, "bn", 2)
    images, labels = _data(32)
    norm = ((0.3,), (0.3,))
    extra = {"image_size": [32, 32], "channels": 1, "normalize": {"mean": [0.3], "std": [0.3]}}
    loader = DataLoader(images, labels, batch_size=16, shuffle=True, seed=0, normalize=norm)

    def trainer(m):
        return CompressTrainer(m, SGD(m, lr=0.01, momentum=0.9), loader, out_dir=tmp_path / "pruned",
                               extra=extra, plots=False, progress=False, sparsity=1e-4, teacher=model)
    t = trainer(small)
    minivgg.seed(0)                                          # dropout's masks: the same in both runs
    t.fit(1)
    pred = Predictor(t.last_path)
    assert pred.config["channels"] == small.config["channels"]
    x = np.random.default_rng(3).normal(size=(4, 1, 32, 32)).astype(np.float32)
    small.eval()
    np.testing.assert_array_equal(pred.logits(x), small.forward(x))
    onnx_path = export_checkpoint(t.last_path, tmp_path / "pruned.onnx")
    got, want = OnnxPredictor(onnx_path).logits(x), pred.logits(x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # resume to 2 epochs equals 2 epochs straight (the CPU run is bit-repeatable)
    again = prune(model, 0.5, "bn", 2)
    straight = CompressTrainer(again, SGD(again, lr=0.01, momentum=0.9), loader, out_dir=tmp_path / "straight",
                               extra=extra, plots=False, progress=False, sparsity=1e-4, teacher=model)
    minivgg.seed(0)
    straight.fit(2)
    resumed = prune(model, 0.5, "bn", 2)
    t2 = trainer(resumed)
    t2.fit(2, resume=t.last_path)
    assert t2.epoch == 2
    for k, v in resumed.state_dict().items():
        np.testing.assert_array_equal(v, again.state_dict()[k], err_msg=k)


BAD = [
    (["prune", "--checkpoint", "nowhere.npz", "--ratio", "0.5", "--out", "o"], "--checkpoint nowhere.npz does not exist"),
    (["prune", "--checkpoint", "{ck}", "--ratio", "1.5", "--out", "o"], r"--ratio is the fraction of channels to remove: expected a number in \[0, 1\), got 1.5"),
    (["prune", "--checkpoint", "{ck}", "--ratio", "0.5", "--sparsity", "1e-4", "--out", "o"], "--sparsity LAMBDA .* and --sparsity-epochs K .* go together"),
    (["prune", "--checkpoint", "{ck}", "--fewer-params", "0.5", "--out", "o"], "--fewer-params F: expected a factor > 1"),
    (["distill", "--teacher", "missing/best.npz", "--out", "o"], "--teacher missing/best.npz does not exist"),
    (["distill", "--teacher", "{ck}", "--alpha", "2", "--out", "o"], r"--alpha in \[0, 1\]"),
    (["quantize", "--checkpoint", "{ck}", "--out", "model.int8"], "expected a file name ending in .onnx"),
    (["quantize", "--checkpoint", "{ck}", "--out", "x.onnx", "--percentile", "30"], r"--percentile must be in \(50, 100\]"),
    (["fp16", "--checkpoint", "nowhere.npz", "--out", "x.onnx"], "--checkpoint nowhere.npz does not exist"),
    (["table", "--model", "base", "--out", "t.md"], "expected NAME=PATH"),
    (["table", "--model", "base={ck}", "--model", "base={ck}", "--out", "t.md"], "every row needs its own NAME"),
    (["table", "--model", "int8=gone.onnx", "--out", "t.md"], "--model int8: gone.onnx does not exist"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_input_is_one_clear_line_before_any_compute(argv, message, tmp_path, capsys, monkeypatch):
    import re
    import minivgg.data
    cli = _compress_cli()
    ck, _ = fashion_checkpoint(tmp_path / "ck.npz")

    def no_data(*a, **k):
        raise AssertionError("data was loaded before the arguments were checked")
    monkeypatch.setattr(minivgg.data, "load_fashion_mnist", no_data)
    monkeypatch.chdir(tmp_path)
    rc = cli.main([a.replace("{ck}", str(ck)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def test_missing_command_and_help(capsys):
    cli = _compress_cli()
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("prune", "distill", "quantize", "fp16", "table", "exit status"):
        assert word in out
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_the_whole_command_on_a_few_fashion_mnist_images(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from minivgg.deploy import OnnxPredictor, Predictor
    cli = _compress_cli()
    ck, _ = fashion_checkpoint(tmp_path / "base.npz", head="gap", width_ratio=16)
    common = ["--epochs", "1", "--train-subset", "64", "--test-subset", "60", "--no-progress"]
    assert cli.main(["prune", "--checkpoint", str(ck), "--ratio", "0.5", "--min-channels", "2",
                     "--out", str(tmp_path / "pruned")] + common) == 0
    report = json.loads((tmp_path / "pruned" / "prune.json").read_text())
    assert report["params_after"] < report["params_before"]
    pruned = tmp_path / "pruned" / "best.npz"
    assert Predictor(pruned).config["channels"] == report["channels_after"]
    assert cli.main(["distill", "--teacher", str(ck), "--shrink", "2", "--out", str(tmp_path / "student")]
                    + common) == 0
    assert Predictor(tmp_path / "student" / "best.npz").config["width_ratio"] == 32
    # each trained network's test score (test.json) is its best.npz's, on the first 60 test images
    from minivgg.data import load_fashion_mnist, prepare_images
    images, labels = load_fashion_mnist("test", download=False)
    x = prepare_images(images[:60], size=(32, 32), channels=1)
    for run in ("pruned", "student"):
        score = json.loads((tmp_path / run / "test.json").read_text())
        p = Predictor(tmp_path / run / "best.npz")
        assert score["images"] == 60 and score["checkpoint"] == str(tmp_path / run / "best.npz")
        assert score["top1"] == np.mean(p.logits(p.normalize(x)).argmax(1) == labels[:60])
    assert cli.main(["quantize", "--checkpoint", str(pruned), "--out", str(tmp_path / "p.int8.onnx"),
                     "--calibration", "16", "--no-progress"]) == 0
    assert "largest difference 0 step(s)" in capsys.readouterr().out
    assert cli.main(["fp16", "--checkpoint", str(pruned), "--out", str(tmp_path / "p.fp16.onnx")]) == 0
    assert OnnxPredictor(tmp_path / "p.int8.onnx").logits(np.zeros((2, 1, 32, 32), np.float32)).shape == (2, 10)
    table = tmp_path / "t.md"
    assert cli.main(["table", "--model", f"base={ck}", "--model", f"pruned={pruned}",
                     "--model", f"int8={tmp_path / 'p.int8.onnx'}", "--model", f"fp16={tmp_path / 'p.fp16.onnx'}",
                     "--out", str(table), "--test-subset", "50", "--rounds", "1", "--no-progress"]) == 0
    rows = json.loads(Path(str(table) + ".json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["base", "pruned", "int8", "fp16"]
    assert rows[2]["source_row"] == "pruned" and rows[2]["precision"] == "int8"
    assert rows[1]["params"] == rows[2]["params"] < rows[0]["params"]
    assert rows[2]["file_bytes"] < rows[3]["file_bytes"] < Path(rows[1]["onnx_path"]).stat().st_size
    assert rows[2]["minivgg_ms_b1"] is None and rows[1]["minivgg_ms_b64"] > 0
    assert table.read_text().count("\n| ") == 6                  # header, rule, 4 rows
