"""The `svdsparse` command: convert, generate, score, build-predictors, eval, demo, and the commands of installed
plug-ins (entry point group `svdsparse.commands`: `torch_npu_bridge` adds export-svdp and import-svdp).

Every command exits non-zero with a one-line error on bad input (add --debug for the traceback). With --json,
a command prints exactly one JSON object on stdout. The engine configuration (which kernels decode runs) is
resolved here, once, from --kernels or the environment (`engine.from_environment`).
"""

from __future__ import annotations

import argparse
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

from svdsparse_jax.assets import BUNDLED_MODEL, corpus_split, is_bundled_model
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import check_new_output, exit_on_signal

DEFAULT_S = 0.7
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
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--dense-only", action="store_true",
                   help="allow activations without sparsity (silu); the model then runs dense only")
    p.add_argument("--activation", choices=["relu", "fatrelu", "drelu"],
                   help="override the config's hidden_act (e.g. drelu for TurboSparse / SparseQwen2)")
    p.add_argument("--act-threshold", type=number(), help="override the FATReLU threshold (hidden_act_param)")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading .bin (pickle) checkpoints")
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


def build_parser(plugins: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    """The argument parser; the commands of installed plug-ins are added to it and their handlers to
    `plugins`."""
    from svdsparse_jax import __version__

    parser = argparse.ArgumentParser(prog="svdsparse", description="SVD contextual-sparsity LLM decoding in JAX")
    parser.add_argument("--version", action="version", version=f"svdsparse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to this project's format")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    model_options(p, optional_model=False)

    p = sub.add_parser("generate", help="generate text (one jitted program: prefill + decode loop)")
    model_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", type=_ids, action="append", help="comma-separated token ids (repeatable)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    p.add_argument("--temperature", type=number(float, 0.0))
    p.add_argument("--top-k", type=number(int, 0), default=0)
    p.add_argument("--top-p", type=FRACTION, default=1.0)
    p.add_argument("--seed", type=number(int, 0, SEED_LIMIT, hi_open=True), default=0,
                   help="sampling seed, 0 to 2^64 - 1 (each a distinct stream)")
    p.add_argument("--predictors", help="predictor directory: decode with the predictor-guarded FFN")
    _kernel_option(p, policy=True)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("score", help="per-token log-probabilities, NLL and perplexity of a text")
    model_options(p)
    _kernel_option(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file")
    src.add_argument("--prompt-ids", type=_ids)
    p.add_argument("--window", type=number(int, 2), help="score in windows of this many tokens (default: the context)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("build-predictors", help="build and calibrate contextual-sparsity predictors")
    model_options(p)
    p.add_argument("--calib-text", nargs="+", metavar="FILE",
                   help="calibration text files (default for the bundled model: its calibration split)")
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="whitened", choices=["whitened", "plain", "signbit", "mlp", "oracle"])
    p.add_argument("--rank", type=_ids, help="rank, or one rank per layer (comma-separated); default d_model/4")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--s", type=FRACTION, help="predicted sparsity = s x true sparsity (s-0.1 on layers 0-1); "
                                                f"default {DEFAULT_S}")
    target.add_argument("--target-sparsity", type=number(float, 0.0, 1.0, hi_open=True),
                        help="absolute predicted sparsity per layer")
    target.add_argument("--target-recall", type=FRACTION, help="minimum recall per layer")
    p.add_argument("--tokens", type=POSITIVE, default=16384, help="calibration tokens (half build, half calibrate)")
    p.add_argument("--window", type=number(int, 2), default=512)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("eval", help="evaluate predictors against the dense model")
    model_options(p)
    _kernel_option(p, policy=True)
    p.add_argument("--predictors", required=True)
    p.add_argument("--batch-sizes", type=_batch_sizes, default=[], metavar="B,B,...",
                   help="also report, per decode batch size, the union of the batch's rows and the accuracy of "
                        "the layers the policy runs sparse at that size (e.g. 1,2,4,8,16)")
    p.add_argument("--text-file", help="held-out text (default for the bundled model: its held-out split)")
    p.add_argument("--window", type=number(int, 2), default=512)
    p.add_argument("--max-windows", type=POSITIVE, default=32)
    p.add_argument("--plots", help="directory for PNG plots")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="the whole pipeline on the bundled model, offline")
    p.add_argument("--out", help="keep the predictors here (default: a temporary directory)")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--debug", action="store_true")
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            register = ep.load()
        except ImportError as e:  # a plug-in whose package is broken: the core commands still run
            print(f"svdsparse: plug-in {ep.name!r} not loaded ({e})", file=sys.stderr)
            continue
        handlers = register(sub)
        if plugins is not None:
            plugins.update(handlers)
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


