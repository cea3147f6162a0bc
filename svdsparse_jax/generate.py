"""Generation: one jitted program per call, prefill followed by a `lax.while_loop` of decode steps.

Prompts of a batch are left-padded to a bucketed length (a power of two, at least 16) and the number of new
tokens is bucketed the same way, so a new prompt of similar length reuses the compiled program: only
(batch size, prompt bucket, new-token bucket, greedy or sampled, repetition penalty on or off, watched or not)
are static. Sampling parameters, the seed, the real number of new tokens and the EOS ids are traced values.
Weights are passed in (never captured as constants) and reused across calls; the KV cache lives only inside the
program.

No host round trip per token: on a GPU, XLA runs a while loop whose trip count it cannot tell by copying the
condition to the host and waiting for the device after every iteration, and a `lax.cond` likewise
(xla/backends/gpu/runtime/while_thunk.cc, conditional_thunk.cc). So the stop condition (max_new reached, or
every sequence at EOS) is checked once per `steps_per_check` decode steps (the engine configuration's), run as
an inner loop of fixed trip count, which XLA runs without a copy; steps past the stop write nothing. Greedy or
sampled is decided when the program is built, not by a `lax.cond` per token.

A watched program (`Watcher`: stop strings, streaming to a terminal) calls the host once per decode step with
the step's tokens, and the host's answer (which sequences met a stop string) ends those sequences; unwatched
programs have no callback at all, so only the printing path pays for the round trips.

With predictors, the engine's sparsity policy (`svdsparse_jax.policy`) picks the layers that decode sparse for
the batch size when the program is built; the others get no predictor and run dense.

The program takes the model's graph as a static argument, and the engine configuration is part of that graph, so
a program is compiled per engine configuration as well.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from svdsparse_jax import kv_cache
from svdsparse_jax.errors import SvdsparseError, is_int, is_real
from svdsparse_jax.limits import check_count
from svdsparse_jax.model import Transformer
from svdsparse_jax.policy import UnionRows, sparse_layers
from svdsparse_jax.sharding import shard_predictors

MIN_BUCKET = 16


def _is_ids(p) -> bool:
    """A 1-D list (or integer array) of integer token ids."""
    if isinstance(p, np.ndarray):
        return p.ndim == 1 and np.issubdtype(p.dtype, np.integer)
    return isinstance(p, Sequence) and not isinstance(p, str) and all(is_int(t) for t in p)


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampler:
    """How the next token is chosen from the logits. temperature <= 0 means greedy (argmax); top_k <= 0 and
    top_p >= 1 switch those filters off. Applied in HF's order: repetition penalty, temperature, top-k, top-p.
    repetition_penalty (> 0; 1 is off): as transformers' (CTRL's), the logit of every token already in the
    prompt or the output is divided by it where positive and multiplied by it where negative. The fields are
    traced (pytree leaves), so changing them never recompiles (only switching the penalty on or off does)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def check(self) -> None:
        """Refuses fields of the wrong type or range (one line naming the field), on the host before a call:
        temperature >= 0, top_k an integer >= 0, top_p in (0, 1], repetition_penalty > 0, all finite."""
        checks = {"temperature": (is_real(self.temperature) and self.temperature >= 0, "a finite number >= 0"),
                  "top_k": (is_int(self.top_k) and 0 <= self.top_k < 2 ** 31, "an integer >= 0"),
                  "top_p": (is_real(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
                  "repetition_penalty": (is_real(self.repetition_penalty) and self.repetition_penalty > 0,
                                         "a finite number > 0")}
        for name, (ok, want) in checks.items():
            if not ok:
                raise SvdsparseError(f"Sampler {name}={getattr(self, name)!r}: expected {want}")

    @property
    def greedy(self) -> bool:
        """Whether this sampler takes the argmax (decided on the host: the fields must be concrete)."""
        return float(self.temperature) <= 0

    @property
    def penalized(self) -> bool:
        """Whether the repetition penalty is on (decided on the host, like `greedy`)."""
        return float(self.repetition_penalty) != 1.0

    def penalize(self, logits: jax.Array, seen: jax.Array) -> jax.Array:
        """logits [B, V] f32, seen [B, V] bool (tokens already in the sequence) -> the penalized logits."""
        p = self.repetition_penalty
        return jnp.where(seen, jnp.where(logits > 0, logits / p, logits * p), logits)

    def argmax(self, logits: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """logits [B, V] f32 -> the most likely tokens [B] int32."""
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """logits [B, V] f32 -> tokens [B] int32 drawn after temperature, top-k and top-p."""
        order = jnp.argsort(-logits, axis=-1)
        ranked = jnp.take_along_axis(logits, order, axis=-1) / jnp.maximum(self.temperature, 1e-6)
        rank = jnp.arange(logits.shape[-1])[None, :]
        ranked = jnp.where((self.top_k <= 0) | (rank < self.top_k), ranked, -jnp.inf)
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        ranked = jnp.where((rank == 0) | (mass_before < self.top_p), ranked, -jnp.inf)
        pick = jax.random.categorical(key, ranked, axis=-1)
        return jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)


def sequence_bytes(cfg, prompt_len: int, slots: int, itemsize: int) -> int:
    """Memory one sequence of a generate call holds, about: its KV cache (slots per layer, keys and values), the
    prefill's activations over its prompt (d and d_ff values per token, f32) and the sampler's [V] rows (logits,
    order, mask, f32 / int32)."""
    return (2 * cfg.n_layers * slots * cfg.kv_dim * itemsize + prompt_len * 4 * (4 * cfg.d_model + 3 * cfg.d_ff)
            + 16 * cfg.vocab_size)


class DecodeState(NamedTuple):
    """What the decode loop carries from one step to the next (beside the step index): token [B] int32, each
    sequence's last token; cache, the KV cache; out [B, room] int32, the tokens so far (-1 where none); done [B]
    bool, the sequences that stopped (EOS, a stop string); seen [B, V] bool, the tokens in each sequence (with the
    repetition penalty; [B, 1] and unused without it)."""

    token: jax.Array
    cache: kv_cache.KVCache
    out: jax.Array
    done: jax.Array
    seen: jax.Array


def _generate_program(graphdef, state, predictors, tokens, pad, max_new, sampler, key, eos_ids, *, new_bucket,
                      greedy, penalized=False, watch=None):
    """tokens [B, P] left-padded prompts, pad [B]; returns out [B, new_bucket] int32, -1 where nothing was
    generated (after a sequence's first EOS or stop, and past max_new). Prefill is dense; with predictors (one
    per layer, None for a layer that runs dense) every decode step runs the predictor-guarded FFN on those
    layers. greedy: argmax, else `sampler.sample`; penalized: the repetition penalty applies. watch: a host
    function (step, tokens [B] int32, -1 where stopped) -> [B] bool, the sequences to stop, called once per
    token."""
    model: Transformer = nnx.merge(graphdef, state)
    steps_per_check = model.engine.steps_per_check
    batch, prompt_len = tokens.shape
    vocab = model.cfg.vocab_size
    draw = sampler.argmax if greedy else sampler.sample
    # The last group of steps may run up to steps_per_check - 1 steps past new_bucket: room for them.
    room = new_bucket + steps_per_check
    cache = kv_cache.init_cache(model.cfg, pad, prompt_len + room, model.dtype)

    def choose(logits, seen, step):
        if penalized:
            logits = sampler.penalize(logits, seen)
        return draw(logits, jax.random.fold_in(key, step))

    def watched(step, token, stopped):
        if watch is None:
            return stopped
        told = io_callback(watch, jax.ShapeDtypeStruct((batch,), jnp.bool_), step, jnp.where(stopped, -1, token))
        return stopped | told

    # seen [B, V]: the tokens of each prompt (not its padding) and of its output so far (penalty only)
    real = jnp.arange(prompt_len)[None, :] >= pad[:, None]
    seen = (jnp.zeros((batch, vocab), jnp.bool_).at[jnp.arange(batch)[:, None], tokens].max(real)
            if penalized else jnp.zeros((batch, 1), jnp.bool_))

    def mark(seen, token):
        return seen.at[jnp.arange(batch), token].set(True) if penalized else seen

    with jax.named_scope("prefill"):
        states, cache = model(tokens, cache, jnp.int32(0))
        first = choose(model.logits(states[:, -1]), seen, 0)
    out = jnp.full((batch, room), -1, jnp.int32).at[:, 0].set(first)
    done = watched(0, first, jnp.isin(first, eos_ids))
    seen = mark(seen, first)

    def step(i, s: DecodeState) -> DecodeState:
        with jax.named_scope("decode_step"):
            states, cache = model(s.token[:, None], s.cache, prompt_len + i - 1, predictors)
            nxt = choose(model.logits(states[:, 0]), s.seen, i)
        stopped = s.done | (i >= max_new)
        out = s.out.at[:, i].set(jnp.where(stopped, -1, nxt))
        done = watched(i, nxt, stopped) | jnp.isin(nxt, eos_ids)
        return DecodeState(token=jnp.where(stopped, s.token, nxt), cache=cache, out=out, done=done,
                           seen=mark(s.seen, nxt))

    def group(carry: tuple[jax.Array, DecodeState]) -> tuple[jax.Array, DecodeState]:
        i, s = carry  # steps i .. i + steps_per_check - 1, a loop of fixed trip count
        s = jax.lax.fori_loop(0, steps_per_check, lambda j, s: step(i + j, s), s)
        return i + steps_per_check, s

    def cond(carry: tuple[jax.Array, DecodeState]) -> jax.Array:
        i, s = carry
        return (i < max_new) & ~jnp.all(s.done)

    start = DecodeState(token=first, cache=cache, out=out, done=done, seen=seen)
    _, final = jax.lax.while_loop(cond, group, (jnp.int32(1), start))
    out = final.out
    return out[:, :new_bucket]


@dataclasses.dataclass
class GenerateResult:
    """tokens: the new tokens of each prompt, through its first EOS (included), the token that completed a stop
    string (included) or max_new_tokens. finish_reasons: per prompt "eos", "stop" (a stop string) or "length".
    compile_s: time spent compiling in this call (0 when the program was cached); run_s: time of the
    program itself (prefill + decode, device synchronised); sparse_layers: per layer, whether decode ran it
    sparse (all False without predictors)."""

    tokens: list[list[int]]
    compile_s: float
    run_s: float
    sparse_layers: tuple[bool, ...] = ()
    finish_reasons: list[str] = dataclasses.field(default_factory=list)


class Watcher:
    """The host side of a watched program: ends a sequence once its text holds a stop string, and streams the
    first sequence's text as it is produced. decode: token ids -> text; stream: called with each new piece of
    text (held back while it could still become a stop string or an incomplete character). A failure in either
    (stdout full or closed under `stream`) ends every sequence and is raised by `finish`, once the program has
    returned: raised inside the callback it would reach the caller as an XLA runtime error with a traceback."""

    def __init__(self, decode: Callable[[list[int]], str], batch: int, stops: Sequence[str] = (),
                 stream: Callable[[str], None] | None = None):
        if any(not s for s in stops):
            raise SvdsparseError("stop strings must not be empty")
        self.decode, self.stops, self.stream = decode, tuple(stops), stream
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.stopped = np.zeros(batch, bool)
        self.streamed = 0  # characters of sequence 0's text already passed to `stream`
        self.error: Exception | None = None  # what failed in a call, raised by `finish`

    def __call__(self, step, tokens) -> np.ndarray:
        """tokens [B] of one step (-1 where a sequence has stopped) -> [B] bool, the sequences to stop."""
        if self.error is not None:
            return np.ones_like(self.stopped)
        try:
            for b, t in enumerate(np.asarray(tokens).tolist()):
                if t < 0 or self.stopped[b]:
                    continue
                self.tokens[b].append(t)
                if self.stops and any(s in self.decode(self.tokens[b]) for s in self.stops):
                    self.stopped[b] = True
            if self.stream is not None:
                self._stream(final=False)
        except Exception as e:  # kept for `finish`: the program stops at its next check
            self.error = e
            return np.ones_like(self.stopped)
        return self.stopped.copy()

    def text(self, b: int) -> str:
        """Sequence b's text so far, cut before its first stop string."""
        text = self.decode(self.tokens[b])
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=len(text))
        return text[:cut]

    def finish(self) -> None:
        """Streams what was held back (call once the program has returned); raises what failed in a call."""
        if self.error is not None:
            raise self.error
        if self.stream is not None:
            self._stream(final=True)

    def _stream(self, final: bool) -> None:
        text = self.text(0)
        end = len(text)
        if not (final or self.stopped[0]):
            end -= max((len(s) for s in self.stops), default=1) - 1  # might become a stop string
            while end > self.streamed and text[end - 1] == "\ufffd":  # an incomplete UTF-8 character
                end -= 1
        if end > self.streamed:
            self.stream(text[self.streamed:end])
            self.streamed = end


def seed_key(seed: int) -> jax.Array:
    """A PRNG key for a seed of 0 to 2^64 - 1, each seed its own stream (jax.random.key alone keeps 32 bits):
    the low 32 bits make the key and the high 32 bits, when any, are folded into it."""
    if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2 ** 64):
        raise SvdsparseError(f"seed {seed!r}: expected an integer from 0 to 2^64 - 1")
    key = jax.random.key(int(seed) & 0xFFFFFFFF)
    return key if seed < 2 ** 32 else jax.random.fold_in(key, int(seed) >> 32)


