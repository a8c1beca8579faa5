"""A command's options as one table: each row names an option once, and the parser, the defaults and the
rules for resuming a run are all generated from the table (so adding an option is adding a row).

    TABLE = [Section("optimisation"),
             Option("lr", 2e-3, float, "peak learning rate", FIXED),
             Option("epochs", 12, int, "total number of epochs", MAY_CHANGE), ...]
    parser = make_parser(TABLE, prog="train.py")
    args = resolve(TABLE, argv, saved=checkpoint_options)   # defaults < preset < checkpoint < flags

What a resumed run does with an option (`resume`):
    FIXED       the checkpoint's value is kept; typing a different one is refused (OptionError): the
                weights, optimizer state and data split were made with it
    MAY_CHANGE  the checkpoint's value is kept unless the option is typed again
    IGNORED     not taken from the checkpoint: it belongs to one invocation (device, progress bars ...)
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

FIXED, MAY_CHANGE, IGNORED = "fixed", "may change", "ignored"


class OptionError(ValueError):
    """Options that do not go together, or a changed option a resumed run cannot take (bad input)."""


@dataclass(frozen=True)
class Option:
    """One command-line option: --name-with-dashes, stored as args.name.

    type        bool makes a --name / --no-name switch; any other callable converts the text (as argparse)
    resume      FIXED, MAY_CHANGE or IGNORED (module docstring)
    choices, metavar, nargs, const   passed to argparse as they are (None: left out)
    """

    name: str
    default: Any
    type: Callable
    help: str
    resume: str = IGNORED
    choices: tuple | None = None
    metavar: str | None = None
    nargs: str | None = None
    const: Any = None

    def __post_init__(self):
        if self.resume not in (FIXED, MAY_CHANGE, IGNORED):
            raise ValueError(f"Option {self.name!r}: resume must be FIXED, MAY_CHANGE or IGNORED, got {self.resume!r}")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Section:
    """A heading in --help: the options after it, up to the next Section, are listed under it."""

    title: str
    options: list = field(default_factory=list)


def options(table) -> list[Option]:
    return [row for row in table if isinstance(row, Option)]


def defaults(table) -> dict:
    """{name: default} of every option."""
    return {o.name: o.default for o in options(table)}


def names(table, resume: str) -> tuple[str, ...]:
    """The options a resumed run treats as `resume` (FIXED, MAY_CHANGE or IGNORED)."""
    return tuple(o.name for o in options(table) if o.resume == resume)


def make_parser(table, suppress: bool = False, **parser_kwargs) -> argparse.ArgumentParser:
    """An argparse parser with one argument per row, grouped by Section.

    suppress=True leaves out every option not typed, so parse_args() returns only what the user gave.
    """
    p = argparse.ArgumentParser(argument_default=argparse.SUPPRESS if suppress else None, **parser_kwargs)
    group = p
    for row in table:
        if isinstance(row, Section):
            group = p.add_argument_group(row.title)
            continue
        kwargs = {"help": row.help, "default": argparse.SUPPRESS if suppress else row.default}
        if row.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = row.type
        for key in ("choices", "metavar", "nargs", "const"):
            if getattr(row, key) is not None:
                kwargs[key] = list(getattr(row, key)) if key == "choices" else getattr(row, key)
        group.add_argument(row.flag, **kwargs)
    return p


def resolve(table, given: dict, saved: dict | None = None, preset: dict | None = None,
            same: Callable[[str, Any], Any] = lambda key, value: value) -> dict:
    """The options of a run: defaults < `preset` < a resumed run's `saved` options < `given` (typed).

    `same(key, value)` puts a value in one form whether typed or read back from JSON, to compare them.
    Raises OptionError naming the first FIXED option typed with a value other than the saved one.
    """
    merged = defaults(table)
    merged.update(preset or {})
    if saved is not None:
        by_name = {o.name: o for o in options(table)}
        for o in options(table):
            if o.resume == FIXED and o.name in given and o.name in saved \
                    and same(o.name, given[o.name]) != same(o.name, saved[o.name]):
                raise OptionError(f"{o.flag} {given[o.name]!r} cannot change on --resume: the run was started "
                                  f"with {saved[o.name]!r} (start a new run with --out to change it)")
        merged.update({k: v for k, v in saved.items() if k in by_name and by_name[k].resume != IGNORED})
    merged.update(given)
    return merged


def run_command(fn: Callable[[], int], bad_input: tuple, hint: Callable[[BaseException], str] = lambda e: "") -> int:
    """fn()'s exit status, with a command's three kinds of failure each told in one line:
    bad input (an exception of `bad_input`; hint(e) may add the flag to use) exits 2, a failed
    write (any other OSError: disk full, permission, a folder in the way; the old files stand)
    exits 4, Ctrl-C exits 130. Any other exception is a bug and keeps its traceback, as do all
    of them under MINIVGG_DEBUG=1."""
    try:
        return fn()
    except bad_input as e:
        if os.environ.get("MINIVGG_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {first}{hint(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if os.environ.get("MINIVGG_DEBUG"):
            raise
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
