"""Atomic writes and locks: what a killed or concurrent process can and cannot leave behind."""

import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT

from pipeline import files
from pipeline.errors import PipelineError


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    files.write_text(path, "old")
    with pytest.raises(RuntimeError), files.replacing(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_the_temporary_name_keeps_the_suffixes_keras_and_numpy_need(tmp_path):
    with files.replacing(tmp_path / "epoch-0003.weights.h5") as temporary:
        assert temporary.name.endswith(".weights.h5") and temporary.name.startswith(".tmp-")
        temporary.write_bytes(b"w")
    assert (tmp_path / "epoch-0003.weights.h5").read_bytes() == b"w"


def test_a_held_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    lock = tmp_path / "search.lock"
    with files.locked(lock, "the search"):
        with pytest.raises(PipelineError, match="the search is in use by another process"):
            with files.locked(lock, "the search"):
                pass
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pipeline import files\n"
            "with files.locked(sys.argv[1], 'x'):\n    print('held', flush=True); time.sleep(60)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(PipelineError):
        with files.locked(lock, "the search"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with files.locked(lock, "the search"):  # SIGKILL leaves no stale lock
        pass
