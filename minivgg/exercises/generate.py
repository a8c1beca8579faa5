"""Make a learner's workspace from the shipped textbook layers: one source of truth.

Each exercise file is cut from the layer's own module at `init` time (by ``ast``
and the source's line numbers): the module docstring, its imports (made absolute,
so the workspace imports the shared helpers from the installed minivgg), the
class with its docstring, forward and helpers, and each backward body replaced by
a marked gap. A change to a layer's forward or docstring reaches the next
workspace with no second copy to keep in step.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

GAP = "exercise:"   # every gap raises NotImplementedError("exercise: ..."): the grader's "not started"


@dataclass(frozen=True)
class Exercise:
    name: str            # the workspace file is <name>.py; `check NAME` selects it
    module: str          # where the solution lives
    cls: str             # the class the learner completes
    gaps: tuple          # the methods whose bodies become gaps
    hints: tuple         # a hint or two, shown as comments in the gap
    withhold: tuple = () # imported names that would be the answer (a kernel doing the backward)


# The order of the workspace README: simplest first.
EXERCISES: tuple[Exercise, ...] = (
    Exercise("relu", "minivgg.layers.activation", "ReLU", ("backward",),
             ("The slope of max(x, 0) is 1 where x > 0 and 0 elsewhere (also at x == 0).",
              "Return a new array: never write into dout.")),
    Exercise("linear", "minivgg.layers.linear", "Linear", ("backward",),
             ("Check every shape: dW is (out, in) like W, so it is dout^T @ x, not x^T @ dout.",
              "db sums dout over the batch; dx has x's shape.")),
    Exercise("dropout", "minivgg.layers.activation", "Dropout", ("backward",),
             ("The mask forward drew already holds the 1/(1-p) scale.",
              "In eval (mask is None) the layer is the identity: return a copy of dout.")),
    Exercise("softmax_ce", "minivgg.losses", "SoftmaxCrossEntropy", ("backward",),
             ("softmax(z) = exp(log_p); subtract the target t (one-hot, smoothed by eps) and divide by N.",
              "Multiply by dout, the upstream gradient of the loss (1 for a plain loss).")),
    Exercise("maxpool", "minivgg.layers.pool", "MaxPool2d", ("backward",),
             ("argmax[n, c, i, j] = kh*KW + kw, the offset in window (i, j) of its first maximum.",
              "Send each dout element to that one pixel only (+= where windows overlap); pad_input "
              "and a crop handle the padding."), ("maxpool_backward",)),
    Exercise("conv", "minivgg.layers.conv", "Conv2d", ("backward",),
             ("Forward is one matrix product out = Wm @ cols: transcribe the docstring's Backward "
              "lines, dW = D @ cols^T and dx = col2im(Wm^T @ D), with D = dout laid out as that product.",
              "Rebuild the columns with im2col when forward did not keep them; db sums D over its columns.")),
    Exercise("batchnorm", "minivgg.layers.norm", "BatchNorm2d", ("backward",),
             ("mu and var depend on every x of the channel: dx has the two mean terms of the docstring.",
              "In eval the statistics are constants: dx = dout * gamma / sqrt(running_var + eps).")),
    Exercise("adam", "minivgg.optim.optimizers", "Adam", ("_adam",),
             ("Update m and v in place (m *= ...; m += ...), then p -= the step: the caller keeps "
              "references to p, m and v.",
              "Bias corrections: m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t).")),
)
BY_NAME = {e.name: e for e in EXERCISES}


def exercise_source(source: str, ex: Exercise, package: str, solved: bool = False) -> str:
    """The workspace file for `ex`, cut from `source` (the text of module `ex.module`).

    package: the module's package, to turn relative imports into absolute ones.
    solved: keep the backward bodies (the shipped solution, cut out the same way).
    """
    tree = ast.parse(source)
    lines = source.splitlines()
    top = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    if ex.cls not in top or not isinstance(top[ex.cls], ast.ClassDef):
        raise ValueError(f"exercise {ex.name!r}: no class {ex.cls} in {ex.module}")
    cls = top[ex.cls]
    methods = {m.name: m for m in cls.body if isinstance(m, ast.FunctionDef)}
    missing = [g for g in ex.gaps if g not in methods]
    if missing:
        raise ValueError(f"exercise {ex.name!r}: {ex.module}.{ex.cls} has no method {missing}")

    out = []
    doc = ast.get_docstring(tree, clean=False)
    out.append(f'"""Exercise {ex.name}: write {ex.cls}.{" and ".join(ex.gaps)} '
               f'(the solution is {ex.module}).\n\n{doc or ""}"""')
    for node in tree.body:   # imports, made absolute: the helpers come from the installed minivgg
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not solved:
            node = _without(node, ex.withhold)
        if node is None:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                node = ast.ImportFrom(".".join(base + ([node.module] if node.module else [])), node.names, 0)
            out.append(ast.unparse(node) + ("\n" if node.module == "__future__" else ""))
        elif isinstance(node, ast.Import):
            out.append(ast.unparse(node))
    used = _names_outside_gaps(cls, () if solved else ex.gaps) & (set(top) | _assigned(tree)) - {ex.cls}
    if used:   # the module's own helpers the class uses (correlate, Optimizer ...)
        out.append(f"from {ex.module} import {', '.join(sorted(used))}")
    out += ["", ""]

    cut = _class_with_gaps(lines, cls, [] if solved else [methods[g] for g in ex.gaps], ex)
    out += cut
    return "\n".join(out) + "\n"


