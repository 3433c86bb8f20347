"""Stage `download`: one NLTK corpus package -> data/raw/<corpus>/ (the corpus files, nothing else).

Inputs: the `corpus` section of params.yaml (package id, index URL, timeout, retries) and
`paths.raw_dir`. The environment variable RNNLM_NLTK_MIRROR, when set, takes precedence over
`corpus.index_url`: a local folder, a file:// URL or an http(s) URL laid out like the NLTK data
server (`index.xml` at its root, `packages/<subdir>/<id>.zip` below it). Package archives are then
fetched relative to the mirror's root, whatever host the index's `url` attributes name.

Output: `paths.raw_dir / corpus.name`, holding exactly the files of the package's zip with its
top folder `<id>/` stripped (e.g. data/raw/state_union/1945-Truman.txt, plus its README).

Steps: read index.xml (with retries), look the corpus up, reuse `corpora/<id>.zip` from the
NLTK data path when its size and MD5 match the index (no download then), otherwise download it
(with retries) into a temporary folder beside the target, check size and MD5, and extract it
safely into a folder beside the target that is renamed into place only when everything
succeeded. A killed run's temporaries are removed when the next stage starts (rnnlm.stage,
which also keeps a second stage from running in the same checkout meanwhile).

Nothing read from outside is unbounded: an index.xml may hold at most MAX_INDEX_BYTES, a package
body at most the size its index gives, and extraction stops at the index's `unzipped_size` (at
most MAX_EXPANSION times the archive's size); all network work, retries and waits included, ends
within `corpus.deadline_s`. A remote index may point only to http(s) URLs, and a local mirror's
files must be regular files inside the mirror.

Run via `dvc repro`, or directly: python -m rnnlm.download [--params params.yaml]
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import re
import stat
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple, Protocol, TextIO

from rnnlm import files
from rnnlm.config import CorpusParams, Params, Paths
from rnnlm.errors import RnnlmError
from rnnlm.stage import stage_main

log = logging.getLogger(__name__)

MIRROR_ENV = "RNNLM_NLTK_MIRROR"
CORPORA = "corpora"
# Wait before retry k (k = 0, 1, ...) is BACKOFF_BASE_S * 2**k, capped; tests shrink it.
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
CHUNK_BYTES = 64 * 1024
# The most an index.xml may hold: NLTK's own is about 1 MB, so this leaves room for far larger
# mirrors while a server that streams without end is cut off early.
MAX_INDEX_BYTES = 16 * 2**20
# Extraction never writes more than this many times the archive's size, whatever the index says
# (and stops at the index's unzipped_size when that is smaller). Text corpora deflate 2-5x
# (state_union 2.6x, inaugural 2.3x), deflate itself reaches about 1000x on runs of zeros: 100x
# leaves room for any real corpus and cuts a zip bomb's reach at least tenfold.
MAX_EXPANSION = 100
# At most this many ids are listed when the requested corpus is not in the index.
MAX_LISTED = 20
# Members a package zip may hold: NLTK's largest plain-text corpora have some ten thousand
# files; a hostile archive of millions of empty members would exhaust inodes, not bytes.
MAX_MEMBERS = 100_000
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
USER_AGENT = "rnnlm-download/0.1 (+https://www.nltk.org/data.html)"


class DownloadError(RnnlmError):
    """The corpus could not be fetched, verified or extracted; the message says why."""


class _TransientError(Exception):
    """A failure worth retrying (network trouble, 5xx/429, a truncated body)."""


@dataclass(frozen=True)
class Source:
    """Where index.xml lives and how package archives are located.

    `index` is an http(s) URL or, when `local`, a filesystem path. With `mirror`, packages are
    resolved as `<root>/packages/<subdir>/<id>.zip`; otherwise the index's `url` attribute wins.
    """

    index: str
    root: str
    mirror: bool
    local: bool


@dataclass(frozen=True)
class PackageInfo:
    """One `<package>` entry of an NLTK data index."""

    id: str
    subdir: str
    size: int
    checksum: str
    url: str | None
    unzipped_size: int | None


def _local_path(location: str) -> Path | None:
    """Return the filesystem path of a plain path or file:// URL, None for any other URL."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise DownloadError(f"{location}: file:// URLs must name a local path")
        return Path(urllib.request.url2pathname(parsed.path))
    # A one-letter "scheme" is a Windows drive letter.
    if len(parsed.scheme) <= 1:
        return Path(location).expanduser()
    return None


