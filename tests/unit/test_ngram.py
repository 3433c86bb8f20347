"""Baselines: add-one unigram and interpolated (modified) Kneser-Ney, against hand computations
and a direct dictionary implementation of Chen & Goodman's recursion."""

from __future__ import annotations

import io
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Callable

import numpy as np
import pytest

from rnnlm import ngram
from rnnlm.streams import EOS_ID

# Vocabulary of the hand-computed case: 0 <unk>, 1 <eos>, 2 "a", 3 "b".
A, B = 2, 3


def zipf_stream(n: int, vocab_size: int, seed: int, used: int | None = None) -> np.ndarray:
    """`n` ids drawn with p ~ 1/rank from the first `used` ids, an `<eos>` every ~6 tokens."""
    rng = np.random.default_rng(seed)
    used = used or vocab_size
    weights = 1.0 / np.arange(1, used + 1)
    stream = rng.choice(used, size=n, p=weights / weights.sum())
    stream[rng.random(n) < 0.15] = EOS_ID
    return stream.astype(np.int32)


def reference_kn(
    train: np.ndarray, vocab_size: int, order: int, modified: bool
) -> Callable[[tuple[int, ...], int], float]:
    """p(w | history) computed directly from count dictionaries (slow, obviously correct)."""
    padded = [EOS_ID] * (order - 1) + [int(t) for t in train]
    counts: dict[int, Counter[tuple[int, ...]]] = {
        order: Counter(tuple(padded[i - order + 1 : i + 1]) for i in range(order - 1, len(padded)))
    }
    for n in range(order - 1, 0, -1):  # continuation counts: distinct left extensions
        counts[n] = Counter(gram[1:] for gram in counts[n + 1])
    by_context: dict[int, dict[tuple[int, ...], dict[int, int]]] = {}
    discounts = {}
    for n, grams in counts.items():
        by_context[n] = defaultdict(dict)
        for gram, c in grams.items():
            by_context[n][gram[:-1]][gram[-1]] = c
        values = Counter(grams.values())
        discounts[n] = ngram.estimate_discounts([values[r] for r in range(1, 5)], modified)

    def prob(n: int, history: tuple[int, ...], word: int) -> float:
        if n == 0:
            return 1.0 / vocab_size
        following = by_context[n].get(history, {})
        total = sum(following.values())
        lower = prob(n - 1, history[1:], word)
        if total == 0:
            return lower
        d = discounts[n]
        alpha = max(following.get(word, 0) - d[min(following.get(word, 0), 3) - 1], 0) / total
        gamma = sum(d[min(c, 3) - 1] for c in following.values()) / total
        return alpha + gamma * lower

    return lambda history, word: prob(order, history[len(history) - order + 1 :], word)


def test_hand_computed_bigram_with_a_fixed_discount() -> None:
    # "a b <eos> a <eos>", history <eos>: bigrams (<eos>,a) x2, (a,b), (b,<eos>), (a,<eos>).
    # Continuation counts: a 1, b 1, <eos> 2, <unk> 0 (total 4; D = 0.5 leaves 0.375 to uniform).
    lm = ngram.fit_kneser_ney(np.array([A, B, EOS_ID, A, EOS_ID]), 4, order=2, discount=0.5)
    unigram = {0: 0.375 / 4, EOS_ID: 1.5 / 4 + 0.375 / 4, A: 0.5 / 4 + 0.375 / 4}
    unigram[B] = unigram[A]
    assert lm.distribution([0]) == pytest.approx([unigram[w] for w in range(4)])  # unseen
    # After <eos>: c(<eos> a) = 2 of 2, one type, gamma = 0.5 * 1 / 2.
    after_eos = [0.25 * unigram[w] + (1.5 / 2 if w == A else 0.0) for w in range(4)]
    assert lm.distribution([EOS_ID]) == pytest.approx(after_eos)
    assert lm.distribution([A]) == pytest.approx(
        [0.5 * unigram[0], 0.5 / 2 + 0.5 * unigram[EOS_ID], 0.5 * unigram[A], 0.25 + 0.5 * 0.21875]
    )
    assert lm.distribution([A])[B] == pytest.approx(0.359375)
    # The first token is predicted from <eos>, like streams.lm_pairs.
    logprobs = lm.logprobs(np.array([A, B]))
    assert np.exp(logprobs) == pytest.approx([0.8046875, 0.359375])
    ppl = ngram.perplexity(logprobs)
    assert ppl == pytest.approx((0.8046875 * 0.359375) ** -0.5)


