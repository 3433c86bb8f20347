"""Test helpers shared by unit and e2e tests: a synthetic corpus, NLTK-style mirrors, a server.

- `make_tiny_corpus_docs` builds deterministic English-like documents (plus a README), one of
  which (`LATIN1_DOC`) is meant to be stored in Latin-1; `encode_docs` gives the on-disk bytes.
- `build_nltk_mirror` writes a folder laid out like the NLTK data server (index.xml with sizes
  and MD5s, packages/<subdir>/<id>.zip holding `<id>/<file>` members).
- `fill_disk` makes binary writes through pathlib below a folder fail with ENOSPC once a
  number of bytes were written, as on a full disk.
- `serve_directory` serves a folder over loopback HTTP, records request paths and can inject
  faults per path: HTTP error codes, and a body cut off half-way by a clean close
  (`SHORT_BODY`), a connection reset (`RESET`) or a stall (`STALL`).
- `mlflow_server` runs a real `mlflow server` (this venv's, `make mlflow-server`'s flags) on a
  free loopback port with its SQLite store and proxied artifacts in a folder; stops it on exit.
- `write_import_blocker` makes torch (and Lightning) look uninstalled in the processes started
  with it on PYTHONPATH and logs them (`blocker_log`): the torch-free paths are tested that way.

Import with `from tests.fixtures import ...`; conftest.py turns the common cases into fixtures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from rnnlm import download, tokenization
from rnnlm.config import Params, parse_params

TINY_ID = "tinycorpus"
# The upstream host a generated index names; tests must never reach it (.invalid never resolves).
UPSTREAM = "https://example.invalid/"
README = "README"
# The first document; stored in Latin-1 so that it is not valid UTF-8.
LATIN1_DOC = "1990-Dubois.txt"
# Fault codes for `MirrorServer.faults` besides HTTP statuses. Each answers 200 with the full
# Content-Length and half the body, then:
SHORT_BODY = -1  # closes the connection cleanly (the client sees end-of-file)
RESET = -2  # resets it (RST, as SO_LINGER 0 makes close() send), like a crashed proxy
STALL = -3  # sends nothing more until the server shuts down: longer than any test timeout
# A stalled answer gives up after this long even if the server is never shut down.
STALL_MAX_S = 60.0

SURNAMES = [
    "Dubois", "Smith", "Johnson", "Garcia", "Miller", "Brown", "Davis", "Wilson",
    "Moore", "Taylor", "Clark", "Lewis", "Walker", "Young", "Allen", "King",
]  # fmt: skip
PLACES = ["America", "Congress", "Europe", "Asia", "Texas", "Ohio"]
# Lists are ordered by intended frequency: `_zipf` favours the first entries.
DETERMINERS = ["the", "our", "a", "this", "every", "their"]
NOUNS = [
    "nation", "people", "world", "government", "economy", "peace", "law", "budget",
    "war", "freedom", "future", "year", "family", "job", "school", "country",
    "tax", "trade", "health", "energy", "army", "child", "community", "industry",
    "program", "security", "promise", "citizen", "court", "farmer", "worker", "policy",
    "treaty", "market", "dollar", "debt", "union", "idea", "history", "challenge",
    "council", "border", "harvest", "railroad", "river",
]  # fmt: skip
ADJECTIVES = [
    "great", "new", "strong", "free", "vital", "good", "national", "public",
    "difficult", "young", "fair", "modern", "honest", "safe", "proud", "common",
    "ancient", "quiet", "bold", "generous",
]  # fmt: skip
VERBS = [
    "build", "protect", "help", "meet", "keep", "serve", "reduce", "support",
    "defend", "create", "improve", "honor", "strengthen", "restore", "open", "share",
    "remember", "welcome", "reform", "finish",
]  # fmt: skip
PAST = [
    "built", "protected", "helped", "met", "kept", "served", "reduced", "supported",
    "defended", "created", "improved", "honored", "strengthened", "restored", "opened",
    "shared", "remembered", "welcomed", "reformed", "finished",
]  # fmt: skip
MODALS = ["will", "must", "can", "should"]
OPENERS = ["Today", "Tonight", "Now", "Together", "Therefore", "Still"]
TITLES = ["Mr.", "Mrs.", "Dr."]


def _zipf(rng: random.Random, words: list[str]) -> str:
    """Pick a word with probability proportional to 1 / rank."""
    return rng.choices(words, weights=[1.0 / (i + 1) for i in range(len(words))])[0]


def _phrase(rng: random.Random) -> str:
    """A noun phrase: determiner, optional adjective, noun."""
    adj = f"{_zipf(rng, ADJECTIVES)} " if rng.random() < 0.4 else ""
    return f"{_zipf(rng, DETERMINERS)} {adj}{_zipf(rng, NOUNS)}"


def _sentence(rng: random.Random, year: int) -> str:
    """One sentence from a small grammar; capitalized, ending in '.' or '?'."""
    kind = rng.randrange(8)
    if kind == 0:
        text = f"{_phrase(rng)} {_zipf(rng, PAST)} {_phrase(rng)}."
    elif kind == 1:
        text = f"In {year - rng.randrange(1, 30)}, we {_zipf(rng, PAST)} {_phrase(rng)} of "
        text += f"{rng.choice(PLACES)}."
    elif kind == 2:
        text = f"{rng.choice(TITLES)} {rng.choice(SURNAMES)} said that {_phrase(rng)} "
        text += f"{_zipf(rng, MODALS)} {_zipf(rng, VERBS)} {_phrase(rng)}."
    elif kind == 3:
        text = f"The U.S. {_zipf(rng, NOUNS)} {_zipf(rng, MODALS)} {_zipf(rng, VERBS)} "
        text += f"{_phrase(rng)} and {_phrase(rng)}."
    elif kind == 4:
        modal = rng.choice(["Will", "Can", "Should"])
        text = f"{modal} {_phrase(rng)} {_zipf(rng, VERBS)} {_phrase(rng)}?"
    elif kind == 5:
        text = f"{rng.choice(OPENERS)}, we {_zipf(rng, MODALS)} {_zipf(rng, VERBS)} "
        text += f"{_phrase(rng)}, {_phrase(rng)} and {_phrase(rng)}."
    elif kind == 6:
        text = f"We {_zipf(rng, PAST)} {_phrase(rng)}."
    else:
        text = f"{_phrase(rng)} is not {_zipf(rng, ADJECTIVES)}, but it is {_phrase(rng)} "
        text += f"for all of {rng.choice(PLACES)}."
    return text[0].upper() + text[1:]


def make_tiny_corpus_docs(n_docs: int = 20, seed: int = 0) -> dict[str, str]:
    """Deterministic English-like documents `<year>-<Surname>.txt` -> text, plus `README`.

    Each document has 15-40 sentences in wrapped paragraphs, drawn from about 150 distinct words
    with Zipf-like frequencies, with abbreviations ("Mr.", "U.S."), commas and questions. The
    first document, `LATIN1_DOC`, contains "café" and "naïve"; `encode_docs` stores it in
    Latin-1. The README is not a document.
    """
    if n_docs < 1:
        raise ValueError(f"n_docs = {n_docs}: need at least one document")
    rng = random.Random(seed)
    docs: dict[str, str] = {}
    for i in range(n_docs):
        year = 1990 + i
        name = f"{year}-{SURNAMES[i % len(SURNAMES)]}.txt"
        sentences = [_sentence(rng, year) for _ in range(rng.randint(15, 40))]
        if i == 0:
            sentences[1:1] = [
                "Mr. Dubois met the people at the café in Ohio.",
                "It is naïve to think that the café will keep our economy strong.",
            ]
        paragraphs: list[str] = []
        while sentences:
            take = rng.randint(3, 6)
            paragraphs.append(textwrap.fill(" ".join(sentences[:take]), width=72))
            sentences = sentences[take:]
        docs[name] = "\n\n".join(paragraphs) + "\n"
    docs[README] = (
        "Tiny synthetic corpus for tests.\n\nEach <year>-<Surname>.txt file is one document;\n"
        "this README is not a document.\n"
    )
    return docs


def encode_docs(docs: Mapping[str, str]) -> dict[str, bytes]:
    """The files' bytes as stored: `LATIN1_DOC` in Latin-1 (invalid UTF-8), the rest UTF-8."""
    return {
        name: text.encode("latin-1" if name == LATIN1_DOC else "utf-8")
        for name, text in docs.items()
    }


