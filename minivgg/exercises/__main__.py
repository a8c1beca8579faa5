"""python -m minivgg.exercises {init,check,train}: write the backward passes, get them graded."""
from __future__ import annotations

import argparse
import sys

from .generate import EXERCISES, WorkspaceError, init_workspace
from .grade import check_workspace, report

ORDER = ", ".join(e.name for e in EXERCISES)
DESCRIPTION = f"""Learn backprop by writing it.

  init DIR            write a workspace: minivgg's layers (and the Adam update) with their
                      forward passes and docstrings, each backward body left as a gap
  check DIR [NAME..]  grade your files: float64 gradient checks, parity with PyTorch (when
                      installed), inputs unchanged and dtypes kept; a failure names the gradient
                      and its worst element; exit status 0 only when every exercise asked passes
  train DIR           train VGG-11-BN on Fashion-MNIST with your layers in place of minivgg's

Exercises, simplest first: {ORDER}. DIR/README.md says more."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minivgg.exercises", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="write a fresh workspace into DIR (new or empty)")
    p.add_argument("dir")
    p.add_argument("--solved", action="store_true",
                   help="write the shipped solutions instead of the gaps (to see what passing looks like)")
    p = sub.add_parser("check", help="grade the workspace's exercises (all, or the NAMEs given)")
    p.add_argument("dir")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"exercises to grade, from: {ORDER}")
    p.add_argument("--device", default="cpu", help="run your code on 'cpu' (default) or 'gpu' (CuPy)")
    p = sub.add_parser("train", help="train VGG-11-BN on Fashion-MNIST with your layers")
    p.add_argument("dir")
    p.add_argument("--epochs", type=int, default=12, help="epochs (default 12, the quick start's)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate, cosine decay (default 2e-3)")
    p.add_argument("--train-subset", type=int, default=None, metavar="N", help="train on the first N images only")
    p.add_argument("--test-subset", type=int, default=None, metavar="N", help="test on the first N images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run directory (default DIR/run)")
    p.add_argument("--data-dir", default=None, help="where Fashion-MNIST is (default: the usual places)")
    p.add_argument("--device", default="cpu", help="'cpu' (default) or 'gpu' (CuPy)")
    a = ap.parse_args(argv)
    try:
        if a.command == "init":
            for path in init_workspace(a.dir, solved=a.solved):
                print(f"wrote {path}")
            print(f"start with {a.dir}/README.md; grade with: python -m minivgg.exercises check {a.dir}")
            return 0
        if a.command == "check":
            results = check_workspace(a.dir, a.names, device=a.device)
            report(results)
            return 0 if all(r.status == "passed" for r in results) else 1
        from .train import train
        if a.epochs < 1:
            raise ValueError(f"--epochs must be at least 1, got {a.epochs}")
        run = train(a.dir, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, train_subset=a.train_subset,
                    test_subset=a.test_subset, seed=a.seed, out_dir=a.out, data_dir=a.data_dir,
                    device=a.device)
        t = run["test"]
        print(f"{run['swapped']} layers were yours; test top-1 {t['top1']:.4f} on {t['n']} images, "
              f"loss {t['loss']:.4f}")
        return 0
    except (WorkspaceError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        if a.command == "check" and "unknown exercise" in str(e):
            print(f"hint: name exercises from: {ORDER}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
