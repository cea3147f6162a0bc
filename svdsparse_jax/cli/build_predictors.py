"""`svdsparse build-predictors`: whitened-SVD predictors (or a baseline) built and calibrated on calibration
text, written as a predictor directory."""

from __future__ import annotations

import argparse

from svdsparse_jax.assets import corpus_split, is_bundled_model
from svdsparse_jax.cli.arguments import FRACTION, POSITIVE, ids, load_session, model_options, number
from svdsparse_jax.cli.tables import build_table
from svdsparse_jax.cli.textio import calibration_tokens, check_text_file, print_json
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import check_free_space, check_new_output
from svdsparse_jax.limits import check_count
from svdsparse_jax.predictors.build import METHODS, auto_ranks, rank_search_fits

# The default predictors (docs/RESULTS.md, "Off the calibration domain"): a recall target calibrated on 65,536
# tokens held both domains' top-1 agreement higher at more sparsity than the paper's s = 0.7 on 16,384 tokens.
DEFAULT_RULE, DEFAULT_VALUE, DEFAULT_TOKENS = "recall", 0.99, 65536
PAPER_S = 0.7  # the paper's setting: --s 0.7


def add_parser(sub) -> None:
    p = sub.add_parser("build-predictors", help="build and calibrate contextual-sparsity predictors")
    model_options(p)
    p.add_argument("--calib-text", nargs="+", metavar="FILE",
                   help="calibration text files (default for the bundled model: its calibration split)")
    p.add_argument("--out", required=True, help="predictor directory to write (must not exist)")
    p.add_argument("--method", default="whitened", choices=METHODS,
                   help="whitened SVD (the paper's), plain SVD, or a baseline: sign bits, a trained MLP, the exact "
                        "gate (oracle)")
    p.add_argument("--rank", type=rank_arg,
                   help="rank, one rank per layer (comma-separated), or 'auto': each layer keeps the one of d/16, d/8 "
                        "and d/4 whose predictor reads the fewest bytes per decoded token (recall and loss targets; "
                        "calibrates each layer 3 times); default d_model/4")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--s", type=FRACTION, help="the paper's rule: predicted sparsity = s x true sparsity (s - 0.1 "
                                                f"on layers 0-1); the paper uses {PAPER_S}")
    target.add_argument("--target-sparsity", type=number(float, 0.0, 1.0, hi_open=True),
                        help="absolute predicted sparsity per layer")
    target.add_argument("--target-recall", type=FRACTION,
                        help=f"minimum recall per layer (the default target: {DEFAULT_VALUE})")
    target.add_argument("--target-loss", type=FRACTION,
                        help="maximum importance loss per layer: the dropped neurons' share of sum (|h| ||W_down[:, "
                             "i]||)^2 on the calibration tokens")
    p.add_argument("--tokens", type=POSITIVE, default=DEFAULT_TOKENS,
                   help="calibration tokens at most (half build, half calibrate)")
    p.add_argument("--window", type=number(int, 2), default=512, help="calibration windows of this many tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object (docs/cli.md)")


def rank_arg(text: str) -> list[int] | str:
    """An argparse type: 'auto' or comma-separated ranks."""
    return "auto" if text.strip().lower() == "auto" else ids(text)


def demo_build_config(cfg):
    """The predictors `svdsparse demo` builds for the bundled model: build-predictors' defaults, whitened SVD of
    rank d/4 calibrated to recall 0.99 on 65,536 calibration tokens (a predictors.BuildConfig)."""
    from svdsparse_jax.predictors import BuildConfig
    return BuildConfig(method="whitened", ranks=cfg.d_model // 4, rule=DEFAULT_RULE, value=DEFAULT_VALUE,
                       tokens=DEFAULT_TOKENS)


def target_of(args: argparse.Namespace) -> tuple[str, float]:
    if args.target_sparsity is not None:
        return "sparsity", args.target_sparsity
    if args.target_recall is not None:
        return "recall", args.target_recall
    if args.target_loss is not None:
        return "loss", args.target_loss
    if args.s is not None:
        return "s", args.s
    return DEFAULT_RULE, DEFAULT_VALUE


def run(args: argparse.Namespace) -> None:
    from svdsparse_jax.predictors import BuildConfig
    from svdsparse_jax.predictors.build import calibration_bytes_per_token
    from svdsparse_jax.predictors.store import predictor_bytes

    check_new_output(args.out, "--out")  # before the build
    rule, value = target_of(args)
    if args.rank == "auto" and not rank_search_fits(args.method, rule):  # said before the model loads
        raise SvdsparseError(f"--rank auto: needs --method whitened or plain and a recall or loss target (got --method "
                             f"{args.method}, target {rule}): with a sparsity target every rank reads the same rows")
    for path in args.calib_text or ():
        check_text_file(path, "--calib-text")
    lm = load_session(args)
    check_count("--tokens", args.tokens, calibration_bytes_per_token(lm.cfg))
    if args.calib_text:
        calib = calibration_tokens(args.calib_text, lm, args.tokens)
    elif is_bundled_model(lm.path):
        calib = corpus_split("calib")
    else:
        raise SvdsparseError("--calib-text is required for a model other than the bundled one")
    search = auto_ranks(lm.cfg) if args.rank == "auto" else ()
    ranks = [max(1, lm.cfg.d_model // 4)] if args.rank in (None, "auto") else args.rank
    bc = BuildConfig(method=args.method, ranks=ranks[0] if len(ranks) == 1 else tuple(ranks), rule=rule,
                     value=value, tokens=args.tokens, window=args.window, rank_search=search)
    itemsize = lm.dtype.itemsize
    check_free_space(args.out, predictor_bytes(lm.cfg, bc.method, tuple(bc.rank_of(i, lm.cfg.n_layers) for i in
                                                                        range(lm.cfg.n_layers)), itemsize), "--out")
    pset = lm.build_predictors(calib, bc).predictors
    out = lm.save_predictors(args.out, pset)
    if args.json:
        print_json({"out": str(out), "config": pset.config, "timings": pset.timings, "layers": pset.info,
                    "union_rows": pset.union.to_json()})
        return
    print(build_table(pset.info, pset.config))
    print(f"saved {out}; seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in pset.timings.items()))
