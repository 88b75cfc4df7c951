"""What every stage's command line shares: option types, logging, and clean errors."""

import argparse
import atexit
import ctypes
import functools
import logging
import os
import re
import sys
from collections.abc import Callable

from pipeline import config
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")
_M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An option type for whole numbers from `low` to `high` (no upper bound when None)."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if value < low or (high is not None and value > high):
            allowed = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be a whole number {allowed}, got {text}")
        return value

    parse.__name__ = f"int_range({low}, {high})"
    return parse


def image_size(text: str) -> int:
    """The side of the square model input: ResNet50 needs at least config.MIN_IMAGE_SIZE pixels."""
    return int_range(config.MIN_IMAGE_SIZE, config.MAX_IMAGE_SIZE)(text)


def seed(text: str) -> int:
    """A random seed: NumPy and Keras take 0 to 2**32 - 1."""
    return int_range(0, 2**32 - 1)(text)


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def boolean(text: str) -> bool:
    """true/false, yes/no, 1/0 (MLflow passes every parameter as a string)."""
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")


def fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def unit_interval(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1, got {text}")
    return value


def sha256_hex(text: str) -> str:
    text = text.strip().lower()
    if text and not re.fullmatch(r"[0-9a-f]{64}", text):
        raise argparse.ArgumentTypeError(f"must be 64 hexadecimal digits or empty, got {text!r}")
    return text


def model_name(text: str) -> str:
    """A registered model name: not blank, without '/' or ':' (MLflow refuses them) or '@' (aliases)."""
    if not text.strip() or any(char in text for char in "/:@"):
        raise argparse.ArgumentTypeError(f"must be a non-empty name without '/', ':' or '@', got {text!r}")
    return text


def _number(text: str, kind: type) -> int | float:
    """Parse a number; MLproject has no int type, so "64.0" is accepted as the int 64."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if kind is int:
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text}")
        return int(value)
    return value


def parser(stage: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"python -m pipeline.{stage}",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def limit_malloc_arenas(arenas: int = config.MALLOC_ARENAS) -> None:
    """Cap glibc's malloc arenas for this process.

    In time before TensorFlow's thread pools start (they start with the first op, not at
    import). MALLOC_ARENA_MAX, which glibc reads when a process starts, wins when set.
    """
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):  # no libc to load, or a libc without mallopt
        pass


def entry_point(main: Callable[[list[str] | None], object]) -> Callable[[list[str] | None], None]:
    """Run a stage's main: cap malloc's arenas, log to stderr, turn PipelineError into one line
    and exit 2."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> None:
        limit_malloc_arenas()
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            main(argv)
        except PipelineError as error:
            log.error("%s", error)
            sys.exit(2)
        except KeyboardInterrupt:
            log.error("interrupted; the MLflow run is marked KILLED")
            sys.exit(130)

    return wrapped


def run(main: Callable[[], object]) -> None:
    """Run a stage's `main` (wrapped by `entry_point`) as this process's command; when it
    returns, leave at once.

    Python's teardown of a process that has trained a ResNet-50 took 5.5 s here (TensorFlow's
    objects freed one by one as the interpreter ends), once per stage and per tuning trial.
    Every file, run and log is closed by the time `main` returns; the atexit handlers
    (MLflow's among them) still run. An error leaves the usual way, through SystemExit.
    """
    main()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