@pytest.mark.parametrize("discount", ["modified", "single", 0.8])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_context_distribution_sums_to_one(order: int, discount: str | float) -> None:
    vocab_size = 7
    lm = ngram.fit_kneser_ney(zipf_stream(400, vocab_size, 0, used=6), vocab_size, order, discount)
    for history in itertools.product(range(vocab_size), repeat=order - 1):
        p = lm.distribution(history)
        assert p.sum() == pytest.approx(1.0, abs=1e-12), history
        assert (p > 0).all(), history  # the uniform floor: word 6 never occurs in training


@pytest.mark.parametrize("order", [2, 3, 4])
def test_vectorised_scores_match_the_direct_recursion(order: int) -> None:
    vocab_size = 12
    train = zipf_stream(2000, vocab_size, 1, used=11)
    test = zipf_stream(300, vocab_size, 2)  # includes id 11, unseen in training
    lm = ngram.fit_kneser_ney(train, vocab_size, order)
    assert all(min(d) > ngram.MIN_DISCOUNT for d in lm.discounts.values())
    assert len(set(lm.discounts[order])) == 3  # three distinct estimated discounts
    reference = reference_kn(train, vocab_size, order, modified=True)
    history = (EOS_ID,) * (order - 1) + tuple(int(t) for t in test)
    expected = [math.log(reference(history[i : i + order - 1], int(w))) for i, w in enumerate(test)]
    assert lm.logprobs(test) == pytest.approx(expected, abs=1e-12)
    for i in (0, 1, 57, 299):  # and distribution() agrees with logprobs() position by position
        assert math.log(lm.distribution(test[:i])[test[i]]) == pytest.approx(expected[i])


def test_high_orders_keep_keys_small() -> None:
    # Keys are id(prefix) * vocab_size + word with prefix ids < max(distinct n-grams, vocab):
    # far below vocab_size ** order, so any order fits in int64.
    vocab_size = 9000
    lm = ngram.fit_kneser_ney(zipf_stream(5000, vocab_size, 3), vocab_size, order=6)
    assert all(k.dtype == np.int64 and k.max() < vocab_size**2 for k in lm.keys.values())
    assert np.isfinite(lm.logprobs(zipf_stream(200, vocab_size, 4))).all()


def test_estimate_discounts() -> None:
    y = 100 / 180
    assert ngram.estimate_discounts([100, 40, 20, 10]) == pytest.approx(
        (y, 2 - 3 * y * 20 / 40, 3 - 4 * y * 10 / 20)
    )
    assert ngram.estimate_discounts([100, 40, 20, 10], modified=False) == pytest.approx((y, y, y))
    # No singletons or no doubletons: Y cannot be estimated.
    fallback = ngram.FALLBACK_DISCOUNT
    assert ngram.estimate_discounts([0, 5, 3, 1]) == (fallback,) * 3
    # A zero in a later denominator: the modified estimates fall back to Y.
    assert ngram.estimate_discounts([10, 5, 0, 1]) == pytest.approx((0.5, 0.5, 0.5))
    # Out-of-range estimates are clipped: never 0 (no mass left) and never above the count.
    d1, d2, d3 = ngram.estimate_discounts([10, 1, 100, 1])
    assert d2 == ngram.MIN_DISCOUNT and 0 < d1 <= 1 and 0 < d3 <= 3


def test_unigram_perplexity_of_a_uniform_stream_is_the_vocabulary_size() -> None:
    vocab_size = 50
    uniform = np.tile(np.arange(vocab_size), 4)
    for add in (1.0, 0.0):
        probs = ngram.fit_unigram(uniform, vocab_size, add=add)
        ppl = ngram.perplexity(ngram.unigram_logprobs(probs, np.arange(vocab_size)))
        assert ppl == pytest.approx(vocab_size, rel=1e-12)


def test_unigram_is_add_one_with_unk_as_an_ordinary_token() -> None:
    probs = ngram.fit_unigram(np.array([0, 0, 1, 2, 2, 2]), 5)
    assert probs == pytest.approx(np.array([3, 2, 4, 1, 1]) / 11)


