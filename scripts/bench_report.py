"""The header every benchmark's JSON report carries (date and the command that reproduces it) and its writer."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def report(**fields) -> dict:
    """fields + the date and the command line of this run (`python scripts/NAME ARGS`)."""
    command = " ".join(["python", f"scripts/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    return {**fields, "date": time.strftime("%Y-%m-%d"), "command": command}


def save(rep: dict, path: str | None) -> None:
    """Writes the report as indented JSON when a path is given."""
    if path:
        Path(path).write_text(json.dumps(rep, indent=2) + "\n")
