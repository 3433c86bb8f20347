"""Stage `download`: index parsing, source resolution, fetching with retries, safe extraction.

Offline: every server is a loopback one started by the test; every path is under tmp_path.
Faults (a reset or stalled connection, a truncated body, a wrong checksum, a full disk, an
unwritable data/raw/) must end in one clear message, with no partial corpus and no temporary
left, and an earlier download intact. Hostile inputs (a zip bomb, an overlong body or index, a
trickling server, a remote index naming file://, a FIFO or an outside symlink in a mirror) are
refused by the bound that applies to each, and a killed run's leftovers go at the next run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import os
import re
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rnnlm import download, files
from rnnlm.config import CorpusParams, Paths
from rnnlm.download import (
    DownloadError,
    PackageInfo,
    Source,
    package_url,
    parse_index,
    resolve_source,
    safe_extract,
    select_package,
)
from tests.fixtures import (
    README,
    RESET,
    SHORT_BODY,
    STALL,
    TINY_ID,
    UPSTREAM,
    build_nltk_mirror,
    encode_docs,
    fill_disk,
    make_package_zip,
    serve_directory,
    shipped_params,
    unused_port,
    write_params,
)

ZIP_PATH = f"/packages/corpora/{TINY_ID}.zip"
STATE_UNION_XML = b"""<?xml version="1.0"?>
<nltk_data>
  <packages>
    <package id="state_union" name="C-Span State of the Union Address Corpus"
      webpage="http://www.c-span.org/executive/stateoftheunion.asp" copyright="public domain"
      license="public domain" unzip="1" unzipped_size="2073917" size="808757"
      checksum="044f2d20c592b17a26ac0102111833c9" subdir="corpora"
      url="https://raw.githubusercontent.com/nltk/nltk_data/gh-pages/packages/corpora/state_union.zip"
    />
    <package id="punkt" name="Punkt Tokenizer Models" unzip="1" size="13905355"
      checksum="9b0f6e6ef13cc8d4a2ec2fd6a2fbb8df" subdir="tokenizers"
      url="https://raw.githubusercontent.com/nltk/nltk_data/gh-pages/packages/tokenizers/punkt.zip"
    />
  </packages>
  <collections>
  </collections>
</nltk_data>
"""


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No mirror from the developer's shell, no real NLTK data folders, near-instant backoff."""
    import nltk.data

    monkeypatch.delenv(download.MIRROR_ENV, raising=False)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no_nltk_data")])
    monkeypatch.setattr(download, "BACKOFF_BASE_S", 0.01)


def corpus_params(**overrides: object) -> CorpusParams:
    """Params for `tinycorpus` whose index_url is dead, so only a mirror can succeed."""
    values: dict[str, object] = {
        "name": TINY_ID,
        "index_url": f"http://127.0.0.1:{unused_port()}/index.xml",
        "timeout_s": 5.0,
        "retries": 0,
        "deadline_s": 60.0,
    }
    values.update(overrides)
    return CorpusParams(**values)  # type: ignore[arg-type]


def tmp_paths(tmp_path: Path) -> Paths:
    return dataclasses.replace(shipped_params().paths, raw_dir=tmp_path / "raw")


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The process's temporary folder, moved under tmp_path so a test can see what is left."""
    root = tmp_path / "scratch"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


PREVIOUS = {"old.txt": b"from an earlier run\n", "README": b"earlier README\n"}


def plant_previous(paths: Paths) -> None:
    """An earlier, good download of the corpus, which a failed run must leave as it is."""
    folder = paths.raw_dir / TINY_ID
    folder.mkdir(parents=True)
    for name, data in PREVIOUS.items():
        (folder / name).write_bytes(data)


def assert_previous_intact(paths: Paths, scratch: Path) -> None:
    """data/raw/ holds the earlier corpus only: no partial corpus, no temporary; none in $TMPDIR."""
    assert listing(paths.raw_dir) == [TINY_ID, *(f"{TINY_ID}/{n}" for n in sorted(PREVIOUS))]
    assert read_tree(paths.raw_dir / TINY_ID) == PREVIOUS
    assert listing(scratch) == []


