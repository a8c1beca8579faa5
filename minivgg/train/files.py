"""Writing a run's files so that a kill or a full disk never leaves half of one: temp file, fsync, rename.

Every file a run leaves (checkpoints, history, plots) goes through atomic_write; a kill between
the temp file's creation and its rename can still leave the temp file, so remove_stale_temps
clears them at the next start in that folder.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

# what atomic_write's temp files are called: .<target name>.<8 random characters>.tmp
_TEMP = re.compile(r"^\.(.+\.(npz|json|csv|png|onnx))\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write) -> Path:
    """Call write(f) on a binary temp file beside `path`, fsync it, then rename it over `path`.

    A failure (or a kill) at any moment leaves the old file or the new one, never half of one.
    An OSError names `path` itself (not the temp file), so the message says what could not be written.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:   # KeyboardInterrupt too: never leave the temp file behind
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    try:  # make the rename itself durable (POSIX); harmless where directories can't be opened
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_stale_temps(folder, name: str | None = None) -> list[Path]:
    """Delete temp files that a killed atomic_write left in `folder` (only those of target `name`,
    if given: a folder shared with other files loses nothing else); returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m and (name is None or m.group(1) == name) and p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed
