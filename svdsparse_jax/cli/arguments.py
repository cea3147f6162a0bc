"""The command line's argument types and shared options, and the session a command's flags load: what every
command and plug-in (`svdsparse.commands`) builds its parser from.

Choice lists are the canonical tuples: `dtypes.DTYPES`, `config.SPARSE_ACTIVATIONS`, `engine.BACKENDS`,
`policy.POLICIES` (and the commands' own: `predictors.METHODS`, `serving.command.LOG_LEVELS`).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from typing import Any, Callable

from svdsparse_jax.config import SPARSE_ACTIVATIONS
from svdsparse_jax.dtypes import DTYPES
from svdsparse_jax.engine import BACKENDS
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.policy import POLICIES

Command = Callable[[argparse.Namespace], None]
SEED_LIMIT = 2 ** 64


def ids(text: str) -> list[int]:
    """An argparse type: comma-separated integers (token ids, ranks), at least one."""
    try:
        out = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return out


def batch_sizes(text: str) -> list[int]:
    """An argparse type: comma-separated batch sizes >= 1."""
    sizes = ids(text)
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes >= 1, got {text!r}")
    return sizes


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


def model_options(p: argparse.ArgumentParser, optional_model: bool = True, dtype: str = "bfloat16",
                  dtype_help: str = "weight dtype (products accumulate in float32)") -> None:
    """The options of every command that loads a model (plug-ins use them too)."""
    if optional_model:
        p.add_argument("model", nargs="?", help="converted or Hugging Face model directory "
                                                "(default: the bundled model)")
    p.add_argument("--dtype", default=dtype, choices=list(DTYPES), help=dtype_help)
    p.add_argument("--dense-only", action="store_true",
                   help="allow activations without sparsity (silu); the model then runs dense only")
    p.add_argument("--activation", choices=SPARSE_ACTIVATIONS,
                   help="override the config's hidden_act (e.g. drelu for TurboSparse / SparseQwen2)")
    p.add_argument("--act-threshold", type=number(), help="override the FATReLU threshold (hidden_act_param)")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading .bin (pickle) checkpoints")
    common_options(p)


def common_options(p: argparse.ArgumentParser) -> None:
    """The options of every command."""
    p.add_argument("--compile-cache", metavar="DIR|off",
                   help="keep compiled programs here for the next run, or off (default: SVDSPARSE_COMPILE_CACHE, "
                        "else ~/.cache/svdsparse-jax/xla)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def kernel_options(p: argparse.ArgumentParser, policy: str | None = None, processes: bool = True) -> None:
    """--kernels and --devices (and, with `processes`, the multi-process flags); with `policy` (what the policy
    weighs, in its help), --ffn-policy."""
    p.add_argument("--kernels", choices=("auto", *BACKENDS),
                   help="Pallas kernels or XLA for decode-sized products, norms and the guarded FFN (default: "
                        "SVDSPARSE_KERNELS, else auto = the kernels on a GPU, XLA elsewhere)")
    p.add_argument("--devices", type=POSITIVE, default=1,
                   help="tensor-parallel over this many devices (heads, FFN neurons and vocabulary split; the "
                        "guarded FFN's kernels per device, XLA's SPMD partitioning for the rest)"
                        + ("; with several processes, devices of all of them" if processes else ""))
    if processes:
        p.add_argument("--coordinator", metavar="HOST:PORT",
                       help="run as one of several processes (hosts) of one program: process 0's address (default: "
                            "JAX_COORDINATOR_ADDRESS); with --num-processes and --process-id")
        p.add_argument("--num-processes", type=POSITIVE, help="processes in all (default: JAX_NUM_PROCESSES)")
        p.add_argument("--process-id", type=number(int, 0),
                       help="this process's index, 0 to N-1 (default: JAX_PROCESS_ID)")
    if policy:
        p.add_argument("--ffn-policy", choices=POLICIES, default="measured",
                       help=f"which layers of a decode batch run sparse: where measured costs say it beats dense "
                            f"at {policy} (measured, the default), every layer, or none")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds a flag's default to its help where the default is a value (not None, off or empty) and the help
    does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def load_session(args: argparse.Namespace, predictors: str | None = None):
    """The session a command's flags ask for (`session.load`): MODEL (the bundled model by default), --dtype
    and the config overrides, and where the command has them --kernels, --ffn-policy, --devices; with
    `predictors`, that predictor directory."""
    from svdsparse_jax import session
    return session.load(args.model, dtype=args.dtype, predictors=predictors, kernels=getattr(args, "kernels", None),
                        ffn_policy=getattr(args, "ffn_policy", "measured"), devices=getattr(args, "devices", 1),
                        allow_pickle=args.allow_pickle, dense_only=args.dense_only, activation=args.activation,
                        act_threshold=args.act_threshold)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--dense-only, --activation, --act-threshold as `config.read_hf_config`'s overrides (those given)."""
    out: dict[str, Any] = {"dense_only": True} if args.dense_only else {}
    if args.activation:
        out["activation"] = args.activation
    if args.act_threshold is not None:
        out["act_threshold"] = args.act_threshold
    return out


# How to install an optional dependency, where the plain extra would surprise: a plain torch is a CUDA build of
# several GB; the CPU build has its own pin.
INSTALL_HINTS = {"torch": "pip install torch==2.13.0 (the CPU build; on a CUDA machine, the torch build for its "
                          "CUDA)"}


def require(module: str, extra: str, what: str) -> None:
    """Refuses, before any work, a command that needs an optional dependency that is not installed."""
    if importlib.util.find_spec(module) is None:
        how = INSTALL_HINTS.get(module, f"pip install 'svdsparse-jax[{extra}]'")
        raise SvdsparseError(f"{what} needs {module}, which is not installed: {how}")
