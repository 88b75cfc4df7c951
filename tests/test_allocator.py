"""Every stage caps glibc's malloc arenas before it starts its threads (cli.entry_point)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from pipeline import config

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc arenas")

# A stage whose main starts six threads that each allocate; then the process lists its arenas.
PROBE = """
import ctypes, sys, threading
from pipeline import cli
barrier = threading.Barrier(7)
def allocate():
    block = bytearray(64 * 1024)  # under the mmap threshold: taken from this thread's arena
    barrier.wait()
    barrier.wait()
def start_threads(argv):
    for _ in range(6):
        threading.Thread(target=allocate).start()
    barrier.wait()
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    stream = ctypes.c_void_p(libc.fopen(sys.argv[1].encode(), b"w"))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    barrier.wait()
if sys.argv[2] == "stage":
    cli.entry_point(start_threads)([])
else:
    start_threads([])
"""


def arenas(tmp_path: Path, how: str, **env: str) -> int:
    report = tmp_path / f"malloc-{how}-{len(env)}.xml"
    environment = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(report), how],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**environment, **env},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return report.read_text().count("<heap nr=")


def test_a_stage_caps_the_arenas_its_threads_get(tmp_path):
    assert arenas(tmp_path, "plain") == 7  # the main arena and one per thread: glibc's own way
    assert arenas(tmp_path, "stage") == config.MALLOC_ARENAS


def test_malloc_arena_max_set_by_the_user_wins(tmp_path):
    assert arenas(tmp_path, "stage", MALLOC_ARENA_MAX="4") == 4
