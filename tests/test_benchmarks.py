"""Smoke tests of the benchmark scripts: each core function runs on tiny shapes with one repeat,
and the correctness gate that precedes every timing really fails on mismatched results."""
import json

import numpy as np
import pytest
import torch

from benchmarks import common, conv_speed, threads_after_gemm, train_speed
from minivgg import backend

TINY_CONV = conv_speed.ConvCase("tiny", N=2, C=3, F=4, H=5, W=6)
TINY_NET = {"name": "tiny VGG-11", "key": "tiny", "batch": 2, "image": 32,
            "model": {"arch": "vgg11", "num_classes": 3, "in_channels": 1, "width_ratio": 16,
                      "head": "classic", "hidden": [8], "pool_size": 1, "dropout": 0.5, "init": "kaiming"}}


# -- common ------------------------------------------------------------------------------------
def test_measure_reports_median_of_repeats_and_loops_short_calls():
    calls = []
    t = common.measure(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(t.times) == 3 and t.number == 1 and len(calls) == 5
    assert t.min <= t.median <= t.max
    looped = common.measure_many({"a": lambda: None, "b": lambda: None}, repeats=2, warmup=1, min_time=1e-3)
    assert set(looped) == {"a", "b"} and looped["a"].number > 1


def test_check_close_passes_equal_and_raises_on_mismatch():
    a = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    errs = common.check_close({"out": (a, torch.from_numpy(a.copy()))}, tol=1e-4, what="same")
    assert errs["out"] == 0.0
    with pytest.raises(common.MismatchError, match="out: rel err"):
        common.check_close({"out": (a * 1.01, a)}, tol=1e-4, what="scaled")
    with pytest.raises(common.MismatchError):           # shapes differ
        common.check_close({"out": (a, a.T)}, tol=1e-4)
    with pytest.raises(common.MismatchError):           # NaN never passes
        common.check_close({"out": (np.full_like(a, np.nan), a)}, tol=1e-4)
    # the floor keeps a near-zero tensor's rounding noise from failing the check
    tiny = np.full(4, 1e-12)
    assert common.rel_err(tiny * 2, tiny) == pytest.approx(1.0)
    assert common.rel_err(tiny * 2, tiny, floor=1e-3) < 1e-8


def test_table_json_geomean_and_machine_info(tmp_path):
    text = common.table(["layer", "ms"], [["conv1", "1.00"], ["conv22", "10.00"]])
    assert text.splitlines()[0].startswith("layer") and "conv22" in text
    assert common.geomean([1.0, 4.0]) == pytest.approx(2.0)
    path = tmp_path / "sub" / "r.json"
    common.write_json(str(path), {"t": common.Timing(1.0, 1.0, 1.0, [1.0]), "x": np.float32(2.5)})
    assert json.loads(path.read_text())["x"] == 2.5
    info = common.machine_info("cpu")
    line = common.header(info)
    assert info["torch"] in line and info["numpy"] in line and str(info["cores"]) in line


# -- conv_speed ----------------------------------------------------------------------------------
def test_conv_cases_match_the_networks():
    cases = conv_speed.vgg11_32_cases()
    assert sum(c.count for c in cases) == 8 and all(c.N == 64 for c in cases)
    assert (cases[0].C, cases[0].F, cases[0].H) == (3, 64, 32) and (cases[-1].H, cases[-1].count) == (2, 2)
    assert sum(c.count for c in conv_speed.vgg16_224_cases()) == 13
    # d2l's VGG-11 (widths / 4, 224x224, 1 channel): the shapes train_speed's d2l network runs
    from minivgg.layers import Conv2d
    net = train_speed.build_minivgg(train_speed.d2l_224_config())
    convs = [m for _, m in net.modules() if isinstance(m, Conv2d)]
    d2l = [c for c in conv_speed.vgg11_32_cases(16, image=224, width_ratio=4, in_channels=1) for _ in range(c.count)]
    assert [(c.C, c.F) for c in d2l] == [(m.in_channels, m.out_channels) for m in convs]
    assert [c.H for c in d2l] == [224, 112, 56, 56, 28, 28, 14, 14]
    assert TINY_CONV.flops_forward == 2 * 2 * 4 * 3 * 9 * 5 * 6 and TINY_CONV.flops_backward == 2 * TINY_CONV.flops_forward


def test_conv_bench_case_runs_and_reports_every_part():
    r = conv_speed.bench_case(TINY_CONV, repeats=1, warmup=0)
    assert max(r["rel_err"].values()) < 1e-4
    for part in ("minivgg_forward", "minivgg_backward", "minivgg_total", "torch_forward",
                 "torch_backward_dx", "torch_backward_dw", "torch_backward", "torch_total",
                 "gemm_forward", "gemm_backward", "gemm_total"):
        assert r["seconds"][part] > 0
    assert r["ratio"]["total"] > 0 and r["gflops"]["torch_total"] > 0
    assert r["over_gemm"]["total"] == r["seconds"]["minivgg_total"] / r["seconds"]["gemm_total"]
    summary = conv_speed.summarize([r, dict(r, name="again")])
    assert summary["geomean_ratio_total"] == pytest.approx(r["ratio"]["total"])
    assert summary["geomean_over_gemm_total"] == pytest.approx(r["over_gemm"]["total"])
    assert "tiny" in conv_speed.format_report([r], summary) and "over GEMM" in conv_speed.format_report([r], summary)


def test_conv_bench_gives_minivgg_its_network_layout_unless_told_otherwise():
    def chwn_strides(a):
        N, C, H, W = a.shape
        return a.strides == tuple(4 * s for s in (1, H * W * N, W * N, N))
    deep = conv_speed.ConvCase("deep", N=2, C=8, F=4, H=5, W=6)
    pair = conv_speed.make_pair(deep)
    assert chwn_strides(pair["x"]) and chwn_strides(pair["dout"])
    assert not chwn_strides(conv_speed.make_pair(TINY_CONV)["x"])        # the images stay NCHW
    old = conv_speed.make_pair(deep, network_layout=False)
    assert old["x"].flags.c_contiguous and old["dout"].flags.c_contiguous


def test_profile_step_accounts_for_the_step():
    from benchmarks import profile_step
    config = train_speed.vgg11_32_config(batch=2)
    config["model"]["width_ratio"] = 16
    r = profile_step.profile(config, steps=1, warmup=0)
    parts = r["parts"]
    for kind in ("Conv2d forward", "Conv2d backward", "ReLU forward", "MaxPool2d backward", "Adam step",
                 "conv im2col"):
        assert parts[kind] > 0, kind
    layer_total = sum(v for k, v in parts.items() if not k.startswith("conv "))
    assert 0 < layer_total <= r["step_seconds"] * 1.05           # the layers' times fit in the step's
    assert parts["conv im2col"] < parts["Conv2d forward"] + parts["Conv2d backward"]
    assert set(r["conv_gemm_seconds"]) == {"forward", "dW", "dx"} and r["conv_gemm_seconds"]["dW"] > 0
    assert "whole step" in profile_step.report(r)


@pytest.mark.parametrize("corrupt", ["weight", "bias"])
def test_conv_check_fails_when_minivgg_differs(corrupt):
    pair = conv_speed.make_pair(TINY_CONV)
    conv_speed.check_pair(pair)                        # agrees as built
    pair["layer"].params[corrupt][...] += 0.05         # now minivgg computes another convolution
    with pytest.raises(common.MismatchError, match="tiny"):
        conv_speed.check_pair(pair)


def test_conv_speed_main_end_to_end(tmp_path, capsys):
    out = tmp_path / "conv.json"
    payload = conv_speed.main(["--layers", "conv7-8", "--batch", "2", "--repeats", "1", "--warmup", "0",
                               "--min-time", "0", "--no-progress", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "conv7-8" in printed and "geometric mean" in printed and "machine:" in printed
    assert json.loads(out.read_text())["layers"][0]["name"] == "conv7-8"
    assert payload["summary"]["max_ratio_layer"] == "conv7-8"
    assert conv_speed.parse_args(["--vgg16-224"]).batch == 4


# -- train_speed ---------------------------------------------------------------------------------
def test_train_check_first_step_agrees():
    check = train_speed.check_first_step(TINY_NET)
    assert check["loss_rel_err"] < 1e-4 and check["grad_max_rel_err"] < train_speed.GRAD_TOL


def test_train_check_fails_when_the_twin_differs(monkeypatch):
    real = train_speed.to_torch

    def perturbed(model):
        twin = real(model)
        with torch.no_grad():
            twin.classifier[-1].bias[0] += 1.0           # another network: the losses must differ
        return twin

    monkeypatch.setattr(train_speed, "to_torch", perturbed)
    with pytest.raises(common.MismatchError, match="logits"):
        train_speed.check_first_step(TINY_NET)


def test_train_check_catches_a_wrong_gradient(monkeypatch):
    real = train_speed.minivgg_step_fn

    def broken_step_fn(model, x, y, lr=train_speed.LR):
        step = real(model, x, y, lr)

        def wrapped():
            loss = step()
            conv = model.features[0]
            conv.grads["weight"] = -conv.grads["weight"]   # a backward with the wrong sign
            return loss
        return wrapped

    monkeypatch.setattr(train_speed, "minivgg_step_fn", broken_step_fn)
    with pytest.raises(common.MismatchError, match="features.0.weight"):
        train_speed.check_first_step(TINY_NET)


@pytest.mark.parametrize("framework", ["minivgg", "torch"])
def test_train_time_training_in_process(framework):
    r = train_speed.time_training(framework, TINY_NET, steps=1, warmup=0)
    assert r["images_per_second"] > 0 and len(r["step"]["times"]) == 1
    assert r["memory"]["peak_bytes"] >= 0 and r["memory"]["method"]
    assert np.isfinite(r["losses"]).all()


def test_train_run_isolated_returns_results_and_reports_child_errors():
    r = train_speed.run_isolated(framework="minivgg", config=TINY_NET, steps=1, warmup=0)
    assert r["framework"] == "minivgg" and r["pid"] > 0 and r["memory"]["peak_bytes"] > 0
    with pytest.raises(RuntimeError, match="framework must be"):
        train_speed.run_isolated(framework="jax", config=TINY_NET, steps=1, warmup=0)


def test_train_report_and_configs():
    check = train_speed.check_first_step(TINY_NET)
    mv = train_speed.time_training("minivgg", TINY_NET, steps=1, warmup=0)
    tt = train_speed.time_training("torch", TINY_NET, steps=1, warmup=0)
    text = train_speed.format_report([train_speed.summarize(TINY_NET, check, mv, tt)], "cpu")
    assert "tiny VGG-11" in text and "img/s" in text and "VmHWM" in text
    a = train_speed.vgg11_32_config(batch_norm=True)
    assert a["model"]["arch"] == "vgg11_bn" and a["model"]["hidden"] == [512, 512] and a["batch"] == 64
    b = train_speed.d2l_224_config()
    assert b["model"]["width_ratio"] == 4 and b["model"]["hidden"] == [4096, 4096] and b["batch"] == 16
    assert train_speed.parse_args([]).d2l_batch == 16


def test_train_rounds_pool_steps_and_take_the_median_round_ratio():
    def run(times, peak):
        return {"framework": "x", "batch": 8, "losses": [1.0], "memory": {"peak_bytes": peak, "method": "m"},
                "step": {"median": float(np.median(times)), "times": times}}
    mv = train_speed.pool_rounds([run([1.0, 1.2, 1.1], 5), run([3.0, 3.0, 3.0], 7), run([1.0, 1.0, 1.0], 6)])
    tt = train_speed.pool_rounds([run([2.0, 2.0, 2.0], 1), run([2.0, 2.0, 2.0], 1), run([1.0, 1.0, 1.0], 1)])
    assert mv["step"]["median"] == 1.1 and mv["images_per_second"] == 8 / 1.1     # over all nine steps
    assert mv["memory"]["peak_bytes"] == 7 and mv["round_medians"] == [1.1, 3.0, 1.0]
    r = train_speed.summarize(TINY_NET, {}, mv, tt)
    assert r["round_ratios"] == [0.55, 1.5, 1.0] and r["ratio_time"] == 1.0        # the middle round's


def test_train_main_runs_rounds_end_to_end(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(train_speed, "vgg11_32_config", lambda *a, **k: TINY_NET)
    out = tmp_path / "t.json"
    payload = train_speed.main(["--models", "vgg11-32", "--rounds", "2", "--steps", "1", "--warmup", "0",
                                "--no-progress", "--json", str(out)])
    r = payload["results"][0]
    assert payload["rounds"] == 2 and len(r["round_ratios"]) == 2
    assert len(r["minivgg"]["step"]["times"]) == 2 and len(r["torch"]["round_medians"]) == 2
    assert "each round's ratio" in capsys.readouterr().out and json.loads(out.read_text())["rounds"] == 2
    with pytest.raises(SystemExit):
        train_speed.parse_args(["--rounds", "0"])


@pytest.mark.skipif(backend.gpu_available() and torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("script", [conv_speed, train_speed])
def test_gpu_request_without_gpu_fails_clearly(script):
    with pytest.raises(SystemExit, match="--device gpu needs"):
        script.main(["--device", "gpu", "--no-progress"])


# -- threads_after_gemm ----------------------------------------------------------------------------
def test_threads_after_gemm_times_every_environment(tmp_path, capsys):
    out = tmp_path / "t.json"
    payload = threads_after_gemm.main(["--repeats", "1", "--rounds", "1", "--json", str(out)])
    assert [r["environment"] for r in payload["runs"]] == list(threads_after_gemm.ENVIRONMENTS)
    assert all(len(r["ms"]) == 2 and min(r["ms"].values()) > 0 for r in payload["runs"])
    assert "OPENBLAS_THREAD_TIMEOUT=4" in capsys.readouterr().out and json.loads(out.read_text())["runs"]


def test_conv_bench_times_and_checks_each_algorithm():
    r = conv_speed.bench_case(TINY_CONV, repeats=1, warmup=0, algos=("winograd2", "auto"))
    assert set(r["algo_over_gemm"]) == {"winograd2", "auto"} and min(r["algo_over_gemm"].values()) > 0
    assert r["rel_err"]["dW winograd2"] < 1e-4 and r["auto_picks"] == {"winograd2": "winograd2", "auto": "im2col"}
    summary = conv_speed.summarize([r])
    assert summary["geomean_over_gemm_winograd2"] == pytest.approx(r["algo_over_gemm"]["winograd2"])
    assert "winograd2" in conv_speed.format_report([r], summary)
    pair = conv_speed.make_pair(TINY_CONV, algos=("winograd4",))
    pair["algos"]["winograd4"].params["weight"][...] += 0.05    # only the Winograd layer is wrong
    with pytest.raises(common.MismatchError, match="winograd4"):
        conv_speed.check_pair(pair)


def test_quick_start_workload_is_the_training_commands_default_network():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "train_vgg11.py"
    spec = importlib.util.spec_from_file_location("train_vgg11_for_train_speed", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = cli.parse_args([])
    config = train_speed.quick_start_config()
    assert config["batch"] == args.batch_size and config["image"] == args.image_size
    assert cli.make_model(args, 10, 1).config == train_speed.build_minivgg(config).config
