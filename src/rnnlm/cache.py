"""The continuous cache language model, numpy only: no retraining, a few lines of maths.

Grave, Joulin & Usunier, "Improving Neural Language Models with a Continuous Cache", ICLR 2017
(arXiv:1612.04426). The network's top-layer hidden vector h_i at each past position i is kept
with the word x_{i+1} that followed it, for the last `window` positions. At position t

    p_cache(w | history) = sum_{i: x_{i+1} = w} exp(theta h_t . h_i) / sum_i exp(theta h_t . h_i)
    p(w | history)       = (1 - lam) p_model(w | history) + lam p_cache(w | history)

with the sums over the cached positions i < t (at most `window` of them, the latest); p = p_model
while the cache is empty. A word the text has just used, in a context like the present one,
gets more mass: names, topics and rare words repeat within a document.

    cache = ContinuousCache(window=500, theta=0.3, lam=0.1)
    mixed = cache.mix(model_logp, hidden, targets)   # one window of a stream: (T,), (T, d), (T,)
    probs = cache.distribution(model_probs, h)       # the next position, over the vocabulary
    cache.extend(h[None], [word])                    # generation: the word chosen after h

`mix` scores a window of T positions in one matrix product: each position sees the cached
history and the earlier positions of the same window, never itself or later ones, so a stream
cut into windows of any size gives the same result as one window. The scores are shifted by
their maximum before `exp` (a log-sum-exp), which keeps them finite for any theta.
`tune_cache` chooses theta, lam and window on collected (log-prob, hidden, target) arrays: the
dot products of each block are computed once and shared by every grid point.

The per-stream products (`mix`, `distribution`, `mixed_logits`) run numpy's BLAS on one thread
(`one_blas_thread`): they are small, and OpenBLAS's extra threads keep spinning after each one,
taking the cores onnxruntime scores on (on the 2-core VM the cache then cost +66-94% of
`rnnlm score`'s time; on one BLAS thread +0-15%).

Used by rnnlm.inference (scoring, next words, generation) and the export stage (tuning).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from rnnlm.errors import is_int, is_real

# Sanity bounds on the settings: a cache holds up to 2 x window hidden vectors, and theta
# multiplies dot products of vectors whose entries are about 1 (tanh-bounded for gru/lstm).
MAX_WINDOW = 100_000
MAX_THETA = 1_000.0
# Positions scored per matrix product when tuning (the dot products of a block against its
# window of history): (block, window + block) float32 scores at a time.
TUNE_BLOCK = 256
# `out_of_reach` masks of at most this many entries (bytes) are kept for reuse, the last 16.
_KEPT_MASK_ENTRIES = 4 << 20


@dataclass(frozen=True)
class CacheSettings:
    """window: how many past positions are cached; theta: the scores' sharpness (> 0);
    lam: the cache's weight in the mixture, in [0, 1) (0: the model alone)."""

    window: int
    theta: float
    lam: float

    def __post_init__(self) -> None:
        if not is_int(self.window) or not 1 <= self.window <= MAX_WINDOW:
            raise ValueError(f"window = {self.window!r}: must be an integer in [1, {MAX_WINDOW}]")
        if not is_real(self.theta) or not 0 < self.theta <= MAX_THETA:
            raise ValueError(f"theta = {self.theta!r}: must be a number in (0, {MAX_THETA:g}]")
        if not is_real(self.lam) or not 0 <= self.lam < 1:
            raise ValueError(f"lambda = {self.lam!r}: must be a number in [0, 1)")

    def __str__(self) -> str:
        return f"window {self.window}, theta {self.theta:g}, lambda {self.lam:g}"


