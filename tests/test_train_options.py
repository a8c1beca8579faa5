"""The option table (minivgg/train/options.py) and the training command built from it: one row per option
gives the parser, the defaults and what --resume does; bad input is one line, a bug keeps its traceback."""
import argparse
import os
import subprocess
import sys

import pytest

from minivgg.train.options import FIXED, IGNORED, MAY_CHANGE, Option, OptionError, Section, defaults, make_parser, \
    names, resolve
from test_cli import ROOT, TINY, TRAIN, cli, load_cli_module
from test_cli_robustness import image_tree

TABLE = [Section("one"), Option("alpha", 3, int, "an int", FIXED), Option("beta", False, bool, "a switch", MAY_CHANGE),
         Section("two"), Option("gamma", "x", str, "a choice", IGNORED, choices=("x", "y"))]


def test_one_row_gives_the_flag_its_default_its_type_and_its_group():
    p = make_parser(TABLE)
    assert vars(p.parse_args([])) == defaults(TABLE) == {"alpha": 3, "beta": False, "gamma": "x"}
    assert vars(p.parse_args(["--alpha", "5", "--beta", "--gamma", "y"])) == {"alpha": 5, "beta": True, "gamma": "y"}
    assert vars(p.parse_args(["--no-beta"]))["beta"] is False
    with pytest.raises(SystemExit):
        p.parse_args(["--gamma", "z"])   # choices are checked
    groups = {g.title: [a.dest for a in g._group_actions] for g in p._action_groups}
    assert groups["one"] == ["alpha", "beta"] and groups["two"] == ["gamma"]
    assert vars(make_parser(TABLE, suppress=True).parse_args(["--alpha", "1"])) == {"alpha": 1}   # typed only


def test_resume_keeps_fixed_and_may_change_values_refuses_a_changed_fixed_one_and_ignores_the_rest():
    saved = {"alpha": 4, "beta": True, "gamma": "y"}
    assert names(TABLE, FIXED) == ("alpha",) and names(TABLE, MAY_CHANGE) == ("beta",)
    assert resolve(TABLE, {}, saved) == {"alpha": 4, "beta": True, "gamma": "x"}   # gamma: per invocation
    assert resolve(TABLE, {"beta": False, "alpha": 4}, saved)["beta"] is False     # may change; same fixed value
    with pytest.raises(OptionError, match=r"--alpha 5 cannot change on --resume: the run was started with 4"):
        resolve(TABLE, {"alpha": 5}, saved)
    assert resolve(TABLE, {"alpha": 5}, None, preset={"alpha": 6, "beta": True}) == {"alpha": 5, "beta": True,
                                                                                  "gamma": "x"}
    with pytest.raises(ValueError, match="resume must be FIXED"):
        Option("delta", 0, int, "help", "sometimes")


def test_the_training_command_has_one_row_per_flag_and_refuses_every_fixed_change():
    m = load_cli_module()
    rows = [o for o in m.OPTIONS if isinstance(o, Option)]
    assert len({o.name for o in rows}) == len(rows)   # no option twice
    assert vars(m.make_parser().parse_args([])).keys() == {o.name for o in rows}
    saved = {o.name: o.default for o in rows}
    changed = {bool: lambda o: not o.default, int: lambda o: (o.default or 0) + 1,
               float: lambda o: (o.default or 0.0) + 1.0, m.hidden_widths: lambda o: "16,16"}
    fixed = names(m.OPTIONS, FIXED)
    assert {"model", "seed", "lr", "batch_size", "val_size", "dataset"} <= set(fixed)
    for o in rows:
        if o.name not in fixed:
            continue
        value = [c for c in o.choices if c != o.default][0] if o.choices else changed.get(o.type, lambda o: "x")(o)
        with pytest.raises(OptionError, match=f"^{o.flag} .* cannot change on --resume"):
            resolve(m.OPTIONS, {o.name: value}, saved, same=m._same)


# -- bad input is one line; a bug is a traceback ---------------------------------------------------
PLANT = """
import sys, importlib.util
spec = importlib.util.spec_from_file_location("train_vgg11", {train!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
import minivgg.train.trainer as t
def planted(self, *a, **k):
    raise {kind}("planted bug: an internal function failed")
t.Trainer.train_epoch = planted
sys.exit(m.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("kind", ["ValueError", "RuntimeError"])
def test_a_bug_keeps_its_traceback_while_bad_input_stays_one_line(tmp_path, kind):
    root = tmp_path / "photos"
    image_tree(root, ["cat", "dog"], n=5)
    run = [*TINY, "--dataset", f"folder:{root}", "--epochs", "1", "--no-plots", "--out", tmp_path / "run"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    env.pop("MINIVGG_DEBUG", None)
    r = subprocess.run([sys.executable, "-c", PLANT.format(train=str(TRAIN), kind=kind), *map(str, run)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback (most recent call last)" in r.stderr and f"{kind}: planted bug" in r.stderr, r.stderr[-2000:]
    assert "in planted" in r.stderr   # the frame that raised is shown

    (root / "dog").rename(tmp_path / "dog")   # one class left: bad data, told in one line
    r = cli(TRAIN, *run, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "one class sub-folder (cat)" in lines[0], r.stderr


@pytest.mark.parametrize("args, message", [
    (["--width-ratio", "128"], r"the model cannot be built from these options: width_ratio=128 leaves no channels"),
    (["--amp", "--distributed"], r"--amp with --distributed is not supported yet"),
    (["--device", "tpu"], r"--device tpu: unknown device 'tpu'"),
])
def test_option_errors_found_by_the_library_are_one_line_naming_the_option(tmp_path, args, message):
    import re
    root = tmp_path / "photos"
    image_tree(root, ["cat", "dog"], n=5)
    r = cli(TRAIN, *TINY, "--dataset", f"folder:{root}", "--epochs", "1", "--max-steps", "1", "--no-plots", *args,
            "--out", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), r.stderr


def test_argparse_types_still_refuse_bad_text(tmp_path):
    r = cli(TRAIN, "--hidden", "12,x", cwd=tmp_path)
    assert r.returncode == 2 and "expected comma-separated widths like 256,256" in r.stderr
    assert isinstance(load_cli_module().make_parser(), argparse.ArgumentParser)
