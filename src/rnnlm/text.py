"""Text -> tokens -> ids, shared by the `tokenize` stage and the torch-free inference path.

A `TextTokenizer` holds everything needed to turn raw text into the token stream the model was
trained on: the paragraph rule, a Punkt sentence splitter trained on the corpus (NLTK's
pretrained punkt models are not required), NLTK's word tokenizer and the lowercase flag. It
serialises to a plain JSON-able dict, so the tokenizer travels inside the ONNX model's metadata.

`TextTokenizer.stream_sentences(chunks)` gives the sentences of a byte stream (a file read in
chunks, stdin) without ever holding the whole of it: `decode_stream` decodes it with
`decode_document`'s rule made incremental, `PieceSplitter` cuts the text into the same paragraph
pieces as `split_paragraphs` + `cut_long` on the whole text, holding one piece at most.
"""

from __future__ import annotations

import codecs
import itertools
import logging
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from rnnlm.streams import EOS, UNK_ID

# Any nltk.* import runs NLTK's package __init__, which loads nearly all of NLTK and, through
# it, scikit-learn, SciPy and pandas when they are installed (the training environment has
# them): +220 MB of resident memory and a second of start-up for the three tokenizers used
# here, which need none of them. NLTK imports them under `try/except ImportError`, so they are
# hidden while it loads (unless something imported them already); `import sklearn` afterwards
# works as usual. SciPy's stats and sparse are hidden on their own too: when another package
# has imported scipy already (the export stage's do), NLTK would still load scipy.stats (1.5 s).
_HIDDEN = [
    name
    for name in ("sklearn", "scipy", "scipy.stats", "scipy.sparse", "pandas")
    if name not in sys.modules
]
sys.modules.update(dict.fromkeys(_HIDDEN))  # type: ignore[arg-type]  # None: ImportError
try:
    from nltk.tokenize.destructive import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer, PunktTrainer
    from nltk.tokenize.treebank import TreebankWordDetokenizer
finally:
    for _name in _HIDDEN:
        if sys.modules.get(_name, False) is None:
            del sys.modules[_name]

log = logging.getLogger(__name__)

ParagraphRule = Literal["line", "blank_line"]

_BLANK_LINES = re.compile(r"\n\s*\n")
# Punkt scans a paragraph with one regex that NLTK runs under a 5 s wall-clock budget
# (nltk.redos); a period-dense paragraph of a few hundred kB exhausts it (TimeoutError), so
# longer paragraphs are cut into pieces of at most this many characters first.
MAX_PARAGRAPH_CHARS = 50_000
_UP_TO_LAST_SPACE = re.compile(r".*\s", re.DOTALL)
_WORD_TOKENIZER = NLTKWordTokenizer()
_DETOKENIZER = TreebankWordDetokenizer()
# A stream is read this many bytes at a time, and its decoded text handed on in pieces of at
# most this many characters.
READ_BYTES = 1 << 16
# A stream's encoding is decided on its first MiB (on the whole of a shorter one): see
# decode_stream.
SNIFF_BYTES = 1 << 20


# Line ends: "\r\n", "\r" and Unicode's line separator end a line, its paragraph separator
# ends a paragraph (a blank line). NEL (U+0085) ends a line in UTF-8 text only: decoded as
# Latin-1, byte 0x85 is most often Windows-1252's "..." from a Windows editor, kept as it is.
_SEPARATORS = str.maketrans({"\u2028": "\n", "\u2029": "\n\n"})


def normalize_line_ends(text: str) -> str:
    """`text` with every line end as "\n"."""
    return text.replace("\r\n", "\n").replace("\r", "\n").translate(_SEPARATORS)


def _utf8_text(text: str) -> str:
    """Text decoded from UTF-8, its NEL line ends as "\n" (see _SEPARATORS)."""
    return text.replace("\x85", "\n")