def _check_url(location: str, what: str) -> None:
    scheme = urllib.parse.urlparse(location).scheme
    if scheme not in ("http", "https"):
        raise DownloadError(
            f"{what} = {location!r}: expected a folder, a file:// URL or an http(s) URL"
        )


def resolve_source(index_url: str, mirror: str | None) -> Source:
    """Decide where index.xml and the package archives come from (a mirror wins over index_url).

    `mirror` may name the mirror's root or its index.xml; an empty string counts as unset.
    """
    if mirror and mirror.strip():
        mirror = mirror.strip()
        path = _local_path(mirror)
        if path is not None:
            root = path.parent if path.suffix == ".xml" else path
            return Source(index=str(root / "index.xml"), root=str(root), mirror=True, local=True)
        _check_url(mirror, MIRROR_ENV)
        if urllib.parse.urlparse(mirror).path.endswith(".xml"):
            url_root = urllib.parse.urljoin(mirror, ".")
        else:
            url_root = mirror.rstrip("/") + "/"
        return Source(
            index=urllib.parse.urljoin(url_root, "index.xml"),
            root=url_root,
            mirror=True,
            local=False,
        )
    path = _local_path(index_url)
    if path is not None:
        return Source(index=str(path), root=str(path.parent), mirror=False, local=True)
    _check_url(index_url, "corpus.index_url")
    return Source(
        index=index_url, root=urllib.parse.urljoin(index_url, "."), mirror=False, local=False
    )


def _int_attr(elem: ET.Element, key: str, pkg_id: str, source_desc: str) -> int | None:
    value = elem.get(key)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise DownloadError(
            f"{source_desc}: package {pkg_id!r} has {key}={value!r}, not an integer"
        ) from None


def parse_index(xml_bytes: bytes, source_desc: str) -> dict[str, PackageInfo]:
    """Parse an NLTK data index.xml into {package id: PackageInfo}."""
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as err:
        raise DownloadError(f"{source_desc}: index is not valid XML ({err})") from None
    if root.tag != "nltk_data":
        raise DownloadError(
            f"{source_desc}: not an NLTK data index (root element <{root.tag}>, "
            "expected <nltk_data>)"
        )
    packages: dict[str, PackageInfo] = {}
    for elem in root.iterfind("packages/package"):
        pkg_id = elem.get("id")
        if not pkg_id:
            raise DownloadError(f"{source_desc}: a <package> entry has no id")
        size = _int_attr(elem, "size", pkg_id, source_desc)
        checksum = (elem.get("checksum") or "").strip().lower()
        if size is None or not checksum:
            raise DownloadError(
                f"{source_desc}: package {pkg_id!r} lacks its size or checksum attribute"
            )
        packages[pkg_id] = PackageInfo(
            id=pkg_id,
            subdir=elem.get("subdir", ""),
            size=size,
            checksum=checksum,
            url=elem.get("url") or None,
            unzipped_size=_int_attr(elem, "unzipped_size", pkg_id, source_desc),
        )
    return packages


def select_package(packages: Mapping[str, PackageInfo], name: str, source_desc: str) -> PackageInfo:
    """Return the corpus `name` from a parsed index, or fail listing the corpora it offers."""
    pkg = packages.get(name)
    if pkg is None:
        corpora = sorted(p.id for p in packages.values() if p.subdir == CORPORA)
        listed = ", ".join(corpora[:MAX_LISTED]) or "none"
        if len(corpora) > MAX_LISTED:
            listed += f" (and {len(corpora) - MAX_LISTED} more)"
        raise DownloadError(
            f"corpus {name!r} is not in the index {source_desc}; available corpora: {listed}"
        )
    if pkg.subdir != CORPORA:
        raise DownloadError(
            f"package {name!r} is in {pkg.subdir!r}, not {CORPORA!r}: "
            "the download stage fetches corpora only"
        )
    return pkg


def package_url(source: Source, pkg: PackageInfo) -> str:
    """Where to get the package archive: a URL, or a file path for a local source."""
    relative = f"packages/{pkg.subdir}/{pkg.id}.zip"
    if source.mirror or not pkg.url:
        if source.local:
            return str(Path(source.root, *relative.split("/")))
        return urllib.parse.urljoin(source.root, urllib.parse.quote(relative))
    if source.local and not urllib.parse.urlparse(pkg.url).scheme:
        return str(Path(source.root) / pkg.url)
    return urllib.parse.urljoin(source.index, pkg.url)


