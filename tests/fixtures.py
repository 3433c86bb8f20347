"""Test helpers shared by unit and e2e tests: a synthetic corpus, NLTK-style mirrors, a server.

- `make_tiny_corpus_docs` builds deterministic English-like documents (plus a README), one of
  which (`LATIN1_DOC`) is meant to be stored in Latin-1; `encode_docs` gives the on-disk bytes.
- `build_nltk_mirror` writes a folder laid out like the NLTK data server (index.xml with sizes
  and MD5s, packages/<subdir>/<id>.zip holding `<id>/<file>` members).
- `serve_directory` serves a folder over loopback HTTP, records request paths and can inject
  faults (HTTP error codes, a truncated body) per path.

Import with `from tests.fixtures import ...`; conftest.py turns the common cases into fixtures.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import random
import socket
import textwrap
import threading
import urllib.parse
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from rnnlm.config import Params

TINY_ID = "tinycorpus"
# The upstream host a generated index names; tests must never reach it (.invalid never resolves).
UPSTREAM = "https://example.invalid/"
README = "README"
# The first document; stored in Latin-1 so that it is not valid UTF-8.
LATIN1_DOC = "1990-Dubois.txt"
# A fault code for `MirrorServer.faults`: promise the full Content-Length, send half, hang up.
SHORT_BODY = -1

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
        unzipped = 0 if isinstance(content, bytes) else sum(len(b) for b in content.values())
        attrs = {
            "id": pkg_id,
            "name": f"Test package {pkg_id}",
            "subdir": "corpora",
            "unzip": "1",
            "unzipped_size": str(unzipped),
            "size": str(len(data)),
            "checksum": hashlib.md5(data, usedforsecurity=False).hexdigest(),
        }
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

    `faults` maps a request path (e.g. "/packages/corpora/x.zip") to status codes answered, one
    per request, before the file is served normally; `SHORT_BODY` sends a truncated body.
    """

    url: str
    requests: list[str] = field(default_factory=list)
    faults: dict[str, list[int]] = field(default_factory=dict)

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
            if code == SHORT_BODY:
                data = Path(self.translate_path(self.path)).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
            else:
                self.send_error(code)
            return
        super().do_GET()

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
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def unused_port() -> int:
    """A loopback port with nothing listening on it (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_stage_params(params: Params, path: Path) -> Path:
    """A params.yaml holding `params`' paths and tracking URI, for a stage's `main(--params)`."""
    raw = {
        "paths": {k: str(v) for k, v in params.paths.__dict__.items()},
        "mlflow": {"tracking_uri": params.mlflow.tracking_uri},
    }
    path.write_text(yaml.safe_dump(raw))
    return path
