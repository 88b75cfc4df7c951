"""pipeline.sources.fetch: folders, local .zip files and downloads, and hostile archives.

Real files, real zip archives and a real HTTP server on 127.0.0.1; nothing is mocked.
"""

import hashlib
import socket
import struct
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import photo_bytes

from pipeline import config, sources
from pipeline.errors import PipelineError

MARKER = ".unpacked"  # sources._COMPLETE_MARKER


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (relative posix path -> bytes), symbolic links included."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_symlink():
            found[path.relative_to(folder).as_posix()] = b"<symlink>"
        elif path.is_file():
            found[path.relative_to(folder).as_posix()] = path.read_bytes()
    return found


def everything_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def write_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]], **options) -> Path:
    with zipfile.ZipFile(path, "w", **options) as zipped:
        for name, data in entries:
            zipped.writestr(name, data)
    return path


def assert_nothing_unpacked(data_dir: Path) -> None:
    unpacked = data_dir / "unpacked"
    assert not unpacked.exists() or list(unpacked.iterdir()) == []


# ---------------------------------------------------------------- folders and local archives


def test_folder_is_returned_as_is(tmp_path, dataset_dir):
    data_dir = tmp_path / "data"
    fetched = sources.fetch(str(dataset_dir), data_dir)
    assert fetched.folder == dataset_dir
    assert fetched.skipped == []
    assert fetched.archive_sha256 is None
    assert not data_dir.exists()  # nothing copied, nothing cached


def test_local_zip_is_unpacked_once_and_reused(tmp_path, dataset_dir, dataset_zip):
    data_dir = tmp_path / "data"
    digest = sha256_of(dataset_zip)

    first = sources.fetch(str(dataset_zip), data_dir)
    assert first.folder == data_dir / "unpacked" / f"photos-{digest[:12]}"
    assert first.archive_sha256 == digest
    assert first.skipped == []
    unpacked = files_under(first.folder)
    assert unpacked.pop(MARKER) == digest.encode()
    assert unpacked == files_under(dataset_dir)
    assert len(unpacked) == 40
    # Only the finished folder is left: no staging folder next to it.
    assert list((data_dir / "unpacked").iterdir()) == [first.folder]

    marker_mtime = (first.folder / MARKER).stat().st_mtime_ns
    folder_inode = first.folder.stat().st_ino
    (first.folder / "sentinel.txt").write_text("a second unpack would delete me")

    second = sources.fetch(str(dataset_zip), data_dir)
    assert second.folder == first.folder
    assert second.archive_sha256 == digest
    assert (second.folder / MARKER).stat().st_mtime_ns == marker_mtime
    assert second.folder.stat().st_ino == folder_inode
    assert (second.folder / "sentinel.txt").read_text() == "a second unpack would delete me"
    assert list((data_dir / "unpacked").iterdir()) == [first.folder]


def test_interrupted_unpack_is_done_again(tmp_path, dataset_zip):
    """A target folder without the completion marker is not trusted."""
    data_dir = tmp_path / "data"
    digest = sha256_of(dataset_zip)
    half_done = data_dir / "unpacked" / f"photos-{digest[:12]}"
    half_done.mkdir(parents=True)
    (half_done / "leftover.JPG").write_bytes(b"half")

    fetched = sources.fetch(str(dataset_zip), data_dir)
    assert fetched.folder == half_done
    assert (half_done / MARKER).read_text() == digest
    assert not (half_done / "leftover.JPG").exists()
    assert len(files_under(half_done)) == 41


def test_right_sha256_passes(tmp_path, dataset_zip):
    digest = sha256_of(dataset_zip)
    fetched = sources.fetch(str(dataset_zip), tmp_path / "data", f"  {digest.upper()}\n")
    assert fetched.archive_sha256 == digest
    assert (fetched.folder / MARKER).read_text() == digest


def test_wrong_sha256_names_the_file_and_both_digests(tmp_path, dataset_zip):
    data_dir = tmp_path / "data"
    wrong = "0" * 64
    with pytest.raises(PipelineError) as error:
        sources.fetch(str(dataset_zip), data_dir, wrong)
    message = str(error.value)
    assert str(dataset_zip) in message
    assert sha256_of(dataset_zip) in message
    assert wrong in message
    assert_nothing_unpacked(data_dir)


def test_sha256_with_a_folder_is_refused(tmp_path, dataset_dir):
    with pytest.raises(PipelineError) as error:
        sources.fetch(str(dataset_dir), tmp_path / "data", "ab" * 32)
    message = str(error.value)
    assert "sha256" in message
    assert str(dataset_dir) in message
    assert "folder" in message


