"""Stage `tokenize` and text.py: decoding, paragraphs, Punkt, vocabulary, splits, the stage's files.

Pure helpers are tested on hand-made inputs; `run` and `main` on the synthetic `tinycorpus`
(20 documents and a README), and the split rules on small "marked" corpora (1 to 12 documents,
flat or in category folders, UTF-8 and Latin-1, LF and CRLF) whose every sentence starts with
its own marker word `qa<n>` and ends with `qz<n>`, with every path under tmp_path.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

from rnnlm import tokenization
from rnnlm.config import ConfigError, Params, Paths
from rnnlm.files import WriteError, describe_os_error
from rnnlm.streams import EOS, EOS_ID, SPECIAL_TOKENS, UNK, UNK_ID
from rnnlm.text import (
    TextTokenizer,
    decode,
    decode_document,
    detokenize,
    encode,
    join_paragraphs,
    split_paragraphs,
    train_punkt,
    with_eos,
)
from rnnlm.tokenization import (
    SPLITS,
    TokenizeError,
    assign_splits,
    build_vocab,
    choose_rule,
    cut_document,
    list_documents,
    spans_to_fill,
    unit_starts,
)
from tests.fixtures import (
    LATIN1_DOC,
    README,
    TINY_ID,
    encode_docs,
    fill_disk,
    params_with,
    paths_under,
    shipped_params,
    write_files,
    write_params,
)

SHIPPED = shipped_params()

OUTPUTS = tokenization.OUTPUTS
NAMES = ["Smith", "Jones", "Brown", "Green", "White"]
NOUNS = ["people", "river", "city", "farmer", "school", "bridge"]
VERBS = ["saw", "built", "liked", "helped"]


def punkt_training_paragraphs(seed: int = 0) -> list[str]:
    """Paragraphs where "Mr." always precedes a name and every noun also occurs mid-sentence."""
    rng = random.Random(seed)

    def sentence() -> str:
        if rng.random() < 0.5:
            return f"Mr. {rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}."
        return f"The {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}."

    return [" ".join(sentence() for _ in range(4)) for _ in range(60)]


def read_outputs(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in OUTPUTS}


def load_split(paths_dir: Path, split: str) -> np.ndarray:
    return np.load(paths_dir / f"{split}.npy", allow_pickle=False)


def tiny_doc_names(docs: dict[str, str]) -> list[str]:
    return sorted(name for name in docs if name != README)


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders that a staged write left behind in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# decode_document


def test_decode_utf8() -> None:
    assert decode_document("café naïve – ok\n".encode()) == "café naïve – ok\n"


def test_decode_utf8_bom_is_dropped() -> None:
    assert decode_document(b"\xef\xbb\xbf" + "naïve\n".encode()) == "naïve\n"


def test_decode_latin1_fallback() -> None:
    data = "café naïve\n".encode("latin-1")
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    assert decode_document(data) == "café naïve\n"


def test_decode_normalises_line_endings() -> None:
    assert decode_document(b"one\r\ntwo\rthree\n\r\nfour") == "one\ntwo\nthree\n\nfour"
    assert decode_document("café\r\n".encode("latin-1")) == "café\n"


# split_paragraphs


def test_split_paragraphs_line_rule() -> None:
    text = "First line here.\n\n  Second line.  \nThird.\n \t\n"
    assert split_paragraphs(text, "line") == ["First line here.", "Second line.", "Third."]


def test_split_paragraphs_blank_line_rule_joins_wrapped_lines() -> None:
    text = "A wrapped\nparagraph here.\n\n\nSecond one\n  \t \nthird\nparagraph\n\n"
    assert split_paragraphs(text, "blank_line") == [
        "A wrapped paragraph here.",
        "Second one",
        "third paragraph",
    ]


def test_split_paragraphs_empty_text() -> None:
    assert split_paragraphs("\n\n  \n", "line") == []
    assert split_paragraphs("", "blank_line") == []


# Punkt and TextTokenizer


def test_punkt_learns_abbreviation_and_keeps_it_inside_a_sentence() -> None:
    params = train_punkt(punkt_training_paragraphs())
    assert "mr" in params.abbrev_types
    assert not set(NOUNS) & params.abbrev_types  # ordinary sentence ends are not abbreviations
    text = "Mr. Green saw the river. The city liked the people. Mr. Brown built the bridge."
    assert list(TextTokenizer(params).sentences(text)) == [
        ["mr.", "green", "saw", "the", "river", "."],
        ["the", "city", "liked", "the", "people", "."],
        ["mr.", "brown", "built", "the", "bridge", "."],
    ]


def test_untrained_punkt_splits_after_mr() -> None:
    """The contrast: without training, "Mr." ends a sentence, so training is what keeps it."""
    sentences = list(TextTokenizer(PunktParameters()).sentences("Mr. Green saw the river."))
    assert sentences[0] == ["mr", "."]


def test_punkt_on_tiny_corpus_learns_its_abbreviations(tiny_docs: dict[str, str]) -> None:
    paragraphs = [
        p for name in tiny_doc_names(tiny_docs) for p in split_paragraphs(tiny_docs[name], "line")
    ]
    params = train_punkt(paragraphs)
    assert {"mr", "mrs", "dr", "u.s"} <= params.abbrev_types
    tokenizer = TextTokenizer(params)
    assert list(tokenizer.sentences("Dr. Smith said that we will help the nation. We met.")) == [
        ["dr.", "smith", "said", "that", "we", "will", "help", "the", "nation", "."],
        ["we", "met", "."],
    ]


def test_sentences_never_cross_paragraphs() -> None:
    tokenizer = TextTokenizer(train_punkt(punkt_training_paragraphs()), paragraphs="line")
    assert list(tokenizer.sentences("The city saw\nthe river.")) == [
        ["the", "city", "saw"],
        ["the", "river", "."],
    ]
    joined = dataclasses.replace(tokenizer, paragraphs="blank_line")
    assert list(joined.sentences("The city saw\nthe river.")) == [
        ["the", "city", "saw", "the", "river", "."]
    ]


def test_lowercase_flag() -> None:
    params = train_punkt(punkt_training_paragraphs())
    assert list(TextTokenizer(params, lowercase=False).sentences("Mr. Green saw Paris.")) == [
        ["Mr.", "Green", "saw", "Paris", "."]
    ]
    assert TextTokenizer(params).words("  Mr.\n Green's  CAFÉ ") == ["mr.", "green", "'s", "café"]


def test_tokenizer_round_trips_through_dict_and_json(tiny_docs: dict[str, str]) -> None:
    names = tiny_doc_names(tiny_docs)
    paragraphs = [p for n in names for p in split_paragraphs(tiny_docs[n], "blank_line")]
    original = TextTokenizer(train_punkt(paragraphs), lowercase=False, paragraphs="blank_line")
    data = original.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
    restored = TextTokenizer.from_dict(json.loads(json.dumps(data)))
    assert (restored.lowercase, restored.paragraphs) == (False, "blank_line")
    assert restored.to_dict() == data
    for name in names:
        assert list(restored.sentences(tiny_docs[name])) == list(
            original.sentences(tiny_docs[name])
        )


def test_tokenizer_dict_is_deterministic() -> None:
    first = TextTokenizer(train_punkt(punkt_training_paragraphs())).to_dict()
    second = TextTokenizer(train_punkt(punkt_training_paragraphs())).to_dict()
    assert json.dumps(first) == json.dumps(second)
    assert first["punkt"]["abbrev_types"] == sorted(first["punkt"]["abbrev_types"])


# Vocabulary, encoding, splits


def test_vocab_specials_come_first() -> None:
    assert SPECIAL_TOKENS == (UNK, EOS) == ("<unk>", "<eos>")
    assert (UNK_ID, EOS_ID) == (0, 1)
    vocab = build_vocab(Counter({"the": 5, EOS: 9, UNK: 3}), min_freq=1, max_size=100)
    assert vocab == [UNK, EOS, "the"]  # specials seen in the stream are not listed twice


def test_vocab_min_freq() -> None:
    counts = Counter({"a": 3, "b": 2, "c": 1})
    assert build_vocab(counts, min_freq=2, max_size=100) == [UNK, EOS, "a", "b"]
    assert build_vocab(counts, min_freq=1, max_size=100) == [UNK, EOS, "a", "b", "c"]
    assert build_vocab(counts, min_freq=4, max_size=100) == [UNK, EOS]


def test_vocab_order_is_frequency_then_alphabetical() -> None:
    counts = Counter({"pear": 2, "apple": 2, "zoo": 7, "Zed": 2, "fig": 3})
    assert build_vocab(counts, 1, 100) == [UNK, EOS, "zoo", "fig", "Zed", "apple", "pear"]
    reordered = Counter(dict(reversed(list(counts.items()))))
    assert build_vocab(reordered, 1, 100) == build_vocab(counts, 1, 100)


def test_vocab_max_size_counts_specials() -> None:
    counts = Counter({"a": 5, "b": 4, "c": 3, "d": 2})
    assert build_vocab(counts, 1, max_size=4) == [UNK, EOS, "a", "b"]
    assert len(build_vocab(counts, 1, max_size=3)) == 3


def test_encode_decode_round_trip_with_unknown_words() -> None:
    vocab = [UNK, EOS, "the", "people", "met"]
    stoi = {w: i for i, w in enumerate(vocab)}
    tokens = ["the", "people", "met", "zebras", EOS, "the", "Met", EOS]
    ids = encode(tokens, stoi)
    assert ids.dtype == np.int32
    assert ids.tolist() == [2, 3, 4, UNK_ID, EOS_ID, 2, UNK_ID, EOS_ID]
    assert decode(ids, vocab) == ["the", "people", "met", UNK, EOS, "the", UNK, EOS]
    known = ["met", "the", EOS, "people"]
    assert decode(encode(known, stoi), vocab) == known
    assert encode([], stoi).shape == (0,)


def test_with_eos_closes_every_sentence() -> None:
    assert list(with_eos([["a", "b"], ["c"]])) == ["a", "b", EOS, "c", EOS]
    assert list(with_eos([])) == []


def test_detokenize() -> None:
    tokens = ["we", "built", "it", ".", EOS, "did", "we", "?", EOS, "yes"]
    assert detokenize(tokens) == "We built it. Did we? Yes"


def test_assign_splits_rule_on_sorted_names() -> None:
    names = [f"doc{i:02d}.txt" for i in range(25)]
    shuffled = random.Random(1).sample(names, len(names))
    splits = assign_splits(shuffled, SHIPPED.tokenize)
    assert splits["test"] == ["doc09.txt", "doc19.txt"]
    assert splits["validation"] == ["doc08.txt", "doc18.txt"]
    assert splits["train"] == [
        n
        for n in names
        if n
        not in {"doc08.txt", "doc09.txt"}
        | {
            "doc18.txt",
            "doc19.txt",
        }
    ]
    assert list(splits) == list(SPLITS)


@pytest.mark.parametrize("n_docs", [3, 7, 10, 31, 65])
@pytest.mark.parametrize(("every", "val", "test"), [(10, 8, 9), (5, 0, 4), (3, 1, 2)])
def test_assign_splits_disjoint_and_covering(n_docs: int, every: int, val: int, test: int) -> None:
    p = dataclasses.replace(
        SHIPPED.tokenize, split_every=every, val_remainder=val, test_remainder=test
    )
    names = [f"{i:03d}.txt" for i in range(n_docs)]
    if n_docs < max(val, test) + 1:
        with pytest.raises(TokenizeError):
            assign_splits(names, p)
        return
    splits = assign_splits(names, p)
    all_names = [n for s in SPLITS for n in splits[s]]
    assert sorted(all_names) == names  # covers everything, no name twice
    for split in SPLITS:
        assert splits[split] and splits[split] == sorted(splits[split])
    assert all(names.index(n) % every == test for n in splits["test"])
    assert all(names.index(n) % every == val for n in splits["validation"])


@pytest.mark.parametrize(
    ("n_docs", "empty"), [(9, "test"), (8, "validation, test"), (0, "train, validation, test")]
)
def test_assign_splits_too_few_documents(n_docs: int, empty: str) -> None:
    names = [f"{i}.txt" for i in range(n_docs)]
    with pytest.raises(TokenizeError, match="at least 10 documents") as err:
        assign_splits(names, SHIPPED.tokenize)
    assert f"{n_docs} documents leave the {empty}" in str(err.value)


def test_assign_splits_minimum_counts_the_train_split() -> None:
    """With val 0 and test 1, index 2 is the first train document: 3 documents are needed."""
    p = dataclasses.replace(SHIPPED.tokenize, split_every=3, val_remainder=0, test_remainder=1)
    with pytest.raises(TokenizeError, match=r"leave the train split.*at least 3 documents"):
        assign_splits(["a", "b"], p)
    assert assign_splits(["a", "b", "c"], p) == {"train": ["c"], "validation": ["a"], "test": ["b"]}


def test_list_documents_skips_readme_and_dotfiles(tmp_path: Path) -> None:
    corpus = write_files(
        tmp_path / "c",
        {"b.txt": b"b", "a.txt": b"a", README: b"r", "LICENSE": b"l", ".hidden": b"h"},
    )
    write_files(corpus / "sub", {"c.txt": b"c"})
    docs = list_documents(corpus)
    assert [d.relative_to(corpus).as_posix() for d in docs] == ["a.txt", "b.txt", "sub/c.txt"]
    with pytest.raises(TokenizeError, match="no documents found"):
        list_documents(write_files(tmp_path / "only_readme", {README: b"r"}))


# The stage: run() and main()


def test_run_writes_every_output(processed_tiny: Params, tiny_docs: dict[str, str]) -> None:
    out = processed_tiny.paths.processed_dir
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    splits = json.loads((out / "splits.json").read_text())
    # 20 documents: the rule `auto` splits by document, and splits.json is as it always was
    # (one list of document names per split) plus the rule.
    assert set(splits) == {"split_by", *SPLITS} and splits["split_by"] == "document"
    documents = [n for s in SPLITS for n in splits[s]]
    assert sorted(documents) == tiny_doc_names(tiny_docs)  # README is not a document
    assert len(documents) == 20
    names = tiny_doc_names(tiny_docs)
    assert splits["test"] == [names[9], names[19]]
    assert splits["validation"] == [names[8], names[18]]
    vocab = json.loads((out / "vocab.json").read_text())["tokens"]
    assert vocab[:2] == [UNK, EOS] and len(set(vocab)) == len(vocab)
    assert "document" not in vocab  # a README-only word (twice there, so not just rare)
    assert "café" in vocab  # from the Latin-1 document, decoded correctly
    assert LATIN1_DOC in splits["train"]


def test_run_stats_match_the_arrays(processed_tiny: Params) -> None:
    out = processed_tiny.paths.processed_dir
    stats = json.loads((out / "stats.json").read_text())
    vocab = json.loads((out / "vocab.json").read_text())["tokens"]
    splits = json.loads((out / "splits.json").read_text())
    assert stats["vocab_size"] == len(vocab)
    assert stats["split_by"] == "document"
    assert sum(stats[s]["documents"] for s in SPLITS) == 20
    for split in SPLITS:
        ids = load_split(out, split)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert ids.min() >= 0 and ids.max() < len(vocab)
        n_sentences = int((ids == EOS_ID).sum())
        n_words = len(ids) - n_sentences
        assert stats[split] == {
            "documents": len(splits[split]),
            "spans": len(splits[split]),  # each document whole is one span
            "sentences": n_sentences,
            "tokens": len(ids),
            "oov_rate": round(int((ids == UNK_ID).sum()) / n_words, 6),
        }
        assert 0.0 <= stats[split]["oov_rate"] <= 1.0
        assert n_sentences >= 10 * stats[split]["documents"]


def test_run_every_sentence_ends_with_eos(processed_tiny: Params) -> None:
    out = processed_tiny.paths.processed_dir
    for split in SPLITS:
        ids = load_split(out, split)
        assert ids[-1] == EOS_ID and ids[0] != EOS_ID
        eos_at = np.flatnonzero(ids == EOS_ID)
        assert np.all(np.diff(eos_at) > 1)  # no empty sentences


def test_run_vocab_is_ordered_by_train_frequency(processed_tiny: Params) -> None:
    out = processed_tiny.paths.processed_dir
    vocab = json.loads((out / "vocab.json").read_text())["tokens"]
    counts = np.bincount(load_split(out, "train"), minlength=len(vocab))[2:]
    assert np.all(counts >= processed_tiny.tokenize.min_freq)
    assert np.all(np.diff(counts) <= 0)
    words = vocab[2:]
    for i in range(len(words) - 1):
        if counts[i] == counts[i + 1]:
            assert words[i] < words[i + 1]


def test_run_arrays_match_the_saved_tokenizer_and_vocab(processed_tiny: Params) -> None:
    """What inference rebuilds from tokenizer.json + vocab.json gives exactly the training ids."""
    out = processed_tiny.paths.processed_dir
    corpus = processed_tiny.paths.raw_dir / TINY_ID
    tokenizer = TextTokenizer.from_dict(json.loads((out / "tokenizer.json").read_text()))
    vocab = json.loads((out / "vocab.json").read_text())["tokens"]
    stoi = {w: i for i, w in enumerate(vocab)}
    splits = json.loads((out / "splits.json").read_text())
    for split in SPLITS:
        sentences = (
            s
            for name in splits[split]
            for s in tokenizer.sentences(decode_document((corpus / name).read_bytes()))
        )
        expected = encode(with_eos(sentences), stoi)
        np.testing.assert_array_equal(load_split(out, split), expected)


def test_vocab_comes_from_train_only(tiny_params: Params, tiny_docs: dict[str, str]) -> None:
    names = tiny_doc_names(tiny_docs)
    docs = dict(tiny_docs)
    for name in (names[9], names[19]):  # test documents
        docs[name] += "\nZyzzyva zyzzyva zyzzyva.\n"
    for name in (names[8], names[18]):  # validation documents
        docs[name] += "\nQuokka quokka quokka.\n"
    docs[names[0]] += "\nPangolin pangolin.\n"  # train, seen twice: in the vocabulary
    write_files(tiny_params.paths.raw_dir / TINY_ID, encode_docs(docs))
    stats = tokenization.run(tiny_params.tokenize, tiny_params.paths, TINY_ID)
    out = tiny_params.paths.processed_dir
    vocab = json.loads((out / "vocab.json").read_text())["tokens"]
    assert "pangolin" in vocab
    assert "zyzzyva" not in vocab and "quokka" not in vocab
    test_tokens = decode(load_split(out, "test"), vocab)
    assert "zyzzyva" not in test_tokens
    # Each added sentence is "<unk> <unk> <unk> . <eos>" in the encoded test split.
    assert " ".join(test_tokens).count(f"{UNK} {UNK} {UNK} . {EOS}") == 2
    assert stats["test"]["oov_rate"] > 6 / stats["test"]["tokens"]  # type: ignore[index]


def test_run_is_deterministic(processed_tiny: Params, tmp_path: Path) -> None:
    first = read_outputs(processed_tiny.paths.processed_dir)
    again = dataclasses.replace(processed_tiny.paths, processed_dir=tmp_path / "again")
    tokenization.run(processed_tiny.tokenize, again, TINY_ID)
    assert read_outputs(again.processed_dir) == first
    tokenization.run(processed_tiny.tokenize, processed_tiny.paths, TINY_ID)  # in place
    assert read_outputs(processed_tiny.paths.processed_dir) == first


def test_main_in_another_process_gives_identical_files(
    processed_tiny: Params, tmp_path: Path
) -> None:
    """A fresh interpreter with another hash seed (as under `dvc repro`) writes the same bytes."""
    out = tmp_path / "subprocess_out"
    params_file = write_params(
        tmp_path / "sub_params.yaml",
        {
            "paths": {"raw_dir": str(processed_tiny.paths.raw_dir), "processed_dir": str(out)},
            "corpus": {"name": TINY_ID},
        },
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-m", "rnnlm.tokenization", "--params", str(params_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert read_outputs(out) == read_outputs(processed_tiny.paths.processed_dir)


def test_missing_corpus_writes_nothing(tiny_params: Params) -> None:
    with pytest.raises(TokenizeError, match="corpus folder not found") as err:
        tokenization.run(tiny_params.tokenize, tiny_params.paths, TINY_ID)
    assert str(tiny_params.paths.raw_dir / TINY_ID) in str(err.value)
    assert not tiny_params.paths.processed_dir.exists()


def test_failure_keeps_previous_outputs(processed_tiny: Params) -> None:
    out = processed_tiny.paths.processed_dir
    before = read_outputs(out)
    corpus = processed_tiny.paths.raw_dir / TINY_ID
    for doc in sorted(corpus.glob("*.txt"))[5:]:
        doc.unlink()
    by_document = dataclasses.replace(processed_tiny.tokenize, split_by="document")
    with pytest.raises(TokenizeError, match="5 documents leave the validation, test split"):
        tokenization.run(by_document, processed_tiny.paths, TINY_ID)
    assert read_outputs(out) == before
    assert leftovers(out.parent) == []


def test_write_failure_keeps_previous_outputs(
    processed_tiny: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = processed_tiny.paths.processed_dir
    before = read_outputs(out)
    real_save = tokenization.save_npy_atomic

    def failing_save(path: Path, array: np.ndarray) -> None:
        if path.name == "test.npy":
            raise OSError("disk full")
        real_save(path, array)

    monkeypatch.setattr(tokenization, "save_npy_atomic", failing_save)
    params = dataclasses.replace(processed_tiny.tokenize, min_freq=1)  # would change every file
    with pytest.raises(OSError, match="disk full"):
        tokenization.run(params, processed_tiny.paths, TINY_ID)
    assert read_outputs(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    assert leftovers(out.parent) == [] and leftovers(out) == []


NO_SPACE = os.strerror(errno.ENOSPC)


def test_disk_full_mid_file_keeps_previous_outputs(
    processed_tiny: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = processed_tiny.paths.processed_dir
    before = read_outputs(out)
    params = dataclasses.replace(processed_tiny.tokenize, min_freq=1)  # a larger vocabulary
    elsewhere = dataclasses.replace(processed_tiny.paths, processed_dir=tmp_path / "elsewhere")
    tokenization.run(params, elsewhere, TINY_ID)
    new = read_outputs(elsewhere.processed_dir)
    assert new["vocab.json"] != before["vocab.json"] and new["train.npy"] != before["train.npy"]
    # OUTPUTS is in writing order: room for the files before train.npy and half of it.
    first = OUTPUTS[: OUTPUTS.index("train.npy")]
    fill_disk(monkeypatch, out.parent, room=sum(len(new[n]) for n in first) + 1000)
    with pytest.raises(WriteError) as err:
        tokenization.run(params, processed_tiny.paths, TINY_ID)
    assert describe_os_error(err.value) == f"cannot write {out / 'train.npy'}: {NO_SPACE}"
    assert read_outputs(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    assert leftovers(out.parent) == [] and leftovers(out) == []


def test_processed_dir_under_a_regular_file(processed_tiny: Params, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    paths = dataclasses.replace(processed_tiny.paths, processed_dir=blocker / "processed")
    with pytest.raises(WriteError) as err:
        tokenization.run(processed_tiny.tokenize, paths, TINY_ID)
    assert describe_os_error(err.value) == (
        f"cannot write {blocker / 'processed'}: {os.strerror(errno.ENOTDIR)}"
    )
    assert blocker.read_text() == "a file where a folder should be"
    assert leftovers(tmp_path) == []


def _write_params(
    tmp_path: Path, corpus_name: str, tokenize: dict[str, object] | None = None
) -> Path:
    paths = {"raw_dir": str(tmp_path / "raw"), "processed_dir": str(tmp_path / "processed")}
    return write_params(
        tmp_path / "params.yaml",
        {"paths": paths, "corpus": {"name": corpus_name}, "tokenize": tokenize or {}},
    )


def test_main_missing_corpus_exits_1_with_clear_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tokenization.main(["--params", str(_write_params(tmp_path, "nope"))])
    assert exit_info.value.code == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    message = errors[0].getMessage()
    assert message == (
        f"{tmp_path / 'raw' / 'nope'}: corpus folder not found (run the download stage)"
    )
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "processed").exists()


def _stage_params(paths: Paths, path: Path) -> Path:
    """A params file for `main` with these paths and the tiny corpus."""
    return write_params(
        path, {"paths": {k: str(v) for k, v in vars(paths).items()}, "corpus": {"name": TINY_ID}}
    )


def _one_error_line(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> str:
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert "Traceback" not in capsys.readouterr().err
    return errors[0].getMessage()


def test_main_disk_full_exits_1_naming_the_output(
    processed_tiny: Params,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = processed_tiny.paths.processed_dir
    before = read_outputs(out)
    params_file = _stage_params(processed_tiny.paths, tmp_path / "stage_params.yaml")
    fill_disk(monkeypatch, out.parent)
    with pytest.raises(SystemExit) as exit_info:
        tokenization.main(["--params", str(params_file)])
    assert exit_info.value.code == 1
    assert _one_error_line(caplog, capsys) == f"cannot write {out / 'vocab.json'}: {NO_SPACE}"
    assert read_outputs(out) == before
    assert leftovers(out.parent) == [] and leftovers(out) == []


def test_main_unwritable_output_folder_exits_1_naming_it(
    processed_tiny: Params,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    paths = dataclasses.replace(processed_tiny.paths, processed_dir=blocker / "processed")
    params_file = _stage_params(paths, tmp_path / "stage_params.yaml")
    with pytest.raises(SystemExit) as exit_info:
        tokenization.main(["--params", str(params_file)])
    assert exit_info.value.code == 1
    assert _one_error_line(caplog, capsys) == (
        f"cannot write {blocker / 'processed'}: {os.strerror(errno.ENOTDIR)}"
    )


def test_main_bad_params_exits_1(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = _write_params(tmp_path, TINY_ID, tokenize={"min_freq": 0})
    with pytest.raises(SystemExit) as exit_info:
        tokenization.main(["--params", str(params)])
    assert exit_info.value.code == 1
    assert "tokenize.min_freq = 0: must be >= 1" in caplog.text


# Split rules: `document`, `span` and `auto`


def test_split_by_is_validated() -> None:
    assert SHIPPED.tokenize.split_by == "auto"
    with pytest.raises(ConfigError, match=r"tokenize\.split_by = 'sentence': expected one of"):
        params_with({"tokenize": {"split_by": "sentence"}})


@pytest.mark.parametrize(("n_docs", "rule"), [(1, "span"), (2, "span"), (6, "span"), (9, "span")])
def test_auto_splits_within_documents_when_too_few(n_docs: int, rule: str) -> None:
    assert choose_rule(n_docs, SHIPPED.tokenize) == rule


@pytest.mark.parametrize("n_docs", [10, 12, 65])
def test_auto_splits_by_document_when_each_split_gets_one(n_docs: int) -> None:
    assert choose_rule(n_docs, SHIPPED.tokenize) == "document"
    few = dataclasses.replace(SHIPPED.tokenize, split_every=3, val_remainder=0, test_remainder=1)
    assert choose_rule(2, few) == "span" and choose_rule(3, few) == "document"


@pytest.mark.parametrize("forced", ["document", "span"])
def test_forced_rule_is_kept(forced: str) -> None:
    p = dataclasses.replace(SHIPPED.tokenize, split_by=forced)
    assert choose_rule(1, p) == choose_rule(100, p) == forced


def test_cut_document_equal_units_give_equal_spans() -> None:
    starts = list(range(0, 100, 10))
    assert cut_document(starts, 100, 10, range(10)) == [(i, i + 10) for i in range(0, 100, 10)]
    assert cut_document(starts, 100, 5, range(5)) == [(i, i + 20) for i in range(0, 100, 20)]


def test_cut_document_cuts_nearest_the_ideal_offsets() -> None:
    """Units of 4 characters, spans of 10: each cut lies within 2 of k * 10 (earlier on ties)."""
    spans = cut_document(list(range(0, 100, 4)), 100, 10, range(10))
    assert [start for start, _ in spans] == [0, 8, 20, 28, 40, 48, 60, 68, 80, 88]
    assert all(end == spans[i + 1][0] for i, (_, end) in enumerate(spans[:-1]))
    assert spans[-1][1] == 100


def test_cut_document_fills_every_span_whatever_the_lengths() -> None:
    """One unit of 90 characters, then nine of 1: each span gets one, however unequal."""
    starts = [0, *range(90, 99)]
    spans = cut_document(starts, 100, 10, range(10))
    assert spans == [(0, 90), *((i, i + 1) for i in range(90, 98)), (98, 100)]


def test_cut_document_few_units_fill_the_chosen_spans_only() -> None:
    spans = cut_document([0, 5, 9], 12, 10, {0, 8, 9})
    assert spans[0] == (0, 5) and spans[8] == (5, 9) and spans[9] == (9, 12)
    assert all(start == end for start, end in spans[1:8])
    assert cut_document([], 0, 10, ()) == [(0, 0)] * 10  # an empty document
    with pytest.raises(ValueError, match="3 spans to fill from 2 units"):
        cut_document([0, 5], 12, 10, {0, 8, 9})


def test_spans_to_fill_prefers_splits_still_empty() -> None:
    p = SHIPPED.tokenize  # span 0 is the first train span, 8 validation, 9 test
    assert spans_to_fill(10, p, set()) == spans_to_fill(40, p, set(SPLITS)) == list(range(10))
    assert spans_to_fill(1, p, set()) == [0]
    assert spans_to_fill(2, p, set()) == [0, 8]
    assert spans_to_fill(3, p, set()) == [0, 8, 9]
    assert spans_to_fill(1, p, {"train"}) == [8]
    assert spans_to_fill(2, p, {"train", "validation"}) == [0, 9]
    assert spans_to_fill(4, p, set(SPLITS)) == [0, 1, 8, 9]
    assert spans_to_fill(0, p, set()) == []


def test_unit_starts_at_paragraphs_and_optionally_sentences() -> None:
    paragraphs = ["One here. Two here.", "Three here. Four here."]
    assert join_paragraphs(paragraphs, "line") == "One here. Two here.\nThree here. Four here."
    assert unit_starts(paragraphs, "line") == [0, 20]
    assert unit_starts(paragraphs, "blank_line") == [0, 21]
    splitter = PunktSentenceTokenizer(PunktParameters())
    assert unit_starts(paragraphs, "line", splitter) == [0, 10, 20, 32]
    assert unit_starts([], "line", splitter) == []


# Marked corpora: sentence n reads "Qa<n> ... qz<n>." and appears once in the corpus.

SPLIT_NOUNS = ["the river", "the city", "our people", "the farmer", "a school", "the bridge"]
MARKER = re.compile(r"q[az]\d+")


@dataclass(frozen=True)
class MarkedDoc:
    name: str  # path under the corpus folder
    paragraphs: int
    sentences: int  # in each paragraph
    latin1: bool = False  # stored in Latin-1 (a "café" makes it invalid UTF-8)
    crlf: bool = False  # CRLF line ends


def marked_corpus(docs: Sequence[MarkedDoc], plain: bool = False) -> tuple[dict[str, bytes], int]:
    """The files (name -> bytes) of a corpus of one paragraph a line, and its sentence count.

    About a third of the sentences hold "Mr. <Name>" (Punkt must learn that "Mr." ends no
    sentence). `plain`: every file in UTF-8 with LF line ends, the same text otherwise.
    """
    rng = random.Random(len(docs))
    files: dict[str, bytes] = {}
    n = 0
    for doc in docs:
        lines = []
        for _ in range(doc.paragraphs):
            sentences = []
            for _ in range(doc.sentences):
                if doc.latin1 and n % 5 == 0:
                    body = "met the people at the café"
                elif rng.random() < 0.35:
                    body = f"and Mr. {rng.choice(NAMES)} {rng.choice(VERBS)} the {NOUNS[n % 6]}"
                else:
                    body = f"{rng.choice(VERBS)} {rng.choice(SPLIT_NOUNS)}"
                sentences.append(f"Qa{n} {body} near qz{n}.")
                n += 1
            lines.append(" ".join(sentences))
        end = "\n" if plain or not doc.crlf else "\r\n"
        text = end.join(lines) + end
        files[doc.name] = text.encode("latin-1" if doc.latin1 and not plain else "utf-8")
    return files, n


ONE_DOC = [MarkedDoc("speech.txt", paragraphs=1, sentences=40, crlf=True)]
TWO_DOCS = [
    MarkedDoc("north/alpha.txt", paragraphs=3, sentences=8, latin1=True),
    MarkedDoc("south/beta.txt", paragraphs=12, sentences=3, crlf=True),
]
SIX_DOCS = [
    MarkedDoc("a.txt", paragraphs=14, sentences=2),
    MarkedDoc("b.txt", paragraphs=2, sentences=9, latin1=True, crlf=True),
    MarkedDoc("c.txt", paragraphs=1, sentences=12, crlf=True),
    MarkedDoc("d.txt", paragraphs=10, sentences=1, latin1=True),
    MarkedDoc("e.txt", paragraphs=5, sentences=4),
    MarkedDoc("f.txt", paragraphs=1, sentences=3, latin1=True),
]
TWELVE_DOCS = [
    MarkedDoc(
        f"{('econ', 'law', 'war')[i % 3]}/doc{i:02d}.txt",
        paragraphs=4 + 3 * (i % 4),
        sentences=1 + i % 3,
        latin1=i % 4 == 1,
        crlf=i % 3 == 2,
    )
    for i in range(12)
]
CORPORA = {"one": ONE_DOC, "two": TWO_DOCS, "six": SIX_DOCS, "twelve": TWELVE_DOCS}


def marked_params(tmp_path: Path, **tokenize: object) -> Params:
    """Shipped params, paths under tmp_path; min_freq 1 so that every train marker is a word
    of the vocabulary."""
    return params_with({"paths": paths_under(tmp_path), "tokenize": {"min_freq": 1, **tokenize}})


def write_marked(params: Params, name: str, docs: Sequence[MarkedDoc], plain: bool = False) -> int:
    files, n_sentences = marked_corpus(docs, plain)
    for rel, data in files.items():
        path = params.paths.raw_dir / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (params.paths.raw_dir / name / README).write_bytes(b"Qa999 not a document near qz999.\n")
    return n_sentences


def split_texts(params: Params, corpus: str) -> dict[str, list[str]]:
    """The text of each split, piece by piece, as splits.json describes it."""
    record = json.loads((params.paths.processed_dir / "splits.json").read_text())
    rule = params.tokenize.paragraphs

    def text_of(name: str) -> str:
        return decode_document((params.paths.raw_dir / corpus / name).read_bytes())

    if record["split_by"] == "document":
        return {split: [text_of(name) for name in record[split]] for split in SPLITS}
    texts = {
        split: [
            join_paragraphs(split_paragraphs(text_of(s["document"]), rule), rule)[
                s["start"] : s["end"]
            ]
            for s in record["spans"][split]
        ]
        for split in SPLITS
    }
    for split in SPLITS:  # each split lists the documents it has text of
        assert record[split] == sorted({s["document"] for s in record["spans"][split]})
    return texts


def split_sentences(params: Params, corpus: str) -> dict[str, list[list[str]]]:
    """Each split's sentences, rebuilt from splits.json, the raw files and the saved tokenizer;
    they must encode (with the saved vocabulary) to exactly the saved arrays."""
    out = params.paths.processed_dir
    tokenizer = TextTokenizer.from_dict(json.loads((out / "tokenizer.json").read_text()))
    stoi = {w: i for i, w in enumerate(json.loads((out / "vocab.json").read_text())["tokens"])}
    sentences = {}
    for split, texts in split_texts(params, corpus).items():
        sentences[split] = [s for text in texts for s in tokenizer.sentences(text)]
        np.testing.assert_array_equal(
            load_split(out, split), encode(with_eos(sentences[split]), stoi)
        )
    return sentences


def split_of_sentences(params: Params, corpus: str, n_sentences: int) -> dict[int, str]:
    """Sentence number -> its split; asserts that every split has words, and that each
    sentence lies whole in exactly one split (its two markers there, and nowhere else)."""
    found: dict[str, list[str]] = {}
    for split, sentences in split_sentences(params, corpus).items():
        assert sentences, f"{split} is empty"
        for token in (t for s in sentences for t in s):
            if MARKER.fullmatch(token):
                found.setdefault(token, []).append(split)
    assert len(found) == 2 * n_sentences  # and no README marker
    where = {}
    for n in range(n_sentences):
        assert len(found[f"qa{n}"]) == 1 and found[f"qa{n}"] == found[f"qz{n}"], n
        where[n] = found[f"qa{n}"][0]
    return where


def assert_nothing_held_out_reaches_the_tokenizer(params: Params, where: dict[int, str]) -> None:
    """Markers of validation and test are in neither the vocabulary nor Punkt's word list."""
    out = params.paths.processed_dir
    vocab = json.loads((out / "vocab.json").read_text())["tokens"]
    punkt = json.loads((out / "tokenizer.json").read_text())["punkt"]
    train = {f"q{side}{n}" for n, split in where.items() if split == "train" for side in "az"}
    assert {w for w in vocab if MARKER.fullmatch(w)} == train
    assert {w for w in punkt["ortho_context"] if MARKER.fullmatch(w)} <= train


