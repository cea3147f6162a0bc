"""The server's Prometheus metrics (GET /metrics), in a registry of their own (one per server, so several can
live in one process, as in tests).

  svdsparse_requests_total{outcome}             requests by outcome: finished, cancelled, rejected (429), error
  svdsparse_prompt_tokens_total                 prompt tokens prefilled
  svdsparse_generation_tokens_total             tokens drawn
  svdsparse_decode_steps_total                  decode steps run (chunks x steps per chunk)
  svdsparse_queue_depth                         requests waiting for a slot
  svdsparse_slots / svdsparse_slots_occupied    decode slots, and those holding a sequence
  svdsparse_batch_occupancy                     histogram: live sequences per decode chunk
  svdsparse_admit_prompts                       histogram: prompts per prefill call (`--admit-together`)
  svdsparse_time_to_first_token_seconds         histogram: arrival to first token, per request
  svdsparse_time_per_output_token_seconds       histogram: (last token - first token) / (tokens - 1), per choice
  svdsparse_e2e_request_latency_seconds         histogram: arrival to the last token, per finished request
  svdsparse_programs{kind}                      programs compiled so far: admit, fork, decode (a count that
                                                grows while serving means requests met new buckets)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)
TOKEN_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)


class Metrics:
    """The metrics above; `text()` renders them (Prometheus text format). max_batch bounds the occupancy
    histogram's buckets."""

    def __init__(self, max_batch: int):
        disable_created_metrics()  # no *_created series (process-wide: the server's process)
        self.registry = r = CollectorRegistry()
        self.requests = Counter("svdsparse_requests", "Requests by outcome", ["outcome"], registry=r)
        for outcome in ("finished", "cancelled", "rejected", "error"):
            self.requests.labels(outcome)
        self.prompt_tokens = Counter("svdsparse_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("svdsparse_generation_tokens", "Tokens drawn", registry=r)
        self.decode_steps = Counter("svdsparse_decode_steps", "Decode steps run", registry=r)
        self.queue = Gauge("svdsparse_queue_depth", "Requests waiting for a decode slot", registry=r)
        self.slots = Gauge("svdsparse_slots", "Decode slots", registry=r)
        self.occupied = Gauge("svdsparse_slots_occupied", "Decode slots holding a sequence", registry=r)
        self.occupancy = Histogram("svdsparse_batch_occupancy", "Live sequences per decode chunk",
                                   buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.admit_prompts = Histogram("svdsparse_admit_prompts", "Prompts per prefill call",
                                       buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.ttft = Histogram("svdsparse_time_to_first_token_seconds", "Arrival to first token, per request",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("svdsparse_time_per_output_token_seconds", "Time per output token after the first, "
                              "per choice", buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("svdsparse_e2e_request_latency_seconds", "Arrival to last token, per finished "
                             "request", buckets=LATENCY_BUCKETS, registry=r)
        self.programs = Gauge("svdsparse_programs", "Programs compiled so far", ["kind"], registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
