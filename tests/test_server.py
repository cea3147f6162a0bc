"""`svdsparse serve` through the official openai client against real uvicorn processes on loopback (the bundled
model, float32, CPU): greedy outputs of concurrent requests equal each prompt's greedy `Generator` output alone
(dense, and sparse with all-active predictors), sampled outputs equal the `Generator` with the same seed,
log-probabilities equal a forward pass of the whole sequence; chat, streaming, stop strings, n, errors naming
their field, a client that goes away frees its slot, a full queue answers 429, SIGTERM answers every accepted
request before the process exits.

Two servers run for the whole module (dense, with a chat template; sparse, without), each with 4 decode slots;
the module's tests run on one pytest-xdist worker (xdist_group), so each server starts once."""

from __future__ import annotations

import atexit
import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from svdsparse_jax import kv_cache
from svdsparse_jax.assets import BUNDLED_MODEL, corpus_split
from svdsparse_jax.convert import load_model
from svdsparse_jax.engine import EngineConfig
from svdsparse_jax.generate import Generator, Sampler
from svdsparse_jax.model import Transformer

pytestmark = pytest.mark.xdist_group("server")

NAME = "bundled"
SLOTS, QUEUE = 4, 16
TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}### assistant:\n{% endif %}")
STARTUP_S = 120