def test_missing_path_is_refused(tmp_path):
    source = str(tmp_path / "no-such-photos.zip")
    with pytest.raises(PipelineError) as error:
        sources.fetch(source, tmp_path / "data")
    assert source in str(error.value)
    assert "does not exist" in str(error.value)


def test_file_that_is_not_a_zip_is_refused(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("these are not photos\n")
    with pytest.raises(PipelineError) as error:
        sources.fetch(str(notes), tmp_path / "data")
    assert str(notes) in str(error.value)
    assert "not a .zip" in str(error.value)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "source", ["ftp://example.org/photos.zip", "file:///tmp/photos.zip", "s3://bucket/x.zip"]
)
def test_unsupported_scheme_is_refused(tmp_path, source):
    with pytest.raises(PipelineError) as error:
        sources.fetch(source, tmp_path / "data")
    assert source in str(error.value)
    assert "only https URLs" in str(error.value)


def test_corrupt_zip_is_refused(tmp_path):
    archive = write_zip(tmp_path / "corrupt.zip", [("Dataset/0/a.txt", b"A" * 1000)])
    raw = archive.read_bytes()
    assert raw.count(b"A" * 1000) == 1
    archive.write_bytes(raw.replace(b"A" * 1000, b"B" * 1000))  # same size, wrong CRC
    assert zipfile.is_zipfile(archive)
    data_dir = tmp_path / "data"
    with pytest.raises(PipelineError) as error:
        sources.fetch(str(archive), data_dir)
    assert str(archive) in str(error.value)
    assert "not a readable zip archive" in str(error.value)
    assert_nothing_unpacked(data_dir)


# ---------------------------------------------------------------- hostile archives


def test_zip_slip_entries_are_skipped_and_reported(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative write would land here, where we can see it
    good = photo_bytes(2, 0)
    archive = write_zip(
        tmp_path / "slip.zip",
        [
            ("../evil.txt", b"evil"),
            ("/abs.txt", b"absolute"),
            ("Dataset/../../../evil2.txt", b"evil"),
            ("C:/windows.txt", b"drive"),
            ("Dataset/2/IMG_1.JPG", good),
        ],
    )
    data_dir = tmp_path / "data"
    absolute_existed = Path("/abs.txt").exists()
    before = everything_under(tmp_path)

    fetched = sources.fetch(str(archive), data_dir)

    assert files_under(fetched.folder) == {"Dataset/2/IMG_1.JPG": good, MARKER: sha256_of(archive).encode()}
    skipped = dict(fetched.skipped)
    assert set(skipped) == {"../evil.txt", "/abs.txt", "Dataset/../../../evil2.txt", "C:/windows.txt"}
    for reason in skipped.values():
        assert "zip-slip" in reason
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "evil2.txt").exists()
    assert not (tmp_path.parent / "evil2.txt").exists()
    assert Path("/abs.txt").exists() == absolute_existed
    created = everything_under(tmp_path) - before
    outside = {path for path in created if not path.is_relative_to(data_dir)}
    assert outside == set()


def test_symlink_entry_is_skipped_and_reported(tmp_path):
    link = zipfile.ZipInfo("Dataset/3/link.JPG")
    link.external_attr = 0o120777 << 16
    good = photo_bytes(3, 0)
    archive = write_zip(tmp_path / "links.zip", [(link, b"/etc/passwd"), ("Dataset/3/IMG_2.JPG", good)])

    fetched = sources.fetch(str(archive), tmp_path / "data")

    assert fetched.skipped == [("Dataset/3/link.JPG", "symbolic link inside the archive")]
    link_path = fetched.folder / "Dataset" / "3" / "link.JPG"
    assert not link_path.exists() and not link_path.is_symlink()
    assert files_under(fetched.folder) == {"Dataset/3/IMG_2.JPG": good, MARKER: sha256_of(archive).encode()}
    again = sources.fetch(str(archive), tmp_path / "data")  # reused, and still reported
    assert again.folder == fetched.folder
    assert again.skipped == fetched.skipped


def test_zip_bomb_is_refused_whole(tmp_path):
    archive = write_zip(
        tmp_path / "bomb.zip",
        [("Dataset/0/IMG_1.JPG", photo_bytes(0, 0)), ("Dataset/0/zeros.bin", bytes(50_000_000))],
        compression=zipfile.ZIP_DEFLATED,
    )
    assert archive.stat().st_size < 200_000  # 50 MB of zeros compress about 1000 times
    data_dir = tmp_path / "data"
    with pytest.raises(PipelineError) as error:
        sources.fetch(str(archive), data_dir)
    message = str(error.value)
    assert str(archive) in message
    assert "Dataset/0/zeros.bin" in message
    assert "50,000,000 bytes" in message
    assert "ratio" in message
    assert "zip bomb" in message
    assert_nothing_unpacked(data_dir)