@functools.cache
def _blas() -> ThreadpoolController:
    """numpy's BLAS libraries (none found: limiting them does nothing)."""
    return ThreadpoolController().select(user_api="blas")


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter: Any = None  # restores the threads BLAS had before the first user entered


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS on one thread inside the block, for the whole process (BLAS has one
    setting); safe when several threads enter at once: the first in sets it, the last out
    restores what it was. OpenBLAS takes the setting from the main thread (where the scorer
    mixes its windows); from another thread it may ignore it, and the products then run on
    the threads it has."""
    global _blas_users, _blas_limiter
    with _blas_lock:
        if _blas_users == 0:
            _blas_limiter = _blas().limit(limits=1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


def out_of_reach(rows: int, history: int, window: int) -> np.ndarray:
    """Which keys each position's cache does not hold: (rows, history + rows) bool, read-only.

    Keys are `history` earlier positions (oldest first), then the `rows` positions scored;
    position r holds the `window` keys just before it: columns [history + r - window,
    history + r). A stream's windows, and the blocks of a grid search, ask for the same few
    shapes again and again: small masks are kept.
    """
    if rows * (history + rows) <= _KEPT_MASK_ENTRIES:
        return _kept_mask(rows, history, window)
    return _mask(rows, history, window)


@functools.lru_cache(maxsize=16)
def _kept_mask(rows: int, history: int, window: int) -> np.ndarray:
    mask = _mask(rows, history, window)
    mask.flags.writeable = False
    return mask


def _mask(rows: int, history: int, window: int) -> np.ndarray:
    column = np.arange(history + rows)
    end = history + np.arange(rows)[:, None]
    return (column < end - window) | (column >= end)


def shifted_scores(dots: np.ndarray, unreachable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The dot products minus each row's largest held one, -inf where not held
    (`out_of_reach`), float32; and which rows hold any key (an empty cache leaves the model
    alone).

    theta * (these) are the log-sum-exp-shifted scores for any theta > 0: at most 0, so `exp`
    cannot overflow, and each row's best key gets exactly 1.
    """
    masked = np.array(dots, dtype=np.float32)  # a copy: `dots` may be shared (tune_cache)
    np.copyto(masked, -np.inf, where=unreachable)
    top = masked.max(axis=1, initial=-np.inf)
    nonempty = np.isfinite(top)
    masked -= np.where(nonempty, top, 0)[:, None]
    return masked, nonempty