def cmd_generate(args: argparse.Namespace) -> None:
    from svdsparse_jax.generate import Generator, Sampler
    from svdsparse_jax.model import Transformer

    if args.greedy and args.temperature is not None:
        raise SvdsparseError("--greedy and --temperature exclude each other")
    if not args.temperature and (args.top_k or args.top_p < 1):  # greedy decoding would ignore them in silence
        raise SvdsparseError(f"--top-k / --top-p filter sampling; give --temperature > 0 with them (got "
                             f"{args.temperature or 'none: greedy'})")
    for i, p in enumerate(args.prompt or []):  # arguments that are not UTF-8 arrive with surrogate escapes
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise SvdsparseError(f"--prompt {i + 1}: not valid UTF-8 (byte {e.start})") from None
        if not p.strip():
            raise SvdsparseError(f"--prompt {i + 1}: empty or only whitespace")
    engine = engine_from_args(args)
    lm = load_from_args(args, engine.mesh)
    tok = lm.tokenizer
    if args.prompt is not None:
        if tok is None:
            raise SvdsparseError(f"{lm.path}: the model has no tokenizer files; use --prompt-ids")
        prompts = [tok(p)["input_ids"] for p in args.prompt]
    else:
        prompts = args.prompt_ids
    sampler = Sampler(temperature=args.temperature or 0.0, top_k=args.top_k, top_p=args.top_p)
    pset = load_predictors_for(args.predictors, lm) if args.predictors else None
    model = Transformer(lm.cfg, lm.weights, engine)
    del lm  # the model holds its own fused q/k/v matrix; the separate ones can go
    gen = Generator(model, pset and pset.layers, pset and pset.union)
    result = gen.generate(prompts, args.max_new_tokens, sampler, args.seed)
    n_new = sum(len(t) for t in result.tokens)
    tps = n_new / result.run_s if result.run_s > 0 else float("nan")
    rows = [{"prompt_ids": list(p), "output_ids": out,
             "text": tok.decode(out, skip_special_tokens=True) if tok is not None else None}
            for p, out in zip(prompts, result.tokens)]
    if args.json:
        timing = {"tokens_per_s": tps, "compile_s": result.compile_s, "run_s": result.run_s,
                  "sparse_layers": sum(result.sparse_layers)}
        print_json({**rows[0], **timing} if len(rows) == 1 else {"results": rows, **timing})
        return
    for row in rows:
        print(row["text"] if row["text"] is not None else ",".join(map(str, row["output_ids"])))
    sparse = f"; {sum(result.sparse_layers)} of {len(result.sparse_layers)} layers sparse" if pset else ""
    print(f"[{n_new} tokens in {result.run_s:.3f} s: {tps:.1f} tokens/s; compile {result.compile_s:.1f} s{sparse}]",
          file=sys.stderr)


