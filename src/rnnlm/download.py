"""Stage `download`: one NLTK corpus package -> data/raw/<corpus>/ (the corpus files, nothing else).

Inputs: the `corpus` section of params.yaml (package id, index URL, timeout, retries) and
`paths.raw_dir`. The environment variable RNNLM_NLTK_MIRROR, when set, takes precedence over
`corpus.index_url`: a local folder, a file:// URL or an http(s) URL laid out like the NLTK data
server (`index.xml` at its root, `packages/<subdir>/<id>.zip` below it). Package archives are then
fetched relative to the mirror's root, whatever host the index's `url` attributes name.

Output: `paths.raw_dir / corpus.name`, holding exactly the files of the package's zip with its
top folder `<id>/` stripped (e.g. data/raw/state_union/1945-Truman.txt, plus its README).

Steps: read index.xml (with retries), look the corpus up, reuse `corpora/<id>.zip` from the NLTK
data path when its size and MD5 match the index (no download then), otherwise download it (with
retries) into a temporary folder, check size and MD5, and extract it safely into a folder beside
the target that is renamed into place only when everything succeeded.

Run via `dvc repro`, or directly: python -m rnnlm.download [--params params.yaml]
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
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
from typing import BinaryIO, TextIO

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
# At most this many ids are listed when the requested corpus is not in the index.
MAX_LISTED = 20
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


def _copy_stream(src: BinaryIO, dest: Path, progress: _Progress) -> tuple[int, str]:
    """Copy `src` to `dest` in chunks; return (bytes written, hex MD5).

    A failure to write `dest` (a full temporary folder) is a WriteError, never retried; errors
    reading `src` pass through for the caller to judge.
    """
    digest = hashlib.md5(usedforsecurity=False)
    done = 0
    with files.writing(dest), dest.open("wb") as out:
        while chunk := src.read(CHUNK_BYTES):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            progress.update(done)
    progress.close(done)
    return done, digest.hexdigest()


def _timed_out(timeout: float) -> _TransientError:
    return _TransientError(f"timed out: no data for {timeout:g} s (corpus.timeout_s)")


def _fetch_once(url: str, dest: Path, expected_size: int | None, timeout: float) -> str:
    """One HTTP GET into `dest`; raise _TransientError for failures worth retrying."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length", "")
            # Content-Length is what this response promised; the index size is the fallback.
            total = int(length) if length.isdigit() else expected_size
            label = PurePosixPath(urllib.parse.urlparse(url).path).name
            done, md5 = _copy_stream(response, dest, _Progress(label, total))
    except urllib.error.HTTPError as err:
        if err.code >= 500 or err.code in (408, 429):
            raise _TransientError(f"HTTP {err.code} {err.reason}") from None
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:  # raised before the response: connecting, headers
        if isinstance(err.reason, TimeoutError):
            raise _timed_out(timeout) from None
        if isinstance(err.reason, OSError):
            raise _TransientError(str(err.reason)) from None
        raise DownloadError(f"{url}: {err.reason}") from None
    except TimeoutError:  # the server stalled mid-body
        raise _timed_out(timeout) from None
    except (ConnectionError, http.client.HTTPException) as err:
        raise _TransientError(f"{type(err).__name__}: {err}") from None
    except ValueError as err:  # e.g. http.client.InvalidURL for a bad port
        raise DownloadError(f"{url}: {err}") from None
    if total is not None and done < total:
        raise _TransientError(f"body truncated: got {done} of {total} bytes")
    return md5


def _copy_local(path: Path, dest: Path) -> str:
    """Copy a file from a local mirror; return its MD5."""
    try:
        with path.open("rb") as src:
            # Local copies are fast: no bar.
            _, md5 = _copy_stream(src, dest, _Progress(path.name, None, enabled=False))
    except files.WriteError:
        raise
    except FileNotFoundError:
        raise DownloadError(f"{path}: file not found") from None
    except OSError as err:
        raise DownloadError(f"{path}: cannot read ({err.strerror or err})") from None
    return md5


def fetch(url: str, dest: Path, expected_size: int | None, timeout: float, retries: int) -> str:
    """Download `url` (or copy a local path / file:// URL) into `dest`; return its hex MD5.

    HTTP failures that may pass (connection refused or reset, timeouts, truncated bodies, 5xx,
    429) are retried up to `retries` times with exponential backoff; other 4xx fail at once.
    """
    path = _local_path(url)
    if path is not None:
        return _copy_local(path, dest)
    attempt = 0
    while True:
        try:
            return _fetch_once(url, dest, expected_size, timeout)
        except _TransientError as err:
            if attempt >= retries:
                raise DownloadError(
                    f"{url}: giving up after {attempt + 1} attempt(s), last error: {err}. "
                    f"Check the network, or set {MIRROR_ENV} to a local NLTK data mirror "
                    "(a folder, file:// or http(s) URL with index.xml at its root)"
                ) from None
            delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt)
            attempt += 1
            log.warning("%s: %s; retry %d/%d in %.1fs", url, err, attempt, retries, delay)
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


def safe_extract(zip_path: Path, dest: Path, top: str) -> list[Path]:
    """Extract the members under `top/` of `zip_path` into `dest`, stripping `top/`.

    Every member is checked before anything is written: symbolic links, absolute paths, '..'
    and members outside `top/` are refused with a DownloadError naming the member.

    Returns:
        The extracted files' paths relative to `dest`, sorted.
    """
    root = dest.resolve()
    try:
        with zipfile.ZipFile(zip_path) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise DownloadError(f"{zip_path.name}: corrupt zip, bad CRC for member {bad!r}")
            plan: list[tuple[zipfile.ZipInfo, Path]] = []
            for info in archive.infolist():
                parts = _member_parts(info, top)
                if parts is None:
                    continue
                target = root.joinpath(*parts)
                if not target.resolve().is_relative_to(root):
                    raise DownloadError(f"refusing zip member {info.filename!r}: escapes {dest}")
                plan.append((info, target))
            written: list[Path] = []
            for info, target in plan:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, CHUNK_BYTES)
                written.append(target.relative_to(root))
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise DownloadError(f"{zip_path.name}: corrupt zip ({err})") from None
    if not written:
        raise DownloadError(f"{zip_path.name}: no files under {top + '/'!r}")
    return sorted(written)


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
    target = paths.raw_dir / p.name
    with tempfile.TemporaryDirectory(prefix="rnnlm-download-") as tmp:
        index_file = Path(tmp) / "index.xml"
        log.info("reading index %s", source.index)
        fetch(source.index, index_file, None, p.timeout_s, p.retries)
        pkg = select_package(
            parse_index(index_file.read_bytes(), source.index), p.name, source.index
        )

        zip_path = find_installed(pkg)
        if zip_path is not None:
            log.info("using installed %s (size and MD5 match the index; no download)", zip_path)
            origin = str(zip_path)
        else:
            origin = package_url(source, pkg)
            zip_path = Path(tmp) / f"{pkg.id}.zip"
            log.info("fetching %s (%d bytes)", origin, pkg.size)
            verify(zip_path, pkg, fetch(origin, zip_path, pkg.size, p.timeout_s, p.retries))

        with files.atomic_path(target) as staging:
            staging.mkdir()
            extracted = safe_extract(zip_path, staging, top=pkg.id)
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
