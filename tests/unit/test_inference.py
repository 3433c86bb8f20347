"""inference.py: scoring equals PyTorch, next words, incremental generation, sampling, errors;
streamed scoring (text.decode_stream, text.PieceSplitter, LanguageModel.score_stream) equals
scoring the whole text and holds a bounded amount of it.

Each model is a tiny random network exported by `tests.unit.test_export.write_model`; PyTorch's
own forward pass on the same network is the reference.
"""

from __future__ import annotations

import base64
import codecs
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnlm import export, inference, ngram
from rnnlm import text as text_module
from rnnlm.cache import CacheSettings
from rnnlm.inference import (
    _IN_FLIGHT,
    BATCH_TOKENS,
    CACHE_KEY,
    CONTEXT,
    MAX_ROWS,
    NGRAM_KEY,
    WINDOW,
    LanguageModel,
    ModelLoadError,
    SentenceScore,
    _mixed_logits,
    _ScoringSessions,
    _Stepper,
    _TwoLevel,
    cache_metadata,
    check_sampling,
    inverse_cdf,
    ngram_metadata,
    sample_next,
    segment_tokens,
    softmax,
    token_nll,
)
from rnnlm.model import RNNLM
from rnnlm.ngram import NgramSettings
from rnnlm.streams import EOS_ID, lm_pairs
from rnnlm.text import (
    MAX_PARAGRAPH_CHARS,
    READ_BYTES,
    PieceSplitter,
    TextTokenizer,
    cut_long,
    decode_document,
    decode_stream,
    detokenize,
    normalize_line_ends,
    split_paragraphs,
)
from tests.unit.test_cache import direct
from tests.unit.test_export import (
    VOCAB,
    build_net,
    one_torch_thread,  # noqa: F401 (autouse)
    write_model,
)

TEXT = "The president said that we will build a strong nation. Today congress must keep peace."


@pytest.fixture(scope="module")
def lstm(tmp_path_factory: pytest.TempPathFactory) -> tuple[LanguageModel, RNNLM]:
    net = build_net("lstm", hidden=16)
    path = write_model(tmp_path_factory.mktemp("lstm") / "model.onnx", net)
    return LanguageModel(path, threads=1), net


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory: pytest.TempPathFactory) -> LanguageModel:
    """A GRU whose most likely next token is always `<eos>` (by a wide margin)."""
    net = build_net("gru", bias={EOS_ID: 30.0})
    return LanguageModel(write_model(tmp_path_factory.mktemp("eos") / "m.onnx", net))


def torch_logits(net: RNNLM, ids: list[int]) -> np.ndarray:
    """PyTorch's logits (time, vocab) for one stream from the zero state."""
    with torch.no_grad():
        logits, _ = net(torch.tensor([ids]), net.init_state(1))
    return logits[0].double().numpy()


def ids_of(model: LanguageModel, words: list[str]) -> list[int]:
    return [model.stoi.get(w, 0) for w in words]


def test_step_carries_the_state(lstm: tuple[LanguageModel, RNNLM]) -> None:
    model, net = lstm
    ids = np.array([[1, 2, 3, 4], [1, 5, 6, 7]], dtype=np.int64)
    logits, state = model.step(ids)
    assert logits.shape == (2, 4, len(VOCAB)) and logits.dtype == np.float32
    assert [s.shape for s in state] == [(2, 2, 16), (2, 2, 16)]
    first, mid = model.step(ids[:, :2])
    second, end = model.step(ids[:, 2:], mid)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), logits, atol=1e-5)
    for got, expected in zip(end, state, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-6)
    with torch.no_grad():
        expected, _ = net(torch.from_numpy(ids), net.init_state(2))
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5)


def test_step_checks_its_arguments(lstm: tuple[LanguageModel, RNNLM]) -> None:
    model, _ = lstm
    with pytest.raises(ValueError, match="shape"):
        model.step(np.array([1, 2]))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, "):
        model.step(np.array([[len(VOCAB)]]))
    with pytest.raises(ValueError, match="state must be 2 array"):
        model.step(np.array([[1]]), model.initial_state(3))


def test_score_equals_pytorch_perplexity(lstm: tuple[LanguageModel, RNNLM]) -> None:
    model, net = lstm
    result = model.score(TEXT + " Xyzzy!")
    sentences = list(model.tokenizer.sentences(TEXT + " Xyzzy!"))
    targets = ids_of(model, [t for s in sentences for t in (*s, "<eos>")])
    logits = torch_logits(net, [EOS_ID, *targets[:-1]])
    nll = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.tensor(targets))
    assert result.tokens == len(targets) == 12 + 7 + 3
    assert result.unknown == 2  # "xyzzy" and "!"
    assert result.ppl == pytest.approx(math.exp(float(nll)), rel=1e-6)
    assert len(result.sentences) == 3
    assert sum(s.tokens for s in result.sentences) == result.tokens
    assert sum(s.nll for s in result.sentences) == pytest.approx(result.nll)
    assert result.sentences[1].text == "Today congress must keep peace."
    assert result.to_dict(per_sentence=True)["sentences"][0]["tokens"] == 12


@pytest.fixture(scope="module")
def gru_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GRU with an adaptive softmax (the shipped kind: scored target-only), where the LSTM
    has one softmax."""
    net = build_net("gru", hidden=16, cutoffs=(4, 12))
    return write_model(tmp_path_factory.mktemp("gru") / "m.onnx", net)


# Several windows of lines: empty ones, one-word ones, unknown words, long sentences.
LINES = [
    "", "We will build a strong nation.", "peace", "", "  \t ", "Congress!",
    "Today the president said that our people must keep the peace, and xyzzy will build.",
    "nation", "We.",
]  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_streamed_scoring_equals_the_per_token_reference(
    lstm: tuple[LanguageModel, RNNLM], gru_path: Path, cell: str, threads: int
) -> None:
    """Every sentence's NLL and the total, streamed (on a worker thread with 2 threads;
    float32 log-softmax in the scoring graph), equal the float64 per-token NLLs within 1e-5."""
    model = LanguageModel(lstm[0].path if cell == "lstm" else gru_path, threads=threads)
    text = "\n".join(LINES * 80)
    sentences_words = list(model.tokenizer.sentences(text))
    ids = ids_of(model, [t for s in sentences_words for t in (*s, "<eos>")])
    assert len(ids) > 10 * WINDOW
    reference = model.token_nlls(ids)
    sentences: list[SentenceScore] = []
    result = model.score_stream(chunked(text.encode(), 100), on_sentence=sentences.append)
    assert result.tokens == len(ids) and result.nll == pytest.approx(reference.sum(), rel=1e-6)
    assert [s.words for s in sentences] == [tuple(w) for w in sentences_words]
    ends = np.cumsum([s.tokens for s in sentences])
    expected = np.add.reduceat(reference, np.concatenate([[0], ends[:-1]]))
    np.testing.assert_allclose([s.nll for s in sentences], expected, rtol=1e-5)
    for one_word in ("peace", "xyzzy", "we"):
        single = model.score(one_word)
        assert single.tokens == 2  # the word and <eos>
        expected_one = model.token_nlls(ids_of(model, [one_word, "<eos>"])).sum()
        assert single.nll == pytest.approx(expected_one, rel=1e-5)


def batched_reference(model: LanguageModel, ids: list[int], rows: int) -> np.ndarray:
    """Per-token NLLs (float64) of batched scoring, one segment at a time: each segment of
    `segment_tokens(rows)` tokens read after the CONTEXT inputs before it from a zero state,
    the first one from the stream's start."""
    inputs, targets = lm_pairs(np.array(ids))
    size = segment_tokens(rows)
    out = []
    for start in range(0, len(ids), size):
        state = model.initial_state(1)
        if start:
            _, state = model.step(inputs[None, start - CONTEXT : start], state)
        logits, _ = model.step(inputs[None, start : start + size], state)
        out.append(token_nll(logits[0], targets[start : start + size]))
    return np.concatenate(out)