class Server:
    """A `svdsparse serve` process on a free loopback port; its stderr goes to a file."""

    def __init__(self, log: Path, *flags: str):
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "svdsparse_jax.cli", "serve", "--dtype", "float32",
                                      "--port", "0", "--max-batch", str(SLOTS), "--max-queue", str(QUEUE),
                                      "--served-model-name", NAME, "--log-level", "warning", *flags],
                                     stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
        atexit.register(self.stop)  # also when a worker is interrupted before the fixture's teardown
        deadline = time.monotonic() + STARTUP_S
        while not (m := re.search(r"on (http://\S+) ", log.read_text())):
            assert self.proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        self.url = m[1]
        while not self.healthy():  # the port is bound before the model loads; uvicorn listens after
            assert self.proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health").status_code == 200
        except httpx.TransportError:
            return False

    def metric(self, name: str) -> float:
        """A sample of GET /metrics: 'svdsparse_slots_occupied', 'svdsparse_requests_total{outcome="cancelled"}'."""
        text = httpx.get(self.url + "/metrics").text
        return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)[1])

    def wait_for(self, name: str, check, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not check(self.metric(name)):
            assert time.monotonic() < deadline, f"{name} = {self.metric(name)}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def lm():
    return load_model(BUNDLED_MODEL, jnp.float32)


@pytest.fixture(scope="module")
def reference(lm):
    """The one-sequence reference: the `Generator` of `svdsparse generate` (dense, XLA)."""
    return Generator(Transformer(lm.cfg, lm.weights, EngineConfig.resolve("xla")))


REF_NEW = 48


def greedy_alone(reference, ids: list[int], n: int, **kw) -> tuple[list[int], str]:
    """The greedy tokens of `svdsparse generate` for one prompt alone, at most n <= REF_NEW, and the server's
    finish reason for them. (One new-token bucket for every call, so the reference compiles once per prompt
    bucket: the first n tokens of a longer call are the call's for n, tests/test_generate.py checks.)"""
    assert n <= REF_NEW
    tokens = reference.generate([ids], REF_NEW, **kw).tokens[0][:n]
    eos = kw.get("eos_ids", reference.cfg.eos_ids)
    return tokens, "stop" if tokens and tokens[-1] in eos else "length"


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    (root / "template.jinja").write_text(TEMPLATE)
    server = Server(root / "serve.log", "--chat-template", str(root / "template.jinja"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sparse(tmp_path_factory, lm):
    """A server whose every layer decodes through predictors that keep every neuron (bias 1, zero scores)."""
    from svdsparse_jax.predictors import LowRankPredictor, PredictorSet, save_predictors
    root = tmp_path_factory.mktemp("sparse")
    cfg = lm.cfg
    everything = LowRankPredictor(jnp.zeros((4, cfg.d_model)), jnp.zeros((cfg.d_ff, 4)), jnp.ones(cfg.d_ff))
    save_predictors(root / "all", PredictorSet("whitened", [everything] * cfg.n_layers, {}), cfg, lm.fingerprint)
    server = Server(root / "serve.log", "--predictors", str(root / "all"), "--ffn-policy", "sparse",
                    "--admit-together", "3")  # groups of 3 and 4 of the 4 slots (the default: 2 and more)
    assert f"sparse layers by live sequences: 1: {cfg.n_layers}/{cfg.n_layers}" in server.log.read_text()
    yield server
    server.stop()


def prompts(lm, rng, count: int) -> list[str | list[int]]:
    """Held-out pieces of 3 to 60 tokens, every other one as text (tokenized by the server) or token ids."""
    heldout = corpus_split("heldout")
    out = []
    for i, n in enumerate(rng.integers(3, 60, count)):
        start = int(rng.integers(0, len(heldout) - n))
        ids = [int(t) for t in heldout[start:start + n]]
        out.append(lm.tokenizer.decode(ids, skip_special_tokens=True) if i % 2 else ids)
    return out


def ids_of(lm, prompt: str | list[int]) -> list[int]:
    return lm.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt


def text_of(lm, ids: list[int]) -> str:
    return lm.tokenizer.decode(ids, skip_special_tokens=True)


def concurrent_greedy_equals_generate_alone(server: Server, lm, reference, rng):
    """16 requests of different lengths, arriving at different times (more than the slots and the queue's
    first fill): each answer is the prompt's greedy generation alone, text, length and finish reason."""
    batch = prompts(lm, rng, 16)
    limits = [int(n) for n in rng.integers(4, 48, len(batch))]

    def ask(i):
        time.sleep(0.15 * i * rng.random())
        return server.client.completions.create(model=NAME, prompt=batch[i], max_tokens=limits[i], temperature=0)

    with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
        answers = list(pool.map(ask, range(len(batch))))
    for prompt, limit, got in zip(batch, limits, answers):
        want, reason = greedy_alone(reference, ids_of(lm, prompt), limit)
        (choice,) = got.choices
        assert choice.text == text_of(lm, want)
        assert choice.finish_reason == reason
        assert got.usage.completion_tokens == len(want)
        assert got.usage.prompt_tokens == len(ids_of(lm, prompt))
    assert server.metric("svdsparse_slots_occupied") == 0


def test_concurrent_greedy_requests_equal_generate_alone(dense, lm, reference, rng):
    concurrent_greedy_equals_generate_alone(dense, lm, reference, rng)
    # every admitted request's prompt was prefilled once, in calls of 1 to SLOTS prompts
    done = {o: dense.metric(f'svdsparse_requests_total{{outcome="{o}"}}') for o in ("finished", "cancelled", "error")}
    prompts, calls = dense.metric("svdsparse_admit_prompts_sum"), dense.metric("svdsparse_admit_prompts_count")
    assert done["finished"] <= prompts <= sum(done.values()) and calls <= prompts <= SLOTS * calls
    assert dense.metric("svdsparse_batch_occupancy_bucket{le=\"1.0\"}") < dense.metric(
        "svdsparse_batch_occupancy_count")  # chunks did run several sequences together


def test_sparse_concurrent_greedy_requests_equal_generate_alone(sparse, lm, reference, rng):
    concurrent_greedy_equals_generate_alone(sparse, lm, reference, rng)


def test_the_readme_snippet(dense, lm, reference):
    """README.md's serve snippet, as written but for the server's address and model name."""
    from test_readme import python_snippets
    snippet = python_snippets()[2].replace("http://127.0.0.1:8000/v1", dense.url + "/v1")
    out = subprocess.run([sys.executable, "-c", snippet.replace('"default_model"', repr(NAME))],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    want = text_of(lm, greedy_alone(reference, ids_of(lm, "def read_config(path):\n"), 48)[0])
    assert out.stdout.startswith(want + " CompletionUsage(completion_tokens=48")


def test_models_health_and_metrics(dense):
    (model,) = dense.client.models.list().data
    assert model.id == NAME and model.owned_by == "svdsparse"
    assert httpx.get(dense.url + "/health").json() == {"status": "ok"}
    text = httpx.get(dense.url + "/metrics").text
    for name in ("svdsparse_requests_total", "svdsparse_generation_tokens_total", "svdsparse_queue_depth",
                 "svdsparse_batch_occupancy_bucket", "svdsparse_time_to_first_token_seconds_bucket",
                 "svdsparse_time_per_output_token_seconds_bucket", "svdsparse_slots"):
        assert name in text


def test_no_decode_chunk_runs_past_max_tokens(dense):
    """A request for 1 + 2 chunks of tokens on an idle server runs two decode chunks, not three: the chunk that
    would follow the one reaching max_tokens (dispatched before its tokens are read) is never started."""
    chunk = 8  # `svdsparse serve`'s default --decode-chunk
    before = dense.metric("svdsparse_decode_steps_total")
    got = dense.client.completions.create(model=NAME, prompt="def read_config(path):\n", max_tokens=1 + 2 * chunk,
                                          temperature=0)
    assert got.usage.completion_tokens == 1 + 2 * chunk and got.choices[0].finish_reason == "length"
    assert dense.metric("svdsparse_decode_steps_total") - before == 2 * chunk


def test_streaming_equals_the_whole_answer(dense, lm, reference):
    prompt = "def read_config(path):\n"
    want = text_of(lm, greedy_alone(reference, ids_of(lm, prompt), 40)[0])
    pieces, usage, reasons = [], None, []
    for chunk in dense.client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.text)
            reasons.append(c.finish_reason)
    assert "".join(pieces) == want and len(pieces) > 2
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert usage.completion_tokens == 40 and usage.prompt_tokens == len(ids_of(lm, prompt))


def test_stop_strings_cut_the_text(dense, lm, reference):
    prompt = "class Config:\n    def __init__(self):\n"
    free = text_of(lm, greedy_alone(reference, ids_of(lm, prompt), REF_NEW, eos_ids=())[0])
    stop = "self."
    assert stop in free[1:]
    for stream in (False, True):
        got = dense.client.completions.create(model=NAME, prompt=prompt, max_tokens=REF_NEW, temperature=0,
                                              stop=[stop, "@@never@@"], stream=stream)
        chunks = list(got) if stream else [got]
        text = "".join(c.text for ch in chunks for c in ch.choices)
        assert text == free[:free.index(stop)]
        assert chunks[-1].choices[-1].finish_reason == "stop"


def test_n_choices_sample_as_generate_with_their_seeds(dense, lm):
    """Choice j of a request with seed s draws what `Generator` draws for the prompt alone with seed s + j; the
    same request again gives the same choices, another seed others."""
    gen = Generator(Transformer(lm.cfg, lm.weights, EngineConfig.resolve("xla")))
    prompt, seed = "import os\n", 1234
    sampler = Sampler(temperature=0.9, top_k=40, top_p=0.95)
    ask = lambda s: dense.client.completions.create(  # noqa: E731
        model=NAME, prompt=prompt, max_tokens=24, n=3, temperature=0.9, top_p=0.95, seed=s,
        extra_body={"top_k": 40})
    got = ask(seed)
    texts = [c.text for c in sorted(got.choices, key=lambda c: c.index)]
    for j, text in enumerate(texts):
        assert text == text_of(lm, gen.generate([ids_of(lm, prompt)], 24, sampler, seed=seed + j).tokens[0])
    assert len(set(texts)) > 1
    assert [c.text for c in sorted(ask(seed).choices, key=lambda c: c.index)] == texts
    assert [c.text for c in sorted(ask(seed + 100).choices, key=lambda c: c.index)] != texts


def test_logprobs_equal_a_forward_pass(dense, lm):
    prompt = "import os\n"
    got = dense.client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    (choice,) = got.choices
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == 12 and choice.finish_reason == "length"
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]
    ids = ids_of(lm, prompt)
    out = lm.tokenizer(choice.text, add_special_tokens=False)["input_ids"]
    model = Transformer(lm.cfg, lm.weights, EngineConfig.resolve("xla"))
    seq = jnp.asarray([ids + out], jnp.int32)
    states, _ = model(seq, kv_cache.init_cache(lm.cfg, jnp.zeros(1, jnp.int32), seq.shape[1], jnp.float32),
                      jnp.int32(0))
    want = np.asarray(jax.nn.log_softmax(model.logits(states[0, len(ids) - 1:-1]), axis=-1))
    np.testing.assert_allclose(lp.token_logprobs, want[np.arange(len(out)), out], atol=1e-4, rtol=0)
    for row, top in zip(want, lp.top_logprobs):
        best = np.argsort(-row)[:3]
        assert list(top) == [lm.tokenizer.decode([t]) for t in best]
        np.testing.assert_allclose(list(top.values()), row[best], atol=1e-4, rtol=0)


def test_chat_through_the_template(dense, lm, reference):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Read a file."}]
    ids = lm.tokenizer(lm.tokenizer.apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=True,
                                                        tokenize=False), add_special_tokens=False)["input_ids"]
    want = text_of(lm, greedy_alone(reference, ids, 30)[0])
    got = dense.client.chat.completions.create(model=NAME, messages=messages, max_tokens=30, temperature=0)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 30
    chunks = list(dense.client.chat.completions.create(model=NAME, messages=messages, max_tokens=30, temperature=0,
                                                       stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_errors_name_their_field(dense, sparse):
    def refused(server, status, call, **kw):
        with pytest.raises(openai.APIStatusError) as e:
            call(**kw)
        assert e.value.status_code == status
        return e.value.body  # the "error" object

    create = dense.client.completions.create
    for kw, param in ((dict(temperature=3.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(n=SLOTS + 1), "n"),
                      (dict(max_tokens=0), "max_tokens"), (dict(logprobs=21), "logprobs"), (dict(stop=[""]), "stop"),
                      (dict(presence_penalty=0.5), "presence_penalty"), (dict(seed=-1), "seed"),
                      (dict(extra_body={"bogus": 1}), "bogus"), (dict(max_tokens=600), "max_tokens")):
        err = refused(dense, 400, create, model=NAME, prompt="x", **kw)
        assert err["param"] == param and param in err["message"], (kw, err)
    err = refused(dense, 400, create, model=NAME, prompt=list(range(600)))
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    err = refused(dense, 400, create, model=NAME, prompt=[[1, 2], [9999]])
    assert err["param"] == "prompt" and "vocabulary" in err["message"]
    assert refused(dense, 404, create, model="other", prompt="x")["code"] == "model_not_found"
    err = refused(sparse, 400, sparse.client.chat.completions.create, model=NAME,
                  messages=[{"role": "user", "content": "hi"}])
    assert err["param"] == "messages" and err["code"] == "no_chat_template"
    err = refused(dense, 400, dense.client.chat.completions.create, model=NAME,
                  messages=[{"role": "robot", "content": "hi"}])
    assert err["param"] == "messages.0.role"
    r = httpx.post(dense.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_client_that_goes_away_frees_its_slot(dense):
    cancelled = dense.metric('svdsparse_requests_total{outcome="cancelled"}')
    body = {"model": NAME, "prompt": "import sys\n", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", dense.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert dense.metric("svdsparse_slots_occupied") == 1
    dense.wait_for("svdsparse_slots_occupied", lambda v: v == 0)
    dense.wait_for('svdsparse_requests_total{outcome="cancelled"}', lambda v: v == cancelled + 1)
    with pytest.raises(httpx.TimeoutException):  # a whole answer, given up while it is produced (~1 s)
        httpx.post(dense.url + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
    dense.wait_for('svdsparse_requests_total{outcome="cancelled"}', lambda v: v == cancelled + 2)
    dense.wait_for("svdsparse_slots_occupied", lambda v: v == 0)


def test_a_full_queue_answers_429(dense):
    """SLOTS long streams run, QUEUE more wait: the next request is refused with 429, which the rest of the
    queue does not notice; closing the streams frees everything."""
    body = {"model": NAME, "prompt": "import os\n", "max_tokens": 500, "temperature": 0, "stream": True}
    client = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=SLOTS + QUEUE + 2))
    streams = [client.stream("POST", dense.url + "/v1/completions", json=body) for _ in range(SLOTS + QUEUE)]
    try:
        with concurrent.futures.ThreadPoolExecutor(QUEUE) as pool:
            # the slots first (the scheduler admits between decode chunks: a burst could fill the queue first)
            assert all(r.status_code == 200 for r in pool.map(lambda s: s.__enter__(), streams[:SLOTS]))
            dense.wait_for("svdsparse_slots_occupied", lambda v: v == SLOTS)
            assert all(r.status_code == 200 for r in pool.map(lambda s: s.__enter__(), streams[SLOTS:]))
        dense.wait_for("svdsparse_queue_depth", lambda v: v == QUEUE)
        with pytest.raises(openai.RateLimitError) as e:
            dense.client.completions.create(model=NAME, prompt="x", max_tokens=4)
        assert e.value.body["code"] == "queue_full"
        assert dense.metric("svdsparse_queue_depth") == QUEUE
    finally:
        for s in streams:
            s.__exit__(None, None, None)
        client.close()
    dense.wait_for("svdsparse_slots_occupied", lambda v: v == 0)
    dense.wait_for("svdsparse_queue_depth", lambda v: v == 0)
    assert dense.client.completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_sigterm_answers_every_accepted_request(sparse):
    """SIGTERM while every slot runs and requests wait: each of them is answered in full (streams too), then the
    process exits 0. Runs last: it ends the sparse server."""
    limit, count = 100, SLOTS + 4

    def ask(i):
        stream = i % 2 == 1
        got = sparse.client.completions.create(model=NAME, prompt=f"def f{i}(x):\n", max_tokens=limit,
                                               temperature=0, stream=stream,
                                               stream_options={"include_usage": True} if stream else None)
        chunks = list(got) if stream else [got]
        return chunks[-1].usage.completion_tokens, [c.finish_reason for ch in chunks for c in ch.choices][-1]

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(ask, i) for i in range(count)]
        sparse.wait_for("svdsparse_queue_depth", lambda v: v == count - SLOTS)  # all accepted
        sparse.proc.send_signal(signal.SIGTERM)
        assert [f.result() for f in futures] == [(limit, "length")] * count
    assert sparse.proc.wait(timeout=60) == 0
    assert "stopped by SIGTERM, every accepted request answered" in sparse.log.read_text()


def test_decode_slots_through_the_kernels_equal_generate_alone(lm):
    """The slot programs with the Pallas kernels (interpret mode: compaction, the guarded FFN over the union of
    the live rows) and predictors whose candidates differ by sequence: two sequences in slots 0 and 2 (slot 1
    free, inside the bucket, draws nothing), each equal to its sparse `Generator` output alone (XLA's masked
    FFN)."""
    from svdsparse_jax.generate import seed_key
    from svdsparse_jax.predictors import LowRankPredictor
    from svdsparse_jax.serving.slots import SlotConfig, SlotDecoder, Start

    cfg = lm.cfg
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((8, cfg.d_model), (cfg.d_ff, 8)))
    preds = [LowRankPredictor(a, b, jnp.zeros(cfg.d_ff))] * cfg.n_layers
    ref = Generator(Transformer(cfg, lm.weights, EngineConfig.resolve("xla", ffn_policy="sparse")), preds)
    decoder = SlotDecoder(Transformer(cfg, lm.weights, EngineConfig.resolve("interpret", ffn_policy="sparse")),
                          SlotConfig(4, cfg.max_seq_len, 4), preds)
    prompts = {0: [5, 6, 7, 8], 2: [100, 200, 300]}
    first, _ = decoder.admit([Start(s, p, 9, seed_key(0), Sampler()) for s, p in prompts.items()])  # one prefill
    got = {s: [int(t)] for s, t in zip(prompts, first.token)}
    live = np.array([True, False, True, False])
    for _ in range(2):
        out = jax.tree.map(np.asarray, decoder.decode(live, 40, True))
        assert (out.token[1] == -1).all()
        for s in prompts:
            got[s] += [int(t) for t in out.token[s] if t >= 0]
    assert decoder.sparse_layers(2) == (True,) * cfg.n_layers
    for s, p in prompts.items():
        assert got[s] == ref.generate([p], 9).tokens[0]


def test_window_reads_decode_what_copies_decode(lm):
    """`SlotConfig.window_reads` (decode in the whole caches, attention reading only the context bucket) draws
    the tokens of `Generator` for each prompt alone, as the copying chunks do, through context buckets smaller
    than the cache (and one step that moves to a larger bucket), and leaves the caches as they leave them."""
    from svdsparse_jax.generate import seed_key
    from svdsparse_jax.serving.slots import SlotConfig, SlotDecoder, Start

    cfg = lm.cfg
    ref = Generator(Transformer(cfg, lm.weights, EngineConfig.resolve("xla")))
    prompts = {0: list(range(40, 60)), 1: [7, 8, 9]}
    runs = {}
    for window in (False, True):
        sc = SlotConfig(2, cfg.max_seq_len, 4, context_buckets=6, window_reads=window)
        assert sc.context_bucket(21) < cfg.max_seq_len  # the chunks below read less than the cache
        decoder = SlotDecoder(Transformer(cfg, lm.weights, EngineConfig.resolve("xla")), sc)
        got = {s: [int(decoder.admit([Start(s, p, 14, seed_key(0), Sampler())])[0].token[0])]  # one at a time
               for s, p in prompts.items()}
        for needed in (24, 28, 140):  # the last reads a larger bucket than the first two
            assert sc.context_bucket(needed) == (128 if needed < 128 else 256)
            out = jax.tree.map(np.asarray, decoder.decode(np.array([True, True]), needed, True))
            for s in prompts:
                got[s] += [int(t) for t in out.token[s] if t >= 0]
        runs[window] = got, [np.asarray(a[:, :, :40]) for a in decoder.slots.k]
    for s, p in prompts.items():
        assert runs[True][0][s] == runs[False][0][s] == ref.generate([p], 13).tokens[0]
    for a, b in zip(runs[True][1], runs[False][1]):
        np.testing.assert_array_equal(a, b)


def test_admit_starts_many_prompts_in_one_prefill(lm):
    """Three prompts of different lengths admitted in one call (4 rows: one padding row) into slots 3, 0 and 5
    leave each slot as admitting it alone does (its cache rows over its prompt, length, first token, step,
    max_new and sampler), write nothing into the other slots, and decode to `Generator`'s tokens for each prompt
    alone, greedy and sampled. Arrivals are grouped when they are half the slots or more and fit admit_tokens,
    in the power-of-two rows that hold them."""
    from svdsparse_jax.generate import seed_key
    from svdsparse_jax.serving.slots import SlotConfig, SlotDecoder, Start

    cfg = lm.cfg
    sc = SlotConfig(6, cfg.max_seq_len, 4)
    model = Transformer(cfg, lm.weights, EngineConfig.resolve("xla"))
    prompts = {3: [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29], 0: [7, 8, 9],
               5: list(range(300, 340))}
    samplers = {3: Sampler(), 0: Sampler(temperature=0.8, top_k=20), 5: Sampler(temperature=1.2, top_p=0.9)}
    starts = [Start(s, p, 12, seed_key(s + 1), samplers[s]) for s, p in prompts.items()]
    together = SlotDecoder(model, sc)
    first, logits = together.admit(starts)
    assert logits.shape == (4, cfg.vocab_size) and together.compiles["admit"] == 1
    assert [sc.admit_rows(n) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert sc.admit_groups([19, 3, 40]) == [[0, 1, 2]] and sc.admit_groups([19, 3]) == [[0], [1]]
    assert SlotConfig(6, cfg.max_seq_len, admit_tokens=256).admit_groups([19, 3, 40]) == [[0, 1, 2]]  # 4 x 64
    assert SlotConfig(6, cfg.max_seq_len, admit_tokens=255).admit_groups([19, 3, 40]) == [[0], [1], [2]]
    assert SlotConfig(6, cfg.max_seq_len, admit_together=2).admit_groups([19, 3]) == [[0, 1]]
    assert SlotConfig(6, cfg.max_seq_len, admit_together=4).admit_groups([19, 3, 40]) == [[0], [1], [2]]
    assert SlotConfig(6, cfg.max_seq_len, admit_together=2).admit_groups([19]) == [[0]]
    alone = SlotDecoder(model, sc)
    for i, start in enumerate(starts):
        one, one_logits = alone.admit([start])
        assert int(one.token[0]) == int(first.token[i])
        np.testing.assert_allclose(np.asarray(one_logits[0]), np.asarray(logits[i]), rtol=1e-5, atol=1e-5)
    a, b = together.slots, alone.slots
    for field in ("length", "token", "step", "max_new"):
        np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)))
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(a.key))[[3, 0, 5]],
                                  np.asarray(jax.random.key_data(b.key))[[3, 0, 5]])
    for f in ("temperature", "top_k", "top_p"):
        np.testing.assert_array_equal(np.asarray(getattr(a.sampler, f)), np.asarray(getattr(b.sampler, f)))
    for ka, kb in zip(a.k + a.v, b.k + b.v):
        ka, kb = np.asarray(ka), np.asarray(kb)
        for s, p in prompts.items():
            np.testing.assert_allclose(ka[s, :, :len(p)], kb[s, :, :len(p)], rtol=1e-5, atol=1e-5)
        assert not ka[[1, 2, 4]].any()  # the free slots, the padding row's among them, hold nothing
    got = {s: [int(t)] for s, t in zip(prompts, first.token)}
    live = np.isin(np.arange(6), list(prompts))
    for needed in (28, 36, 48):
        out = jax.tree.map(np.asarray, together.decode(live, needed + 20, False))
        for s in prompts:
            got[s] += [int(t) for t in out.token[s] if t >= 0]
    ref = Generator(model)
    for s, p in prompts.items():
        assert got[s] == ref.generate([p], 12, sampler=samplers[s], seed=s + 1).tokens[0], s


