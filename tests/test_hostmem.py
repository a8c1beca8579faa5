"""minivgg.hostmem.keep_freed_memory: after it, glibc serves a 64 MiB array from its heap (no mmap
of its own) and keeps it mapped once freed, so the next array of that size reuses the pages.

Checked through glibc's own accounting, mallinfo2() (glibc 2.33+): hblkhd = bytes in mmapped
blocks, arena = bytes of heap the main arena holds, uordblks = the bytes of it in use. Each probe runs in a fresh interpreter, since
the setting acts on the whole process and would outlive the test in pytest's."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from minivgg import hostmem

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import ctypes, json, sys
import numpy as np
from minivgg import hostmem

class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def info():
    m = libc.mallinfo2()
    return {"mmapped": m.hblkhd, "heap": m.arena, "in_use": m.uordblks}

keep = sys.argv[1] == "keep"
applied = hostmem.keep_freed_memory() if keep else None
size = 64 * 2**20                       # above glibc's largest sliding mmap threshold (32 MiB)
before = info()
a = np.ones(size // 8)                  # float64, 64 MiB, touched
during = info()
del a
after_free = info()
b = np.ones(size // 8)
print(json.dumps({"applied": applied, "before": before, "during": during,
                  "after_free": after_free, "again": info()}))
"""


def probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
MIB64 = 64 * 2**20


@pytest.mark.skipif(not GLIBC, reason="mallinfo2 is glibc's")
def test_without_it_glibc_maps_and_unmaps_a_large_array():
    """The baseline the setting changes (if this fails, glibc no longer behaves as the module
    docstring says, and the setting may be moot)."""
    r = probe("default")
    assert r["during"]["mmapped"] - r["before"]["mmapped"] >= MIB64      # its own mmap
    assert r["after_free"]["mmapped"] == r["before"]["mmapped"]          # handed back at once


@pytest.mark.skipif(not GLIBC, reason="mallinfo2 is glibc's")
def test_keep_freed_memory_serves_from_the_heap_and_keeps_it():
    r = probe("keep")
    assert r["applied"] is True
    assert r["during"]["mmapped"] == r["before"]["mmapped"]              # no mmap of its own
    assert r["during"]["in_use"] - r["before"]["in_use"] >= MIB64        # from the heap instead
    assert r["after_free"]["heap"] >= r["during"]["heap"]                 # kept when freed
    assert r["again"]["heap"] == r["during"]["heap"]                      # and reused: no growth


def test_not_glibc_changes_nothing(monkeypatch):
    monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("", ""))
    assert hostmem.keep_freed_memory() is False
