"""Bytes a decode step must read, dense and sparse, and what that says about a `scripts.bench.decode` run.

A decode step of batch B reads every weight once (the embedding only B rows), the K and V cache slots of every
layer and, when sparse, of each layer's FFN only the W_gate rows of the candidate neurons and the W_up / W_down
rows of the active candidates, plus the predictor (A [r, d], B [d_ff, r], bias [d_ff]). The ratio of the dense to
the sparse bytes is the speedup the sparse step would reach at the dense step's bandwidth: the ceiling that
launch overheads and scattered row loads then eat into.

  python -m scripts.bench.bytes docs/bench/decode_llama2-7b.json

For each run of a decode report: GB per step, the bandwidth that implies and its fraction of the report's copy
rate; for sparse runs, the byte ceiling of the speedup, the bandwidth relative to the dense run, and the
fraction of dense-step efficiency a goal speedup needs (--goal). The rows read are those the decode benchmark
measured on the decoded tokens (`gate_rows_read`, `up_down_rows_read`; for a batch the union over its
sequences).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from svdsparse_jax.config import ModelConfig, named_config
from svdsparse_jax.weights import weight_specs

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


def analyse(report: dict, goal: float) -> list[str]:
    """Report lines for every run of a decode report."""
    copy = report.get("copy_tb_per_s")
    of_copy = (lambda rate: f" = {rate / (copy * 1e12):.3f} of copy") if copy else (lambda rate: "")
    lines, dense = [], {}
    for run in report["runs"]:
        cfg = named_config(run["shape"])
        itemsize = jnp.dtype(run["dtype"]).itemsize
        step_s = run["decode_step_ms"] / 1e3
        key = (run["shape"], run["gate_decay"], run["projections"], run["batch"], run["steps_per_check"])
        label = (f"{run['shape']} decay {run['gate_decay']} batch {run['batch']} projections {run['projections']}, "
                 f"stop checked every {run['steps_per_check']} steps")
        if not run["sparse"]:
            b = step_bytes(cfg, itemsize, run["batch"], run["slots"])
            dense[key] = (b, step_s)
            lines.append(f"{label}, dense: {b / 1e9:.4g} GB per step in {run['decode_step_ms']} ms, "
                         f"{b / step_s / 1e12:.3f} TB/s{of_copy(b / step_s)}")
            continue
        gate, up_down = np.asarray(run["gate_rows_read"], float), np.asarray(run["up_down_rows_read"], float)
        b = step_bytes(cfg, itemsize, run["batch"], run["slots"], gate, up_down, run["predictor_gb"] * 1e9)
        lines.append(f"{label}, sparse: W_gate rows {gate.mean():.3f}, W_up / W_down rows {up_down.mean():.3f}: "
                     f"{b / 1e9:.4g} GB per step in {run['decode_step_ms']} ms, {b / step_s / 1e12:.3f} TB/s"
                     f"{of_copy(b / step_s)}")
        if key in dense:
            db, ds = dense[key]
            ceiling = db / b
            lines.append(f"    byte ceiling {ceiling:.2f}x (measured {ds / step_s:.2f}x): the sparse step moves "
                         f"bytes at {(b / step_s) / (db / ds):.2f} of the dense step's rate; {goal}x needs "
                         f"{goal / ceiling:.2f}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="reports of scripts.bench.decode")
    ap.add_argument("--goal", type=float, default=2.1, help="a speedup to state the needed efficiency for")
    args = ap.parse_args()
    for path in args.json:
        report = json.loads(Path(path).read_text())
        print(f"{path} ({report['device']}, {report['date']}, commit {report['commit']}, torch copy "
              f"{report['copy_tb_per_s']} TB/s)")
        print("\n".join(analyse(report, args.goal)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