@pytest.mark.parametrize(
    ("corpus", "rule"), [("one", "span"), ("two", "span"), ("six", "span"), ("twelve", "document")]
)
def test_small_corpora_split_with_the_defaults(tmp_path: Path, corpus: str, rule: str) -> None:
    params = marked_params(tmp_path)
    n_sentences = write_marked(params, corpus, CORPORA[corpus])
    stats = tokenization.run(params.tokenize, params.paths, corpus)
    record = json.loads((params.paths.processed_dir / "splits.json").read_text())
    assert stats["split_by"] == record["split_by"] == rule
    assert json.loads((params.paths.processed_dir / "stats.json").read_text()) == stats
    where = split_of_sentences(params, corpus, n_sentences)
    assert_nothing_held_out_reaches_the_tokenizer(params, where)
    counts = Counter(where.values())
    for split in SPLITS:
        spans = record["spans"][split] if rule == "span" else record[split]
        assert stats[split]["spans"] == len(spans)  # type: ignore[index]
        assert stats[split]["documents"] == len(record[split])  # type: ignore[index]
    if rule == "span":  # about 8 : 1 : 1 of the sentences, whatever the number of documents
        assert counts["train"] > 5 * counts["validation"] > 0
        assert counts["train"] > 5 * counts["test"] > 0
    else:
        # Documents in order of their paths: econ/doc00, econ/doc03, ..., war/doc02, war/doc05.
        assert record["validation"] == ["war/doc02.txt"] and record["test"] == ["war/doc05.txt"]