def test_kneser_ney_beats_unigram_on_structured_text() -> None:
    sentence = [2, 3, 4, 5, EOS_ID]  # a deterministic sentence: the bigram model nails it
    train, test = np.array(sentence * 50), np.array(sentence * 3)
    unigram = ngram.perplexity(ngram.unigram_logprobs(ngram.fit_unigram(train, 8), test))
    kn = ngram.perplexity(ngram.fit_kneser_ney(train, 8, 3).logprobs(test))
    assert kn < 1.1 < 4 < unigram


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stream": np.array([0, 9])}, r"\[0, 5\)"),
        ({"stream": np.array([-1])}, r"\[0, 5\)"),
        ({"stream": np.array([], dtype=np.int64)}, "empty"),
        ({"stream": np.array([[1, 2]])}, "1-D"),
        ({"stream": np.array([1.0, 2.0])}, "integers"),
        ({"order": 0}, "order = 0"),
        ({"discount": 1.5}, r"\(0, 1\]"),
        ({"discount": "kenlm"}, "'modified', 'single'"),
    ],
)
def test_fit_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = {"stream": np.array([2, 3, 1]), "vocab_size": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        ngram.fit_kneser_ney(**args)


def test_logprobs_of_an_empty_stream_and_perplexity_of_nothing() -> None:
    lm = ngram.fit_kneser_ney(np.array([2, 3, 1]), 5)
    assert lm.logprobs(np.array([], dtype=np.int32)).shape == (0,)
    with pytest.raises(ValueError, match="empty"):
        ngram.perplexity(np.array([]))


def test_interpolation_weight_maximises_the_held_out_likelihood() -> None:
    """EM's weight is the maximum of the mixture's log-likelihood (found here by brute force);
    a model that is never better gets weight ~0, one that always is gets weight ~1."""
    rng = np.random.default_rng(0)
    first = np.log(rng.uniform(0.01, 0.5, size=2000))
    second = np.log(rng.uniform(0.01, 0.5, size=2000) * rng.choice([0.2, 3.0], size=2000))
    weight = ngram.interpolation_weight(first, second)

    def likelihood(w: float) -> float:
        return float(np.logaddexp(np.log1p(-w) + first, np.log(w) + second).sum())

    grid = np.linspace(0, 1, 2001)[1:-1]
    best = max(grid, key=likelihood)
    assert likelihood(weight) >= likelihood(best) - 1e-9
    assert weight == pytest.approx(best, abs=1e-3) and 0.05 < weight < 0.95
    assert ngram.interpolation_weight(first, first - 1.0) < 1e-3
    assert ngram.interpolation_weight(first, first + 1.0) > 1 - 1e-3
    with pytest.raises(ValueError, match=r"need two equal \(N,\) arrays"):
        ngram.interpolation_weight(first, second[:5])


@pytest.mark.parametrize("order", [1, 2, 3])
def test_stored_model_round_trips_and_refits_the_same_probabilities(order: int) -> None:
    vocab_size = 12
    lm = ngram.fit_kneser_ney(zipf_stream(1500, vocab_size, 5, used=11), vocab_size, order)
    loaded = ngram.KneserNey.from_bytes(lm.to_bytes(), order, vocab_size, "modified")
    test = zipf_stream(200, vocab_size, 6)
    assert loaded.logprobs(test) == pytest.approx(lm.logprobs(test), abs=0)
    assert loaded.discounts == lm.discounts
    # The same counts with another discount rule: another model, from the same file.
    single = ngram.KneserNey.from_bytes(lm.to_bytes(), order, vocab_size, "single")
    assert single.discount == "single"
    expected = ngram.fit_kneser_ney(
        zipf_stream(1500, vocab_size, 5, used=11), vocab_size, order, "single"
    )
    assert single.logprobs(test) == pytest.approx(expected.logprobs(test), abs=0)


def test_logprobs_with_a_history_continue_the_stream() -> None:
    """Scoring a stream in pieces, each with the tokens before it as history, equals scoring
    it whole; no history is the stream's start (<eos> before it)."""
    vocab_size = 10
    lm = ngram.fit_kneser_ney(zipf_stream(3000, vocab_size, 7), vocab_size, order=4)
    stream = zipf_stream(400, vocab_size, 8)
    whole = lm.logprobs(stream)
    for cut in (1, 2, 3, 150):
        assert lm.logprobs(stream[cut:], history=stream[:cut]) == pytest.approx(whole[cut:])
    assert lm.logprobs(stream, history=[EOS_ID] * 5) == pytest.approx(whole)
    assert lm.logprobs(stream, history=[A, B]) != pytest.approx(whole)


def test_mixer_is_the_interpolation_window_by_window() -> None:
    """NgramMixer.mix over windows of any size = (1 - w) p + w p_kn over the whole stream;
    distribution() is the mixture at the next position and sums to one; mixed_logits' softmax
    is that distribution."""
    vocab_size = 9
    lm = ngram.fit_kneser_ney(zipf_stream(2000, vocab_size, 9), vocab_size, order=3)
    stream = zipf_stream(300, vocab_size, 10)
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(len(stream) + 1, vocab_size))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    logp = np.log(probs[np.arange(len(stream)), stream])
    weight = 0.3
    expected = np.log((1 - weight) * np.exp(logp) + weight * np.exp(lm.logprobs(stream)))
    for size in (1, 7, 300):
        mixer = ngram.NgramMixer(lm, weight)
        got = [mixer.mix(logp[i : i + size], stream[i : i + size]) for i in range(0, 300, size)]
        assert np.concatenate(got) == pytest.approx(expected, abs=1e-12)
    # After the stream: the mixture at the next position, from the stream's last two words.
    mixed = mixer.distribution(probs[-1])
    assert mixed == pytest.approx((1 - weight) * probs[-1] + weight * lm.distribution(stream))
    assert mixed.sum() == pytest.approx(1.0, abs=1e-12)
    sampled = mixer.mixed_logits(logits[-1])
    assert sampled.dtype == np.float32
    assert np.exp(sampled) / np.exp(sampled).sum() == pytest.approx(mixed, rel=1e-5)
    # A copy keeps its own history; extend() is mix()'s update without the scores.
    twin = mixer.copy()
    twin.extend([A])
    assert twin.distribution(probs[0]) == pytest.approx(
        (1 - weight) * probs[0] + weight * lm.distribution([*stream, A])
    )
    assert mixer.distribution(probs[0]) != pytest.approx(twin.distribution(probs[0]))
    # Weight 0: the input distribution unchanged.
    assert ngram.NgramMixer(lm, 0.0).mix(logp, stream) == pytest.approx(logp, abs=0)
    for bad in (1.0, -0.1, "0.3", float("nan")):
        with pytest.raises(ValueError, match=r"n-gram weight = .*: must be a number in \[0, 1\)"):
            ngram.NgramMixer(lm, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one log-prob per target"):
        ngram.NgramMixer(lm, 0.3).mix(logp[:3], stream[:4])


def _archive(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _stored(lm: ngram.KneserNey) -> dict[str, np.ndarray]:
    return {
        **{f"keys{k}": v for k, v in lm.keys.items()},
        **{f"counts{n}": v for n, v in lm.counts.items()},
    }


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda a: a.pop("counts2"),
            r"tables \['counts1', 'counts3', 'keys2', 'keys3'\], expected",
        ),
        (lambda a: a.update(extra=np.zeros(1)), "expected"),
        (
            lambda a: a.update(keys3=a["keys3"][::-1].copy()),
            "keys3: keys must be strictly increasing",
        ),
        (lambda a: a.update(keys2=a["keys2"] + 10**9), r"keys2: keys must lie in \[0, 144\)"),
        (lambda a: a.update(keys3=a["keys3"].astype(np.float64)), "keys3: expected 1-D int64 keys"),
        (lambda a: a.update(counts3=-a["counts3"]), r"counts3: counts must lie in \[0,"),
        (lambda a: a.update(counts1=a["counts1"][:-1]), "counts1: expected 12 integer counts"),
        (lambda a: a.update(counts2=a["counts2"] * 0.5), "counts2: expected .* integer counts"),
        (lambda a: a.update(counts3=np.zeros_like(a["counts3"])), "counts3: no n-gram was counted"),
    ],
)
def test_a_damaged_stored_model_is_refused(change: Callable[[dict], object], match: str) -> None:
    vocab_size = 12
    arrays = _stored(ngram.fit_kneser_ney(zipf_stream(800, vocab_size, 12), vocab_size, 3))
    change(arrays)
    with pytest.raises(ValueError, match=match):
        ngram.KneserNey.from_bytes(_archive(**arrays), 3, vocab_size)


