"""cache.py: the continuous cache against a direct loop over the paper's formula, its window
and streaming invariants, its full distribution, its memory bound and the grid search.

Everything runs on small random arrays: no model, no files.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import threadpoolctl

from rnnlm.cache import (
    MAX_WINDOW,
    CacheSettings,
    ContinuousCache,
    mix_logprobs,
    one_blas_thread,
    tune_cache,
)

VOCAB = 7


def stream(n: int = 60, dim: int = 5, seed: int = 0) -> tuple[np.ndarray, ...]:
    """A random stream: model log-probs of its targets (n,), hidden vectors (n, dim), targets
    (n,) drawn from a few words (so they repeat), and the model's full distributions (n, V)."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n, dim)).astype(np.float32)
    targets = rng.integers(0, VOCAB, size=n)
    probs = rng.dirichlet(np.ones(VOCAB), size=n)
    return np.log(probs[np.arange(n), targets]), hidden, targets, probs


def direct(
    model_logp: np.ndarray, hidden: np.ndarray, targets: np.ndarray, s: CacheSettings
) -> np.ndarray:
    """The paper's formula, one position and one cached pair at a time, in float64."""
    h = hidden.astype(np.float64)
    out = np.empty(len(targets))
    for t in range(len(targets)):
        cached = range(max(0, t - s.window), t)
        if not cached:
            out[t] = model_logp[t]
            continue
        weights = {i: math.exp(s.theta * float(h[t] @ h[i])) for i in cached}
        p_cache = sum(w for i, w in weights.items() if targets[i] == targets[t])
        p_cache /= sum(weights.values())
        out[t] = math.log((1 - s.lam) * math.exp(model_logp[t]) + s.lam * p_cache)
    return out


def mixed_in_windows(
    cache: ContinuousCache, logp: np.ndarray, hidden: np.ndarray, targets: np.ndarray, size: int
) -> np.ndarray:
    parts = [
        cache.mix(logp[i : i + size], hidden[i : i + size], targets[i : i + size])
        for i in range(0, len(targets), size)
    ]
    return np.concatenate(parts)


@pytest.mark.parametrize(
    ("window", "theta", "lam"), [(1, 0.5, 0.3), (7, 0.8, 0.2), (100, 2.0, 0.5)]
)
@pytest.mark.parametrize("size", [1, 3, 7, 60])
def test_mix_equals_the_formula_in_windows_of_any_size(
    window: int, theta: float, lam: float, size: int
) -> None:
    """Windows of 1, 3, 7 and all 60 positions, caches shorter and longer than the stream:
    each position sees the `window` positions before it, across window boundaries."""
    logp, hidden, targets, _ = stream()
    settings = CacheSettings(window, theta, lam)
    cache = ContinuousCache(window, theta, lam)
    got = mixed_in_windows(cache, logp, hidden, targets, size)
    np.testing.assert_allclose(got, direct(logp, hidden, targets, settings), rtol=1e-6, atol=1e-9)
    assert got[0] == logp[0]  # an empty cache leaves the model alone
    assert len(cache) == min(window, len(targets))
    np.testing.assert_array_equal(cache.words, targets[-window:])


def test_lambda_zero_is_the_model_exactly() -> None:
    logp, hidden, targets, probs = stream()
    cache = ContinuousCache(10, 0.5, 0.0)
    np.testing.assert_array_equal(mixed_in_windows(cache, logp, hidden, targets, 8), logp)
    np.testing.assert_array_equal(cache.distribution(probs[0], hidden[0]), probs[0])


def test_distribution_sums_to_one_and_agrees_with_mix() -> None:
    """The full distribution at each position is a distribution, and its value at the target
    is what `mix` gives; feeding pairs one at a time (generation) caches what `mix` caches."""
    logp, hidden, targets, probs = stream()
    scorer, stepper = ContinuousCache(9, 0.7, 0.25), ContinuousCache(9, 0.7, 0.25)
    mixed = mixed_in_windows(scorer, logp, hidden, targets, 11)
    for t in range(len(targets)):
        p = stepper.distribution(probs[t], hidden[t])
        assert p.shape == (VOCAB,) and p.min() > 0
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
        assert math.log(p[targets[t]]) == pytest.approx(mixed[t], rel=1e-6)
        # The sampler's form: logits whose softmax is p (float32: 1e-5 relative)
        logits = np.log(probs[t]).astype(np.float32) + 3.0  # any shift
        as_logits = stepper.mixed_logits(logits, hidden[t])
        assert as_logits.dtype == np.float32
        exp = np.exp(as_logits.astype(np.float64) - as_logits.max())
        np.testing.assert_allclose(exp / exp.sum(), p, rtol=1e-5)
        stepper.extend(hidden[t][None], [targets[t]])
    np.testing.assert_array_equal(stepper.keys, scorer.keys)
    np.testing.assert_array_equal(stepper.words, scorer.words)


