"""Count-based n-gram models: add-one unigram and interpolated Kneser-Ney, and the Kneser-Ney
side of the shipped model's mixture.

Both use the RNN's exact data and convention: the training counts come from train.npy alone,
taken as one token stream (every sentence closed by `<eos>`, `<unk>` an ordinary token), and a
stream is scored like `streams.lm_pairs` scores it: every token is predicted, and the history
before the first token is `<eos>` (repeated for the longer histories of higher orders).

    probs = fit_unigram(train, vocab_size)            # (counts + 1) / (tokens + vocab_size)
    lm = fit_kneser_ney(train, vocab_size, order=3)   # modified KN: three discounts per order
    perplexity(unigram_logprobs(probs, test)), perplexity(lm.logprobs(test))
    w = interpolation_weight(rnn_val_logp, lm.logprobs(val))  # (1 - w) p_rnn + w p_kn
    mixer = NgramMixer(lm, w)                         # one stream, its history carried:
    mixer.mix(rnn_logp, targets)                      # a window's mixed log-probs
    mixer.distribution(rnn_probs)                     # the next position, over the vocabulary

Kneser-Ney is the interpolated form of Chen & Goodman (1998): the highest order discounts raw
counts, each lower order discounts continuation counts (how many distinct words precede the
n-gram), and the unigram level is interpolated with the uniform distribution over the
vocabulary, so no token has probability zero. Modified KN uses discounts D1, D2, D3+ per order,
estimated from that order's count-of-counts. NLTK's `nltk.lm.KneserNeyInterpolated` computes the
continuation counts by scanning every n-gram on each call (about 40 ms a token here, 20 minutes
for the state_union test split) and has no modified discounts, hence this vectorised version:
n-grams are integer keys in sorted arrays, a whole stream is scored with `searchsorted`.

A fitted model is its keys and counts (`to_bytes`, a compressed npz); `from_bytes` checks them
and derives the probabilities again, so a stored model cannot hold a distribution that does not
sum to one. The export stage stores one in the ONNX model's metadata (rnnlm.inference), which
mixes it into every score, next-word list and sample.

`interpolation_weight` fits the weight of a linear interpolation of two models' per-token
probabilities (the RNN with Kneser-Ney) by EM on held-out data.

Pure numpy: no torch.
"""

from __future__ import annotations

import functools
import io
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from rnnlm.cache import mix_logprobs
from rnnlm.errors import is_int, is_real, short_repr
from rnnlm.streams import EOS_ID, check_token_ids, padded_history