def test_stored_model_settings_and_size_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    vocab_size = 12
    data = ngram.fit_kneser_ney(zipf_stream(800, vocab_size, 13), vocab_size, 3).to_bytes()
    with pytest.raises(ValueError, match="not an n-gram archive"):
        ngram.KneserNey.from_bytes(b"PK\x03\x04 not a zip", 3, vocab_size)
    with pytest.raises(ValueError, match="expected"):  # the tables of order 3, read as 2
        ngram.KneserNey.from_bytes(data, 2, vocab_size)
    with pytest.raises(ValueError, match=r"order = 0: must be an integer in \[1, 10\]"):
        ngram.KneserNey.from_bytes(data, 0, vocab_size)
    with pytest.raises(ValueError, match="discount = 'kenlm'"):
        ngram.KneserNey.from_bytes(data, 3, vocab_size, "kenlm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keys must lie in"):  # a smaller vocabulary
        ngram.KneserNey.from_bytes(data, 3, 6)
    # An archive that unpacks to more than the bound is refused before it is unpacked.
    monkeypatch.setattr(ngram, "MAX_TABLE_BYTES", 1000)
    with pytest.raises(ValueError, match=r"unpacked, more than 1,000"):
        ngram.KneserNey.from_bytes(data, 3, vocab_size)
