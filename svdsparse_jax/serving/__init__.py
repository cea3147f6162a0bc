"""`svdsparse serve`: an OpenAI-compatible HTTP server with continuous batching, dense or sparse.

  slots.py      the device half: decode slots as a pytree, the admit / fork / decode-chunk programs, and
                `SlotDecoder`, which compiles them per bucket and holds the slots' state
  scheduler.py  the host half: the bounded queue, admission into free slots, cancellation, draining, and the
                thread that drives the decoder
  text.py       one choice's text: incremental detokenization and stop strings
  protocol.py   the OpenAI request bodies (strict pydantic models) and the error body
  api.py        the FastAPI application: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics
  metrics.py    the Prometheus metrics
  command.py    the `serve` command: flags, loading, uvicorn, SIGTERM
"""
