"""The backprop exercises: a fresh workspace fails every exercise as "not started", the
shipped solutions pass them all, a planted bug in each is named by its gradient and worst
element, and the final training run really uses the learner's layers."""
import textwrap

import numpy as np
import pytest

from minivgg.data.fashion_mnist import find_fashion_mnist
from minivgg.exercises import EXERCISES, exercise_source, init_workspace
from minivgg.exercises.__main__ import main
from minivgg.exercises.generate import BY_NAME, GAP, WorkspaceError, exercise_source_for, shipped_source
from minivgg.exercises.grade import check_workspace

NAMES = [e.name for e in EXERCISES]


@pytest.fixture
def solved(tmp_path):
    init_workspace(tmp_path / "ws", solved=True)
    return tmp_path / "ws"


def plant(ws, name, code):
    """Append `code` to the learner's file: a subclass of their class that breaks one thing."""
    with open(ws / f"{name}.py", "a", encoding="utf-8") as f:
        f.write("\n\n" + textwrap.dedent(code))


def test_fresh_workspace_fails_every_exercise_as_not_started(tmp_path, capsys):
    init_workspace(tmp_path / "ws")
    assert (tmp_path / "ws" / "README.md").is_file()
    results = check_workspace(tmp_path / "ws")
    assert [(r.name, r.status) for r in results] == [(n, "not started") for n in NAMES]
    assert main(["check", str(tmp_path / "ws")]) == 1
    assert f"0 of {len(NAMES)} passed" in capsys.readouterr().out


def test_shipped_solutions_pass_every_exercise(solved, device, capsys):
    results = check_workspace(solved, device=device)
    assert [(r.name, r.status, r.detail) for r in results] == [(n, "passed", "") for n in NAMES]
    assert main(["check", str(solved), "relu", "conv", "--device", device]) == 0
    assert "2 of 2 passed" in capsys.readouterr().out


def test_planted_bug_is_found_on_the_gpu_path_too(solved, device):
    plant(solved, "conv", PLANTED["conv"][0])
    (result,) = check_workspace(solved, ["conv"], device=device)
    assert result.status == "failed" and "dL/dweight is wrong" in result.detail, result.detail


def test_init_refuses_a_workspace_that_holds_work(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "relu.py").write_text("my work\n")
    with pytest.raises(WorkspaceError, match="not empty.*relu.py"):
        init_workspace(ws)
    assert (ws / "relu.py").read_text() == "my work\n"
    assert sorted(p.name for p in ws.iterdir()) == ["relu.py"]
    assert main(["init", str(ws)]) == 2


def test_exercise_follows_the_textbook_source():
    """A change to a layer's docstring or forward reaches the exercise; its backward does not."""
    ex = BY_NAME["relu"]
    source, package = shipped_source(ex)
    assert "return xp.multiply(dout, x > 0, out=backend.out_like(dout))" in source
    changed = source.replace("out = max(x, 0).", "out = max(x, 0), changed in the docstring.")
    changed = changed.replace("self.cache = x\n", "self.cache = x  # changed in forward\n", 1)
    assert changed.count("changed in") == 2
    text = exercise_source(changed, ex, package)
    assert "changed in the docstring" in text and "self.cache = x  # changed in forward" in text
    assert "return xp.multiply(dout, x > 0, out=backend.out_like(dout))" not in text and f'NotImplementedError("{GAP}' in text
    assert "class Dropout" not in text           # one class per exercise file
    assert "from minivgg.layers.base import Layer" in text   # relative imports made absolute
    solved_text = exercise_source(changed, ex, package, solved=True)
    assert "return xp.multiply(dout, x > 0, out=backend.out_like(dout))" in solved_text


def test_a_kernel_that_is_the_answer_is_withheld():
    """MaxPool2d's backward is one kernel call: the exercise does not import that kernel."""
    gap = exercise_source_for(BY_NAME["maxpool"])
    assert "maxpool_backward" not in gap.split("class MaxPool2d")[0]
    assert "maxpool_forward" in gap.split("class MaxPool2d")[0]
    compile(gap, "maxpool.py", "exec")