def test_an_admission_wait_gathers_arrivals_at_an_idle_device(lm, reference):
    """Two requests 0.3 s apart at an idle scheduler of 2 slots: with an admission wait (30 s) they are
    prefilled in one call as soon as the second fills the slots, long before the wait ends, and decode as each
    alone would; without one, in two calls. A lone request (the wait now 1 s) waits the whole wait, then runs."""
    import threading

    from svdsparse_jax.serving.metrics import Metrics
    from svdsparse_jax.serving.scheduler import Params, Piece, Request, Scheduler
    from svdsparse_jax.serving.slots import SlotConfig, SlotDecoder

    model = Transformer(lm.cfg, lm.weights, EngineConfig.resolve("xla"))
    prompts = [ids_of(lm, "def add(a, b):"), ids_of(lm, "import os\n"), ids_of(lm, "class Point:")]
    want = [greedy_alone(reference, p, 6)[0] for p in prompts]
    for wait in (0.0, 30.0):
        metrics = Metrics(2)
        sched = Scheduler(SlotDecoder(model, SlotConfig(2, lm.cfg.max_seq_len, 4)), lm.tokenizer.decode,
                          tuple(lm.cfg.eos_ids), 8, metrics, admit_wait_s=wait)
        sched.start()
        tokens, first, done = [[] for _ in prompts], [0.0] * 3, [threading.Event() for _ in prompts]

        def submit(i: int) -> float:
            def emit(ev) -> None:
                if isinstance(ev, Piece):
                    first[i] = first[i] or time.perf_counter()
                    tokens[i].extend(ev.tokens)
                else:
                    done[i].set()
            request = Request(prompts[i], Params(max_tokens=6, temperature=0), emit)
            sched.submit(request)
            return request.arrived

        arrived = submit(0)
        time.sleep(0.3)
        submit(1)
        assert done[0].wait(120) and done[1].wait(120)
        assert tokens[:2] == want[:2]
        calls = metrics.registry.get_sample_value("svdsparse_admit_prompts_count")
        assert calls == (2 if wait == 0 else 1), wait
        if wait:
            assert first[0] - arrived < wait / 2  # admitted when the pair filled the slots, not at the wait's end
            sched.admit_wait_s = 1.0
            arrived = submit(2)
            assert done[2].wait(120) and tokens[2] == want[2]
            assert first[2] - arrived >= 1.0
        sched.close(60)
