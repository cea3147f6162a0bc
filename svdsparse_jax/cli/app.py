"""The `svdsparse` command: its parser (every command's module, then installed plug-ins' commands), and `main`:
signals, the compilation cache, several processes, and one line and an exit status for every failure.

Every command exits non-zero with a one-line error on bad input (add --debug for the traceback). With --json,
a command prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from importlib.metadata import entry_points
from typing import Sequence

from svdsparse_jax import compile_cache
from svdsparse_jax.cli import build_predictors, convert, demo, generate, score
from svdsparse_jax.cli import eval as evaluate
from svdsparse_jax.cli.arguments import Command, HelpFormatter
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import exit_on_signal
from svdsparse_jax.serving import command as serve

PLUGIN_GROUP = "svdsparse.commands"
# each module: add_parser(subparsers) and run(args)
COMMANDS = {"convert": convert, "generate": generate, "score": score, "build-predictors": build_predictors,
            "eval": evaluate, "demo": demo, "serve": serve}


def build_parser(plugins: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    """The argument parser; the commands of installed plug-ins are added to it and their handlers to
    `plugins`."""
    from svdsparse_jax import __version__

    parser = argparse.ArgumentParser(prog="svdsparse", description="SVD contextual-sparsity LLM decoding in JAX")
    parser.add_argument("--version", action="version", version=f"svdsparse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
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
        command.formatter_class = HelpFormatter
    return parser


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
    handlers = {name: module.run for name, module in COMMANDS.items()}
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