# Each exercise's classic bug, planted as a subclass of the learner's (solved) class, and the
# gradient the grader must name for it.
PLANTED = {
    "relu": ("""
        _ReLU = ReLU
        class ReLU(_ReLU):              # forgot the mask
            def backward(self, dout):
                super().backward(dout)
                return dout.copy()
        """, "dL/dx"),
    "linear": ("""
        _Linear = Linear
        class Linear(_Linear):          # a transposed dW, compared element by element
            def backward(self, dout):
                dx = super().backward(dout)
                self.grads["weight"] = np.ascontiguousarray(self.grads["weight"].T).reshape(
                    self.grads["weight"].shape)
                return dx
        """, "dL/dweight"),
    "dropout": ("""
        _Dropout = Dropout
        class Dropout(_Dropout):        # the 1/(1-p) scale applied twice
            def backward(self, dout):
                dx = super().backward(dout)
                return dx / (1 - self.p) if self.training else dx
        """, "dL/dx"),
    "softmax_ce": ("""
        _SCE = SoftmaxCrossEntropy
        class SoftmaxCrossEntropy(_SCE):   # a missing 1/N
            def forward(self, logits, labels):
                self.n = logits.shape[0]
                return super().forward(logits, labels)
            def backward(self, dout=1.0):
                return super().backward(dout) * self.n
        """, "dL/dlogits"),
    "maxpool": ("""
        _MaxPool2d = MaxPool2d
        class MaxPool2d(_MaxPool2d):    # the gradient routed to every tied maximum
            def forward(self, x):
                self.x = x
                return super().forward(x)
            def backward(self, dout):
                if self.padding != (0, 0) or self.stride != self.kernel_size:
                    return super().backward(dout)     # (the loop below covers the tiling case)
                (KH, KW), x = self.kernel_size, self.x
                N, C, OH, OW = dout.shape
                dx = np.zeros_like(x)
                for i in range(OH):
                    for j in range(OW):
                        win = x[:, :, i * KH:(i + 1) * KH, j * KW:(j + 1) * KW]
                        top = win == win.max(axis=(2, 3), keepdims=True)
                        dx[:, :, i * KH:(i + 1) * KH, j * KW:(j + 1) * KW] += top * dout[:, :, i:i + 1, j:j + 1]
                return dx
        """, "tied windows"),
    "conv": ("""
        _Conv2d = Conv2d
        class Conv2d(_Conv2d):          # dW with the kernel flipped in space
            def backward(self, dout):
                dx = super().backward(dout)
                self.grads["weight"] = self.grads["weight"][:, :, ::-1, ::-1].copy()
                return dx
        """, "dL/dweight"),
    "batchnorm": ("""
        _BatchNorm2d = BatchNorm2d
        class BatchNorm2d(_BatchNorm2d):   # the batch statistics treated as constants
            def forward(self, x):
                self.x = x
                return super().forward(x)
            def backward(self, dout):
                super().backward(dout)
                var = self.x.var(axis=(0, 2, 3)).reshape(1, -1, 1, 1)
                return dout * self.params["weight"].reshape(1, -1, 1, 1) / np.sqrt(var + self.eps)
        """, "dL/dx"),
    "adam": ("""
        _Adam = Adam
        class Adam(_Adam):              # the bias corrections stuck at the first step
            def _adam(self, p, g, m, v, t):
                super()._adam(p, g, m, v, 1)
        """, "step 2: the change of weight"),
}


@pytest.mark.parametrize("name", NAMES)
def test_planted_bug_names_its_gradient_and_worst_element(solved, name):
    code, which = PLANTED[name]
    plant(solved, name, code)
    (result,) = check_workspace(solved, [name])
    assert result.status == "failed", result
    assert which in result.detail and "worst element (" in result.detail, result.detail
    assert "yours" in result.detail


