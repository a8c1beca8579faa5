"""ONNX export: the graph passes onnx.checker and onnxruntime's logits equal minivgg's within float32
tolerance, for VGG-11/16 with and without BatchNorm, classic and GAP heads, on random and real images."""
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from deploy_helpers import fashion_checkpoint, small_model  # noqa: E402

from minivgg.deploy import OnnxPredictor, Predictor  # noqa: E402
from minivgg.deploy.onnx_export import bin_matrix, build_graph, export_onnx  # noqa: E402
from minivgg.layers import AdaptiveAvgPool2d  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
TOL = 1e-5   # float32 forward: max |onnxruntime - minivgg| relative to the largest logit


def run_ort(proto, x):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})


def assert_logits_equal(ours, theirs):
    err = np.abs(ours - theirs).max() / np.abs(ours).max()
    assert err <= TOL, f"onnxruntime differs from minivgg: max |diff| / max |logit| = {err:.2e}"


@pytest.mark.parametrize("arch", ["vgg11", "vgg11_bn", "vgg16", "vgg16_bn"])
@pytest.mark.parametrize("head", ["classic", "gap"])
def test_onnxruntime_logits_equal_minivgg_on_random_inputs(arch, head):
    model = small_model(arch, head=head, in_channels=3, dropout=0.5, init="xavier")
    proto = build_graph(model, (3, 32, 32))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ("BatchNormalization" in ops) == arch.endswith("_bn") and "Dropout" not in ops
    rng = np.random.default_rng(1)
    for n in (1, 5):   # the batch dimension is dynamic
        x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        logits, probs = run_ort(proto, x)
        assert logits.shape == (n, 10)
        assert_logits_equal(model.forward(x), logits)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("pool_size, size, op", [(2, 64, "AveragePool"),   # 2x2 map -> 2x2: equal bins
                                                 (2, 32, "MatMul"),        # 1x1 map -> 2x2: repeated
                                                 (3, 64, "MatMul"),        # 2x2 map -> 3x3: overlapping
                                                 (1, 64, "GlobalAveragePool")])
def test_adaptive_avg_pool_every_case(pool_size, size, op):
    model = small_model("vgg11", pool_size=pool_size, in_channels=3, init="xavier")
    proto = build_graph(model, (3, size, size))
    assert op in [n.op_type for n in proto.graph.node]
    x = np.random.default_rng(2).standard_normal((2, 3, size, size)).astype(np.float32)
    assert_logits_equal(model.forward(x), run_ort(proto, x)[0])


def test_bin_matrix_is_pytorch_adaptive_pooling():
    x = np.random.default_rng(3).standard_normal((2, 3, 5, 7)).astype(np.float32)
    ours = AdaptiveAvgPool2d((3, 4)).forward(x)                       # (2, 3, 3, 4)
    theirs = bin_matrix(5, 3) @ x @ bin_matrix(7, 4).T               # (2, 3, 3, 4)
    np.testing.assert_allclose(theirs, ours, rtol=1e-6, atol=1e-7)


def test_unsupported_layer_is_named():
    from minivgg.layers import Layer

    class Odd(Layer):
        def forward(self, x):
            return x

    model = small_model("vgg11", in_channels=3)
    model.flatten = Odd()
    model.children = lambda: [("features", model.features), ("avgpool", model.avgpool),
                              ("flatten", model.flatten), ("classifier", model.classifier)]
    with pytest.raises(ValueError, match="'flatten' \\(Odd\\)"):
        build_graph(model, (3, 32, 32))
    with pytest.raises(ValueError, match="too small"):
        build_graph(small_model("vgg11", in_channels=3), (3, 16, 16))


def test_export_writes_atomically_and_records_metadata(tmp_path):
    model = small_model("vgg11_bn", in_channels=3)
    meta = {"class_names": ["cat", "dog"], "image_size": [32, 32]}
    path = export_onnx(model, tmp_path / "m.onnx", (3, 32, 32), meta)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]        # no temporary file left
    proto = onnx.load(str(path))
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert props == meta
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [3, 32, 32]


@pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").exists() and
                    not (FMNIST / "t10k-images-idx3-ubyte").exists(), reason="Fashion-MNIST not installed")