def listing(folder: Path) -> list[str]:
    """Every entry below `folder`, relative, sorted; [] when it does not exist."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def read_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def downloaded_bytes(mirror: Path) -> int:
    """What a download from `mirror` writes beside the output: its index.xml and the zip."""
    return (mirror / "index.xml").stat().st_size + (mirror / ZIP_PATH.lstrip("/")).stat().st_size


def pkg_info(**overrides: object) -> PackageInfo:
    values: dict[str, object] = {
        "id": TINY_ID,
        "subdir": "corpora",
        "size": 10,
        "checksum": "0" * 32,
        "url": f"{UPSTREAM}packages/corpora/{TINY_ID}.zip",
        "unzipped_size": 20,
    }
    values.update(overrides)
    return PackageInfo(**values)  # type: ignore[arg-type]


def test_parse_index_reads_real_format() -> None:
    packages = parse_index(STATE_UNION_XML, "index.xml")
    assert set(packages) == {"state_union", "punkt"}
    assert packages["state_union"] == PackageInfo(
        id="state_union",
        subdir="corpora",
        size=808757,
        checksum="044f2d20c592b17a26ac0102111833c9",
        url="https://raw.githubusercontent.com/nltk/nltk_data/gh-pages/packages/corpora/state_union.zip",
        unzipped_size=2073917,
    )
    assert packages["punkt"].unzipped_size is None


@pytest.mark.mirror
def test_parse_index_reads_shared_mirror(shared_mirror: Path) -> None:
    packages = parse_index((shared_mirror / "index.xml").read_bytes(), str(shared_mirror))
    pkg = select_package(packages, "state_union", str(shared_mirror))
    assert (pkg.size, pkg.checksum) == (808757, "044f2d20c592b17a26ac0102111833c9")
    assert (shared_mirror / "packages/corpora/state_union.zip").stat().st_size == pkg.size


def test_select_missing_package_lists_sorted_corpora() -> None:
    entries = "".join(
        f'<package id="c{i:02d}" subdir="corpora" size="1" checksum="ab"/>'
        for i in range(25, 0, -1)
    )
    entries += '<package id="punkt" subdir="tokenizers" size="1" checksum="ab"/>'
    packages = parse_index(f"<nltk_data><packages>{entries}</packages></nltk_data>".encode(), "ix")
    with pytest.raises(DownloadError) as err:
        select_package(packages, "nope", "ix")
    message = str(err.value)
    assert "'nope'" in message
    assert "available corpora: c01, c02, c03" in message
    assert "c20" in message and "c21" not in message
    assert "(and 5 more)" in message
    assert "punkt" not in message


def test_select_refuses_non_corpora_package() -> None:
    packages = parse_index(STATE_UNION_XML, "ix")
    with pytest.raises(DownloadError, match=r"'punkt' is in 'tokenizers'.*corpora only"):
        select_package(packages, "punkt", "ix")


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (b"<nltk_data><packages>", "not valid XML"),
        (b"Service Unavailable", "not valid XML"),
        (b"<html><body/></html>", "not an NLTK data index"),
        (
            b'<nltk_data><packages><package id="x" size="big" checksum="ab"/>'
            b"</packages></nltk_data>",
            "'x' has size='big'",
        ),
        (
            b'<nltk_data><packages><package id="x" subdir="corpora"/></packages></nltk_data>',
            "'x' lacks its size or checksum",
        ),
    ],
)
def test_parse_index_rejects_bad_index(data: bytes, pattern: str) -> None:
    with pytest.raises(DownloadError, match=pattern) as err:
        parse_index(data, "mirror/index.xml")
    assert str(err.value).startswith("mirror/index.xml: ")


def test_resolve_source_folder_and_file_url(tmp_path: Path) -> None:
    expected = Source(
        index=str(tmp_path / "index.xml"), root=str(tmp_path), mirror=True, local=True
    )
    assert resolve_source("https://up.example/index.xml", str(tmp_path)) == expected
    assert resolve_source("https://up.example/index.xml", tmp_path.as_uri()) == expected
    assert resolve_source("https://x/index.xml", str(tmp_path / "index.xml")) == expected


@pytest.mark.parametrize(
    "mirror",
    [
        "http://127.0.0.1:8000/mirror",
        "http://127.0.0.1:8000/mirror/",
        "http://127.0.0.1:8000/mirror/index.xml",
    ],
)
def test_resolve_source_http_mirror(mirror: str) -> None:
    source = resolve_source("https://up.example/index.xml", mirror)
    assert source == Source(
        index="http://127.0.0.1:8000/mirror/index.xml",
        root="http://127.0.0.1:8000/mirror/",
        mirror=True,
        local=False,
    )


def test_resolve_source_without_mirror_uses_index_url() -> None:
    for mirror in (None, "", "  "):
        source = resolve_source("https://up.example/data/index.xml", mirror)
        assert source == Source(
            index="https://up.example/data/index.xml",
            root="https://up.example/data/",
            mirror=False,
            local=False,
        )


def test_resolve_source_rejects_other_schemes() -> None:
    with pytest.raises(DownloadError, match="RNNLM_NLTK_MIRROR = 'ftp://host/x'"):
        resolve_source("https://up.example/index.xml", "ftp://host/x")


def test_package_url_is_relative_to_mirror_root_whatever_the_index_says(tmp_path: Path) -> None:
    pkg = pkg_info()  # its url names https://example.invalid/
    http = resolve_source("https://up.example/index.xml", "http://127.0.0.1:9/m")
    assert package_url(http, pkg) == f"http://127.0.0.1:9/m/packages/corpora/{TINY_ID}.zip"
    folder = resolve_source("https://up.example/index.xml", str(tmp_path))
    assert package_url(folder, pkg) == str(tmp_path / "packages" / "corpora" / f"{TINY_ID}.zip")


def test_package_url_without_mirror_uses_url_attribute_or_index_folder() -> None:
    upstream = resolve_source("https://up.example/data/index.xml", None)
    assert package_url(upstream, pkg_info()) == pkg_info().url
    assert (
        package_url(upstream, pkg_info(url=None))
        == f"https://up.example/data/packages/corpora/{TINY_ID}.zip"
    )


@pytest.mark.parametrize("as_uri", [False, True], ids=["folder", "file-url"])
def test_run_from_local_mirror(
    tmp_path: Path,
    tiny_mirror: Path,
    tiny_docs: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    as_uri: bool,
) -> None:
    monkeypatch.setenv(download.MIRROR_ENV, tiny_mirror.as_uri() if as_uri else str(tiny_mirror))
    paths = tmp_paths(tmp_path)
    summary = download.run(corpus_params(), paths)

    expected = encode_docs(tiny_docs)
    assert read_tree(paths.raw_dir / TINY_ID) == expected  # top folder stripped, bytes identical
    assert listing(paths.raw_dir) == [TINY_ID, *(f"{TINY_ID}/{name}" for name in sorted(expected))]
    zip_path = tiny_mirror / "packages" / "corpora" / f"{TINY_ID}.zip"
    assert summary == {
        "corpus": TINY_ID,
        "files": len(expected),
        "bytes": sum(len(b) for b in expected.values()),
        "md5": files.md5_file(zip_path),
        "source": str(zip_path),
    }


def test_run_from_http_mirror_fixture(
    tmp_path: Path, http_mirror: str, tiny_docs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(download.MIRROR_ENV, http_mirror)
    paths = tmp_paths(tmp_path)
    summary = download.run(corpus_params(), paths)
    assert read_tree(paths.raw_dir / TINY_ID) == encode_docs(tiny_docs)
    assert summary["source"] == f"{http_mirror}packages/corpora/{TINY_ID}.zip"


def test_run_over_http_requests_index_then_package_only(
    tmp_path: Path, tiny_mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve_directory(tiny_mirror) as running:
        monkeypatch.setenv(download.MIRROR_ENV, running.url)
        download.run(corpus_params(retries=3), tmp_paths(tmp_path))
    assert running.requests == ["/index.xml", ZIP_PATH]


def test_run_without_mirror_resolves_package_beside_index(
    tmp_path: Path, tiny_docs: dict[str, str]
) -> None:
    root = build_nltk_mirror(tmp_path / "m", {TINY_ID: encode_docs(tiny_docs)}, url_base=None)
    paths = tmp_paths(tmp_path)
    with serve_directory(root) as running:
        download.run(corpus_params(index_url=f"{running.url}index.xml"), paths)
    assert running.requests == ["/index.xml", ZIP_PATH]
    assert read_tree(paths.raw_dir / TINY_ID) == encode_docs(tiny_docs)


@pytest.mark.parametrize("status", [404, 403])
def test_client_error_fails_at_once_without_retry(
    tmp_path: Path, tiny_mirror: Path, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    if status == 404:
        (tiny_mirror / ZIP_PATH.lstrip("/")).unlink()
    paths = tmp_paths(tmp_path)
    with serve_directory(tiny_mirror) as running:
        if status != 404:
            running.faults[ZIP_PATH] = [status]
        monkeypatch.setenv(download.MIRROR_ENV, running.url)
        with pytest.raises(DownloadError, match=f"HTTP {status}") as err:
            download.run(corpus_params(retries=3), paths)
    assert f"{running.url}packages/corpora/{TINY_ID}.zip" in str(err.value)
    assert running.count(ZIP_PATH) == 1
    assert listing(paths.raw_dir) == []


def test_local_mirror_missing_package_names_the_path(
    tmp_path: Path, tiny_mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zip_path = tiny_mirror / "packages" / "corpora" / f"{TINY_ID}.zip"
    zip_path.unlink()
    monkeypatch.setenv(download.MIRROR_ENV, str(tiny_mirror))
    with pytest.raises(DownloadError, match="file not found") as err:
        download.run(corpus_params(), tmp_paths(tmp_path))
    assert str(zip_path) in str(err.value)


WRONG_MD5 = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("field", ["checksum", "size"])
def test_verification_failure_leaves_previous_output(
    tmp_path: Path,
    tiny_docs: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    scratch: Path,
    field: str,
) -> None:
    # A size larger than the body's: a smaller one makes an overlong body, refused while reading.
    claimed = len(make_package_zip(TINY_ID, encode_docs(tiny_docs))) + 5
    override = {"checksum": WRONG_MD5} if field == "checksum" else {"size": str(claimed)}
    root = build_nltk_mirror(
        tmp_path / "m", {TINY_ID: encode_docs(tiny_docs)}, index_overrides={TINY_ID: override}
    )
    served = root / ZIP_PATH.lstrip("/")
    got = served.stat().st_size
    expected = (
        f"{TINY_ID}.zip: MD5 mismatch, index says {WRONG_MD5}, got {files.md5_file(served)} "
        if field == "checksum"
        else f"{TINY_ID}.zip: size mismatch, index says {claimed} bytes, got {got} "
    )
    paths = tmp_paths(tmp_path)
    plant_previous(paths)
    with serve_directory(root) as running:
        monkeypatch.setenv(download.MIRROR_ENV, running.url)
        with pytest.raises(DownloadError, match=re.escape(expected)) as err:
            download.run(corpus_params(retries=2), paths)
    assert "\n" not in str(err.value)
    assert running.count(ZIP_PATH) == 1  # a complete but wrong body is not retried
    assert_previous_intact(paths, scratch)


@pytest.mark.parametrize("name", ["../escape", "a/b", ".."])
def test_corpus_name_must_be_a_plain_id(tmp_path: Path, name: str) -> None:
    with pytest.raises(DownloadError, match="expected a package id"):
        download.run(corpus_params(name=name), tmp_paths(tmp_path))
    assert not (tmp_path / "raw").exists()


def _flip_byte_in_member_data(data: bytes) -> bytes:
    """Corrupt the compressed data (not a header) of the archive's largest member."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = max(archive.infolist(), key=lambda i: i.compress_size)
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    pos = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    return data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :]