def test_archive_over_the_unpacked_size_limit_is_refused(tmp_path, dataset_zip, monkeypatch):
    with zipfile.ZipFile(dataset_zip) as zipped:
        total = sum(info.file_size for info in zipped.infolist())
    data_dir = tmp_path / "data"

    monkeypatch.setattr(config, "MAX_UNPACKED_BYTES", total - 1)
    with pytest.raises(PipelineError) as error:
        sources.fetch(str(dataset_zip), data_dir)
    message = str(error.value)
    assert str(dataset_zip) in message
    assert f"unpacks to {total:,} bytes" in message
    assert f"over the {total - 1:,}-byte limit" in message
    assert_nothing_unpacked(data_dir)

    monkeypatch.setattr(config, "MAX_UNPACKED_BYTES", total)  # exactly at the limit is fine
    fetched = sources.fetch(str(dataset_zip), data_dir)
    assert len(files_under(fetched.folder)) == 41


def _encrypted_flag(raw: bytes) -> bytes:
    """Set the 'encrypted' general-purpose flag on the first local and central header."""
    data = bytearray(raw)
    central = data.find(b"PK\x01\x02")
    for offset in (6, central + 8):
        (flags,) = struct.unpack("<H", data[offset : offset + 2])
        data[offset : offset + 2] = struct.pack("<H", flags | 0x1)
    return bytes(data)


def _unknown_method(raw: bytes) -> bytes:
    """Claim compression method 99 (AES, which zipfile cannot read) for the first entry."""
    data = bytearray(raw)
    central = data.find(b"PK\x01\x02")
    for offset in (8, central + 10):
        data[offset : offset + 2] = struct.pack("<H", 99)
    return bytes(data)


@pytest.mark.parametrize("kind", ["encrypted", "unknown-method", "file-and-folder"])
def test_unreadable_entries_give_a_pipeline_error(tmp_path, kind):
    entry = "Dataset/4/IMG_1.JPG"
    if kind == "file-and-folder":
        entries = [(entry, b"a file"), (f"{entry}/inner.JPG", b"and a folder of the same name")]
        raw = write_zip(tmp_path / "plain.zip", entries).read_bytes()
    else:
        raw = write_zip(tmp_path / "plain.zip", [(entry, photo_bytes(4, 1))]).read_bytes()
        raw = _encrypted_flag(raw) if kind == "encrypted" else _unknown_method(raw)
    archive = tmp_path / f"{kind}.zip"
    archive.write_bytes(raw)
    data_dir = tmp_path / "data"
    try:
        sources.fetch(str(archive), data_dir)
    except PipelineError as error:
        assert str(archive) in str(error)
        assert entry in str(error)
    except Exception as error:  # anything else escaping is the bug
        raise AssertionError(f"{type(error).__name__} escaped: {error}") from error
    else:
        raise AssertionError("an unreadable archive was accepted")
    assert_nothing_unpacked(data_dir)


# ---------------------------------------------------------------- downloads


class Server:
    """A real HTTP server on 127.0.0.1 whose routes the test sets; it records each request path."""

    def __init__(self):
        self.routes = {}
        self.requests = []
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve_file(self, path: str, data: bytes) -> str:
        def send(handler):
            handler.send_response(200)
            handler.send_header("Content-Type", "application/zip")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)

        self.routes[path] = send
        return self.url(path)


@pytest.fixture
def server(request, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(config, "DOWNLOAD_TIMEOUT_S", 5.0)  # a hang fails in seconds, not 30
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            state.requests.append(self.path)
            route = state.routes.get(self.path)
            if route is None:
                self.send_error(404, "no such file")
            else:
                route(self)

        def log_message(self, format, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), name="test-http", daemon=True)
    thread.start()

    def stop():
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    request.addfinalizer(stop)
    state.port = httpd.server_address[1]
    return state