def cmd_score(args: argparse.Namespace) -> None:
    from svdsparse_jax.evaluate import score_stream
    from svdsparse_jax.model import Transformer

    if args.text_file is not None:  # checked before the (slow) model load, so a bad path fails at once
        _check_text_file(args.text_file)
    engine = engine_from_args(args)
    lm = load_from_args(args, engine.mesh)
    if args.text_file is not None:  # tokenized and scored piece by piece: memory bounded for any length
        pieces = _file_token_pieces(args.text_file, lm, special=True)
    else:
        pieces = [np.asarray(args.prompt_ids)]
    r = score_stream(Transformer(lm.cfg, lm.weights, engine), pieces, args.window, keep_logprobs=args.json)
    if args.json:
        print_json({"tokens": r.tokens, "logprobs": r.logprobs, "nll": r.nll, "ppl": r.ppl})
    else:
        print(f"tokens {r.tokens}  nll {r.nll:.4f}  ppl {r.ppl:.3f}")


def load_predictors_for(path: str, lm):
    """The predictor directory `path`, checked against the loaded model `lm` (shapes and fingerprint)."""
    from svdsparse_jax.predictors import load_predictors
    return load_predictors(path, lm.cfg, lm.fingerprint)


def _read_text(path: str, chars: int = -1) -> str:
    """A UTF-8 text file (its first `chars` characters, if given), errors naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(chars)
    except OSError as e:
        raise SvdsparseError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise SvdsparseError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _read_texts(files: Sequence[str]) -> list[str]:
    return [_read_text(f) for f in files]


def _check_text_file(path: str) -> None:
    """Refuses a text file that cannot be opened, or whose start is not UTF-8, before the slow model load."""
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
    """The first `limit` tokens of a text file and its closing EOS (as `_token_stream` of the whole file),
    tokenizing only as much of it as they need."""
    out, count = [], 0
    for piece in _file_token_pieces(path, lm, eos=True):
        out.append(piece)
        count += len(piece)
        if count >= limit:
            break
    return np.concatenate(out)[:limit] if out else np.zeros(0, np.int64)


def _token_stream(texts: list[str], lm) -> np.ndarray:
    """Tokenizes texts into one stream, documents separated by the EOS token (as the bundled corpus)."""
    if lm.tokenizer is None:
        raise SvdsparseError(f"{lm.path}: the model has no tokenizer files")
    eos = lm.cfg.eos_ids[:1]
    ids = lm.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.concatenate([np.asarray(list(x) + list(eos), np.int64) for x in ids])


def demo_build_config(cfg):
    """The predictors `svdsparse demo` builds for the bundled model: whitened SVD of rank d/4, s = DEFAULT_S,
    8,192 calibration tokens (a predictors.BuildConfig)."""
    from svdsparse_jax.predictors import BuildConfig
    return BuildConfig(method="whitened", ranks=cfg.d_model // 4, rule="s", value=DEFAULT_S, tokens=8192)


def _target(args) -> tuple[str, float]:
    if args.target_sparsity is not None:
        return "sparsity", args.target_sparsity
    if args.target_recall is not None:
        return "recall", args.target_recall
    return "s", args.s if args.s is not None else DEFAULT_S


def cmd_build_predictors(args: argparse.Namespace) -> None:
    from svdsparse_jax.model import Transformer
    from svdsparse_jax.predictors import BuildConfig, build_predictors, save_predictors

    check_new_output(args.out, "--out")  # before the build
    texts = _read_texts(args.calib_text) if args.calib_text else None
    lm = load_from_args(args)
    if texts is not None:
        calib = _token_stream(texts, lm)
    elif is_bundled_model(lm.path):
        calib = corpus_split("calib")
    else:
        raise SvdsparseError("--calib-text is required for a model other than the bundled one")
    rule, value = _target(args)
    ranks = args.rank or [max(1, lm.cfg.d_model // 4)]
    bc = BuildConfig(method=args.method, ranks=ranks[0] if len(ranks) == 1 else tuple(ranks), rule=rule,
                     value=value, tokens=args.tokens, window=args.window)
    pset = build_predictors(Transformer(lm.cfg, lm.weights), calib, bc)
    out = save_predictors(args.out, pset, lm.cfg, lm.fingerprint)
    if args.json:
        print_json({"out": str(out), "config": pset.config, "timings": pset.timings, "layers": pset.info})
        return
    print(f"{'layer':>5} {'true sp':>8} {'target':>16} {'pred sp':>8} {'recall':>7}   (calibration half)")
    for r in pset.info:
        t = r["target"]
        note = "" if r["target_met"] or args.method == "oracle" else "  target not met (1% guard)"
        print(f"{r['layer']:>5} {r['true_sparsity']:>8.4f} {t['kind'] + ' ' + format(t['value'], '.4f'):>16} "
              f"{r['calib_predicted_sparsity']:>8.4f} {r['calib_recall']:>7.4f}{note}")
    print(f"saved {out}; seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in pset.timings.items()))


def cmd_eval(args: argparse.Namespace) -> None:
    from svdsparse_jax.evaluate import evaluate_predictors, write_plots
    from svdsparse_jax.model import Transformer

    if args.plots and Path(args.plots).exists() and not Path(args.plots).is_dir():
        raise SvdsparseError(f"{args.plots} (--plots): exists and is not a directory")
    if args.text_file:  # checked before the (slow) model load, so a bad path fails at once
        _check_text_file(args.text_file)
    engine = engine_from_args(args)
    lm = load_from_args(args, engine.mesh)
    pset = load_predictors_for(args.predictors, lm)
    if args.text_file:  # as many tokens as the windows read, tokenized piece by piece
        tokens = _file_tokens(args.text_file, lm, args.max_windows * args.window + 1)
    elif is_bundled_model(lm.path):
        tokens = corpus_split("heldout")
    else:
        raise SvdsparseError("--text-file is required for a model other than the bundled one")
    report = evaluate_predictors(Transformer(lm.cfg, lm.weights, engine), {pset.method: pset}, tokens,
                                 args.window, args.max_windows, batch_sizes=args.batch_sizes)[pset.method]
    if args.plots:
        report["plots"] = write_plots({pset.method: report}, args.plots)
    if args.json:
        print_json(report)
        return
    print(_layer_table(report["layers"]))
    print(_summary_line(pset.method, report["summary"]))
    if report.get("batches"):
        print(_batch_table(report["batches"]))


def _batch_table(batches: list[dict]) -> str:
    """One line per decode batch size: the union of the batch's rows, the layers the policy runs sparse, its
    accuracy."""
    lines = [f"{'batch':>5} {'W_gate rows':>11} {'W_up/down rows':>14} {'sparse layers':>13} {'rows read':>9} "
             f"{'ppl':>9} {'top-1 agreement':>15}"]
    lines += [f"{b['batch']:>5} {b['gate_rows_union']:>11.4f} {b['up_down_rows_union']:>14.4f} "
              f"{b['sparse_layers']:>6}/{len(b['layers']):<6} {b['rows_read_fraction']:>9.4f} {b['ppl']:>9.4f} "
              f"{b['top1_agreement']:>15.4f}" for b in batches]
    return "\n".join(lines)


def _layer_table(layers: list[dict]) -> str:
    cols = ("true_sparsity", "predicted_sparsity", "recall", "precision", "auroc", "ffn_rel_error")
    lines = [f"{'layer':>5} " + " ".join(f"{c[:12]:>12}" for c in cols)]
    lines += [f"{r['layer']:>5} " + " ".join(f"{r[c]:>12.4f}" for c in cols) for r in layers]
    return "\n".join(lines)


def _summary_line(name: str, s: dict) -> str:
    return (f"{name}: ppl dense {s['ppl_dense']:.4f} sparse {s['ppl_sparse']:.4f} ({100 * s['ppl_increase']:+.2f}%), "
            f"top-1 agreement {s['top1_agreement']:.4f}, recall {s['recall']:.4f}, AUROC {s['auroc']:.4f}, "
            f"rows read {s['rows_read_fraction']:.4f} (effective sparsity {s['effective_sparsity']:.4f}), "
            f"predictor cost {s['predictor_cost']:.4f} of the FFN")


def cmd_demo(args: argparse.Namespace) -> None:
    """Build whitened-SVD predictors for the bundled model on its calibration split, evaluate dense vs sparse
    on held-out text, and generate a sample both ways."""
    import tempfile
    import time

    from svdsparse_jax.convert import load_model, parse_dtype
    from svdsparse_jax.engine import EngineConfig
    from svdsparse_jax.evaluate import evaluate_predictors
    from svdsparse_jax.generate import Generator
    from svdsparse_jax.model import Transformer
    from svdsparse_jax.predictors import build_predictors, save_predictors

    if args.out:
        check_new_output(args.out, "--out")  # before the build
    t0 = time.perf_counter()
    lm = load_model(BUNDLED_MODEL, parse_dtype(args.dtype))
    # every layer sparse: the demo shows the predictors' effect, where the measured policy would run a model
    # this small dense (its FFN costs less than the sparse path's fixed launches)
    model = Transformer(lm.cfg, lm.weights, EngineConfig.resolve(ffn_policy="sparse"))
    bc = demo_build_config(lm.cfg)
    pset = build_predictors(model, corpus_split("calib"), bc, progress=False)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="svdsparse-demo-")) / "predictors"
    save_predictors(out, pset, lm.cfg, lm.fingerprint)
    t_build = time.perf_counter() - t0
    report = evaluate_predictors(model, {"whitened": pset}, corpus_split("heldout"), 512, max_windows=8,
                                 auroc_tokens=2048)["whitened"]
    s = report["summary"]
    prompt = "def read_config(path):\n"
    ids = lm.tokenizer(prompt)["input_ids"]
    dense = Generator(model).generate([ids], 48).tokens[0]
    sparse = Generator(model, pset.layers).generate([ids], 48).tokens[0]
    same = next((i for i, (a, b) in enumerate(zip(dense, sparse)) if a != b), min(len(dense), len(sparse)))
    print(f"svdsparse demo: bundled model ({lm.cfg.n_layers} layers, d_model {lm.cfg.d_model}, d_ff {lm.cfg.d_ff}, "
          f"{lm.cfg.activation}), whitened SVD rank {bc.ranks}, s = {bc.value}; predictors in {out}")
    print(f"built in {t_build:.1f} s from {pset.config['calibration_tokens']} calibration tokens; "
          f"evaluated on {s['tokens']} held-out tokens\n")
    rows = [("perplexity", f"{s['ppl_dense']:.4f}", f"{s['ppl_sparse']:.4f}"),
            ("top-1 agreement with dense", "1", f"{s['top1_agreement']:.4f}"),
            ("FFN sparsity (true / predicted)", f"{s['true_sparsity']:.4f}", f"{s['predicted_sparsity']:.4f}"),
            ("recall / precision / AUROC", "", f"{s['recall']:.4f} / {s['precision']:.4f} / {s['auroc']:.4f}"),
            ("W_gate rows read", "1", f"{s['gate_rows_read']:.4f}"),
            ("W_up, W_down rows read", "1", f"{s['up_down_rows_read']:.4f}"),
            ("FFN bytes read (+ predictor)", "1", f"{s['rows_read_fraction']:.4f} (+{s['predictor_cost']:.4f})")]
    print(f"{'':34}{'dense':>12}{'sparse':>24}")
    for name, a, b in rows:
        print(f"{name:34}{a:>12}{b:>24}")
    print(f"\nprompt: {prompt!r}")
    print(f"dense : {lm.tokenizer.decode(dense, skip_special_tokens=True)!r}")
    print(f"sparse: {lm.tokenizer.decode(sparse, skip_special_tokens=True)!r}")
    print(f"(greedy; the two agree on the first {same} of {len(dense)} tokens; total {time.perf_counter() - t0:.0f} s)")


COMMANDS: dict[str, Command] = {"convert": cmd_convert, "generate": cmd_generate, "score": cmd_score,
                                 "build-predictors": cmd_build_predictors, "eval": cmd_eval, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
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
        if start_processes(args) > 0:  # every process runs the program; process 0 alone prints its results
            sys.stdout = open(os.devnull, "w")
        handlers[args.command](args)
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