def test_a_repeated_word_gains_probability() -> None:
    """A word seen in a context like the present one: more probable with the cache, and the
    other words less so (they give up lambda of their mass)."""
    rng = np.random.default_rng(1)
    context = rng.normal(size=4).astype(np.float32)
    hidden = np.stack([context, -context, context + 0.01]).astype(np.float32)
    probs = np.full(VOCAB, 1 / VOCAB)
    cache = ContinuousCache(50, 1.0, 0.2)
    cache.extend(hidden[:2], [3, 5])  # word 3 followed this context, word 5 the opposite one
    p = cache.distribution(probs, hidden[2])
    assert p[3] > 0.2 + 0.8 / VOCAB - 0.01 > probs[3]
    assert p[5] > (1 - 0.2) * probs[5]
    assert all(p[w] == pytest.approx((1 - 0.2) / VOCAB) for w in (0, 1, 2, 4, 6))
    logp = np.log(probs[[3]])
    assert cache.mix(logp, hidden[2:], [3])[0] == pytest.approx(math.log(p[3]))


def test_memory_is_bounded_by_the_window() -> None:
    _, hidden, targets, _ = stream(n=1000)
    cache = ContinuousCache(16, 0.5, 0.1)
    for t in range(1000):
        cache.extend(hidden[t][None], [targets[t]])
        assert len(cache) == min(t + 1, 16)
        assert len(cache._words) <= 2 * 16  # the buffer, not only what is visible
    np.testing.assert_array_equal(cache.keys, hidden[-16:])
    cache.extend(hidden[:100], targets[:100])  # more than a window at once: its last 16
    np.testing.assert_array_equal(cache.words, targets[84:100])


def test_a_copy_goes_its_own_way() -> None:
    _, hidden, targets, _ = stream(n=60)
    cache = ContinuousCache(16, 0.5, 0.1)
    cache.extend(hidden[:30], targets[:30])
    twin = cache.copy()
    assert twin.settings == cache.settings
    np.testing.assert_array_equal(twin.keys, cache.keys)
    np.testing.assert_array_equal(twin.words, cache.words)
    twin.extend(hidden[30:40], targets[30:40])
    np.testing.assert_array_equal(cache.words, targets[14:30])  # the original is untouched
    np.testing.assert_array_equal(twin.words, targets[24:40])
    probs = np.full(int(targets.max()) + 1, 1 / (int(targets.max()) + 1))
    assert not np.allclose(
        twin.distribution(probs, hidden[40]), cache.distribution(probs, hidden[40])
    )


def test_the_products_run_blas_on_one_thread_and_give_it_back() -> None:
    """OpenBLAS threads spinning after the cache's small products took the cores onnxruntime
    scores on: inside `one_blas_thread` BLAS has one thread (nested blocks too), and after the
    last block it has what it had before. (OpenBLAS takes the setting from the main thread,
    where the scorer mixes; from another thread it may ignore it.)"""
    blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
    if not blas.lib_controllers:
        pytest.skip("numpy has no BLAS library threadpoolctl can control")

    def threads() -> set[int]:
        return {lib.get_num_threads() for lib in blas.lib_controllers}

    _, hidden, targets, probs = stream()
    with blas.limit(limits=2):
        assert threads() == {2}
        with one_blas_thread():
            assert threads() == {1}
            with one_blas_thread():
                assert threads() == {1}
            assert threads() == {1}  # the outer block is still inside
        assert threads() == {2}
        cache = ContinuousCache(9, 0.7, 0.25)
        cache.mix(np.log(probs[np.arange(20), targets[:20]]), hidden[:20], targets[:20])
        cache.distribution(probs[20], hidden[20])
        assert threads() == {2}


def test_stable_for_huge_scores() -> None:
    """theta h.h of 1e5 and more: shifted before exp, no overflow, no NaN, no warning."""
    logp, hidden, targets, probs = stream()
    settings = CacheSettings(20, 1000.0, 0.3)
    with np.errstate(over="raise", invalid="raise"):
        cache = ContinuousCache(20, 1000.0, 0.3)
        got = mixed_in_windows(cache, logp, hidden * 10, targets, 13)
        p = cache.distribution(probs[0], hidden[0] * 10)
    assert np.isfinite(got).all() and got.max() <= 0
    assert p.sum() == pytest.approx(1.0)
    # Every weight but the best one's underflows: the cache is the next word of the nearest key.
    best = [
        np.argmax(hidden[max(0, t - 20) : t] @ hidden[t]) + max(0, t - 20) for t in range(1, 60)
    ]
    nearest = np.array([targets[b] == targets[t] for t, b in enumerate(best, start=1)])
    expected = np.log((1 - settings.lam) * np.exp(logp[1:]) + settings.lam * nearest)
    np.testing.assert_allclose(got[1:], expected, rtol=1e-6)