def write_files(folder: Path, files: Mapping[str, bytes]) -> Path:
    """Write `files` (name -> bytes) into `folder`, creating it; return `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def make_package_zip(pkg_id: str, files: Mapping[str, bytes]) -> bytes:
    """A zip like NLTK's: a `<pkg_id>/` folder entry and `<pkg_id>/<name>` members.

    Timestamps are fixed so the same input gives the same bytes (and MD5).
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        folder = zipfile.ZipInfo(f"{pkg_id}/", date_time=(1980, 1, 1, 0, 0, 0))
        folder.external_attr = (0o40755 << 16) | 0x10  # Unix dir mode + MS-DOS directory bit
        archive.writestr(folder, b"")
        for name in sorted(files):
            info = zipfile.ZipInfo(f"{pkg_id}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, files[name])
    return buffer.getvalue()


def _unzipped_size(data: bytes) -> int | None:
    """What a zip's members add up to, as the NLTK index's `unzipped_size` says; None if the
    bytes are not a readable zip."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, EOFError, ValueError):
        return None


def build_nltk_mirror(
    root: Path,
    packages: Mapping[str, Mapping[str, bytes] | bytes],
    *,
    url_base: str | None = UPSTREAM,
    index_overrides: Mapping[str, Mapping[str, str]] | None = None,
) -> Path:
    """Write an NLTK-data-server-like folder at `root`; return `root`.

    Args:
        packages: package id -> its files (name -> bytes), zipped under `<id>/`; or the zip's
            bytes as they are (to test corrupt or malicious archives).
        url_base: the host the index's `url` attributes name (`<url_base>packages/...`), an
            upstream a client must NOT contact when given a mirror; None leaves `url` out.
        index_overrides: package id -> index attributes to replace (e.g. a wrong checksum).
            An overridden `subdir` also moves the archive to `packages/<subdir>/`.
    """
    overrides = index_overrides or {}
    nltk_data = ET.Element("nltk_data")
    listing = ET.SubElement(nltk_data, "packages")
    for pkg_id, content in packages.items():
        data = content if isinstance(content, bytes) else make_package_zip(pkg_id, content)
        attrs = {
            "id": pkg_id,
            "name": f"Test package {pkg_id}",
            "subdir": "corpora",
            "unzip": "1",
            "size": str(len(data)),
            "checksum": hashlib.md5(data, usedforsecurity=False).hexdigest(),
        }
        unzipped = _unzipped_size(data)
        if unzipped is not None:  # the index cannot say it of bytes that are no zip
            attrs["unzipped_size"] = str(unzipped)
        attrs.update(overrides.get(pkg_id, {}))
        relative = f"packages/{attrs['subdir']}/{pkg_id}.zip"
        if url_base is not None:
            attrs.setdefault("url", url_base + relative)
        ET.SubElement(listing, "package", attrs)
        archive = root / relative
        archive.parent.mkdir(parents=True, exist_ok=True)
        archive.write_bytes(data)
    ET.SubElement(nltk_data, "collections")
    ET.indent(nltk_data)
    root.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(nltk_data).write(root / "index.xml", encoding="utf-8", xml_declaration=True)
    return root


@dataclass
class MirrorServer:
    """A running loopback server: its base URL, the paths requested, and faults to inject.

    `faults` maps a request path (e.g. "/packages/corpora/x.zip") to codes answered, one per
    request, before the file is served normally: an HTTP status, or SHORT_BODY, RESET or STALL
    for a body that breaks off half-way.
    """

    url: str
    requests: list[str] = field(default_factory=list)
    faults: dict[str, list[int]] = field(default_factory=dict)
    # Set on shutdown, to release STALLed answers.
    stopping: threading.Event = field(default_factory=threading.Event)

    def count(self, path: str) -> int:
        """How many times `path` was requested."""
        return self.requests.count(path)


class _MirrorHandler(SimpleHTTPRequestHandler):
    state: MirrorServer

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        self.state.requests.append(path)
        pending = self.state.faults.get(path)
        if pending:
            code = pending.pop(0)
            if code in (SHORT_BODY, RESET, STALL):
                self._break_off(code)
            else:
                self.send_error(code)
            return
        super().do_GET()

    def _break_off(self, code: int) -> None:
        """Promise the whole file, send half of it, then close, reset or stall."""
        data = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.close_connection = True
        if code == STALL:
            self.state.stopping.wait(STALL_MAX_S)
        elif code == RESET:
            # Linger 0: close() drops the connection with an RST instead of a FIN. Closing here,
            # before the server's own shutdown(SHUT_WR), keeps a FIN from going out first.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""


@contextlib.contextmanager
def serve_directory(root: Path) -> Iterator[MirrorServer]:
    """Serve `root` on 127.0.0.1 (a free port) from a thread; shut down on exit."""
    state = MirrorServer(url="")
    handler = type("Handler", (_MirrorHandler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        yield state
    finally:
        state.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _FillingFile:
    """A binary file being written on a disk with `room[0]` bytes free (shared by all its files).

    A write that does not fit writes what fits, then fails with ENOSPC as the OS would.
    """

    def __init__(self, fh: IO[bytes], room: list[int]) -> None:
        self._fh = fh
        self._room = room

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        fits = min(len(view), self._room[0])
        self._fh.write(view[:fits])
        self._room[0] -= fits
        if fits < len(view):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fits

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


def fill_disk(monkeypatch: pytest.MonkeyPatch, under: Path, room: int = 0) -> None:
    """Act as if the disk holding `under` had `room` bytes free, for files opened there later.

    Patches `Path.open`, through which every write of rnnlm.files and rnnlm.download goes
    (`write_bytes`, `np.save` into an opened file, extraction); binary write modes only.
    """
    real_open = Path.open
    left = [room]
    root = under.resolve()

    def open_filling(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = real_open(self, mode, *args, **kwargs)
        writing = "b" in mode and any(flag in mode for flag in "wax+")
        if writing and self.resolve().is_relative_to(root):
            return _FillingFile(fh, left)
        return fh

    monkeypatch.setattr(Path, "open", open_filling)


def unused_port() -> int:
    """A loopback port with nothing listening on it (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MlflowServer:
    """A running `mlflow server`: its URL, its data folder and its log."""

    url: str
    root: Path
    process: subprocess.Popen[bytes]

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    @property
    def artifacts(self) -> Path:
        """Where the server stores the artifacts clients upload through it."""
        return self.root / "artifacts"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    def stop(self, timeout: float = 30.0) -> None:
        """Terminate the server and its workers (its own process group); wait for them."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def mlflow_server(
    root: Path, start_timeout: float = 120.0, port: int | None = None
) -> Iterator[MlflowServer]:
    """Run `mlflow server` as `make mlflow-server` does, its data in `root`; stop it on exit.

    SQLite backend `root/server.db`, artifacts proxied by the server (`--serve-artifacts`) into
    `root/artifacts`, 127.0.0.1 on a free port, one worker. Waits until /health answers (at most
    `start_timeout` seconds: the first start creates the schema, slow on a busy machine) and
    fails with the tail of the server's log when it does not.
    """
    root.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port or unused_port()}"  # a port: restart a stopped server
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        url.rsplit(":", 1)[1],
        "--workers",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # as `make mlflow-server` sets it
    with (root / "server.log").open("wb") as log:
        # Its own process group (session), so that stop() reaches the workers too.
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = MlflowServer(url=url, root=root, process=process)
    try:
        deadline = time.monotonic() + start_timeout
        while not _healthy(url):
            if process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {process.returncode} before answering "
                    f"{url}/health; its log (tail):\n{server.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not answer {url}/health within {start_timeout:.0f} s; "
                    f"its log (tail):\n{server.log_tail()}"
                )
            time.sleep(0.5)
        yield server
    finally:
        server.stop()


# What the torch-free paths must never import.
HEAVY_MODULES = ("torch", "lightning", "pytorch_lightning")
_BLOCKER = """\
# Written by tests.fixtures.write_import_blocker: {blocked} look uninstalled in this process.
import os
import sys

_LOG = {log!r}
_BLOCKED = {blocked!r}


def _note(kind, text):
    with open(os.path.join(_LOG, f"{{kind}}.{{os.getpid()}}"), "a", encoding="utf-8") as log:
        log.write(text + "\\n")


with open("/proc/self/cmdline", "rb") as _cmdline:
    _note("process", _cmdline.read().replace(b"\\0", b" ").decode("utf-8", "replace"))


class _Hiding:
    \"\"\"A finder of sys.meta_path that does not find the blocked packages.\"\"\"

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            _note("hidden", name)
            return None
        return self._finder.find_spec(name, path, target)

    def __getattr__(self, attribute):
        return getattr(self._finder, attribute)


# Every finder hides them, so `import torch` fails as if it were not installed and
# importlib.util.find_spec("torch") (pyspark probes it) says None, as it would then.
sys.meta_path[:] = [_Hiding(finder) for finder in sys.meta_path]
"""


def write_import_blocker(folder: Path, log_dir: Path) -> Path:
    """A sitecustomize.py in `folder` (put `folder` first on PYTHONPATH) under which torch,
    lightning and pytorch_lightning look uninstalled in every Python process started with it,
    forks included: importing them fails, probing finds nothing. Each such process leaves
    `log_dir/process.<pid>` (its command line) and `log_dir/hidden.<pid>` (the lookups it
    answered with nothing). Returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    code = _BLOCKER.format(log=str(log_dir), blocked=HEAVY_MODULES)
    (folder / "sitecustomize.py").write_text(code, encoding="utf-8")
    return folder


def blocker_log(log_dir: Path) -> tuple[list[str], list[str]]:
    """(command lines of the processes the blocker ran in, the lookups it hid)."""

    def lines(kind: str) -> list[str]:
        return [
            line
            for path in sorted(log_dir.glob(f"{kind}.*"))
            for line in path.read_text(encoding="utf-8").splitlines()
        ]

    return lines("process"), lines("hidden")


PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_PARAMS = PROJECT_ROOT / "params.yaml"


@functools.cache
def _shipped_raw() -> str:
    return SHIPPED_PARAMS.read_text(encoding="utf-8")


def shipped_raw_with(overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The shipped params.yaml, as parsed YAML, with `overrides` (section -> key -> value).

    params.yaml is the one source of values: tests change the keys they care about and take
    every other from the real file. A key's value is replaced whole (a mapping such as
    evaluate.sample_prompts included); nothing is validated here.
    """
    raw = yaml.safe_load(_shipped_raw())
    for section, values in overrides.items():
        raw[section] = {**raw[section], **values}
    return raw


def params_with(overrides: Mapping[str, Mapping[str, Any]], source: str = "tests") -> Params:
    """The shipped params with `overrides` applied, validated."""
    return parse_params(shipped_raw_with(overrides), source=source)


def paths_under(root: Path) -> dict[str, str]:
    """The four `paths` folders, laid out under `root` as the shipped params lay them out."""
    return {
        "raw_dir": str(root / "data" / "raw"),
        "processed_dir": str(root / "data" / "processed"),
        "models_dir": str(root / "models"),
        "metrics_dir": str(root / "metrics"),
    }


def write_params(path: Path, overrides: Mapping[str, Mapping[str, Any]]) -> Path:
    """A params.yaml for a stage's `main`: the shipped file with `overrides`, unvalidated (so
    a test can also write a bad value or an unknown key). Paths the overrides leave out go
    under the file's folder: a test's stage never writes, locks or cleans up in the checkout."""
    paths = {**paths_under(path.parent), **overrides.get("paths", {})}
    raw = shipped_raw_with({**overrides, "paths": paths})
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def shipped_params() -> Params:
    """The shipped params.yaml as it is."""
    return params_with({})


# The tiny setup every training test uses: a 16-dim LSTM for 2 epochs on `tinycorpus`, quick
# export and evaluation settings. Paths and the MLflow store are added by make_tiny_params.
# The adaptive softmax as shipped, cut for tinycorpus's vocabulary (50-500 words), so every
# pipeline test trains, resumes, exports and serves through it; the plateau schedule, where
# the shipped one is cosine (test_train's shared training runs that), so both are exercised.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "corpus": {"name": TINY_ID},
    "model": {
        "cell": "lstm",
        "embedding_dim": 16,
        "hidden_dim": 16,
        "num_layers": 1,
        "dropout": 0.0,
        "embedding_dropout": 0.0,
        "tie_weights": True,
        "softmax_cutoffs": [20],
    },
    "train": {
        "lr_schedule": "plateau",
        "batch_size": 4,
        "bptt": 8,
        "eval_batch_size": 1,
        "eval_bptt": 32,
        "max_epochs": 2,
        "lr": 0.01,
        "accelerator": "cpu",
        "devices": 1,
        "log_every_n_steps": 5,
        "seed": 7,
    },
    "export": {"latency_tokens": 5, "latency_threads": 1},
    "evaluate": {
        "sample_prompts": {"nation": "The state of the union", "economy": "Our economy"},
        "sample_tokens": 8,
        "samples_per_prompt": 2,
    },
}


def make_tiny_params(root: Path) -> Params:
    """Params for `tinycorpus` with a 16-dim, 1-layer LSTM; every path and the store under root."""
    return params_with(
        {
            **TINY_OVERRIDES,
            "paths": paths_under(root),
            "mlflow": {
                "experiment_name": "test",
                "tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db",
            },
        },
        source="tiny_params",
    )


def prepare_tiny_data(params: Params) -> None:
    """Run the download and tokenize stages for `params` (the mirror comes from the env)."""
    download.run(params.corpus, params.paths)
    tokenization.run(params.tokenize, params.paths, params.corpus.name)


def write_full_params(params: Params, path: Path) -> Path:
    """Every section of `params` as a params.yaml, for a subprocess that must see all of it."""
    raw = json.loads(json.dumps(dataclasses.asdict(params), default=str))
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def prepare_tiny_project(root: Path) -> Params:
    """`make_tiny_params(root)` with `tinycorpus` downloaded from a folder mirror and tokenized:
    for module-scoped fixtures, which cannot use the function-scoped ones of conftest."""
    mirror = build_nltk_mirror(root / "mirror", {TINY_ID: encode_docs(make_tiny_corpus_docs())})
    params = make_tiny_params(root)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(download.MIRROR_ENV, str(mirror))
        prepare_tiny_data(params)
    return params


def _git_files(root: Path, *args: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", *args], cwd=root, check=True, capture_output=True
    ).stdout
    return [name for name in out.decode("utf-8").split("\0") if name]


def copy_project(dest: Path) -> Path:
    """The project's files in `dest`, committed to a fresh git repository.

    Copies what git tracks plus untracked files that are not ignored (so uncommitted work is
    tested too); ignored paths (.venv, data, caches) stay behind. `.dvc/config` is tracked, so
    the copy is already a DVC repository.
    """
    names = _git_files(PROJECT_ROOT) + _git_files(PROJECT_ROOT, "--others", "--exclude-standard")
    for name in sorted(set(names)):
        src = PROJECT_ROOT / name
        if not src.is_file():  # tracked but deleted in the working tree
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    git = [
        "git",
        "-c",
        "user.name=rnnlm tests",
        "-c",
        "user.email=tests@rnnlm.invalid",
        "-c",
        "commit.gpgsign=false",
        "-c",
        "core.hooksPath=/dev/null",
    ]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "project copy"], cwd=dest, check=True)
    return dest