def test_planted_linear_bug_points_at_the_right_element(solved):
    """Linear(3, 2) on batch 1 with dW transposed: the worst element is where the two differ most."""
    plant(solved, "linear", PLANTED["linear"][0])
    (result,) = check_workspace(solved, ["linear"])
    assert result.detail.startswith("Linear(3, 2, bias=True) on batch 1: dL/dweight is wrong")
    index = result.detail.split("worst element ")[1].split(":")[0]
    assert index.startswith("(") and len(eval(index)) == 2


def test_learners_exception_shows_their_traceback(solved):
    plant(solved, "relu", """
        _ReLU = ReLU
        class ReLU(_ReLU):
            def backward(self, dout):
                return dout * undefined_name
        """)
    (result,) = check_workspace(solved, ["relu"])
    assert result.status == "failed"
    assert "NameError" in result.detail and "undefined_name" in result.detail
    assert str(solved / "relu.py") in result.detail and "grade.py" not in result.detail


def test_a_syntax_error_is_shown_in_the_learners_file(solved):
    (solved / "relu.py").write_text("def backward(self, dout:\n")
    (result,) = check_workspace(solved, ["relu"])
    assert result.status == "failed" and "SyntaxError" in result.detail
    assert str(solved / "relu.py") in result.detail and "line 1" in result.detail


def test_check_rejects_an_unknown_exercise_before_grading(solved, capsys):
    with pytest.raises(ValueError, match="unknown exercise 'relux'.*relu, linear"):
        check_workspace(solved, ["relux"])
    assert main(["check", str(solved), "relux"]) == 2
    assert "unknown exercise" in capsys.readouterr().err


@pytest.mark.skipif(find_fashion_mnist("train") is None or find_fashion_mnist("test") is None,
                    reason="Fashion-MNIST is not installed")
def test_train_runs_on_the_learners_layers(solved, device):
    """A short run on 128 images; a counter planted in the learner's ReLU proves their code ran."""
    plant(solved, "relu", """
        CALLS = {"forward": 0, "backward": 0}
        _ReLU = ReLU
        class ReLU(_ReLU):
            def forward(self, x):
                CALLS["forward"] += 1
                return super().forward(x)
            def backward(self, dout):
                CALLS["backward"] += 1
                return super().backward(dout)
        """)
    from minivgg.exercises import train as train_mod
    loaded = []
    real_load = train_mod.load

    def spy(path):
        mod = real_load(path)
        loaded.append(mod)
        return mod
    train_mod.load = spy
    try:
        run = train_mod.train(solved, epochs=1, batch_size=64, train_subset=128, test_subset=64,
                              out_dir=solved / "run", progress=False, device=device)
    finally:
        train_mod.load = real_load
    relu = next(m for m in loaded if hasattr(m, "CALLS"))
    # VGG-11-BN: 8 conv + 8 BN + 8 ReLU + 5 pools in the trunk; 3 Linear, 2 ReLU, 2 Dropout in the head
    assert run["swapped"] == 8 + 8 + 10 + 5 + 3 + 2
    assert relu.CALLS["backward"] == 2 * 10        # two training batches through ten ReLUs
    assert relu.CALLS["forward"] >= 2 * 10 + 10    # and the test batch
    assert run["test"]["n"] == 64 and np.isfinite(run["test"]["loss"])
    assert len(run["history"]) == 1


@pytest.mark.skipif(find_fashion_mnist("train") is None or find_fashion_mnist("test") is None,
                    reason="Fashion-MNIST is not installed")
def test_train_command_refuses_unfinished_work_then_trains(tmp_path, capsys):
    init_workspace(tmp_path / "ws")
    assert main(["train", str(tmp_path / "ws"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "pass check first" in err and "relu (not started)" in err and "adam (not started)" in err
    init_workspace(tmp_path / "done", solved=True)
    assert main(["train", str(tmp_path / "done"), "--epochs", "0"]) == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "done"), "--epochs", "1", "--train-subset", "64",
                 "--test-subset", "32", "--batch-size", "32"]) == 0
    assert "36 layers were yours; test top-1" in capsys.readouterr().out
    assert (tmp_path / "done" / "run" / "history.json").is_file()