def test_tuning_scores_each_grid_point_as_streaming_does() -> None:
    logp, hidden, targets, _ = stream(n=700, seed=2)
    thetas, lambdas, windows = [0.2, 1.0], [0.1, 0.4], [5, 300]
    tuning = tune_cache(logp, hidden, targets, thetas, lambdas, windows)
    assert tuning.grid_ppl.shape == (2, 2, 2)
    assert tuning.model_ppl == pytest.approx(math.exp(-logp.mean()))
    for (t, theta), (k, lam), (w, window) in itertools.product(
        enumerate(thetas), enumerate(lambdas), enumerate(windows)
    ):
        mixed = mixed_in_windows(ContinuousCache(window, theta, lam), logp, hidden, targets, 256)
        assert tuning.grid_ppl[t, k, w] == pytest.approx(math.exp(-mixed.mean()), rel=1e-9)
    assert tuning.ppl == tuning.grid_ppl.min() < tuning.model_ppl
    s = tuning.settings
    assert s is not None
    best = tuning.grid_ppl[thetas.index(s.theta), lambdas.index(s.lam), windows.index(s.window)]
    assert best == tuning.ppl


def test_tuning_turns_the_cache_off_when_it_cannot_help() -> None:
    """No word ever repeats: the cache puts all its mass on words that do not come."""
    rng = np.random.default_rng(3)
    targets = np.arange(50)
    hidden = rng.normal(size=(50, 4)).astype(np.float32)
    logp = np.full(50, math.log(0.5))
    tuning = tune_cache(logp, hidden, targets, [0.5], [0.05, 0.5], [10])
    assert tuning.settings is None
    assert tuning.ppl == tuning.model_ppl == pytest.approx(2.0)
    assert (tuning.grid_ppl > 2.0).all()


def test_mix_logprobs_in_log_space() -> None:
    assert mix_logprobs(np.log(0.2), np.log(0.6), 0.25) == pytest.approx(math.log(0.3))
    assert mix_logprobs(-1000.0, -1001.0, 0.5) == pytest.approx(
        -1000.0 + math.log(0.5 * (1 + math.exp(-1)))
    )
    assert mix_logprobs(np.array([-3.0]), np.array([-np.inf]), 0.0)[0] == -3.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 0.5, 0.1), f"window = 0: must be an integer in \\[1, {MAX_WINDOW}\\]"),
        ((5.0, 0.5, 0.1), "window = 5.0: must be an integer"),
        ((True, 0.5, 0.1), "window = True: must be an integer"),
        ((5, 0.0, 0.1), r"theta = 0.0: must be a number in \(0, 1000\]"),
        ((5, math.nan, 0.1), r"theta = nan: must be a number"),
        ((5, 0.5, 1.0), r"lambda = 1.0: must be a number in \[0, 1\)"),
        ((5, 0.5, -0.1), r"lambda = -0.1: must be a number in \[0, 1\)"),
        ((5, 0.5, "0.1"), r"lambda = '0.1': must be a number"),
    ],
)
def test_bad_settings_are_refused(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ContinuousCache(*args)


def test_bad_arrays_are_refused() -> None:
    logp, hidden, targets, _ = stream()
    cache = ContinuousCache(5, 0.5, 0.1)
    with pytest.raises(ValueError, match=r"hidden must be \(n, d\) and words \(n,\)"):
        cache.mix(logp[:3], hidden[:3], targets[:2])
    with pytest.raises(ValueError, match="one log-prob per target"):
        cache.mix(logp[:2], hidden[:3], targets[:3])
    cache.extend(hidden[:3], [0, 1, 6])
    with pytest.raises(ValueError, match="hidden vectors of size 4, the cache holds 5"):
        cache.extend(hidden[:1, :4], targets[:1])
    with pytest.raises(ValueError, match="the cache holds word id 6; model_probs covers 2"):
        cache.distribution(np.array([0.5, 0.5]), hidden[0])
    with pytest.raises(ValueError, match="word ids must be >= 0"):
        cache.extend(hidden[:1], [-1])
    with pytest.raises(ValueError, match="at least one value"):
        tune_cache(logp, hidden, targets, [], [0.1], [5])
    with pytest.raises(ValueError, match=r"lambda = 1.5"):
        tune_cache(logp, hidden, targets, [0.1], [1.5], [5])
