"""`svdsparse score`: per-token log-probabilities, NLL and perplexity of a text (any length, in windows) or of
token ids."""

from __future__ import annotations

import argparse

import numpy as np

from svdsparse_jax.cli.arguments import ids, kernel_options, load_session, model_options, number
from svdsparse_jax.cli.textio import check_text_file, file_token_pieces, print_json


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="per-token log-probabilities, NLL and perplexity of a text")
    model_options(p)
    kernel_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", help="UTF-8 text to score (read in pieces: any length)")
    src.add_argument("--prompt-ids", type=ids, help="comma-separated token ids to score")
    p.add_argument("--window", type=number(int, 2), help="score in windows of this many tokens, overlapping by one "
                                                         "(default: the model's context)")
    p.add_argument("--json", action="store_true", help="print one JSON object (docs/cli.md)")


def run(args: argparse.Namespace) -> None:
    from svdsparse_jax.evaluate import score_stream

    if args.text_file is not None:  # checked before the (slow) model load, so a bad path fails at once
        check_text_file(args.text_file, "--text-file")
    lm = load_session(args)
    if args.text_file is not None:  # tokenized and scored piece by piece: memory bounded for any length
        pieces = file_token_pieces(args.text_file, lm, special=True)
    else:
        pieces = [np.asarray(args.prompt_ids)]
    r = score_stream(lm.model, pieces, args.window, keep_logprobs=args.json)
    window = min(args.window or lm.cfg.max_seq_len, lm.cfg.max_seq_len)
    if args.json:  # logprobs[j]: token j + 1 given those before it (the first token has no prediction)
        print_json({"tokens": r.tokens, "predicted": r.tokens - 1, "window": window, "logprobs": r.logprobs,
                    "nll": r.nll, "ppl": r.ppl})
    else:
        print(f"tokens {r.tokens} ({r.tokens - 1} predicted, in windows of {window} tokens overlapping by one)  "
              f"nll {r.nll:.4f}  ppl {r.ppl:.3f}")