@pytest.mark.parametrize("arch, head", [("vgg11_bn", "classic"), ("vgg16", "gap")])
def test_cli_export_of_a_checkpoint_on_real_fashion_mnist(arch, head, tmp_path, capsys):
    import importlib.util
    from minivgg.data import load_fashion_mnist, prepare_images
    ckpt, _ = fashion_checkpoint(tmp_path / "best.npz", arch, head=head)
    spec = importlib.util.spec_from_file_location("export_onnx", ROOT / "examples" / "export_onnx.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "model.onnx")]) == 0
    assert "max |diff| / max |logit|" in capsys.readouterr().out
    ours, theirs = Predictor(ckpt), OnnxPredictor(tmp_path / "model.onnx")
    # the preprocessing comes back from the ONNX metadata alone
    assert theirs.classes == ours.classes and theirs.classes[9] == "Ankle boot"
    assert (theirs.image_size, theirs.channels) == ((32, 32), 1)
    np.testing.assert_array_equal(theirs.mean, ours.mean)
    np.testing.assert_array_equal(theirs.std, ours.std)
    images, _ = load_fashion_mnist("test", FMNIST, download=False)
    x = ours.normalize(prepare_images(images[:64], size=(32, 32), channels=1))   # (64, 1, 32, 32)
    a, b = ours.logits(x), theirs.logits(x)
    assert_logits_equal(a, b)
    np.testing.assert_array_equal(a.argmax(1), b.argmax(1))


def test_cli_bad_checkpoint_is_exit_2(tmp_path, capsys):
    cli = export_cli()
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert cli.main(["--checkpoint", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "cannot read the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def export_cli():
    import importlib.util
    spec = importlib.util.spec_from_file_location("export_onnx", ROOT / "examples" / "export_onnx.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


@pytest.mark.parametrize("out", ["same", "dotdot", "symlink", "hardlink"])
def test_an_out_that_is_the_checkpoint_is_refused_and_the_checkpoint_stands(tmp_path, capsys, out):
    (tmp_path / "d").mkdir()
    ckpt, _ = fashion_checkpoint(tmp_path / "d" / "best.npz", "vgg11")
    before = ckpt.read_bytes()
    target = {"same": ckpt, "dotdot": tmp_path / "d" / ".." / "d" / "best.npz",
              "symlink": tmp_path / "link.npz", "hardlink": tmp_path / "hard.npz"}[out]
    if out == "symlink":
        target.symlink_to(ckpt)
    elif out == "hardlink":
        os.link(ckpt, target)
    assert export_cli().main(["--checkpoint", str(ckpt), "--out", str(target), "--no-verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is the checkpoint being exported" in err[0], err
    assert ckpt.read_bytes() == before


def raise_os_error(code):
    raise OSError(code, os.strerror(code))


def enospc(*args):
    raise_os_error(errno.ENOSPC)


@pytest.mark.parametrize("case, cause", [("folder", "Is a directory"), ("under_file", "exists"),
                                         ("read_only", "Permission denied"), ("disk_full", "No space left")])
def test_a_failed_write_is_one_line_exit_4_and_the_old_file_stands(tmp_path, capsys, monkeypatch, case, cause):
    ckpt, _ = fashion_checkpoint(tmp_path / "best.npz", "vgg11")
    old = b"the previous export"
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    out.write_bytes(old)
    if case == "folder":
        out = tmp_path / "out"
    elif case == "under_file":
        out = out / "model.onnx"              # its folder would be the existing file model.onnx
    elif case == "read_only":
        out.parent.chmod(0o555)
        if os.geteuid() == 0:   # root writes into read-only folders: make the temp file's creation fail as it would
            import minivgg.train.files as files
            monkeypatch.setattr(files.tempfile, "mkstemp", lambda *a, **k: raise_os_error(errno.EACCES))
    else:
        import minivgg.train.files as files
        monkeypatch.setattr(files.os, "fsync", enospc)
    try:
        code = export_cli().main(["--checkpoint", str(ckpt), "--out", str(out), "--no-verify"])
    finally:
        (tmp_path / "out").chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1, err
    assert err[0].startswith(f"error: {out}: ") and cause in err[0], err
    assert (tmp_path / "out" / "model.onnx").read_bytes() == old
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx"]   # no temp file left


def test_temp_files_a_killed_export_left_are_removed_by_the_next_export(tmp_path):
    model = small_model("vgg11", in_channels=1)
    stale, other = tmp_path / ".m.onnx.ab12cd34.tmp", tmp_path / ".n.onnx.ab12cd34.tmp"
    for p in (stale, other):
        p.write_bytes(b"half an export")
    export_onnx(model, tmp_path / "m.onnx", (1, 32, 32))
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "m.onnx"]   # another target's is kept