def test_download_is_fetched_once_and_unpacked(tmp_path, server, dataset_dir, dataset_zip):
    url = server.serve_file("/files/photos.zip", dataset_zip.read_bytes())
    data_dir = tmp_path / "data"
    digest = sha256_of(dataset_zip)

    first = sources.fetch(url, data_dir)
    assert server.requests == ["/files/photos.zip"]
    downloaded = data_dir / "downloads" / "photos.zip"
    assert downloaded.read_bytes() == dataset_zip.read_bytes()
    assert list((data_dir / "downloads").iterdir()) == [downloaded]
    assert first.folder == data_dir / "unpacked" / f"photos-{digest[:12]}"
    assert first.archive_sha256 == digest
    unpacked = files_under(first.folder)
    assert unpacked.pop(MARKER) == digest.encode()
    assert unpacked == files_under(dataset_dir)

    second = sources.fetch(url, data_dir)
    third = sources.fetch(url, data_dir, digest)
    assert server.requests == ["/files/photos.zip"]  # the server was not asked again
    assert second.folder == third.folder == first.folder


def test_download_without_a_file_name(tmp_path, server, dataset_zip):
    url = server.serve_file("/", dataset_zip.read_bytes())
    fetched = sources.fetch(url, tmp_path / "data")
    assert (tmp_path / "data" / "downloads" / "download.zip").read_bytes() == dataset_zip.read_bytes()
    assert fetched.folder.name == f"download-{sha256_of(dataset_zip)[:12]}"


def test_cached_download_with_the_wrong_sha256_is_downloaded_again(tmp_path, server, dataset_zip):
    url = server.serve_file("/photos.zip", dataset_zip.read_bytes())
    downloads = tmp_path / "data" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "photos.zip").write_bytes(b"an older, different file")

    fetched = sources.fetch(url, tmp_path / "data", sha256_of(dataset_zip))
    assert server.requests == ["/photos.zip"]
    assert (downloads / "photos.zip").read_bytes() == dataset_zip.read_bytes()
    assert len(files_under(fetched.folder)) == 41


def test_download_with_the_wrong_sha256_leaves_nothing(tmp_path, server, dataset_zip):
    url = server.serve_file("/photos.zip", dataset_zip.read_bytes())
    data_dir = tmp_path / "data"
    wrong = "f" * 64
    with pytest.raises(PipelineError) as error:
        sources.fetch(url, data_dir, wrong)
    message = str(error.value)
    assert wrong in message
    assert sha256_of(dataset_zip) in message
    assert "photos.zip" in message
    assert server.requests == ["/photos.zip"]
    assert list((data_dir / "downloads").iterdir()) == []  # neither the file nor a .part
    assert_nothing_unpacked(data_dir)


def test_download_sha256_mismatch_names_the_url(tmp_path, server, dataset_zip):
    url = server.serve_file("/photos.zip", dataset_zip.read_bytes())
    with pytest.raises(PipelineError) as error:
        sources.fetch(url, tmp_path / "data", "f" * 64)
    assert url in str(error.value)
    assert ".part" not in str(error.value)


def test_cut_off_download_leaves_nothing(tmp_path, server):
    def cut_off(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        handler.wfile.write(b"PK\x03\x04garb")  # 10 bytes, then the connection closes
        handler.wfile.flush()
        handler.close_connection = True

    server.routes["/photos.zip"] = cut_off
    url = server.url("/photos.zip")
    data_dir = tmp_path / "data"
    with pytest.raises(PipelineError) as error:
        sources.fetch(url, data_dir)
    message = str(error.value)
    assert url in message
    assert "cut off" in message
    assert "10" in message
    assert list((data_dir / "downloads").iterdir()) == []
    assert_nothing_unpacked(data_dir)


def test_http_404(tmp_path, server):
    url = server.url("/missing.zip")
    data_dir = tmp_path / "data"
    with pytest.raises(PipelineError) as error:
        sources.fetch(url, data_dir)
    assert url in str(error.value)
    assert "HTTP 404" in str(error.value)
    assert server.requests == ["/missing.zip"]
    assert list((data_dir / "downloads").iterdir()) == []


def test_url_that_does_not_answer(tmp_path, server):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/photos.zip"
    data_dir = tmp_path / "data"
    with pytest.raises(PipelineError) as error:
        sources.fetch(url, data_dir)
    assert url in str(error.value)
    assert "does not answer" in str(error.value)
    assert list((data_dir / "downloads").iterdir()) == []


def test_downloaded_non_zip_is_refused(tmp_path, server):
    url = server.serve_file("/page.zip", b"<html>login required</html>")
    data_dir = tmp_path / "data"
    with pytest.raises(PipelineError) as error:
        sources.fetch(url, data_dir)
    assert "page.zip" in str(error.value)
    assert "not a readable zip archive" in str(error.value)
    assert_nothing_unpacked(data_dir)


def test_empty_source_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="source is empty"):
        sources.fetch("  ", tmp_path / "data")