@pytest.mark.parametrize("corpus", ["one", "two", "six", "twelve"])
def test_spans_begin_and_end_at_sentences(tmp_path: Path, corpus: str) -> None:
    """In the text itself: every span starts a sentence ("Qa") and ends one ("."), and spans
    of a document with split_every paragraphs or more start paragraphs."""
    params = marked_params(tmp_path, split_by="span")
    write_marked(params, corpus, CORPORA[corpus])
    tokenization.run(params.tokenize, params.paths, corpus)
    for split, texts in split_texts(params, corpus).items():
        for text in texts:
            assert text.startswith("Qa") and text.rstrip().endswith("."), (split, text)
    record = json.loads((params.paths.processed_dir / "splits.json").read_text())
    spans = [s for split in SPLITS for s in record["spans"][split]]
    for doc in CORPORA[corpus]:
        starts = {s["start"] for s in spans if s["document"] == doc.name}
        # Ten spans, or one a sentence when there are fewer ("Mr." ends none): from 3 on,
        # every split has some of the document.
        assert len(starts) == min(10, doc.paragraphs * doc.sentences) >= 3
        assert all(doc.name in record[split] for split in SPLITS)
        if doc.paragraphs >= 10:
            text = decode_document((params.paths.raw_dir / corpus / doc.name).read_bytes())
            paragraphs = split_paragraphs(text, "line")
            assert starts <= set(unit_starts(paragraphs, "line"))


