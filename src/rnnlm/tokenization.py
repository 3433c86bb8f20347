"""Stage `tokenize`: data/raw/<corpus>/ -> data/processed/.

Reads every document of the corpus, splits its text into train/validation/test, trains a Punkt
sentence splitter on the training text, word-tokenizes with NLTK, builds the vocabulary from the
training split and writes:

    vocab.json        token list in id order (`<unk>` = 0, `<eos>` = 1, then by frequency)
    tokenizer.json    the TextTokenizer (lowercase flag, paragraph rule, Punkt parameters)
    splits.json       the rule that ran (`split_by`) and the documents each split holds text of;
                      under `span`, also where each span lies in its document (`spans`)
    train.npy, validation.npy, test.npy   int32 token ids, each sentence closed by `<eos>`
    stats.json        the rule that ran; documents, spans, sentences, tokens, OOV rate per
                      split; vocabulary size

The split rule (`tokenize.split_by`) numbers documents or spans; number i goes to test when
i % split_every == test_remainder, to validation when it is val_remainder, to train otherwise.

- `document`: documents in name order. A corpus that leaves a split without a document
  (fewer than 10 by default) is refused.
- `span`: each document's text is cut into split_every contiguous spans, numbered in reading
  order. Every document long enough gives text to every split; no text is in two splits and no
  sentence crosses from one split to another. Cuts fall where a paragraph begins (paragraphs as
  `split_paragraphs` finds them under `tokenize.paragraphs`), the one nearest to k * length /
  split_every characters for cut k, each span holding at least one paragraph. A document with
  fewer paragraphs than split_every may also be cut where a sentence begins. Those places come
  from a Punkt model trained on the whole corpus and used for nothing else: cuts must be placed
  before the training text is known, and untrained Punkt would end a sentence at every
  abbreviation ("Mr."). The Punkt model that tokenizes (tokenizer.json) is still trained on the
  training spans alone, so nothing of validation or test reaches the tokenizer or the
  vocabulary. A document with fewer sentences than split_every fills first the splits that the
  documents before it (in name order) left empty, so any corpus of 3 sentences or more splits.
- `auto` (the default): `document` when every split gets a document that way, else `span`.

A span is a character range of the document's text (rnnlm.text.join_paragraphs): its
paragraphs joined by a line end (`line`) or a blank line (`blank_line`), which has the same
paragraphs, and so the same sentences and tokens, as the document itself.

Run via `dvc repro tokenize`, or directly: `python -m rnnlm.tokenization [--params params.yaml]`.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rnnlm.config import SPLITS, Params, Paths, SplitRule, TokenizeParams
from rnnlm.errors import RnnlmError
from rnnlm.files import (
    save_npy_atomic,
    staged_files,
    write_json_atomic,
)
from rnnlm.stage import stage_main
from rnnlm.streams import SPECIAL_TOKENS, split_stats
from rnnlm.text import (
    PARAGRAPH_SEPARATORS,
    ParagraphRule,
    PunktSentenceTokenizer,
    TextTokenizer,
    cut_long,
    decode_document,
    encode,
    join_paragraphs,
    split_paragraphs,
    train_punkt,
    with_eos,
)

log = logging.getLogger(__name__)

# Every file the stage writes into processed_dir (dvc.yaml declares the same list).
OUTPUTS = (
    "vocab.json",
    "tokenizer.json",
    "splits.json",
    *(f"{split}.npy" for split in SPLITS),
    "stats.json",
)
# Files in NLTK corpus packages that describe the corpus rather than belong to it.
NON_DOCUMENTS = frozenset({"README", "README.txt", "LICENSE", "LICENSE.txt", "CONTENTS"})


class TokenizeError(RnnlmError):
    """The raw corpus cannot be tokenized (missing, empty, or too small to split)."""


@dataclass(frozen=True)
class Span:
    """Characters [start, end) of a document's text (`join_paragraphs` of its paragraphs), and
    the split they go to."""

    document: str
    split: str
    start: int
    end: int
    index: int | None = None  # its number among the document's spans (rule `span`)


def list_documents(corpus_dir: Path) -> list[Path]:
    """Corpus documents sorted by relative path; README-like files and dotfiles are skipped."""
    if not corpus_dir.is_dir():
        raise TokenizeError(f"{corpus_dir}: corpus folder not found (run the download stage)")
    docs = sorted(
        (
            f
            for f in corpus_dir.rglob("*")
            if f.is_file() and f.name not in NON_DOCUMENTS and not f.name.startswith(".")
        ),
        key=lambda f: f.relative_to(corpus_dir).as_posix(),
    )
    if not docs:
        raise TokenizeError(f"{corpus_dir}: no documents found")
    return docs


def split_of(index: int, p: TokenizeParams) -> str:
    """Where document or span number `index` goes: i % split_every decides."""
    r = index % p.split_every
    return "test" if r == p.test_remainder else "validation" if r == p.val_remainder else "train"


def first_indices(p: TokenizeParams) -> dict[str, int]:
    """The first number that goes to each split."""
    remainders = (p.val_remainder, p.test_remainder)
    train = min(r for r in range(p.split_every) if r not in remainders)
    return {"train": train, "validation": p.val_remainder, "test": p.test_remainder}


def empty_splits(n_documents: int, p: TokenizeParams) -> list[str]:
    """The splits that the rule `document` leaves without a document."""
    first = first_indices(p)
    return [split for split in SPLITS if first[split] >= n_documents]


def choose_rule(n_documents: int, p: TokenizeParams) -> SplitRule:
    """`tokenize.split_by`, with `auto` resolved: `document` when it fills every split."""
    if p.split_by == "auto":
        return "span" if empty_splits(n_documents, p) else "document"
    return p.split_by


def assign_splits(names: Sequence[str], p: TokenizeParams) -> dict[str, list[str]]:
    """By-document split over names in sorted order: i % every == test/val remainder."""
    empty = empty_splits(len(names), p)
    if empty:
        # Every split is non-empty once the corpus reaches the last of the three first indices.
        raise TokenizeError(
            f"{len(names)} documents leave the {', '.join(empty)} split(s) empty with "
            f"tokenize.split_every = {p.split_every}: the corpus needs at least "
            f"{max(first_indices(p).values()) + 1} documents"
        )
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, name in enumerate(sorted(names)):
        splits[split_of(i, p)].append(name)
    return splits


def unit_starts(
    paragraphs: Sequence[str],
    rule: ParagraphRule,
    sentences: PunktSentenceTokenizer | None = None,
) -> list[int]:
    """Where a span may begin in `join_paragraphs(paragraphs, rule)`, in increasing order: where
    each paragraph begins and, given a sentence splitter, where each sentence begins (the start
    of a `cut_long` piece counts as one: the tokenizer ends a sentence there too)."""
    separator = PARAGRAPH_SEPARATORS[rule]
    starts: list[int] = []
    offset = 0
    for paragraph in paragraphs:
        starts.append(offset)
        if sentences is not None:
            piece_at = offset
            for piece in cut_long(paragraph):
                for begin, _ in sentences.span_tokenize(piece):
                    if piece_at + begin > starts[-1]:
                        starts.append(piece_at + begin)
                piece_at += len(piece)
        offset += len(paragraph) + len(separator)
    return starts


def cut_document(
    starts: Sequence[int], length: int, every: int, filled: Collection[int]
) -> list[tuple[int, int]]:
    """The `every` spans [start, end) of a text of `length` characters whose units (paragraphs
    or sentences) begin at `starts` (increasing, the first at 0).

    Cut k (k = 1 .. every - 1) falls at the unit start nearest to k * length / every (the
    earlier on a tie) that leaves each span in `filled` at least one unit; a span outside
    `filled` gets none when there are no more units than `filled` spans. Needs
    len(filled) <= len(starts).
    """
    n = len(starts)
    needs = [k in filled for k in range(every)]
    if sum(needs) > n:
        raise ValueError(f"{sum(needs)} spans to fill from {n} units")
    bounds = [*starts, length]
    cuts = [0]
    still_needed = sum(needs)  # by the spans from k on
    for k in range(1, every):
        still_needed -= needs[k - 1]
        lo, hi = cuts[-1] + needs[k - 1], n - still_needed
        target = k * length  # compared with bounds[j] * every: integers, no rounding
        at = min(max(bisect.bisect_left(bounds, -(-target // every), lo, hi + 1), lo), hi)
        nearest = [j for j in (at - 1, at) if lo <= j <= hi]
        cuts.append(min(nearest, key=lambda j: (abs(bounds[j] * every - target), j)))
    cuts.append(n)
    return [(bounds[cuts[k]], bounds[cuts[k + 1]]) for k in range(every)]


def spans_to_fill(n_units: int, p: TokenizeParams, covered: Collection[str]) -> list[int]:
    """Which of a document's spans get a unit: all of them when it has enough units, else
    first those of the splits no earlier document reached, then the rest in order."""
    if n_units >= p.split_every:
        return list(range(p.split_every))
    first = first_indices(p)
    order = [first[s] for s in SPLITS if s not in covered]
    order += [first[s] for s in SPLITS if s in covered]
    order += [i for i in range(p.split_every) if i not in order]
    return sorted(order[:n_units])


def document_spans(paragraphs: Mapping[str, Sequence[str]], p: TokenizeParams) -> list[Span]:
    """Rule `document`: each document whole, in the split its place in name order says."""
    splits = assign_splits(list(paragraphs), p)
    return [
        Span(name, split, 0, len(join_paragraphs(paragraphs[name], p.paragraphs)))
        for split in SPLITS
        for name in splits[split]
    ]


def cut_spans(paragraphs: Mapping[str, Sequence[str]], p: TokenizeParams) -> list[Span]:
    """Rule `span`: each document (in name order) cut into `split_every` spans (module
    docstring); empty spans are left out."""
    sentences = None
    if any(len(paras) < p.split_every for paras in paragraphs.values()):
        # Only to place cuts inside documents of few paragraphs (module docstring).
        corpus = (para for paras in paragraphs.values() for para in paras)
        sentences = PunktSentenceTokenizer(train_punkt(corpus))
    spans: list[Span] = []
    covered: set[str] = set()
    for name in sorted(paragraphs):
        paras = paragraphs[name]
        starts = unit_starts(paras, p.paragraphs, sentences if len(paras) < p.split_every else None)
        length = len(join_paragraphs(paras, p.paragraphs))
        filled = spans_to_fill(len(starts), p, covered)
        for i, (start, end) in enumerate(cut_document(starts, length, p.split_every, filled)):
            if start < end:
                spans.append(Span(name, split_of(i, p), start, end, i))
                covered.add(split_of(i, p))
    return spans


def splits_record(rule: SplitRule, spans: Sequence[Span]) -> dict[str, object]:
    """splits.json: the rule, each split's documents (sorted) and, under `span`, its spans."""
    record: dict[str, object] = {"split_by": rule}
    for split in SPLITS:
        record[split] = sorted({s.document for s in spans if s.split == split})
    if rule == "span":
        record["spans"] = {
            split: [
                {"document": s.document, "span": s.index, "start": s.start, "end": s.end}
                for s in spans
                if s.split == split
            ]
            for split in SPLITS
        }
    return record


