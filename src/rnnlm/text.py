"""Text -> tokens -> ids, shared by the `tokenize` stage and the torch-free inference path.

A `TextTokenizer` holds everything needed to turn raw text into the token stream the model was
trained on: the paragraph rule, a Punkt sentence splitter trained on the corpus (NLTK's
pretrained punkt models are not required), NLTK's word tokenizer and the lowercase flag. It
serialises to a plain JSON-able dict, so the tokenizer travels inside the ONNX model's metadata.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from nltk.tokenize.destructive import NLTKWordTokenizer
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer, PunktTrainer
from nltk.tokenize.treebank import TreebankWordDetokenizer

from rnnlm.streams import EOS, UNK_ID

ParagraphRule = Literal["line", "blank_line"]

_BLANK_LINES = re.compile(r"\n\s*\n")
# Punkt scans a paragraph with one regex that NLTK runs under a 5 s wall-clock budget
# (nltk.redos); a period-dense paragraph of a few hundred kB exhausts it (TimeoutError), so
# longer paragraphs are cut into pieces of at most this many characters first.
MAX_PARAGRAPH_CHARS = 50_000
_UP_TO_LAST_SPACE = re.compile(r".*\s", re.DOTALL)
_WORD_TOKENIZER = NLTKWordTokenizer()
_DETOKENIZER = TreebankWordDetokenizer()


def decode_document(data: bytes) -> str:
    """Decode a corpus file: UTF-8 (with or without BOM) when valid, else Latin-1."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


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


def cut_long(paragraph: str, limit: int = MAX_PARAGRAPH_CHARS) -> list[str]:
    """`paragraph` in pieces of at most `limit` characters, cut after whitespace when the last
    half of a piece has some (a sentence then ends at the cut), else mid-word."""
    pieces = []
    while len(paragraph) > limit:
        space = _UP_TO_LAST_SPACE.match(paragraph, 0, limit)
        cut = space.end() if space and space.end() > limit // 2 else limit
        pieces.append(paragraph[:cut])
        paragraph = paragraph[cut:]
    return [*pieces, paragraph]


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
            for sentence in self._splitter.tokenize(piece):
                words = _WORD_TOKENIZER.tokenize(sentence.lower() if self.lowercase else sentence)
                if words:
                    yield words

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
