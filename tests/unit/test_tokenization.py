"""Stage `tokenize` and text.py: decoding, paragraphs, Punkt, vocabulary, splits, the stage's files.

Pure helpers are tested on hand-made inputs; `run` and `main` on the synthetic `tinycorpus`
(20 documents and a README), with every path under tmp_path.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from nltk.tokenize.punkt import PunktParameters

from rnnlm import tokenization
from rnnlm.config import Params, Paths
from rnnlm.files import WriteError, describe_os_error
from rnnlm.streams import EOS, EOS_ID, SPECIAL_TOKENS, UNK, UNK_ID
from rnnlm.text import (
    TextTokenizer,
    decode,
    decode_document,
    detokenize,
    encode,
    split_paragraphs,
    train_punkt,
    with_eos,
)
from rnnlm.tokenization import (
    SPLITS,
    TokenizeError,
    assign_splits,
    build_vocab,
    list_documents,
)
from tests.fixtures import (
    LATIN1_DOC,
    README,
    TINY_ID,
    encode_docs,
    fill_disk,
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
    assert set(splits) == set(SPLITS)
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
    assert sum(stats[s]["documents"] for s in SPLITS) == 20
    for split in SPLITS:
        ids = load_split(out, split)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert ids.min() >= 0 and ids.max() < len(vocab)
        n_sentences = int((ids == EOS_ID).sum())
        n_words = len(ids) - n_sentences
        assert stats[split] == {
            "documents": len(splits[split]),
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
    with pytest.raises(TokenizeError, match="5 documents leave the validation, test split"):
        tokenization.run(processed_tiny.tokenize, processed_tiny.paths, TINY_ID)
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
