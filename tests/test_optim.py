"""SGD, Adam, AdamW and clip_grad_norm against PyTorch, plus state_dict round trips and bad input.

Each comparison runs the same batches through a minivgg net and a torch copy of
it, so the gradients (and the parameters after every step) must stay equal.
"""
import numpy as np
import pytest
import torch

from minivgg import backend, random_stream
from minivgg.layers import Conv2d, Flatten, Linear, ReLU, Sequential
from minivgg.optim import SGD, Adam, AdamW, clip_grad_norm

TOL = {np.float64: 1e-10, np.float32: 1e-5}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: torch's thread pool costs more than it saves (10x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
N_STEPS = 6


def rel_err(a, b):
    a, b = backend.to_numpy(a).astype(np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def make_pair(dtype, device, seed=0):
    """A small conv net in minivgg and the same net, same weights, in torch."""
    random_stream.seed(seed)
    model = Sequential(Conv2d(2, 3, 3, padding=1), ReLU(), Flatten(), Linear(3 * 4 * 4, 8), ReLU(),
                       Linear(8, 5)).astype(dtype)
    tmodel = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                 torch.nn.Linear(48, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
    tmodel = tmodel.to(torch.float64 if dtype == np.float64 else torch.float32)
    with torch.no_grad():
        for name, p in tmodel.named_parameters():
            p.copy_(torch.from_numpy(backend.to_numpy(model.state_dict()[name]).copy()))
    return model.to(device), tmodel


def batches(dtype, n=N_STEPS, seed=7):
    """(x (4, 2, 4, 4), r (4, 5)) pairs; the loss is sum(out * r), so dL/dout = r."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((4, 2, 4, 4)).astype(dtype), rng.standard_normal((4, 5)).astype(dtype))
            for _ in range(n)]


def backward_both(model, tmodel, x, r, device):
    model.forward(backend.to_device(x, device))
    model.backward(backend.to_device(r, device))
    for p in tmodel.parameters():
        p.grad = None
    (tmodel(torch.from_numpy(x)) * torch.from_numpy(r)).sum().backward()


def assert_params_close(model, tmodel, tol, what=""):
    ours = dict((n, p) for n, p, _ in model.named_parameters(trainable_only=False))
    for name, tp in tmodel.named_parameters():
        err = rel_err(ours[name], tp.detach().numpy())
        assert err < tol, f"{what} {name}: rel err {err:.2e}"


SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "dampening": dict(lr=0.1, momentum=0.9, dampening=0.5),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.1, weight_decay=0.05),
    "all": dict(lr=0.1, momentum=0.8, weight_decay=0.05, nesterov=True),
}
ADAM_CASES = {
    "adam": (Adam, torch.optim.Adam, dict(lr=1e-2)),
    "adam_betas": (Adam, torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6)),
    "adam_wd": (Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
    "adamw": (AdamW, torch.optim.AdamW, dict(lr=1e-2)),
    "adamw_wd": (AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.3)),
}
CASES = {**{f"sgd_{k}": (SGD, torch.optim.SGD, v) for k, v in SGD_CASES.items()}, **ADAM_CASES}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(case, dtype, device):
    cls, tcls, kw = CASES[case]
    model, tmodel = make_pair(dtype, device)
    opt, topt = cls(model, **kw), tcls(tmodel.parameters(), **kw)
    start = {n: backend.to_numpy(p).copy() for n, p, _ in model.named_parameters()}
    weight = model[0].params["weight"]
    for i, (x, r) in enumerate(batches(dtype)):
        if i == 3:  # a schedule changing lr between steps
            opt.lr = opt.lr * 0.5
            topt.param_groups[0]["lr"] *= 0.5
        backward_both(model, tmodel, x, r, device)
        assert_params_close(model, tmodel, TOL[dtype], f"before step {i}")
        opt.step()
        topt.step()
        assert_params_close(model, tmodel, TOL[dtype], f"after step {i}")
    assert model[0].params["weight"] is weight, "the update must be in place"
    for name, p, _ in model.named_parameters():
        assert p.dtype == dtype
        if dtype == np.float64:  # the displacement itself agrees, not only the weights
            moved = backend.to_numpy(p) - start[name]
            tmoved = dict(tmodel.named_parameters())[name].detach().numpy() - start[name]
            assert np.abs(moved).max() > 1e-3
            assert rel_err(moved, tmoved) < 1e-9, name
    for entries in opt.state.values():
        for v in entries.values():
            assert isinstance(v, int) or v.dtype == dtype


def test_frozen_layer_untouched(device):
    model, tmodel = make_pair(np.float64, device)
    model[0].freeze()
    for p in tmodel[0].parameters():
        p.requires_grad_(False)
    frozen = {k: backend.to_numpy(v).copy() for k, v in model[0].params.items()}
    opt = Adam(model, lr=1e-2, weight_decay=0.1)
    topt = torch.optim.Adam([p for p in tmodel.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for x, r in batches(np.float64):
        backward_both(model, tmodel, x, r, device)
        assert not model[0].grads, "a frozen layer makes no weight gradient"
        # planted gradients: the optimizer must skip a frozen layer even when it has some
        model[0].grads = {k: v + 1 for k, v in model[0].params.items()}
        opt.step()
        model[0].grads = {}
        topt.step()
    for k, v in model[0].params.items():
        np.testing.assert_array_equal(backend.to_numpy(v), frozen[k])
    assert_params_close(model, tmodel, 1e-10)
    assert not any(name.startswith("0.") for name in opt.state)


def test_params_without_grad_are_skipped(device):
    model, _ = make_pair(np.float32, device)
    before = {k: backend.to_numpy(v).copy() for k, v in model.state_dict().items()}
    opt = SGD(model, lr=0.1, momentum=0.9)
    opt.step()  # no backward yet: nothing moves, no state
    assert opt.state == {}
    x, r = batches(np.float32, 1)[0]
    model.forward(backend.to_device(x, device))
    model.backward(backend.to_device(r, device))
    del model[5].grads["bias"]
    opt.step()
    after = {k: backend.to_numpy(v) for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(after["5.bias"], before["5.bias"])
    assert not np.array_equal(after["5.weight"], before["5.weight"])
    assert "5.bias" not in opt.state and "5.weight" in opt.state


def test_step_leaves_grads_alone(device):
    model, _ = make_pair(np.float32, device)
    x, r = batches(np.float32, 1)[0]
    model.forward(backend.to_device(x, device))
    model.backward(backend.to_device(r, device))
    grads = {n: backend.to_numpy(g).copy() for n, _, g in model.named_parameters()}
    for opt in (SGD(model, 0.1, momentum=0.9, weight_decay=0.1, nesterov=True), Adam(model, weight_decay=0.1),
                AdamW(model)):
        opt.step()
        opt.step()
    for n, _, g in model.named_parameters():
        np.testing.assert_array_equal(backend.to_numpy(g), grads[n])
    SGD(model, 0.1).zero_grad()
    assert all(g is None for _, _, g in model.named_parameters())


ROUND_TRIP = {
    "sgd": (SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)),
    "adam": (Adam, dict(lr=1e-2, weight_decay=0.01)),
    "adamw": (AdamW, dict(lr=1e-2, weight_decay=0.1)),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_state_dict_round_trip_is_bit_identical(name, device, tmp_path):
    cls, kw = ROUND_TRIP[name]
    data = batches(np.float32, 6)
    model, _ = make_pair(np.float32, device)
    opt = cls(model, **kw)

    def train(m, o, batch_list):
        for x, r in batch_list:
            m.forward(backend.to_device(x, device))
            m.backward(backend.to_device(r, device))
            o.step()

    train(model, opt, data[:3])
    opt.lr = kw["lr"] * 0.3  # a scheduled lr must survive the round trip too
    state = opt.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    np.savez(tmp_path / "opt.npz", **state)
    np.savez(tmp_path / "model.npz", **{k: backend.to_numpy(v) for k, v in model.state_dict().items()})

    model2, _ = make_pair(np.float32, device, seed=99)  # different weights until loaded
    with np.load(tmp_path / "model.npz", allow_pickle=False) as f:
        model2.load_state_dict(dict(f))
    opt2 = cls(model2, **{**kw, "lr": 123.0})
    with np.load(tmp_path / "opt.npz", allow_pickle=False) as f:
        opt2.load_state_dict(f)
    assert opt2.lr == opt.lr
    for entries in opt2.state.values():
        for v in entries.values():
            assert isinstance(v, int) or backend.device_of(v) == backend.device_of(model2[0].params["weight"])

    train(model, opt, data[3:])
    train(model2, opt2, data[3:])
    for (n, p, _), (_, p2, _) in zip(model.named_parameters(), model2.named_parameters()):
        np.testing.assert_array_equal(backend.to_numpy(p), backend.to_numpy(p2), err_msg=n)


def test_load_state_dict_names_the_bad_key():
    model, _ = make_pair(np.float32, "cpu")
    x, r = batches(np.float32, 1)[0]
    model.forward(x)
    model.backward(r)
    opt = Adam(model)
    opt.step()
    good = opt.state_dict()

    bad = dict(good)
    bad["state.3.weight.exp_avg"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"state\.3\.weight\.exp_avg.*shape"):
        Adam(model).load_state_dict(bad)
    bad = dict(good)
    bad["state.9.weight.exp_avg"] = bad.pop("state.3.weight.exp_avg")
    with pytest.raises(KeyError, match=r"state\.9\.weight\.exp_avg"):
        Adam(model).load_state_dict(bad)
    bad = dict(good)
    del bad["state.3.weight.exp_avg_sq"]
    with pytest.raises(KeyError, match=r"'3\.weight'"):
        Adam(model).load_state_dict(bad)
    bad = dict(good)
    del bad["beta2"]
    with pytest.raises(KeyError, match="beta2"):
        Adam(model).load_state_dict(bad)
    with pytest.raises(ValueError, match="'Adam'"):
        SGD(model, 0.1).load_state_dict(good)
    with pytest.raises(ValueError, match="'Adam'"):
        AdamW(model).load_state_dict(good)
    fresh = Adam(model, lr=0.5)
    with pytest.raises(ValueError):
        fresh.load_state_dict({**good, "beta1": np.array(1.5)})
    with pytest.raises(ValueError, match="learning rate"):
        fresh.load_state_dict({**good, "lr": np.array(-1.0), "beta1": np.array(0.5)})
    assert fresh.state == {} and fresh.beta1 == 0.9 and fresh.lr == 0.5  # nothing half-loaded


BAD_ARGS = [
    (SGD, torch.optim.SGD, dict(lr=-0.1), "learning rate"),
    (SGD, torch.optim.SGD, dict(lr=0.1, momentum=-0.5), "momentum"),
    (SGD, torch.optim.SGD, dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
    (SGD, torch.optim.SGD, dict(lr=0.1, nesterov=True), "Nesterov"),
    (SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "Nesterov"),
    (Adam, torch.optim.Adam, dict(lr=-1e-3), "learning rate"),
    (Adam, torch.optim.Adam, dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
    (Adam, torch.optim.Adam, dict(betas=(-0.1, 0.999)), "beta parameter at index 0"),
    (Adam, torch.optim.Adam, dict(betas=(0.9, 1.0)), "beta parameter at index 1"),
    (Adam, torch.optim.Adam, dict(eps=-1e-8), "epsilon"),
    (AdamW, torch.optim.AdamW, dict(weight_decay=-0.1), "weight_decay"),
]


@pytest.mark.parametrize("cls,tcls,kw,message", BAD_ARGS)
def test_bad_arguments_rejected_as_torch_does(cls, tcls, kw, message):
    model, tmodel = make_pair(np.float32, "cpu")
    with pytest.raises(ValueError, match=message):
        cls(model, **kw)
    with pytest.raises(ValueError):
        tcls(tmodel.parameters(), **{"lr": 1e-3, **kw})


def test_bad_lr_assignment_and_model():
    model, _ = make_pair(np.float32, "cpu")
    opt = SGD(model, lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        opt.lr = -1.0
    with pytest.raises(ValueError, match="learning rate"):
        opt.lr = float("nan")
    assert opt.lr == 0.1
    with pytest.raises(TypeError, match="named_parameters"):
        SGD([np.zeros(3)], lr=0.1)


def test_grad_dtype_mismatch_is_an_error():
    model, _ = make_pair(np.float32, "cpu")
    x, r = batches(np.float32, 1)[0]
    model.forward(x)
    model.backward(r)
    model[5].grads["bias"] = model[5].grads["bias"].astype(np.float64)
    with pytest.raises(ValueError, match="5.bias"):
        SGD(model, 0.1).step()


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("scale", [0.3, 3.0], ids=["clipped", "unclipped"])
def test_clip_grad_norm_matches_torch(scale, dtype, device):
    model, tmodel = make_pair(dtype, device)
    model[3].freeze()
    for p in tmodel[3].parameters():
        p.requires_grad_(False)
    x, r = batches(dtype, 1)[0]
    backward_both(model, tmodel, x, r, device)
    tparams = [p for p in tmodel.parameters() if p.requires_grad]
    reference = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in tparams])))
    assert not model[3].grads, "a frozen layer makes no weight gradient"
    model[3].grads = {k: v + 1 for k, v in model[3].params.items()}   # planted: clipping must skip them
    frozen_grad = backend.to_numpy(model[3].grads["weight"]).copy()

    total = clip_grad_norm(model, scale * reference)
    ttotal = float(torch.nn.utils.clip_grad_norm_(tparams, scale * reference))
    tol = 1e-12 if dtype == np.float64 else 1e-6
    assert isinstance(total, float)
    assert abs(total - ttotal) <= tol * ttotal
    grads = {n: g for n, _, g in model.named_parameters()}
    for name, p in tmodel.named_parameters():
        if p.requires_grad:
            assert rel_err(grads[name], p.grad.numpy()) < tol, name
    after = {n: g for n, _, g in model.named_parameters()}
    norm = np.sqrt(sum(float(np.sum(backend.to_numpy(g).astype(np.float64) ** 2)) for g in after.values()))
    assert norm == pytest.approx(min(total, scale * reference), rel=1e-5)
    np.testing.assert_array_equal(backend.to_numpy(model[3].grads["weight"]), frozen_grad)


def test_clip_grad_norm_edge_cases():
    model, _ = make_pair(np.float32, "cpu")
    assert clip_grad_norm(model, 1.0) == 0.0  # no grads yet
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(model, -1.0)
    x, r = batches(np.float32, 1)[0]
    model.forward(x)
    model.backward(r)
    model[5].grads["bias"][0] = np.inf
    before = model[3].grads["weight"].copy()
    assert clip_grad_norm(model, 1.0) == float("inf")
    np.testing.assert_array_equal(model[3].grads["weight"], before)  # left for the caller to skip
