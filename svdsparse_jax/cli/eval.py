"""`svdsparse eval`: predictors against the dense model on held-out text (perplexity, top-1 agreement, recall,
rows read; per decode batch size with --batch-sizes), as tables, JSON or plots."""

from __future__ import annotations

import argparse

from svdsparse_jax.assets import corpus_split, is_bundled_model
from svdsparse_jax.cli.arguments import POSITIVE, batch_sizes, kernel_options, load_session, model_options, number, \
    require
from svdsparse_jax.cli.tables import batch_table, layer_table, summary_table
from svdsparse_jax.cli.textio import check_text_file, file_tokens, print_json
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.limits import check_count

EVAL_WINDOWS = 64  # eval's and the demo's windows of held-out text: one perplexity per model and text


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate predictors against the dense model")
    model_options(p)
    kernel_options(p, policy="the batch's union of rows")
    p.add_argument("--predictors", required=True, help="predictor directory (build-predictors)")
    p.add_argument("--batch-sizes", type=batch_sizes, default=[], metavar="B,B,...",
                   help="also report, per decode batch size, the union of the batch's rows and the accuracy of "
                        "the layers the policy runs sparse at that size (e.g. 1,2,4,8,16)")
    p.add_argument("--text-file", help="held-out text (default for the bundled model: its held-out split)")
    p.add_argument("--window", type=number(int, 2), default=512, help="evaluation windows of this many tokens")
    p.add_argument("--max-windows", type=POSITIVE, default=EVAL_WINDOWS,
                   help="evaluate at most this many windows: the first ones of --text-file (read no further), "
                        "spread evenly over the bundled model's held-out split")
    p.add_argument("--plots", help="directory for PNG plots (needs the plots extra: matplotlib)")
    p.add_argument("--json", action="store_true", help="print one JSON object (docs/cli.md)")


def run(args: argparse.Namespace) -> None:
    from svdsparse_jax.evaluate import check_plot_dir, evaluate_predictors, evaluation_bytes_per_token, write_plots

    if args.plots:
        require("matplotlib", "plots", "--plots")
        check_plot_dir(args.plots)
    if args.text_file:  # checked before the (slow) model load, so a bad path fails at once
        check_text_file(args.text_file, "--text-file")
    lm = load_session(args, args.predictors)
    pset = lm.predictors
    window = min(args.window, lm.cfg.max_seq_len)
    check_count("--max-windows", args.max_windows, window * evaluation_bytes_per_token(lm.cfg))
    if args.text_file:  # as many tokens as the windows read, tokenized piece by piece
        tokens = file_tokens(args.text_file, lm, args.max_windows * args.window + 1)
    elif is_bundled_model(lm.path):
        tokens = corpus_split("heldout")
    else:
        raise SvdsparseError("--text-file is required for a model other than the bundled one")
    report = evaluate_predictors(lm.model, {pset.method: pset}, tokens,
                                 args.window, args.max_windows, batch_sizes=args.batch_sizes,
                                 progress=True)[pset.method]
    if args.plots:
        target = {pset.method: (pset.config["rule"], pset.config["value"])} if "rule" in pset.config else None
        report["plots"] = write_plots({pset.method: report}, args.plots, target)
    if args.json:
        print_json(report)
        return
    print(layer_table(report["layers"], report["summary"]))
    print()
    print(summary_table(pset.method, report["summary"]))
    if report.get("batches"):
        print()
        print(batch_table(report["batches"]))