def test_span_rule_forced_on_twelve_documents(tmp_path: Path) -> None:
    params = marked_params(tmp_path, split_by="span")
    n_sentences = write_marked(params, "twelve", TWELVE_DOCS)
    stats = tokenization.run(params.tokenize, params.paths, "twelve")
    assert stats["split_by"] == "span"
    where = split_of_sentences(params, "twelve", n_sentences)
    assert_nothing_held_out_reaches_the_tokenizer(params, where)
    for split in SPLITS:  # every document has text in every split
        assert stats[split]["documents"] == 12  # type: ignore[index]
    spans = sum(min(10, doc.paragraphs * doc.sentences) for doc in TWELVE_DOCS)
    assert stats["train"]["spans"] == spans - 2 * 12  # type: ignore[index]
    assert stats["validation"]["spans"] == stats["test"]["spans"] == 12  # type: ignore[index]


def test_document_rule_refuses_six_documents(tmp_path: Path) -> None:
    params = marked_params(tmp_path, split_by="document")
    write_marked(params, "six", SIX_DOCS)
    with pytest.raises(TokenizeError) as err:
        tokenization.run(params.tokenize, params.paths, "six")
    assert str(err.value) == (
        "6 documents leave the validation, test split(s) empty with tokenize.split_every = 10: "
        "the corpus needs at least 10 documents"
    )
    assert not params.paths.processed_dir.exists()


