"""`svdsparse generate`: text (or token ids) from one or more prompts, greedy or sampled, dense or with
predictors, in one compiled program (prefill + decode loop); --stream and --stop watch it token by token."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from svdsparse_jax.cli.arguments import FRACTION, POSITIVE, SEED_LIMIT, ids, kernel_options, load_session, \
    model_options, number
from svdsparse_jax.cli.textio import print_json, read_text
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.limits import PROMPT_BYTES, read_bounded


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text (one jitted program: prefill + decode loop)")
    model_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="one prompt (quote it); repeat --prompt for a batch: --prompt A --prompt B")
    src.add_argument("--prompt-file", action="append", metavar="FILE",
                     help="a file whose whole text is one prompt, - for standard input (repeat for a batch)")
    src.add_argument("--prompt-ids", type=ids, action="append", help="comma-separated token ids (repeatable)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=64, help="new tokens per sample, at most")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default without sampling flags)")
    p.add_argument("--temperature", type=number(float, 0.0),
                   help="sample at this temperature (default: 1.0 when --top-k or --top-p is given, else greedy)")
    p.add_argument("--top-k", type=number(int, 0), default=0, help="sample from the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=FRACTION, default=1.0, help="sample from the smallest set holding this mass")
    p.add_argument("--repetition-penalty", type=number(float, 0.0, lo_open=True), default=1.0,
                   help="divide the logits (multiply where negative) of tokens already present by this "
                        "(transformers' rule; 1: off)")
    p.add_argument("--num-samples", type=POSITIVE, default=1, help="samples per prompt (needs sampling)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample once its text holds TEXT (cut before it; repeatable)")
    p.add_argument("--stream", action="store_true",
                   help="print the text as it is produced (one prompt and one sample; a host callback per token)")
    p.add_argument("--seed", type=number(int, 0, SEED_LIMIT, hi_open=True),
                   help="sampling seed, 0 to 2^64 - 1 (default: a random one, printed)")
    p.add_argument("--predictors", help="predictor directory: decode with the predictor-guarded FFN")
    kernel_options(p, policy="the batch's union of rows")
    p.add_argument("--json", action="store_true", help="print one JSON object (docs/cli.md)")


def sampler_from_args(args: argparse.Namespace):
    """The Sampler the flags ask for: --top-k / --top-p alone imply sampling at temperature 1.0."""
    from svdsparse_jax.generate import Sampler

    filters = args.top_k > 0 or args.top_p < 1
    if args.greedy and (args.temperature is not None or filters):
        raise SvdsparseError("--greedy excludes --temperature, --top-k and --top-p")
    temperature = args.temperature if args.temperature is not None else 1.0 if filters else 0.0
    if filters and temperature == 0:
        raise SvdsparseError("--temperature 0 is greedy decoding, which ignores --top-k / --top-p")
    sampler = Sampler(temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                      repetition_penalty=args.repetition_penalty)
    if args.num_samples > 1 and sampler.greedy:
        raise SvdsparseError(f"--num-samples {args.num_samples}: greedy samples are all the same; give "
                             "--temperature, --top-k or --top-p")
    return sampler


def prompt_texts(args: argparse.Namespace) -> list[str] | None:
    """The prompt texts of --prompt or --prompt-file (- reads standard input), checked; None for --prompt-ids."""
    if args.prompt_file:
        texts, names = [], []
        for path in args.prompt_file:
            if path == "-":
                data = read_bounded(sys.stdin.buffer, PROMPT_BYTES, "--prompt-file - (standard input)")
                try:
                    texts.append(data.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise SvdsparseError(f"--prompt-file - (standard input): not UTF-8 text (byte {e.start})") \
                        from None
            else:
                texts.append(read_text(path, limit=PROMPT_BYTES, what="--prompt-file"))
            names.append(f"--prompt-file {path}")
    elif args.prompt is not None:
        texts, names = [], []
        for i, p in enumerate(args.prompt):  # arguments that are not UTF-8 arrive with surrogate escapes
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as e:
                raise SvdsparseError(f"--prompt {i + 1}: not valid UTF-8 (byte {e.start})") from None
            texts.append(p)
            names.append(f"--prompt {i + 1}")
    else:
        return None
    for text, name in zip(texts, names):
        if not text.strip():
            raise SvdsparseError(f"{name}: empty or only whitespace")
    return texts


def run(args: argparse.Namespace) -> None:
    import secrets

    from svdsparse_jax.generate import Watcher

    sampler = sampler_from_args(args)
    if any(not stop for stop in args.stop):
        raise SvdsparseError("--stop '': stop strings must not be empty")
    texts = prompt_texts(args)
    n_prompts = len(texts) if texts is not None else len(args.prompt_ids)
    if args.stream and args.json:
        raise SvdsparseError("--stream prints the text as it comes and --json one object at the end: choose one")
    if args.stream and n_prompts * args.num_samples > 1:
        raise SvdsparseError(f"--stream prints one sample; got {n_prompts} prompts x --num-samples "
                             f"{args.num_samples}")
    if (args.stream or args.stop) and args.devices > 1:
        raise SvdsparseError("--stream and --stop run a host callback per token, not supported with --devices > 1")
    seed = args.seed if args.seed is not None else secrets.randbits(64)
    if args.model is not None and not Path(args.model).exists() and args.prompt:
        raise SvdsparseError(f"MODEL {args.model!r}: no such directory; if it is a second prompt, give it its own "
                             "--prompt (--prompt A --prompt B)")
    session = load_session(args, args.predictors)
    tok, pset = session.tokenizer, session.predictors
    if tok is None and (texts is not None or args.stop or args.stream):
        flag = "--prompt" if texts is not None else "--stop" if args.stop else "--stream"
        raise SvdsparseError(f"{session.path}: the model has no tokenizer files, which {flag} needs; use "
                             "--prompt-ids")
    prompts = [tok(t)["input_ids"] for t in texts] if texts is not None else args.prompt_ids
    gen = session.generator()
    gen.check_batch_fits("--num-samples", args.num_samples, max(len(p) for p in prompts), args.max_new_tokens,
                         per_count=len(prompts))
    batch = [p for p in prompts for _ in range(args.num_samples)]  # the samples of a prompt, side by side
    watcher = None
    if args.stop or args.stream:
        stream = (lambda piece: print(piece, end="", flush=True)) if args.stream and not args.json else None
        watcher = Watcher(lambda ids: tok.decode(ids, skip_special_tokens=True), len(batch), args.stop, stream)
    result = gen.generate(batch, args.max_new_tokens, sampler, seed, watcher=watcher)

    def text(i: int) -> str | None:
        return watcher.text(i) if watcher is not None else \
            tok.decode(result.tokens[i], skip_special_tokens=True) if tok is not None else None

    samples = [{"output_ids": out, "text": text(i), "finish_reason": reason}
               for i, (out, reason) in enumerate(zip(result.tokens, result.finish_reasons))]
    n = args.num_samples
    results = [{"prompt": texts[j] if texts is not None else None, "prompt_ids": list(p),
                "samples": samples[j * n:(j + 1) * n]} for j, p in enumerate(prompts)]
    n_new = sum(len(t) for t in result.tokens)
    tps = n_new / result.run_s if result.run_s > 0 else float("nan")
    if args.json:
        print_json({"results": results, "seed": None if sampler.greedy else seed,
                    "sampler": {"temperature": sampler.temperature, "top_k": sampler.top_k, "top_p": sampler.top_p,
                                "repetition_penalty": sampler.repetition_penalty},
                    "new_tokens": n_new, "tokens_per_s": tps, "compile_s": result.compile_s, "run_s": result.run_s,
                    "sparse_layers": sum(result.sparse_layers)})
        return
    if args.stream:
        print()
    else:
        for r in results:
            for j, sample in enumerate(r["samples"]):
                if len(batch) > 1:
                    print(f"--- prompt {results.index(r) + 1}" + (f", sample {j + 1}" if n > 1 else ""))
                print(sample["text"] if sample["text"] is not None else ",".join(map(str, sample["output_ids"])))
    sparse = f"; {sum(result.sparse_layers)} of {len(result.sparse_layers)} layers sparse" if pset else ""
    if pset and not any(result.sparse_layers) and args.ffn_policy == "measured":
        sparse += " (the measured policy found dense faster for this model and batch; --ffn-policy sparse forces it)"
    how = "greedy" if sampler.greedy else f"sampled, seed {seed}"
    print(f"[{n_new} tokens in {result.run_s:.3f} s: {tps:.1f} tokens/s; compile {result.compile_s:.1f} s; "
          f"{how}{sparse}]", file=sys.stderr)
