"""`svdsparse demo`: the whole pipeline on the bundled model, offline: build whitened-SVD predictors, evaluate
dense vs sparse on held-out text, generate a sample both ways and time decoding."""

from __future__ import annotations

import argparse
import sys

from svdsparse_jax.assets import corpus_split
from svdsparse_jax.cli import build_predictors as build_command
from svdsparse_jax.cli.arguments import common_options
from svdsparse_jax.cli.eval import EVAL_WINDOWS
from svdsparse_jax.fsutil import check_new_output


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the bundled model, offline")
    p.add_argument("--out", help="keep the predictors here (default: a temporary directory)")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"],
                   help="weight dtype (the bundled model was trained in float32)")
    common_options(p)


def _stage(i: int, n: int, what: str) -> None:
    print(f"svdsparse demo [{i}/{n}]: {what}", file=sys.stderr, flush=True)


def _decode_speed(gen, ids: list[int], n: int) -> tuple[list[int], float]:
    """Greedy tokens of one prompt and the decode speed in tokens/s, timed on a second run (compiled)."""
    first = gen.generate([ids], n)
    again = gen.generate([ids], n)
    return first.tokens[0], len(again.tokens[0]) / again.run_s


def run(args: argparse.Namespace) -> None:
    """Build whitened-SVD predictors for the bundled model on its calibration split, evaluate dense vs sparse
    on held-out text, and generate a sample both ways, timing each."""
    import time

    import jax

    from svdsparse_jax import session
    from svdsparse_jax.cli.tables import demo_table
    from svdsparse_jax.evaluate import evaluate_predictors, windowing

    if args.out:
        check_new_output(args.out, "--out")  # before the build
    t0 = time.perf_counter()
    _stage(1, 4, "loading the bundled model")
    # every layer sparse: the demo shows the predictors' effect, where the measured policy would run a model
    # this small dense (its FFN costs less than the sparse path's fixed launches)
    lm = session.load(dtype=args.dtype, kernels="auto", ffn_policy="sparse")
    bc = build_command.demo_build_config(lm.cfg)
    _stage(2, 4, f"building whitened-SVD predictors (rank {bc.ranks}) from {bc.tokens:,} calibration tokens")
    t1 = time.perf_counter()
    lm = lm.build_predictors(corpus_split("calib"), bc, out=args.out)
    pset = lm.predictors
    t_build = time.perf_counter() - t1
    _stage(3, 4, f"evaluating dense and sparse on held-out text ({EVAL_WINDOWS} windows of 512 tokens)")
    heldout = corpus_split("heldout")
    report = evaluate_predictors(lm.model, {"whitened": pset}, heldout, 512, max_windows=EVAL_WINDOWS,
                                 auroc_tokens=2048, progress=True)["whitened"]
    s = report["summary"]
    _stage(4, 4, "generating a sample dense and sparse, timing decode")
    prompt, n_new = "def read_config(path):\n", 48
    ids = lm.encode(prompt)
    dense, dense_tps = _decode_speed(lm.generator(dense=True), ids, n_new)
    sparse, sparse_tps = _decode_speed(lm.generator(), ids, n_new)
    same = next((i for i, (a, b) in enumerate(zip(dense, sparse)) if a != b), min(len(dense), len(sparse)))

    print(f"svdsparse demo: the bundled model ({lm.cfg.n_layers} layers, d_model {lm.cfg.d_model}, d_ff "
          f"{lm.cfg.d_ff}, {lm.cfg.activation}, {args.dtype}); whitened-SVD predictors of rank {bc.ranks}, "
          f"calibrated to {bc.rule} {bc.value}, built in {t_build:.1f} s"
          + (f", saved in {args.out}" if args.out else " (--out DIR keeps them)"))
    print(f"held-out text: {windowing(s)}\n")
    print(demo_table(s, dense_tps, sparse_tps, jax.devices()[0].platform.upper(), n_new))
    print(f"\nprompt: {prompt!r}")
    print(f"dense : {lm.decode(dense)!r}")
    print(f"sparse: {lm.decode(sparse)!r}")
    print(f"(greedy; the two agree on the first {same} of {len(dense)} tokens; total {time.perf_counter() - t0:.0f} s)")
