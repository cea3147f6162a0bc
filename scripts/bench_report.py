"""The header every benchmark's JSON report carries (date and the command that reproduces it) and its writer."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path


# Environment variables that change what a benchmark runs: they are part of the command that reproduces it.
SETTINGS = ("XLA_FLAGS", "SVDSPARSE_KERNELS", "SVDSPARSE_DENSE_GEMV")
# As the run was started: a script may set some of them itself while it runs (bench_decode.py --dense-gemv).
STARTED_WITH = {k: os.environ[k] for k in SETTINGS if k in os.environ}


def report(**fields) -> dict:
    """fields + the date and the command line of this run (`[VAR=value ...] python scripts/NAME ARGS`, with the
    SETTINGS variables the run was started with)."""
    env = [f"{k}={shlex.quote(v)}" for k, v in STARTED_WITH.items()]
    command = " ".join([*env, "python", f"scripts/{Path(sys.argv[0]).name}", *map(shlex.quote, sys.argv[1:])])
    return {**fields, "date": time.strftime("%Y-%m-%d"), "command": command}


def save(rep: dict, path: str | None) -> None:
    """Writes the report as indented JSON when a path is given."""
    if path:
        Path(path).write_text(json.dumps(rep, indent=2) + "\n")