def _class_with_gaps(lines, cls, gapped, ex) -> list[str]:
    """The class's source lines, each gapped method's body (after its docstring) replaced."""
    start = min([cls.lineno] + [d.lineno for d in cls.decorator_list])
    text = lines[start - 1:cls.end_lineno]
    for m in sorted(gapped, key=lambda m: m.lineno, reverse=True):
        body = m.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]   # keep the method's docstring
        first = body[0].lineno if body else m.end_lineno + 1
        indent = " " * (m.col_offset + 4)
        todo = f"# TODO ({ex.name}): "
        gap = [f"{indent}{'#'.ljust(len(todo)) if i else todo}{line}" for h in ex.hints
               for i, line in enumerate(textwrap.wrap(h, 100 - len(indent) - len(todo)))]
        gap += [f"{indent}# forward left you: {c}" for c in _cache_lines(cls)] if m.name == "backward" else []
        gap.append(f'{indent}raise NotImplementedError("{GAP} write {ex.cls}.{m.name}")')
        text[first - start:m.end_lineno - start + 1] = gap
    return text


def _without(node, names):
    """The import statement without the aliases in `names` (None if nothing is left)."""
    kept = [a for a in node.names if (a.asname or a.name) not in names]
    if not kept:
        return None
    copy = ast.ImportFrom(node.module, kept, node.level) if isinstance(node, ast.ImportFrom) else ast.Import(kept)
    return copy


def _cache_lines(cls) -> list[str]:
    """Each `self.cache = ...` statement of the class's forward, as written there."""
    fwd = [m for m in cls.body if isinstance(m, ast.FunctionDef) and m.name == "forward"]
    found = []
    for node in ast.walk(fwd[0]) if fwd else []:
        if isinstance(node, ast.Assign) and any(ast.unparse(t) == "self.cache" for t in node.targets):
            found.append(ast.unparse(node))
    return list(dict.fromkeys(found))


def _names_outside_gaps(cls, gaps) -> set[str]:
    names = {ast.unparse(b) for b in cls.bases}
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name in gaps:
            node = ast.FunctionDef(node.name, node.args, [], node.decorator_list, node.returns)
        names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    return names


def _assigned(tree) -> set[str]:
    return {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}


def shipped_source(ex: Exercise) -> tuple[str, str]:
    """(source text, package) of the module that holds the solution."""
    mod = importlib.import_module(ex.module)
    return inspect.getsource(mod), mod.__package__


def readme() -> str:
    rows = "\n".join(f"{i}. `{e.name}.py`: {e.cls}.{' and '.join(e.gaps)} (solution: `{e.module}`)"
                     for i, e in enumerate(EXERCISES, 1))
    return f"""# Backprop exercises

Each file holds one minivgg layer (or the Adam update) with its forward pass and
docstring as shipped, and its backward pass left as a gap
(`raise NotImplementedError("{GAP} ...")`). Replace each gap with code; the
docstring's equations and the `# forward left you:` line tell you what you have.
Shared helpers (im2col, col2im, the Layer base and its checks) come from the
installed minivgg.

Do them in this order, simplest first:

{rows}
{len(EXERCISES) + 1}. Train VGG-11-BN on Fashion-MNIST with your layers:
   `python -m minivgg.exercises train DIR`

Grade your work at any time (all, or the ones you name):

    python -m minivgg.exercises check DIR
    python -m minivgg.exercises check DIR relu linear

Each exercise is checked in float64 against central differences, against
PyTorch where it is installed, and for the contracts (inputs left unchanged,
dtypes kept). A failure names the gradient and its worst element.
"""


class WorkspaceError(ValueError):
    """The workspace directory cannot be used as asked."""


def init_workspace(directory, solved: bool = False) -> list[Path]:
    """Write a fresh workspace into `directory` (created if needed); refuses one that holds files.

    solved: write the shipped solutions instead of the gaps (to see a full workspace pass).
    """
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise WorkspaceError(f"{d} is a file, expected a directory for the workspace")
    if d.is_dir() and any(d.iterdir()):
        held = sorted(p.name for p in d.iterdir())
        raise WorkspaceError(f"{d} is not empty (it holds {', '.join(held[:5])}"
                             f"{'...' if len(held) > 5 else ''}); a workspace is only written into an "
                             "empty or new directory, so no work is overwritten")
    d.mkdir(parents=True, exist_ok=True)
    files = {f"{e.name}.py": exercise_source_for(e, solved=solved) for e in EXERCISES}
    files["README.md"] = readme()
    written = []
    for name, text in files.items():
        written.append(_write_atomic(d / name, text))
    return written


def exercise_source_for(ex: Exercise, solved: bool = False) -> str:
    """The workspace file for `ex`, cut from the installed minivgg's source of it."""
    src, package = shipped_source(ex)
    return exercise_source(src, ex, package, solved=solved)


def _write_atomic(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