@pytest.mark.parametrize("kind", ["garbage", "flipped-byte"])
def test_corrupt_zip_is_refused(
    tmp_path: Path, tiny_docs: dict[str, str], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    if kind == "garbage":
        data = b"PK\x03\x04 this is not really a zip archive" * 20
    else:
        data = _flip_byte_in_member_data(make_package_zip(TINY_ID, encode_docs(tiny_docs)))
    unzipped = {"unzipped_size": str(sum(len(b) for b in encode_docs(tiny_docs).values()))}
    # The index matches the bad bytes.
    root = build_nltk_mirror(tmp_path / "m", {TINY_ID: data}, index_overrides={TINY_ID: unzipped})
    monkeypatch.setenv(download.MIRROR_ENV, str(root))
    paths = tmp_paths(tmp_path)
    with pytest.raises(DownloadError, match="corrupt zip"):
        download.run(corpus_params(), paths)
    assert listing(paths.raw_dir) == []


def _zip_with(member: zipfile.ZipInfo, content: bytes = b"pwned") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{TINY_ID}/ok.txt", b"fine")
        archive.writestr(member, content)
    return buffer.getvalue()


def _symlink_member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("make_member", "reason"),
    [
        (lambda tmp: zipfile.ZipInfo("../evil.txt"), "'..'"),
        (lambda tmp: zipfile.ZipInfo(f"{TINY_ID}/../../evil.txt"), "'..'"),
        (lambda tmp: zipfile.ZipInfo(str(tmp / "evil.txt")), "absolute path"),
        (lambda tmp: _symlink_member(f"{TINY_ID}/link"), "symbolic link"),
        (lambda tmp: zipfile.ZipInfo("other/evil.txt"), "outside the package's top folder"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "outside-top"],
)
def test_unsafe_member_is_refused_and_nothing_extracted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_member: object, reason: str
) -> None:
    member = make_member(tmp_path)  # type: ignore[operator]
    root = build_nltk_mirror(tmp_path / "m", {TINY_ID: _zip_with(member, b"../../evil")})
    monkeypatch.setenv(download.MIRROR_ENV, str(root))
    paths = tmp_paths(tmp_path)
    with pytest.raises(DownloadError, match=re.escape(reason)) as err:
        download.run(corpus_params(), paths)
    assert repr(member.filename) in str(err.value)
    assert listing(paths.raw_dir) == []
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path.parent / "evil.txt").exists()


