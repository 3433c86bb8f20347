"""Inference on CPU with onnxruntime: score text, predict the next word, generate text.

    LanguageModel("models/model.onnx")   -> .score(text), .score_stream(file), .score_ids(ids),
                                            .next_words(prompt, k), .generate(prompt, ...),
                                            .step(ids, state)
    LanguageModel(path, cache=False)     -> the same without the continuous cache
    LanguageModel(path, ngram=False)     -> the same without the Kneser-Ney n-gram

The `.onnx` file written by the `export` stage is self-contained: besides the network it holds,
as JSON strings in its metadata (`metadata_props`), the vocabulary, the tokenizer settings
(lowercase flag, paragraph rule, Punkt sentence-splitter parameters), the model configuration,
the names of the recurrent-state inputs/outputs, the provenance (MLflow run, git commit,
params digest), the continuous cache's settings and the Kneser-Ney n-gram (its tables and
weight) tuned by the export stage. This module defines that metadata schema and is the only
reader of it.

The network's signature is `tokens (batch, time) int64, h0[, c0] (layers, batch, hidden)
float32 -> logits (batch, time, vocab), hidden (batch, time, hidden), h1[, c1]`, where `hidden`
is the top layer's output at each step (models exported before it have no `hidden` output and
score without the cache). Generation feeds one token per call and carries the state (the prefix
is never re-run); scoring walks a stream in windows with the state carried across them, with
the `<eos>`-start convention of `streams.lm_pairs`. `score_stream` scores a file of any size in
bounded memory: bytes are read in chunks, cut into paragraphs (rnnlm.text.PieceSplitter),
tokenized, and fed in windows as the tokens arrive.

Scoring and `next_words` mix the network's distribution with a continuous cache (rnnlm.cache:
Grave et al. 2017) when the model's metadata carries tuned settings (`rnnlm.cache`), unless
the model is opened with `cache=False`; then that with an interpolated Kneser-Ney n-gram
(rnnlm.ngram) when the metadata carries one (`rnnlm.ngram`), unless opened with `ngram=False`:

    p = (1 - w) [(1 - lambda) p_network + lambda p_cache] + w p_kn

`score_ids`/`token_nlls` also take `cache=False` and `ngram=False`; both False is the network
alone. Generation draws from the same mixture (each sample its own cache and n-gram history).

Imports numpy, onnxruntime, `rnnlm.cache`, `rnnlm.ngram` and `rnnlm.text` only: never torch,
lightning or mlflow, so that the CLI starts fast and runs where only onnxruntime is installed.
Used by `rnnlm.cli` (the `rnnlm` command), the `export` stage (latency and perplexity of the
exported files, the tuning of the cache and the n-gram's weight) and bench/.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import ctypes
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import onnxruntime as ort

from rnnlm.cache import CacheSettings, ContinuousCache
from rnnlm.errors import RnnlmError, is_int, is_real, short_repr
from rnnlm.ngram import KneserNey, NgramMixer, NgramSettings
from rnnlm.streams import EOS, EOS_ID, UNK, UNK_ID, check_token_ids, lm_pairs
from rnnlm.text import READ_BYTES, TextTokenizer, detokenize

if TYPE_CHECKING:  # rnnlm.graphs imports onnx, loaded only when a stream is scored
    from rnnlm.graphs import AdaptiveSoftmax

log = logging.getLogger(__name__)

# The metadata schema (keys of the ONNX model's metadata_props; values are JSON strings).
FORMAT_KEY = "rnnlm.format"
FORMAT_VERSION = 1
MODEL_KEY = "rnnlm.model"  # the RNNLMConfig fields: vocab_size, cell, dims, layers, ...
IO_KEY = "rnnlm.io"  # input/output names: tokens, logits, state_in, state_out
VOCAB_KEY = "rnnlm.vocab"  # the token list in id order
TOKENIZER_KEY = "rnnlm.tokenizer"  # TextTokenizer.to_dict()
PROVENANCE_KEY = "rnnlm.provenance"  # run id, git commit, params digest, exporter, opset
PRECISION_KEY = "rnnlm.precision"  # "fp32" or "int8"
CONVENTIONS_KEY = "rnnlm.conventions"  # how text becomes the model's input: see conventions()
# The continuous cache tuned on validation: cache_metadata(); null (or absent): no cache.
CACHE_KEY = "rnnlm.cache"
# The Kneser-Ney n-gram mixed in after the cache: ngram_metadata(); null (or absent): none.
NGRAM_KEY = "rnnlm.ngram"
REQUIRED_KEYS = (FORMAT_KEY, MODEL_KEY, IO_KEY, VOCAB_KEY, TOKENIZER_KEY)
_JSON_KEYS = (*REQUIRED_KEYS, PROVENANCE_KEY, CONVENTIONS_KEY, CACHE_KEY, NGRAM_KEY)
# What the metadata reader accepts before it parses anything: an exported model's entries
# total a few MB (the tokenizer's Punkt tables, a vocabulary of up to a few 100k words).
MAX_METADATA_CHARS = 64 << 20
MAX_JSON_DEPTH = 16  # the deepest entry (the tokenizer) nests 4 levels
# Sane network sizes: far beyond any model rnnlm trains, far below what breaks arithmetic.
MAX_DIM = 1 << 20
MAX_LAYERS = 64

TOKENS_INPUT = "tokens"
LOGITS_OUTPUT = "logits"
HIDDEN_OUTPUT = "hidden"  # the top layer's output at each step: the continuous cache's keys
# Tokens per call when feeding a prompt or scoring a stream: bounds memory (window x vocab
# logits) whatever the text's length; the state carries the context across windows.
WINDOW = 256
# Upper bounds that catch a typo before it becomes a huge allocation or a run of hours:
# `generate` keeps (num_samples, vocab) logits per step and max_tokens ids per sample.
MAX_TOKENS = 1_000_000
MAX_SAMPLES = 1_000
MAX_THREADS = 1_024
# A prompt is context for the recurrent state, which keeps only the recent past: a longer one
# is almost surely a whole file passed by mistake, and NLTK's tokenizers take up to ~70 us a
# character on short-sentence text (a 100k-character prompt: seconds, not minutes).
MAX_PROMPT_CHARS = 100_000
# Unknown prompt words named in the warning; the rest are counted.
_UNKNOWN_SHOWN = 10
# Rows of at most this many entries are sampled with one cumulative sum; longer ones in two
# levels (block sums, then one block), which avoids a full-length cumsum per generated token.
_FLAT_CDF_MAX = 256

State = tuple[np.ndarray, ...]


class ModelLoadError(RnnlmError):
    """The model file is missing, not ONNX, or not an rnnlm model."""


def state_io_names(state_names: Sequence[str]) -> tuple[list[str], list[str]]:
    """ONNX input and output names of the recurrent state: (['h0', 'c0'], ['h1', 'c1'])."""
    return [f"{n}0" for n in state_names], [f"{n}1" for n in state_names]


def io_metadata(state_names: Sequence[str]) -> dict[str, Any]:
    """The `rnnlm.io` entry for a model whose state tensors are `state_names`."""
    state_in, state_out = state_io_names(state_names)
    return {
        "tokens": TOKENS_INPUT,
        "logits": LOGITS_OUTPUT,
        "hidden": HIDDEN_OUTPUT,
        "state": list(state_names),
        "state_in": state_in,
        "state_out": state_out,
    }


def conventions(lowercase: bool, paragraphs: str) -> dict[str, Any]:
    """What an outside client needs to feed the model without reading rnnlm's source.

    Stored as the `rnnlm.conventions` metadata entry; `rnnlm.tokenizer` holds the parameters
    (Punkt's learned abbreviations etc.) these steps use.
    """
    return {
        "text_to_tokens": [
            f"split the text into paragraphs ({paragraphs!r}: "
            + ("each non-empty line" if paragraphs == "line" else "blocks between blank lines")
            + ")",
            "split each paragraph into sentences with nltk.tokenize.PunktSentenceTokenizer "
            "built from rnnlm.tokenizer's punkt parameters",
            "split each sentence into words with nltk.tokenize.NLTKWordTokenizer"
            + (", after lowercasing it" if lowercase else " (case kept)"),
            f"close every sentence with {EOS}",
        ],
        "lowercase": lowercase,
        "word_tokenizer": "nltk.tokenize.NLTKWordTokenizer",
        "sentence_splitter": "nltk.tokenize.PunktSentenceTokenizer",
        "ids": f"position in rnnlm.vocab; a word not in it is {UNK} (id {UNK_ID})",
        "unknown_token": UNK,
        "unknown_id": UNK_ID,
        "sentence_end_token": EOS,
        "sentence_end_id": EOS_ID,
        "stream_start": (
            f"a stream starts at a sentence boundary: feed {EOS} (id {EOS_ID}) first, from a "
            "zero state, so that the first word is predicted too"
        ),
        "state": (
            "pass the returned state back with the next tokens to continue the stream; zeros "
            "of shape (num_layers, batch, hidden_dim) start one"
        ),
        "output": "logits over rnnlm.vocab; softmax gives p(next token | stream so far)",
        "cache": (
            f"optional ({CACHE_KEY} not null): keep the last `window` pairs ({HIDDEN_OUTPUT} "
            "vector h_i at position i, the token that followed it); at position t, "
            "p_cache(w) = sum over the pairs followed by w of exp(theta h_t.h_i), divided by "
            "the sum over all pairs, and p = (1 - lambda) softmax(logits) + lambda p_cache "
            "(p = softmax(logits) while no pair is kept). Grave et al., ICLR 2017"
        ),
        "ngram": (
            f"optional ({NGRAM_KEY} not null): an interpolated (modified) Kneser-Ney n-gram of "
            "the given order over the same ids, counted on the training split (Chen & Goodman "
            "1998); its tables are a base64 numpy .npz of sorted keys (id of the first n-1 "
            "words x vocabulary size + the last word) and counts, as rnnlm.ngram stores them; "
            "its history starts with order-1 <eos>. p = (1 - weight) p + weight p_kn, after "
            "the cache"
        ),
    }


def cache_metadata(settings: CacheSettings | None) -> dict[str, Any] | None:
    """The `rnnlm.cache` entry: the tuned settings, or None for a model scored without."""
    if settings is None or settings.lam == 0:
        return None
    return {"window": settings.window, "theta": settings.theta, "lambda": settings.lam}


def ngram_metadata(settings: NgramSettings | None) -> dict[str, Any] | None:
    """The `rnnlm.ngram` entry: order, discount, weight and the tables (base64 of
    `KneserNey.to_bytes`) with their SHA-256; None for a model scored without."""
    if settings is None:
        return None
    tables = settings.model.to_bytes()
    return {
        "order": settings.model.order,
        "discount": settings.model.discount,
        "weight": settings.weight,
        "sha256": hashlib.sha256(tables).hexdigest(),
        "tables": base64.b64encode(tables).decode("ascii"),
    }


@dataclass(frozen=True)
class SentenceScore:
    """One sentence of a scored text: its words, token count (with `<eos>`) and NLL in nats."""

    words: tuple[str, ...]
    tokens: int
    nll: float

    @functools.cached_property
    def text(self) -> str:
        # Detokenizing costs as much as tokenizing: done only for the sentences shown.
        return detokenize(self.words)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, "nll": self.nll, "ppl": self.ppl}


@dataclass(frozen=True)
class ScoreResult:
    """Total negative log-likelihood (nats) of `tokens` predicted tokens, and its perplexity."""

    nll: float
    tokens: int
    unknown: int = 0  # tokens that were `<unk>` (out of vocabulary)
    sentences: list[SentenceScore] = field(default_factory=list)
    bytes: int | None = None  # input read, for a scored stream (score_stream)
    seconds: float | None = None  # time spent reading and scoring it

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    def to_dict(self, per_sentence: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ppl": self.ppl,
            "nll": self.nll,
            "mean_nll": self.mean_nll,
            "tokens": self.tokens,
            "unknown": self.unknown,
        }
        if self.bytes is not None:
            out["bytes"] = self.bytes
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if per_sentence:
            out["sentences"] = [s.to_dict() for s in self.sentences]
        return out


def check_text(name: str, value: object) -> None:
    """Raise ValueError unless the argument `name` is a str (a prompt or a text to score)."""
    if not isinstance(value, str):
        raise ValueError(f"{name} = {short_repr(value)}: expected str, got {type(value).__name__}")


def check_k(k: int) -> None:
    """Raise ValueError, naming it, when `k` (how many next words) is no integer >= 1."""
    if not is_int(k) or k < 1:
        raise ValueError(f"k = {short_repr(k)}: must be an integer >= 1")


def check_sampling(
    temperature: float,
    top_k: int,
    top_p: float,
    max_tokens: int = 0,
    num_samples: int = 1,
    seed: int | None = None,
) -> None:
    """Raise ValueError, naming the argument, for values `generate` cannot honour."""
    if not (is_real(temperature) and math.isfinite(temperature)):
        raise ValueError(f"temperature = {short_repr(temperature)}: must be a finite number >= 0")
    if temperature < 0:
        raise ValueError(f"temperature = {temperature}: must be >= 0 (0 = greedy)")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k = {short_repr(top_k)}: must be an integer >= 0 (0 = no limit)")
    if not (is_real(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p = {short_repr(top_p)}: must be in (0, 1] (1 = no limit)")
    if not is_int(max_tokens) or not 0 <= max_tokens <= MAX_TOKENS:
        raise ValueError(
            f"max_tokens = {short_repr(max_tokens)}: must be an integer in [0, {MAX_TOKENS}]"
        )
    if not is_int(num_samples) or not 1 <= num_samples <= MAX_SAMPLES:
        raise ValueError(
            f"num_samples = {short_repr(num_samples)}: must be an integer in [1, {MAX_SAMPLES}]"
        )
    if seed is not None and (not is_int(seed) or seed < 0):
        raise ValueError(f"seed = {short_repr(seed)}: must be an integer >= 0 or None")


def _draw(cdf: list[float], target: float, p: np.ndarray) -> int:
    """The index i with cdf[i-1] <= target < cdf[i]: an entry of p > 0 by construction.

    Rounding can put `target` at or past the total; the last entry > 0 is then the answer.
    """
    i = bisect.bisect_right(cdf, target)
    return i if i < len(cdf) else int(np.flatnonzero(p)[-1])


@functools.lru_cache(maxsize=16)
def _blocks(n: int) -> tuple[int, np.ndarray]:
    """Block size (ceil(sqrt(n))) and block start indices for two-level sampling of n entries."""
    block = math.isqrt(n - 1) + 1
    return block, np.arange(0, n, block)


def _draw_row(p: np.ndarray, u: float) -> int:
    """Sample an index of the unnormalised probabilities `p` (1-D) with the uniform `u`.

    Cumulative sums are taken over at most ~sqrt(n) Python floats (float64), which for a
    vocabulary of 10k costs less than numpy's per-call overhead would.
    """
    n = len(p)
    if n <= _FLAT_CDF_MAX:
        cdf = list(itertools.accumulate(p.tolist()))
        return _draw(cdf, u * cdf[-1], p)
    # Two levels: the mass of each block of sqrt(n) entries, a block, then an entry in it.
    block, starts = _blocks(n)
    mass = np.add.reduceat(p, starts)  # sums of about sqrt(n) terms: p's own precision
    cdf = list(itertools.accumulate(mass.tolist()))
    target = u * cdf[-1]
    chosen = _draw(cdf, target, mass)
    rest = target - (cdf[chosen - 1] if chosen else 0.0)
    inner = p[chosen * block : (chosen + 1) * block]
    return chosen * block + _draw(list(itertools.accumulate(inner.tolist())), rest, inner)


def inverse_cdf(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Sample one index per row of unnormalised probabilities `p` (rows, n) from uniforms `u`.

    Rows longer than `_FLAT_CDF_MAX` are sampled in two levels (sqrt(n) blocks of sqrt(n)
    entries): a block by its mass, then an entry inside it. Same distribution as one
    cumulative sum over the row, at a fraction of the cost for a 10k-word vocabulary. An entry
    whose probability is 0 is never drawn.
    """
    return np.array([_draw_row(row, u_row) for row, u_row in zip(p, u.tolist(), strict=True)])


# The nucleus (top-p) is looked for among the best _NUCLEUS_FIRST tokens, then 8 times as many,
# and so on: a partial selection (argpartition) instead of a sort of the whole vocabulary.
_NUCLEUS_FIRST = 64


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k best logits of each row (rows, vocab), in id order (rows, k).

    A partial selection (np.partition), not a sort: the k-th best value, every id above it,
    then the lowest ids among those equal to it (ties go to the more frequent words, and the
    result does not depend on how numpy orders a partition).
    """
    vocab = logits.shape[-1]
    kth = np.partition(logits, vocab - k, axis=-1)[:, vocab - k]
    out = np.empty((len(logits), k), dtype=np.int64)
    for row, value, ids in zip(logits, kth, out, strict=True):
        above = np.flatnonzero(row > value)
        ties = np.flatnonzero(row == value)[: k - len(above)]
        ids[:] = np.sort(np.concatenate([above, ties]))
    return out


def _keep_nucleus(p: np.ndarray, top_p: float) -> None:
    """Zero the entries of `p` (1-D, >= 0, its best entry 1) outside its nucleus, in place.

    The nucleus is what a stable sort of the whole row would keep: the best tokens (ties in
    index order) whose better ones do not yet reach `top_p` of the total mass. It is found
    among the best m tokens (m = 64, 512, ...) and accepted once the mass before the last
    candidates' tie group reaches the limit: no token outside can then be kept.
    """
    n = len(p)
    limit = top_p * p.sum(dtype=np.float64)
    m = min(n, _NUCLEUS_FIRST)
    while True:
        top = np.argpartition(p, n - m)[n - m :] if m < n else np.arange(n)
        top = top[np.lexsort((top, -p[top]))]  # best first, ties by index
        ranked = p[top]
        mass_before = np.cumsum(ranked, dtype=np.float64) - ranked
        last_ties = int(np.searchsorted(-ranked, -ranked[-1]))  # first of the smallest's ties
        if m == n or mass_before[last_ties] >= limit:
            break
        m = min(n, 8 * m)
    kept = top[mass_before < limit]  # the best token always: its mass before is 0
    values = p[kept]
    p.fill(0.0)
    p[kept] = values


class Sampler:
    """Draws one token id per row of logits (rows, vocab): greedy, temperature, top-k, nucleus.

    temperature 0 is argmax. Probabilities are exp((logit - max) / temperature): shifted in log
    space, so the row's best token gets exactly 1 and every other one a value in [0, 1] and no
    temperature (5e-324 or 1e300) can produce NaN (a quotient that overflows is -inf, whose exp
    is 0). They are in the logits' precision at temperature 1 (float32: relative error 1e-7,
    irrelevant to sampling; the fast path of plain sampling) and float64 otherwise; the
    cumulative sums that pick the token are float64 (`inverse_cdf`). top_k > 0 keeps the k best
    tokens (`_top_k`: ties go to the lower id), top_p < 1 the smallest set of best tokens whose
    probability reaches top_p (after top_k; found without sorting the vocabulary,
    `_keep_nucleus`). Both give the draws a full sort of the row would give.

    The work arrays are kept from one call to the next, so `generate` allocates no
    vocabulary-sized array per step for plain sampling (top-k and top-p allocate the index
    arrays of a partial selection). The same `rng` draws give the same tokens as one
    `sample_next` call per step.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> None:
        self.rng = rng
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self._shifted: np.ndarray | None = None  # logits - max, in the logits' dtype
        self._scaled: np.ndarray | None = None  # / temperature, float64

    def _buffers(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        if self._shifted is None or self._shifted.shape != shape or self._shifted.dtype != dtype:
            self._shifted = np.empty(shape, dtype)
            self._scaled = self._shifted if self.temperature == 1 else np.empty(shape, np.float64)
        assert self._scaled is not None
        return self._shifted, self._scaled

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.temperature == 0:
            return logits.argmax(axis=-1)
        vocab = logits.shape[-1]
        candidates = None
        if 0 < self.top_k < vocab:
            candidates = _top_k(logits, self.top_k)
            logits = np.take_along_axis(logits, candidates, axis=-1)  # (rows, top_k)
        x, p = self._buffers(logits.shape, logits.dtype)
        # <= 0, and exactly 0 for the best token
        np.subtract(logits, logits.max(axis=-1, keepdims=True), out=x)
        if p is not x:
            with np.errstate(over="ignore"):  # -inf for a tiny temperature: exp gives 0
                np.divide(x, np.float64(self.temperature), out=p)  # 1e-300 stays non-zero
        np.exp(p, out=p)  # in [0, 1]: nothing overflows, no NaN
        if self.top_p < 1.0:
            for row in p:
                _keep_nucleus(row, self.top_p)
        choice = inverse_cdf(p, self.rng.random((p.shape[0],)))
        if candidates is not None:
            choice = np.take_along_axis(candidates, choice[:, None], axis=-1)[:, 0]
        return choice


def sample_next(
    logits: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> np.ndarray:
    """One token id per row of `logits` (rows, vocab): one draw of a `Sampler` (which says how)."""
    return Sampler(rng, temperature, top_k, top_p)(logits)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per position, float64; logits (n, vocab), targets (n,)."""
    x = logits.astype(np.float64)
    top = x.max(axis=-1)
    log_norm = top + np.log(np.exp(x - top[:, None]).sum(axis=-1))
    return log_norm - x[np.arange(len(targets)), targets]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities along the last axis, float64, computed stably."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (macOS, musl, Windows)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the operating system, where the C library can.

    Building a session parses the whole model file and copies its weights, then frees the
    parsed copy; glibc keeps such freed pages mapped, so without this the process stays that
    much larger while it scores (`rnnlm score` of the LSTM 512 on 3 MB: peak RSS 306 -> 278 MB).
    Called after each session is built, not per window: a trim walks the heap (~1 ms).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def check_threads(threads: int | None) -> None:
    """Raise ValueError unless `threads` is None or a whole number in [1, MAX_THREADS]."""
    if threads is not None and (not is_int(threads) or not 1 <= threads <= MAX_THREADS):
        raise ValueError(
            f"threads = {short_repr(threads)}: must be an integer in [1, {MAX_THREADS}] "
            "(None: the default)"
        )


def session_options(threads: int | None = None, spinning: bool = True) -> ort.SessionOptions:
    """Options for small recurrent models: all graph optimisations, sequential execution.

    `threads`: intra-op threads (None: onnxruntime's default, one per physical core).
    `spinning=False` lets idle pool threads sleep at once instead of spinning for new work:
    right for sessions that take turns on the same cores (batched scoring's two), wrong for a
    chain of tiny steps (a recurrence, one generated token), where waking them costs more.
    """
    check_threads(threads)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1  # one chain of ops: inter-op parallelism cannot help
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return options


def _json_depth(value: Any) -> int:
    """How deeply `value` nests lists and objects, iteratively (never a RecursionError)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                children = item.values() if isinstance(item, dict) else item
                stack.extend((child, depth + 1) for child in children)
    return deepest


def read_metadata(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """Parse and check the rnnlm entries of an ONNX model's metadata: present, of a bounded
    size and depth, valid JSON of this format version."""
    if FORMAT_KEY not in metadata:
        raise ModelLoadError(
            f"{path}: an ONNX model, but not an rnnlm model (no '{FORMAT_KEY}' metadata); "
            "export one with `dvc repro export` (or python -m rnnlm.export)"
        )
    missing = [key for key in REQUIRED_KEYS if key not in metadata]
    if missing:
        raise ModelLoadError(f"{path}: rnnlm metadata incomplete, missing {', '.join(missing)}")
    size = sum(len(metadata[key]) for key in _JSON_KEYS if key in metadata)
    if size > MAX_METADATA_CHARS:
        raise ModelLoadError(
            f"{path}: rnnlm metadata of {size:,} characters, more than {MAX_METADATA_CHARS:,}: "
            "not a model rnnlm exported"
        )
    parsed = {}
    for key in (k for k in _JSON_KEYS if k in metadata):
        try:
            parsed[key] = json.loads(metadata[key])
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"{path}: rnnlm metadata is not valid JSON ({err})") from None
        except RecursionError:
            parsed[key] = None
            depth = MAX_JSON_DEPTH + 1
        else:
            depth = _json_depth(parsed[key])
        if depth > MAX_JSON_DEPTH:
            raise ModelLoadError(
                f"{path}: rnnlm metadata {key} nests more than {MAX_JSON_DEPTH} levels deep: "
                "not a model rnnlm exported"
            )
    if parsed[FORMAT_KEY] != FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: rnnlm model format {short_repr(parsed[FORMAT_KEY])}, this version reads "
            f"format {FORMAT_VERSION}; re-export the model or upgrade rnnlm"
        )
    parsed[PRECISION_KEY] = metadata.get(PRECISION_KEY, "fp32")
    return parsed


def _read_cache(path: Path, entry: Any) -> CacheSettings | None:
    """The cache settings of the `rnnlm.cache` entry (see `cache_metadata`); None when it is
    null or absent, or its lambda is 0: the model is scored without the cache."""
    if entry is None:
        return None
    keys = {"window", "theta", "lambda"}
    if not isinstance(entry, dict) or set(entry) != keys:
        raise ModelLoadError(
            f"{path}: rnnlm metadata {CACHE_KEY} = {short_repr(entry)}: expected null or an "
            "object with exactly the keys lambda, theta, window"
        )
    try:
        settings = CacheSettings(entry["window"], entry["theta"], entry["lambda"])
    except ValueError as err:
        raise ModelLoadError(f"{path}: rnnlm metadata {CACHE_KEY}: {err}") from None
    return settings if settings.lam > 0 else None


def _read_ngram(path: Path, entry: Any, vocab_size: int) -> NgramSettings | None:
    """The n-gram of the `rnnlm.ngram` entry (see `ngram_metadata`), its tables checked
    against their digest and rebuilt (`KneserNey.from_bytes`); None when the entry is null or
    absent."""
    if entry is None:
        return None
    keys = {"order", "discount", "weight", "sha256", "tables"}
    if not isinstance(entry, dict) or set(entry) != keys or not isinstance(entry["tables"], str):
        raise ModelLoadError(
            f"{path}: rnnlm metadata {NGRAM_KEY} = {short_repr(entry)}: expected null or an "
            "object with exactly the keys discount, order, sha256, tables (a string), weight"
        )
    try:
        tables = base64.b64decode(entry["tables"], validate=True)
    except (binascii.Error, ValueError):
        raise ModelLoadError(f"{path}: rnnlm metadata {NGRAM_KEY}.tables is not base64") from None
    if hashlib.sha256(tables).hexdigest() != entry["sha256"]:
        raise ModelLoadError(
            f"{path}: rnnlm metadata {NGRAM_KEY}: the tables do not match their sha256 "
            "(the file was altered or damaged); re-export the model (dvc repro export)"
        )
    try:
        model = KneserNey.from_bytes(tables, entry["order"], vocab_size, entry["discount"])
        return NgramSettings(model, entry["weight"])
    except ValueError as err:
        raise ModelLoadError(f"{path}: rnnlm metadata {NGRAM_KEY}: {err}") from None


def _check_dims(path: Path, config: Mapping[str, Any]) -> None:
    """The network's sizes in the metadata: whole numbers in a sane range."""
    for key, high in (
        ("vocab_size", MAX_DIM * 16),
        ("hidden_dim", MAX_DIM),
        ("embedding_dim", MAX_DIM),
        ("num_layers", MAX_LAYERS),
    ):
        value = config.get(key)
        if type(value) is not int or not 1 <= value <= high:
            raise ModelLoadError(
                f"{path}: rnnlm metadata {MODEL_KEY}.{key} = {short_repr(value)}: expected a "
                f"whole number in [1, {high:,}]"
            )


def _read_cutoffs(path: Path, config: Mapping[str, Any]) -> tuple[int, ...]:
    """The adaptive softmax's cutoffs in the metadata (rnnlm.model.Decoder): () for one
    softmax (also for models exported before the key)."""
    cutoffs = config.get("softmax_cutoffs") or []
    vocab = config["vocab_size"]
    if not (
        isinstance(cutoffs, list)
        and all(type(c) is int for c in cutoffs)
        and all(a < b for a, b in itertools.pairwise([0, *cutoffs, vocab]))
    ):
        raise ModelLoadError(
            f"{path}: rnnlm metadata {MODEL_KEY}.softmax_cutoffs = {short_repr(cutoffs)}: "
            f"expected whole numbers increasing strictly within [1, {vocab:,})"
        )
    return tuple(cutoffs)


# Batched scoring (`rows` > 1): segments of a stream scored side by side, each read after the
# CONTEXT tokens before it from a zero state; a batch holds about BATCH_TOKENS positions (a
# one-softmax model's log-probs: BATCH_TOKENS x vocabulary floats, 32 MB at 7,751 words).
CONTEXT = 64
BATCH_TOKENS = 1024
MAX_ROWS = BATCH_TOKENS // CONTEXT


def check_rows(rows: int) -> None:
    """Raise ValueError unless `rows` is a whole number in [1, MAX_ROWS]."""
    if not is_int(rows) or not 1 <= rows <= MAX_ROWS:
        raise ValueError(
            f"rows = {short_repr(rows)}: must be an integer in [1, {MAX_ROWS}] (1: exact)"
        )


def segment_tokens(rows: int) -> int:
    """Tokens a row scores per call: WINDOW for one stream, BATCH_TOKENS / rows (>= CONTEXT)
    for segments side by side."""
    return WINDOW if rows == 1 else max(CONTEXT, BATCH_TOKENS // rows)


# Windows handed to the scoring worker and not yet consumed: one in the session, one queued.
# Bounds memory (a window's activations each) and keeps the session busy while the caller's
# thread tokenizes the next window.
_IN_FLIGHT = 2


def _build_graph(path: Path, kind: str, *args: Any, **kwargs: Any) -> bytes:
    """The `kind` ("scoring" or "state") graph of the model at `path` (rnnlm.graphs)."""
    # Imported here: onnx adds ~0.3 s to the start of `generate` and `next`, which need no
    # scoring graph.
    import onnx

    from rnnlm import graphs

    build = graphs.scoring_graph if kind == "scoring" else graphs.state_graph
    try:
        return build(onnx.load(str(path)), *args, **kwargs)
    except graphs.ScoringGraphError as err:
        raise ModelLoadError(f"{path}: cannot build its {kind} graph: {err}") from None


class _ScoringSessions:
    """A model turned into its scoring graphs (`rnnlm.graphs`), one session each.

    `score` runs the network on a window and returns log p(target) per position, float32
    (the logits never reach Python), the next state and any extra outputs; `advance` runs the
    recurrence alone (a context read for its state; built on first use). Each session may use
    every one of the `threads` cores: the cores split a large model's hidden-to-hidden weights
    between their caches (GRU 512 on this project's 2-core VM: a window's recurrence 3.3x
    faster on two cores than on one). `batched`: for segments side by side, where the two
    sessions alternate, their idle pool threads sleep at once (a spinning pool would burn the
    core the other session needs: 6.0k against 9.2k tokens/s at 8 rows, GRU 512); else they
    spin between the steps of one stream's recurrence, whose wake-ups would cost more than the
    steps (9.7-10.0k against 7.7-8.7k tokens/s).
    """

    def __init__(
        self,
        path: Path,
        tokens: str,
        state_in: Sequence[str],
        logits: str,
        state_out: Sequence[str],
        threads: int,
        extra_outputs: Sequence[str] = (),
        batched: bool = False,
        adaptive: AdaptiveSoftmax | None = None,
    ) -> None:
        self._path = path
        self._threads = threads
        self._spinning = not batched
        self._tokens = tokens
        self._state_in = list(state_in)
        self._state_out = list(state_out)
        self._extras = list(extra_outputs)
        scoring = _build_graph(path, "scoring", logits, state_out, extra_outputs, adaptive)
        self._scoring = self._session(scoring)
        del scoring
        _return_freed_memory()  # the parsed model and the graph's bytes
        self._outputs = [o.name for o in self._scoring.get_outputs()]
        from rnnlm.graphs import TARGETS_INPUT  # loaded by _build_graph

        self._targets = TARGETS_INPUT
        self._state_only: ort.InferenceSession | None = None
        self._state_lock = threading.Lock()

    def _session(self, graph: bytes) -> ort.InferenceSession:
        return ort.InferenceSession(
            graph,
            session_options(self._threads, self._spinning),
            providers=["CPUExecutionProvider"],
        )

    def _feeds(self, inputs: np.ndarray, state: State) -> dict[str, np.ndarray]:
        return {self._tokens: inputs, **dict(zip(self._state_in, state, strict=True))}

    def score(
        self, inputs: np.ndarray, state: State, targets: np.ndarray
    ) -> tuple[np.ndarray, State, dict[str, np.ndarray]]:
        """inputs and targets (batch, time) int64 from `state` -> (log p(targets) (batch, time)
        float32, next state, extras by name)."""
        feeds = {**self._feeds(inputs, state), self._targets: targets[..., None]}
        logprob, *rest = self._scoring.run(self._outputs, feeds)
        n_state = len(self._state_out)
        extras = dict(zip(self._extras, rest[n_state:], strict=True))
        return logprob[..., 0], tuple(rest[:n_state]), extras

    def advance(self, inputs: np.ndarray, state: State) -> State:
        """The state after reading inputs (batch, time) int64 from `state`."""
        with self._state_lock:
            if self._state_only is None:
                self._state_only = self._session(_build_graph(self._path, "state", self._state_out))
                _return_freed_memory()
        return tuple(self._state_only.run(self._state_out, self._feeds(inputs, state)))


class _Inline:
    """The scoring worker's stand-in on the caller's thread (one thread in all)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # handed to whoever asks for the result, as a pool does
            future.set_exception(err)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


@dataclass(frozen=True)
class ScoredWindow:
    """One window of a scored stream: its targets, their log-probabilities (float32, in stream
    order) and the extra graph outputs asked for (batch-first graph outputs, each cut to the
    window: (1, time, ...))."""

    targets: np.ndarray
    logprob: np.ndarray
    extras: dict[str, np.ndarray]


class _StreamScorer:
    """NLL of a token stream that arrives sentence by sentence, in bounded memory.

    With `rows` = 1 (exact), tokens are fed in windows of exactly WINDOW (the last one
    shorter), the state carried from window to window: the windows, and so the result, are
    those of `token_nlls` on the whole stream. With `rows` = R > 1 (batched), R consecutive
    segments of `segment_tokens(R)` tokens are scored side by side, the recurrence and the
    projection then being products over R rows; each segment is read after the CONTEXT tokens
    before it, from a zero state, instead of with the state carried from the stream's start
    (the stream's first segment starts from the stream's start, as in exact mode).

    With more than one thread a window (or batch) is scored on a worker thread (which owns
    the state; its session uses every thread) while the caller's thread tokenizes the next
    one; results are consumed in stream order (`_consume`, which gets each window's float32
    log-probs). Holds fewer than a window's (or batch's) unscored tokens, the sentences they
    belong to and at most _IN_FLIGHT of them on the worker. Use it as a context manager (its
    worker thread ends with it).
    """

    def __init__(
        self,
        model: LanguageModel,
        on_sentence: Callable[[SentenceScore], None] | None,
        rows: int = 1,
    ) -> None:
        check_rows(rows)
        self._cache = model.new_cache()  # None: the network alone
        if self._cache is not None and rows > 1:
            # The cache holds one stream's history in order; side-by-side segments have none.
            raise ValueError(
                f"rows = {rows}: the continuous cache scores one stream in order (rows 1); "
                "turn the cache off to score segments side by side"
            )
        # The n-gram's history is the stream's own: windows are consumed in stream order, so
        # it is exact in batched mode too.
        self._ngram = model.new_ngram()
        self._model = model
        self._sessions = model._scoring_sessions(batched=rows > 1)
        self._on_sentence = on_sentence
        self._rows = rows
        self._segment = segment_tokens(rows)
        self._state = model.initial_state(1)  # exact mode: owned by the worker
        self._previous = EOS_ID  # the input before the next token: a stream starts after <eos>
        # Batched mode: the last inputs up to the first unscored token's (<eos> at the start),
        # enough for the context of a segment that starts there.
        self._past: deque[int] = deque([EOS_ID], maxlen=CONTEXT + 1)
        self._submitted = 0  # tokens handed to the worker
        self._ids: list[int] = []  # tokens not scored yet (fewer than a batch between calls)
        self._pending: deque[Future] = deque()
        overlapped = model.threads > 1
        self._worker = ThreadPoolExecutor(1, "rnnlm-score") if overlapped else _Inline()
        self._in_flight = _IN_FLIGHT if overlapped else 1  # inline: each window is done at once
        # Sentences not fully scored yet, and how many tokens and nats of the first one are.
        self._open: deque[list[str]] = deque()
        self._open_tokens = 0
        self._open_nll = 0.0
        self.nll = 0.0
        self.tokens = 0
        self.unknown = 0

    def __enter__(self) -> _StreamScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    def add(self, words: list[str]) -> None:
        """Score one sentence (its words; `<eos>` closes it) as soon as its windows are full."""
        get = self._model.stoi.get
        ids = [get(w, UNK_ID) for w in words]
        self.unknown += sum(1 for w, i in zip(words, ids, strict=True) if i == UNK_ID and w != UNK)
        self._ids += ids
        self._ids.append(EOS_ID)
        if self._on_sentence is not None:
            self._open.append(words)
        batch = self._rows * self._segment
        while len(self._ids) >= batch:
            self._submit(batch)

    def finish(self) -> None:
        """Score what is left; ValueError when the stream had no words."""
        if self._ids:
            self._submit(len(self._ids))
        while self._pending:
            for window in self._pending.popleft().result():
                self._consume(window)
        if not self.tokens:
            raise ValueError("nothing to score: the text has no words")

    def _submit(self, size: int) -> None:
        if self._rows == 1:
            inputs, targets = lm_pairs(np.array(self._ids[:size]), self._previous)
            self._previous = int(targets[-1])
            scored = self._worker.submit(self._score_window, inputs[None], targets[None])
        else:
            contexts, inputs, targets, lengths = self._segments(size)
            from_start = self._submitted == 0
            scored = self._worker.submit(
                self._score_rows, contexts, inputs, targets, lengths, from_start
            )
        del self._ids[:size]
        self._submitted += size
        self._pending.append(scored)
        while len(self._pending) >= self._in_flight:
            for window in self._pending.popleft().result():
                self._consume(window)

    def _segments(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """The next `size` tokens as rows of segments: the CONTEXT inputs read before each
        (rows, CONTEXT), the segments' inputs and targets (rows, segment; the last row padded
        with `<eos>`) and each row's length."""
        tokens = np.array(self._ids[:size], dtype=np.int64)
        past = len(self._past)
        # extended[i + past - 1] is the input before tokens[i]: <eos> at the stream's start.
        extended = np.concatenate([np.array(self._past, dtype=np.int64), tokens])
        self._past.extend(tokens[-(CONTEXT + 1) :].tolist())
        rows = -(-size // self._segment)
        inputs = np.full((rows, self._segment), EOS_ID, dtype=np.int64)
        targets = np.full((rows, self._segment), EOS_ID, dtype=np.int64)
        contexts = np.full((rows, CONTEXT), EOS_ID, dtype=np.int64)
        lengths = []
        for row in range(rows):
            start = row * self._segment
            stop = min(start + self._segment, size)
            first = start + past - 1
            inputs[row, : stop - start] = extended[first : first + stop - start]
            targets[row, : stop - start] = tokens[start:stop]
            if first >= CONTEXT:  # else the stream's first segment: no context before it
                contexts[row] = extended[first - CONTEXT : first]
            lengths.append(stop - start)
        return contexts, inputs, targets, lengths

    def _score_window(self, inputs: np.ndarray, targets: np.ndarray) -> list[ScoredWindow]:
        """Exact mode: one window (1, time) from the carried state, which it moves on."""
        logprob, self._state, extras = self._sessions.score(inputs, self._state, targets)
        return [ScoredWindow(targets[0], logprob[0], extras)]

    def _score_rows(
        self,
        contexts: np.ndarray,
        inputs: np.ndarray,
        targets: np.ndarray,
        lengths: list[int],
        from_start: bool,
    ) -> list[ScoredWindow]:
        """Batched mode: each row's state after its context, read from a zero state, then its
        segment. `from_start`: the first row starts the stream, from the zero state itself."""
        state = self._sessions.advance(contexts, self._model.initial_state(len(inputs)))
        if from_start:
            state = tuple(np.array(s) for s in state)
            for s in state:
                s[:, 0, :] = 0.0
        logprob, _, extras = self._sessions.score(inputs, state, targets)
        return [
            ScoredWindow(
                targets[row, :n],
                logprob[row, :n],
                {name: value[row : row + 1, :n] for name, value in extras.items()},
            )
            for row, n in enumerate(lengths)
        ]

    def _consume(self, window: ScoredWindow) -> None:
        """Count a scored window (in stream order) and report the sentences it completes;
        with the model's continuous cache and n-gram, its log-probs are first mixed with the
        cache's, then with the n-gram's."""
        logprob: np.ndarray = window.logprob
        if self._cache is not None:
            hidden = window.extras[self._model.hidden_output][0]
            logprob = self._cache.mix(logprob, hidden, window.targets)
        if self._ngram is not None:
            logprob = self._ngram.mix(logprob, window.targets)
        self.nll -= float(logprob.sum(dtype=np.float64))
        self.tokens += len(window.targets)
        if self._on_sentence is not None:
            self._close_sentences(logprob)

    def _close_sentences(self, logprob: np.ndarray) -> None:
        """Add the window's NLLs to the open sentences; report those it completes."""
        assert self._on_sentence is not None
        start = 0
        while start < len(logprob):
            words = self._open[0]
            take = min(len(words) + 1 - self._open_tokens, len(logprob) - start)
            self._open_nll -= float(logprob[start : start + take].sum(dtype=np.float64))
            self._open_tokens += take
            start += take
            if self._open_tokens == len(words) + 1:
                self._open.popleft()
                self._on_sentence(SentenceScore(tuple(words), self._open_tokens, self._open_nll))
                self._open_tokens, self._open_nll = 0, 0.0


def _mixed_logits(
    logits: np.ndarray,
    hidden: np.ndarray,
    caches: Sequence[ContinuousCache],
    ngrams: Sequence[NgramMixer],
) -> np.ndarray:
    """Logits (rows, V) float32 of each row's network distribution mixed with its cache, then
    its n-gram (each list empty or one per row): what the sampler draws from."""
    rows = []
    for row in range(len(logits)):
        mixed = caches[row].mixed_logits(logits[row], hidden[row]) if caches else logits[row]
        rows.append(ngrams[row].mixed_logits(mixed) if ngrams else mixed)
    return np.stack(rows)


class _Stepper:
    """One token per call for a batch of streams, through buffers bound to the session once
    (onnxruntime I/O binding): every step reads the same token array and writes its logits
    and the next state into the same arrays (two state buffers, used in turn), so a step
    allocates nothing. `step` returns a view that the next step overwrites; so is `hidden`,
    the top layer's output at the step (bound only when asked for: the continuous cache)."""

    def __init__(
        self,
        model: LanguageModel,
        state: State,
        hidden: bool = False,
        head: _TwoLevel | None = None,
    ) -> None:
        # `head`: step its head graph, whose output is the head's log-probs, not the logits.
        session = model._session if head is None else head.head
        output, width = (
            (model._outputs[0], model.vocab_size) if head is None else (head.output, head.width)
        )
        rows = state[0].shape[1]
        self._session = session
        self._tokens = np.empty((rows, 1), dtype=np.int64)
        self._logits = np.empty((rows, 1, width), dtype=np.float32)
        self._hidden = np.empty((rows, 1, model.hidden_dim) if hidden else (0,), np.float32)
        states = (
            tuple(np.array(s, dtype=np.float32, order="C") for s in state),
            tuple(np.empty(s.shape, dtype=np.float32) for s in state),
        )
        state_out = model._outputs[1:]
        self._values: list[ort.OrtValue] = []  # kept alive as long as the bindings use them
        self._bindings = []
        for reads, writes in ((states[0], states[1]), (states[1], states[0])):
            binding = session.io_binding()
            binding.bind_ortvalue_input(model._tokens_name, self._value(self._tokens))
            for name, array in zip(model._state_in, reads, strict=True):
                binding.bind_ortvalue_input(name, self._value(array))
            binding.bind_ortvalue_output(output, self._value(self._logits))
            if hidden:
                binding.bind_ortvalue_output(model.hidden_output, self._value(self._hidden))
            for name, array in zip(state_out, writes, strict=True):
                binding.bind_ortvalue_output(name, self._value(array))
            self._bindings.append(binding)
        self._turn = 0

    def _value(self, array: np.ndarray) -> ort.OrtValue:
        value = ort.OrtValue.ortvalue_from_numpy(array)  # on the CPU: shares the array's memory
        self._values.append(value)
        return value

    def step(self, token: np.ndarray) -> np.ndarray:
        """Feed one token per stream; the logits (rows, vocab) of the next one (the head's
        log-probs (rows, head width) with `head`)."""
        self._tokens[:, 0] = token
        self._session.run_with_iobinding(self._bindings[self._turn])
        self._turn ^= 1
        return self._logits[:, 0, :]

    @property
    def hidden(self) -> np.ndarray:
        """The top layer's output (rows, hidden_dim) at the last step (when bound)."""
        return self._hidden[:, 0, :]


# Two-level sampling pays for building its graphs (shipped LSTM 512: `rnnlm generate` starts
# 0.65 s later and peaks at 303 MB instead of 156) after some 700 tokens (about 0.9 ms saved a
# token in fp32): a call that draws fewer uses it only once it is built (`prepare_generation`).
TWO_LEVEL_MIN_TOKENS = 1024


class _TwoLevel:
    """Plain sampling (temperature 1, no top-k or top-p) of an adaptive softmax in two levels
    (`rnnlm.graphs.sampling_graphs`): a draw from the head, its words and one entry per tail
    cluster; when it lands on a cluster, a draw among that cluster's words, computed for that
    row alone. The same distribution as a draw from every word's probability, while a step
    reads the head's part of the projection and a tail's only when needed (the shipped LSTM
    512: 86% of the tokens are head words). A mixture with the cache and the n-gram is drawn
    by its parts: the n-gram's with its weight, else the cache's with lambda, else the
    network's."""

    def __init__(self, path: Path, model: LanguageModel, adaptive: AdaptiveSoftmax) -> None:
        import onnx  # only when a model with an adaptive softmax generates

        from rnnlm import graphs

        head, tails = graphs.sampling_graphs(
            onnx.load(str(path)), model._outputs[1:], adaptive, [model.hidden_output]
        )
        # One thread whatever `threads` allows: a step's products are too small to share
        # (shipped LSTM 512, 300 tokens: 0.58 ms a token on one thread, 0.76 on two).
        options = session_options(1)
        self.head = ort.InferenceSession(head, options, providers=["CPUExecutionProvider"])
        self._tails = ort.InferenceSession(tails, options, providers=["CPUExecutionProvider"])
        del head, tails
        _return_freed_memory()
        self.output, self.width = graphs.HEAD_OUTPUT, adaptive.head_width
        self._tail_inputs = [graphs.tail_input(k) for k in range(1, len(adaptive.cutoffs) + 1)]
        self._tail_outputs = [graphs.tail_output(k) for k in range(1, len(adaptive.cutoffs) + 1)]
        self._starts = adaptive.cutoffs
        self._vocab = adaptive.vocab_size

    def draw(
        self,
        head_logprob: np.ndarray,
        hidden: np.ndarray,
        caches: Sequence[ContinuousCache],
        ngrams: Sequence[NgramMixer],
        rng: np.random.Generator,
    ) -> np.ndarray:
        """One token id per row, given the head's log-probs (rows, width) and the hidden
        vectors (rows, hidden) of the step; `caches` and `ngrams` empty or one per row."""
        rows = len(head_logprob)
        tokens = np.empty(rows, dtype=np.int64)
        network = []  # the rows whose token comes from the network
        for row in range(rows):
            # The n-gram's part with its weight, else the cache's with lambda (when it holds
            # anything), else the network's.
            if ngrams and rng.random() < ngrams[row].weight:
                tokens[row] = _draw_row(ngrams[row].next_distribution(), rng.random())
                continue
            cache = caches[row] if caches else None
            # The match against every cached vector is computed only for the draws that take
            # the cache's part (lambda of them), not for every token.
            if cache is not None and cache.mixes and rng.random() < cache.settings.lam:
                weights = cache.query_weights(hidden[row], self._vocab, "the vocabulary has")
                assert weights is not None  # the cache mixes
                tokens[row] = cache.words[_draw_row(weights, rng.random())]
                continue
            network.append(row)
        if not network:
            return tokens
        entry = inverse_cdf(np.exp(head_logprob[network]), rng.random(len(network)))
        tokens[network] = entry
        head_words = self._starts[0]
        wanted = {k: [r for r, e in zip(network, entry, strict=True) if e == head_words + k]
                  for k in range(len(self._starts))}  # fmt: skip
        feeds = {
            name: hidden[wanted[k]] for k, name in enumerate(self._tail_inputs)
        }  # 0 rows for a cluster no draw landed in
        if any(wanted.values()):
            outputs = [o for k, o in enumerate(self._tail_outputs) if wanted[k]]
            logprobs = iter(self._tails.run(outputs, feeds))
            for k, in_cluster in wanted.items():
                if in_cluster:
                    words = inverse_cdf(np.exp(next(logprobs)), rng.random(len(in_cluster)))
                    tokens[in_cluster] = self._starts[k] + words
        return tokens


def read_chunks(source: BinaryIO | Iterable[bytes], size: int | None = None) -> Iterator[bytes]:
    """`source` as bytes chunks: a binary file read `size` (default READ_BYTES) bytes at a time,
    or an iterable of bytes chunks passed on as it is.

    The one reader of a text to score (`score_stream`, and so `rnnlm score`): ValueError, in
    one line that does not name the input (the caller knows its name), for a file opened in
    text mode, a folder, a read error or a chunk that is not bytes.
    """
    read = getattr(source, "read", None)
    if read is None:
        if isinstance(source, str | bytes | bytearray | memoryview):
            raise ValueError(
                f"source = {short_repr(source)}: expected a binary file or an iterable of bytes "
                "chunks (score(text) scores a str)"
            )
        for chunk in source:
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise ValueError(
                    f"source: chunk {short_repr(chunk)}: expected bytes, got {type(chunk).__name__}"
                )
            yield bytes(chunk)
        return
    size = READ_BYTES if size is None else size
    while True:
        try:
            chunk = read(size)
        except IsADirectoryError:
            raise ValueError("is a directory, expected a text file") from None
        except OSError as err:
            raise ValueError(f"cannot read ({err.strerror or err})") from None
        if not chunk:
            return
        if not isinstance(chunk, bytes | bytearray):
            raise ValueError(
                f"a file opened in text mode (read gave {type(chunk).__name__}); "
                "open it in binary mode ('rb')"
            )
        yield bytes(chunk)


class LanguageModel:
    """An exported rnnlm model on onnxruntime's CPU provider.

    Args:
        path: the `.onnx` file written by the export stage.
        threads: the cores it may keep busy. None: every core this process may run on
            (`default_threads`). One token per call is a matrix-vector product bound by
            memory bandwidth, which a second core adds to: the GRU 512 generates in 0.67 ms a
            token on two cores against 1.39 on one (bench/inference.py, an idle 2-core VM;
            on a busy machine one thread can be faster: pass threads=1). Two-level sampling
            (`_TwoLevel`) keeps to one thread.
        cache: True: score with the continuous cache the export stage tuned, when the model
            carries one (`tuned_cache`; a model without scores with the network alone); False:
            never; CacheSettings: these settings (the model needs the `hidden` output).
        ngram: True: mix in the Kneser-Ney n-gram the model carries (`tuned_ngram`), after
            the cache; False: never. Both False: the network alone.
    """

    def __init__(
        self,
        path: Path | str,
        threads: int | None = None,
        cache: bool | CacheSettings = True,
        ngram: bool = True,
    ) -> None:
        check_threads(threads)  # a bad `threads` is the caller's error, not the file's
        if not isinstance(cache, bool | CacheSettings):
            raise ValueError(
                f"cache = {short_repr(cache)}: expected True, False or a CacheSettings"
            )
        if not isinstance(ngram, bool):
            raise ValueError(f"ngram = {short_repr(ngram)}: expected True or False")
        self.path = Path(path)
        if not self.path.exists():
            raise ModelLoadError(f"{self.path}: model file not found")
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: not a file")
        self.threads: int = default_threads() if threads is None else threads
        options = session_options(self.threads)
        # Exact (False) and batched (True) scoring, each built on its first scored stream.
        self._scoring: dict[bool, _ScoringSessions] = {}
        self._scoring_lock = threading.Lock()  # threads scoring at once build it once
        self._two_level: _TwoLevel | None = None  # generation's graphs, built on first use
        self._two_level_tried = False
        try:
            self._session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own pybind types for a bad file
            message = " ".join(str(err).split())
            if "INVALID_PROTOBUF" in message or "Protobuf parsing failed" in message:
                raise ModelLoadError(f"{self.path}: not an ONNX model (cannot parse it)") from None
            raise ModelLoadError(f"{self.path}: cannot load the ONNX model ({message})") from None
        meta = read_metadata(self.path, dict(self._session.get_modelmeta().custom_metadata_map))
        try:
            self._apply_metadata(meta)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ModelLoadError(f"{self.path}: malformed rnnlm metadata ({err!r})") from None
        # The settings scoring uses: None scores with the network alone.
        self.cache: CacheSettings | None = self.tuned_cache if cache is True else cache or None
        if self.cache is not None and self.cache.lam == 0:
            self.cache = None
        if self.cache is not None and self._hidden_name is None:
            raise ModelLoadError(
                f"{self.path}: no {HIDDEN_OUTPUT!r} output, which the continuous cache needs: "
                "the model was exported before it; re-export it (dvc repro export)"
            )
        # The n-gram scoring mixes in: None scores without.
        self.ngram: NgramSettings | None = self.tuned_ngram if ngram else None
        _return_freed_memory()  # the model file onnxruntime parsed, the decoded metadata

    def _apply_metadata(self, meta: dict[str, Any]) -> None:
        """Read the configuration, vocabulary, tokenizer and I/O names; check them against
        each other and the graph before building the tokenizer."""
        self.config: dict[str, Any] = dict(meta[MODEL_KEY])
        _check_dims(self.path, self.config)
        self.provenance: dict[str, Any] = dict(meta.get(PROVENANCE_KEY, {}))
        self.conventions: dict[str, Any] = dict(meta.get(CONVENTIONS_KEY, {}))
        self.precision: str = meta[PRECISION_KEY]
        self.vocab: list[str] = [str(token) for token in meta[VOCAB_KEY]]
        self.stoi = {token: i for i, token in enumerate(self.vocab)}
        io = meta[IO_KEY]
        self.state_names: list[str] = list(io["state"])
        self._tokens_name: str = io["tokens"]
        self._state_in: list[str] = list(io["state_in"])
        self._outputs: list[str] = [io["logits"], *io["state_out"]]
        # Models exported before the cache have no hidden output.
        self._hidden_name: str | None = io.get("hidden")
        declared = self._outputs if self._hidden_name is None else [*self._outputs, io["hidden"]]
        inputs = sorted(i.name for i in self._session.get_inputs())
        outputs = sorted(o.name for o in self._session.get_outputs())
        if inputs != sorted([self._tokens_name, *self._state_in]) or outputs != sorted(declared):
            raise ModelLoadError(
                f"{self.path}: inputs {inputs} / outputs {outputs} do not match the rnnlm "
                f"metadata ({[self._tokens_name, *self._state_in]} / {declared})"
            )
        self.tuned_cache = _read_cache(self.path, meta.get(CACHE_KEY))
        if self.tuned_cache is not None and self._hidden_name is None:
            raise ModelLoadError(
                f"{self.path}: rnnlm metadata {CACHE_KEY} is set but the network has no "
                f"{HIDDEN_OUTPUT!r} output for it"
            )
        self.num_layers = int(self.config["num_layers"])
        self.hidden_dim = int(self.config["hidden_dim"])
        self.softmax_cutoffs = _read_cutoffs(self.path, self.config)
        if len(self.vocab) != int(self.config["vocab_size"]) or self.vocab[:2] != [UNK, EOS]:
            raise ModelLoadError(f"{self.path}: vocabulary metadata does not match the model")
        self.tuned_ngram = _read_ngram(self.path, meta.get(NGRAM_KEY), len(self.vocab))
        logits = next(o for o in self._session.get_outputs() if o.name == self._outputs[0])
        width = logits.shape[-1] if logits.shape else None
        if isinstance(width, int) and width != len(self.vocab):
            raise ModelLoadError(
                f"{self.path}: the vocabulary in the metadata has {len(self.vocab):,} words but "
                f"the network's {logits.name} output scores {width:,}: not one model"
            )
        self.tokenizer = TextTokenizer.from_dict(meta[TOKENIZER_KEY])

    @property
    def hidden_output(self) -> str:
        """The graph output with the top layer's hidden vectors (the continuous cache's keys)."""
        if self._hidden_name is None:
            raise ModelLoadError(
                f"{self.path}: no {HIDDEN_OUTPUT!r} output (exported before the continuous "
                "cache); re-export it (dvc repro export)"
            )
        return self._hidden_name

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def cell(self) -> str:
        return str(self.config["cell"])

    def initial_state(self, batch: int = 1) -> State:
        """The zero state for `batch` streams: one (layers, batch, hidden) array per tensor."""
        shape = (self.num_layers, batch, self.hidden_dim)
        return tuple(np.zeros(shape, dtype=np.float32) for _ in self._state_in)

    def _scoring_sessions(self, batched: bool = False) -> _ScoringSessions:
        """The model's scoring graphs (rnnlm.graphs) on onnxruntime for exact or `batched`
        scoring (`_ScoringSessions`), built once."""
        with self._scoring_lock:
            if batched not in self._scoring:
                self._scoring[batched] = _ScoringSessions(
                    self.path,
                    self._tokens_name,
                    self._state_in,
                    self._outputs[0],
                    self._outputs[1:],
                    self.threads,
                    # The cache's keys: the top layer's output, fetched only when scoring uses it.
                    () if self.cache is None else (self.hidden_output,),
                    batched,
                    self._adaptive_softmax(),
                )
            return self._scoring[batched]

    def prepare_generation(self) -> bool:
        """Build what plain sampling needs before the first call that draws (a long-lived
        model: a server at start-up), so that every later call samples in two levels, however
        few tokens it draws. True when the model samples in two levels (an adaptive softmax
        whose graph rnnlm.graphs recognises)."""
        return self._two_level_sampler() is not None

    def _two_level_sampler(self) -> _TwoLevel | None:
        """The head and tail graphs of plain sampling in two levels (`_TwoLevel`), built on
        first use; None for one softmax, or a graph not built as rnnlm.graphs expects (then
        with a warning: generation draws from every word's probability, the same
        distribution, slower)."""
        adaptive = self._adaptive_softmax()
        if adaptive is None:
            return None
        with self._scoring_lock:
            if not self._two_level_tried:
                self._two_level_tried = True
                from rnnlm.graphs import ScoringGraphError

                try:
                    self._two_level = _TwoLevel(self.path, self, adaptive)
                except ScoringGraphError as err:
                    log.warning("%s: generation samples the whole adaptive softmax (%s)",
                                self.path, err)  # fmt: skip
            return self._two_level

    def _adaptive_softmax(self) -> AdaptiveSoftmax | None:
        """What the scoring graph needs to score an adaptive softmax target-only (from the
        `hidden` output the decoder reads; models exported before it lack that output)."""
        if not self.softmax_cutoffs or self._hidden_name is None:
            return None
        from rnnlm.graphs import AdaptiveSoftmax  # with onnx: only when a stream is scored

        return AdaptiveSoftmax(self._hidden_name, self.softmax_cutoffs, self.vocab_size)

    def _run(self, ids: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """One session call, no checks: ids (batch, time) int64 -> logits (batch, time, vocab)."""
        feeds = {self._tokens_name: ids}
        feeds.update(zip(self._state_in, state, strict=True))
        logits, *next_state = self._session.run(self._outputs, feeds)
        # The returned arrays are fed back as they are on the next call: no copies.
        return logits, tuple(next_state)

    def _run_hidden(self, ids: np.ndarray, state: State) -> tuple[np.ndarray, np.ndarray, State]:
        """`_run`, plus the top layer's hidden vectors (batch, time, hidden_dim) float32."""
        hidden_output = self.hidden_output  # first: a model without it is refused in one line
        feeds = {self._tokens_name: ids}
        feeds.update(zip(self._state_in, state, strict=True))
        logits, hidden, *next_state = self._session.run(
            [self._outputs[0], hidden_output, *self._outputs[1:]], feeds
        )
        return logits, hidden, tuple(next_state)

    def new_cache(self) -> ContinuousCache | None:
        """An empty continuous cache for one stream, with the settings scoring uses (`cache`);
        None when the model scores without."""
        if self.cache is None:
            return None
        return ContinuousCache(self.cache.window, self.cache.theta, self.cache.lam)

    def new_ngram(self, history: np.ndarray | None = None) -> NgramMixer | None:
        """The n-gram side of the mixture for one stream (`history`: the ids read so far,
        none at a stream's start); None when the model scores without an n-gram."""
        if self.ngram is None:
            return None
        mixer = NgramMixer(self.ngram.model, self.ngram.weight)
        if history is not None:
            mixer.extend(history)
        return mixer

    def step(self, ids: np.ndarray, state: State | None = None) -> tuple[np.ndarray, State]:
        """Run `ids` (batch, time) from `state` (zero when None); return logits and next state."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"ids must have shape (batch, time >= 1), got {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"ids must lie in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}"
            )
        if state is None:
            state = self.initial_state(ids.shape[0])
        expected = (self.num_layers, ids.shape[0], self.hidden_dim)
        if len(state) != len(self._state_in) or any(s.shape != expected for s in state):
            raise ValueError(
                f"state must be {len(self._state_in)} array(s) of shape {expected}, got "
                f"{[s.shape for s in state]}"
            )
        state = tuple(np.ascontiguousarray(s, dtype=np.float32) for s in state)
        return self._run(ids, state)

    def _feed(self, ids: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """Feed a 1-D token sequence to one stream in windows; return the last logits (1, V)."""
        logits = None
        for start in range(0, len(ids), WINDOW):
            window = ids[None, start : start + WINDOW]
            logits, state = self._run(window, state)
        assert logits is not None, "nothing to feed"
        return logits[:, -1, :], state

    def _feed_cached(
        self, ids: np.ndarray, state: State, cache: ContinuousCache
    ) -> tuple[np.ndarray, np.ndarray, State]:
        """`_feed` that also caches each position's hidden vector with the token after it.

        Returns the last logits (1, V), the last position's hidden vector (d,) (its next token
        is not known: it is not cached) and the state.
        """
        logits = hidden = None
        for start in range(0, len(ids), WINDOW):
            window = ids[None, start : start + WINDOW]
            logits, hidden, state = self._run_hidden(window, state)
            following = ids[start + 1 : start + WINDOW + 1]  # one short at the very end
            cache.extend(hidden[0, : len(following)], following)
        assert logits is not None and hidden is not None, "nothing to feed"
        return logits[:, -1, :], hidden[0, -1], state

    def encode_words(self, words: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Word tokens -> int64 ids, and the words that were out of vocabulary (as `<unk>`)."""
        get = self.stoi.get
        ids = np.fromiter((get(w, UNK_ID) for w in words), dtype=np.int64, count=len(words))
        unknown = [w for w, i in zip(words, ids, strict=True) if i == UNK_ID and w != UNK]
        return ids, unknown

    def prompt_tokens(self, prompt: str) -> list[str]:
        """The prompt as the model reads it: its sentences' words, `<eos>` between sentences.

        The stream starts at a sentence start (after an implicit `<eos>`), so an empty prompt
        means "generate a sentence from its beginning".
        """
        sentences = list(self.tokenizer.sentences(prompt))
        tokens: list[str] = []
        for i, words in enumerate(sentences):
            if i:
                tokens.append(EOS)
            tokens.extend(words)
        return tokens

    def _prompt_stream(self, prompt: str) -> tuple[np.ndarray, list[str]]:
        """The ids fed for `prompt` (`<eos>` first) and its tokens; warns of unknown words."""
        check_text("prompt", prompt)
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(
                f"prompt: {len(prompt)} characters, at most {MAX_PROMPT_CHARS} (the state keeps "
                "only recent context: pass the end of the text)"
            )
        tokens = self.prompt_tokens(prompt)
        ids, unknown = self.encode_words(tokens)
        if unknown:
            distinct = list(dict.fromkeys(unknown))
            shown = ", ".join(short_repr(w, 40) for w in distinct[:_UNKNOWN_SHOWN])
            if len(distinct) > _UNKNOWN_SHOWN:
                shown += f" and {len(distinct) - _UNKNOWN_SHOWN} more"
            log.warning(
                "%d prompt word(s) not in the vocabulary, read as %s: %s", len(unknown), UNK, shown
            )
        return np.concatenate([np.array([EOS_ID], dtype=np.int64), ids]), tokens

    def next_words(self, prompt: str, k: int = 5) -> list[tuple[str, float]]:
        """The k most likely next tokens after `prompt`, with their probabilities, best first.

        With the cache on, the prompt's own words fill it; with the n-gram on, its history is
        the prompt's end: p is the mixed distribution.
        """
        check_k(k)
        stream, _ = self._prompt_stream(prompt)
        cache = self.new_cache()
        if cache is None:
            logits, _ = self._feed(stream, self.initial_state(1))
            probs = softmax(logits[0])
        else:
            logits, hidden, _ = self._feed_cached(stream, self.initial_state(1), cache)
            probs = cache.distribution(softmax(logits[0]), hidden)
        ngram = self.new_ngram(stream[1:])
        if ngram is not None:
            probs = ngram.distribution(probs)
        k = min(k, self.vocab_size)
        top = np.argpartition(probs, self.vocab_size - k)[self.vocab_size - k :]
        top = top[np.argsort(-probs[top], kind="stable")]
        return [(self.vocab[i], float(probs[i])) for i in top]

    def generate(
        self,
        prompt: str = "",
        max_tokens: int = 50,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_at_eos: bool = False,
        num_samples: int = 1,
        include_prompt: bool = True,
    ) -> list[str]:
        """Continue `prompt` by up to `max_tokens` tokens; one readable text per sample.

        The prompt is read once; the samples then run as one batch, one token per call with
        the state carried. With `stop_at_eos` a sample ends at its first end of sentence.
        With the continuous cache on, each sample draws from the network's distribution mixed
        with its own cache (the prompt's words, then the words it generated), then with the
        n-gram (its history the sample's own); temperature, top-k and top-p then apply to that
        mixture. Plain sampling (temperature 1, no top-k or top-p) of an adaptive softmax
        draws in two levels after the first token (`_TwoLevel`): the same distribution, a
        fraction of the projection read per token; once `prepare_generation` has built it, or
        when the call draws at least TWO_LEVEL_MIN_TOKENS tokens in all.
        """
        check_sampling(temperature, top_k, top_p, max_tokens, num_samples, seed)
        rng = np.random.default_rng(seed)
        sample = Sampler(rng, temperature, top_k, top_p)
        # Plain sampling of an adaptive softmax: in two levels after the first token, once
        # built or when this call draws enough tokens to pay for building it.
        plain = temperature == 1 and top_k == 0 and top_p == 1 and max_tokens > 1
        worth = self._two_level_tried or max_tokens * num_samples >= TWO_LEVEL_MIN_TOKENS
        two_level = self._two_level_sampler() if plain and worth else None
        stream, prompt_tokens = self._prompt_stream(prompt)
        cache = self.new_cache()
        caches: list[ContinuousCache] = []  # one per sample, when the cache is on
        hidden = np.empty((0, self.hidden_dim), dtype=np.float32)
        if cache is None:
            logits, state = self._feed(stream, self.initial_state(1))
        else:
            logits, last_hidden, state = self._feed_cached(stream, self.initial_state(1), cache)
            hidden = np.repeat(last_hidden[None], num_samples, axis=0)
            caches = [cache] + [cache.copy() for _ in range(num_samples - 1)]
        ngram = self.new_ngram(stream[1:])
        ngrams = [] if ngram is None else [ngram] + [ngram.copy() for _ in range(num_samples - 1)]
        if num_samples > 1:
            logits = np.repeat(logits, num_samples, axis=0)
            state = tuple(np.repeat(s, num_samples, axis=1) for s in state)
        stepper = _Stepper(self, state, hidden=bool(caches) or two_level is not None,
                           head=two_level)  # fmt: skip
        steps: list[np.ndarray] = []  # (num_samples,) ids per step: memory grows as generated
        lengths = np.full(num_samples, max_tokens)
        done = np.zeros(num_samples, dtype=bool)
        for t in range(max_tokens):
            if two_level is not None and t > 0:  # `logits`: the head's log-probs
                token = two_level.draw(logits, hidden, caches, ngrams, rng)
            else:
                if caches or ngrams:
                    logits = _mixed_logits(logits, hidden, caches, ngrams)
                token = sample(logits)
            steps.append(token)
            for row, row_cache in enumerate(caches):  # the word that followed each vector
                row_cache.extend(hidden[row : row + 1], token[row : row + 1])
            for row, row_ngram in enumerate(ngrams):
                row_ngram.extend(token[row : row + 1])
            if stop_at_eos:
                ended = (token == EOS_ID) & ~done
                lengths[ended] = t
                done |= ended
                if done.all():
                    break
            if t + 1 == max_tokens:
                break  # the last token needs no forward pass
            logits = stepper.step(token)
            if caches or two_level is not None:
                hidden = stepper.hidden
        out = np.stack(steps, axis=1) if steps else np.empty((num_samples, 0), dtype=np.int64)
        vocab = self.vocab
        prefix = prompt_tokens if include_prompt else []
        return [
            detokenize(prefix + [vocab[i] for i in out[row, : lengths[row]]])
            for row in range(num_samples)
        ]

    def score_ids(
        self,
        stream: Iterable[int] | np.ndarray,
        window: int = WINDOW,
        cache: bool = True,
        ngram: bool = True,
    ) -> ScoreResult:
        """NLL and perplexity of a whole token stream, state carried from start to end.

        Same convention as training's evaluation (`streams.lm_pairs`): the input starts
        with `<eos>` and every token of `stream` is predicted. `cache=False`: without the
        continuous cache, `ngram=False`: without the n-gram, even when the model scores with
        them; both False: the network alone.
        """
        nll = self.token_nlls(stream, window, cache, ngram)
        return ScoreResult(nll=float(nll.sum()), tokens=len(nll), unknown=0)

    def token_nlls(
        self,
        stream: Iterable[int] | np.ndarray,
        window: int = WINDOW,
        cache: bool = True,
        ngram: bool = True,
    ) -> np.ndarray:
        """-log p(token | everything before it) for each token of `stream`, float64.

        With the model's continuous cache unless `cache` is False, and its n-gram unless
        `ngram` is False (or the model has none).
        """
        for name, value in (("cache", cache), ("ngram", ngram)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} = {short_repr(value)}: expected True or False")
        stream = check_token_ids(stream, self.vocab_size)
        mixer = self.new_cache() if cache else None
        ngram_mixer = self.new_ngram() if ngram else None
        nll = np.empty(len(stream), dtype=np.float64)
        for start, stop, logp, hidden in self._windows(stream, window, mixer is not None):
            if mixer is not None:
                logp = mixer.mix(logp, hidden, stream[start:stop])
            if ngram_mixer is not None:
                logp = ngram_mixer.mix(logp, stream[start:stop])
            nll[start:stop] = -logp
        return nll

    def logprobs_and_hidden(
        self, stream: Iterable[int] | np.ndarray, window: int = WINDOW
    ) -> tuple[np.ndarray, np.ndarray]:
        """The network alone over a whole stream: log p(token | everything before it) (N,)
        float64 and the top layer's hidden vector at each position (N, hidden_dim) float32,
        what the continuous cache is tuned on (the export stage)."""
        stream = check_token_ids(stream, self.vocab_size)
        logp = np.empty(len(stream), dtype=np.float64)
        vectors = np.empty((len(stream), self.hidden_dim), dtype=np.float32)
        for start, stop, window_logp, hidden in self._windows(stream, window, True):
            logp[start:stop], vectors[start:stop] = window_logp, hidden
        return logp, vectors

    def _windows(
        self, stream: np.ndarray, window: int, hidden: bool
    ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """Walk a checked stream in windows, state carried: (start, stop, log p of each token
        (stop - start,) float64, the hidden vectors there (stop - start, d), or an empty array
        unless `hidden`)."""
        if not is_int(window) or window < 1:
            raise ValueError(f"window = {short_repr(window)}: must be an integer >= 1")
        inputs, _ = lm_pairs(stream)
        state = self.initial_state(1)
        vectors = np.empty((0, self.hidden_dim), dtype=np.float32)
        for start in range(0, len(stream), window):
            stop = min(start + window, len(stream))
            if hidden:
                logits, batch_vectors, state = self._run_hidden(inputs[None, start:stop], state)
                vectors = batch_vectors[0]
            else:
                logits, state = self._run(inputs[None, start:stop], state)
            yield start, stop, -token_nll(logits[0], stream[start:stop]), vectors

    def score(self, text: str, rows: int = 1) -> ScoreResult:
        """Perplexity of a text, tokenized as the training data was (sentences end in <eos>).

        `rows` > 1 scores segments side by side, faster but with a context cut to the CONTEXT
        tokens before each segment (see `score_stream`).
        """
        check_text("text", text)
        scored: list[SentenceScore] = []
        with _StreamScorer(self, scored.append, rows) as scorer:
            for words in self.tokenizer.sentences(text):
                scorer.add(words)
            scorer.finish()
        return ScoreResult(scorer.nll, scorer.tokens, scorer.unknown, sentences=scored)

    def score_stream(
        self,
        source: BinaryIO | Iterable[bytes],
        on_sentence: Callable[[SentenceScore], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
        name: str = "input",
        rows: int = 1,
    ) -> ScoreResult:
        """Perplexity of a text read from a binary file or an iterable of bytes chunks.

        Same result as `score` on the decoded text (`rnnlm.text.decode_stream` says how a
        stream over SNIFF_BYTES is decoded), in memory that does not grow with the input: one
        chunk, one paragraph piece and one window of tokens are held at a time. The result's
        `sentences` stay empty: `on_sentence` receives each sentence's score instead, in order,
        as soon as it is known. `progress(bytes_read, tokens_scored)` is called as each chunk
        is read. `name` names the input in warnings.

        `rows` = 1 (the default) carries the state through the whole stream: the exact
        perplexity. `rows` = R in [2, MAX_ROWS] scores R segments of BATCH_TOKENS / R tokens
        side by side (the recurrence and the projection become products over R rows, several
        times cheaper a token); each segment is then read after the CONTEXT (64) tokens before
        it from a zero state instead of with the state carried from the stream's start, which
        moves the perplexity slightly (the first segment starts at the stream's start).
        """
        started = time.perf_counter()
        read = 0
        with _StreamScorer(self, on_sentence, rows) as scorer:

            def counted() -> Iterator[bytes]:
                nonlocal read
                for chunk in read_chunks(source):
                    read += len(chunk)
                    if progress is not None:
                        progress(read, scorer.tokens)
                    yield chunk

            for words in self.tokenizer.stream_sentences(counted(), name):
                scorer.add(words)
            scorer.finish()
        return ScoreResult(
            scorer.nll,
            scorer.tokens,
            scorer.unknown,
            bytes=read,
            seconds=time.perf_counter() - started,
        )
