"""The OpenAI-compatible HTTP API (FastAPI, served by uvicorn) over a `Scheduler`.

  POST /v1/completions        prompt(s) as text or token ids; n, stop, seed, logprobs, stream (SSE), usage
  POST /v1/chat/completions   messages through the tokenizer's chat template (or --chat-template); 400 where the
                              model has none
  GET  /v1/models             the one model served
  GET  /health                200 once the server is ready, 503 while it warms up or drains
  GET  /metrics               Prometheus text (`metrics.Metrics`)

Each prompt of a request becomes one scheduler `Request` of n choices (choice index = prompt * n + choice).
Errors answer with OpenAI's body, {"error": {"message", "type", "param", "code"}}: 400 for a bad or unknown
field (naming it), a prompt longer than the model's positions, chat without a template; 404 for another model
name; 429 when the queue is full. A client that goes away (mid-stream, or while waiting for a whole answer)
cancels its requests, which frees their slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from svdsparse_jax.serving.protocol import ApiError, ChatRequest, CompletionRequest, Sampling, validation_error
from svdsparse_jax.serving.scheduler import Finished, Params, Piece, QueueFull, Request, Scheduler, TokenLogprob


@dataclasses.dataclass
class Service:
    """What the API serves: the scheduler, the tokenizer, the model's name, positions (context) and vocabulary,
    the most choices per request (max_batch: the slots) and the chat template (None: chat is refused)."""

    scheduler: Scheduler
    tokenizer: Any
    model_name: str
    context: int
    vocab: int
    max_batch: int
    chat_template: str | None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def metrics(self):
        return self.scheduler.metrics

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])


class Job:
    """The scheduler requests of one HTTP request, and their events as an async stream."""

    def __init__(self, service: Service, prompts: list[list[int]], params: Params):
        loop = asyncio.get_running_loop()
        self.scheduler, self.params = service.scheduler, params
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests = [Request(ids, params, emit=lambda ev, k=k: loop.call_soon_threadsafe(
            self.queue.put_nowait, (k, ev))) for k, ids in enumerate(prompts)]
        self.finished: dict[int, Finished] = {}
        for i, r in enumerate(self.requests):
            try:
                self.scheduler.submit(r)
            except QueueFull as e:
                for other in self.requests[:i]:
                    self.scheduler.cancel(other)
                raise ApiError(429, f"the server is busy: {e}; retry later", None, "queue_full",
                               "rate_limit_error") from None
            except RuntimeError as e:
                raise ApiError(503, str(e), None, "shutting_down", "server_error") from None

    async def events(self) -> AsyncIterator[tuple[int, Piece]]:
        """(prompt index, piece) until every request has finished; raises ApiError(500) on a failed request."""
        while len(self.finished) < len(self.requests):
            k, ev = await self.queue.get()
            if isinstance(ev, Finished):
                self.finished[k] = ev
                if ev.error:
                    self.cancel()
                    raise ApiError(500, f"generation failed: {ev.error}", None, "internal_error", "server_error")
            else:
                yield k, ev

    def cancel(self) -> None:
        """Cancels the requests that have not finished (the client went away)."""
        for k, r in enumerate(self.requests):
            if k not in self.finished:
                self.scheduler.cancel(r)

    @property
    def usage(self) -> dict:
        prompt = sum(f.prompt_tokens for f in self.finished.values())
        completion = sum(f.completion_tokens for f in self.finished.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _disconnected(request: HttpRequest) -> None:
    """Returns once the client has gone away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _params(req: Sampling, max_tokens: int, logprobs: int | None) -> Params:
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    return Params(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                  top_p=1.0 if req.top_p is None else req.top_p, top_k=top_k, seed=req.seed, stop=req.stops,
                  n=req.n, logprobs=logprobs)


def _check_common(service: Service, req: Sampling) -> None:
    if req.model != service.model_name:
        raise ApiError(404, f"the model `{req.model}` does not exist; this server serves `{service.model_name}`",
                       "model", "model_not_found")
    if req.n > service.max_batch:
        raise ApiError(400, f"n: {req.n} choices, but the server has {service.max_batch} decode slots "
                            "(--max-batch)", "n")