class Generator:
    """Compiles and runs the generate program for one model (dense, or sparse decoding with one predictor per
    layer) under the model's engine configuration (`model.engine`: which kernels run inside the program, which
    layers run sparse at a batch size, the steps per stop check, the device mesh: with one, the predictors are
    placed on it first, like the model's weights); keeps compiled programs by static shape, greedy or sampled.
    union: the predictors' union row fractions by batch size (`PredictorSet.union`), which the engine's measured
    policy reads."""

    def __init__(self, model: Transformer, predictors: list | None = None, union: UnionRows | None = None):
        self.cfg = model.cfg
        if predictors is not None and len(predictors) != model.cfg.n_layers:
            raise SvdsparseError(f"{len(predictors)} predictors for {model.cfg.n_layers} layers")
        if model.engine.mesh is not None:  # tensor parallel: the predictors go with their neurons
            predictors = predictors and shard_predictors(predictors, model.engine.mesh, model.cfg.d_ff)
        self.predictors, self.union, self.engine = predictors, union, model.engine
        self.itemsize = jnp.dtype(model.dtype).itemsize
        self.graphdef, self.state = nnx.split(model)
        self._jitted = jax.jit(_generate_program, static_argnums=(0,),
                               static_argnames=("new_bucket", "greedy", "penalized", "watch"))
        self.compiled: dict[tuple, object] = {}
        self._watcher: Watcher | None = None

    def _watch(self, step, tokens) -> np.ndarray:
        """The callback compiled into watched programs: the current call's Watcher."""
        return self._watcher(step, tokens)

    def check_batch_fits(self, what: str, count: int, longest: int, max_new_tokens: int, per_count: int = 1
                         ) -> None:
        """Refuses a batch of count x per_count sequences (prompts of at most `longest` tokens, max_new_tokens
        each) whose caches and activations (`sequence_bytes`, at the call's buckets) do not fit in memory;
        `what` names the count (a flag or argument). Sequences longer than the model's context are refused
        first, naming max_new_tokens: memory is not what a count then lacks."""
        if longest + max_new_tokens > self.cfg.max_seq_len:
            raise SvdsparseError(f"the longest prompt has {longest} tokens; with max_new_tokens={max_new_tokens} "
                                 f"that exceeds the model's context of {self.cfg.max_seq_len} tokens")
        prompt_len = bucket(longest)
        slots = prompt_len + bucket(max_new_tokens) + self.engine.steps_per_check
        check_count(what, count, per_count * sequence_bytes(self.cfg, prompt_len, slots, self.itemsize))

    def sparse_layers(self, batch: int) -> tuple[bool, ...]:
        """Per layer, whether a batch of `batch` sequences decodes it sparse (the engine's policy)."""
        if self.predictors is None:
            return (False,) * self.cfg.n_layers
        return sparse_layers(self.engine, self.cfg, self.predictors, self.union, batch, self.itemsize)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampler: Sampler = Sampler(),
                 seed: int = 0, eos_ids: Sequence[int] | None = None, watcher: Watcher | None = None
                 ) -> GenerateResult:
        """Generates up to max_new_tokens for each prompt (lists of token ids). eos_ids defaults to the
        config's; pass () to never stop early. watcher: stop strings and streaming (a `Watcher` for this
        batch), through a callback per step."""
        cfg = self.cfg
        if not isinstance(prompts, (Sequence, np.ndarray)) or isinstance(prompts, str) or len(prompts) == 0:
            raise SvdsparseError(f"prompts: expected a non-empty list of token-id lists, got {type(prompts).__name__}")
        if not is_int(max_new_tokens) or max_new_tokens < 1:
            raise SvdsparseError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1")
        if not isinstance(sampler, Sampler):
            raise SvdsparseError(f"sampler: expected a Sampler, got {type(sampler).__name__}")
        sampler.check()
        seed_key(seed)  # its range, before the work
        if eos_ids is not None and not (_is_ids(eos_ids) and all(0 <= e < cfg.vocab_size for e in eos_ids)):
            raise SvdsparseError(f"eos_ids={eos_ids!r}: expected token ids in [0, {cfg.vocab_size})")
        for i, p in enumerate(prompts):
            if not _is_ids(p):
                raise SvdsparseError(f"prompt {i + 1}: expected a list of integer token ids")
            if len(p) == 0:
                raise SvdsparseError(f"prompt {i + 1} is empty")
            bad = [t for t in p if not 0 <= t < cfg.vocab_size]
            if bad:
                raise SvdsparseError(f"prompt {i + 1}: token ids {bad[:5]} outside the vocabulary [0, "
                                     f"{cfg.vocab_size})")
            if len(p) + max_new_tokens > cfg.max_seq_len:
                raise SvdsparseError(f"prompt {i + 1} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that "
                                     f"exceeds the model's context of {cfg.max_seq_len} tokens")
        longest = max(len(p) for p in prompts)
        prompt_len, new_bucket = bucket(longest), bucket(max_new_tokens)
        self.check_batch_fits("prompts (the batch of sequences)", len(prompts), longest, max_new_tokens)
        tokens = np.zeros((len(prompts), prompt_len), np.int32)
        pad = np.zeros(len(prompts), np.int32)
        for i, p in enumerate(prompts):
            pad[i] = prompt_len - len(p)
            tokens[i, pad[i]:] = p
        eos = np.asarray(cfg.eos_ids if eos_ids is None else eos_ids, np.int32).reshape(-1)
        if eos.size == 0:
            eos = np.full(1, -2, np.int32)  # matches no token
        layers = self.sparse_layers(len(prompts))
        preds = None if not any(layers) else [p if s else None for p, s in zip(self.predictors, layers)]
        args = (self.graphdef, self.state, preds, jnp.asarray(tokens), jnp.asarray(pad),
                jnp.int32(max_new_tokens), jax.tree.map(jnp.asarray, sampler), seed_key(seed), jnp.asarray(eos))
        if watcher is not None and len(watcher.tokens) != len(prompts):
            raise SvdsparseError(f"a Watcher for {len(watcher.tokens)} sequences, but {len(prompts)} prompts")
        static = dict(new_bucket=new_bucket, greedy=sampler.greedy, penalized=sampler.penalized,
                      watch=self._watch if watcher is not None else None)
        key = (len(prompts), prompt_len, new_bucket, eos.size, layers, *static.values())
        compile_s = 0.0
        if key not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[key] = self._jitted.lower(*args, **static).compile()
            compile_s = time.perf_counter() - t0
        self._watcher = watcher
        try:
            t1 = time.perf_counter()
            out = self.compiled[key](*args[1:])
            out = np.asarray(jax.block_until_ready(out))
            t2 = time.perf_counter()
        finally:
            self._watcher = None
        # The program writes -1 after a sequence's first EOS or stop and past max_new_tokens: what remains is
        # the answer.
        tokens = [row[row >= 0].tolist() for row in out]
        reasons = ["stop" if watcher is not None and watcher.stopped[b] else
                   "eos" if t and t[-1] in eos else "length" for b, t in enumerate(tokens)]
        if watcher is not None:
            watcher.finish()
        return GenerateResult(tokens, compile_s=compile_s, run_s=t2 - t1, sparse_layers=layers,
                              finish_reasons=reasons)
