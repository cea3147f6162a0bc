"""`svdsparse serve`: the command line of the server (its flags, loading the model and predictors, uvicorn).

SIGTERM (and the first Ctrl-C) drains: uvicorn stops accepting connections, lets every open request finish,
then the scheduler's thread ends and the command exits 0. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from pathlib import Path

from svdsparse_jax.errors import SvdsparseError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_parser(sub) -> None:
    """Adds the `serve` command to the `svdsparse` subparsers."""
    from svdsparse_jax.cli.arguments import POSITIVE, kernel_options, model_options, number

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching, dense or sparse")
    model_options(p)
    p.add_argument("--predictors", help="predictor directory: decode with the predictor-guarded FFN")
    kernel_options(p, policy="the live sequences' union of rows", processes=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=number(int, 0, 65535), default=8000, help="port to listen on (0: any free one)")
    p.add_argument("--max-batch", type=POSITIVE, default=8,
                   help="decode slots: sequences decoded together (a request of n choices takes n)")
    p.add_argument("--max-queue", type=number(int, 0), default=64,
                   help="requests that may wait for a slot; beyond them a request is answered 429")
    p.add_argument("--decode-chunk", type=POSITIVE, default=8,
                   help="decode steps per host round trip (streams receive tokens in groups of this many)")
    p.add_argument("--admit-together", type=number(int, 2), metavar="N",
                   help="the fewest waiting prompts prefilled together in one call (of the power-of-two rows that "
                        "hold them; default: half the slots; fewer are prefilled one call each)")
    p.add_argument("--admit-wait-ms", type=number(float, 0, 1000), default=10.0, metavar="MS",
                   help="while no sequence decodes, hold arriving requests up to this long after the first for more "
                        "to fill the free slots, so a burst is prefilled in one call (default 10; 0: admit at once)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="a Jinja chat template for /v1/chat/completions (default: the tokenizer's, if any)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the model directory's name)")
    p.add_argument("--warmup", action="store_true",
                   help="compile every program (prompt, slot and context buckets) before serving, instead of at "
                        "first use; /health answers 503 until done")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="uvicorn's and the scheduler's")


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (refused in one line if it cannot be)."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as e:
        raise SvdsparseError(f"--host {host} --port {port}: cannot listen ({e.strerror or e})") from None
    return sock


def run(args: argparse.Namespace) -> None:
    """Loads the model (and predictors), then serves until SIGTERM or Ctrl-C."""
    from svdsparse_jax.cli.arguments import load_session, require
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "serve", "svdsparse serve")
    import uvicorn

    from svdsparse_jax.generate import sequence_bytes
    from svdsparse_jax.limits import check_count
    from svdsparse_jax.serving.api import Service, create_app
    from svdsparse_jax.serving.metrics import Metrics
    from svdsparse_jax.serving.scheduler import Scheduler
    from svdsparse_jax.serving.slots import SlotConfig, SlotDecoder

    template = None
    if args.chat_template:
        try:
            template = Path(args.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SvdsparseError(f"--chat-template {args.chat_template}: cannot read ({e})") from None
    sock = _listen(args.host, args.port)  # before the (slow) load: a busy port fails at once
    lm = load_session(args, args.predictors)
    if lm.tokenizer is None:
        raise SvdsparseError(f"{lm.path}: the model has no tokenizer files, which serve needs")
    tok, cfg, pset = lm.tokenizer, lm.cfg, lm.predictors
    # every slot holds a KV cache of the model's whole context, and a prefill of up to that many tokens
    check_count("--max-batch", args.max_batch, sequence_bytes(cfg, cfg.max_seq_len, cfg.max_seq_len,
                                                              lm.dtype.itemsize))
    name = args.served_model_name or Path(lm.path).name
    sc = SlotConfig(slots=args.max_batch, context=cfg.max_seq_len, chunk=args.decode_chunk,
                    admit_together=args.admit_together)
    decoder = SlotDecoder(lm.model, sc, pset and pset.layers, pset and pset.union)
    logging.basicConfig(format="%(levelname)s:     %(message)s")
    logging.getLogger("svdsparse.serve").setLevel(args.log_level.upper())
    scheduler = Scheduler(decoder, lambda ids: tok.decode(ids, skip_special_tokens=True), tuple(cfg.eos_ids),
                          args.max_queue, Metrics(args.max_batch), warmup=args.warmup,
                          admit_wait_s=args.admit_wait_ms / 1e3)
    service = Service(scheduler, tok, name, cfg.max_seq_len, cfg.vocab_size, args.max_batch,
                      template if template is not None else getattr(tok, "chat_template", None))
    sparse = ("dense" if pset is None else
              "sparse layers by live sequences: " + ", ".join(f"{n}: {sum(decoder.sparse_layers(n))}/{cfg.n_layers}"
                                                              for n in sc.slot_buckets()))
    host, port = sock.getsockname()[:2]
    print(f"svdsparse serve: {name} on http://{host}:{port} ({args.max_batch} slots, {sparse})", file=sys.stderr,
          flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level=args.log_level, lifespan="on",
                                           timeout_graceful_shutdown=None))
    stopped: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn raises the signal again after its drain: note it
        signal.signal(sig, lambda signum, frame: stopped.append(signum))
    server.run(sockets=[sock])
    if stopped:
        print(f"svdsparse serve: stopped by {signal.Signals(stopped[0]).name}, every accepted request answered",
              file=sys.stderr, flush=True)
