"""Stage `tokenize`: data/raw/<corpus>/ -> data/processed/.

Reads every document of the corpus, splits them into train/validation/test by document, trains a
Punkt sentence splitter on the training text, word-tokenizes with NLTK, builds the vocabulary from
the training split and writes:

    vocab.json        token list in id order (`<unk>` = 0, `<eos>` = 1, then by frequency)
    tokenizer.json    the TextTokenizer (lowercase flag, paragraph rule, Punkt parameters)
    splits.json       which document went to which split
    train.npy, validation.npy, test.npy   int32 token ids, each sentence closed by `<eos>`
    stats.json        documents, sentences, tokens, OOV rate per split; vocabulary size

Run via `dvc repro tokenize`, or directly: `python -m rnnlm.tokenization [--params params.yaml]`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from rnnlm.config import SPLITS, Params, Paths, TokenizeParams
from rnnlm.errors import RnnlmError
from rnnlm.files import (
    save_npy_atomic,
    staged_files,
    write_json_atomic,
)
from rnnlm.stage import stage_main
from rnnlm.streams import SPECIAL_TOKENS, split_stats
from rnnlm.text import (
    TextTokenizer,
    decode_document,
    encode,
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


def assign_splits(names: Sequence[str], p: TokenizeParams) -> dict[str, list[str]]:
    """By-document split over names in sorted order: i % every == test/val remainder."""
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    remainders = (p.val_remainder, p.test_remainder)
    for i, name in enumerate(sorted(names)):
        r = i % p.split_every
        split = (
            "test" if r == p.test_remainder else "validation" if r == p.val_remainder else "train"
        )
        splits[split].append(name)
    empty = [s for s in SPLITS if not splits[s]]
    if empty:
        # Every split is non-empty once the corpus reaches the last of the three first indices.
        first_train = min(r for r in range(p.split_every) if r not in remainders)
        raise TokenizeError(
            f"{len(names)} documents leave the {', '.join(empty)} split(s) empty with "
            f"tokenize.split_every = {p.split_every}: the corpus needs at least "
            f"{max(*remainders, first_train) + 1} documents"
        )
    return splits


def build_vocab(counts: Counter[str], min_freq: int, max_size: int) -> list[str]:
    """Special tokens, then words seen >= min_freq times, most frequent first (ties: A-Z)."""
    words = [w for w, c in counts.items() if c >= min_freq and w not in SPECIAL_TOKENS]
    words.sort(key=lambda w: (-counts[w], w))
    return [*SPECIAL_TOKENS, *words[: max_size - len(SPECIAL_TOKENS)]]


def tokenize_documents(
    texts: Mapping[str, str], tokenizer: TextTokenizer
) -> dict[str, list[list[str]]]:
    return {name: list(tokenizer.sentences(text)) for name, text in texts.items()}


def flatten(sentences_by_doc: Iterable[list[list[str]]]) -> list[str]:
    return list(with_eos(s for doc in sentences_by_doc for s in doc))


def run(p: TokenizeParams, paths: Paths, corpus_name: str) -> dict[str, object]:
    """Tokenize `paths.raw_dir / corpus_name` into `paths.processed_dir`; return the stats."""
    start = time.perf_counter()
    corpus_dir = paths.raw_dir / corpus_name
    files = list_documents(corpus_dir)
    texts = {f.relative_to(corpus_dir).as_posix(): decode_document(f.read_bytes()) for f in files}
    splits = assign_splits(list(texts), p)

    train_paragraphs = (
        para for name in splits["train"] for para in split_paragraphs(texts[name], p.paragraphs)
    )
    tokenizer = TextTokenizer(train_punkt(train_paragraphs), p.lowercase, p.paragraphs)
    tokens = {
        split: flatten(tokenize_documents({n: texts[n] for n in names}, tokenizer).values())
        for split, names in splits.items()
    }
    counts = Counter(t for t in tokens["train"])
    vocab = build_vocab(counts, p.min_freq, p.max_size)
    stoi = {w: i for i, w in enumerate(vocab)}
    encoded = {split: encode(toks, stoi) for split, toks in tokens.items()}

    stats: dict[str, object] = {
        split: split_stats(encoded[split], len(splits[split])) for split in SPLITS
    }
    stats["vocab_size"] = len(vocab)

    # Everything is computed before anything is written; files land together at the end.
    with staged_files(paths.processed_dir) as tmp:
        write_json_atomic(tmp / "vocab.json", {"tokens": vocab})
        write_json_atomic(tmp / "tokenizer.json", tokenizer.to_dict())
        write_json_atomic(tmp / "splits.json", splits)
        for split in SPLITS:
            save_npy_atomic(tmp / f"{split}.npy", encoded[split])
        write_json_atomic(tmp / "stats.json", stats)
    log.info(
        "tokenized %d documents in %.1fs: %s tokens (train/validation/test), vocabulary %d",
        len(files),
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
