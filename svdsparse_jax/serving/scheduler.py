"""The host half of continuous batching: a bounded queue of requests and one thread that drives the decode slots
(`slots.SlotDecoder`).

The thread loops: drop what was cancelled, admit waiting requests (first come, first served) into free slots (each
prompt into a slot, a burst of them in one prefill call, copied for its other choices: first tokens go out at once),
then run one chunk of decode steps over the live slots and hand each choice its new tokens; a choice that ends (EOS,
max_tokens, a stop string) frees its slot at once, for the next admission. A request of n choices waits until n
slots are free. Requests beyond `max_queue` waiting are refused (`QueueFull`: the API's 429). With an admission wait
(`admit_wait_s`, `svdsparse serve --admit-wait-ms`), requests that arrive while no slot decodes are held up to that
long after the first of them, until they would fill the free slots: a burst of arrivals (the clients of a finished
round) is prefilled in one call and decoded in full chunks, instead of a call for the first few and a chunk run for
those alone while the rest wait. Cancellation (a client that went away) frees the request's slots before the next
chunk. `close` lets every accepted request finish, then ends the thread (SIGTERM's drain).

Other threads talk to the scheduler through `submit` and `cancel` only; a request's events (`Piece` per choice and
step, then `Finished`) are passed to its `emit` callable, from the scheduler's thread.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import threading
import time
from typing import Callable

import jax
import numpy as np

from svdsparse_jax.generate import Sampler, seed_key
from svdsparse_jax.serving.metrics import Metrics
from svdsparse_jax.serving.slots import Drawn, SlotDecoder, Start
from svdsparse_jax.serving.text import TextStream

log = logging.getLogger("svdsparse.serve")


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


@dataclasses.dataclass(frozen=True)
class Params:
    """A request's generation parameters, validated by the API. temperature 0: greedy; top_k 0 and top_p 1:
    off; seed None: a random one (choice j samples as seed + j alone would); logprobs: how many alternatives
    each token lists (0: the token's own log-probability only), None: no log-probabilities."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclasses.dataclass
class TokenLogprob:
    """One token's log-probability (log-softmax of the raw logits) and its `top` likeliest alternatives
    (token id, log-probability), and where its text starts in the choice's text."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    offset: int


@dataclasses.dataclass
class Piece:
    """New output of one choice: text (may be empty), the token ids it came from, their log-probabilities (when
    asked for), and the finish reason once it ended ('stop': EOS or a stop string, 'length': max_tokens)."""

    index: int
    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None


@dataclasses.dataclass
class Finished:
    """The last event of a request: token counts (prompt once, completion over all choices), or the error that
    ended it."""

    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclasses.dataclass
class Choice:
    """One sequence of a request, in a slot while it runs."""

    index: int
    text: TextStream
    slot: int = -1
    tokens: list[int] = dataclasses.field(default_factory=list)
    pending: list[TokenLogprob] = dataclasses.field(default_factory=list)  # drawn, not yet sent
    finish_reason: str | None = None
    first_at: float = 0.0


@dataclasses.dataclass
class InFlight:
    """A decode chunk dispatched and not yet read: its outputs (device arrays) and the choice (and request)
    each slot held when it was dispatched."""

    out: Drawn
    owners: list[Choice | None]
    requests: list[Request | None]


@dataclasses.dataclass
class Request:
    """A request as the scheduler holds it. emit: receives its events (from the scheduler's thread)."""

    prompt: list[int]
    params: Params
    emit: Callable[[object], None]
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    choices: list[Choice] = dataclasses.field(default_factory=list)
    cancelled: bool = False
    done: bool = False


class Scheduler:
    """Drives a `SlotDecoder` from one thread (see the module docstring). decode_text: token ids -> text (special
    tokens skipped); eos: token ids that end a choice; admit_wait_s: how long arrivals at an idle device wait for
    more (seconds, 0: none)."""

    def __init__(self, decoder: SlotDecoder, decode_text: Callable[[list[int]], str], eos: tuple[int, ...],
                 max_queue: int, metrics: Metrics, warmup: bool = False, admit_wait_s: float = 0.0):
        self.decoder, self.decode_text, self.eos = decoder, decode_text, set(eos)
        self.max_queue, self.metrics, self.admit_wait_s = max_queue, metrics, admit_wait_s
        self.n_slots = decoder.sc.slots
        self.owner: list[Choice | None] = [None] * self.n_slots  # the choice in each slot
        self.owner_request: list[Request | None] = [None] * self.n_slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.cv = threading.Condition()
        self.closing = False
        self.starting: list[Request] = []  # the requests being admitted (failed with the slots on an error)
        self.inflight: InFlight | None = None  # the decode chunk running on the device
        self.warm = warmup  # compile every program first
        self.ready = threading.Event()  # set once the thread serves (after the warm-up)
        self.thread = threading.Thread(target=self._loop, name="svdsparse-scheduler", daemon=True)
        metrics.slots.set(self.n_slots)

    # --- called from other threads
    def start(self) -> None:
        self.thread.start()

    def submit(self, request: Request) -> None:
        """Queues a request; raises QueueFull when `max_queue` requests already wait, RuntimeError when closing."""
        with self.cv:
            if self.closing:
                raise RuntimeError("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                self.metrics.requests.labels("rejected").inc()
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(request)
            self.metrics.queue.set(len(self.waiting))
            self.cv.notify()

    def cancel(self, request: Request) -> None:
        """Ends a request early (its client went away): its slots are freed before the next decode chunk."""
        with self.cv:
            request.cancelled = True
            self.cv.notify()

    def close(self, timeout: float | None = None) -> None:
        """Lets every accepted request finish, then stops the thread."""
        with self.cv:
            self.closing = True
            self.cv.notify()
        self.thread.join(timeout)

    @property
    def busy(self) -> int:
        """Occupied slots."""
        return sum(c is not None for c in self.owner)

    # --- the scheduler's thread
    def _loop(self) -> None:
        if self.warm:
            t0 = time.perf_counter()
            n = self.decoder.warmup()
            log.warning("warm-up: %d programs compiled in %.1f s", n, time.perf_counter() - t0)
        self.ready.set()
        while True:
            with self.cv:
                while not (self.waiting or self.busy or self.inflight or self.closing):
                    self.cv.wait()
                if self.closing and not (self.waiting or self.busy or self.inflight):
                    return
                self._gather()
            try:
                self._drop_cancelled()
                self._admit()
                previous, self.inflight = self.inflight, self._dispatch()
                if previous is not None:  # while the next chunk runs on the device
                    self._collect(previous)
                for kind, n in self.decoder.compiles.items():
                    self.metrics.programs.labels(kind).set(n)
            except Exception as e:  # a device error: fail what runs, start the slots afresh, keep serving
                log.exception("decode failed")
                failed = [r for r in self.owner_request if r is not None] + self.starting
                for r in {id(r): r for r in failed}.values():
                    self._finish(r, error=f"{type(e).__name__}: {e}")
                self.decoder.reset()
                self.inflight = None
            self.starting = []

    def _drop_cancelled(self) -> None:
        with self.cv:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
            self.metrics.queue.set(len(self.waiting))
        for r in gone:
            self._finish(r, outcome="cancelled")
        for r in {id(r): r for r in self.owner_request if r is not None and r.cancelled}.values():
            self._finish(r, outcome="cancelled")

    def _gather(self) -> None:
        """With no slot decoding, waits (holding `cv`) until the waiting requests' choices fill the free slots, or
        `admit_wait_s` has passed since the first of them arrived, or the server closes."""
        if not self.admit_wait_s or self.busy or self.inflight:
            return
        free = len(self._free_slots())
        while self.waiting and not self.closing and sum(r.params.n for r in self.waiting) < free:
            left = self.waiting[0].arrived + self.admit_wait_s - time.perf_counter()
            if left <= 0:
                return
            self.cv.wait(left)

    def _free_slots(self) -> list[int]:
        return [i for i, c in enumerate(self.owner) if c is None]

    def _admit(self) -> None:
        """Takes waiting requests, first come first served, while their choices fit in the free slots, and starts
        them (`_start`)."""
        batch, gone = [], []
        with self.cv:
            free = len(self._free_slots())
            while self.waiting and free >= self.waiting[0].params.n:
                r = self.waiting.popleft()
                if r.cancelled:
                    gone.append(r)
                    continue
                batch.append(r)
                free -= r.params.n
            self.metrics.queue.set(len(self.waiting))
        for r in gone:
            self._finish(r, outcome="cancelled")
        if batch:
            self.starting = batch
            self._start(batch)
            self.starting = []

    def _start(self, batch: list[Request]) -> None:
        """Prefills the requests' prompts, each into a free slot (together where `SlotConfig.admit_groups` groups
        them), copies each prompt's slot for its other choices, and emits every choice's first token."""
        free, plans = self._free_slots(), []
        for r in batch:
            p = r.params
            seed = secrets.randbits(64) if p.seed is None else p.seed
            sampler = Sampler(temperature=max(p.temperature, 0.0), top_k=p.top_k, top_p=p.top_p)
            self.metrics.prompt_tokens.inc(len(r.prompt))
            slots, free = free[:p.n], free[p.n:]
            for j, slot in enumerate(slots):
                c = Choice(j, TextStream(self.decode_text, p.stop), slot)
                r.choices.append(c)
                self.owner[slot], self.owner_request[slot] = c, r
            plans.append((r, slots, seed, sampler))
        for group in self.decoder.sc.admit_groups([len(r.prompt) for r in batch]):
            mine = [plans[i] for i in group]
            self.metrics.admit_prompts.observe(len(mine))
            firsts, logits = self.decoder.admit([Start(slots[0], r.prompt, r.params.max_tokens, seed_key(seed),
                                                       sampler) for r, slots, seed, sampler in mine])
            now = time.perf_counter()
            for i, (r, slots, seed, sampler) in enumerate(mine):
                r.choices[0].first_at = now
                self.metrics.ttft.observe(now - r.arrived)
                self._take(r, r.choices[0], Drawn(*(a[i] for a in firsts)))
                for j, slot in enumerate(slots[1:], 1):
                    first = self.decoder.fork(slots[0], slot, logits[i], r.params.max_tokens,
                                              seed_key((seed + j) % 2 ** 64), sampler)
                    r.choices[j].first_at = time.perf_counter()
                    self._take(r, r.choices[j], first)
                self._flush(r)
        self.metrics.occupied.set(self.busy)

    def _dispatch(self) -> InFlight | None:
        """Starts a decode chunk over the live slots: those whose choice goes on, as far as the host knows. A
        choice whose max_tokens the chunk in flight reaches is left out (when every choice ends so, no chunk runs
        and the next requests start at once); one that ends in it by EOS or a stop string runs one chunk more,
        and its tokens are dropped."""
        chunk, needed, greedy = self.decoder.sc.chunk, 0, True
        live = np.zeros(self.n_slots, bool)
        for i, c in enumerate(self.owner):
            if c is None or c.finish_reason is not None:
                continue
            r = self.owner_request[i]
            lag = chunk if self.inflight is not None and self.inflight.owners[i] is c else 0  # tokens not yet seen
            if len(c.tokens) + lag >= r.params.max_tokens:
                continue
            live[i] = True
            needed = max(needed, len(r.prompt) + len(c.tokens) - 1 + lag + chunk)
            greedy &= r.params.greedy
        if not live.any():
            return None
        self.metrics.occupancy.observe(int(live.sum()))
        self.metrics.decode_steps.inc(chunk)
        return InFlight(self.decoder.decode(live, needed, greedy), list(self.owner), list(self.owner_request))

    def _collect(self, f: InFlight) -> None:
        """Hands each choice of a finished chunk its tokens (up to its end), then sends what is new."""
        out = jax.tree.map(np.asarray, f.out)
        touched = {}
        for i, (c, r) in enumerate(zip(f.owners[:out.token.shape[0]], f.requests)):
            if c is None or r.done or c.finish_reason is not None:
                continue  # free, cancelled or ended: whatever the slot drew is dropped
            for j in range(out.token.shape[1]):
                if out.token[i, j] < 0 or c.finish_reason is not None:
                    break
                self._take(r, c, Drawn(*(a[i, j] for a in out)))
            touched[id(r)] = r
        for r in touched.values():
            self._flush(r)
        self.metrics.occupied.set(self.busy)

    def _take(self, r: Request, c: Choice, d: Drawn) -> None:
        """One token drawn for choice c: its text, log-probabilities, and whether it ends the choice."""
        token = int(d.token)
        c.tokens.append(token)
        offset = c.text.add(token)
        if r.params.logprobs is not None:
            k = r.params.logprobs
            c.pending.append(TokenLogprob(token, float(d.logprob),
                                          [(int(t), float(lp)) for t, lp in zip(d.top_ids[:k], d.top_logprobs[:k])],
                                          offset))
        else:
            c.pending.append(None)
        self.metrics.generation_tokens.inc()
        if token in self.eos or c.text.stopped:
            c.finish_reason = "stop"
        elif len(c.tokens) >= r.params.max_tokens:
            c.finish_reason = "length"

    def _flush(self, r: Request) -> None:
        """Sends each choice of r what it has new; frees the slots of ended choices; ends r when all have."""
        for c in r.choices:
            if not c.pending and c.finish_reason is None:
                continue
            if c.finish_reason is not None and c.slot >= 0:
                c.text.finish()
            text = c.text.ready(final=c.finish_reason is not None)
            if c.pending or text or c.finish_reason is not None:
                n_new = len(c.pending)
                lps = None if r.params.logprobs is None else list(c.pending)
                r.emit(Piece(c.index, text, c.tokens[len(c.tokens) - n_new:], lps, c.finish_reason))
                c.pending = []
            if c.finish_reason is not None and c.slot >= 0:
                self._release(c)
                if len(c.tokens) > 1:
                    self.metrics.tpot.observe((time.perf_counter() - c.first_at) / (len(c.tokens) - 1))
        if all(c.finish_reason is not None for c in r.choices) and len(r.choices) == r.params.n:
            self._finish(r)

    def _release(self, c: Choice) -> None:
        self.owner[c.slot] = self.owner_request[c.slot] = None
        c.slot = -1

    def _finish(self, r: Request, outcome: str = "finished", error: str | None = None) -> None:
        """Ends a request: frees its slots and sends its last event (once)."""
        for c in r.choices:
            if c.slot >= 0:
                self._release(c)
        if r.done:
            return
        r.done = True
        self.metrics.requests.labels("error" if error else outcome).inc()
        if outcome == "finished" and not error:
            self.metrics.e2e.observe(time.perf_counter() - r.arrived)
        r.emit(Finished(len(r.prompt), sum(len(c.tokens) for c in r.choices), error))
        self.metrics.occupied.set(self.busy)