def _check_length(service: Service, ids: list[int], max_tokens: int | None, field: str) -> int:
    """The new-token limit for a prompt (max_tokens, or the rest of the positions when None), or a 400."""
    if not ids:
        raise ApiError(400, f"{field}: empty", field)
    bad = [t for t in ids if not 0 <= t < service.vocab]
    if bad:
        raise ApiError(400, f"{field}: token ids {bad[:5]} outside the vocabulary [0, {service.vocab})", field)
    if len(ids) >= service.context:
        raise ApiError(400, f"{field}: {len(ids)} tokens; the model's context is {service.context} tokens, which "
                            "must also hold at least one new token", field, "context_length_exceeded")
    if max_tokens is None:
        return service.context - len(ids)
    if len(ids) + max_tokens > service.context:
        raise ApiError(400, f"max_tokens: {len(ids)} prompt tokens + {max_tokens} new tokens exceed the model's "
                            f"context of {service.context} tokens", "max_tokens", "context_length_exceeded")
    return max_tokens


def _completion_logprobs(service: Service, lps: list[TokenLogprob]) -> dict:
    return {"tokens": [service.token_text(lp.token) for lp in lps],
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{service.token_text(t): v for t, v in lp.top} for lp in lps],
            "text_offset": [lp.offset for lp in lps]}


def _chat_logprobs(service: Service, lps: list[TokenLogprob]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = service.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps], "refusal": None}