def test_check_of_a_missing_workspace_says_so(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nowhere")]) == 2
    assert "no workspace at" in capsys.readouterr().err


# A short textbook Conv2d (im2col + GEMM, the bias added afterwards, col2im for dx), written
# as conv.py would be: the grader must take any Conv2d that keeps the layer API.
TEXTBOOK_CONV = '''"""Conv2d by im2col + GEMM, the textbook way."""
from __future__ import annotations

import math

import numpy as np

from .. import backend, random_stream
from ..kernels import col2im, im2col, out_size
from .base import Layer, pair


class Conv2d(Layer):
    """out = Wm @ im2col(x) + b;  dW = D @ cols^T,  db = D @ 1,  dx = col2im(Wm^T @ D)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 dtype=np.float32):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = pair(kernel_size), pair(stride), pair(padding)
        shape = (out_channels, in_channels) + self.kernel_size
        self.params["weight"] = (random_stream.get_rng().standard_normal(shape) / math.prod(shape[1:])).astype(dtype)
        if bias:
            self.params["bias"] = np.full(out_channels, 0.1, dtype=dtype)

    def forward(self, x):
        self.check_input(x, ndim=4, channels=self.in_channels)
        N, C, H, W = x.shape
        (KH, KW), (sh, sw), (ph, pw), F = self.kernel_size, self.stride, self.padding, self.out_channels
        OH, OW = out_size(H, KH, sh, ph), out_size(W, KW, sw, pw)
        cols = im2col(x, KH, KW, self.stride, self.padding)               # (C*KH*KW, OH*OW*N)
        out = (self.params["weight"].reshape(F, -1) @ cols).reshape(F, OH, OW, N).transpose(3, 0, 1, 2)
        if "bias" in self.params:
            out = out + self.params["bias"].reshape(1, F, 1, 1)            # (N, F, OH, OW)
        self.cache = (x, cols)
        return out

    def backward(self, dout):
        x, cols = self.saved()
        (KH, KW), F = self.kernel_size, self.out_channels
        D = dout.transpose(1, 2, 3, 0).reshape(F, -1)                     # (F, OH*OW*N)
        self.grads["weight"] = (D @ cols.T).reshape(self.params["weight"].shape)
        if "bias" in self.params:
            self.grads["bias"] = D.sum(axis=1)                             # (F,)
        return col2im(self.params["weight"].reshape(F, -1).T @ D, x.shape, KH, KW, self.stride, self.padding)
'''


def test_a_textbook_conv2d_makes_an_exercise_graded_through_the_layer_api(tmp_path):
    ex = BY_NAME["conv"]
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "conv.py").write_text(exercise_source(TEXTBOOK_CONV, ex, "minivgg.layers"))
    assert "from minivgg.kernels import col2im, im2col, out_size" in (ws / "conv.py").read_text()
    assert [r.status for r in check_workspace(ws, ["conv"])] == ["not started"]
    (ws / "conv.py").write_text(exercise_source(TEXTBOOK_CONV, ex, "minivgg.layers", solved=True))
    assert [(r.status, r.detail) for r in check_workspace(ws, ["conv"])] == [("passed", "")]
    (ws / "conv.py").write_text(exercise_source(TEXTBOOK_CONV.replace("D.sum(axis=1)", "D.sum(axis=1) / 2"),
                                                ex, "minivgg.layers", solved=True))
    (result,) = check_workspace(ws, ["conv"])
    assert result.status == "failed" and "dL/dbias is wrong" in result.detail


def test_help_explains_the_three_commands_and_the_order(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for words in ("init DIR", "check DIR [NAME..]", "train DIR", ", ".join(NAMES)):
        assert words in out
