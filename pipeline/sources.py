"""Turn ingest's `source` (an https URL, a .zip or a folder) into a local folder.

Downloads and unpacked archives are cached under the data folder and reused;
every file is written under a temporary name and renamed when complete, so an
interrupted download or unpack is never mistaken for a finished one.
"""

import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from pipeline import config
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_COMPLETE_MARKER = ".unpacked"


@dataclass
class Fetched:
    """A local folder of images and the archive entries that were not unpacked."""

    folder: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)
    archive_sha256: str | None = None


def fetch(source: str, data_dir: Path, sha256: str | None = None) -> Fetched:
    """Resolve `source` to a local folder, downloading and unpacking as needed.

    Raises PipelineError for a missing path, a URL that does not answer, a
    truncated download, a sha256 mismatch, or a hostile archive.
    """
    check(source, sha256)
    sha256 = (sha256 or "").strip().lower() or None
    if _is_url(source):
        archive = download(source, data_dir / "downloads", sha256)
        return unpack(archive, data_dir / "unpacked")
    path = Path(source).expanduser()
    if path.is_dir():
        return Fetched(path)
    return unpack(path, data_dir / "unpacked", verify_sha256(path, sha256))


def check(source: str, sha256: str | None = None) -> None:
    """Raise PipelineError unless `source` is an http(s) URL, an existing .zip or a folder.

    Cheap (nothing is downloaded or unpacked): stages call it before they open a run.
    """
    if not source.strip():
        raise PipelineError("source is empty: give an https URL, a .zip file or a folder")
    if _is_url(source):
        return
    scheme = urllib.parse.urlparse(source).scheme
    if scheme and len(scheme) > 1:
        raise PipelineError(f"source {source!r}: only https URLs, .zip files and folders are supported")
    path = Path(source).expanduser()
    if path.is_dir():
        if (sha256 or "").strip():
            raise PipelineError(f"sha256 applies to archives, but source {source!r} is a folder")
        return
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise PipelineError(f"source {source!r} is a file but not a .zip archive")
        return
    raise PipelineError(f"source {source!r} does not exist: give an https URL, a .zip file or a folder")


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str | None) -> str:
    """The file's sha256; PipelineError when `expected` is given and differs."""
    actual = file_sha256(path)
    if expected and actual != expected:
        raise PipelineError(
            f"{path}: sha256 is {actual}, expected {expected}; "
            "the file is corrupt or not the one you meant (delete it to download again)"
        )
    return actual


def download(url: str, folder: Path, sha256: str | None = None) -> Path:
    """Download `url` into `folder` once; later calls reuse the file."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", PurePosixPath(urllib.parse.urlparse(url).path).name)
    target = folder / (name or "download.zip")
    if target.is_file():
        if not sha256 or file_sha256(target) == sha256:
            log.info("reusing %s", target)
            return target
        log.warning("%s does not match sha256 %s; downloading again", target, sha256)
    folder.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".part")[1])
    try:
        _stream(url, partial)
        actual = file_sha256(partial)
        if sha256 and actual != sha256:
            raise PipelineError(
                f"{url}: the downloaded file's sha256 is {actual}, expected {sha256}; "
                "check the sha256 and the URL (the download was not kept)"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _stream(url: str, destination: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=config.DOWNLOAD_TIMEOUT_S) as response:
            expected = int(response.headers.get("Content-Length") or 0) or None
            received = _copy_with_progress(response, destination, expected, url)
    except urllib.error.HTTPError as error:
        raise PipelineError(f"{url}: the server answered HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        raise PipelineError(
            f"{url} does not answer ({reason}); check the address and your connection, "
            "or pass a local .zip or folder as source"
        ) from None
    except http.client.IncompleteRead as error:
        raise PipelineError(
            f"{url}: the download was cut off after {len(error.partial):,} bytes; try again"
        ) from None
    if expected is not None and received != expected:
        raise PipelineError(
            f"{url}: the download was cut off at {received:,} of {expected:,} bytes; try again"
        )


def _copy_with_progress(response, destination: Path, expected: int | None, url: str) -> int:
    received = 0
    columns = (*Progress.get_default_columns()[:1], BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with destination.open("wb") as out, Progress(*columns, transient=True) as progress:
        task = progress.add_task(f"downloading {PurePosixPath(url).name}", total=expected)
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            received += len(chunk)
            progress.update(task, advance=len(chunk))
    return received


def unpack(archive: Path, folder: Path, sha256: str | None = None) -> Fetched:
    """Unpack `archive` into its own cached folder under `folder`.

    Entries that escape the target folder (zip-slip) or are symbolic links are
    skipped and reported; an archive that would unpack far larger than it is
    (a zip bomb) is refused whole.
    """
    sha256 = sha256 or file_sha256(archive)
    target = folder / f"{archive.stem}-{sha256[:12]}"
    try:
        with zipfile.ZipFile(archive) as zipped:
            members, skipped = _safe_members(zipped, archive)
            if (target / _COMPLETE_MARKER).is_file():
                log.info("reusing unpacked %s", target)
                return Fetched(target, skipped, sha256)
            folder.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".{target.name}."))
            try:
                for member in members:
                    _extract_or_explain(zipped, member, staging, archive)
                (staging / _COMPLETE_MARKER).write_text(sha256)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (zipfile.BadZipFile, EOFError) as error:
        raise PipelineError(f"{archive}: not a readable zip archive ({error}); download it again") from None
    return Fetched(target, skipped, sha256)


def _safe_members(zipped: zipfile.ZipFile, archive: Path) -> tuple[list[zipfile.ZipInfo], list]:
    members, skipped = [], []
    total = 0
    for info in zipped.infolist():
        if info.is_dir():
            continue
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if not parts or info.filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            skipped.append((info.filename, "archive entry escapes the target folder (zip-slip)"))
            continue
        if stat.S_ISLNK(info.external_attr >> 16):
            skipped.append((info.filename, "symbolic link inside the archive"))
            continue
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > _CHUNK and ratio > config.MAX_COMPRESSION_RATIO:
            raise PipelineError(
                f"{archive}: entry {info.filename} unpacks to {info.file_size:,} bytes from "
                f"{info.compress_size:,} (ratio {ratio:.0f}); refusing a likely zip bomb"
            )
        total += info.file_size
        members.append(info)
    if total > config.MAX_UNPACKED_BYTES:
        raise PipelineError(
            f"{archive}: unpacks to {total:,} bytes, over the {config.MAX_UNPACKED_BYTES:,}-byte "
            "limit; refusing a likely zip bomb"
        )
    return members, skipped


def _extract_or_explain(zipped: zipfile.ZipFile, info: zipfile.ZipInfo, staging: Path, archive: Path) -> None:
    try:
        _extract(zipped, info, staging)
    except (RuntimeError, NotImplementedError) as error:  # encrypted, unknown compression
        raise PipelineError(f"{archive}: cannot unpack entry {info.filename} ({error})") from None
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as error:
        raise PipelineError(
            f"{archive}: entry {info.filename} clashes with another entry of the same name ({error.strerror})"
        ) from None


def _extract(zipped: zipfile.ZipFile, info: zipfile.ZipInfo, staging: Path) -> None:
    destination = staging.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
    destination.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with zipped.open(info) as source, destination.open("wb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            # The header's size can lie; never write more than it promised.
            if written > info.file_size:
                raise PipelineError(f"entry {info.filename} is larger than its header says; refusing")
            out.write(chunk)