def test_encodings_and_line_ends_do_not_change_the_outputs(tmp_path: Path) -> None:
    """The mixed corpus (Latin-1 and UTF-8, CRLF and LF) gives the bytes its all-UTF-8, all-LF
    twin gives."""
    outputs = []
    for plain in (False, True):
        params = marked_params(tmp_path / str(plain))
        write_marked(params, "six", SIX_DOCS, plain=plain)
        tokenization.run(params.tokenize, params.paths, "six")
        outputs.append(read_outputs(params.paths.processed_dir))
    assert outputs[0] == outputs[1]
    raw = tmp_path / "False" / "data" / "raw" / "six"
    assert b"\r\n" in (raw / "b.txt").read_bytes() and b"caf\xe9" in (raw / "b.txt").read_bytes()


def test_span_rule_is_deterministic(tmp_path: Path) -> None:
    params = marked_params(tmp_path, split_by="span")
    write_marked(params, "two", TWO_DOCS)
    tokenization.run(params.tokenize, params.paths, "two")
    first = read_outputs(params.paths.processed_dir)
    again = dataclasses.replace(params.paths, processed_dir=tmp_path / "again")
    tokenization.run(params.tokenize, again, "two")
    assert read_outputs(again.processed_dir) == first


@pytest.mark.parametrize(
    ("docs", "empty"),
    [
        ([MarkedDoc("one.txt", paragraphs=1, sentences=1)], "validation, test"),
        ([MarkedDoc("one.txt", paragraphs=1, sentences=2)], "test"),
        ([MarkedDoc("a.txt", paragraphs=1, sentences=1)] * 2, "test"),
    ],
)
def test_corpus_too_small_for_any_rule(tmp_path: Path, docs: list[MarkedDoc], empty: str) -> None:
    params = marked_params(tmp_path)
    docs = [dataclasses.replace(d, name=f"{i}{d.name}") for i, d in enumerate(docs)]
    n_sentences = write_marked(params, "few", docs)
    with pytest.raises(TokenizeError) as err:
        tokenization.run(params.tokenize, params.paths, "few")
    assert str(err.value) == (
        f"corpus 'few' is too small to split: its {n_sentences} sentence(s) leave the {empty} "
        "split(s) empty; split within documents (tokenize.split_by = span), it needs at least "
        "3 sentences"
    )
    assert not params.paths.processed_dir.exists()