def _event_stream(job, req, head: dict, choice: Callable[[int, Piece], dict | None]) -> StreamingResponse:
    """A streamed answer as server-sent events: a chunk (head + one choice) per piece that `choice` makes one of
    (None: nothing to send yet), the usage chunk when the request asks for it, then [DONE]; an error mid-way is
    sent as its OpenAI body, and the job is cancelled however the stream ends (a client that goes away too)."""
    async def stream():
        try:
            async for k, piece in job.events():
                c = choice(k, piece)
                if c is not None:
                    yield _sse({**head, "choices": [c]})
            if req.stream_options is not None and req.stream_options.include_usage:
                yield _sse({**head, "choices": [], "usage": job.usage})
            yield "data: [DONE]\n\n"
        except ApiError as e:
            yield _sse(e.body())
        finally:
            job.cancel()
    return StreamingResponse(stream(), media_type="text/event-stream")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(service: Service) -> FastAPI:
    """The FastAPI application; its lifespan starts the scheduler's thread and, at shutdown (after uvicorn has
    let the open requests finish), closes it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not service.scheduler.thread.is_alive():
            service.scheduler.start()
        yield
        await asyncio.to_thread(service.scheduler.close)

    app = FastAPI(title="svdsparse", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        if e.errors() and e.errors()[0]["type"] in ("json_invalid", "model_attributes_type", "dict_type"):
            err = ApiError(400, "the request body is not a JSON object")
        else:
            err = validation_error(e)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        err = ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", None, None,
                       "invalid_request_error")
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.get("/health")
    async def health():
        if service.scheduler.closing:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not service.scheduler.ready.is_set():
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                            "created": service.created, "owned_by": "svdsparse",
                                            "max_model_len": service.context}]}

    @app.post("/v1/completions")
    async def _completions(req: CompletionRequest, http: HttpRequest):
        return await completions(service, req, http)

    @app.post("/v1/chat/completions")
    async def _chat(req: ChatRequest, http: HttpRequest):
        return await chat_completions(service, req, http)

    return app


async def completions(service: Service, req: CompletionRequest, http: HttpRequest) -> Any:
    """POST /v1/completions: a JSON answer, or server-sent events with `stream`."""
    _check_common(service, req)
    tok = service.tokenizer
    prompts = [tok(p)["input_ids"] if isinstance(p, str) else p for p in req.prompts()]
    limits = [_check_length(service, ids, req.max_tokens, "prompt") for ids in prompts]
    if len(set(limits)) > 1:  # only when max_tokens is None (a null): each prompt's rest differs
        limits = [min(limits)] * len(limits)
    job = Job(service, prompts, _params(req, limits[0], req.logprobs))
    rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), req.n
    head = {"id": rid, "object": "text_completion", "created": created, "model": service.model_name}

    def lp(piece: Piece):
        return None if piece.logprobs is None else _completion_logprobs(service, piece.logprobs)

    if req.stream:
        def choice(k: int, piece: Piece) -> dict | None:
            if not (piece.text or piece.finish_reason or piece.logprobs):
                return None  # tokens whose text is held back (a possible stop string, a partial character)
            return {"index": k * n + piece.index, "text": piece.text, "logprobs": lp(piece),
                    "finish_reason": piece.finish_reason}
        return _event_stream(job, req, head, choice)

    choices = [{"index": i, "text": "", "logprobs": None if req.logprobs is None else
                {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []},
                "finish_reason": None} for i in range(len(prompts) * n)]

    async def collect():
        async for k, piece in job.events():
            c = choices[k * n + piece.index]
            c["text"] += piece.text
            c["finish_reason"] = piece.finish_reason or c["finish_reason"]
            if piece.logprobs is not None:
                for key, values in lp(piece).items():
                    c["logprobs"][key] += values
    await _until_done_or_gone(collect(), job, http)
    return {**head, "choices": choices, "usage": job.usage}


async def chat_completions(service: Service, req: ChatRequest, http: HttpRequest) -> Any:
    """POST /v1/chat/completions: the messages through the chat template; a JSON answer or events."""
    _check_common(service, req)
    if service.chat_template is None:
        raise ApiError(400, f"messages: the model `{service.model_name}` has no chat template (start the server "
                            "with --chat-template FILE), use /v1/completions", "messages", "no_chat_template")
    tok = service.tokenizer
    try:
        text = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages],
                                       chat_template=service.chat_template, add_generation_prompt=True,
                                       tokenize=False)
    except Exception as e:  # jinja raises many types (a template may also raise on purpose)
        raise ApiError(400, f"messages: the chat template refused them ({type(e).__name__}: {e})",
                       "messages") from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    limit = _check_length(service, ids, req.limit, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    job = Job(service, [ids], _params(req, limit, logprobs))
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "chat.completion", "created": created, "model": service.model_name}

    def lp(piece: Piece):
        return None if piece.logprobs is None else _chat_logprobs(service, piece.logprobs)

    if req.stream:
        started = set()

        def choice(_: int, piece: Piece) -> dict | None:
            if not (piece.text or piece.finish_reason or piece.logprobs or piece.index not in started):
                return None
            delta = {"content": piece.text}
            if piece.index not in started:
                started.add(piece.index)
                delta = {"role": "assistant", **delta}
            return {"index": piece.index, "delta": delta, "logprobs": lp(piece),
                    "finish_reason": piece.finish_reason}
        return _event_stream(job, req, {**head, "object": "chat.completion.chunk"}, choice)

    choices = [{"index": i, "message": {"role": "assistant", "content": ""},
                "logprobs": None if logprobs is None else {"content": [], "refusal": None},
                "finish_reason": None} for i in range(req.n)]

    async def collect():
        async for _, piece in job.events():
            c = choices[piece.index]
            c["message"]["content"] += piece.text
            c["finish_reason"] = piece.finish_reason or c["finish_reason"]
            if piece.logprobs is not None:
                c["logprobs"]["content"] += lp(piece)["content"]
    await _until_done_or_gone(collect(), job, http)
    return {**head, "choices": choices, "usage": job.usage}


async def _until_done_or_gone(work, job: Job, http: HttpRequest) -> None:
    """Runs `work` (consuming the job's events) unless the client goes away first: then cancels the job."""
    work, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
            job.cancel()
        gone.cancel()
    if work.done() and not work.cancelled():
        work.result()  # raises the job's ApiError, if any