def verify(data_path: Path, pkg: PackageInfo, md5: str | None = None) -> str:
    """Check a downloaded archive's size and MD5 against the index; return the MD5.

    Pass `md5` when it was computed while streaming, to avoid reading the file twice.
    """
    size = data_path.stat().st_size
    if size != pkg.size:
        raise DownloadError(
            f"{pkg.id}.zip: size mismatch, index says {pkg.size} bytes, got {size} "
            "(truncated download or stale index)"
        )
    actual = md5 or files.md5_file(data_path)
    if actual != pkg.checksum:
        raise DownloadError(
            f"{pkg.id}.zip: MD5 mismatch, index says {pkg.checksum}, got {actual} "
            "(corrupted download or stale index)"
        )
    return actual


class _Progress:
    """A one-line download bar on a terminal, refreshed at most 10 times a second."""

    def __init__(
        self, label: str, total: int | None, stream: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        # Nothing on a non-terminal: logs and CI output stay free of carriage returns.
        self.enabled = enabled and self.stream.isatty()
        self.label = label
        self.total = total
        self.last = 0.0

    def update(self, done: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < 0.1):
            return
        self.last = now
        if self.total:
            pct = min(100, 100 * done // self.total)
            bar = "#" * (pct // 5)
            line = f"{self.label} [{bar:<20}] {pct:3d}% {done / 1e6:.1f}/{self.total / 1e6:.1f} MB"
        else:
            line = f"{self.label} {done / 1e6:.1f} MB"
        self.stream.write("\r" + line)
        self.stream.flush()

    def close(self, done: int) -> None:
        if self.enabled:
            self.update(done, force=True)
            self.stream.write("\n")
            self.stream.flush()


class Limit(NamedTuple):
    """The most bytes a read may bring, and what sets that bound (for the message)."""

    max_bytes: int
    why: str


class _Readable(Protocol):
    """A byte source read a chunk at a time (an HTTP response, an open file)."""

    def read1(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class Budget:
    """How long the stage's network work may take and how often a failure is retried.

    `timeout_s` bounds each wait for data; `deadline` (a time.monotonic() value) ends all of
    it, retries and the waits between them included, `deadline_s` after the budget started.
    """

    timeout_s: float
    retries: int
    deadline_s: float
    deadline: float

    @classmethod
    def start(cls, p: CorpusParams) -> Budget:
        """The budget of a download that starts now."""
        return cls(p.timeout_s, p.retries, p.deadline_s, time.monotonic() + p.deadline_s)

    def left(self) -> float:
        """Seconds until the deadline (<= 0 once it has passed)."""
        return self.deadline - time.monotonic()

    def read_timeout(self) -> float:
        """The socket timeout for a request starting now: timeout_s, cut to the time left."""
        return max(0.001, min(self.timeout_s, self.left()))

    def expired(self, url: str, detail: str) -> DownloadError:
        return DownloadError(
            f"{url}: not done within corpus.deadline_s = {self.deadline_s:g} s ({detail}). "
            f"A slow link: raise corpus.deadline_s, or set {MIRROR_ENV} to a local NLTK data "
            "mirror"
        )


def _copy_stream(
    src: _Readable,
    dest: Path,
    location: str,
    limit: Limit,
    budget: Budget,
    progress: _Progress,
) -> tuple[int, str]:
    """Copy `src` to `dest` in chunks, at most `limit.max_bytes`; return (bytes, hex MD5).

    One byte more than the limit is read, to tell a body that is too long from one that is just
    long enough; then a DownloadError names `location` and the limit. The deadline is checked
    before every read, so a server trickling a byte at a time cannot outlast it.

    A failure to write `dest` (a full disk) is a WriteError, never retried; errors reading `src`
    pass through for the caller to judge.
    """
    digest = hashlib.md5(usedforsecurity=False)
    done = 0
    with files.writing(dest), dest.open("wb") as out:
        while True:
            if budget.left() <= 0:
                total = f" of {progress.total}" if progress.total is not None else ""
                raise budget.expired(location, f"{done}{total} bytes received")
            chunk = src.read1(min(CHUNK_BYTES, limit.max_bytes + 1 - done))
            if not chunk:
                break
            done += len(chunk)
            if done > limit.max_bytes:
                raise DownloadError(
                    f"{location}: longer than {limit.max_bytes} bytes ({limit.why}); refusing it"
                )
            out.write(chunk)
            digest.update(chunk)
            progress.update(done)
    progress.close(done)
    return done, digest.hexdigest()


def _timed_out(budget: Budget, url: str) -> Exception:
    """A read timed out: the deadline's error once it has passed, else a retryable one."""
    if budget.left() <= 0:
        return budget.expired(url, "waiting for data")
    return _TransientError(f"timed out: no data for {budget.timeout_s:g} s (corpus.timeout_s)")


def _http_opener() -> urllib.request.OpenerDirector:
    """urllib's default opener without its ftp:, file: and data: handlers.

    Only http(s) is ever fetched from a server, so a redirect cannot lead to a local file or
    another protocol either (urllib's redirect handler would follow one to ftp:).
    """
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _fetch_once(
    url: str, dest: Path, limit: Limit, expected_size: int | None, budget: Budget
) -> str:
    """One HTTP GET into `dest`; raise _TransientError for failures worth retrying."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with _http_opener().open(request, timeout=budget.read_timeout()) as response:
            length = response.headers.get("Content-Length", "")
            announced = int(length) if length.isdigit() else None
            if announced is not None and announced > limit.max_bytes:
                raise DownloadError(
                    f"{url}: the server announces {announced} bytes (Content-Length), more than "
                    f"{limit.max_bytes} ({limit.why}); refusing it"
                )
            # Content-Length is what this response promised; the index size is the fallback.
            total = announced if announced is not None else expected_size
            label = PurePosixPath(urllib.parse.urlparse(url).path).name
            progress = _Progress(label, total)
            done, md5 = _copy_stream(response, dest, url, limit, budget, progress)
    except urllib.error.HTTPError as err:
        if err.code >= 500 or err.code in (408, 429):
            raise _TransientError(f"HTTP {err.code} {err.reason}") from None
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:  # raised before the response: connecting, headers
        if isinstance(err.reason, TimeoutError):
            raise _timed_out(budget, url) from None
        if isinstance(err.reason, OSError):
            raise _TransientError(str(err.reason)) from None
        raise DownloadError(f"{url}: {err.reason}") from None
    except TimeoutError:  # the server stalled mid-body
        raise _timed_out(budget, url) from None
    except (ConnectionError, http.client.HTTPException) as err:
        raise _TransientError(f"{type(err).__name__}: {err}") from None
    except ValueError as err:  # e.g. http.client.InvalidURL for a bad port
        raise DownloadError(f"{url}: {err}") from None
    if total is not None and done < total:
        raise _TransientError(f"body truncated: got {done} of {total} bytes")
    return md5


def _open_local(path: Path, root: Path) -> io.BufferedReader:
    """Open a file of a local source: a regular file inside `root` once symlinks are resolved.

    A symlink may point elsewhere inside the mirror, not out of it. A FIFO or device is refused
    without blocking: the file is opened non-blocking and checked with fstat before any read.
    """
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise DownloadError(f"{path}: file not found") from None
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop (Python < 3.13)
        raise DownloadError(f"{path}: cannot read ({err})") from None
    real_root = root.resolve()
    if not real.is_relative_to(real_root):
        resolves = f"resolves to {real}, " if real != Path(os.path.abspath(path)) else ""
        raise DownloadError(f"{path}: {resolves}outside the mirror {real_root}; refusing it")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(real, flags)  # O_NOFOLLOW: swapped for a symlink since it was resolved
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device, socket or folder"
            raise DownloadError(f"{path}: not a regular file ({kind}); refusing it")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _copy_local(path: Path, root: Path, dest: Path, limit: Limit, budget: Budget) -> str:
    """Copy a file from a local mirror (at most `limit`); return its MD5."""
    try:
        with _open_local(path, root) as src:
            # Local copies are fast: no bar.
            progress = _Progress(path.name, None, enabled=False)
            _, md5 = _copy_stream(src, dest, str(path), limit, budget, progress)
    except files.WriteError:
        raise
    except OSError as err:
        raise DownloadError(f"{path}: cannot read ({err.strerror or err})") from None
    return md5


def fetch(
    location: str,
    dest: Path,
    *,
    source: Source,
    limit: Limit,
    budget: Budget,
    expected_size: int | None = None,
) -> str:
    """Download `location` (or copy it from a local source) into `dest`; return its hex MD5.

    A local source reads only regular files inside its root (or http(s) URLs its index names);
    a remote source reads only http(s) URLs, so a remote index cannot point at a local file.
    HTTP failures that may pass (connection refused or reset, timeouts, truncated bodies, 5xx,
    429) are retried up to `budget.retries` times with exponential backoff, within the budget's
    deadline; other 4xx fail at once.
    """
    path = _local_path(location)
    if path is not None:
        if not source.local:
            raise DownloadError(
                f"{location}: named by the remote index {source.index}, which may point only to "
                "http(s) URLs; refusing it"
            )
        return _copy_local(path, Path(source.root), dest, limit, budget)
    if urllib.parse.urlparse(location).scheme not in ("http", "https"):
        raise DownloadError(f"{location}: only http(s) URLs are fetched; refusing it")
    attempt = 0
    while True:
        try:
            return _fetch_once(location, dest, limit, expected_size, budget)
        except _TransientError as err:
            if attempt >= budget.retries:
                raise DownloadError(
                    f"{location}: giving up after {attempt + 1} attempt(s), last error: {err}. "
                    f"Check the network, or set {MIRROR_ENV} to a local NLTK data mirror "
                    "(a folder, file:// or http(s) URL with index.xml at its root)"
                ) from None
            delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt)
            attempt += 1
            if budget.left() <= delay:
                raise budget.expired(location, f"{attempt} attempt(s), last error: {err}") from None
            log.warning(
                "%s: %s; retry %d/%d in %.1fs", location, err, attempt, budget.retries, delay
            )
            time.sleep(delay)


def find_installed(pkg: PackageInfo) -> Path | None:
    """Return `<nltk data dir>/<subdir>/<id>.zip` when its size and MD5 match the index."""
    import nltk.data  # lazy: importing nltk is slow and only this step needs it

    for entry in nltk.data.path:
        if not isinstance(entry, str | os.PathLike):
            continue
        candidate = Path(entry) / pkg.subdir / f"{pkg.id}.zip"
        try:
            if candidate.is_file() and candidate.stat().st_size == pkg.size:
                if files.md5_file(candidate) == pkg.checksum:
                    return candidate
                log.info("%s: MD5 differs from the index; ignoring it", candidate)
        except OSError:
            continue
    return None


def _member_parts(info: zipfile.ZipInfo, top: str) -> tuple[str, ...] | None:
    """The path of a member below `top/` as parts; None for the top folder itself.

    Raises DownloadError for anything that could land outside the target folder.
    """
    name = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DownloadError(f"refusing zip member {name!r}: it is a symbolic link")
    # Backslashes count as separators too, so a Windows-made archive cannot smuggle in "..".
    raw_parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (raw_parts and ":" in raw_parts[0]):
        raise DownloadError(f"refusing zip member {name!r}: absolute path")
    if ".." in raw_parts:
        raise DownloadError(f"refusing zip member {name!r}: path goes up with '..'")
    parts = tuple(p for p in raw_parts if p not in ("", "."))
    if not parts or parts[0] != top:
        raise DownloadError(
            f"refusing zip member {name!r}: outside the package's top folder {top + '/'!r}"
        )
    return parts[1:] or None


def extraction_limit(pkg: PackageInfo) -> Limit:
    """The most bytes `pkg`'s zip may expand to: its unzipped_size, at most MAX_EXPANSION x size."""
    cap = MAX_EXPANSION * pkg.size
    if pkg.unzipped_size is not None and pkg.unzipped_size <= cap:
        return Limit(pkg.unzipped_size, "the index's unzipped_size")
    declared = (
        "the index gives no unzipped_size"
        if pkg.unzipped_size is None
        else f"not the index's unzipped_size of {pkg.unzipped_size}"
    )
    return Limit(cap, f"{MAX_EXPANSION} x the archive's {pkg.size} bytes; {declared}")


def safe_extract(zip_path: Path, dest: Path, top: str, limit: Limit) -> list[Path]:
    """Extract the members under `top/` of `zip_path` into `dest`, stripping `top/`.

    Every member is checked before anything is written: symbolic links, absolute paths, '..'
    and members outside `top/` are refused with a DownloadError naming the member, and so is
    an archive of more than MAX_MEMBERS members. The bytes
    actually decompressed are counted (the sizes the zip declares are not trusted), and
    extraction stops before it writes more than `limit.max_bytes` in all. CRCs are checked as
    each member is read.

    Returns:
        The extracted files' paths relative to `dest`, sorted.
    """
    root = dest.resolve()
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
            if len(members) > MAX_MEMBERS:
                raise DownloadError(
                    f"{zip_path.name}: holds {len(members)} members, more than the "
                    f"{MAX_MEMBERS} any corpus needs; refusing it"
                )
            plan: list[tuple[zipfile.ZipInfo, Path]] = []
            for info in members:
                parts = _member_parts(info, top)
                if parts is None:
                    continue
                target = root.joinpath(*parts)
                if not target.resolve().is_relative_to(root):
                    raise DownloadError(f"refusing zip member {info.filename!r}: escapes {dest}")
                plan.append((info, target))
            written: list[Path] = []
            done = 0
            for info, target in plan:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, target.open("wb") as out:
                    while chunk := src.read(CHUNK_BYTES):
                        done += len(chunk)
                        if done > limit.max_bytes:
                            raise DownloadError(
                                f"{zip_path.name}: expands to more than {limit.max_bytes} bytes "
                                f"({limit.why}); refusing it (at member {info.filename!r})"
                            )
                        out.write(chunk)
                written.append(target.relative_to(root))
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise DownloadError(f"{zip_path.name}: corrupt zip ({err})") from None
    if not written:
        raise DownloadError(f"{zip_path.name}: no files under {top + '/'!r}")
    return sorted(written)


def _read_index(source: Source, work: Path, budget: Budget) -> dict[str, PackageInfo]:
    """Fetch index.xml (at most MAX_INDEX_BYTES) into `work` and parse it."""
    index_file = work / "index.xml"
    log.info("reading index %s", source.index)
    limit = Limit(MAX_INDEX_BYTES, "the cap on an index, download.MAX_INDEX_BYTES")
    fetch(source.index, index_file, source=source, limit=limit, budget=budget)
    return parse_index(index_file.read_bytes(), source.index)


def _obtain_zip(source: Source, pkg: PackageInfo, work: Path, budget: Budget) -> tuple[Path, str]:
    """The package's zip, installed or downloaded into `work` and verified; and its origin."""
    installed = find_installed(pkg)
    if installed is not None:
        log.info("using installed %s (size and MD5 match the index; no download)", installed)
        return installed, str(installed)
    origin = package_url(source, pkg)
    zip_path = work / f"{pkg.id}.zip"
    log.info("fetching %s (%d bytes)", origin, pkg.size)
    limit = Limit(pkg.size, "the size the index gives")
    md5 = fetch(origin, zip_path, source=source, limit=limit, budget=budget, expected_size=pkg.size)
    verify(zip_path, pkg, md5)
    return zip_path, origin


def run(p: CorpusParams, paths: Paths) -> dict[str, object]:
    """Download, verify and extract corpus `p.name` into `paths.raw_dir / p.name`.

    Returns:
        {corpus, files, bytes, md5, source}: the file count and total size extracted, the
        archive's MD5 and where it came from (a URL, a mirror path or an installed zip).
    """
    # The name becomes a folder under raw_dir: a plain name only, so it cannot point elsewhere.
    if not SAFE_NAME.fullmatch(p.name):
        raise DownloadError(f"corpus.name = {p.name!r}: expected a package id like 'state_union'")
    source = resolve_source(p.index_url, os.environ.get(MIRROR_ENV))
    target = paths.corpus_dir(p.name)
    # Beside the target: on its disk, and removed by the next stage if this one is killed.
    with files.scratch_dir(target) as work:
        budget = Budget.start(p)
        pkg = select_package(_read_index(source, work, budget), p.name, source.index)
        zip_path, origin = _obtain_zip(source, pkg, work, budget)
        with files.atomic_path(target) as staging:
            staging.mkdir()
            extracted = safe_extract(zip_path, staging, pkg.id, extraction_limit(pkg))
            n_bytes = sum((staging / rel).stat().st_size for rel in extracted)

    summary: dict[str, object] = {
        "corpus": p.name,
        "files": len(extracted),
        "bytes": n_bytes,
        "md5": pkg.checksum,
        "source": origin,
    }
    log.info("wrote %s: %s", target, summary)
    return summary


def run_from_params(params: Params) -> dict[str, object]:
    return run(params.corpus, params.paths)


def main(argv: list[str] | None = None) -> None:
    """Run the stage; exit 1 with one line ("download failed: ...") on a known failure."""
    stage_main(
        __doc__,
        lambda params, args: run_from_params(params),
        argv,
        error_prefix="download failed: ",
    )


if __name__ == "__main__":
    main()
