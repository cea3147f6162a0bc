"""The `svdsparse` command: convert, generate, score, build-predictors, eval, demo, serve, and the commands of installed
plug-ins (entry point group `svdsparse.commands`: `torch_npu_bridge` adds export-svdp and import-svdp).

Every command exits non-zero with a one-line error on bad input (add --debug for the traceback). With --json,
a command prints exactly one JSON object on stdout. The engine configuration (which kernels decode runs) is
resolved here, once, from --kernels or the environment (`engine.from_environment`).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import signal
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from svdsparse_jax import compile_cache
from svdsparse_jax.assets import BUNDLED_MODEL, corpus_split, is_bundled_model
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import check_free_space, check_new_output, exit_on_signal
from svdsparse_jax.limits import PROMPT_BYTES, check_count, read_bounded, regular_file

# The default predictors (docs/RESULTS.md, "Off the calibration domain"): a recall target calibrated on 65,536
# tokens held both domains' top-1 agreement higher at more sparsity than the paper's s = 0.7 on 16,384 tokens.
DEFAULT_RULE, DEFAULT_VALUE, DEFAULT_TOKENS = "recall", 0.99, 65536
PAPER_S = 0.7  # the paper's setting: --s 0.7
EVAL_WINDOWS = 64  # eval's and the demo's windows of held-out text: one perplexity per model and text
PLUGIN_GROUP = "svdsparse.commands"
Command = Callable[[argparse.Namespace], None]


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def _finite_json(obj: Any, bad: list[str], where: str = "") -> Any:
    """obj with every NaN or infinite float replaced by None (JSON has no such numbers); their places in `bad`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        bad.append(where or "value")
        return None
    if isinstance(obj, dict):
        return {k: _finite_json(v, bad, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v, bad, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def print_json(obj: Any) -> None:
    """Prints obj as one line of strict JSON: non-finite numbers become null, with a warning on stderr."""
    bad: list[str] = []
    text = json.dumps(_finite_json(obj, bad), allow_nan=False)
    if bad:
        print(f"warning: {len(bad)} non-finite values written as null ({', '.join(bad[:5])}"
              f"{', ...' if len(bad) > 5 else ''})", file=sys.stderr)
    print(text)


SEED_LIMIT = 2 ** 64


def number(kind: type = float, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: an int or a finite float within [lo, hi] (open ends where said); anything else is
    refused with the value and the range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        high_bad = hi is not None and (value >= hi if hi_open else value > hi)
        if not math.isfinite(value) or low_bad or high_bad:
            interval = (f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, "
                        f"{'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}")
            raise argparse.ArgumentTypeError(f"{text} is outside {interval}")
        return value
    return parse


POSITIVE = number(int, 1)
FRACTION = number(float, 0.0, 1.0, lo_open=True)  # (0, 1]


def model_options(p: argparse.ArgumentParser, optional_model: bool = True) -> None:
    """The options of every command that loads a model (plug-ins use them too)."""
    if optional_model:
        p.add_argument("model", nargs="?", help="converted or Hugging Face model directory "
                                                "(default: the bundled model)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="weight dtype (products accumulate in float32)")
    p.add_argument("--dense-only", action="store_true",
                   help="allow activations without sparsity (silu); the model then runs dense only")
    p.add_argument("--activation", choices=["relu", "fatrelu", "drelu"],
                   help="override the config's hidden_act (e.g. drelu for TurboSparse / SparseQwen2)")
    p.add_argument("--act-threshold", type=number(), help="override the FATReLU threshold (hidden_act_param)")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading .bin (pickle) checkpoints")
    _common_options(p)


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-cache", metavar="DIR|off",
                   help="keep compiled programs here for the next run, or off (default: SVDSPARSE_COMPILE_CACHE, "
                        "else ~/.cache/svdsparse-jax/xla)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _kernel_option(p: argparse.ArgumentParser, policy: bool = False) -> None:
    p.add_argument("--kernels", choices=["auto", "pallas", "interpret", "xla"],
                   help="Pallas kernels or XLA for decode-sized products, norms and the guarded FFN (default: "
                        "SVDSPARSE_KERNELS, else auto = the kernels on a GPU, XLA elsewhere)")
    p.add_argument("--devices", type=POSITIVE, default=1,
                   help="tensor-parallel over this many devices (heads, FFN neurons and vocabulary split; the "
                        "guarded FFN's kernels per device, XLA's SPMD partitioning for the rest); with several "
                        "processes, devices of all of them")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="run as one of several processes (hosts) of one program: process 0's address (default: "
                        "JAX_COORDINATOR_ADDRESS); with --num-processes and --process-id")
    p.add_argument("--num-processes", type=POSITIVE, help="processes in all (default: JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=number(int, 0), help="this process's index, 0 to N-1 (default: JAX_PROCESS_ID)")
    if policy:
        p.add_argument("--ffn-policy", choices=["measured", "sparse", "dense"], default="measured",
                       help="which layers of a decode batch run sparse: where measured costs say it beats dense "
                            "at the batch's union of rows (measured, the default), every layer, or none")


def _batch_sizes(text: str) -> list[int]:
    sizes = _ids(text)
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes >= 1, got {text!r}")
    return sizes


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds a flag's default to its help where the default is a value (not None, off or empty) and the help
    does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(plugins: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    """The argument parser; the commands of installed plug-ins are added to it and their handlers to
    `plugins`."""
    from svdsparse_jax import __version__

    parser = argparse.ArgumentParser(prog="svdsparse", description="SVD contextual-sparsity LLM decoding in JAX")
    parser.add_argument("--version", action="version", version=f"svdsparse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to this project's format")
    p.add_argument("hf_dir", help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    p.add_argument("out_dir", help="directory to write (must not exist)")
    model_options(p, optional_model=False)

    p = sub.add_parser("generate", help="generate text (one jitted program: prefill + decode loop)")
    model_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="one prompt (quote it); repeat --prompt for a batch: --prompt A --prompt B")
    src.add_argument("--prompt-file", action="append", metavar="FILE",
                     help="a file whose whole text is one prompt, - for standard input (repeat for a batch)")
    src.add_argument("--prompt-ids", type=_ids, action="append", help="comma-separated token ids (repeatable)")
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
    _kernel_option(p, policy=True)
    p.add_argument("--json", action="store_true", help="print one JSON object (docs/cli.md)")

    p = sub.add_parser("score", help="per-token log-probabilities, NLL and perplexity of a text")
    model_options(p)
    _kernel_option(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", help="UTF-8 text to score (read in pieces: any length)")
    src.add_argument("--prompt-ids", type=_ids, help="comma-separated token ids to score")
    p.add_argument("--window", type=number(int, 2), help="score in windows of this many tokens, overlapping by one "
                                                         "(default: the model's context)")
    p.add_argument("--json", action="store_true", help="print one JSON object (docs/cli.md)")

    p = sub.add_parser("build-predictors", help="build and calibrate contextual-sparsity predictors")
    model_options(p)
    p.add_argument("--calib-text", nargs="+", metavar="FILE",
                   help="calibration text files (default for the bundled model: its calibration split)")
    p.add_argument("--out", required=True, help="predictor directory to write (must not exist)")
    p.add_argument("--method", default="whitened", choices=["whitened", "plain", "signbit", "mlp", "oracle"],
                   help="whitened SVD (the paper's), plain SVD, or a baseline: sign bits, a trained MLP, the exact "
                        "gate (oracle)")
    p.add_argument("--rank", type=_ids, help="rank, or one rank per layer (comma-separated); default d_model/4")
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

    p = sub.add_parser("eval", help="evaluate predictors against the dense model")
    model_options(p)
    _kernel_option(p, policy=True)
    p.add_argument("--predictors", required=True, help="predictor directory (build-predictors)")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=[], metavar="B,B,...",
                   help="also report, per decode batch size, the union of the batch's rows and the accuracy of "
                        "the layers the policy runs sparse at that size (e.g. 1,2,4,8,16)")
    p.add_argument("--text-file", help="held-out text (default for the bundled model: its held-out split)")
    p.add_argument("--window", type=number(int, 2), default=512, help="evaluation windows of this many tokens")
    p.add_argument("--max-windows", type=POSITIVE, default=EVAL_WINDOWS,
                   help="evaluate at most this many windows: the first ones of --text-file (read no further), "
                        "spread evenly over the bundled model's held-out split")
    p.add_argument("--plots", help="directory for PNG plots (needs the plots extra: matplotlib)")
    p.add_argument("--json", action="store_true", help="print one JSON object (docs/cli.md)")

    p = sub.add_parser("demo", help="the whole pipeline on the bundled model, offline")
    p.add_argument("--out", help="keep the predictors here (default: a temporary directory)")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"],
                   help="weight dtype (the bundled model was trained in float32)")
    _common_options(p)
    from svdsparse_jax.serving.command import add_parser as add_serve_parser
    add_serve_parser(sub)  # serve: svdsparse_jax/serving/command.py
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            register = ep.load()
        except ImportError as e:  # a plug-in whose package is broken: the core commands still run
            print(f"svdsparse: plug-in {ep.name!r} not loaded ({e})", file=sys.stderr)
            continue
        handlers = register(sub)
        if plugins is not None:
            plugins.update(handlers)
    for command in sub.choices.values():  # every flag's default in its help, plug-ins' too
        command.formatter_class = _HelpFormatter
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


def load_from_args(args: argparse.Namespace, mesh=None):
    """The model a command names (the bundled one by default), loaded as its --dtype and overrides say; with a
    device mesh (--devices), each tensor straight onto its shards."""
    from svdsparse_jax.convert import load_model, parse_dtype

    path = args.model
    if path is not None and not Path(path).exists() and getattr(args, "prompt", None):
        raise SvdsparseError(f"MODEL {path!r}: no such directory; if it is a second prompt, give it its own --prompt "
                             "(--prompt A --prompt B)")
    if path is None:
        if not (BUNDLED_MODEL / "config.json").is_file():
            raise SvdsparseError("no MODEL given and no bundled model is installed; pass a model directory")
        path = BUNDLED_MODEL
    return load_model(path, parse_dtype(args.dtype), allow_pickle=args.allow_pickle, mesh=mesh, **_overrides(args))


def cmd_convert(args: argparse.Namespace) -> None:
    from svdsparse_jax.convert import convert, parse_dtype

    if not Path(args.hf_dir).is_dir():
        raise SvdsparseError(f"{args.hf_dir}: not a directory")
    check_new_output(args.out_dir, "OUT_DIR")  # before any weight is read
    out = convert(args.hf_dir, args.out_dir, parse_dtype(args.dtype), allow_pickle=args.allow_pickle,
                  **_overrides(args))
    print(f"converted {args.hf_dir} -> {out}")


def start_processes(args: argparse.Namespace) -> int:
    """With --coordinator (or JAX_COORDINATOR_ADDRESS), joins this process to a multi-process program through
    `jax.distributed.initialize` before JAX touches a device (CPU devices talk through gloo). Returns this
    process's index (0 when alone)."""
    address = getattr(args, "coordinator", None) or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return 0
    values = {}
    for flag, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        value = getattr(args, flag, None)
        if value is None and os.environ.get(env):
            try:
                value = int(os.environ[env])
            except ValueError:
                raise SvdsparseError(f"{env}={os.environ[env]!r}: expected an integer") from None
        if value is None:
            raise SvdsparseError(f"--coordinator {address}: also give --{flag.replace('_', '-')} (or {env})")
        values[flag] = value
    if not 0 <= values["process_id"] < values["num_processes"]:
        raise SvdsparseError(f"--process-id {values['process_id']}: expected 0 <= id < --num-processes "
                             f"{values['num_processes']}")
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, values["num_processes"], values["process_id"])
    return jax.process_index()


def engine_from_args(args: argparse.Namespace):
    """The engine configuration of a command: --kernels, else SVDSPARSE_KERNELS, else auto; --ffn-policy;
    --devices (more than one: a tensor-parallel mesh)."""
    from svdsparse_jax.engine import from_environment
    from svdsparse_jax.sharding import make_mesh
    devices = getattr(args, "devices", 1)  # >= 1: its argparse type
    mesh = make_mesh(devices) if devices > 1 else None
    return from_environment(getattr(args, "kernels", None), ffn_policy=getattr(args, "ffn_policy", "measured"),
                            mesh=mesh)


def _sampler_from_args(args: argparse.Namespace):
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


def _prompt_texts(args: argparse.Namespace) -> list[str] | None:
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
                texts.append(_read_text(path, limit=PROMPT_BYTES, what="--prompt-file"))
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


def cmd_generate(args: argparse.Namespace) -> None:
    import secrets

    from svdsparse_jax.generate import Generator, Watcher
    from svdsparse_jax.model import Transformer

    sampler = _sampler_from_args(args)
    if any(not stop for stop in args.stop):
        raise SvdsparseError("--stop '': stop strings must not be empty")
    texts = _prompt_texts(args)
    n_prompts = len(texts) if texts is not None else len(args.prompt_ids)
    if args.stream and args.json:
        raise SvdsparseError("--stream prints the text as it comes and --json one object at the end: choose one")
    if args.stream and n_prompts * args.num_samples > 1:
        raise SvdsparseError(f"--stream prints one sample; got {n_prompts} prompts x --num-samples "
                             f"{args.num_samples}")
    if (args.stream or args.stop) and args.devices > 1:
        raise SvdsparseError("--stream and --stop run a host callback per token, not supported with --devices > 1")
    seed = args.seed if args.seed is not None else secrets.randbits(64)
    engine = engine_from_args(args)
    lm = load_from_args(args, engine.mesh)
    tok = lm.tokenizer
    if tok is None and (texts is not None or args.stop or args.stream):
        flag = "--prompt" if texts is not None else "--stop" if args.stop else "--stream"
        raise SvdsparseError(f"{lm.path}: the model has no tokenizer files, which {flag} needs; use --prompt-ids")
    prompts = [tok(t)["input_ids"] for t in texts] if texts is not None else args.prompt_ids
    pset = load_predictors_for(args.predictors, lm) if args.predictors else None
    model = Transformer(lm.cfg, lm.weights, engine)
    del lm  # the model holds its own fused q/k/v matrix; the separate ones can go
    gen = Generator(model, pset and pset.layers, pset and pset.union)
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


def cmd_score(args: argparse.Namespace) -> None:
    from svdsparse_jax.evaluate import score_stream
    from svdsparse_jax.model import Transformer

    if args.text_file is not None:  # checked before the (slow) model load, so a bad path fails at once
        _check_text_file(args.text_file, "--text-file")
    engine = engine_from_args(args)
    lm = load_from_args(args, engine.mesh)
    if args.text_file is not None:  # tokenized and scored piece by piece: memory bounded for any length
        pieces = _file_token_pieces(args.text_file, lm, special=True)
    else:
        pieces = [np.asarray(args.prompt_ids)]
    r = score_stream(Transformer(lm.cfg, lm.weights, engine), pieces, args.window, keep_logprobs=args.json)
    window = min(args.window or lm.cfg.max_seq_len, lm.cfg.max_seq_len)
    if args.json:  # logprobs[j]: token j + 1 given those before it (the first token has no prediction)
        print_json({"tokens": r.tokens, "predicted": r.tokens - 1, "window": window, "logprobs": r.logprobs,
                    "nll": r.nll, "ppl": r.ppl})
    else:
        print(f"tokens {r.tokens} ({r.tokens - 1} predicted, in windows of {window} tokens overlapping by one)  "
              f"nll {r.nll:.4f}  ppl {r.ppl:.3f}")


# How to install an optional dependency, where the plain extra would surprise: a plain torch is a CUDA build of
# several GB; the CPU build has its own pin.
INSTALL_HINTS = {"torch": "pip install torch==2.13.0 (the CPU build; on a CUDA machine, the torch build for its "
                          "CUDA)"}


def require(module: str, extra: str, what: str) -> None:
    """Refuses, before any work, a command that needs an optional dependency that is not installed."""
    import importlib.util
    if importlib.util.find_spec(module) is None:
        how = INSTALL_HINTS.get(module, f"pip install 'svdsparse-jax[{extra}]'")
        raise SvdsparseError(f"{what} needs {module}, which is not installed: {how}")


def load_predictors_for(path: str, lm):
    """The predictor directory `path`, checked against the loaded model `lm` (shapes and fingerprint)."""
    from svdsparse_jax.predictors import load_predictors
    return load_predictors(path, lm.cfg, lm.fingerprint, lm.weights[("embed",)].dtype)


def _read_text(path: str, chars: int = -1, limit: int | None = None, what: str = "") -> str:
    """A UTF-8 text file (its first `chars` characters, if given), errors naming the file; with `limit`, a file
    (or device, pipe) of more bytes is refused, naming it as `what` (a flag)."""
    try:
        if limit is not None:
            with open(path, "rb") as f:
                return read_bounded(f, limit, f"{path} ({what})").decode("utf-8")
        with open(path, encoding="utf-8") as f:
            return f.read(chars)
    except OSError as e:
        raise SvdsparseError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise SvdsparseError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _check_text_file(path: str, flag: str) -> None:
    """Refuses a text file that is not a regular file (a device or pipe never ends), cannot be opened, or whose
    start is not UTF-8, before the slow model load."""
    regular_file(path, flag)
    _read_text(path, 1 << 16)


def _file_pieces(path: str, progress: bool = True):
    """A text file's pieces (`evaluate.text_pieces`), with a progress bar by bytes read on a terminal."""
    from tqdm import tqdm

    from svdsparse_jax.evaluate import text_pieces

    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise SvdsparseError(f"{path}: cannot read ({e.strerror})") from None
    with tqdm(total=size, unit="B", unit_scale=True, desc=Path(path).name, disable=None if progress else True,
              leave=False) as bar:
        for piece in text_pieces(path):
            yield piece
            bar.update(len(piece.encode("utf-8")))


def _file_token_pieces(path: str, lm, special: bool = False, eos: bool = False):
    """A text file's tokens, piece by piece (special tokens such as BOS on the first piece only, given
    `special`; the EOS token after the last piece, given `eos`)."""
    if lm.tokenizer is None:
        raise SvdsparseError(f"{lm.path}: the model has no tokenizer files; use --prompt-ids")
    for i, piece in enumerate(_file_pieces(path)):
        yield np.asarray(lm.tokenizer(piece, add_special_tokens=special and i == 0)["input_ids"], np.int64)
    if eos:
        yield np.asarray(lm.cfg.eos_ids[:1], np.int64)


def _file_tokens(path: str, lm, limit: int) -> np.ndarray:
    """The first `limit` tokens of a text file followed by the EOS token, tokenizing only as much of it as they
    need."""
    out, count = [], 0
    for piece in _file_token_pieces(path, lm, eos=True):
        out.append(piece)
        count += len(piece)
        if count >= limit:
            break
    return np.concatenate(out)[:limit] if out else np.zeros(0, np.int64)


def _calibration_tokens(files: Sequence[str], lm, limit: int) -> np.ndarray:
    """The calibration text files as one token stream, documents separated by the EOS token (as the bundled
    corpus), read piece by piece and only until `limit` tokens: memory bounded by what calibration uses."""
    out, count = [], 0
    for path in files:
        piece = _file_tokens(path, lm, limit - count)
        out.append(piece)
        count += len(piece)
        if count >= limit:
            break
    return np.concatenate(out)


def demo_build_config(cfg):
    """The predictors `svdsparse demo` builds for the bundled model: build-predictors' defaults, whitened SVD of
    rank d/4 calibrated to recall 0.99 on 65,536 calibration tokens (a predictors.BuildConfig)."""
    from svdsparse_jax.predictors import BuildConfig
    return BuildConfig(method="whitened", ranks=cfg.d_model // 4, rule=DEFAULT_RULE, value=DEFAULT_VALUE,
                       tokens=DEFAULT_TOKENS)


def _target(args) -> tuple[str, float]:
    if args.target_sparsity is not None:
        return "sparsity", args.target_sparsity
    if args.target_recall is not None:
        return "recall", args.target_recall
    if args.target_loss is not None:
        return "loss", args.target_loss
    if args.s is not None:
        return "s", args.s
    return DEFAULT_RULE, DEFAULT_VALUE


def cmd_build_predictors(args: argparse.Namespace) -> None:
    from svdsparse_jax.model import Transformer
    from svdsparse_jax.predictors import BuildConfig, build_predictors, save_predictors
    from svdsparse_jax.predictors.build import calibration_bytes_per_token
    from svdsparse_jax.predictors.store import predictor_bytes

    check_new_output(args.out, "--out")  # before the build
    for path in args.calib_text or ():
        _check_text_file(path, "--calib-text")
    lm = load_from_args(args)
    check_count("--tokens", args.tokens, calibration_bytes_per_token(lm.cfg))
    if args.calib_text:
        calib = _calibration_tokens(args.calib_text, lm, args.tokens)
    elif is_bundled_model(lm.path):
        calib = corpus_split("calib")
    else:
        raise SvdsparseError("--calib-text is required for a model other than the bundled one")
    rule, value = _target(args)
    ranks = args.rank or [max(1, lm.cfg.d_model // 4)]
    bc = BuildConfig(method=args.method, ranks=ranks[0] if len(ranks) == 1 else tuple(ranks), rule=rule,
                     value=value, tokens=args.tokens, window=args.window)
    itemsize = lm.weights[("embed",)].dtype.itemsize
    check_free_space(args.out, predictor_bytes(lm.cfg, bc.method, tuple(bc.rank_of(i, lm.cfg.n_layers) for i in
                                                                        range(lm.cfg.n_layers)), itemsize), "--out")
    pset = build_predictors(Transformer(lm.cfg, lm.weights), calib, bc)
    out = save_predictors(args.out, pset, lm.cfg, lm.fingerprint)
    if args.json:
        print_json({"out": str(out), "config": pset.config, "timings": pset.timings, "layers": pset.info})
        return
    print(_build_table(pset.info, pset.config))
    print(f"saved {out}; seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in pset.timings.items()))


TARGET_WORDS = {"s": "s x the layer's true sparsity (s - 0.1 on layers 0 and 1)",
                "sparsity": "that fraction of neuron/token pairs switched off",
                "recall": "keep that fraction of the active pairs",
                "loss": "drop at most that share of the layer's importance, sum (|h| ||W_down[:, i]||)^2"}


def _build_table(info: list[dict], config: dict) -> str:
    """build-predictors' per-layer table on the calibration half, with what each column and the target mean."""
    lines = [f"Per layer, on the calibration half ({config['calibration_tokens'] // 2:,} tokens):",
             f"{'layer':>5}  {'true sparsity':>13}  {'target':>16}  {'predicted sparsity':>18}  {'recall':>7}"]
    short = False
    for r in info:
        t = r["target"]
        missed = not r["target_met"] and t["kind"] != "loss" and config.get("method") != "oracle"
        short |= missed
        lines.append(f"{r['layer']:>5}  {r['true_sparsity']:>13.4f}  {t['kind'] + ' ' + format(t['value'], '.4f'):>16}"
                     f"  {r['calib_predicted_sparsity']:>18.4f}  {r['calib_recall']:>7.4f}{'  *' if missed else ''}")
    lines += [METRIC_WORDS[0] + "; " + METRIC_WORDS[1] + "; recall: the fraction of the nonzero pairs kept",
              f"target: the calibration sets each neuron's threshold until the layer reaches it; "
              f"{config['rule']} {config['value']} means {TARGET_WORDS.get(config['rule'], config['rule'])}."]
    if short:
        lines.append("* stopped short of its target: going further would switch off more than 1% of the layer's "
                     "neurons for every token (the calibration's guard against dropping whole neurons).")
    return "\n".join(lines[:2 + len(info)] + [_wrap(w) for w in lines[2 + len(info):]])


def cmd_eval(args: argparse.Namespace) -> None:
    from svdsparse_jax.evaluate import check_plot_dir, evaluate_predictors, evaluation_bytes_per_token, write_plots
    from svdsparse_jax.model import Transformer

    if args.plots:
        require("matplotlib", "plots", "--plots")
        check_plot_dir(args.plots)
    if args.text_file:  # checked before the (slow) model load, so a bad path fails at once
        _check_text_file(args.text_file, "--text-file")
    engine = engine_from_args(args)
    lm = load_from_args(args, engine.mesh)
    pset = load_predictors_for(args.predictors, lm)
    window = min(args.window, lm.cfg.max_seq_len)
    check_count("--max-windows", args.max_windows, window * evaluation_bytes_per_token(lm.cfg))
    if args.text_file:  # as many tokens as the windows read, tokenized piece by piece
        tokens = _file_tokens(args.text_file, lm, args.max_windows * args.window + 1)
    elif is_bundled_model(lm.path):
        tokens = corpus_split("heldout")
    else:
        raise SvdsparseError("--text-file is required for a model other than the bundled one")
    report = evaluate_predictors(Transformer(lm.cfg, lm.weights, engine), {pset.method: pset}, tokens,
                                 args.window, args.max_windows, batch_sizes=args.batch_sizes,
                                 progress=True)[pset.method]
    if args.plots:
        target = {pset.method: (pset.config["rule"], pset.config["value"])} if "rule" in pset.config else None
        report["plots"] = write_plots({pset.method: report}, args.plots, target)
    if args.json:
        print_json(report)
        return
    print(_layer_table(report["layers"], report["summary"]))
    print()
    print(_summary_table(pset.method, report["summary"]))
    if report.get("batches"):
        print()
        print(_batch_table(report["batches"]))


def _batch_table(batches: list[dict]) -> str:
    """One line per decode batch size: the union of the batch's rows, the layers the policy runs sparse, its
    accuracy."""
    lines = [f"{'batch':>5} {'W_gate rows':>11} {'W_up/down rows':>14} {'sparse layers':>13} {'rows read':>9} "
             f"{'ppl':>9} {'top-1 agreement':>15}"]
    lines += [f"{b['batch']:>5} {b['gate_rows_union']:>11.4f} {b['up_down_rows_union']:>14.4f} "
              f"{b['sparse_layers']:>6}/{len(b['layers']):<6} {b['rows_read_fraction']:>9.4f} {b['ppl']:>9.4f} "
              f"{b['top1_agreement']:>15.4f}" for b in batches]
    return "\n".join(lines + [_wrap("W_gate rows, W_up/down rows: the fraction the union of a batch's candidates "
                                     "reads (all layers sparse); sparse layers: those the policy runs sparse at that "
                                     "batch size; rows read, ppl, top-1 agreement: with that policy")])


LAYER_COLUMNS = (("true_sparsity", "true sparsity"), ("predicted_sparsity", "predicted sparsity"),
                 ("recall", "recall"), ("precision", "precision"), ("auroc", "AUROC"), ("ffn_rel_error", "FFN error"))
METRIC_WORDS = (
    "true sparsity: the fraction of neuron/token pairs whose activation is zero",
    "predicted sparsity: the fraction the predictor switches off (rows decode does not read)",
    "recall: the fraction of the nonzero pairs the predictor keeps; precision: the fraction of kept pairs that "
    "are nonzero",
    "AUROC: how well the predictor's scores rank nonzero above zero pairs (1 is perfect, 0.5 is chance)",
    "FFN error: the FFN output's relative error when only the kept neurons are computed",
    "top-1 agreement: the fraction of positions where the sparse model's likeliest next token is the dense one's",
    "rows read: the fraction of FFN weight rows decode reads (W_gate: candidates; W_up / W_down: the active ones)",
    "predictor cost: the predictor's bytes per token, as a fraction of the FFN's")


def _layer_table(layers: list[dict], summary: dict) -> str:
    """eval's per-layer table, at most 80 columns."""
    from svdsparse_jax.evaluate import windowing
    lines = [f"Per layer ({windowing(summary)}):",
             f"{'layer':>5}  " + "  ".join(f"{name:>{max(len(name), 7)}}" for _, name in LAYER_COLUMNS)]
    lines += [f"{r['layer']:>5}  " + "  ".join(f"{r[k]:>{max(len(name), 7)}.4f}" for k, name in LAYER_COLUMNS)
              for r in layers]
    return "\n".join(lines)


def _summary_table(name: str, s: dict) -> str:
    """eval's whole-model comparison, dense and sparse side by side, with what each metric means."""
    from svdsparse_jax.evaluate import windowing
    rows = [("perplexity", f"{s['ppl_dense']:.4f}", f"{s['ppl_sparse']:.4f} ({100 * s['ppl_increase']:+.2f}%)"),
            ("top-1 agreement with dense", "1", f"{s['top1_agreement']:.4f}"),
            ("recall / AUROC", "", f"{s['recall']:.4f} / {s['auroc']:.4f}"),
            ("FFN rows read", "1", f"{s['rows_read_fraction']:.4f} (effective sparsity "
                                   f"{s['effective_sparsity']:.4f})"),
            ("predictor cost", "0", f"{s['predictor_cost']:.4f} of the FFN")]
    lines = [f"Whole model, {name} predictors ({windowing(s)}):", f"{'':28}{'dense':>10}  sparse"]
    lines += [f"{label:28}{a:>10}  {b}" for label, a, b in rows]
    return "\n".join(lines + [""] + [_wrap(w) for w in METRIC_WORDS])


def _wrap(text: str) -> str:
    """A legend line, wrapped at 100 columns."""
    import textwrap
    return textwrap.fill(text, 100, subsequent_indent="  ")


def _stage(i: int, n: int, what: str) -> None:
    print(f"svdsparse demo [{i}/{n}]: {what}", file=sys.stderr, flush=True)


def _decode_speed(gen, ids: list[int], n: int) -> tuple[list[int], float]:
    """Greedy tokens of one prompt and the decode speed in tokens/s, timed on a second run (compiled)."""
    first = gen.generate([ids], n)
    again = gen.generate([ids], n)
    return first.tokens[0], len(again.tokens[0]) / again.run_s


def cmd_demo(args: argparse.Namespace) -> None:
    """Build whitened-SVD predictors for the bundled model on its calibration split, evaluate dense vs sparse
    on held-out text, and generate a sample both ways, timing each."""
    import time

    import jax

    from svdsparse_jax.convert import load_model, parse_dtype
    from svdsparse_jax.engine import EngineConfig
    from svdsparse_jax.evaluate import evaluate_predictors, windowing
    from svdsparse_jax.generate import Generator
    from svdsparse_jax.model import Transformer
    from svdsparse_jax.predictors import build_predictors, save_predictors

    if args.out:
        check_new_output(args.out, "--out")  # before the build
    t0 = time.perf_counter()
    _stage(1, 4, "loading the bundled model")
    lm = load_model(BUNDLED_MODEL, parse_dtype(args.dtype))
    # every layer sparse: the demo shows the predictors' effect, where the measured policy would run a model
    # this small dense (its FFN costs less than the sparse path's fixed launches)
    model = Transformer(lm.cfg, lm.weights, EngineConfig.resolve(ffn_policy="sparse"))
    bc = demo_build_config(lm.cfg)
    _stage(2, 4, f"building whitened-SVD predictors (rank {bc.ranks}) from {bc.tokens:,} calibration tokens")
    t1 = time.perf_counter()
    pset = build_predictors(model, corpus_split("calib"), bc, progress=True)
    t_build = time.perf_counter() - t1
    if args.out:
        save_predictors(args.out, pset, lm.cfg, lm.fingerprint)
    _stage(3, 4, f"evaluating dense and sparse on held-out text ({EVAL_WINDOWS} windows of 512 tokens)")
    heldout = corpus_split("heldout")
    report = evaluate_predictors(model, {"whitened": pset}, heldout, 512, max_windows=EVAL_WINDOWS,
                                 auroc_tokens=2048, progress=True)["whitened"]
    s = report["summary"]
    _stage(4, 4, "generating a sample dense and sparse, timing decode")
    prompt, n_new = "def read_config(path):\n", 48
    ids = lm.tokenizer(prompt)["input_ids"]
    dense, dense_tps = _decode_speed(Generator(model), ids, n_new)
    sparse, sparse_tps = _decode_speed(Generator(model, pset.layers), ids, n_new)
    same = next((i for i, (a, b) in enumerate(zip(dense, sparse)) if a != b), min(len(dense), len(sparse)))
    device = jax.devices()[0].platform.upper()

    print(f"svdsparse demo: the bundled model ({lm.cfg.n_layers} layers, d_model {lm.cfg.d_model}, d_ff "
          f"{lm.cfg.d_ff}, {lm.cfg.activation}, {args.dtype}); whitened-SVD predictors of rank {bc.ranks}, "
          f"calibrated to {bc.rule} {bc.value}, built in {t_build:.1f} s"
          + (f", saved in {args.out}" if args.out else " (--out DIR keeps them)"))
    print(f"held-out text: {windowing(s)}\n")
    rows = [("perplexity", f"{s['ppl_dense']:.4f}", f"{s['ppl_sparse']:.4f}",
             "how surprised the model is by the held-out text (lower is better)"),
            ("top-1 agreement", "1", f"{s['top1_agreement']:.4f}",
             "positions where the likeliest next token is the dense model's"),
            ("FFN neurons zero", f"{s['true_sparsity']:.4f}", f"{s['true_sparsity']:.4f}",
             "neuron/token pairs whose activation is zero (the model's sparsity)"),
            ("FFN neurons skipped", "0", f"{s['predicted_sparsity']:.4f}",
             "neuron/token pairs the predictor switches off"),
            ("recall", "1", f"{s['recall']:.4f}", "of the nonzero neurons, the fraction the predictor keeps"),
            ("AUROC", "", f"{s['auroc']:.4f}", "how well its scores rank nonzero above zero (1 is perfect)"),
            ("W_gate rows read", "1", f"{s['gate_rows_read']:.4f}", "the predictor's candidates"),
            ("W_up, W_down rows read", "1", f"{s['up_down_rows_read']:.4f}", "the candidates that are active"),
            ("FFN bytes read", "1", f"{s['rows_read_fraction']:.4f}",
             f"of the dense FFN's, plus the predictor's {s['predictor_cost']:.4f}"),
            (f"decode tokens/s ({device})", f"{dense_tps:.0f}", f"{sparse_tps:.0f}",
             f"{n_new} greedy tokens, batch 1" + ("; on a CPU the gathers outweigh the rows saved" if device == "CPU"
                                                  else ""))]
    print(f"{'':24}{'dense':>8}{'sparse':>9}  what it means")
    for name, a, b, words in rows:
        print(f"{name:24}{a:>8}{b:>9}  {words}")
    print(f"\nprompt: {prompt!r}")
    print(f"dense : {lm.tokenizer.decode(dense, skip_special_tokens=True)!r}")
    print(f"sparse: {lm.tokenizer.decode(sparse, skip_special_tokens=True)!r}")
    print(f"(greedy; the two agree on the first {same} of {len(dense)} tokens; total {time.perf_counter() - t0:.0f} s)")


def cmd_serve(args: argparse.Namespace) -> None:
    from svdsparse_jax.serving.command import serve
    serve(args)


COMMANDS: dict[str, Command] = {"convert": cmd_convert, "generate": cmd_generate, "score": cmd_score,
                                 "build-predictors": cmd_build_predictors, "eval": cmd_eval, "demo": cmd_demo,
                                 "serve": cmd_serve}


_WRITE_ERRNOS = (errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EDQUOT, errno.EFBIG)


def _stdout_broken() -> bool:
    """Whether standard output cannot take what is left in its buffer (a full disk, a closed pipe)."""
    try:
        sys.stdout.flush()
        return False
    except OSError:
        return True


def main(argv: Sequence[str] | None = None) -> int:
    # transformers advises at import that PyTorch is missing, which the core commands never need
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    handlers = dict(COMMANDS)
    parser = build_parser(handlers)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's own usage, not the top level's
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # partial outputs removed, one line, exit
        signal.signal(sig, lambda signum, frame: exit_on_signal(signum, f"svdsparse {args.command}"))
    if not args.debug:  # orbax's writer threads log every failure they pass up, and its callbacks into a closed
        # event loop print unraisable tracebacks (hundreds of lines for a full disk); the one-line error says it
        logging.getLogger("absl").setLevel(logging.CRITICAL)
        sys.unraisablehook = lambda unraisable: None
    try:
        if sys.stdout is None or sys.stdout.closed:  # started with stdout closed: the results would be lost
            raise SvdsparseError("standard output is closed; the results would be lost (redirect it to a file, or "
                                 "to /dev/null to discard them)")
        compile_cache.enable(getattr(args, "compile_cache", None))  # before anything compiles
        if start_processes(args) > 0:  # every process runs the program; process 0 alone prints its results
            sys.stdout = open(os.devnull, "w")
        try:
            handlers[args.command](args)
            sys.stdout.flush()  # a full disk or a closed pipe behind stdout fails here, not silently at exit
        except OSError as e:  # a write error with no file named: stdout's (files the commands open are named)
            if not (_stdout_broken() or (e.filename is None and e.errno in _WRITE_ERRNOS)):
                raise
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # exit would report the rest again
            raise SvdsparseError(f"cannot write the results to standard output ({e.strerror})") from None
    except SvdsparseError as e:
        if args.debug:
            raise
        print(f"svdsparse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"svdsparse {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything else still gets one line; --debug shows where it came from
        if args.debug:
            raise
        detail = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror and e.filename else e
        print(f"svdsparse {args.command}: error: {type(e).__name__}: {detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
