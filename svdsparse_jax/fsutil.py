"""Atomic output directories: nothing half-written is ever left at the destination."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from svdsparse_jax.errors import SvdsparseError


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `out_dir`; when the block completes it is renamed to out_dir,
    when it raises (or is interrupted) it is removed. An existing out_dir is refused before anything is written."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        raise SvdsparseError(f"{out_dir}: already exists; remove it or choose another output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_versioned_json(path: Path, versions: tuple[int, ...], what: str) -> dict:
    """Reads a JSON file whose "format" field must be one of `versions`; errors name the file and say what it
    is."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SvdsparseError(f"{path}: cannot read {what} ({e})") from None
    if not isinstance(data, dict) or data.get("format") not in versions:
        got = data.get("format") if isinstance(data, dict) else None
        raise SvdsparseError(f"{path}: {what} format {got!r}, expected one of {list(versions)}")
    return data