# Discounts are kept in [MIN_DISCOUNT, k] for count level k: a discount of zero would leave no
# mass for the lower order (unseen words get probability 0), one above k would create mass.
MIN_DISCOUNT = 0.05
# Discount used when a count-of-counts in the estimate is zero (tiny corpora).
FALLBACK_DISCOUNT = 0.5
# EM for an interpolation weight stops once a step moves it less than this.
EM_TOLERANCE = 1e-7
EM_MAX_STEPS = 10_000
# Bounds on a stored model (`KneserNey.from_bytes`), far beyond any corpus rnnlm trains on: its
# tables unpacked (state_union's trigram model: 6 MB), a count, the order.
MAX_TABLE_BYTES = 1 << 30
MAX_COUNT = 1 << 40
MAX_ORDER = 10

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


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
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


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class KneserNey:
    """A fitted interpolated Kneser-Ney model of order `order` over ids 0..vocab_size-1.

    N-gram ids: a 1-gram's id is its word id; the k-grams (k >= 2) seen in training are sorted
    integer keys `id(first k-1 words) * vocab_size + last word`, and a k-gram's id is its index
    in `keys[k]`. Ids stay below (distinct n-grams) x vocab_size, so any order fits in int64.
    `counts[n]` are the counts the order-n statistics come from: raw counts at the highest
    order, continuation counts below (`_kn_counts`).
    """

    order: int
    vocab_size: int
    discount: Discount
    keys: dict[int, np.ndarray]  # k -> sorted int64 keys of the k-grams, k = 2..order
    counts: dict[int, np.ndarray]  # n -> int64 count of each n-gram, n = 1..order
    orders: dict[int, _Order]  # n -> statistics, n = 1..order

    @property
    def discounts(self) -> dict[int, tuple[float, float, float]]:
        """(D1, D2, D3+) of each order."""
        return {n: stats.discounts for n, stats in self.orders.items()}

    def logprobs(self, stream: np.ndarray, history: Sequence[int] | np.ndarray = ()) -> np.ndarray:
        """Natural-log probability of each token of `stream`.

        `history`: the tokens before the stream (only the last order-1 count); what it lacks
        of order-1 is `<eos>`, so the default is a stream's start.
        """
        stream = _check_ids(stream, self.vocab_size)
        if len(stream) == 0:
            return np.zeros(0)
        pad = self.order - 1
        padded = np.concatenate([self._context(history), stream])
        ids = gram_ids(self.keys, padded, self.vocab_size, self.order)
        prob = self._unigram[stream]
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

    def distribution(self, history: Sequence[int] | np.ndarray) -> np.ndarray:
        """p(w | history) for every word w (vocab_size,) float64; only the last order-1 ids
        count, and a shorter history is left-padded with `<eos>` (a stream's start)."""
        hist = self._context(history)
        prob = self._unigram.copy()
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

    @functools.cached_property
    def _unigram(self) -> np.ndarray:
        """The lowest order's distribution (V,): every `distribution` starts from it."""
        first = self.orders[1]
        return first.alpha + first.gamma[0] / self.vocab_size

    def _context(self, history: Sequence[int] | np.ndarray) -> np.ndarray:
        """The last order-1 ids of `history`, left-padded with `<eos>`: (order-1,) int64."""
        pad = self.order - 1
        hist = _check_ids(np.asarray(history, dtype=np.int64), self.vocab_size)
        hist = hist[max(len(hist) - pad, 0) :] if pad else hist[:0]
        return padded_history(hist, pad - len(hist))

    def to_bytes(self) -> bytes:
        """The model as a compressed npz of its keys and counts (`from_bytes` reads it)."""
        buffer = io.BytesIO()
        arrays: dict[str, Any] = {f"keys{k}": keys for k, keys in self.keys.items()}
        arrays.update({f"counts{n}": counts for n, counts in self.counts.items()})
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(
        cls, data: bytes, order: int, vocab_size: int, discount: Discount = "modified"
    ) -> KneserNey:
        """A model stored by `to_bytes`, its keys and counts checked; ValueError naming what
        is wrong (an archive that is not one, a missing or extra table, keys out of order or
        range, counts that are negative or of the wrong length)."""
        _check_settings(order, discount)
        if vocab_size <= EOS_ID:
            raise ValueError(f"vocab_size = {vocab_size}: must include <unk> and <eos>")
        expected = {f"keys{k}" for k in range(2, order + 1)} | {
            f"counts{n}" for n in range(1, order + 1)
        }
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                infos = archive.infolist()
                size = sum(info.file_size for info in infos)
                names = {info.filename.removesuffix(".npy") for info in infos}
                if size > MAX_TABLE_BYTES:
                    raise ValueError(
                        f"tables of {size:,} bytes unpacked, more than {MAX_TABLE_BYTES:,}"
                    )
                if names != expected:
                    raise ValueError(
                        f"tables {sorted(names)}, expected {sorted(expected)} for order {order}"
                    )
                arrays = {
                    name: np.load(io.BytesIO(archive.read(name + ".npy")), allow_pickle=False)
                    for name in sorted(expected)
                }
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ValueError(f"not an n-gram archive ({err})") from None
        keys = {k: _checked_keys(arrays, k, vocab_size) for k in range(2, order + 1)}
        counts = {}
        for n in range(1, order + 1):
            name = f"counts{n}"
            value = arrays[name]
            length = vocab_size if n == 1 else len(keys[n])
            if value.dtype.kind not in "iu" or value.shape != (length,):
                raise ValueError(
                    f"{name}: expected {length:,} integer counts, got {value.dtype} {value.shape}"
                )
            if length and (value.min() < 0 or value.max() > MAX_COUNT):
                raise ValueError(f"{name}: counts must lie in [0, {MAX_COUNT:,}]")
            counts[n] = value.astype(np.int64)
        if counts[order].sum() == 0:
            raise ValueError(f"counts{order}: no n-gram was counted")
        return _from_counts(order, vocab_size, discount, keys, counts)


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
    _check_settings(order, discount)
    stream = _check_ids(stream, vocab_size)
    if len(stream) == 0:
        raise ValueError("cannot fit a Kneser-Ney model on an empty stream")
    keys, counts = _kn_counts(stream, vocab_size, order)
    return _from_counts(order, vocab_size, discount, keys, counts)


