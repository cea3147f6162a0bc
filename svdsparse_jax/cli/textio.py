"""The command line's text input and output: strict one-line JSON on stdout, text files read checked and piece
by piece (any length in bounded memory), and their tokens."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.limits import read_bounded, regular_file


def finite_json(obj: Any, bad: list[str], where: str = "") -> Any:
    """obj with every NaN or infinite float replaced by None (JSON has no such numbers); their places in `bad`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        bad.append(where or "value")
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v, bad, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v, bad, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def print_json(obj: Any) -> None:
    """Prints obj as one line of strict JSON: non-finite numbers become null, with a warning on stderr."""
    bad: list[str] = []
    text = json.dumps(finite_json(obj, bad), allow_nan=False)
    if bad:
        print(f"warning: {len(bad)} non-finite values written as null ({', '.join(bad[:5])}"
              f"{', ...' if len(bad) > 5 else ''})", file=sys.stderr)
    print(text)


def read_text(path: str, chars: int = -1, limit: int | None = None, what: str = "") -> str:
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


def check_text_file(path: str, flag: str) -> None:
    """Refuses a text file that is not a regular file (a device or pipe never ends), cannot be opened, or whose
    start is not UTF-8, before the slow model load."""
    regular_file(path, flag)
    read_text(path, 1 << 16)


def file_pieces(path: str, progress: bool = True):
    """A text file's pieces (`evaluate.text_pieces`), with a progress bar by bytes read (`progress.tqdm`: plain
    lines off a terminal)."""
    from svdsparse_jax.evaluate import text_pieces
    from svdsparse_jax.progress import tqdm

    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise SvdsparseError(f"{path}: cannot read ({e.strerror})") from None
    with tqdm(total=size, unit="B", unit_scale=True, desc=Path(path).name, disable=None if progress else True,
              leave=False) as bar:
        for piece in text_pieces(path):
            yield piece
            bar.update(len(piece.encode("utf-8")))


def file_token_pieces(path: str, lm: Any, special: bool = False, eos: bool = False):
    """A text file's tokens, piece by piece (special tokens such as BOS on the first piece only, given
    `special`; the EOS token after the last piece, given `eos`). lm: a `session.Session` (or anything with its
    cfg, tokenizer and path)."""
    if lm.tokenizer is None:
        raise SvdsparseError(f"{lm.path}: the model has no tokenizer files; use --prompt-ids")
    for i, piece in enumerate(file_pieces(path)):
        yield np.asarray(lm.tokenizer(piece, add_special_tokens=special and i == 0)["input_ids"], np.int64)
    if eos:
        yield np.asarray(lm.cfg.eos_ids[:1], np.int64)


def file_tokens(path: str, lm: Any, limit: int) -> np.ndarray:
    """The first `limit` tokens of a text file followed by the EOS token, tokenizing only as much of it as they
    need."""
    out, count = [], 0
    for piece in file_token_pieces(path, lm, eos=True):
        out.append(piece)
        count += len(piece)
        if count >= limit:
            break
    return np.concatenate(out)[:limit] if out else np.zeros(0, np.int64)


def calibration_tokens(files: Sequence[str], lm: Any, limit: int) -> np.ndarray:
    """The calibration text files as one token stream, documents separated by the EOS token (as the bundled
    corpus), read piece by piece and only until `limit` tokens: memory bounded by what calibration uses."""
    out, count = [], 0
    for path in files:
        piece = file_tokens(path, lm, limit - count)
        out.append(piece)
        count += len(piece)
        if count >= limit:
            break
    return np.concatenate(out)