@pytest.mark.parametrize(
    "docs",
    [
        [MarkedDoc("one.txt", paragraphs=1, sentences=3)],
        [MarkedDoc(f"{i}.txt", paragraphs=1, sentences=1) for i in range(3)],
    ],
)
def test_three_sentences_are_enough(tmp_path: Path, docs: list[MarkedDoc]) -> None:
    """One sentence a split: a one-sentence document fills the split earlier ones left empty."""
    params = marked_params(tmp_path)
    n_sentences = write_marked(params, "few", docs)
    tokenization.run(params.tokenize, params.paths, "few")
    assert split_of_sentences(params, "few", n_sentences) == {
        0: "train",
        1: "validation",
        2: "test",
    }


def test_main_too_small_corpus_exits_1_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    params_file = _write_params(tmp_path, "few")
    corpus = tmp_path / "raw" / "few"
    corpus.mkdir(parents=True)
    (corpus / "only.txt").write_text("Qa0 saw the river near qz0.\r\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        tokenization.main(["--params", str(params_file)])
    assert exit_info.value.code == 1
    message = _one_error_line(caplog, capsys)
    assert message.startswith("corpus 'few' is too small to split: its 1 sentence(s)")
    assert not (tmp_path / "processed").exists()


def test_document_rule_refuses_a_split_of_empty_documents(tmp_path: Path) -> None:
    params = marked_params(tmp_path)
    write_marked(params, "blank", [MarkedDoc(f"{i:02d}.txt", 2, 2) for i in range(9)])
    (params.paths.raw_dir / "blank" / "09.txt").write_bytes(b"\r\n  \n")  # the test document
    with pytest.raises(TokenizeError) as err:
        tokenization.run(params.tokenize, params.paths, "blank")
    assert str(err.value) == (
        "corpus 'blank': the test split(s) get no words: their documents are empty "
        "(tokenize.split_by = document)"
    )


def test_unicode_line_separators_end_lines() -> None:
    text = decode_document("One.\u2028Two.\u2029Three.\u0085Four.\r\nFive.\rSix.\n".encode())
    assert split_paragraphs(text, "line") == ["One.", "Two.", "Three.", "Four.", "Five.", "Six."]
    # U+2029 separates paragraphs, so it ends a hard-wrapped one too.
    assert split_paragraphs(decode_document("a\nb\u2029c\u2028d".encode()), "blank_line") == [
        "a b",
        "c d",
    ]


def test_latin1_byte_0x85_is_not_a_line_end() -> None:
    # Not UTF-8 (0xe9): read as Latin-1, where 0x85 is Windows-1252's "...", not NEL.
    assert split_paragraphs(decode_document(b"Wait\x85 what?\xe9\n"), "line") == [
        "Wait\x85 what?\xe9"
    ]


def test_a_stream_splits_unicode_line_ends_as_the_whole_text() -> None:
    tokenizer = TextTokenizer(train_punkt(punkt_training_paragraphs()))
    data = "The city saw.\u2028The river.\u2029Mr. Green met.\u0085The people.\r\nEnd.".encode()
    whole = list(tokenizer.sentences(decode_document(data)))
    for cut in range(1, len(data)):
        assert list(tokenizer.stream_sentences([data[:cut], data[cut:]])) == whole
    assert len(whole) == 5


def test_unicode_line_ends_tokenize_like_lf(tmp_path: Path) -> None:
    outputs = []
    for end in ("\n", "\u2028", "\r\n"):
        params = marked_params(tmp_path / str(ord(end[-1])) / str(len(end)))
        files, _ = marked_corpus(SIX_DOCS, plain=True)
        for rel, data in files.items():
            path = params.paths.raw_dir / "six" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.decode().replace("\n", end).encode())
        tokenization.run(params.tokenize, params.paths, "six")
        outputs.append(read_outputs(params.paths.processed_dir))
    assert outputs[0] == outputs[1] == outputs[2]
