#!/usr/bin/env python
"""Bytes a decode step must read, dense and sparse, and what that says about a bench_decode.py run.

A decode step of batch B reads every weight once (the embedding only B rows), the K and V cache slots of every
layer and, when sparse, of each layer's FFN only the W_gate rows of the candidate neurons and the W_up / W_down
rows of the active candidates, plus the predictor (A [r, d], B [d_ff, r], bias [d_ff]). The ratio of the dense to
the sparse bytes is the speedup the sparse step would reach at the dense step's bandwidth: the ceiling that
launch overheads and scattered row loads then eat into.

  python scripts/decode_bytes.py docs/bench/bench_decode_default.json

For each run of a bench_decode JSON: GB per step, the bandwidth that implies and its fraction of the JSON's copy
bandwidth; for sparse runs, the byte ceiling of the speedup, the bandwidth relative to the dense run, and the
fraction of dense-step efficiency a goal speedup needs (--goal). The rows read are those bench_decode measured on
the decoded tokens (`gate_rows_read`, `up_down_rows_read`; for a batch the union over its sequences) or, in
batch-1 JSONs without them, estimated from the calibration figures: candidates 1 - predicted sparsity, active
candidates recall x (1 - true sparsity).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from svdsparse_jax.config import ModelConfig, named_config  # noqa: E402
from svdsparse_jax.generate import bucket  # noqa: E402
from svdsparse_jax.weights import weight_specs  # noqa: E402

FFN_ROWS = {"w_gate": "gate", "w_up": "up_down", "w_down_t": "up_down"}


def step_bytes(cfg: ModelConfig, itemsize: int, batch: int, slots: int, gate_rows=None, up_down_rows=None,
               predictor_bytes: int = 0) -> int:
    """Bytes one decode step reads. gate_rows / up_down_rows: per-layer fractions [n_layers] of the W_gate and
    of the W_up / W_down_t rows read (None: dense); predictor_bytes: all layers' predictors together."""
    rows = {"gate": gate_rows, "up_down": up_down_rows}
    total = 0
    for spec in weight_specs(cfg):
        n = int(np.prod(spec.shape)) * itemsize
        if spec.path == ("embed",):  # a gather of the batch's token rows, plus the head when tied
            n = batch * cfg.d_model * itemsize + (n if cfg.tie_embeddings else 0)
        elif spec.path[-1] in FFN_ROWS and rows[FFN_ROWS[spec.path[-1]]] is not None:
            n *= float(rows[FFN_ROWS[spec.path[-1]]][spec.path[1]])
        total += n
    kv = 2 * cfg.n_layers * batch * cfg.n_kv_heads * slots * cfg.head_dim * itemsize
    return int(total + kv + predictor_bytes)


def low_rank_bytes(cfg: ModelConfig, rank: int, itemsize: int) -> int:
    """All layers' whitened-SVD predictors: A [r, d], B [d_ff, r] and the bias [d_ff], in the model's dtype."""
    return cfg.n_layers * (rank * cfg.d_model + cfg.d_ff * rank + cfg.d_ff) * itemsize


def rows_of(run: dict, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """Per-layer row fractions of a sparse run: measured in decode, or estimated from the calibration."""
    if "gate_rows_read" in run:
        return (np.asarray(run["gate_rows_read"], float), np.asarray(run["up_down_rows_read"], float),
                "measured on the decoded tokens")
    gate = np.full(cfg.n_layers, 1 - run["calib_predicted_sparsity"])
    up_down = np.full(cfg.n_layers, run["calib_recall"] * (1 - run["calib_true_sparsity"]))
    return gate, up_down, "estimated from the calibration"


def analyse(report: dict, goal: float) -> list[str]:
    """Report lines for every run of a bench_decode JSON."""
    copy_bw = report["copy_tb_per_s"] * 1e12
    lines, dense = [], {}
    for run in report["runs"]:
        cfg = named_config(run["shape"])
        itemsize = jnp.dtype(run["dtype"]).itemsize
        slots = run.get("slots") or bucket(run["prompt_len"]) + bucket(run["new_tokens"])  # older JSONs: no slots
        step_s = run["decode_step_ms"] / 1e3
        key = (run["shape"], run["gate_decay"], run["dense_gemv"], run["batch"], run.get("steps_per_check", 1))
        label = (f"{run['shape']} decay {run['gate_decay']} batch {run['batch']} "
                 f"{'pallas' if run['dense_gemv'] else 'xla'} GEMVs, stop checked every {key[-1]} steps")
        if not run["sparse"]:
            b = step_bytes(cfg, itemsize, run["batch"], slots)
            dense[key] = (b, step_s)
            lines.append(f"{label}, dense: {b / 1e9:.4g} GB per step in {run['decode_step_ms']} ms, "
                         f"{b / step_s / 1e12:.3f} TB/s = {b / step_s / copy_bw:.3f} of copy")
            continue
        if run["batch"] > 1 and "gate_rows_read" not in run:
            lines.append(f"{label}, sparse: not counted (a batch reads the union of its sequences' rows, which "
                         "this JSON does not give)")
            continue
        gate, up_down, how = rows_of(run, cfg)
        if "predictor_gb" in run:
            predictor_bytes = run["predictor_gb"] * 1e9
        else:  # older JSONs: from the rank in the predictor's name
            predictor_bytes = low_rank_bytes(cfg, int(re.search(r"\br(\d+)", run["predictor"]).group(1)), itemsize)
        b = step_bytes(cfg, itemsize, run["batch"], slots, gate, up_down, predictor_bytes)
        lines.append(f"{label}, sparse: W_gate rows {gate.mean():.3f}, W_up / W_down rows {up_down.mean():.3f} "
                     f"({how}): "
                     f"{b / 1e9:.4g} GB per step in {run['decode_step_ms']} ms, {b / step_s / 1e12:.3f} TB/s "
                     f"= {b / step_s / copy_bw:.3f} of copy")
        if key in dense:
            db, ds = dense[key]
            ceiling = db / b
            lines.append(f"    byte ceiling {ceiling:.2f}x (measured {ds / step_s:.2f}x): the sparse step moves "
                         f"bytes at {(b / step_s) / (db / ds):.2f} of the dense step's rate; {goal}x needs "
                         f"{goal / ceiling:.2f}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="bench_decode.py JSON files")
    ap.add_argument("--goal", type=float, default=2.1, help="a speedup to state the needed efficiency for")
    args = ap.parse_args()
    for path in args.json:
        report = json.loads(Path(path).read_text())
        print(f"{path} ({report['device']}, {report['date']}, copy {report['copy_tb_per_s']} TB/s)")
        print("\n".join(analyse(report, args.goal)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
