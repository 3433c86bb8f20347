"""Count-based baselines for the `evaluate` stage: add-one unigram and interpolated Kneser-Ney.

Both use the RNN's exact data and convention: the training counts come from train.npy alone,
taken as one token stream (every sentence closed by `<eos>`, `<unk>` an ordinary token), and a
stream is scored like `streams.lm_pairs` scores it: every token is predicted, and the history
before the first token is `<eos>` (repeated for the longer histories of higher orders).

    probs = fit_unigram(train, vocab_size)            # (counts + 1) / (tokens + vocab_size)
    lm = fit_kneser_ney(train, vocab_size, order=3)   # modified KN: three discounts per order
    perplexity(unigram_logprobs(probs, test)), perplexity(lm.logprobs(test))
    w = interpolation_weight(rnn_val_logp, lm.logprobs(val))  # (1 - w) p_rnn + w p_kn

Kneser-Ney is the interpolated form of Chen & Goodman (1998): the highest order discounts raw
counts, each lower order discounts continuation counts (how many distinct words precede the
n-gram), and the unigram level is interpolated with the uniform distribution over the
vocabulary, so no token has probability zero. Modified KN uses discounts D1, D2, D3+ per order,
estimated from that order's count-of-counts. NLTK's `nltk.lm.KneserNeyInterpolated` computes the
continuation counts by scanning every n-gram on each call (about 40 ms a token here, 20 minutes
for the state_union test split) and has no modified discounts, hence this vectorised version:
n-grams are integer keys in sorted arrays, a whole stream is scored with `searchsorted`.

`interpolation_weight` fits the weight of a linear interpolation of two models' per-token
probabilities (the RNN with Kneser-Ney) by EM on held-out data.

Pure numpy: no torch, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from rnnlm.cache import mix_logprobs
from rnnlm.streams import EOS_ID, check_token_ids, padded_history

# Discounts are kept in [MIN_DISCOUNT, k] for count level k: a discount of zero would leave no
# mass for the lower order (unseen words get probability 0), one above k would create mass.
MIN_DISCOUNT = 0.05
# Discount used when a count-of-counts in the estimate is zero (tiny corpora).
FALLBACK_DISCOUNT = 0.5
# EM for an interpolation weight stops once a step moves it less than this.
EM_TOLERANCE = 1e-7
EM_MAX_STEPS = 10_000

Discount = Literal["modified", "single"] | float


def fit_unigram(stream: np.ndarray, vocab_size: int, add: float = 1.0) -> np.ndarray:
    """Unigram probabilities (vocab_size,) with add-`add` smoothing: (c + add) / (N + add V)."""
    counts = np.bincount(_check_ids(stream, vocab_size), minlength=vocab_size).astype(np.float64)
    total = counts.sum() + add * vocab_size
    if total <= 0:
        raise ValueError("cannot fit a unigram model: empty stream and add = 0")
    return (counts + add) / total


def unigram_logprobs(probs: np.ndarray, stream: np.ndarray) -> np.ndarray:
    """Natural-log probability of each token of `stream` under unigram `probs`."""
    return np.log(probs[_check_ids(stream, len(probs))])


def perplexity(logprobs: np.ndarray) -> float:
    """exp(-mean log-probability) over all scored tokens."""
    if len(logprobs) == 0:
        raise ValueError("perplexity of an empty stream")
    return math.exp(-float(np.mean(logprobs)))


def interpolation_weight(first: np.ndarray, second: np.ndarray) -> float:
    """The weight w in [0, 1] that maximises the likelihood of (1 - w) p_first + w p_second.

    Args:
        first, second: the two models' natural-log probability of each token of one
            held-out stream.

    EM: w becomes the mean posterior of `second` under the mixture. The log-likelihood is
    concave in w, so it converges to the maximum from any start.
    """
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if first.shape != second.shape or first.ndim != 1 or not len(first):
        raise ValueError(f"need two equal (N,) arrays, got {first.shape} and {second.shape}")
    weight = 0.5
    for _ in range(EM_MAX_STEPS):
        with np.errstate(divide="ignore"):  # a weight that reached 0 stays there
            posterior = np.exp(np.log(weight) + second - mix_logprobs(first, second, weight))
        new = float(posterior.mean())
        if abs(new - weight) < EM_TOLERANCE:
            return new
        weight = new
    return weight


def estimate_discounts(
    count_of_counts: Sequence[int], modified: bool = True
) -> tuple[float, float, float]:
    """Discounts (D1, D2, D3+) for n-grams seen once, twice, three or more times.

    Args:
        count_of_counts: n1..n4, how many n-grams have count 1, 2, 3 and 4.
        modified: Chen & Goodman's three estimates with Y = n1 / (n1 + 2 n2):
            D1 = 1 - 2Y n2/n1 (= Y), D2 = 2 - 3Y n3/n2, D3+ = 3 - 4Y n4/n3. Otherwise the
            single discount Y for every count.

    Returns:
        Each discount clipped to [MIN_DISCOUNT, k] for its count level k. When a denominator is
        zero (toy corpora), Y is FALLBACK_DISCOUNT and the modified estimates fall back to Y.
    """
    n1, n2, n3, n4 = (int(n) for n in count_of_counts)
    y = n1 / (n1 + 2 * n2) if n1 > 0 and n2 > 0 else FALLBACK_DISCOUNT
    if modified and min(n1, n2, n3, n4) > 0:
        raw = (y, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    else:
        raw = (y, y, y)
    d1, d2, d3 = (float(np.clip(d, MIN_DISCOUNT, k)) for k, d in enumerate(raw, start=1))
    return d1, d2, d3


@dataclass(frozen=True)
class _Order:
    """Statistics of one order n of a Kneser-Ney model.

    An n-gram's context is its first n-1 words, identified by an id (see `KneserNey`).
    `alpha[g]` is the discounted count of n-gram g over its context's total; `gamma[c]` the
    weight of the lower order in context c; `seen[c]` whether context c has any count (an
    unseen context passes the lower order through unchanged).
    """

    alpha: np.ndarray  # (n-grams,) float64
    gamma: np.ndarray  # (contexts,) float64
    seen: np.ndarray  # (contexts,) bool
    discounts: tuple[float, float, float]


@dataclass(frozen=True)
class KneserNey:
    """A fitted interpolated Kneser-Ney model of order `order` over ids 0..vocab_size-1.

    N-gram ids: a 1-gram's id is its word id; the k-grams (k >= 2) seen in training are sorted
    integer keys `id(first k-1 words) * vocab_size + last word`, and a k-gram's id is its index
    in `keys[k]`. Ids stay below (distinct n-grams) x vocab_size, so any order fits in int64.
    """

    order: int
    vocab_size: int
    keys: dict[int, np.ndarray]  # k -> sorted int64 keys of the k-grams, k = 2..order
    orders: dict[int, _Order]  # n -> statistics, n = 1..order

    @property
    def discounts(self) -> dict[int, tuple[float, float, float]]:
        """(D1, D2, D3+) of each order."""
        return {n: stats.discounts for n, stats in self.orders.items()}

    def logprobs(self, stream: np.ndarray) -> np.ndarray:
        """Natural-log probability of each token of `stream`, history starting at `<eos>`."""
        stream = _check_ids(stream, self.vocab_size)
        if len(stream) == 0:
            return np.zeros(0)
        pad = self.order - 1
        ids = gram_ids(self.keys, padded_history(stream, pad), self.vocab_size, self.order)
        first = self.orders[1]
        prob = first.alpha[stream] + first.gamma[0] / self.vocab_size
        for n in range(2, self.order + 1):
            stats = self.orders[n]
            context = ids[n - 1][pad - 1 : -1]  # the n-1 words before each target
            gram = ids[n][pad:]
            known = context >= 0
            known[known] = stats.seen[context[known]]
            alpha = np.where(gram >= 0, stats.alpha[np.maximum(gram, 0)], 0.0)
            gamma = stats.gamma[np.maximum(context, 0)]
            prob = np.where(known, alpha + gamma * prob, prob)
        return np.log(prob)

    def distribution(self, history: Sequence[int]) -> np.ndarray:
        """p(w | history) for every word w (vocab_size,); only the last order-1 ids count.

        A history shorter than order-1 is left-padded with `<eos>` (a stream's start).
        """
        pad = self.order - 1
        hist = padded_history(_check_ids(np.asarray(history, dtype=np.int64), self.vocab_size), pad)
        hist = hist[len(hist) - pad :] if pad else hist[:0]
        first = self.orders[1]
        prob = first.alpha + first.gamma[0] / self.vocab_size
        for n in range(2, self.order + 1):
            context = _lookup_gram(self.keys, hist[len(hist) - (n - 1) :], self.vocab_size)
            stats = self.orders[n]
            if context < 0 or not stats.seen[context]:
                continue
            keys = self.keys[n]
            base = context * self.vocab_size
            lo, hi = np.searchsorted(keys, [base, base + self.vocab_size])
            prob = stats.gamma[context] * prob
            prob[keys[lo:hi] - base] += stats.alpha[lo:hi]
        return prob


def fit_kneser_ney(
    stream: np.ndarray, vocab_size: int, order: int = 3, discount: Discount = "modified"
) -> KneserNey:
    """Fit interpolated Kneser-Ney on one training stream.

    Args:
        stream: training token ids; the history before the first one is `<eos>`.
        vocab_size: size of the vocabulary (the uniform floor is 1 / vocab_size).
        order: n-gram order (1 = continuation-count unigram interpolated with uniform).
        discount: "modified" (D1, D2, D3+ per order), "single" (one estimated D per order), or
            a fixed D in (0, 1] for every order and count.
    """
    if order < 1:
        raise ValueError(f"order = {order}: must be >= 1")
    if isinstance(discount, str):
        if discount not in ("modified", "single"):
            raise ValueError(f"discount = {discount!r}: 'modified', 'single' or a number")
    elif not 0 < discount <= 1:
        raise ValueError(f"discount = {discount}: a fixed discount must lie in (0, 1]")
    stream = _check_ids(stream, vocab_size)
    if len(stream) == 0:
        raise ValueError("cannot fit a Kneser-Ney model on an empty stream")
    pad = order - 1
    padded = padded_history(stream, pad)
    keys: dict[int, np.ndarray] = {}
    ids: dict[int, np.ndarray] = {1: padded}
    for k in range(2, order + 1):
        # The k-gram ending at i is the (k-1)-gram ending at i-1 followed by the word at i.
        full = np.full(len(padded), -1, dtype=np.int64)
        new_keys = ids[k - 1][k - 2 : -1] * vocab_size + padded[k - 1 :]
        keys[k], full[k - 1 :] = np.unique(new_keys, return_inverse=True)
        ids[k] = full

    orders: dict[int, _Order] = {}
    for n in range(1, order + 1):
        n_grams = vocab_size if n == 1 else len(keys[n])
        if n == order:  # raw counts of the n-grams that predict a training token
            counts = np.bincount(ids[n][pad:], minlength=n_grams)
        else:  # continuation counts: distinct (n+1)-grams that end with the n-gram
            _, first = np.unique(ids[n + 1][pad:], return_index=True)
            counts = np.bincount(ids[n][pad:][first], minlength=n_grams)
        context = np.zeros(n_grams, dtype=np.int64) if n == 1 else keys[n] // vocab_size
        n_contexts = 1 if n == 1 else (vocab_size if n == 2 else len(keys[n - 1]))
        orders[n] = _order_stats(counts, context, n_contexts, discount)
    return KneserNey(order=order, vocab_size=vocab_size, keys=keys, orders=orders)


def _order_stats(
    counts: np.ndarray, context: np.ndarray, n_contexts: int, discount: Discount
) -> _Order:
    """Discounted counts and interpolation weights of one order from its n-gram counts."""
    if isinstance(discount, str):
        count_of_counts = [int(np.count_nonzero(counts == r)) for r in range(1, 5)]
        discounts = estimate_discounts(count_of_counts, modified=discount == "modified")
    else:
        discounts = (float(discount),) * 3
    table = np.array([0.0, *discounts])  # index = min(count, 3): no discount for count 0
    d = table[np.minimum(counts, 3)]
    total = np.bincount(context, weights=counts, minlength=n_contexts)
    removed = np.bincount(context, weights=d, minlength=n_contexts)
    seen = total > 0
    safe = np.where(seen, total, 1.0)
    return _Order(
        alpha=(counts - d) / safe[context],
        gamma=np.where(seen, removed / safe, 1.0),
        seen=seen,
        discounts=discounts,
    )


def gram_ids(
    keys: dict[int, np.ndarray], padded: np.ndarray, vocab_size: int, order: int
) -> dict[int, np.ndarray]:
    """k -> the id of the k-gram ending at each position of `padded` (-1: not in training)."""
    ids: dict[int, np.ndarray] = {1: padded}
    for k in range(2, order + 1):
        full = np.full(len(padded), -1, dtype=np.int64)
        prefix = ids[k - 1][k - 2 : -1]
        full[k - 1 :] = _search(keys[k], prefix * vocab_size + padded[k - 1 :], prefix >= 0)
        ids[k] = full
    return ids


def _lookup_gram(keys: dict[int, np.ndarray], words: np.ndarray, vocab_size: int) -> int:
    """Id of the n-gram `words` (n >= 1) in training, or -1."""
    gram = int(words[0])
    for k in range(2, len(words) + 1):
        gram = int(_search(keys[k], np.array([gram * vocab_size + words[k - 1]]), gram >= 0)[0])
    return gram


def _search(sorted_keys: np.ndarray, queries: np.ndarray, valid: np.ndarray | bool) -> np.ndarray:
    """Index of each query in `sorted_keys`, -1 where absent or not `valid`."""
    index = np.searchsorted(sorted_keys, queries)
    clipped = np.minimum(index, len(sorted_keys) - 1)
    found = (index < len(sorted_keys)) & (sorted_keys[clipped] == queries) & valid
    return np.where(found, clipped, -1)


def _check_ids(stream: np.ndarray, vocab_size: int) -> np.ndarray:
    """`stream` as a 1-D int64 array of ids in [0, vocab_size) (empty allowed), or ValueError."""
    if vocab_size <= EOS_ID:
        raise ValueError(f"vocab_size = {vocab_size}: must include <unk> and <eos>")
    return check_token_ids(stream, vocab_size, allow_empty=True)