@pytest.mark.parametrize(("rows", "threads"), [(4, 1), (16, 2), (3, 2)])
def test_batched_scoring_equals_its_per_segment_reference(
    gru_path: Path, rows: int, threads: int
) -> None:
    """Segments side by side: every sentence's NLL and the total equal the reference that
    reads each segment alone after its context (float64, 1e-5); the sentences are those of
    exact scoring, and the perplexity stays close to it."""
    model = LanguageModel(gru_path, threads=threads)
    text = "\n".join([*LINES * 80, "We will build."])
    ids = ids_of(model, [t for s in model.tokenizer.sentences(text) for t in (*s, "<eos>")])
    assert len(ids) > 2 * BATCH_TOKENS and len(ids) % segment_tokens(rows)  # a short last row
    reference = batched_reference(model, ids, rows)
    sentences: list[SentenceScore] = []
    result = model.score_stream(chunked(text.encode(), 1000), sentences.append, rows=rows)
    assert result.tokens == len(ids) and result.nll == pytest.approx(reference.sum(), rel=1e-6)
    ends = np.cumsum([s.tokens for s in sentences])
    expected = np.add.reduceat(reference, np.concatenate([[0], ends[:-1]]))
    np.testing.assert_allclose([s.nll for s in sentences], expected, rtol=1e-5)
    exact = model.score(text)
    assert [s.words for s in sentences] == [s.words for s in exact.sentences]
    assert result.ppl == pytest.approx(exact.ppl, rel=0.02)
    one_word = model.score("peace", rows=rows)  # shorter than a segment: the exact start
    assert one_word.nll == pytest.approx(model.score("peace").nll, rel=1e-5)


def test_rows_out_of_range(gru_path: Path) -> None:
    model = LanguageModel(gru_path)
    for rows in (0, MAX_ROWS + 1, 2.0, True):
        with pytest.raises(ValueError, match=rf"rows = {rows!r}: must be an integer in \[1, "):
            model.score("we will", rows=rows)  # type: ignore[arg-type]


def test_score_ids_windows_carry_the_state(lstm: tuple[LanguageModel, RNNLM]) -> None:
    model, net = lstm
    stream = np.random.default_rng(0).integers(0, len(VOCAB), size=300)
    whole = model.score_ids(stream, window=1000)
    assert model.score_ids(stream, window=7).nll == pytest.approx(whole.nll, rel=1e-6)
    assert model.score_ids(stream).nll == pytest.approx(whole.nll, rel=1e-6)
    logits = torch_logits(net, [EOS_ID, *stream[:-1].tolist()])
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(stream), reduction="sum"
    )
    assert whole.nll == pytest.approx(float(expected), rel=1e-6)
    assert whole.tokens == 300


def test_score_of_nothing(lstm: tuple[LanguageModel, RNNLM]) -> None:
    model, _ = lstm
    with pytest.raises(ValueError, match="nothing to score"):
        model.score("  \n ")
    with pytest.raises(ValueError, match="nothing to score"):
        model.score_ids([])


def test_next_words_sorted_and_a_distribution(lstm: tuple[LanguageModel, RNNLM]) -> None:
    model, net = lstm
    top = model.next_words("the president", k=5)
    probs = [p for _, p in top]
    assert len(top) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1
    expected = softmax(torch_logits(net, [EOS_ID, *ids_of(model, ["the", "president"])])[-1])
    assert top[0] == (VOCAB[int(expected.argmax())], pytest.approx(expected.max(), rel=1e-5))
    everything = model.next_words("the president", k=1000)
    assert len(everything) == len(VOCAB)
    assert sum(p for _, p in everything) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k = 0"):
        model.next_words("the", k=0)


def test_empty_prompt_starts_a_sentence(lstm: tuple[LanguageModel, RNNLM]) -> None:
    model, net = lstm
    word, prob = model.next_words("", k=1)[0]
    expected = softmax(torch_logits(net, [EOS_ID])[-1])
    assert (word, prob) == (VOCAB[int(expected.argmax())], pytest.approx(expected.max(), rel=1e-5))
    assert model.generate("", max_tokens=0) == [""]


def test_prompt_longer_than_any_window(lstm: tuple[LanguageModel, RNNLM]) -> None:
    model, net = lstm
    words = (TEXT.lower().replace(".", " .").split() * 60)[: 3 * WINDOW + 17]
    prompt = " ".join(words)
    tokens = model.prompt_tokens(prompt)
    assert len(tokens) > 3 * WINDOW
    got = model.next_words(prompt, k=3)
    expected = softmax(torch_logits(net, [EOS_ID, *ids_of(model, tokens)])[-1])
    assert [w for w, _ in got] == [VOCAB[i] for i in np.argsort(-expected)[:3]]
    assert got[0][1] == pytest.approx(expected.max(), rel=1e-4)


def test_multi_sentence_prompt_has_eos_between_sentences(
    lstm: tuple[LanguageModel, RNNLM],
) -> None:
    model, _ = lstm
    assert model.prompt_tokens("We will build. The nation") == [
        "we", "will", "build", ".", "<eos>", "the", "nation",
    ]  # fmt: skip


def test_generation_is_deterministic_with_a_seed(lstm: tuple[LanguageModel, RNNLM]) -> None:
    model, _ = lstm
    a = model.generate("the nation", max_tokens=30, seed=3, num_samples=3)
    assert a == model.generate("the nation", max_tokens=30, seed=3, num_samples=3)
    assert len(a) == 3 and all(text.startswith("The nation") for text in a)
    assert len(set(a)) > 1  # the samples are different draws
    assert a != model.generate("the nation", max_tokens=30, seed=4, num_samples=3)


def test_greedy_generation_follows_pytorch_argmax(lstm: tuple[LanguageModel, RNNLM]) -> None:
    model, net = lstm
    ids = [EOS_ID, *ids_of(model, ["we", "will"])]
    for _ in range(12):
        ids.append(int(torch_logits(net, ids)[-1].argmax()))
    expected = " ".join(model.vocab[i] for i in ids[1:])
    text = model.generate("we will", max_tokens=12, temperature=0, include_prompt=True)[0]
    assert text == detokenize(expected.split(" "))