def test_safe_extract_strips_top_folder(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_package_zip("pkg", {"README": b"r", "b.txt": b"bb", "a.txt": b"a"}))
    dest = tmp_path / "out"
    dest.mkdir()
    limit = download.Limit(4, "the index's unzipped_size")
    assert safe_extract(archive, dest, "pkg", limit) == [
        Path("README"),
        Path("a.txt"),
        Path("b.txt"),
    ]
    assert read_tree(dest) == {"README": b"r", "a.txt": b"a", "b.txt": b"bb"}


def test_zip_with_more_members_than_any_corpus_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download, "MAX_MEMBERS", 3)  # the folder entry and 3 files: 4
    archive = tmp_path / "many.zip"
    archive.write_bytes(make_package_zip("pkg", {"a.txt": b"a", "b.txt": b"b", "c.txt": b"c"}))
    dest = tmp_path / "out"
    dest.mkdir()
    limit = download.Limit(100, "the index's unzipped_size")
    with pytest.raises(DownloadError) as err:
        safe_extract(archive, dest, "pkg", limit)
    assert str(err.value) == (
        "many.zip: holds 4 members, more than the 3 any corpus needs; refusing it"
    )
    assert listing(dest) == []


def test_server_down_fails_fast_and_suggests_mirror(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{unused_port()}/index.xml"
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download.run(corpus_params(index_url=url, retries=1), tmp_paths(tmp_path))
    assert time.monotonic() - start < 2.0
    message = str(err.value)
    assert url in message and "after 2 attempt(s)" in message and "RNNLM_NLTK_MIRROR" in message
    assert "\n" not in message


def test_silent_server_times_out_and_is_retried(tmp_path: Path) -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/index.xml"
        start = time.monotonic()
        with pytest.raises(DownloadError, match=r"after 2 attempt.*timed out"):
            download.run(
                corpus_params(index_url=url, timeout_s=0.2, retries=1), tmp_paths(tmp_path)
            )
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize(
    "faults",
    [[503, 503], [429], [SHORT_BODY], [RESET], [STALL], [RESET, STALL, SHORT_BODY]],
    ids=["503", "429", "short", "reset", "stall", "all-three"],
)
def test_transient_errors_are_retried(
    tmp_path: Path,
    tiny_mirror: Path,
    tiny_docs: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    scratch: Path,
    faults: list[int],
) -> None:
    paths = tmp_paths(tmp_path)
    with serve_directory(tiny_mirror) as running:
        running.faults[ZIP_PATH] = list(faults)
        running.faults["/index.xml"] = [503]
        monkeypatch.setenv(download.MIRROR_ENV, running.url)
        download.run(corpus_params(retries=3, timeout_s=0.3), paths)
    assert running.count("/index.xml") == 2
    assert running.count(ZIP_PATH) == len(faults) + 1
    assert read_tree(paths.raw_dir / TINY_ID) == encode_docs(tiny_docs)
    assert listing(paths.raw_dir) == [TINY_ID, *(f"{TINY_ID}/{n}" for n in sorted(tiny_docs))]
    assert listing(scratch) == []


@pytest.mark.parametrize(
    ("fault", "last_error"),
    [
        (503, "HTTP 503 Service Unavailable"),
        (RESET, "Connection reset by peer"),
        (STALL, "timed out: no data for 0.2 s (corpus.timeout_s)"),
        (SHORT_BODY, "body truncated: got {half} of {whole} bytes"),
    ],
    ids=["503", "reset", "stall", "short"],
)
def test_persistent_fault_gives_up_and_keeps_previous_output(
    tmp_path: Path,
    tiny_mirror: Path,
    monkeypatch: pytest.MonkeyPatch,
    scratch: Path,
    fault: int,
    last_error: str,
) -> None:
    paths = tmp_paths(tmp_path)
    plant_previous(paths)
    start = time.monotonic()
    with serve_directory(tiny_mirror) as running:
        running.faults[ZIP_PATH] = [fault] * 10
        monkeypatch.setenv(download.MIRROR_ENV, running.url)
        with pytest.raises(DownloadError) as err:
            download.run(corpus_params(retries=2, timeout_s=0.2), paths)
    assert time.monotonic() - start < 5.0
    message = str(err.value)
    assert message.startswith(
        f"{running.url}packages/corpora/{TINY_ID}.zip: giving up after 3 attempt(s), last error: "
    )
    whole = (tiny_mirror / ZIP_PATH.lstrip("/")).stat().st_size
    assert last_error.format(half=whole // 2, whole=whole) in message
    assert "RNNLM_NLTK_MIRROR" in message and "\n" not in message
    assert running.count(ZIP_PATH) == 3
    assert_previous_intact(paths, scratch)


def test_disk_full_while_extracting_keeps_previous_output(
    tmp_path: Path, tiny_mirror: Path, monkeypatch: pytest.MonkeyPatch, scratch: Path
) -> None:
    paths = tmp_paths(tmp_path)
    plant_previous(paths)
    monkeypatch.setenv(download.MIRROR_ENV, str(tiny_mirror))
    # index.xml and the zip fit (they are downloaded beside the output), a document or two
    # more, then the disk is full.
    fill_disk(monkeypatch, paths.raw_dir, room=downloaded_bytes(tiny_mirror) + 3000)
    with pytest.raises(files.WriteError) as err:
        download.run(corpus_params(), paths)
    assert err.value.errno == errno.ENOSPC
    assert files.describe_os_error(err.value) == (
        f"cannot write {paths.raw_dir / TINY_ID}: No space left on device"
    )
    assert_previous_intact(paths, scratch)


def test_disk_full_in_the_temporary_folder_is_not_retried(
    tmp_path: Path, tiny_mirror: Path, monkeypatch: pytest.MonkeyPatch, scratch: Path
) -> None:
    paths = tmp_paths(tmp_path)
    plant_previous(paths)
    # Room for index.xml, not for the package: the archive's download fails half-way.
    fill_disk(monkeypatch, paths.raw_dir, room=(tiny_mirror / "index.xml").stat().st_size + 100)
    with serve_directory(tiny_mirror) as running:
        monkeypatch.setenv(download.MIRROR_ENV, running.url)
        with pytest.raises(files.WriteError) as err:
            download.run(corpus_params(retries=2), paths)
    assert running.count(ZIP_PATH) == 1  # retrying cannot free the disk
    work = re.escape(f"{paths.raw_dir}/.{TINY_ID}.") + "[a-z0-9_]{8}" + re.escape(".tmp")
    line = files.describe_os_error(err.value)
    assert re.fullmatch(f"cannot write {work}/{TINY_ID}.zip: No space left on device", line)
    assert_previous_intact(paths, scratch)


def test_raw_dir_under_a_regular_file_fails_before_writing(
    tmp_path: Path, tiny_mirror: Path, monkeypatch: pytest.MonkeyPatch, scratch: Path
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    monkeypatch.setenv(download.MIRROR_ENV, str(tiny_mirror))
    with pytest.raises(files.WriteError) as err:
        download.run(
            corpus_params(), dataclasses.replace(tmp_paths(tmp_path), raw_dir=blocker / "raw")
        )
    assert files.describe_os_error(err.value) == (
        f"cannot write {blocker / 'raw' / TINY_ID}: Not a directory"
    )
    assert blocker.read_text() == "a file where a folder should be"
    assert listing(scratch) == []


def _install(nltk_dir: Path, data: bytes, monkeypatch: pytest.MonkeyPatch) -> Path:
    import nltk.data

    installed = nltk_dir / "corpora" / f"{TINY_ID}.zip"
    installed.parent.mkdir(parents=True)
    installed.write_bytes(data)
    # A missing folder first: the search must go on to the next entry.
    monkeypatch.setattr(nltk.data, "path", [str(nltk_dir.parent / "missing"), str(nltk_dir)])
    return installed


def test_installed_zip_is_used_without_downloading(
    tmp_path: Path, tiny_mirror: Path, tiny_docs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = (tiny_mirror / ZIP_PATH.lstrip("/")).read_bytes()
    installed = _install(tmp_path / "nltk_data", good, monkeypatch)
    paths = tmp_paths(tmp_path)
    with serve_directory(tiny_mirror) as running:
        monkeypatch.setenv(download.MIRROR_ENV, running.url)
        summary = download.run(corpus_params(), paths)
    assert running.requests == ["/index.xml"]  # the index is read; the package is not
    assert summary["source"] == str(installed)
    assert read_tree(paths.raw_dir / TINY_ID) == encode_docs(tiny_docs)


def test_installed_zip_with_other_content_is_ignored(
    tmp_path: Path, tiny_mirror: Path, tiny_docs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = (tiny_mirror / ZIP_PATH.lstrip("/")).read_bytes()
    _install(tmp_path / "nltk_data", bytes([good[0] ^ 1]) + good[1:], monkeypatch)  # same size
    paths = tmp_paths(tmp_path)
    with serve_directory(tiny_mirror) as running:
        monkeypatch.setenv(download.MIRROR_ENV, running.url)
        download.run(corpus_params(), paths)
    assert running.requests == ["/index.xml", ZIP_PATH]
    assert read_tree(paths.raw_dir / TINY_ID) == encode_docs(tiny_docs)


@pytest.mark.mirror
def test_run_on_shared_mirror_extracts_real_corpus(
    tmp_path: Path, shared_mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(download.MIRROR_ENV, str(shared_mirror))
    paths = tmp_paths(tmp_path)
    summary = download.run(corpus_params(name="inaugural"), paths)
    out = paths.raw_dir / "inaugural"
    assert (out / "1789-Washington.txt").is_file()
    assert (out / "README").is_file()
    assert not (out / "inaugural").exists()
    assert summary["md5"] == "4e01cc9505ed7f9d04a330e67fb45509"
    assert summary["files"] == len(list(out.iterdir()))


def _write_params(
    tmp_path: Path,
    corpus_name: str,
    extra: dict[str, object] | None = None,
    raw_dir: Path | None = None,
) -> Path:
    corpus = {"name": corpus_name, "retries": 0, **(extra or {})}
    paths = {"raw_dir": str(raw_dir or tmp_path / "raw")}
    return write_params(tmp_path / "params.yaml", {"paths": paths, "corpus": corpus})


def _assert_one_line_failure(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str], *needles: str
) -> None:
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "\n" not in message and errors[0].exc_info is None
    for needle in needles:
        assert needle in message
    assert "Traceback" not in capsys.readouterr().err


def test_main_unknown_corpus_exits_1_with_one_line_message(
    tmp_path: Path,
    tiny_mirror: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(download.MIRROR_ENV, str(tiny_mirror))
    with pytest.raises(SystemExit) as exit_info:
        download.main(["--params", str(_write_params(tmp_path, "nope"))])
    assert exit_info.value.code == 1
    _assert_one_line_failure(caplog, capsys, "'nope'", f"available corpora: {TINY_ID}")
    assert listing(tmp_path / "raw") == []


def test_main_bad_params_exits_1(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    params = _write_params(tmp_path, TINY_ID, extra={"retires": 2})
    with pytest.raises(SystemExit) as exit_info:
        download.main(["--params", str(params)])
    assert exit_info.value.code == 1
    _assert_one_line_failure(caplog, capsys, "corpus.retires")


def test_main_disk_full_exits_1_with_one_line_naming_the_output(
    tmp_path: Path,
    tiny_mirror: Path,
    monkeypatch: pytest.MonkeyPatch,
    scratch: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    paths = tmp_paths(tmp_path)
    plant_previous(paths)
    monkeypatch.setenv(download.MIRROR_ENV, str(tiny_mirror))
    fill_disk(monkeypatch, paths.raw_dir, room=downloaded_bytes(tiny_mirror))  # none to extract
    with pytest.raises(SystemExit) as exit_info:
        download.main(["--params", str(_write_params(tmp_path, TINY_ID))])
    assert exit_info.value.code == 1
    expected = f"download failed: cannot write {paths.raw_dir / TINY_ID}: No space left on device"
    _assert_one_line_failure(caplog, capsys, expected)
    assert_previous_intact(paths, scratch)


def test_module_entry_point_reports_unwritable_raw_dir_in_one_line(
    tmp_path: Path, tiny_mirror: Path, scratch: Path
) -> None:
    """`python -m rnnlm.download`, as DVC runs it: exit status 1, one error line, no traceback."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    params = _write_params(tmp_path, TINY_ID, raw_dir=blocker / "raw")
    env = {**os.environ, download.MIRROR_ENV: str(tiny_mirror), "TMPDIR": str(scratch)}
    result = subprocess.run(
        [sys.executable, "-m", "rnnlm.download", "--params", str(params)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert errors[0].endswith(
        f": download failed: cannot write {blocker / 'raw' / TINY_ID}: Not a directory"
    )
    assert listing(scratch) == []


def test_main_downloads_from_mirror(
    tmp_path: Path, tiny_mirror: Path, tiny_docs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(download.MIRROR_ENV, str(tiny_mirror))
    download.main(["--params", str(_write_params(tmp_path, TINY_ID))])
    assert read_tree(tmp_path / "raw" / TINY_ID) == encode_docs(tiny_docs)


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal() -> None:
    terminal = _FakeTerminal()
    bar = download._Progress("x.zip", 2_000_000, stream=terminal)
    bar.update(1_000_000)
    bar.update(1_500_000)  # within 0.1 s of the previous refresh: skipped
    bar.close(2_000_000)
    lines = terminal.getvalue().split("\r")[1:]
    assert len(lines) == 2
    assert " 50% 1.0/2.0 MB" in lines[0]
    assert lines[1].endswith("100% 2.0/2.0 MB\n")

    plain = io.StringIO()
    quiet = download._Progress("x.zip", 10, stream=plain)
    quiet.update(5)
    quiet.close(10)
    assert plain.getvalue() == ""


def test_shared_mirror_for_the_tests_honours_the_environment(
    tiny_mirror: Path, tmp_path: Path
) -> None:
    from tests.conftest import find_shared_mirror

    assert find_shared_mirror({download.MIRROR_ENV: str(tiny_mirror)}) == tiny_mirror.resolve()
    index = f"file://{tiny_mirror / 'index.xml'}"
    assert find_shared_mirror({download.MIRROR_ENV: index}) == tiny_mirror.resolve()
    empty = tmp_path / "empty"
    empty.mkdir()
    reason = find_shared_mirror({download.MIRROR_ENV: str(empty)})
    assert isinstance(reason, str) and f"no NLTK mirror at {empty}" in reason
    reason = find_shared_mirror({download.MIRROR_ENV: "http://127.0.0.1:9/"})
    assert isinstance(reason, str) and "is a URL" in reason


def run_in_thread(work: Callable[[], object], limit_s: float = 60.0) -> BaseException | None:
    """Run `work` in a daemon thread; return what it raised (None if nothing).

    A regression that blocks (on a FIFO, on a server that never ends) fails the test after
    `limit_s` instead of hanging the whole run; the limit is far above the seconds these take.
    """
    raised: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as err:  # handed to the test, which asserts on it
            raised.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"still running after {limit_s:g} s"
    return raised[0] if raised else None


Respond = Callable[[BaseHTTPRequestHandler, threading.Event], None]


@contextlib.contextmanager
def serve_responses(routes: dict[str, Respond]) -> Iterator[str]:
    """A loopback HTTP server whose answer to each path is written by `routes[path]`.

    Each function gets the request handler and an event set at shutdown. Yields the base URL.
    """
    stopping = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            respond = routes.get(self.path)
            if respond is None:
                self.send_error(404)
                return
            respond(self, stopping)
            self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:
            """Keep test output quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def send_bytes(data: bytes, content_length: bool = True) -> Respond:
    """An answer of `data`, with or without a Content-Length (then the close ends the body)."""

    def respond(handler: BaseHTTPRequestHandler, stopping: threading.Event) -> None:
        handler.send_response(200)
        if content_length:
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return respond


def zip_of_zeros(n_bytes: int) -> bytes:
    """A package zip whose one document is `n_bytes` zeros: it deflates about 1000-fold."""
    return make_package_zip(TINY_ID, {"zeros.txt": bytes(n_bytes), README: b"tiny\n"})


@pytest.mark.parametrize("declared", ["unzipped_size", "none", "implausible"])
def test_zip_expanding_past_its_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scratch: Path, declared: str
) -> None:
    """A small zip that would expand to megabytes: refused once the bytes written reach the
    index's unzipped_size or, when there is none (or an implausible one), 100 x its size."""
    data = zip_of_zeros(4_000_000)  # about 4 kB
    unzipped = {"unzipped_size": "1000", "implausible": str(10**12), "none": "0"}[declared]
    root = build_nltk_mirror(
        tmp_path / "m", {TINY_ID: data}, index_overrides={TINY_ID: {"unzipped_size": unzipped}}
    )
    if declared == "none":
        index = root / "index.xml"
        index.write_text(re.sub(r' unzipped_size="\d+"', "", index.read_text()))
    expected = {
        "unzipped_size": "expands to more than 1000 bytes (the index's unzipped_size)",
        "none": f"expands to more than {100 * len(data)} bytes (100 x the archive's "
        f"{len(data)} bytes; the index gives no unzipped_size)",
        "implausible": f"expands to more than {100 * len(data)} bytes (100 x the archive's "
        f"{len(data)} bytes; not the index's unzipped_size of {10**12})",
    }[declared]
    paths = tmp_paths(tmp_path)
    plant_previous(paths)
    monkeypatch.setenv(download.MIRROR_ENV, str(root))
    with pytest.raises(DownloadError) as err:
        download.run(corpus_params(), paths)
    assert str(err.value).startswith(f"{TINY_ID}.zip: {expected}; refusing it")
    assert f"'{TINY_ID}/zeros.txt'" in str(err.value)
    assert_previous_intact(paths, scratch)


@pytest.mark.parametrize("how", ["content-length", "no-length", "local-mirror"])
def test_body_longer_than_the_index_size_is_refused_not_retried(
    tmp_path: Path,
    tiny_docs: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    scratch: Path,
    how: str,
) -> None:
    """The index says 10 bytes fewer than the server sends: no more than size + 1 bytes are read
    (or none, when Content-Length already says too much); one line, no retry."""
    data = make_package_zip(TINY_ID, encode_docs(tiny_docs))
    claimed = len(data) - 10
    root = build_nltk_mirror(
        tmp_path / "m", {TINY_ID: data}, index_overrides={TINY_ID: {"size": str(claimed)}}
    )
    paths = tmp_paths(tmp_path)
    plant_previous(paths)
    served: list[str] = []

    def counted(respond: Respond) -> Respond:
        def wrapper(handler: BaseHTTPRequestHandler, stopping: threading.Event) -> None:
            served.append(handler.path)
            respond(handler, stopping)

        return wrapper

    routes = {
        "/index.xml": send_bytes((root / "index.xml").read_bytes()),
        ZIP_PATH: counted(send_bytes(data, content_length=how == "content-length")),
    }
    with serve_responses(routes) as url:
        mirror = str(root) if how == "local-mirror" else url
        monkeypatch.setenv(download.MIRROR_ENV, mirror)
        with pytest.raises(DownloadError) as err:
            download.run(corpus_params(retries=3), paths)
    location = str(root / ZIP_PATH[1:]) if how == "local-mirror" else f"{url}{ZIP_PATH[1:]}"
    if how == "content-length":
        reason = f"the server announces {len(data)} bytes (Content-Length), more than {claimed}"
    else:
        reason = f"longer than {claimed} bytes"
    assert str(err.value) == f"{location}: {reason} (the size the index gives); refusing it"
    assert len(served) == (0 if how == "local-mirror" else 1)
    assert_previous_intact(paths, scratch)


@pytest.mark.parametrize("local", [False, True], ids=["http", "local"])
def test_index_over_the_cap_is_refused(
    tmp_path: Path, tiny_mirror: Path, monkeypatch: pytest.MonkeyPatch, local: bool
) -> None:
    monkeypatch.setattr(download, "MAX_INDEX_BYTES", 100)
    paths = tmp_paths(tmp_path)
    size = (tiny_mirror / "index.xml").stat().st_size
    with serve_directory(tiny_mirror) as running:
        monkeypatch.setenv(download.MIRROR_ENV, str(tiny_mirror) if local else running.url)
        with pytest.raises(DownloadError) as err:
            download.run(corpus_params(retries=3), paths)
    cap = "(the cap on an index, download.MAX_INDEX_BYTES); refusing it"
    if local:
        assert str(err.value) == f"{tiny_mirror / 'index.xml'}: longer than 100 bytes {cap}"
    else:
        expected = f"{running.url}index.xml: the server announces {size} bytes (Content-Length)"
        assert str(err.value) == f"{expected}, more than 100 {cap}"
        assert running.requests == ["/index.xml"]
    assert listing(paths.raw_dir) == []


def trickle(handler: BaseHTTPRequestHandler, stopping: threading.Event) -> None:
    """Promise 100 kB, then send one byte every 0.2 s: never silent for corpus.timeout_s."""
    handler.send_response(200)
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    for _ in range(300):  # a minute at most, should the client never give up
        if stopping.wait(0.2):
            return
        try:
            handler.wfile.write(b"<")
        except OSError:  # the client hung up
            return


def always_503(handler: BaseHTTPRequestHandler, stopping: threading.Event) -> None:
    handler.send_error(503)


@pytest.mark.parametrize("server", ["trickle", "retries"])
def test_deadline_ends_a_download_that_never_times_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: str
) -> None:
    """corpus.timeout_s never fires on a server that trickles (or on quick 503s whose backoff
    waits outlast the time left): corpus.deadline_s ends the stage."""
    monkeypatch.setattr(download, "BACKOFF_BASE_S", 5.0)  # the first wait outlasts the deadline
    respond = trickle if server == "trickle" else always_503
    paths = tmp_paths(tmp_path)
    with serve_responses({"/index.xml": respond}) as url:
        params = corpus_params(
            index_url=f"{url}index.xml", timeout_s=30.0, retries=20, deadline_s=1.0
        )
        err = run_in_thread(lambda: download.run(params, paths))
    assert isinstance(err, DownloadError)
    message = str(err)
    assert message.startswith(f"{url}index.xml: not done within corpus.deadline_s = 1 s (")
    if server == "trickle":
        assert re.search(r"\((\d+) of 100000 bytes received\)", message)
    else:
        assert "attempt(s), last error: HTTP 503 Service Unavailable)" in message
    assert "raise corpus.deadline_s" in message and "\n" not in message
    assert listing(paths.raw_dir) == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (
            "file:///etc/passwd",
            "named by the remote index {index}, which may point only to http(s) URLs",
        ),
        ("ftp://127.0.0.1/tinycorpus.zip", "only http(s) URLs are fetched"),
    ],
    ids=["file", "ftp"],
)
def test_remote_index_may_point_only_to_http(
    tmp_path: Path, tiny_docs: dict[str, str], url: str, reason: str
) -> None:
    root = build_nltk_mirror(
        tmp_path / "m", {TINY_ID: encode_docs(tiny_docs)}, index_overrides={TINY_ID: {"url": url}}
    )
    paths = tmp_paths(tmp_path)
    with serve_directory(root) as running:
        index = f"{running.url}index.xml"
        with pytest.raises(DownloadError) as err:
            download.run(corpus_params(index_url=index, retries=3), paths)
    assert str(err.value) == f"{url}: {reason.format(index=index)}; refusing it"
    assert running.requests == ["/index.xml"]
    assert listing(paths.raw_dir) == []


@pytest.mark.parametrize("kind", ["symlink-outside", "fifo"])
def test_local_mirror_file_must_be_a_regular_file_inside_it(
    tmp_path: Path, tiny_mirror: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Refused before any read, without blocking on the FIFO: one line naming the file."""
    zip_path = tiny_mirror / ZIP_PATH.lstrip("/")
    good = zip_path.read_bytes()
    zip_path.unlink()
    if kind == "fifo":
        os.mkfifo(zip_path)
        reason = "not a regular file (a FIFO); refusing it"
    else:
        outside = tmp_path / "elsewhere" / f"{TINY_ID}.zip"  # the right bytes, in the wrong place
        outside.parent.mkdir()
        outside.write_bytes(good)
        zip_path.symlink_to(outside)
        reason = f"resolves to {outside}, outside the mirror {tiny_mirror}; refusing it"
    monkeypatch.setenv(download.MIRROR_ENV, str(tiny_mirror))
    paths = tmp_paths(tmp_path)
    err = run_in_thread(lambda: download.run(corpus_params(), paths))
    assert isinstance(err, DownloadError)
    assert str(err) == f"{zip_path}: {reason}"
    assert listing(paths.raw_dir) == []


def test_local_mirror_symlink_inside_the_mirror_is_followed(
    tmp_path: Path, tiny_mirror: Path, tiny_docs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    zip_path = tiny_mirror / ZIP_PATH.lstrip("/")
    kept = tiny_mirror / "store" / "tinycorpus-1.zip"
    kept.parent.mkdir()
    zip_path.rename(kept)
    zip_path.symlink_to(os.path.relpath(kept, zip_path.parent))
    monkeypatch.setenv(download.MIRROR_ENV, str(tiny_mirror))
    paths = tmp_paths(tmp_path)
    download.run(corpus_params(), paths)
    assert read_tree(paths.raw_dir / TINY_ID) == encode_docs(tiny_docs)


def test_a_killed_download_leaves_nothing_the_next_run_keeps(
    tmp_path: Path, tiny_mirror: Path, tiny_docs: dict[str, str]
) -> None:
    """A download killed (SIGKILL) with its zip half-fetched and its extraction half-done: the
    next `python -m rnnlm.download` clears both up and puts the corpus in place."""
    raw = tmp_path / "data" / "raw"
    killed = {
        f".{TINY_ID}.k3_x9q2m.tmp/{TINY_ID}.zip": b"half a zip",  # the scratch folder
        f".{TINY_ID}.a1b2c3d4.tmp/1990-Dubois.txt": b"half a document",  # atomic_path's
    }
    others = {".notes.tmp": b"not a temporary of ours", "notes.txt": b"mine"}
    for name, data in {**killed, **others}.items():
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        (raw / name).write_bytes(data)
    params = _write_params(tmp_path, TINY_ID, raw_dir=raw)
    done = subprocess.run(
        [sys.executable, "-m", "rnnlm.download", "--params", str(params)],
        env={**os.environ, download.MIRROR_ENV: str(tiny_mirror)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert read_tree(raw) == {
        **others,
        **{f"{TINY_ID}/{name}": data for name, data in encode_docs(tiny_docs).items()},
    }
    assert done.stderr.count("left by a stage that was killed") == len(killed)
    # Run as `python -m rnnlm.download`, its lines still carry the module's name.
    assert "INFO rnnlm.download: wrote " in done.stderr and "__main__" not in done.stderr