def build_vocab(counts: Counter[str], min_freq: int, max_size: int) -> list[str]:
    """Special tokens, then words seen >= min_freq times, most frequent first (ties: A-Z)."""
    words = [w for w, c in counts.items() if c >= min_freq and w not in SPECIAL_TOKENS]
    words.sort(key=lambda w: (-counts[w], w))
    return [*SPECIAL_TOKENS, *words[: max_size - len(SPECIAL_TOKENS)]]


def too_small(corpus_name: str, rule: SplitRule, empty: Sequence[str], n_spans: int) -> str:
    """The one line that says some split got no words, and what the corpus would need."""
    empty_text = ", ".join(empty)
    if rule == "document":
        return (
            f"corpus {corpus_name!r}: the {empty_text} split(s) get no words: their documents "
            "are empty (tokenize.split_by = document)"
        )
    # Only documents of fewer units than spans leave a split empty: one unit a span.
    return (
        f"corpus {corpus_name!r} is too small to split: its {n_spans} sentence(s) leave the "
        f"{empty_text} split(s) empty; split within documents (tokenize.split_by = span), it "
        "needs at least 3 sentences"
    )


def run(p: TokenizeParams, paths: Paths, corpus_name: str) -> dict[str, object]:
    """Tokenize `paths.raw_dir / corpus_name` into `paths.processed_dir`; return the stats
    (`split_by` says which split rule ran)."""
    start = time.perf_counter()
    corpus_dir = paths.raw_dir / corpus_name
    files = list_documents(corpus_dir)
    paragraphs = {
        f.relative_to(corpus_dir).as_posix(): split_paragraphs(
            decode_document(f.read_bytes()), p.paragraphs
        )
        for f in files
    }
    texts = {name: join_paragraphs(paras, p.paragraphs) for name, paras in paragraphs.items()}
    rule = choose_rule(len(files), p)
    spans = document_spans(paragraphs, p) if rule == "document" else cut_spans(paragraphs, p)
    by_split = {split: [s for s in spans if s.split == split] for split in SPLITS}

    def span_texts(split: str) -> Iterable[str]:
        return (texts[s.document][s.start : s.end] for s in by_split[split])

    train_paragraphs = (
        para for text in span_texts("train") for para in split_paragraphs(text, p.paragraphs)
    )
    tokenizer = TextTokenizer(train_punkt(train_paragraphs), p.lowercase, p.paragraphs)
    tokens = {
        split: list(with_eos(s for text in span_texts(split) for s in tokenizer.sentences(text)))
        for split in SPLITS
    }
    empty = [split for split in SPLITS if not tokens[split]]
    if empty:
        raise TokenizeError(too_small(corpus_name, rule, empty, len(spans)))
    counts = Counter(t for t in tokens["train"])
    vocab = build_vocab(counts, p.min_freq, p.max_size)
    stoi = {w: i for i, w in enumerate(vocab)}
    encoded = {split: encode(toks, stoi) for split, toks in tokens.items()}

    stats: dict[str, object] = {"split_by": rule}
    for split in SPLITS:
        # `documents`: those the split has text of; `spans`: the pieces of them it has (under
        # the rule `document`, each document is one span).
        n_documents = len({s.document for s in by_split[split]})
        stats[split] = {**split_stats(encoded[split], n_documents), "spans": len(by_split[split])}
    stats["vocab_size"] = len(vocab)

    # Everything is computed before anything is written; files land together at the end.
    with staged_files(paths.processed_dir) as tmp:
        write_json_atomic(tmp / "vocab.json", {"tokens": vocab})
        write_json_atomic(tmp / "tokenizer.json", tokenizer.to_dict())
        write_json_atomic(tmp / "splits.json", splits_record(rule, spans))
        for split in SPLITS:
            save_npy_atomic(tmp / f"{split}.npy", encoded[split])
        write_json_atomic(tmp / "stats.json", stats)
    log.info(
        "tokenized %d documents split by %s in %.1fs: %s tokens (train/validation/test), "
        "vocabulary %d",
        len(files),
        rule,
        time.perf_counter() - start,
        "/".join(str(stats[s]["tokens"]) for s in SPLITS),  # type: ignore[index]
        len(vocab),
    )
    return stats


def run_from_params(params: Params) -> dict[str, object]:
    return run(params.tokenize, params.paths, params.corpus.name)


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, lambda params, args: run_from_params(params), argv)


if __name__ == "__main__":
    main()