def test_generation_feeds_one_token_per_call(
    lstm: tuple[LanguageModel, RNNLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = lstm
    shapes: list[tuple[int, ...]] = []
    run, step = model._run, _Stepper.step

    def spy_run(ids: np.ndarray, state: tuple[np.ndarray, ...]) -> tuple:
        shapes.append(ids.shape)
        return run(ids, state)

    def spy_step(self: _Stepper, token: np.ndarray) -> np.ndarray:
        shapes.append((*token.shape, 1))
        return step(self, token)

    monkeypatch.setattr(model, "_run", spy_run)
    monkeypatch.setattr(_Stepper, "step", spy_step)
    model.generate("the president said", max_tokens=10, seed=0, num_samples=2)
    # The prompt (with its leading <eos>) once, then one token per call: never the prefix.
    assert shapes == [(1, 4)] + [(2, 1)] * 9


def reference_generate(
    model: LanguageModel, prompt: str, max_tokens: int, seed: int, **sampling: float
) -> list[int]:
    """What `generate` does, one plain session call and one `sample_next` per token."""
    rng = np.random.default_rng(seed)
    ids = [EOS_ID, *ids_of(model, model.prompt_tokens(prompt))]
    logits, state = model.step(np.array([ids]))
    out: list[int] = []
    for _ in range(max_tokens):
        token = int(sample_next(logits[:, -1], rng, **sampling)[0])  # type: ignore[arg-type]
        out.append(token)
        logits, state = model.step(np.array([[token]]), state)
    return out


@pytest.mark.parametrize(
    "sampling",
    [{}, {"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.8}, {"temperature": 1.3, "top_p": 0.5}],
)
def test_generation_through_bound_buffers_equals_plain_calls(
    lstm: tuple[LanguageModel, RNNLM], sampling: dict[str, float]
) -> None:
    """The I/O-bound stepper and the reused sampler buffers change nothing: same seed, same
    tokens as a session call and a fresh `sample_next` per token."""
    model, _ = lstm
    expected = reference_generate(model, "we will", 40, seed=5, **sampling)
    text = model.generate("we will", max_tokens=40, seed=5, include_prompt=False, **sampling)  # type: ignore[arg-type]
    assert text == [detokenize([model.vocab[i] for i in expected])]


def test_stop_at_eos(eos_model: LanguageModel) -> None:
    assert eos_model.generate("we will", max_tokens=20, seed=0, stop_at_eos=True) == ["We will"]
    texts = eos_model.generate("", max_tokens=20, seed=0, stop_at_eos=True, num_samples=4)
    assert texts == [""] * 4
    assert eos_model.generate("we will", max_tokens=5, temperature=0) == ["We will"]


def test_unknown_prompt_words_warn_once(
    lstm: tuple[LanguageModel, RNNLM], caplog: pytest.LogCaptureFixture
) -> None:
    model, _ = lstm
    with caplog.at_level(logging.WARNING, logger="rnnlm.inference"):
        texts = model.generate("xyzzy plugh xyzzy", max_tokens=8, seed=0)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "3 prompt word(s) not in the vocabulary" in caplog.text
    assert "'xyzzy', 'plugh'" in caplog.text
    assert texts[0].startswith("Xyzzy plugh xyzzy")  # the user's words, not <unk>


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature = -0.1: must be >= 0"),
        ({"temperature": float("nan")}, "temperature = nan: must be a finite number"),
        ({"temperature": float("inf")}, "temperature = inf"),
        ({"top_k": -1}, "top_k = -1"),
        ({"top_k": 1.5}, "top_k = 1.5"),
        ({"top_p": 0.0}, r"top_p = 0.0: must be in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p = 1.5"),
        ({"max_tokens": -1}, "max_tokens = -1"),
        ({"num_samples": 0}, r"num_samples = 0: must be an integer in \[1, 1000\]"),
    ],
)
def test_bad_sampling_arguments(
    lstm: tuple[LanguageModel, RNNLM], kwargs: dict[str, float], message: str
) -> None:
    model, _ = lstm
    with pytest.raises(ValueError, match=message):
        model.generate("the", **kwargs)  # type: ignore[arg-type]


def test_check_sampling_accepts_the_limits() -> None:
    check_sampling(temperature=0, top_k=0, top_p=1.0, max_tokens=0, num_samples=1)
    check_sampling(temperature=1e6, top_k=10**6, top_p=1e-9)


def frequencies(draws: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(draws, minlength=n) / len(draws)


@pytest.mark.parametrize("vocab", [7, 300, 1000])
def test_inverse_cdf_draws_the_distribution(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    p = rng.random(vocab) ** 4
    p[rng.choice(vocab, vocab // 3, replace=False)] = 0.0  # never drawn
    rows = np.repeat(p[None], 20000, axis=0)
    draws = inverse_cdf(rows, rng.random(20000))
    freq = frequencies(draws, vocab)
    assert freq[p == 0].sum() == 0
    assert np.abs(freq - p / p.sum()).max() < 0.02


def test_inverse_cdf_edges() -> None:
    p = np.zeros((3, 400))
    p[:, 5] = p[:, 399] = 1.0
    assert inverse_cdf(p, np.array([0.0, 0.4999, 0.9999999999])).tolist() == [5, 5, 399]


def test_sample_next_matches_softmax_and_respects_top_k_top_p() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 500)).astype(np.float32) * 3
    probs = softmax(logits[0])
    draws = np.concatenate([sample_next(np.repeat(logits, 500, 0), rng) for _ in range(40)])
    assert np.abs(frequencies(draws, 500) - probs).max() < 0.015
    top5 = set(np.argsort(-probs)[:5].tolist())
    draws = sample_next(np.repeat(logits, 3000, 0), rng, top_k=5)
    assert set(draws.tolist()) == top5
    nucleus = np.argsort(-probs)[: int(np.searchsorted(np.cumsum(np.sort(probs)[::-1]), 0.5)) + 1]
    draws = sample_next(np.repeat(logits, 3000, 0), rng, top_p=0.5)
    assert set(draws.tolist()) == set(nucleus.tolist())
    assert sample_next(logits, rng, top_k=1).tolist() == [int(probs.argmax())]
    assert sample_next(logits, rng, top_p=1e-9).tolist() == [int(probs.argmax())]


def full_sort_sample(
    logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float
) -> np.ndarray:
    """The reference: top-k by a full sort of each row, the nucleus by a stable full sort."""
    rows, vocab = logits.shape
    p = np.zeros((rows, vocab), dtype=np.float64 if temperature != 1 else logits.dtype)
    for r in range(rows):
        keep = np.sort(np.argsort(-logits[r], kind="stable")[: top_k or vocab])  # ties: low ids
        x = logits[r, keep] - logits[r, keep].max()
        q = np.exp(x / np.float64(temperature) if temperature != 1 else x)
        order = np.argsort(-q, kind="stable")
        ranked = q[order]
        mass_before = np.cumsum(ranked, dtype=np.float64) - ranked
        ranked[mass_before >= top_p * q.sum(dtype=np.float64)] = 0
        q[order] = ranked
        p[r, keep] = q
    return inverse_cdf(p, rng.random(rows))


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [
        (1.0, 0, 0.9),
        (1.0, 0, 0.05),
        (0.8, 0, 0.5),
        (1.0, 3, 1.0),
        (1.0, 50, 0.7),
        (2.0, 1000, 0.99),
    ],
)
def test_top_k_and_top_p_draw_what_a_full_sort_draws(
    temperature: float, top_k: int, top_p: float
) -> None:
    """Partial selection (argpartition, a growing nucleus search) draws the same tokens as
    sorting the whole vocabulary, from the same uniforms: peaked and flat rows, ties."""
    rng = np.random.default_rng(7)
    vocab = 3000
    logits = rng.normal(size=(40, vocab)).astype(np.float32) * rng.uniform(0.1, 8, (40, 1))
    logits[5, :100] = logits[5, 0]  # a tie across the nucleus boundary
    logits[6] = 0.0  # a flat row: the nucleus is a prefix in index order
    logits[7, 2999] = 40.0  # one token holds all the mass
    for _ in range(5):
        seed = int(rng.integers(1 << 30))
        got = sample_next(logits, np.random.default_rng(seed), temperature, top_k, top_p)
        want = full_sort_sample(logits, np.random.default_rng(seed), temperature, top_k, top_p)
        assert got.tolist() == want.tolist()


@pytest.mark.parametrize("temperature", [1e-30, 1e-300, 1e6, 1e300])
def test_sample_next_never_nan(temperature: float) -> None:
    rng = np.random.default_rng(0)
    logits = np.array([[50.0, -80.0, 3.0, 49.0, -1e4]], dtype=np.float32)
    draws = sample_next(np.repeat(logits, 2000, 0), rng, temperature=temperature)
    if temperature < 1:
        assert set(draws.tolist()) == {0}
    else:
        assert set(draws.tolist()) == {0, 1, 2, 3, 4}  # flat: every token


def test_temperature_zero_is_argmax() -> None:
    logits = np.random.default_rng(1).normal(size=(4, 50)).astype(np.float32)
    rng = np.random.default_rng(0)
    assert sample_next(logits, rng, temperature=0).tolist() == logits.argmax(-1).tolist()


def test_token_nll_matches_torch() -> None:
    logits = np.random.default_rng(2).normal(size=(6, 30)).astype(np.float32) * 10
    targets = np.array([0, 5, 29, 3, 3, 1])
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).double(), torch.from_numpy(targets), reduction="none"
    )
    np.testing.assert_allclose(token_nll(logits, targets), expected.numpy(), rtol=1e-9)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model file not found"):
        LanguageModel(tmp_path / "missing.onnx")
    with pytest.raises(ModelLoadError, match="not a file"):
        LanguageModel(tmp_path)
    (tmp_path / "text.onnx").write_text("hello")
    with pytest.raises(ModelLoadError, match=r"not an ONNX model \(cannot parse it\)"):
        LanguageModel(tmp_path / "text.onnx")
    plain = tmp_path / "identity.onnx"
    onnx.save(identity_model(), str(plain))
    with pytest.raises(ModelLoadError, match="an ONNX model, but not an rnnlm model"):
        LanguageModel(plain)


def identity_model() -> onnx.ModelProto:
    """A valid ONNX model that is not an rnnlm model (no metadata)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_unsupported_format_version(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.onnx", build_net("rnn_tanh"))
    model = onnx.load(str(path))
    onnx.helper.set_model_props(
        model, {**{p.key: p.value for p in model.metadata_props}, "rnnlm.format": "99"}
    )
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match="format 99, this version reads format 1"):
        LanguageModel(path)


def test_every_cell_generates_and_scores(tmp_path: Path) -> None:
    for cell in ("rnn_tanh", "rnn_relu", "gru"):
        net = build_net(cell)
        model = LanguageModel(write_model(tmp_path / f"{cell}.onnx", net))
        assert len(model.initial_state(2)) == 1
        assert model.generate("the", max_tokens=5, seed=0)[0].startswith("The")
        targets = ids_of(model, ["we", "will", "<eos>"])
        logits = torch_logits(net, [EOS_ID, *targets[:-1]])
        expected = torch.nn.functional.cross_entropy(
            torch.from_numpy(logits), torch.tensor(targets), reduction="sum"
        )
        assert model.score("We will").nll == pytest.approx(float(expected), rel=1e-5)


def test_malformed_metadata(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.onnx", build_net("gru"))
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, "rnnlm.io": '{"tokens": "tokens"}'})
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match="malformed rnnlm metadata"):
        LanguageModel(path)
    onnx.helper.set_model_props(model, {**props, "rnnlm.vocab": "[1, 2"})
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match="rnnlm metadata is not valid JSON"):
        LanguageModel(path)


def _with_props(path: Path, **changes: str) -> Path:
    """The rnnlm model at `path` with some metadata entries replaced, saved in place."""
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, **changes})
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("entry", "value", "message"),
    [
        ("rnnlm.provenance", "[" * 100_000 + "]" * 100_000, "nests more than 16 levels deep"),
        ("rnnlm.conventions", '{"a":' * 40 + "1" + "}" * 40, "nests more than 16 levels deep"),
        ("rnnlm.provenance", '"' + "x" * (64 << 20) + '"', "more than 67,108,864: not a model"),
        ("rnnlm.model", "hidden_dim", r"rnnlm\.model\.hidden_dim = 0: expected a whole number"),
        ("rnnlm.model", "num_layers", r"rnnlm\.model\.num_layers = 1e\+30: expected a whole"),
        (
            "rnnlm.model",
            "softmax_cutoffs",
            r"rnnlm\.model\.softmax_cutoffs = \[12, 4\]: expected "
            r"whole numbers increasing strictly within \[1, 23\)",
        ),
        ("rnnlm.vocab", "extra word", "has 24 words but the network's logits output scores 23"),
    ],
    ids=[
        "deep-list",
        "deep-object",
        "huge",
        "zero-dim",
        "float-layers",
        "cutoffs",
        "vocab-vs-logits",
    ],
)
def test_hostile_metadata_is_refused_before_anything_is_built(
    tmp_path: Path, entry: str, value: str, message: str
) -> None:
    path = write_model(tmp_path / "m.onnx", build_net("gru"))
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    if entry == "rnnlm.model":  # one size made insane
        config = json.loads(props[entry])
        config[value] = {"hidden_dim": 0, "softmax_cutoffs": [12, 4]}.get(value, 1e30)
        value = json.dumps(config)
    elif entry == "rnnlm.vocab":  # a vocabulary, and a model size, one word longer
        config = json.loads(props["rnnlm.model"])
        config["vocab_size"] += 1
        _with_props(path, **{"rnnlm.model": json.dumps(config)})
        value = json.dumps([*json.loads(props[entry]), "zzz"])
    _with_props(path, **{entry: value})
    with pytest.raises(ModelLoadError, match=message) as err:
        LanguageModel(path)
    assert str(err.value).startswith(f"{path}: ") and len(str(err.value)) < 300


# Streamed scoring. Under `blank_line` the hard-wrapped lines below join into one paragraph;
# CRLF and lone CR line ends, blank lines of spaces, multi-byte characters (unknown words).
PROSE = (
    "The president said that we will build a strong nation. Today congress must keep peace.\r\n"
    "  Our people will keep the peace \u2014 na\u00efve caf\u00e9, \u00fcn\u00efc\u00f6d\u00e9 "
    "\u2026 and the nation?\r\n"
    "\r\n"
    "We will build a strong nation, said the president.\n"
    "Congress must keep peace\r\nand our people must build.\r\n"
    "\r\n \t \r\n"
    "Today the nation said: \u00abwe will\u00bb. The end\r"
)


@pytest.fixture(scope="module")
def blank_line_lstm(lstm: tuple[LanguageModel, RNNLM]) -> LanguageModel:
    """The `lstm` network with a tokenizer that reads paragraphs between blank lines."""
    model = LanguageModel(lstm[0].path, threads=1)
    model.tokenizer = TextTokenizer(model.tokenizer.punkt, model.tokenizer.lowercase, "blank_line")
    return model


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def pieces_of(text: str, rule: str, limit: int) -> list[str]:
    """What the tokenizer reads of a whole text: split_paragraphs, then cut_long."""
    text = normalize_line_ends(text)
    return [p for par in split_paragraphs(text, rule) for p in cut_long(par, limit)]  # type: ignore[arg-type]


FRAGMENTS = st.sampled_from(
    ["we", "will", "a.", " ", "   ", "\t", "\n", "\r\n", "\r", "\n \n", "\u2028", "\x0c",
     "caf\u00e9", " " * 9, "x" * 7, ".", "\u2029", "\x85"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    text=st.lists(FRAGMENTS, max_size=60).map("".join),
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=8),
    rule=st.sampled_from(["line", "blank_line"]),
    limit=st.integers(2, 12),
)
def test_piece_splitter_gives_the_pieces_of_the_whole_text(
    text: str, sizes: list[int], rule: str, limit: int
) -> None:
    """Any text cut anywhere (between CR and LF too) gives the pieces of the whole text, but
    for whitespace-only ones (no words), and holds less than 4 * limit characters between
    feeds: long paragraphs and long runs of whitespace included."""
    splitter = PieceSplitter(rule, limit)  # type: ignore[arg-type]
    got: list[str] = []
    start = 0
    for i in range(len(text)):
        size = sizes[i % len(sizes)]
        if start >= len(text):
            break
        got += splitter.feed(text[start : start + size])
        start += size
        assert splitter.buffered < 4 * limit + size
    got += splitter.close()
    expected = pieces_of(text, rule, limit)
    assert [p for p in got if not p.isspace()] == [p for p in expected if not p.isspace()]


def test_piece_splitter_holds_one_piece_of_a_huge_paragraph() -> None:
    """2 MB without a line end, with a 1 MB run of spaces in it, fed as a file is read."""
    words = "we will build a strong nation. " * (1_000_000 // 31)
    text = words + " " * 1_000_000 + "today congress must keep peace."
    splitter = PieceSplitter("line")
    got: list[str] = []
    most = 0
    for start in range(0, len(text), READ_BYTES):
        got += splitter.feed(text[start : start + READ_BYTES])
        most = max(most, splitter.buffered)
    got += splitter.close()
    assert most < 4 * MAX_PARAGRAPH_CHARS
    expected = pieces_of(text, "line", MAX_PARAGRAPH_CHARS)
    assert [p for p in got if not p.isspace()] == [p for p in expected if not p.isspace()]
    assert len(got) < len(expected)  # the pieces of nothing but spaces were never made


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=80), size=st.integers(1, 9))
def test_decode_stream_of_a_short_input_is_decode_document(data: bytes, size: int) -> None:
    """Up to SNIFF_BYTES the whole-input rule holds exactly: UTF-8 (BOM dropped), else Latin-1."""
    text = "".join(decode_stream(chunked(data, size)))
    assert text.replace("\r\n", "\n").replace("\r", "\n") == decode_document(data)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60), bom=st.booleans(), size=st.integers(1, 9))
def test_decode_stream_of_long_utf8_input_cut_anywhere(text: str, bom: bool, size: int) -> None:
    """Past the sniffed head, multi-byte characters split across chunks still decode."""
    data = codecs.BOM_UTF8 * bom + text.encode("utf-8", "surrogatepass").replace(b"\xed", b"")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return  # removing the surrogates' lead bytes left stray continuation bytes
    decoded = "".join(decode_stream(chunked(data, size), sniff=4))
    assert decoded == data.decode("utf-8-sig").replace("\x85", "\n")  # UTF-8's NEL ends a line


def test_decode_stream_past_the_head(caplog: pytest.LogCaptureFixture) -> None:
    """A long input whose head is UTF-8 switches to Latin-1 at the first byte that is not."""
    data = b"abcdefgh" + "\u00e9".encode() + b"ij" + "\u00e9x".encode("latin-1") + "\u00e9".encode()
    with caplog.at_level(logging.WARNING, logger="rnnlm.text"):
        text = "".join(decode_stream(chunked(data, 3), "big.txt", sniff=8))
    assert text == "abcdefgh\u00e9ij\u00e9x\u00c3\u00a9"  # UTF-8, then Latin-1 from byte 12 on
    assert caplog.messages == [
        "big.txt: byte 12 is not UTF-8 (the first 9 bytes were): read as Latin-1 from there"
    ]
    caplog.clear()
    latin = "caf\u00e9 na\u00efve \u00e9t\u00e9".encode("latin-1")
    assert "".join(decode_stream(chunked(latin, 2), sniff=6)) == decode_document(latin)
    assert caplog.messages == []  # not UTF-8 from the head on: Latin-1 throughout, silently
    assert "".join(decode_stream(chunked(b"abcdefgh\xc3", 2), "f", sniff=4)) == "abcdefgh\u00c3"
    assert caplog.messages == ["f: the last 1 byte(s) are not UTF-8: read as Latin-1"]


@pytest.mark.parametrize("rule", ["line", "blank_line"])
def test_score_stream_equals_scoring_the_whole_text(
    lstm: tuple[LanguageModel, RNNLM], blank_line_lstm: LanguageModel, rule: str
) -> None:
    """Chunks smaller than a paragraph, cut inside multi-byte characters and between CR and
    LF: the same sentences, tokens and perplexity as the whole text, for both paragraph rules."""
    model = lstm[0] if rule == "line" else blank_line_lstm
    data = (PROSE * 8).encode()
    whole = model.score(decode_document(data))
    assert whole.tokens > 2 * WINDOW  # several windows, sentences across their boundaries
    tokens = [t for s in model.tokenizer.sentences(decode_document(data)) for t in (*s, "<eos>")]
    reference = model.token_nlls(ids_of(model, tokens)).sum()  # float64 throughout
    assert whole.nll == pytest.approx(reference, rel=1e-6)
    assert any(0x80 <= data[i] < 0xC0 for i in range(5, len(data), 5))  # inside a character
    assert any(data[i - 1 : i + 1] == b"\r\n" for i in range(3, len(data), 3))  # inside CRLF
    for size in (1, 3, 5, 64, READ_BYTES):
        sentences: list[SentenceScore] = []
        streamed = model.score_stream(chunked(data, size), on_sentence=sentences.append)
        assert (streamed.tokens, streamed.unknown) == (whole.tokens, whole.unknown)
        assert streamed.nll == pytest.approx(whole.nll, rel=1e-9)
        assert streamed.bytes == len(data) and streamed.seconds is not None
        assert streamed.sentences == []  # given to on_sentence instead
        assert [(s.words, s.tokens) for s in sentences] == [
            (s.words, s.tokens) for s in whole.sentences
        ]
        for got, expected in zip(sentences, whole.sentences, strict=True):
            assert got.nll == pytest.approx(expected.nll, rel=1e-9)
    assert model.score_stream(io.BytesIO(data)).nll == pytest.approx(whole.nll, rel=1e-9)


def test_the_paragraph_rules_read_prose_differently(
    lstm: tuple[LanguageModel, RNNLM], blank_line_lstm: LanguageModel
) -> None:
    data = PROSE.encode()
    by_line = lstm[0].score_stream([data])
    by_block = blank_line_lstm.score_stream([data])
    assert by_block.tokens == by_line.tokens - 1  # "... keep peace / and our ...": one sentence


@pytest.mark.parametrize("threads", [1, 2])
def test_score_stream_scores_while_it_reads(
    lstm: tuple[LanguageModel, RNNLM], monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """Each sentence is scored soon after its bytes are read: an implementation that read
    the whole input first (or tokenized it all first) fails at the first sentence. With two
    threads the windows are scored on a worker thread, a few of them in flight at once."""
    model = LanguageModel(lstm[0].path, threads=threads)
    monkeypatch.setattr(text_module, "SNIFF_BYTES", 4096)
    paragraph = b"We will build a strong nation. Today congress must keep peace. " * 3 + b"\n"
    data = paragraph * 2000  # 380 kB, 6 sentences a paragraph
    read = 0

    def source() -> Iterator[bytes]:
        nonlocal read
        for chunk in chunked(data, 1000):
            read += len(chunk)
            yield chunk

    windows: list[int] = []
    score = _ScoringSessions.score

    def spy(self: _ScoringSessions, inputs: np.ndarray, state: tuple, targets: np.ndarray) -> tuple:
        windows.append(inputs.shape[1])
        return score(self, inputs, state, targets)

    monkeypatch.setattr(_ScoringSessions, "score", spy)
    lags: list[int] = []

    def on_sentence(sentence: SentenceScore) -> None:
        ends_by = (len(lags) // 6 + 1) * len(paragraph)  # the end of its paragraph
        lags.append(read - ends_by)

    result = model.score_stream(source(), on_sentence)
    assert len(lags) == 6 * 2000 and result.bytes == len(data)
    # Ahead of the scored sentences: the sniffed head, a chunk, a paragraph, the windows in
    # flight and the one being filled (5 bytes a token).
    in_flight = _IN_FLIGHT if threads > 1 else 1
    assert max(lags) < 4096 + 1000 + len(paragraph) + (in_flight + 1) * WINDOW * 5
    assert max(lags) < len(data) // 20
    assert windows == [WINDOW] * (result.tokens // WINDOW) + [result.tokens % WINDOW]


class ReadRecorder(io.RawIOBase):
    """A binary file that refuses to be read whole and records the reads."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb")
        self.sizes: list[int] = []

    def read(self, size: int = -1) -> bytes:
        assert 0 < size <= inference.READ_BYTES, f"read({size})"
        self.sizes.append(size)
        return self._file.read(size)

    def close(self) -> None:
        self._file.close()


