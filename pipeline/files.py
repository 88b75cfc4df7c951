"""Writing files so that a killed process never leaves half a file under the final name."""

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PipelineError


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` to write to; renamed to `path` when the block succeeds.

    The rename is atomic within one file system, so a reader sees the old file or the new
    one, never a part of it; the file (and then its folder) is flushed to disk first, so
    that holds after a power cut too. The temporary name keeps the file's suffixes (Keras
    insists on `.weights.h5`, numpy appends `.npz`) and starts with a dot. On an error or
    Ctrl-C the temporary file is removed; after a SIGKILL it stays behind, unread.
    """
    path = Path(path)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield temporary
        _flush(temporary)
        os.replace(temporary, path)
        _flush(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def _flush(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (see `replacing`)."""
    with replacing(path) as temporary:
        temporary.write_text(text)


@contextlib.contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) for the block.

    Raises PipelineError naming `what` when another process holds it. The operating
    system releases the lock when the process ends, however it ends, so a killed run
    never leaves a stale lock; the empty file stays.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(
                f"{what} is in use by another process (it holds {path}); wait for it to end or stop it"
            ) from None
        yield
