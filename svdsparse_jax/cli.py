"""The `svdsparse` command: convert, generate, score.

Every command exits non-zero with a one-line error on bad input (add --debug for the traceback). With --json,
a command prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from svdsparse_jax.errors import SvdsparseError

BUNDLED_MODEL = Path(__file__).parent / "assets" / "default_model"


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def _model_options(p: argparse.ArgumentParser, optional_model: bool = True) -> None:
    if optional_model:
        p.add_argument("model", nargs="?", help="converted or Hugging Face model directory "
                                                "(default: the bundled model)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--dense-only", action="store_true",
                   help="allow activations without sparsity (silu); the model then runs dense only")
    p.add_argument("--activation", choices=["relu", "fatrelu", "drelu"],
                   help="override the config's hidden_act (e.g. drelu for TurboSparse / SparseQwen2)")
    p.add_argument("--act-threshold", type=float, help="override the FATReLU threshold (hidden_act_param)")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading .bin (pickle) checkpoints")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdsparse", description="SVD contextual-sparsity LLM decoding in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to this project's format")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    _model_options(p, optional_model=False)

    p = sub.add_parser("generate", help="generate text (one jitted program: prefill + decode loop)")
    _model_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", type=_ids, action="append", help="comma-separated token ids (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("score", help="per-token log-probabilities, NLL and perplexity of a text")
    _model_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file")
    src.add_argument("--prompt-ids", type=_ids)
    p.add_argument("--window", type=int, help="score in windows of this many tokens (default: the context)")
    p.add_argument("--json", action="store_true")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.dense_only:
        out["dense_only"] = True
    if args.activation:
        out["activation"] = args.activation
    if args.act_threshold is not None:
        out["act_threshold"] = args.act_threshold
    return out


def _load(args: argparse.Namespace):
    from svdsparse_jax.convert import load_model, parse_dtype

    path = args.model
    if path is None:
        if not (BUNDLED_MODEL / "config.json").is_file():
            raise SvdsparseError("no MODEL given and no bundled model is installed; pass a model directory")
        path = BUNDLED_MODEL
    return load_model(path, parse_dtype(args.dtype), allow_pickle=args.allow_pickle, **_overrides(args))


def cmd_convert(args: argparse.Namespace) -> None:
    from svdsparse_jax.convert import convert, parse_dtype

    if not Path(args.hf_dir).is_dir():
        raise SvdsparseError(f"{args.hf_dir}: not a directory")
    out = convert(args.hf_dir, args.out_dir, parse_dtype(args.dtype), allow_pickle=args.allow_pickle,
                  **_overrides(args))
    print(f"converted {args.hf_dir} -> {out}")


def cmd_generate(args: argparse.Namespace) -> None:
    from svdsparse_jax.generate import Generator, Sampler
    from svdsparse_jax.model import Transformer

    if args.greedy and args.temperature is not None:
        raise SvdsparseError("--greedy and --temperature exclude each other")
    if args.temperature is not None and args.temperature < 0:
        raise SvdsparseError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise SvdsparseError(f"--top-p must be in (0, 1], got {args.top_p}")
    lm = _load(args)
    tok = lm.tokenizer
    if args.prompt is not None:
        if tok is None:
            raise SvdsparseError(f"{lm.path}: the model has no tokenizer files; use --prompt-ids")
        prompts = [tok(p)["input_ids"] for p in args.prompt]
    else:
        prompts = args.prompt_ids
    sampler = Sampler(temperature=args.temperature or 0.0, top_k=args.top_k, top_p=args.top_p)
    result = Generator(Transformer(lm.cfg, lm.weights)).generate(prompts, args.max_new_tokens, sampler, args.seed)
    n_new = sum(len(t) for t in result.tokens)
    tps = n_new / result.run_s if result.run_s > 0 else float("nan")
    rows = [{"prompt_ids": list(p), "output_ids": out,
             "text": tok.decode(out, skip_special_tokens=True) if tok is not None else None}
            for p, out in zip(prompts, result.tokens)]
    if args.json:
        timing = {"tokens_per_s": tps, "compile_s": result.compile_s, "run_s": result.run_s}
        print(json.dumps({**rows[0], **timing} if len(rows) == 1 else {"results": rows, **timing}))
        return
    for row in rows:
        print(row["text"] if row["text"] is not None else ",".join(map(str, row["output_ids"])))
    print(f"[{n_new} tokens in {result.run_s:.3f} s: {tps:.1f} tokens/s; compile {result.compile_s:.1f} s]",
          file=sys.stderr)


def cmd_score(args: argparse.Namespace) -> None:
    from svdsparse_jax.evaluate import score_tokens
    from svdsparse_jax.model import Transformer

    text = None
    if args.text_file is not None:  # read before the (slow) model load, so a bad path fails at once
        try:
            text = Path(args.text_file).read_text()
        except OSError as e:
            raise SvdsparseError(f"{args.text_file}: cannot read ({e.strerror})") from None
    lm = _load(args)
    if text is not None:
        if lm.tokenizer is None:
            raise SvdsparseError(f"{lm.path}: the model has no tokenizer files; use --prompt-ids")
        ids = lm.tokenizer(text)["input_ids"]
    else:
        ids = args.prompt_ids
    r = score_tokens(Transformer(lm.cfg, lm.weights), ids, args.window)
    if args.json:
        print(json.dumps({"tokens": len(ids), "logprobs": r.logprobs, "nll": r.nll, "ppl": r.ppl}))
    else:
        print(f"tokens {len(ids)}  nll {r.nll:.4f}  ppl {r.ppl:.3f}")


COMMANDS = {"convert": cmd_convert, "generate": cmd_generate, "score": cmd_score}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except SvdsparseError as e:
        if args.debug:
            raise
        print(f"svdsparse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else still gets one line; --debug shows where it came from
        if args.debug:
            raise
        print(f"svdsparse {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
