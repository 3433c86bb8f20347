"""Fuzzing the inference API and the `rnnlm` CLI with hypothesis: bad input never crashes.

Any prompt or text (any unicode, control characters, NUL, lone surrogates, whitespace only,
1 MB) and any sampling argument (0, 1e-30, 5e-324, 1e300, inf, nan, negative, huge, the wrong
type) must give either valid output (a str per sample; probabilities finite, in [0, 1], best
first; a finite perplexity >= 1) or a clear refusal: from the API a `ValueError` whose message
starts with `<argument> = <value>`, from the CLI exit code 2 (bad argument) or 1 (unusable
input or model) with one `error:` line on stderr and no traceback.

The CLI is fuzzed in-process through `main(argv)` (a subprocess costs a second an example);
two subprocess tests run the real console entry for the no-traceback guarantee.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rnnlm.cli import main
from rnnlm.inference import (
    MAX_PROMPT_CHARS,
    MAX_SAMPLES,
    MAX_THREADS,
    MAX_TOKENS,
    LanguageModel,
    sample_next,
)
from rnnlm.runs import MAX_LIMIT
from rnnlm.text import MAX_PARAGRAPH_CHARS, cut_long, decode_document
from tests.unit.test_export import VOCAB, WORDS

FUZZ = settings(max_examples=60, deadline=None)
# capsys and tmp dirs are reset by hand in each example, so sharing them across examples is safe.
FUZZ_CLI = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
INF, NAN = float("inf"), float("nan")
MEGABYTE = 1_000_000
PROSE = "The president said that we will build a strong nation. Today congress must keep peace. "

# Every code point, lone surrogates included (hypothesis leaves them out by default).
ANY_CHAR = st.characters(exclude_categories=())
ODD_TEXTS = st.sampled_from(
    [
        "", " ", "\n\n\t \r\n", "\x00", "\x00the\x00president", "\ud800", "\udcff nation",
        "\u2028\u2029\x85", "\x1b[31mwe will\x1b[0m", "the . . . .", "Mr. we. a. b.", "\ufeff",
        "\U0001f642" * 5, "we\x0bwill\x0cbuild", "\u200b\u200d", "?!?!", "..." * 50,
    ]
)  # fmt: skip
VOCAB_TEXT = st.lists(st.sampled_from([*WORDS, "xyzzy", "<unk>", "<eos>", "\n"]), max_size=30).map(
    " ".join
)
TEXTS = st.one_of(st.text(ANY_CHAR, max_size=200), ODD_TEXTS, VOCAB_TEXT)


# Values `generate` must accept, extremes included; valid counts stay small (they are run).
VALID_SAMPLING = st.fixed_dictionaries(
    {
        "temperature": st.one_of(
            st.sampled_from([0, 0.0, 1e-30, 5e-324, 1e-300, 1, 1e6, 1e300]), st.floats(0, 1e308)
        ),
        "top_k": st.one_of(st.integers(0, 2 * len(VOCAB)), st.just(10**12)),
        "top_p": st.one_of(
            st.sampled_from([1e-300, 1e-9, 0.5, 1, 1.0]), st.floats(0, 1, exclude_min=True)
        ),
        "max_tokens": st.integers(0, 12),
        "num_samples": st.integers(1, 4),
        "seed": st.one_of(st.none(), st.integers(0, 2**80)),
    }
)
# Values it must refuse, naming the argument: out of range, not finite, the wrong type. Each
# is tried (a parametrized test); the float ranges are fuzzed on top.
BAD_SAMPLING: dict[str, list[object]] = {
    "temperature": [-1e-300, -1, INF, -INF, NAN, True, "1", None, np.float32("nan")],
    "top_k": [-1, -(10**12), 1.5, True, None, "3"],
    "top_p": [0, 0.0, -0.0, -0.1, 1.0000001, 2, INF, NAN, True, None],
    "max_tokens": [-1, MAX_TOKENS + 1, 10**30, -(10**30), 2.0, None, True],
    "num_samples": [0, -2, MAX_SAMPLES + 1, 10**9, 2.0, True],
    "seed": [-1, -(2**70), 1.5, "1", True],
}
BAD_FLOATS = st.one_of(
    st.tuples(st.just("temperature"), st.floats(max_value=-1e-300)),
    st.tuples(st.just("top_p"), st.floats(max_value=0.0) | st.floats(1.0, exclude_min=True)),
)


@pytest.fixture(scope="module")
def model(tiny_onnx_model: Path) -> LanguageModel:
    return LanguageModel(tiny_onnx_model, threads=1)


def is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def refusal(call: Callable[[], object]) -> str:
    """The message of the ValueError that `call` raises."""
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and len(message) < 300
    return message


def check_distribution(
    model: LanguageModel, top: list[tuple[str, float]], k: int, rounding: float = 0.0
) -> None:
    """`top` is the k best tokens of a distribution: distinct, best first, finite, in [0, 1]
    (each probability rounded by up to `rounding`)."""
    words = [w for w, _ in top]
    probs = [p for _, p in top]
    assert len(top) == min(k, model.vocab_size) and len(set(words)) == len(words)
    assert all(isinstance(w, str) and w in model.stoi for w in words)
    assert all(isinstance(p, float) and math.isfinite(p) and 0.0 <= p <= 1.0 for p in probs)
    assert probs == sorted(probs, reverse=True)
    assert sum(probs) <= 1.0 + 1e-9 + rounding * len(probs)


def extreme(temperature: float, top_k: int = 0, top_p: float = 1.0) -> dict[str, Any]:
    return dict(
        temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=6, num_samples=3, seed=0
    )


@FUZZ
@given(prompt=TEXTS, sampling=VALID_SAMPLING, stop_at_eos=st.booleans())
@example(prompt="the \x00\ud800", sampling=extreme(5e-324), stop_at_eos=False)
@example(prompt="", sampling=extreme(1e-300, top_p=1e-300), stop_at_eos=False)
@example(prompt="\n", sampling=extreme(1e300, top_k=10**12, top_p=1e-9), stop_at_eos=True)
@example(prompt=" ", sampling=extreme(0, top_k=1), stop_at_eos=True)
def test_generate_gives_one_text_per_sample(
    model: LanguageModel, prompt: str, sampling: dict[str, Any], stop_at_eos: bool
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy overflow or invalid-value warning fails
        texts = model.generate(prompt, stop_at_eos=stop_at_eos, include_prompt=False, **sampling)
    assert len(texts) == sampling["num_samples"] and all(isinstance(t, str) for t in texts)
    assert all(len(t.split()) <= sampling["max_tokens"] for t in texts)


@pytest.mark.parametrize(
    ("name", "value"), [(name, value) for name, values in BAD_SAMPLING.items() for value in values]
)
def test_generate_names_the_bad_argument(model: LanguageModel, name: str, value: object) -> None:
    message = refusal(lambda: model.generate("the", **{name: value}))  # type: ignore[arg-type]
    assert message.startswith(f"{name} = {value!r}: "), message


@FUZZ
@given(prompt=TEXTS, sampling=VALID_SAMPLING, bad=BAD_FLOATS)
def test_generate_names_a_float_out_of_range(
    model: LanguageModel, prompt: str, sampling: dict[str, Any], bad: tuple[str, float]
) -> None:
    name, value = bad
    message = refusal(lambda: model.generate(prompt, **{**sampling, name: value}))
    assert message.startswith(f"{name} = {value!r}: "), message


@pytest.mark.parametrize("value", [None, b"the", 3, ["the"]])
def test_a_prompt_or_text_must_be_a_str(model: LanguageModel, value: object) -> None:
    shown = repr(value)
    assert refusal(lambda: model.generate(value)).startswith(f"prompt = {shown}: expected str")  # type: ignore[arg-type]
    assert refusal(lambda: model.next_words(value)).startswith(f"prompt = {shown}")  # type: ignore[arg-type]
    assert refusal(lambda: model.score(value)).startswith(f"text = {shown}: expected str")  # type: ignore[arg-type]


@FUZZ
@given(prompt=TEXTS, k=st.one_of(st.integers(-3, 40), st.sampled_from([10**12, 1.5, True, None])))
def test_next_words_is_a_sorted_distribution(model: LanguageModel, prompt: str, k: object) -> None:
    if not (is_whole(k) and k >= 1):  # type: ignore[operator]
        assert refusal(lambda: model.next_words(prompt, k)).startswith(f"k = {k!r}: ")  # type: ignore[arg-type]
        return
    check_distribution(model, model.next_words(prompt, k), k)  # type: ignore[arg-type]


@FUZZ
@given(text=TEXTS)
def test_score_is_finite_or_says_there_are_no_words(model: LanguageModel, text: str) -> None:
    if not text.split():  # whitespace only, by Python's (Unicode) definition
        assert refusal(lambda: model.score(text)) == "nothing to score: the text has no words"
        return
    result = model.score(text)
    assert result.tokens == sum(s.tokens for s in result.sentences) >= 2 * len(result.sentences)
    assert 0 <= result.unknown <= result.tokens - len(result.sentences)  # <eos> is known
    assert math.isfinite(result.ppl) and result.ppl >= 1.0
    for sentence in result.sentences:
        assert isinstance(sentence.text, str) and math.isfinite(sentence.ppl)
    json.dumps(result.to_dict(per_sentence=True), allow_nan=False)  # no NaN or inf anywhere


STREAMS = st.one_of(
    st.lists(st.integers(-2, len(VOCAB) + 2), max_size=40),
    st.lists(st.integers(0, len(VOCAB) - 1), min_size=1, max_size=600),  # several windows
    st.lists(st.floats(), max_size=4),
    st.lists(st.booleans(), min_size=1, max_size=4),
    st.sampled_from([[[1, 2]], "the", 5, None, [10**30], [1, 2.5], np.array([1.0, 2.0])]),
)


@FUZZ
@given(stream=STREAMS, window=st.one_of(st.integers(-1, 300), st.sampled_from([1.5, True, None])))
def test_score_ids_is_finite_or_names_the_problem(
    model: LanguageModel, stream: object, window: object
) -> None:
    valid_stream = (
        isinstance(stream, list)
        and stream
        and all(is_whole(i) and 0 <= i < len(VOCAB) for i in stream)
    )
    if not valid_stream:
        message = refusal(lambda: model.score_ids(stream, window))  # type: ignore[arg-type]
        assert re.match(r"stream[: ]|nothing to score: the stream is empty", message), message
        return
    if not (is_whole(window) and window >= 1):  # type: ignore[operator]
        message = refusal(lambda: model.score_ids(stream, window))  # type: ignore[arg-type]
        assert message.startswith(f"window = {window!r}: "), message
        return
    result = model.score_ids(stream, window)  # type: ignore[arg-type]
    assert result.tokens == len(stream)  # type: ignore[arg-type]
    assert math.isfinite(result.ppl) and result.ppl >= 1.0
    # The state carries across windows: any window size gives the same total.
    assert result.nll == pytest.approx(model.score_ids(stream).nll, rel=1e-5)  # type: ignore[arg-type]


# Both ways of drawing: one cumulative sum (<= 256 entries) and two levels (longer rows).
VOCAB_SIZES = st.one_of(st.integers(1, 40), st.integers(257, 400))


@settings(max_examples=100, deadline=None)
@given(
    logits=VOCAB_SIZES.flatmap(
        lambda vocab: arrays(
            np.float32,
            (3, vocab),
            elements=st.floats(-(2.0**100), 2.0**100, width=32),
            fill=st.floats(-10, 10, width=32),  # a few drawn entries, ties everywhere else
        )
    ),
    temperature=st.one_of(
        st.sampled_from([0.0, 5e-324, 1e-300, 1e-30, 1.0, 1e6, 1e300]),
        st.floats(0, 1e308),
    ),
    top_k=st.integers(0, 700),
    top_p=st.one_of(st.sampled_from([1e-300, 1e-9, 1.0]), st.floats(0, 1, exclude_min=True)),
    seed=st.integers(0, 2**32),
)
def test_sample_next_picks_an_allowed_token_without_warnings(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float, seed: int
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = sample_next(logits, np.random.default_rng(seed), temperature, top_k, top_p)
    rows, vocab = logits.shape
    assert ids.shape == (rows,) and np.all((ids >= 0) & (ids < vocab))
    chosen = logits[np.arange(rows), ids]
    if 0 < top_k < vocab:  # never outside the k best (ties with the k-th count as in)
        assert np.all(chosen >= np.sort(logits, axis=-1)[:, vocab - top_k])
    best = logits.max(axis=-1)
    if temperature == 0:
        assert np.all(chosen == best)
    elif top_p <= 1e-9:  # the nucleus: the best token, or one as likely within float precision
        with np.errstate(over="ignore"):
            ratio = np.exp((chosen.astype(np.float64) - best) / temperature)
        assert np.all(ratio >= 1 - 1e-6)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2", MAX_THREADS + 1, 2**31, 2**64])
def test_bad_threads_is_the_callers_error_not_the_models(
    tiny_onnx_model: Path, threads: object
) -> None:
    message = refusal(lambda: LanguageModel(tiny_onnx_model, threads=threads))  # type: ignore[arg-type]
    assert message.startswith(f"threads = {threads!r}: must be an integer in [1, {MAX_THREADS}]")


@FUZZ
@given(paragraph=st.text(st.sampled_from("ab. \t\n"), max_size=400), limit=st.integers(2, 60))
def test_cut_long_keeps_every_character_in_short_pieces(paragraph: str, limit: int) -> None:
    pieces = cut_long(paragraph, limit)
    assert "".join(pieces) == paragraph
    assert all(len(p) <= limit for p in pieces) and all(pieces[:-1])
    for piece in pieces[:-1]:  # a cut falls after whitespace whenever the piece's end has some
        if re.search(r"\s", piece[limit // 2 + 1 :]):
            assert piece[-1].isspace(), (piece, limit)


def test_a_long_paragraph_reaches_punkt_in_pieces(
    model: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NLTK gives Punkt 5 s a paragraph (nltk.redos): 1 MB of 'a. a. ' used to run it out."""
    splitter = model.tokenizer._splitter
    seen: list[int] = []
    tokenize = splitter.tokenize

    def spy(piece: str) -> list[str]:
        seen.append(len(piece))
        return tokenize(piece)

    monkeypatch.setattr(splitter, "tokenize", spy)
    result = model.score("we will " * (MAX_PARAGRAPH_CHARS // 3))  # 2.7 x the limit, one line
    assert len(seen) == 3 and max(seen) <= MAX_PARAGRAPH_CHARS
    assert math.isfinite(result.ppl)


def test_huge_inputs(model: LanguageModel) -> None:
    """1 MB: a prompt is refused at once (naming it); text is scored or found empty."""
    prompt = (PROSE * (MEGABYTE // len(PROSE) + 1))[:MEGABYTE]
    message = refusal(lambda: model.generate(prompt))
    assert message.startswith(f"prompt: {MEGABYTE} characters, at most {MAX_PROMPT_CHARS} ")
    assert refusal(lambda: model.next_words(prompt)).startswith("prompt: ")
    at_limit = model.next_words(("we " * MAX_PROMPT_CHARS)[:MAX_PROMPT_CHARS], k=3)
    check_distribution(model, at_limit, 3)
    assert refusal(lambda: model.score(" \n\t" * (MEGABYTE // 3))).startswith("nothing to score")
    one_word = model.score("x" * MEGABYTE)  # no whitespace: cut mid-word into pieces
    assert one_word.tokens == 2 * (MEGABYTE // MAX_PARAGRAPH_CHARS)
    assert math.isfinite(one_word.ppl)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what an earlier hypothesis example left
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def assert_usage_error(code: int, out: str, err: str) -> None:
    """Exit code 2, nothing on stdout, the error on one line: the last one on stderr."""
    assert code == 2 and out == ""
    assert re.match(r"rnnlm( \w+)?: error: ", err.splitlines()[-1]), err
    assert err.count(": error: ") == 1 and err.endswith("\n")


def number_ok(text: str, kind: type, low: float, high: float | None, low_open: bool) -> bool:
    """Whether `text` is a `kind` in the range, by Python's int() / float() spelling."""
    try:
        value = kind(text)
    except ValueError:
        return False
    in_range = (value > low if low_open else value >= low) and (high is None or value <= high)
    return math.isfinite(value) and in_range


ODD_NUMBERS = [
    "0", "1", "-1", "-0", "0.5", "1e-30", "5e-324", "1e400", "inf", "-inf", "nan", "NaN", " 3 ",
    "3\n", "0x10", "1_000", "", " ", "ten", "\u0661\u0662", "9" * 40, "2.5",
    str(MAX_TOKENS + 1), str(MAX_SAMPLES + 1), str(MAX_THREADS + 1),
]  # fmt: skip
NUMBER_TEXTS = st.one_of(
    st.sampled_from(ODD_NUMBERS),
    st.integers(-5, 10**6).map(str),
    st.floats().map(repr),
    st.text(ANY_CHAR, max_size=8),
)
# Option -> (spellings of values it must accept, the type and range it accepts). The options
# that cost time (tokens, samples, threads) get small valid values.
GENERATE_OPTIONS: dict[str, tuple[st.SearchStrategy[str], tuple]] = {
    "--temperature": (
        st.one_of(
            st.sampled_from(["0", "-0", "1e-30", "5e-324", " 3 ", "1_000.5", "1e300"]),
            st.floats(0, 1e308).map(repr),
        ),
        (float, 0.0, None, False),
    ),
    "--top-k": (
        st.one_of(
            st.sampled_from(["0", " 7\n", "1_000", "\u0661\u0662", "9" * 40]),
            st.integers(0, 100).map(str),
        ),
        (int, 0, None, False),
    ),
    "--top-p": (
        st.one_of(
            st.sampled_from(["1", "1.0", "1e-300", "0.5"]),
            st.floats(0, 1, exclude_min=True).map(repr),
        ),
        (float, 0.0, 1.0, True),
    ),
    "--seed": (
        st.one_of(st.just("9" * 40), st.integers(0, 2**64).map(str)),
        (int, 0, None, False),
    ),
    "--max-tokens": (st.integers(0, 6).map(str), (int, 0, MAX_TOKENS, False)),
    "--num-samples": (st.integers(1, 3).map(str), (int, 1, MAX_SAMPLES, False)),
    "--threads": (st.sampled_from(["1", "2"]), (int, 1, MAX_THREADS, False)),
}
VALID_OPTIONS = st.fixed_dictionaries(
    {}, optional={name: valid for name, (valid, _) in GENERATE_OPTIONS.items()}
)
ONE_BAD_OPTION = st.sampled_from(list(GENERATE_OPTIONS)).flatmap(
    lambda name: st.tuples(
        st.just(name),
        NUMBER_TEXTS.filter(lambda text: not number_ok(text, *GENERATE_OPTIONS[name][1])),
    )
)


@FUZZ_CLI
@given(prompt=TEXTS, options=VALID_OPTIONS, bad=st.none() | ONE_BAD_OPTION)
@example(prompt="caf\udce9 \ud800 \x00 na\u00efve", options={}, bad=None)  # echoed, escaped
@example(prompt="we", options={"--temperature": "5e-324", "--top-p": "1e-300"}, bad=None)
@example(prompt="we", options={}, bad=("--temperature", "inf"))
def test_cli_generate_prints_samples_or_one_usage_error(
    tiny_onnx_model: Path,
    capsys: pytest.CaptureFixture[str],
    prompt: str,
    options: dict[str, str],
    bad: tuple[str, str] | None,
) -> None:
    if bad is not None:
        options = {**options, bad[0]: bad[1]}
    argv = ["generate", f"--model={tiny_onnx_model}", f"--prompt={prompt}"]
    code, out, err = run_cli(capsys, *argv, *(f"{name}={v}" for name, v in options.items()))
    if bad is not None:
        assert_usage_error(code, out, err)
        assert f"error: argument {bad[0]}: " in err
        return
    assert code == 0, err
    assert out.count("\n") == int(options.get("--num-samples", "1"))
    assert all(line.startswith("rnnlm: warning: ") for line in err.splitlines())


@FUZZ_CLI
@given(prompt=TEXTS, k=NUMBER_TEXTS)
def test_cli_next_prints_a_distribution_or_one_usage_error(
    model: LanguageModel, capsys: pytest.CaptureFixture[str], prompt: str, k: str
) -> None:
    argv = ["next", f"--model={model.path}", f"--prompt={prompt}", f"-k={k}"]
    code, out, err = run_cli(capsys, *argv)
    if not number_ok(k, int, 1, None, False):
        assert_usage_error(code, out, err)
        return
    assert code == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    assert all(len(row) == 2 for row in rows)
    check_distribution(model, [(w, float(p)) for w, p in rows], int(k), rounding=5e-7)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_cli")


@FUZZ_CLI
@given(
    data=st.one_of(
        st.binary(max_size=300),
        TEXTS.map(lambda t: t.encode("utf-8", "surrogatepass")),  # not valid UTF-8: Latin-1
    ),
    output=st.sampled_from([[], ["--json"], ["--per-sentence"], ["--json", "--per-sentence"]]),
)
def test_cli_score_any_bytes(
    tiny_onnx_model: Path,
    capsys: pytest.CaptureFixture[str],
    scratch: Path,
    data: bytes,
    output: list[str],
) -> None:
    path = scratch / "input.txt"
    path.write_bytes(data)
    code, out, err = run_cli(capsys, "score", f"--model={tiny_onnx_model}", *output, str(path))
    if not decode_document(data).split():
        assert code == 1 and out == ""
        assert err == f"rnnlm: error: {path}: nothing to score: the text has no words\n"
        return
    assert code == 0 and err == ""
    if "--json" in output:
        ppl = json.loads(out)["ppl"]
    else:
        ppl = float(re.fullmatch(r"perplexity (\S+) over \d+ tokens .*", out.splitlines()[-1])[1])
    assert math.isfinite(ppl) and ppl >= 1.0


@pytest.mark.parametrize(
    "name", ["no such file.txt", "bad\nname.txt", "nul\x00.txt", "\udcff.txt", "", "."]
)
def test_cli_score_unreadable_names_exit_1_on_one_line(
    tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str], scratch: Path, name: str
) -> None:
    target = str(scratch / name) if name else name
    code, out, err = run_cli(capsys, "score", f"--model={tiny_onnx_model}", target)
    assert code == 1 and out == ""
    assert err.startswith("rnnlm: error: ") and err.count("\n") == 1


def test_cli_score_a_megabyte(
    tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str], scratch: Path
) -> None:
    path = scratch / "big.txt"
    path.write_text((PROSE * (MEGABYTE // len(PROSE) + 1))[:MEGABYTE])  # one long line
    code, out, err = run_cli(capsys, "score", f"--model={tiny_onnx_model}", "--json", str(path))
    result = json.loads(out)
    assert code == 0 and err == "" and result["tokens"] > 200_000
    assert math.isfinite(result["ppl"])


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--temperature=inf"],
        ["generate", "--top-p=nan"],
        ["generate", f"--max-tokens={MAX_TOKENS + 1}"],
        ["generate", "--top-k=1\n2"],
        ["generate", "--bogus\noption"],
        ["generate", "--prompt"],
        ["next", "-k=0"],
        ["score"],
        ["runs", "--limit=0"],
        ["runs", f"--limit={MAX_LIMIT + 1}"],
        ["runs", "--limit=\x00"],
        ["frobnicate"],
    ],
)
def test_cli_bad_arguments_exit_2_on_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert_usage_error(*run_cli(capsys, *argv))


def test_cli_a_too_long_prompt_is_a_usage_error(
    tiny_onnx_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = "x" * (MAX_PROMPT_CHARS + 1)
    code, out, err = run_cli(capsys, "next", f"--model={tiny_onnx_model}", f"--prompt={prompt}")
    assert_usage_error(code, out, err)
    assert err == f"rnnlm: error: prompt: {MAX_PROMPT_CHARS + 1} characters, at most " + (
        f"{MAX_PROMPT_CHARS} (the state keeps only recent context: pass the end of the text)\n"
    )


def console(*argv: str | bytes, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real `rnnlm` entry point in a fresh interpreter; bytes arguments pass unchanged."""
    return subprocess.run(
        [sys.executable, "-m", "rnnlm.cli", *argv],
        capture_output=True,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def test_console_survives_undecodable_arguments_and_an_ascii_terminal(
    tiny_onnx_model: Path,
) -> None:
    """Bytes that are not UTF-8 reach Python as lone surrogates, and an ASCII stdout cannot
    print 'ï': either used to end in UnicodeEncodeError and a traceback."""
    done = console(
        "generate",
        f"--model={tiny_onnx_model}",
        "--prompt=caf\udce9 \udcff na\u00efve we".encode("utf-8", "surrogateescape"),
        "--max-tokens=3",
        "--seed=0",
        env={"PYTHONIOENCODING": "ascii"},
    )
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith(b"Caf\\udce9 \\udcff na\\xefve we ")
    assert done.stderr.count(b"\n") == 1 and done.stderr.startswith(b"rnnlm: warning: ")


def test_console_usage_errors_are_one_line(tiny_onnx_model: Path) -> None:
    done = console("generate", f"--model={tiny_onnx_model}", "--bogus\noption")
    assert done.returncode == 2 and b"Traceback" not in done.stderr
    last_line = done.stderr.splitlines()[-1]
    assert last_line == b"rnnlm: error: unrecognized arguments: --bogus\\noption"