def _decode_bytes(data: bytes | bytearray) -> str:
    """UTF-8 (with or without BOM) when valid, else Latin-1; line ends as they are, except
    UTF-8's NEL."""
    try:
        return _utf8_text(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return data.decode("latin-1")


def decode_document(data: bytes) -> str:
    """Decode a corpus file: UTF-8 (with or without BOM) when valid, else Latin-1; every line
    end becomes "\n"."""
    return normalize_line_ends(_decode_bytes(data))


def _slices(text: str, size: int = READ_BYTES) -> Iterator[str]:
    for start in range(0, len(text), size):
        yield text[start : start + size]


def decode_stream(
    chunks: Iterable[bytes], name: str = "input", sniff: int | None = None
) -> Iterator[str]:
    """The text of a byte stream, in pieces of at most READ_BYTES characters; line ends as
    they are (`PieceSplitter` normalises them).

    The rule of `decode_document` (UTF-8 when the whole input is valid UTF-8, else Latin-1)
    needs the whole input before the first character, so a stream is held until `sniff` bytes
    (default SNIFF_BYTES) have arrived: when it ends there (or in the chunk that reaches them),
    the rule holds exactly. A longer one is decided on those first bytes: Latin-1 throughout
    when they are not valid UTF-8; else UTF-8 (a leading BOM dropped), and should a later byte
    not be valid UTF-8, everything from that byte on is read as Latin-1, with one warning
    naming the byte's offset.
    """
    sniff = SNIFF_BYTES if sniff is None else sniff
    source: Iterator[bytes] = (chunk for chunk in chunks if chunk)
    head = bytearray()
    for chunk in source:
        head += chunk
        if len(head) >= sniff:
            break
    following = next(source, None)
    if following is None:  # the whole input is in `head`: decode_document's rule exactly
        yield from _slices(_decode_bytes(head))
        return
    source = itertools.chain([following], source)
    head_bytes = len(head)
    start = len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0
    try:
        text, used = codecs.utf_8_decode(memoryview(head)[start:], "strict", False)
    except UnicodeDecodeError:
        yield from _slices(head.decode("latin-1"))
        for chunk in source:
            yield from _slices(chunk.decode("latin-1"))
        return
    offset = start + used  # of the first byte not decoded yet, in the whole stream
    pending = bytes(head[offset:])  # an incomplete UTF-8 sequence (at most 3 bytes)
    del head
    yield from _slices(_utf8_text(text))
    for chunk in source:
        data = pending + chunk
        try:
            text, used = codecs.utf_8_decode(data, "strict", False)
        except UnicodeDecodeError as err:
            log.warning(
                "%s: byte %d is not UTF-8 (the first %d bytes were): read as Latin-1 from there",
                name,
                offset + err.start,
                head_bytes,
            )
            yield from _slices(
                _utf8_text(data[: err.start].decode("utf-8")) + data[err.start :].decode("latin-1")
            )
            for rest in source:
                yield from _slices(rest.decode("latin-1"))
            return
        yield from _slices(_utf8_text(text))
        offset += used
        pending = data[used:]
    if pending:  # the stream ends inside a UTF-8 sequence
        log.warning("%s: the last %d byte(s) are not UTF-8: read as Latin-1", name, len(pending))
        yield pending.decode("latin-1")


def split_paragraphs(text: str, rule: ParagraphRule) -> list[str]:
    """Cut a document into paragraphs; sentences never cross a paragraph boundary.

    `line`: every non-empty line is a paragraph (state_union, inaugural: one paragraph a line).
    `blank_line`: paragraphs are separated by blank lines and may be hard-wrapped (gutenberg).
    """
    if rule == "line":
        blocks = text.split("\n")
    else:
        blocks = [" ".join(block.split("\n")) for block in _BLANK_LINES.split(text)]
    return [block.strip() for block in blocks if block.strip()]


# What joins a document's paragraphs so that split_paragraphs gives them back, per rule.
PARAGRAPH_SEPARATORS: Mapping[str, str] = {"line": "\n", "blank_line": "\n\n"}


def join_paragraphs(paragraphs: Sequence[str], rule: ParagraphRule) -> str:
    """The inverse of `split_paragraphs` under `rule`: one text whose paragraphs they are
    (the tokenize stage's spans are character offsets into it)."""
    return PARAGRAPH_SEPARATORS[rule].join(paragraphs)


def _cut_point(paragraph: str, limit: int) -> int:
    """Where `cut_long` cuts a paragraph longer than `limit`: it reads `limit` characters."""
    space = _UP_TO_LAST_SPACE.match(paragraph, 0, limit)
    return space.end() if space and space.end() > limit // 2 else limit


def cut_long(paragraph: str, limit: int = MAX_PARAGRAPH_CHARS) -> list[str]:
    """`paragraph` in pieces of at most `limit` characters, cut after whitespace when the last
    half of a piece has some (a sentence then ends at the cut), else mid-word."""
    pieces = []
    while len(paragraph) > limit:
        cut = _cut_point(paragraph, limit)
        pieces.append(paragraph[:cut])
        paragraph = paragraph[cut:]
    return [*pieces, paragraph]


class PieceSplitter:
    """Text fed in pieces of any size -> the paragraph pieces of the whole text, as they end.

    The pieces that carry words are those of `split_paragraphs` then `cut_long` on the whole
    (newline-normalised) text, in order; only pieces of whitespace alone may be left out. It
    holds the unfinished piece only: fewer than `4 * limit` characters plus what one `feed`
    adds.

    A paragraph longer than `limit` is cut as soon as `cut_long`'s cut is known, that is when
    more than `limit` characters of it, not counting trailing whitespace, have arrived. A run
    of `3 * limit` whitespace characters or more inside a paragraph loses a middle part whose
    length is a multiple of `limit`: `cut_long` would have cut whitespace-only pieces out of
    it, and the pieces before and after it stay the same, character for character.
    """

    def __init__(self, rule: ParagraphRule, limit: int = MAX_PARAGRAPH_CHARS) -> None:
        if rule not in ("line", "blank_line"):
            raise ValueError(f"paragraph rule = {rule!r}: expected 'line' or 'blank_line'")
        self.rule = rule
        self.limit = limit
        # The unfinished piece, left-stripped (lines joined by a space under `blank_line`), in
        # parts: joined only to cut it, so that a long paragraph is not copied once per line.
        self._parts: list[str] = []
        self._length = 0
        self._run = 0  # its trailing whitespace, in characters
        self._blank_line = True  # the current line has no non-whitespace yet
        self._cr = False  # the last text fed ended with "\r": a "\n" may follow

    @property
    def buffered(self) -> int:
        """Characters held: the unfinished piece of a paragraph."""
        return self._length + self._cr

    def feed(self, text: str) -> list[str]:
        """The pieces that `text` completes."""
        if self._cr:
            text = "\r" + text
        self._cr = text.endswith("\r")
        if self._cr:
            text = text[:-1]  # "\r\n" may be cut between two feeds: one line end, not two
        text = normalize_line_ends(text)
        out: list[str] = []
        for i, segment in enumerate(text.split("\n")):
            if i:
                self._end_line(out)
            self._extend(segment, out)
        return out

    def close(self) -> list[str]:
        """The last pieces, at the end of the text."""
        out: list[str] = []
        if self._cr:
            self._cr = False
            self._end_line(out)
        self._end_paragraph(out)
        return out

    def _extend(self, segment: str, out: list[str]) -> None:
        if not self._length:
            segment = segment.lstrip()
        if not segment:
            return
        self._parts.append(segment)
        self._length += len(segment)
        if segment.isspace():
            self._run += len(segment)
        else:
            self._blank_line = False
            self._run = len(segment) - len(segment.rstrip())
        body = self._length - self._run
        if body > self.limit:
            self._cut(body, out)
        if self._run >= 3 * self.limit:
            self._shorten_run()

    def _end_line(self, out: list[str]) -> None:
        if self.rule == "line" or self._blank_line:
            self._end_paragraph(out)
        else:  # blank_line: a line of a hard-wrapped paragraph, joined to the next by a space
            self._extend(" ", out)
        self._blank_line = True

    def _end_paragraph(self, out: list[str]) -> None:
        if self._length > self._run:
            out.append("".join(self._parts)[: self._length - self._run])
        self._parts, self._length, self._run = [], 0, 0

    def _cut(self, body: int, out: list[str]) -> None:
        """Cut off the pieces `cut_long` would: the paragraph is longer than `body` > limit."""
        paragraph = "".join(self._parts)
        while body > self.limit:
            cut = _cut_point(paragraph, self.limit)
            out.append(paragraph[:cut])
            paragraph = paragraph[cut:]
            body -= cut
        self._parts, self._length = [paragraph], len(paragraph)

    def _shorten_run(self) -> None:
        """Drop whitespace from the middle of the trailing run, a multiple of `limit` of it."""
        limit = self.limit
        paragraph = "".join(self._parts)
        body = self._length - self._run
        tail = limit + self._run % limit
        paragraph = paragraph[: body + limit] + paragraph[-tail:]
        self._parts, self._length, self._run = [paragraph], len(paragraph), limit + tail


def train_punkt(paragraphs: Iterable[str]) -> PunktParameters:
    """Learn abbreviations, collocations and sentence starters from the corpus itself."""
    trainer = PunktTrainer()
    trainer.train("\n\n".join(paragraphs), finalize=True)
    return trainer.get_params()


def punkt_to_dict(params: PunktParameters) -> dict[str, Any]:
    """A JSON-able, deterministic (sorted) form of Punkt's learned parameters."""
    return {
        "abbrev_types": sorted(params.abbrev_types),
        "collocations": sorted([a, b] for a, b in params.collocations),
        "sent_starters": sorted(params.sent_starters),
        "ortho_context": dict(sorted(params.ortho_context.items())),
    }


def punkt_from_dict(data: Mapping[str, Any]) -> PunktParameters:
    params = PunktParameters()
    params.abbrev_types = set(data["abbrev_types"])
    params.collocations = {(a, b) for a, b in data["collocations"]}
    params.sent_starters = set(data["sent_starters"])
    for word, flags in data["ortho_context"].items():
        params.ortho_context[word] = int(flags)
    return params


@dataclass
class TextTokenizer:
    """Raw text -> sentences -> word tokens, exactly as the training data was made."""

    punkt: PunktParameters
    lowercase: bool = True
    paragraphs: ParagraphRule = "line"

    def __post_init__(self) -> None:
        self._splitter = PunktSentenceTokenizer(self.punkt)

    def sentences(self, text: str) -> Iterator[list[str]]:
        """Yield each sentence of `text` as a list of word tokens (no EOS)."""
        pieces = (p for par in split_paragraphs(text, self.paragraphs) for p in cut_long(par))
        for piece in pieces:
            yield from self.piece_sentences(piece)

    def piece_sentences(self, piece: str) -> Iterator[list[str]]:
        """The sentences of one paragraph piece (at most MAX_PARAGRAPH_CHARS characters)."""
        for sentence in self._splitter.tokenize(piece):
            words = _WORD_TOKENIZER.tokenize(sentence.lower() if self.lowercase else sentence)
            if words:
                yield words

    def stream_sentences(self, chunks: Iterable[bytes], name: str = "input") -> Iterator[list[str]]:
        """The sentences of a byte stream (a file read in chunks), as `sentences` gives them
        for its decoded text, holding one paragraph piece at a time (see `decode_stream` for
        how a stream longer than SNIFF_BYTES is decoded)."""
        splitter = PieceSplitter(self.paragraphs)
        for text in decode_stream(chunks, name):
            for piece in splitter.feed(text):
                yield from self.piece_sentences(piece)
        for piece in splitter.close():
            yield from self.piece_sentences(piece)

    def words(self, text: str) -> list[str]:
        """Tokens of a text fragment (a prompt) without sentence splitting or EOS."""
        text = " ".join(text.split())
        return _WORD_TOKENIZER.tokenize(text.lower() if self.lowercase else text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lowercase": self.lowercase,
            "paragraphs": self.paragraphs,
            "punkt": punkt_to_dict(self.punkt),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextTokenizer:
        return cls(
            punkt=punkt_from_dict(data["punkt"]),
            lowercase=bool(data["lowercase"]),
            paragraphs=data["paragraphs"],
        )


def with_eos(sentences: Iterable[Sequence[str]]) -> Iterator[str]:
    """Flatten sentences into one token stream, each sentence closed by EOS."""
    for sentence in sentences:
        yield from sentence
        yield EOS


def encode(tokens: Iterable[str], vocab: Mapping[str, int]) -> np.ndarray:
    """Token strings -> int32 ids; words outside the vocabulary become `<unk>`."""
    get = vocab.get
    return np.fromiter((get(t, UNK_ID) for t in tokens), dtype=np.int32)


def decode(ids: Iterable[int], itos: Sequence[str]) -> list[str]:
    return [itos[int(i)] for i in ids]


def detokenize(tokens: Sequence[str]) -> str:
    """Readable text from word tokens: EOS ends a sentence, the next one is capitalised."""
    sentences: list[list[str]] = [[]]
    for token in tokens:
        if token == EOS:
            sentences.append([])
        else:
            sentences[-1].append(token)
    out = []
    for words in sentences:
        if not words:
            continue
        sentence = _DETOKENIZER.detokenize(words)
        out.append(sentence[:1].upper() + sentence[1:])
    return " ".join(out)
