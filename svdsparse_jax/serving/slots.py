"""Decode slots: the device half of continuous batching, as pure functions of arrays and one class that compiles
them per bucket and holds the device state.

The server keeps a fixed number of decode slots (`--max-batch`), each the state of one sequence: its own KV
cache rows, length, last token, sampling parameters and key. Three programs act on them:

  admit          the prefill of one prompt, or of a burst that starts together (one call for all of them: the
                 weights are read once; `SlotConfig.admit_groups`), each right-padded to the power-of-two bucket
                 of the longest (dense, like `generate`'s), straight into its free slot's cache rows, and each
                 one's first token, drawn with its slot's own sampling parameters; compiled per prompt bucket
                 and row count (a power of two up to `slots`, `SlotConfig.admit_rows`)
  fork           another choice of the same prompt (a request of n choices): a copy of the slot's rows and its
                 own first token from the prompt's logits; compiled once
  decode_chunk   `chunk` decode steps of the first `bucket` slots in a loop of fixed trip count (no host round
                 trip inside); each live slot feeds its last token at its own cache slot (`kv_cache` with a
                 per-sequence start), draws the next with its own parameters and key, and stops at EOS or its
                 max_new; compiled once per (slot bucket, context bucket, sparse layers, greedy or sampled)

The slot bucket is the smallest power of two (or the maximum) covering the highest occupied slot; the context
bucket (a few fractions of the model's positions) covers every live slot's length plus a chunk, so a step reads
only that much of each cache row. Free slots below the bucket run along and are masked out: they write nothing
that is read, and with predictors their rows are left out of the union of candidates (`Transformer(rows=)`).
The sparse layers are those the engine's policy picks for the number of live slots.

A sequence's i-th new token is drawn with `fold_in(key, i)` on its own logits, exactly as `Generator` draws it
for a batch of one, so a request reproduces `svdsparse generate` of its prompt alone with the same seed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from svdsparse_jax import kv_cache
from svdsparse_jax.config import ModelConfig
from svdsparse_jax.generate import Sampler, bucket, seed_key
from svdsparse_jax.model import Transformer
from svdsparse_jax.policy import UnionRows, sparse_layers
from svdsparse_jax.sharding import shard_predictors

F32 = jnp.float32
log = logging.getLogger("svdsparse.serve")


@dataclasses.dataclass(frozen=True)
class SlotConfig:
    """Static shape of the decode slots. slots: how many (the largest decode batch); context: cache slots per
    sequence (the model's positions); chunk: decode steps per call (per host round trip); top_logprobs: the most
    alternatives a token's log-probabilities list; context_buckets: how many context lengths a step may read
    (context / 2^k for k < context_buckets, none below min_context slots: a smaller window saves less than its
    programs' compiles cost); window_reads: a decode chunk runs in the whole caches, attention reading only the
    context bucket's slots, instead of copying the bucket's slots out of every layer's cache and back (2 x 2 x
    the bucket's bytes a chunk); admit_tokens: the most prompt tokens (rows x bucket) one admit call of several
    prompts prefills (`admit_groups`); admit_together: the fewest prompts arriving together that one such call
    admits (None: half the slots). The defaults are the H200's fastest (docs/BENCHMARKS.md, issue 31,
    LLaMA2-7B, 8 slots): window reads 3% faster a step than copies at 8 steps a chunk, 6 context buckets 8%
    faster than 4; the server at 8 steps a chunk 5% faster than at 16, and 4 slower than 16 in the slots
    benchmark (7.51 against 5.79 ms a step, copying)."""

    slots: int
    context: int
    chunk: int = 8
    top_logprobs: int = 20
    context_buckets: int = 6
    window_reads: bool = True
    admit_tokens: int = 4096
    min_context: int = 128
    admit_together: int | None = None

    def admit_rows(self, n: int) -> int:
        """Rows of the admit call that prefills n prompts together: the power of two >= n, at most `slots` (the
        padding's rows are written nowhere). A prefill of a hundred tokens a row is not weight-bound on a GPU
        either: on an H200 (LLaMA2-7B, 100-token prompts) calls of 1 / 2 / 4 / 8 rows took 13.6 / 16.1 / 23.0 /
        31.6 ms, and padding rows are computed as prompts are (docs/BENCHMARKS.md, issue 31, twelfth session)."""
        return min(self.slots, bucket(n, 1))

    def admit_groups(self, lengths: list[int]) -> list[list[int]]:
        """How prompts of these lengths that arrive together are admitted: indices into `lengths`, one admit call
        per group. All in one call (`admit_rows` rows) when they are at least `admit_together` (default half the
        slots) and those rows x their bucket is at most admit_tokens; else one call each. Power-of-two row
        counts keep the admit programs to log2(slots) + 1 per prompt bucket."""
        whole = self.admit_rows(len(lengths)) * self.prompt_bucket(max(lengths, default=1))
        least = self.admit_together or (self.slots + 1) // 2
        if len(lengths) > 1 and len(lengths) >= least and whole <= self.admit_tokens:
            return [list(range(len(lengths)))]
        return [[i] for i in range(len(lengths))]

    def slot_buckets(self) -> list[int]:
        return sorted({self.slot_bucket(i) for i in range(self.slots)})

    def context_sizes(self) -> list[int]:
        floor = min(self.context, self.min_context)
        return sorted({max(floor, self.context >> k) for k in range(self.context_buckets)} | {self.context})

    def prompt_buckets(self) -> list[int]:
        return sorted({self.prompt_bucket(n) for n in range(1, self.context + 1)})

    def slot_bucket(self, highest: int) -> int:
        """Slots a decode call runs to cover slot index `highest` (0-based): a power of two, at most `slots`."""
        return min(self.slots, bucket(highest + 1, 1))

    def context_bucket(self, needed: int) -> int:
        """Cache slots a decode call reads so that every live sequence fits `needed` tokens."""
        return next((c for c in self.context_sizes() if c >= needed), self.context)

    def prompt_bucket(self, length: int) -> int:
        """The padded length of a prompt of `length` tokens (a power of two, at most `context`)."""
        return min(self.context, bucket(length))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """The device state of the decode slots (N = SlotConfig.slots, L = SlotConfig.context).

    k, v: per layer [N, n_kv_heads, L, head_dim], the model's dtype; a slot's row holds its sequence's keys and
      values in cache slots [0, length) (what lies beyond is never read).
    length: int32 [N], tokens in the cache; the slot's next token is written at slot `length` (= its position).
    token: int32 [N], the last token drawn, not yet in the cache.
    step: int32 [N], tokens drawn so far (the next one is drawn with fold_in(key, step)).
    max_new: int32 [N], tokens the sequence may draw in all.
    key: PRNG keys [N], one stream per sequence.
    sampler: `Sampler` whose fields are [N] arrays (temperature <= 0: greedy; repetition_penalty unused).
    """

    k: list[jax.Array]
    v: list[jax.Array]
    length: jax.Array
    token: jax.Array
    step: jax.Array
    max_new: jax.Array
    key: jax.Array
    sampler: Sampler


class Drawn(NamedTuple):
    """Tokens drawn by a call, with their log-probabilities (log-softmax of the raw logits, before temperature
    and filters). token: int32 [...] (-1 where a slot drew nothing); logprob: f32 [...], the token's;
    top_ids int32 / top_logprobs f32 [..., T]: the T likeliest tokens."""

    token: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def init_slots(cfg: ModelConfig, dtype: jnp.dtype, sc: SlotConfig) -> Slots:
    """All slots free: zero caches (dtype: the model's), lengths and steps, greedy samplers."""
    n = sc.slots
    shape = (n, cfg.n_kv_heads, sc.context, cfg.head_dim)
    zeros = lambda dtype=jnp.int32: jnp.zeros(n, dtype)  # noqa: E731  (distinct buffers: all are donated)
    return Slots(k=[jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)],
                 v=[jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)],
                 length=zeros(), token=zeros(), step=zeros(), max_new=zeros(),
                 key=jax.random.split(jax.random.key(0), n),
                 sampler=Sampler(zeros(F32), zeros(), jnp.ones(n, F32), jnp.ones(n, F32)))


def draw(logits: jax.Array, sampler: Sampler, keys: jax.Array, greedy: bool, top: int) -> Drawn:
    """Per row: the next token of logits f32 [B, V] under that row's sampler ([B] fields) and key ([B]): the
    argmax where its temperature is <= 0, else `Sampler.sample` of the row alone (as a batch of one).
    greedy: every row is greedy (no sampling compiled)."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        token = best
    else:
        sampled = jax.vmap(lambda s, row, k: s.sample(row[None], k)[0])(sampler, logits, keys)
        token = jnp.where(sampler.temperature <= 0, best, sampled)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logprobs, top)
    chosen = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
    return Drawn(token, chosen, top_ids.astype(jnp.int32), top_lp)


def _start(slots: Slots, slot: jax.Array, logits: jax.Array, length: jax.Array, max_new: jax.Array,
           key: jax.Array, sampler: Sampler, top: int) -> tuple[Slots, Drawn]:
    """Slots `slot` (int32 [A]; an index >= N is a padding row, which changes nothing) start sequences whose caches
    hold `length` tokens (int32 [A]): each first token (number 0) is drawn from its row of logits f32 [A, V] with
    its sampler ([A] fields) and key ([A]). Returns the slots and those tokens (Drawn fields [A])."""
    first = draw(logits, sampler, jax.vmap(jax.random.fold_in)(key, jnp.zeros(slot.shape, jnp.int32)),
                 greedy=False, top=top)
    row = lambda a, v: a.at[slot].set(v, mode="drop")  # noqa: E731
    slots = dataclasses.replace(slots, length=row(slots.length, length), token=row(slots.token, first.token),
                                step=row(slots.step, jnp.ones_like(slot)), max_new=row(slots.max_new, max_new),
                                key=row(slots.key, key), sampler=jax.tree.map(row, slots.sampler, sampler))
    return slots, first


def admit(graphdef, state, slots: Slots, tokens: jax.Array, length: jax.Array, slot: jax.Array, max_new: jax.Array,
          key: jax.Array, sampler: Sampler, *, top: int) -> tuple[Slots, Drawn, jax.Array]:
    """The prefill of A prompts, each into its slot, then their first tokens: tokens int32 [A, P] (each prompt
    right-padded to P; the padding's keys and values land past the prompt, where decoding overwrites them before
    any query sees them), length int32 [A] the real lengths, slot int32 [A] (>= N: a padding row, written
    nowhere), max_new int32 [A], key [A], sampler [A] fields; dense, like `generate`'s prefill. The prefill
    writes every cache slot [0, P) of its rows, so it starts from zeros, not from the slots' old rows. Returns
    the slots, the first tokens (Drawn fields [A]) and the prompts' last logits f32 [A, V] (for `fork`)."""
    model: Transformer = nnx.merge(graphdef, state)
    a, p = tokens.shape
    _, n_kv, _, head_dim = slots.k[0].shape
    empty = jnp.zeros((a, n_kv, p, head_dim), slots.k[0].dtype)
    cache = kv_cache.KVCache([empty] * len(slots.k), [empty] * len(slots.v), jnp.zeros(a, jnp.int32))
    with jax.named_scope("prefill"):
        states, cache = model(tokens, cache, jnp.int32(0))
        last = jnp.take_along_axis(states, (length - 1)[:, None, None], axis=1)[:, 0]  # [A, d]
        logits = model.logits(last)
    put = lambda c, v: c.at[slot, :, :p].set(v, mode="drop")  # noqa: E731
    slots = dataclasses.replace(slots, k=[put(c, v) for c, v in zip(slots.k, cache.k)],
                                v=[put(c, v) for c, v in zip(slots.v, cache.v)])
    slots, first = _start(slots, slot, logits, length, max_new, key, sampler, top)
    return slots, first, logits


def fork(slots: Slots, src: jax.Array, dst: jax.Array, logits: jax.Array, max_new: jax.Array, key: jax.Array,
         sampler: Sampler, *, top: int) -> tuple[Slots, Drawn]:
    """Another choice of the prompt in slot `src`: slot `dst` gets a copy of its cache rows and draws its own
    first token from the prompt's logits f32 [V] (a row of `admit`'s) with its own key and sampler."""
    copy = lambda a: jax.lax.dynamic_update_slice_in_dim(a, jax.lax.dynamic_slice_in_dim(a, src, 1, 0), dst, 0)  # noqa: E731
    slots = dataclasses.replace(slots, k=[copy(a) for a in slots.k], v=[copy(a) for a in slots.v])
    one = lambda x: jnp.asarray(x)[None]  # noqa: E731
    slots, first = _start(slots, one(dst), one(logits), one(slots.length[src]), one(max_new), one(key),
                          jax.tree.map(one, sampler), top)
    return slots, jax.tree.map(lambda x: x[0], first)


def decode_chunk(graphdef, state, predictors, slots: Slots, live: jax.Array, eos: jax.Array, *, bucket: int,
                 context: int, chunk: int, greedy: bool, top: int, window_reads: bool = False
                 ) -> tuple[Slots, Drawn]:
    """`chunk` decode steps of slots [0, bucket), reading cache slots [0, context). live: bool [N], the slots
    whose sequences go on (occupied and not finished); eos: int32 [E]. predictors: one per layer (None: that
    layer dense), or None. window_reads: the steps run in the whole caches with attention reading [0, context)
    (`SlotConfig.window_reads`), else in a copy of that window. Returns the slots and the tokens drawn, Drawn
    fields [bucket, chunk] (-1 where a slot drew nothing: not live, or past its EOS or max_new)."""
    model: Transformer = nnx.merge(graphdef, state)
    cut = (lambda a: a[:bucket]) if window_reads else (lambda a: a[:bucket, :, :context])  # noqa: E731
    k, v = [cut(a) for a in slots.k], [cut(a) for a in slots.v]
    sub = jax.tree.map(lambda a: a[:bucket], (slots.length, slots.token, slots.step, slots.max_new, slots.key,
                                              slots.sampler))
    length, token, step, max_new, key, sampler = sub
    pad = jnp.zeros(bucket, jnp.int32)
    out = Drawn(jnp.full((bucket, chunk), -1, jnp.int32), jnp.zeros((bucket, chunk), F32),
                jnp.zeros((bucket, chunk, top), jnp.int32), jnp.zeros((bucket, chunk, top), F32))

    def one(j, carry):
        k, v, length, token, step, done, out = carry
        active = ~done
        with jax.named_scope("decode_step"):
            states, cache = model(token[:, None], kv_cache.KVCache(k, v, pad), jnp.where(active, length, 0),
                                  predictors, rows=None if predictors is None else active,
                                  window=context if window_reads else None)
            got = draw(model.logits(states[:, 0]), sampler, jax.vmap(jax.random.fold_in)(key, step), greedy, top)
        out = Drawn(out.token.at[:, j].set(jnp.where(active, got.token, -1)), out.logprob.at[:, j].set(got.logprob),
                    out.top_ids.at[:, j].set(got.top_ids), out.top_logprobs.at[:, j].set(got.top_logprobs))
        step = step + active
        done = done | (active & (jnp.isin(got.token, eos) | (step >= max_new)))
        return (cache.k, cache.v, length + active, jnp.where(active, got.token, token), step, done, out)

    done = ~live[:bucket] | (slots.step[:bucket] >= max_new)
    k, v, length, token, step, _, out = jax.lax.fori_loop(0, chunk, one, (k, v, length, token, step, done, out))
    put = lambda a, b: jax.lax.dynamic_update_slice(a, b, (0,) * a.ndim)  # noqa: E731
    slots = dataclasses.replace(slots, k=[put(a, b) for a, b in zip(slots.k, k)],
                                v=[put(a, b) for a, b in zip(slots.v, v)], length=put(slots.length, length),
                                token=put(slots.token, token), step=put(slots.step, step))
    return slots, out


class Start(NamedTuple):
    """A sequence to start in a free slot: its prompt (token ids, 1 <= len < context), the most new tokens it may
    draw, its PRNG key and its sampling parameters."""

    slot: int
    prompt: list[int]
    max_new: int
    key: jax.Array
    sampler: Sampler


class SlotDecoder:
    """Compiles the slot programs for one model (dense, or with one predictor per layer and their union
    statistics for the engine's policy) and holds the device state of the slots. Not thread-safe: one thread
    (the scheduler's) drives it. `compiles` counts the programs built, by kind."""

    KEY_FIELDS = {"admit": ("rows", "prompt_bucket"), "fork": (), "decode": ("slots", "context", "sparse_layers",
                                                                             "greedy")}

    def __init__(self, model: Transformer, sc: SlotConfig, predictors: list | None = None,
                 union: UnionRows | None = None):
        self.cfg, self.sc, self.engine = model.cfg, sc, model.engine
        if predictors is not None and model.engine.mesh is not None:
            predictors = shard_predictors(predictors, model.engine.mesh, model.cfg.d_ff)
        self.predictors, self.union = predictors, union
        self.itemsize = jnp.dtype(model.dtype).itemsize
        self.graphdef, self.state = nnx.split(model)
        self.dtype = model.dtype
        self.reset()
        self.eos = jnp.asarray(np.asarray(model.cfg.eos_ids or [-2], np.int32).reshape(-1))
        self._admit = jax.jit(functools.partial(admit, top=sc.top_logprobs), static_argnums=(0,), donate_argnums=(2,))
        self._fork = jax.jit(functools.partial(fork, top=sc.top_logprobs), donate_argnums=(0,))
        self._decode = jax.jit(decode_chunk, static_argnums=(0,), donate_argnums=(3,),
                               static_argnames=("bucket", "context", "chunk", "greedy", "top", "window_reads"))
        self.padding = Start(sc.slots, [0], 1, seed_key(0), Sampler())  # an admit row written nowhere (slot N)
        self.seen: set[tuple] = set()
        self.compiles = {"admit": 0, "fork": 0, "decode": 0}

    def reset(self) -> None:
        """Every slot free, zero caches (after a failed call, whose donated state is gone)."""
        self.slots = init_slots(self.cfg, self.dtype, self.sc)

    def _count(self, key: tuple) -> None:
        if key not in self.seen:
            self.seen.add(key)
            self.compiles[key[0]] += 1
            log.info("compiling %s %s", key[0], dict(zip(self.KEY_FIELDS[key[0]], key[1:])))

    def sparse_layers(self, live: int) -> tuple[bool, ...]:
        """Per layer, whether a decode step with `live` sequences runs it sparse (the engine's policy)."""
        if self.predictors is None or live == 0:
            return (False,) * self.cfg.n_layers
        return sparse_layers(self.engine, self.cfg, self.predictors, self.union, live, self.itemsize)

    def warmup(self) -> int:
        """Compiles every program a request can meet: admit per prompt bucket for one row, and for each row count
        `SlotConfig.admit_groups` would group that many prompts in, fork, decode per slot bucket, context bucket,
        distinct sparse layers of the live counts that bucket covers, greedy or sampled. Returns the number of
        programs; the slots are left free."""
        sc, before = self.sc, len(self.seen)
        row_counts = sorted({sc.admit_rows(n) for n in range(1, sc.slots + 1)})
        for rows, pb in itertools.product(row_counts, sc.prompt_buckets()):
            if rows == 1 or len(sc.admit_groups([pb] * rows)) == 1:
                _, logits = self.admit([Start(i, [0] * pb, 1, seed_key(0), Sampler()) for i in range(rows)])
        self.fork(0, sc.slots - 1, logits[0], 1, seed_key(0), Sampler())
        for b in sc.slot_buckets():
            counts = {self.sparse_layers(n): n for n in range(b, 0, -1)}
            for n in counts.values():
                live = np.zeros(sc.slots, bool)
                live[b - n:b] = True
                for c in sc.context_sizes():
                    for greedy in (True, False):
                        jax.block_until_ready(self.decode(live, c, greedy))
        self.reset()
        return len(self.seen) - before

    @staticmethod
    def _sampler(samplers: list[Sampler], one: bool = False) -> Sampler:
        """The samplers as one whose fields are arrays (traced, so their values never recompile): [n], or scalars
        with one=True (one sampler)."""
        def field(name: str) -> jax.Array:
            values = np.array([getattr(s, name) for s in samplers], np.int32 if name == "top_k" else np.float32)
            return jnp.asarray(values[0] if one else values)
        return Sampler(*(field(f.name) for f in dataclasses.fields(Sampler)))

    def admit(self, starts: list[Start]) -> tuple[Drawn, jax.Array]:
        """Starts each sequence in its (free, distinct) slot, all in one prefill call of `SlotConfig.admit_rows`
        rows (`SlotConfig.admit_groups` says when grouping pays). Returns their first tokens (Drawn fields
        [len(starts)], NumPy) and their prompts' logits (f32 [rows, V] on the device, row i for starts[i], for
        `fork`)."""
        n = len(starts)
        rows = self.sc.admit_rows(n)
        pb = self.sc.prompt_bucket(max(len(s.prompt) for s in starts))
        every = starts + [self.padding] * (rows - n)
        tokens = np.zeros((rows, pb), np.int32)
        for i, s in enumerate(starts):
            tokens[i, :len(s.prompt)] = s.prompt
        column = lambda f: jnp.asarray(np.array([f(s) for s in every], np.int32))  # noqa: E731
        sampler = self._sampler([s.sampler for s in every])
        self._count(("admit", rows, pb))
        self.slots, first, logits = self._admit(
            self.graphdef, self.state, self.slots, jnp.asarray(tokens), column(lambda s: len(s.prompt)),
            column(lambda s: s.slot), column(lambda s: s.max_new), jnp.stack([s.key for s in every]), sampler)
        return jax.tree.map(lambda a: np.asarray(a)[:n], first), logits

    def fork(self, src: int, dst: int, logits: jax.Array, max_new: int, key: jax.Array, sampler: Sampler) -> Drawn:
        """Slot `dst` starts another choice of the prompt `admit` put in slot `src` (its logits); returns its
        first token (NumPy)."""
        self._count(("fork",))
        self.slots, first = self._fork(self.slots, jnp.int32(src), jnp.int32(dst), logits, jnp.int32(max_new), key,
                                       self._sampler([sampler], one=True))
        return jax.tree.map(np.asarray, first)

    def decode(self, live: np.ndarray, needed: int, greedy: bool) -> Drawn:
        """Starts one chunk of decode steps (asynchronously). live: bool [N], the slots that go on; needed: the
        cache slots every live sequence needs by the chunk's end (which context bucket to read); greedy: every
        live slot is greedy. Returns the tokens drawn, Drawn fields [bucket, chunk] on the device (bucket: the
        slots covered; -1 where nothing)."""
        idx = np.flatnonzero(live)
        bucket = self.sc.slot_bucket(int(idx.max()))
        context = self.sc.context_bucket(needed)
        layers = self.sparse_layers(len(idx))
        preds = None if not any(layers) else [p if s else None for p, s in zip(self.predictors, layers)]
        self._count(("decode", bucket, context, layers, greedy))
        self.slots, out = self._decode(self.graphdef, self.state, preds, self.slots, jnp.asarray(live), self.eos,
                                       bucket=bucket, context=context, chunk=self.sc.chunk, greedy=greedy,
                                       top=self.sc.top_logprobs, window_reads=self.sc.window_reads)
        return out