def _check_settings(order: int, discount: Discount) -> None:
    if not is_int(order) or not 1 <= order <= MAX_ORDER:
        raise ValueError(f"order = {short_repr(order)}: must be an integer in [1, {MAX_ORDER}]")
    if isinstance(discount, str):
        if discount not in ("modified", "single"):
            raise ValueError(f"discount = {discount!r}: 'modified', 'single' or a number")
    elif not is_real(discount) or not 0 < discount <= 1:
        raise ValueError(f"discount = {discount}: a fixed discount must lie in (0, 1]")


def _kn_counts(
    stream: np.ndarray, vocab_size: int, order: int
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """The sorted keys of the k-grams (k >= 2) of the `<eos>`-padded stream, and the count of
    each n-gram the model uses: raw at the highest order, continuation counts below."""
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
    counts: dict[int, np.ndarray] = {}
    for n in range(1, order + 1):
        n_grams = vocab_size if n == 1 else len(keys[n])
        if n == order:  # raw counts of the n-grams that predict a training token
            counts[n] = np.bincount(ids[n][pad:], minlength=n_grams)
        else:  # continuation counts: distinct (n+1)-grams that end with the n-gram
            _, first = np.unique(ids[n + 1][pad:], return_index=True)
            counts[n] = np.bincount(ids[n][pad:][first], minlength=n_grams)
    return keys, counts


def _from_counts(
    order: int,
    vocab_size: int,
    discount: Discount,
    keys: dict[int, np.ndarray],
    counts: dict[int, np.ndarray],
) -> KneserNey:
    """The model whose n-grams and counts these are (checked by the caller)."""
    orders: dict[int, _Order] = {}
    for n in range(1, order + 1):
        context = np.zeros(len(counts[n]), dtype=np.int64) if n == 1 else keys[n] // vocab_size
        n_contexts = 1 if n == 1 else (vocab_size if n == 2 else len(keys[n - 1]))
        orders[n] = _order_stats(counts[n], context, n_contexts, discount)
    return KneserNey(order, vocab_size, discount, keys, counts, orders)


def _checked_keys(arrays: dict[str, np.ndarray], k: int, vocab_size: int) -> np.ndarray:
    """keys{k} of a stored model: int64, strictly increasing, each a (k-1)-gram id (below the
    number of (k-1)-grams) times vocab_size plus a word id."""
    name, value = f"keys{k}", arrays[f"keys{k}"]
    if value.dtype != np.int64 or value.ndim != 1:
        raise ValueError(f"{name}: expected 1-D int64 keys, got {value.dtype} {value.shape}")
    prefixes = vocab_size if k == 2 else len(arrays[f"keys{k - 1}"])
    if len(value) and (value[0] < 0 or value[-1] >= prefixes * vocab_size):
        raise ValueError(f"{name}: keys must lie in [0, {prefixes * vocab_size:,})")
    if len(value) > 1 and not (np.diff(value) > 0).all():
        raise ValueError(f"{name}: keys must be strictly increasing")
    return value


@dataclass(frozen=True)
class NgramSettings:
    """The n-gram a model mixes in after its cache, and its weight in the mixture, in (0, 1):
    what the model's `rnnlm.ngram` metadata holds (`rnnlm.inference` writes and reads it)."""

    model: KneserNey
    weight: float

    def __post_init__(self) -> None:
        if not is_real(self.weight) or not 0 < self.weight < 1:
            raise ValueError(f"weight = {short_repr(self.weight)}: must be a number in (0, 1)")

    def __str__(self) -> str:
        return f"Kneser-Ney order {self.model.order}, weight {self.weight:.3g}"


class NgramMixer:
    """The n-gram side of a mixture for one token stream: p = (1 - weight) p_in + weight p_kn,
    the n-gram's history carried from window to window (`<eos>` before the stream's start).

    `p_in` is what comes before it: the network's distribution, or the network mixed with its
    continuous cache. A stream cut into windows of any size gives the same result as one.
    """

    def __init__(self, model: KneserNey, weight: float) -> None:
        if not is_real(weight) or not 0 <= weight < 1:
            raise ValueError(f"n-gram weight = {short_repr(weight)}: must be a number in [0, 1)")
        self.model = model
        self.weight = float(weight)
        self._history = model._context(())

    def copy(self) -> NgramMixer:
        """An independent mixer with the same history (one per generated sample)."""
        twin = NgramMixer(self.model, self.weight)
        twin._history = self._history.copy()
        return twin

    def extend(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Add `tokens` to the history (what `mix` does after scoring them)."""
        self._history = self.model._context(np.concatenate([self._history, np.asarray(tokens)]))

    def mix(self, logp: np.ndarray, targets: Sequence[int] | np.ndarray) -> np.ndarray:
        """Mixed log-probs (T,) float64 of a window's targets, given log p_in of each (T,);
        then the targets join the history."""
        targets = np.asarray(targets, dtype=np.int64)
        logp = np.asarray(logp, dtype=np.float64)
        if logp.shape != targets.shape or logp.ndim != 1:
            raise ValueError(
                f"logp has shape {logp.shape}, targets {targets.shape}: one log-prob per target"
            )
        kn = self.model.logprobs(targets, self._history)
        self.extend(targets)
        return mix_logprobs(logp, kn, self.weight)

    def next_distribution(self) -> np.ndarray:
        """The n-gram's own distribution (V,) float64 at the next position, after the history."""
        return self.model.distribution(self._history)

    def distribution(self, probs: np.ndarray) -> np.ndarray:
        """The mixture (V,) float64 at the next position, given p_in there (V,)."""
        probs = np.asarray(probs, dtype=np.float64)
        if probs.shape != (self.model.vocab_size,):
            raise ValueError(
                f"probs must be one distribution ({self.model.vocab_size},), got {probs.shape}"
            )
        kn = self.next_distribution()
        return (1 - self.weight) * probs + self.weight * kn

    def mixed_logits(self, logits: np.ndarray) -> np.ndarray:
        """Logits (V,) float32 whose softmax is the mixture given logits of p_in: what a
        sampler draws from. In float32, in place where it can: a step of generation."""
        logits = np.asarray(logits, dtype=np.float32)
        if logits.shape != (self.model.vocab_size,):
            raise ValueError(
                f"logits must be one row ({self.model.vocab_size},), got {logits.shape}"
            )
        probs = np.subtract(logits, logits.max())
        np.exp(probs, out=probs)
        probs *= (1 - self.weight) / probs.sum(dtype=np.float64)
        kn = self.next_distribution()
        kn *= self.weight
        probs += kn.astype(np.float32)
        return np.log(probs, out=probs)


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