def test_score_stream_memory_does_not_grow_with_the_input(
    lstm: tuple[LanguageModel, RNNLM], tmp_path: Path
) -> None:
    """8 MiB (a line of spaces between two sentences), read READ_BYTES at a time, never whole:
    at most about 2 MiB allocated (the sniffed head of SNIFF_BYTES and its text)."""
    model, _ = lstm
    path = tmp_path / "big.txt"
    with path.open("wb") as out:
        out.write(b"We will build a strong nation.\n")
        for _ in range(128):
            out.write(b" " * (1 << 16))
        out.write(b"\nToday congress must keep peace.\n")
    source = ReadRecorder(path)
    tracemalloc.start()
    try:
        result = model.score_stream(source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        source.close()
    assert result.bytes == path.stat().st_size > 8 << 20
    two_sentences = "We will build a strong nation.\nToday congress must keep peace."
    assert result.tokens == model.score(two_sentences).tokens
    assert peak < 3 * text_module.SNIFF_BYTES < result.bytes // 2


@pytest.mark.parametrize("rows", [1, 4])
def test_streamed_scoring_memory_is_bounded_by_its_buffers(
    lstm: tuple[LanguageModel, RNNLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: int
) -> None:
    """A generated input of a few hundred windows, read through a 4 kB buffer (a 16 kB sniffed
    head) with two threads (the scoring worker): what it holds (windows or batches in flight, open
    sentences, the reads) stays under 200 kB, less than half the input."""
    monkeypatch.setattr(inference, "READ_BYTES", 4096)
    monkeypatch.setattr(text_module, "SNIFF_BYTES", 16384)
    model = LanguageModel(lstm[0].path, threads=2)
    rng = np.random.default_rng(0)
    words = np.array(["we", "will", "build", "a", "strong", "nation", "peace", "congress"])
    lines = [" ".join(rng.choice(words, rng.integers(1, 30))) + "." for _ in range(6_000)]
    path = tmp_path / "generated.txt"
    path.write_text("\n".join(lines))
    model.score("we will")  # builds the scoring sessions: memory of the model, not the input
    source = ReadRecorder(path)
    tracemalloc.start()
    try:
        result = model.score_stream(source, rows=rows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        source.close()
    assert result.tokens > 300 * WINDOW and result.tokens == 2 * 6_000 + sum(
        line.count(" ") + 1 for line in lines
    )
    assert max(source.sizes) == 4096 and result.bytes == path.stat().st_size
    assert peak < 200_000 < result.bytes // 2, peak


def test_score_stream_refusals(lstm: tuple[LanguageModel, RNNLM], tmp_path: Path) -> None:
    model, _ = lstm
    with pytest.raises(ValueError, match="nothing to score: the text has no words"):
        model.score_stream([b" \n\t", b"\r\n"])
    with pytest.raises(ValueError, match="nothing to score"):
        model.score_stream(io.BytesIO(b""))
    with pytest.raises(ValueError, match=r"source = 'we will': expected a binary file"):
        model.score_stream("we will")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk 'we': expected bytes, got str"):
        model.score_stream(["we"])  # type: ignore[list-item]
    (tmp_path / "t.txt").write_text("we will")
    with (tmp_path / "t.txt").open() as text_file, pytest.raises(ValueError, match="binary mode"):
        model.score_stream(text_file)  # type: ignore[arg-type]


# The continuous cache (rnnlm.cache) in scoring and next words.
CACHE = CacheSettings(window=40, theta=0.5, lam=0.3)


def with_cache_entry(path: Path, entry: str) -> Path:
    """The model at `path` with its `rnnlm.cache` metadata set to `entry` (JSON), in place."""
    export.attach_metadata(path, {CACHE_KEY: entry})
    return path


@pytest.fixture(scope="module")
def cached(
    lstm: tuple[LanguageModel, RNNLM], tmp_path_factory: pytest.TempPathFactory
) -> LanguageModel:
    """The `lstm` network as the export stage ships it once tuned: CACHE in its metadata."""
    path = tmp_path_factory.mktemp("cached") / "model.onnx"
    shutil.copyfile(lstm[0].path, path)
    return LanguageModel(with_cache_entry(path, json.dumps(cache_metadata(CACHE))), threads=1)


def test_cache_settings_round_trip_through_the_metadata(
    lstm: tuple[LanguageModel, RNNLM], cached: LanguageModel
) -> None:
    plain = lstm[0]
    assert plain.tuned_cache is None and plain.cache is None and plain.new_cache() is None
    assert cached.tuned_cache == CACHE and cached.cache == CACHE  # on by default
    off = LanguageModel(cached.path, cache=False)
    assert off.tuned_cache == CACHE and off.cache is None and off.new_cache() is None
    other = CacheSettings(5, 1.0, 0.5)
    assert LanguageModel(cached.path, cache=other).cache == other
    assert LanguageModel(plain.path, cache=other).cache == other  # any model with `hidden`
    assert LanguageModel(cached.path, cache=CacheSettings(5, 1.0, 0.0)).cache is None
    assert cache_metadata(None) is None and cache_metadata(CacheSettings(5, 1.0, 0.0)) is None
    with pytest.raises(ValueError, match="cache = 'yes': expected True, False or a CacheSettings"):
        LanguageModel(cached.path, cache="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache = None: expected True or False"):
        cached.token_nlls([2, 3], cache=None)  # type: ignore[arg-type]


def test_scoring_with_the_cache_follows_the_formula(
    lstm: tuple[LanguageModel, RNNLM], cached: LanguageModel
) -> None:
    """token_nlls / score_ids mix the network with the cache as the paper's formula says, the
    same in windows of any size; cache=False gives the network alone."""
    plain, net = lstm
    stream = np.random.default_rng(4).integers(0, 6, size=300) + 2  # few words: they repeat
    logp, hidden = plain.logprobs_and_hidden(stream)
    with torch.no_grad():
        inputs = torch.tensor([[EOS_ID, *stream[:-1].tolist()]])
        _, _, expected_hidden = net.forward_with_hidden(inputs, net.init_state(1))
    np.testing.assert_allclose(hidden, expected_hidden[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(logp, -plain.token_nlls(stream), rtol=1e-12)
    expected = -direct(logp, hidden, stream, CACHE)
    for window in (7, 256, 1000):
        np.testing.assert_allclose(cached.token_nlls(stream, window), expected, rtol=1e-6)
    assert cached.score_ids(stream).nll == pytest.approx(expected.sum(), rel=1e-6)
    assert cached.score_ids(stream, cache=False).nll == pytest.approx(-logp.sum(), rel=1e-12)
    assert cached.score_ids(stream).nll < -logp.sum()  # repeated words: the cache helps


def test_score_and_score_stream_use_the_cache(cached: LanguageModel) -> None:
    data = (PROSE * 8).encode()
    text = decode_document(data)
    whole = cached.score(text)
    tokens = [t for s in cached.tokenizer.sentences(text) for t in (*s, "<eos>")]
    assert whole.tokens == len(tokens) > 2 * WINDOW
    assert whole.nll == pytest.approx(cached.token_nlls(ids_of(cached, tokens)).sum(), rel=1e-6)
    plain = LanguageModel(cached.path, cache=False).score(text)
    assert plain.nll == pytest.approx(cached.token_nlls(ids_of(cached, tokens), cache=False).sum())
    assert whole.nll < plain.nll
    sentences: list[SentenceScore] = []
    streamed = cached.score_stream(chunked(data, 7), on_sentence=sentences.append)
    assert streamed.nll == pytest.approx(whole.nll, rel=1e-9)
    assert [s.nll for s in sentences] == pytest.approx([s.nll for s in whole.sentences], rel=1e-9)


def test_next_words_with_the_cache(
    lstm: tuple[LanguageModel, RNNLM], cached: LanguageModel
) -> None:
    """The mixed distribution after a prompt whose words fill the cache: the network's, mixed
    with the words that followed the prompt's positions, weighted by their likeness."""
    plain = lstm[0]
    prompt = "we will build a strong nation. we will build a strong nation. we will build a strong"
    mixed = dict(cached.next_words(prompt, k=len(VOCAB)))
    alone = dict(plain.next_words(prompt, k=len(VOCAB)))
    assert sum(mixed.values()) == pytest.approx(1.0)
    ids = ids_of(plain, plain.prompt_tokens(prompt))
    _, hidden = plain.logprobs_and_hidden([*ids, 0])  # the last position is the query
    keys, words, query = hidden[:-1][-CACHE.window :], np.array(ids[-CACHE.window :]), hidden[-1]
    weights = np.exp(CACHE.theta * (keys @ query - (keys @ query).max()))
    for word, p in mixed.items():
        p_cache = weights[words == plain.stoi[word]].sum() / weights.sum()
        assert p == pytest.approx((1 - CACHE.lam) * alone[word] + CACHE.lam * p_cache, rel=1e-5)
    assert mixed["nation"] > alone["nation"]  # it followed "strong" twice in the prompt
    assert dict(LanguageModel(cached.path, cache=False).next_words(prompt, k=3)) == {
        w: pytest.approx(p, rel=1e-6) for w, p in plain.next_words(prompt, k=3)
    }


def test_generation_draws_from_the_network_mixed_with_its_cache(
    lstm: tuple[LanguageModel, RNNLM], cached: LanguageModel
) -> None:
    """Greedy generation with the cache picks, at each step, the most likely word of the mixed
    distribution over everything before it (prompt and generated words), computed here from
    whole sequences fed at once; each sample keeps its own cache."""
    plain = lstm[0]
    prompt = "we will build a strong nation. we will build a strong"
    ids = ids_of(plain, plain.prompt_tokens(prompt))
    for _ in range(12):
        logits, _ = plain.step(np.array([[EOS_ID, *ids]]))
        _, hidden = plain.logprobs_and_hidden([*ids, 0])  # the last position is the query
        keys, words, query = (
            hidden[:-1][-CACHE.window :],
            np.array(ids[-CACHE.window :]),
            hidden[-1],
        )
        weights = np.exp(CACHE.theta * (keys @ query - (keys @ query).max()))
        p_cache = np.bincount(words, weights=weights, minlength=plain.vocab_size) / weights.sum()
        mixed = (1 - CACHE.lam) * softmax(logits[0, -1]) + CACHE.lam * p_cache
        ids.append(int(mixed.argmax()))
    generated = ids[-12:]
    expected = detokenize([plain.vocab[i] for i in generated])
    greedy = cached.generate(prompt, max_tokens=12, temperature=0, include_prompt=False)
    assert greedy == [expected]
    alone = plain.generate(prompt, max_tokens=12, temperature=0, include_prompt=False)
    assert (
        LanguageModel(cached.path, cache=False).generate(
            prompt, max_tokens=12, temperature=0, include_prompt=False
        )
        == alone
    )
    assert (
        cached.generate(prompt, max_tokens=12, temperature=0, include_prompt=False, num_samples=3)
        == [expected] * 3
    )
    # Sampling draws from the mixture: with a seed, repeatable, and each sample its own text.
    samples = cached.generate(prompt, max_tokens=30, seed=5, num_samples=3)
    assert samples == cached.generate(prompt, max_tokens=30, seed=5, num_samples=3)
    assert len(set(samples)) == 3


def without_hidden_output(path: Path) -> Path:
    """The model as exported before the cache: no `hidden` output, no `hidden` in rnnlm.io."""
    model = onnx.load(str(path))
    kept = [o for o in model.graph.output if o.name != "hidden"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    props = {p.key: p.value for p in model.metadata_props}
    io_entry = {k: v for k, v in json.loads(props["rnnlm.io"]).items() if k != "hidden"}
    del props[CACHE_KEY]
    onnx.helper.set_model_props(model, {**props, "rnnlm.io": json.dumps(io_entry)})
    onnx.save(model, str(path))
    return path


def test_a_model_exported_before_the_cache_scores_without_it(
    tmp_path: Path, lstm: tuple[LanguageModel, RNNLM]
) -> None:
    path = without_hidden_output(write_model(tmp_path / "old.onnx", lstm[1]))
    old = LanguageModel(path)
    assert old.tuned_cache is None and old.cache is None
    assert old.score(TEXT).nll == pytest.approx(lstm[0].score(TEXT).nll, rel=1e-9)
    assert old.next_words("we", k=2) == lstm[0].next_words("we", k=2)
    with pytest.raises(ModelLoadError, match="no 'hidden' output, which the continuous cache"):
        LanguageModel(path, cache=CACHE)
    with_cache_entry(path, json.dumps(cache_metadata(CACHE)))
    with pytest.raises(ModelLoadError, match=r"rnnlm\.cache is set but the network has no"):
        LanguageModel(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('{"window": 0, "theta": 0.3, "lambda": 0.1}', r"window = 0: must be an integer in \[1,"),
        ('{"window": 500.0, "theta": 0.3, "lambda": 0.1}', "window = 500.0: must be an integer"),
        ('{"window": 500, "theta": -1, "lambda": 0.1}', r"theta = -1: must be a number in \(0,"),
        ('{"window": 500, "theta": "0.3", "lambda": 0.1}', "theta = '0.3': must be a number"),
        ('{"window": 500, "theta": 0.3, "lambda": 1}', r"lambda = 1: must be a number in \[0, 1\)"),
        ('{"window": 500, "theta": 0.3}', "expected null or an object with exactly the keys"),
        ('{"window": 5, "theta": 1, "lambda": 0.1, "x": 1}', "exactly the keys lambda, theta"),
        ("[500, 0.3, 0.1]", r"rnnlm\.cache = \[500, 0\.3, 0\.1\]: expected null or an object"),
    ],
)
def test_bad_cache_metadata_is_refused_in_one_line(
    tmp_path: Path, lstm: tuple[LanguageModel, RNNLM], entry: str, message: str
) -> None:
    path = with_cache_entry(write_model(tmp_path / "m.onnx", lstm[1]), entry)
    with pytest.raises(ModelLoadError, match=message) as err:
        LanguageModel(path, cache=False)  # refused even when not used: the file is wrong
    assert str(err.value).startswith(f"{path}: rnnlm metadata rnnlm.cache")
    assert "\n" not in str(err.value) and len(str(err.value)) < 300
    assert LanguageModel(with_cache_entry(path, "null")).tuned_cache is None


# The n-gram the tests mix in: counted on a stream over the tiny vocabulary that repeats a few
# word orders, so it knows trigrams the random network does not.
NGRAM_WEIGHT = 0.4


@pytest.fixture(scope="module")
def kn_model() -> ngram.KneserNey:
    rng = np.random.default_rng(21)
    stream = np.concatenate([rng.permutation(np.arange(2, 9))[:5] for _ in range(200)])
    return ngram.fit_kneser_ney(stream, len(VOCAB), order=3)


def with_ngram_entry(path: Path, entry: str) -> Path:
    """The model at `path` with its `rnnlm.ngram` metadata set to `entry` (JSON), in place."""
    export.attach_metadata(path, {NGRAM_KEY: entry})
    return path


@pytest.fixture(scope="module")
def mixed(
    cached: LanguageModel, kn_model: ngram.KneserNey, tmp_path_factory: pytest.TempPathFactory
) -> LanguageModel:
    """The `cached` model with the n-gram in its metadata too: the whole shipped mixture."""
    path = tmp_path_factory.mktemp("mixed") / "model.onnx"
    shutil.copyfile(cached.path, path)
    entry = json.dumps(ngram_metadata(NgramSettings(kn_model, NGRAM_WEIGHT)))
    return LanguageModel(with_ngram_entry(path, entry), threads=1)


def test_ngram_round_trips_through_the_metadata(
    mixed: LanguageModel, kn_model: ngram.KneserNey, cached: LanguageModel
) -> None:
    shipped = mixed.tuned_ngram
    assert shipped is not None and mixed.ngram == shipped and shipped.weight == NGRAM_WEIGHT
    assert shipped.model.order == 3 and shipped.model.discount == "modified"
    stream = np.random.default_rng(22).integers(0, len(VOCAB), 200)
    assert shipped.model.logprobs(stream) == pytest.approx(kn_model.logprobs(stream), abs=0)
    assert cached.tuned_ngram is None and cached.new_ngram() is None
    off = LanguageModel(mixed.path, ngram=False)
    assert off.tuned_ngram is not None and off.tuned_ngram.weight == NGRAM_WEIGHT
    assert off.ngram is None and off.new_ngram() is None
    assert off.cache == CACHE  # each part of the mixture is switched on its own
    assert ngram_metadata(None) is None
    with pytest.raises(ValueError, match="ngram = 1: expected True or False"):
        LanguageModel(mixed.path, ngram=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ngram = 'no': expected True or False"):
        mixed.token_nlls([2, 3], ngram="no")  # type: ignore[arg-type]


def test_scoring_mixes_the_cached_network_with_the_ngram(
    mixed: LanguageModel, kn_model: ngram.KneserNey
) -> None:
    """p = (1 - w) p_cached + w p_kn for every token, whatever the window; every switch
    leaves its own part out; score and score_stream score text as token_nlls scores ids."""
    stream = np.random.default_rng(23).integers(2, 9, size=300)
    cached_logp = -mixed.token_nlls(stream, ngram=False)
    network_logp = -mixed.token_nlls(stream, cache=False, ngram=False)
    kn_logp = kn_model.logprobs(stream)
    expected = np.log((1 - NGRAM_WEIGHT) * np.exp(cached_logp) + NGRAM_WEIGHT * np.exp(kn_logp))
    for window in (7, 256, 1000):
        np.testing.assert_allclose(-mixed.token_nlls(stream, window), expected, rtol=1e-6)
    alone = np.log((1 - NGRAM_WEIGHT) * np.exp(network_logp) + NGRAM_WEIGHT * np.exp(kn_logp))
    np.testing.assert_allclose(-mixed.token_nlls(stream, cache=False), alone, rtol=1e-9)
    assert mixed.score_ids(stream).nll == pytest.approx(-expected.sum(), rel=1e-9)
    data = (PROSE * 8).encode()
    text = decode_document(data)
    tokens = [t for s in mixed.tokenizer.sentences(text) for t in (*s, "<eos>")]
    whole = mixed.score(text)
    assert whole.nll == pytest.approx(mixed.token_nlls(ids_of(mixed, tokens)).sum(), rel=1e-6)
    streamed = mixed.score_stream(chunked(data, 7))
    assert streamed.nll == pytest.approx(whole.nll, rel=1e-9)
    # Batched scoring (no cache: it needs one stream in order) keeps the n-gram's history
    # exact: the same n-gram side as exact scoring, the network side read in segments.
    no_cache = LanguageModel(mixed.path, cache=False)
    network_rows = LanguageModel(mixed.path, cache=False, ngram=False)
    ids = ids_of(mixed, tokens)
    for rows in (1, 4):
        batched = no_cache.score(text, rows=rows)
        plain = network_rows.score(text, rows=rows)
        assert batched.tokens == plain.tokens == len(ids)
        assert batched.nll != pytest.approx(plain.nll, rel=1e-3)  # the n-gram is in it
    assert no_cache.score(text, rows=1).nll == pytest.approx(
        no_cache.token_nlls(ids, cache=False).sum(), rel=1e-6
    )


def test_next_words_and_generation_draw_from_the_whole_mixture(
    mixed: LanguageModel, kn_model: ngram.KneserNey
) -> None:
    prompt = "we will build a strong nation. we will build a strong"
    ids = ids_of(mixed, mixed.prompt_tokens(prompt))
    got = dict(mixed.next_words(prompt, k=len(VOCAB)))
    before = dict(LanguageModel(mixed.path, ngram=False).next_words(prompt, k=len(VOCAB)))
    kn_next = kn_model.distribution(ids)
    assert sum(got.values()) == pytest.approx(1.0)
    for word, p in got.items():
        expected = (1 - NGRAM_WEIGHT) * before[word] + NGRAM_WEIGHT * kn_next[mixed.stoi[word]]
        assert p == pytest.approx(expected, rel=1e-5), word
    # Greedy generation with the n-gram (no cache): each step's argmax of the mixture of the
    # network's distribution after the whole sequence and the n-gram's after its last words.
    no_cache = LanguageModel(mixed.path, cache=False)
    sequence = list(ids)
    for _ in range(10):
        logits, _ = no_cache.step(np.array([[EOS_ID, *sequence]]))
        p = (1 - NGRAM_WEIGHT) * softmax(logits[0, -1]) + NGRAM_WEIGHT * kn_model.distribution(
            sequence
        )
        sequence.append(int(p.argmax()))
    expected_text = detokenize([mixed.vocab[i] for i in sequence[-10:]])
    greedy = no_cache.generate(
        prompt, max_tokens=10, temperature=0, include_prompt=False, num_samples=2
    )
    assert greedy == [expected_text] * 2
    samples = mixed.generate(prompt, max_tokens=20, seed=3, num_samples=3)
    assert samples == mixed.generate(prompt, max_tokens=20, seed=3, num_samples=3)


def _tampered(entry: dict, **changes: object) -> str:
    return json.dumps({**entry, **changes})


def test_bad_ngram_metadata_is_refused_in_one_line(
    tmp_path: Path, lstm: tuple[LanguageModel, RNNLM], kn_model: ngram.KneserNey
) -> None:
    good = ngram_metadata(NgramSettings(kn_model, NGRAM_WEIGHT))
    assert good is not None
    damaged = ngram.KneserNey.to_bytes(
        dataclasses.replace(kn_model, keys={**kn_model.keys, 3: kn_model.keys[3][::-1].copy()})
    )
    cases = [
        (_tampered(good, weight=1.0), r"weight = 1\.0: must be a number in \(0, 1\)"),
        (_tampered(good, weight="0.4"), r"weight = '0\.4': must be a number"),
        (_tampered(good, tables=good["tables"][:-8] + "AAAAAAAA"), "do not match their sha256"),
        (_tampered(good, tables="not base64!"), r"rnnlm\.ngram\.tables is not base64"),
        (_tampered(good, order=2), r"tables \[.*\], expected"),
        (_tampered(good, discount="kenlm"), "discount = 'kenlm'"),
        (json.dumps({k: v for k, v in good.items() if k != "sha256"}), "exactly the keys"),
        ("[3, 0.4]", r"rnnlm\.ngram = \[3, 0\.4\]: expected null or an object"),
        (
            _tampered(
                good,
                tables=base64.b64encode(damaged).decode(),
                sha256=hashlib.sha256(damaged).hexdigest(),
            ),
            "keys3: keys must be strictly increasing",
        ),
    ]
    path = write_model(tmp_path / "m.onnx", lstm[1])
    for entry, message in cases:
        with_ngram_entry(path, entry)
        with pytest.raises(ModelLoadError, match=message) as err:
            LanguageModel(path, ngram=False)  # refused even when not used: the file is wrong
        assert str(err.value).startswith(f"{path}: rnnlm metadata rnnlm.ngram")
        assert "\n" not in str(err.value) and len(str(err.value)) < 400
    assert LanguageModel(with_ngram_entry(path, "null")).tuned_ngram is None


def test_freed_heap_pages_go_back_to_the_system_after_a_session_is_built() -> None:
    """Building a session frees the parsed model file; on glibc those pages stay mapped until
    malloc_trim gives them back, which `_return_freed_memory` calls. Here: 64 MB of 64 KB
    blocks (below glibc's mmap threshold: heap memory), every other one freed."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        inference._return_freed_memory()  # elsewhere a no-op, never an error
        return
    assert inference._MALLOC_TRIM is not None

    def resident_mb() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(1024)]
    try:
        for block in blocks:
            ctypes.memset(block, 1, 64 * 1024)  # touched: resident
        for block in blocks[::2]:
            libc.free(block)
        kept = resident_mb()  # freed between live blocks: still mapped
        inference._return_freed_memory()
        assert kept - resident_mb() > 16  # of the 32 MB freed
    finally:
        for block in blocks[1::2]:
            libc.free(block)


@pytest.fixture(scope="module")
def adaptive_mixed(
    gru_path: Path, kn_model: ngram.KneserNey, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The adaptive GRU with the cache and the n-gram in its metadata: the shipped kind."""
    path = tmp_path_factory.mktemp("adaptive_mixed") / "model.onnx"
    shutil.copyfile(gru_path, path)
    with_cache_entry(path, json.dumps(cache_metadata(CACHE)))
    entry = json.dumps(ngram_metadata(NgramSettings(kn_model, NGRAM_WEIGHT)))
    return with_ngram_entry(path, entry)


@pytest.mark.parametrize("mixture", [False, True], ids=["network", "cache+ngram"])
def test_two_level_sampling_draws_what_every_words_probability_gives(
    adaptive_mixed: Path, mixture: bool
) -> None:
    """A draw from the head, then from a tail cluster for the rows that land on it (and,
    in the mixture, from the n-gram's and the cache's parts first): 20,000 draws after a
    prompt follow the distribution computed over every word (total variation < 0.03; their
    sampling noise is about 0.013), tail words included."""
    model = LanguageModel(adaptive_mixed, threads=1, cache=mixture, ngram=mixture)
    two_level = model._two_level_sampler()
    assert two_level is not None
    stream = np.array([[EOS_ID, *ids_of(model, model.prompt_tokens("we will build a strong"))]])
    logits, _ = model.step(stream)
    head_logprob, hidden = two_level.head.run(
        [two_level.output, model.hidden_output],
        {"tokens": stream, "h0": model.initial_state(1)[0]},
    )
    caches, ngrams = [], []
    if mixture:
        cache = model.new_cache()
        ngram_mixer = model.new_ngram(stream[0, 1:])
        assert cache is not None and ngram_mixer is not None
        cache.extend(hidden[0, :-1], stream[0, 1:])  # each vector and the word after it
        caches, ngrams = [cache], [ngram_mixer]
    query = hidden[:, -1]
    expected = softmax(_mixed_logits(logits[:, -1], query, caches, ngrams)[0].astype(np.float64))
    n = 20_000
    tokens = two_level.draw(np.repeat(head_logprob[:, -1], n, axis=0), np.repeat(query, n, axis=0),
                            caches * n, ngrams * n, np.random.default_rng(7))  # fmt: skip
    freq = np.bincount(tokens, minlength=model.vocab_size) / n
    assert 0.5 * np.abs(freq - expected).sum() < 0.03
    assert freq[model.softmax_cutoffs[0] :].sum() > 0.2, "the tails are hardly drawn: no test"


def test_generation_samples_an_adaptive_softmax_in_two_levels(
    adaptive_mixed: Path, lstm: tuple[LanguageModel, RNNLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain sampling (temperature 1, no top-k or top-p) goes through the head and tail
    graphs after the first token, once they are built (`prepare_generation`, or a call that
    draws enough tokens to pay for building them); any other sampling draws from every
    word's probability."""
    draws: list[int] = []
    real = _TwoLevel.draw

    def counted(self: _TwoLevel, *args: Any) -> np.ndarray:
        draws.append(len(args[0]))
        return real(self, *args)

    monkeypatch.setattr(_TwoLevel, "draw", counted)
    model = LanguageModel(adaptive_mixed, threads=1)
    model.generate("we will", max_tokens=6, seed=2)
    assert draws == [], "a short call built the two levels: it costs more than it saves"
    many = inference.TWO_LEVEL_MIN_TOKENS // 2
    model.generate("we will", max_tokens=2, seed=2, num_samples=many)
    assert draws == [many], "a long call samples in two levels"
    draws.clear()
    other = LanguageModel(adaptive_mixed, threads=1)
    assert other.prepare_generation()
    samples = other.generate("we will", max_tokens=6, seed=2, num_samples=3)
    assert draws == [3] * 5 and len(set(samples)) > 1
    assert samples == other.generate("we will", max_tokens=6, seed=2, num_samples=3)
    draws.clear()
    other.generate("we will", max_tokens=6, seed=2, top_k=5)
    other.generate("we will", max_tokens=6, seed=2, temperature=0.7)
    assert draws == []
    assert not lstm[0].prepare_generation()  # one softmax: nothing to sample in two levels