def cache_logprobs(shifted: np.ndarray, match: np.ndarray, theta: float) -> np.ndarray:
    """log p_cache(target) per row, float64: -inf where no held key is followed by it.

    Args:
        shifted: `shifted_scores` (rows, keys) float32.
        match: (rows, keys) bool, whether key j was followed by row r's target.

    The weights and their (pairwise) sums are float32: a relative error of about 1e-7.
    """
    weights = np.multiply(shifted, np.float32(theta))
    np.exp(weights, out=weights)  # (rows, keys), 0 where not held
    total = weights.sum(axis=1).astype(np.float64)
    weights *= match
    hits = weights.sum(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # log 0 = -inf; empty rows: 0/0
        return np.where(total > 0, np.log(hits) - np.log(total), -np.inf)


def mix_logprobs(model: np.ndarray, cache: np.ndarray, lam: float | np.ndarray) -> np.ndarray:
    """log((1 - lam) exp(model) + lam exp(cache)), computed in log space; exactly `model` at
    lam = 0. `lam` may be an array that broadcasts against the log-probs (a grid)."""
    lam = np.asarray(lam, dtype=np.float64)
    with np.errstate(divide="ignore"):  # log(0) = -inf at lam = 0: logaddexp then gives model
        return np.logaddexp(np.log1p(-lam) + model, np.log(lam) + cache)


def mix_stream(
    settings: CacheSettings | None,
    model_logp: np.ndarray,
    hidden: np.ndarray,
    targets: np.ndarray,
) -> np.ndarray:
    """log p (N,) float64 of every position of one stream with a cache of `settings` (the
    model's own log-probs when None), from the collected arrays `tune_cache` takes: what
    scoring the stream with that cache gives, TUNE_BLOCK positions per product."""
    model_logp = np.asarray(model_logp, dtype=np.float64)
    if settings is None:
        return model_logp
    cache = ContinuousCache(settings.window, settings.theta, settings.lam)
    blocks = range(0, len(targets), TUNE_BLOCK)
    return np.concatenate(
        [np.zeros(0)]
        + [
            cache.mix(
                model_logp[i : i + TUNE_BLOCK],
                hidden[i : i + TUNE_BLOCK],
                targets[i : i + TUNE_BLOCK],
            )
            for i in blocks
        ]
    )


class ContinuousCache:
    """The cache of one token stream: its last `window` (hidden vector, next word) pairs.

    Memory stays bounded by the window: at most 2 x window vectors are held (the buffer is
    compacted when it fills, so each appended pair costs O(hidden_dim) on average).
    """

    def __init__(self, window: int, theta: float, lam: float) -> None:
        self.settings = CacheSettings(window, theta, lam)
        self._keys = np.empty((0, 0), dtype=np.float32)  # (capacity, hidden_dim)
        self._words = np.empty(0, dtype=np.int64)
        self._start = self._end = 0  # the held pairs, oldest first: [_start, _end)

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def mixes(self) -> bool:
        """Whether the cache changes the distribution now: it holds a pair and lambda > 0."""
        return len(self) > 0 and self.settings.lam > 0

    @property
    def keys(self) -> np.ndarray:
        """The cached hidden vectors, oldest first: (len(self), hidden_dim), a view."""
        return self._keys[self._start : self._end]

    @property
    def words(self) -> np.ndarray:
        """The word that followed each cached vector: (len(self),) int64, a view."""
        return self._words[self._start : self._end]

    def copy(self) -> ContinuousCache:
        """An independent cache holding the same pairs (one per sample when a prompt's
        continuations diverge)."""
        settings = self.settings
        twin = ContinuousCache(settings.window, settings.theta, settings.lam)
        twin._keys, twin._words = self.keys.copy(), self.words.copy()
        twin._start, twin._end = 0, len(self)
        return twin

    def extend(self, hidden: np.ndarray, words: Sequence[int] | np.ndarray) -> None:
        """Cache `hidden` (n, d) with the word that followed each (n,); keep the last window."""
        hidden, words = self._check(hidden, words)
        window = self.settings.window
        hidden, words = hidden[-window:], words[-window:]
        n = len(words)
        if n == 0:
            return
        keep = min(len(self), window - n)
        if self._end + n > len(self._words) or hidden.shape[1] != self._keys.shape[1]:
            size = keep + n
            capacity = min(2 * window, max(2 * size, 64))
            keys = np.empty((capacity, hidden.shape[1]), dtype=np.float32)
            ids = np.empty(capacity, dtype=np.int64)
            if keep:
                keys[:keep] = self._keys[self._end - keep : self._end]
                ids[:keep] = self._words[self._end - keep : self._end]
            self._keys, self._words, self._start, self._end = keys, ids, 0, keep
        self._start = self._end - keep
        self._keys[self._end : self._end + n] = hidden
        self._words[self._end : self._end + n] = words
        self._end += n

    def mix(
        self, model_logp: np.ndarray, hidden: np.ndarray, targets: Sequence[int] | np.ndarray
    ) -> np.ndarray:
        """Mixed log-probs of a window's targets; then caches the window.

        Args:
            model_logp: log p_model(target) at each of the T positions (T,).
            hidden: the top layer's hidden vector at each position (T, d).
            targets: the word each position predicts (T,).

        Returns:
            log p(target) (T,) float64: each position sees the cached pairs and the earlier
            positions of this window, at most `window` of them.
        """
        hidden, targets = self._check(hidden, targets)
        model_logp = np.asarray(model_logp, dtype=np.float64)
        if model_logp.shape != targets.shape:
            raise ValueError(
                f"model_logp has shape {model_logp.shape}, targets {targets.shape}: "
                "one log-prob per target"
            )
        window, theta, lam = self.settings.window, self.settings.theta, self.settings.lam
        keys = np.concatenate([self.keys, hidden]) if len(self) else hidden
        words = np.concatenate([self.words, targets]) if len(self) else targets
        with one_blas_thread():
            dots = hidden @ keys.T  # (T, held + T)
        shifted, nonempty = shifted_scores(dots, out_of_reach(len(targets), len(self), window))
        cache = cache_logprobs(shifted, words[None, :] == targets[:, None], theta)
        mixed = np.where(nonempty, mix_logprobs(model_logp, cache, lam), model_logp)
        self.extend(hidden, targets)
        return mixed

    def distribution(self, model_probs: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """p(w) for every word (V,) at the position whose hidden vector is `hidden` (d,).

        `model_probs` (V,) is the model's distribution there; the cache is left unchanged
        (`extend` it with the word that comes next).
        """
        probs = np.asarray(model_probs, dtype=np.float64)
        if probs.ndim != 1:
            raise ValueError(f"model_probs must be one distribution (V,), got {probs.shape}")
        weights = self.query_weights(hidden, len(probs), "model_probs covers")
        if weights is None:
            return probs
        cache = np.bincount(self.words, weights=weights, minlength=len(probs)) / weights.sum()
        return (1 - self.settings.lam) * probs + self.settings.lam * cache

    def mixed_logits(self, logits: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """Logits (V,) float32 whose softmax is `distribution(softmax(logits), hidden)`: what
        a sampler draws from. Only the cached words' entries change (the others keep their
        ratios, all scaled by 1 - lambda), so a step costs O(window) plus one log-sum-exp
        over the vocabulary, not several passes in float64."""
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 1:
            raise ValueError(f"logits must be one row (V,), got {logits.shape}")
        weights = self.query_weights(hidden, len(logits), "the logits cover")
        if weights is None:
            return logits.copy()
        words = self.words
        # p_cache of each cached position's word (a repeated word: the same value each time)
        p_cache = np.bincount(words, weights=weights, minlength=len(logits))[words]
        p_cache /= weights.sum()
        top = float(logits.max())
        out = np.subtract(logits, top)
        log_z = top + math.log(float(np.exp(out, out=out).sum()))
        out[:] = logits
        p_model = np.exp(logits[words].astype(np.float64) - log_z)
        lam = self.settings.lam
        # log((1 - lam) p_model + lam p_cache), shifted by log_z - log(1 - lam) like the rest
        out[words] = log_z + np.log(p_model + lam / (1 - lam) * p_cache)
        return out

    def query_weights(self, hidden: np.ndarray, vocab: int, covers: str) -> np.ndarray | None:
        """exp(theta h.h_i) of each cached pair for the query vector `hidden` (d,), shifted by
        the largest (held,) float64; None when nothing is mixed (empty cache, or lambda 0).
        `covers` names the caller's vocabulary-sized argument in the error of a word id
        beyond `vocab`."""
        query, _ = self._check(np.asarray(hidden)[None], [0])
        if not self.mixes:
            return None
        if self.words.max() >= vocab:
            raise ValueError(f"the cache holds word id {self.words.max()}; {covers} {vocab}")
        with one_blas_thread():
            scores = (self.keys @ query[0]).astype(np.float64)  # (held,)
        return np.exp(self.settings.theta * (scores - scores.max()))

    def _check(
        self, hidden: np.ndarray, words: Sequence[int] | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) float32 vectors and (n,) int64 words, of the width already cached."""
        hidden = np.asarray(hidden, dtype=np.float32)
        words = np.asarray(words, dtype=np.int64)
        if hidden.ndim != 2 or words.shape != hidden.shape[:1]:
            raise ValueError(
                f"hidden must be (n, d) and words (n,), got {hidden.shape} and {words.shape}"
            )
        if len(self) and hidden.shape[1] != self._keys.shape[1]:
            raise ValueError(
                f"hidden vectors of size {hidden.shape[1]}, the cache holds {self._keys.shape[1]}"
            )
        if words.size and words.min() < 0:
            raise ValueError(f"word ids must be >= 0, got {words.min()}")
        return hidden, words


@dataclass(frozen=True)
class CacheTuning:
    """What `tune_cache` found on a stream: the best settings (None: no grid point beats the
    model alone), the perplexities with and without them, and the whole grid."""

    settings: CacheSettings | None
    ppl: float  # with `settings` (the model's own when None)
    model_ppl: float  # the model alone
    grid_ppl: np.ndarray  # (thetas, lambdas, windows)


def tune_cache(
    model_logp: np.ndarray,
    hidden: np.ndarray,
    targets: np.ndarray,
    thetas: Sequence[float],
    lambdas: Sequence[float],
    windows: Sequence[int],
) -> CacheTuning:
    """Grid search of the cache settings on one stream (a validation split).

    Args:
        model_logp: log p_model(target) of every position of the stream (N,).
        hidden: the top layer's hidden vector at every position (N, d).
        targets: the word each position predicts (N,).
        thetas, lambdas, windows: the values tried (every combination); lam = 0, the model
            alone, is always a candidate.

    Each block of TUNE_BLOCK positions is multiplied once against the largest window of
    history before it; the smaller windows are suffixes of it. Scores are then shared by
    every lambda: the cost is one exp per (theta, window, position, key).
    """
    model_logp = np.asarray(model_logp, dtype=np.float64)
    hidden = np.asarray(hidden, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    if not len(targets) or hidden.shape[:1] != targets.shape or model_logp.shape != targets.shape:
        raise ValueError(
            f"need N > 0 positions: model_logp {model_logp.shape}, hidden {hidden.shape}, "
            f"targets {targets.shape}"
        )
    for name, values in (("thetas", thetas), ("lambdas", lambdas), ("windows", windows)):
        if not len(values):
            raise ValueError(f"{name}: at least one value")
    for theta in thetas:
        for weight in lambdas:
            for window in windows:
                CacheSettings(window, theta, weight)  # each grid point is a valid setting
    lam = np.asarray(lambdas, dtype=np.float64)[:, None]  # (lambdas, 1): broadcasts over rows
    longest = max(windows)
    total = np.zeros((len(thetas), len(lambdas), len(windows)))
    for start in range(0, len(targets), TUNE_BLOCK):
        stop = min(start + TUNE_BLOCK, len(targets))
        first = max(0, start - longest)
        dots = hidden[start:stop] @ hidden[first:stop].T  # (rows, history + rows)
        match = targets[None, first:stop] == targets[start:stop, None]
        base = model_logp[start:stop]
        for w, window in enumerate(windows):
            history = min(window, start)  # a suffix of the longest window's history
            columns = slice(start - first - history, None)
            unreachable = out_of_reach(stop - start, history, window)
            shifted, nonempty = shifted_scores(dots[:, columns], unreachable)
            for t, theta in enumerate(thetas):
                cache = cache_logprobs(shifted, match[:, columns], theta)
                mixed = np.where(nonempty, mix_logprobs(base, cache, lam), base)
                total[t, :, w] += mixed.sum(axis=1)
    n = len(targets)
    grid_ppl = np.exp(-total / n)
    model_ppl = math.exp(-float(model_logp.sum()) / n)
    t, lam_index, w = (int(i) for i in np.unravel_index(int(np.argmin(grid_ppl)), grid_ppl.shape))
    best = float(grid_ppl[t, lam_index, w])
    if not best < model_ppl:
        return CacheTuning(None, model_ppl, model_ppl, grid_ppl)
    settings = CacheSettings(int(windows[w]), float(thetas[t]), float(lambdas[lam_index]))
    return CacheTuning(settings, best, model_ppl, grid_ppl)
