"""inference.py: scoring equals PyTorch, next words, incremental generation, sampling, errors.

Each model is a tiny random network exported by `tests.unit.test_export.write_model`; PyTorch's
own forward pass on the same network is the reference.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from rnnlm.inference import (
    WINDOW,
    LanguageModel,
    ModelLoadError,
    check_sampling,
    inverse_cdf,
    sample_next,
    softmax,
    token_nll,
)
from rnnlm.model import RNNLM
from rnnlm.streams import EOS_ID
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
    from rnnlm.text import detokenize

    assert text == detokenize(expected.split(" "))


def test_generation_feeds_one_token_per_call(
    lstm: tuple[LanguageModel, RNNLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = lstm
    shapes: list[tuple[int, ...]] = []
    run = model._run

    def spy(ids: np.ndarray, state: tuple[np.ndarray, ...]) -> tuple:
        shapes.append(ids.shape)
        return run(ids, state)

    monkeypatch.setattr(model, "_run", spy)
    model.generate("the president said", max_tokens=10, seed=0, num_samples=2)
    # The prompt (with its leading <eos>) once, then one token per call: never the prefix.
    assert shapes == [(1, 4)] + [(2, 1)] * 9


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
