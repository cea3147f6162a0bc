"""Atomic output directories: nothing half-written is ever left at the destination."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Iterator

from svdsparse_jax.errors import SvdsparseError


PARTIAL = ".partial-"  # temporary output directories: .NAME.partial-HOST-PID-XXXX beside NAME
OWNER_MARK = ".svdsparse-writing"  # inside a partial directory while it is written: what cleanup looks for
_PARTIAL_EXTRA = len(PARTIAL) + 2 + 10 + 8  # the dots, a pid and the 8 random characters, beside NAME and HOST
# The partial directories this process is writing now: what `exit_on_signal` removes. Process state; nothing
# traced reads it.
_WRITING: set[Path] = set()


def exit_on_signal(signum: int, prefix: str) -> None:
    """For SIGINT, SIGTERM and SIGHUP: removes this process's partial output directories and exits at once with
    128 + signum and one line on stderr. (Unwinding with an exception instead could hang in a library's writer
    threads, as orbax's did under SIGTERM.)"""
    for path in list(_WRITING):
        for _ in range(5):  # a writer thread may still add files while the tree is removed
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                break
    sys.stdout.flush()
    print(f"{prefix}: stopped by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def inside(base: str | os.PathLike, name: str, what: str) -> Path:
    """base / name, refused (one line naming `what`) unless it stays inside base: a relative name without '..'
    whose real path, links followed, lies under base's real path. Every file a model directory names is read
    through this, so a crafted index or a link cannot reach another model's files or the rest of the system."""
    base = Path(base)
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts:
        raise SvdsparseError(f"{what}: {name!r} is not a file name inside {base} (absolute paths and '..' are "
                             "refused)")
    path = base / rel
    real, root = path.resolve(), base.resolve()
    if real != root and root not in real.parents:
        raise SvdsparseError(f"{what}: {path} leads outside {base} (to {real}); links out of a model directory "
                             "are refused")
    return path


def check_new_output(out: str | os.PathLike, flag: str = "output") -> Path:
    """Refuses, before any work, an output path that exists (a dangling link too) or whose parent cannot be
    written; returns it absolute. flag: how the user named it (e.g. "--out")."""
    out = Path(out).absolute()
    if out.exists() or out.is_symlink():
        raise SvdsparseError(f"{out} ({flag}): already exists; remove it or choose another path")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SvdsparseError(f"{out} ({flag}): cannot be created (its parent {parent} is not a writable directory)")
    check_name_length(out, flag, parent)
    return out


def max_name_bytes(directory: Path) -> int:
    """The longest file name, in bytes, the filesystem holding `directory` takes (255 where it does not say)."""
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_name_length(out: Path, flag: str, existing: Path | None = None) -> None:
    """Refuses an output name too long for its filesystem once the temporary name's additions are counted
    (`atomic_directory` writes beside it as .NAME.partial-HOST-PID-XXXXXXXX)."""
    existing = existing or next((p for p in out.parents if p.exists()), Path(out.anchor))
    name_max = max_name_bytes(existing)
    room = name_max - _PARTIAL_EXTRA - len(socket.gethostname().encode())
    if len(out.name.encode()) > room:
        raise SvdsparseError(f"{out} ({flag}): the name has {len(out.name.encode())} bytes; at most {room} fit this "
                             f"filesystem's {name_max} with the temporary name written first")


def check_free_space(out: str | os.PathLike, nbytes: int, flag: str = "output") -> None:
    """Refuses, before any work, an output whose filesystem has less than `nbytes` (plus 5%) free."""
    out = Path(out).absolute()
    parent = next((p for p in out.parents if p.exists()), out.anchor)
    free = shutil.disk_usage(parent).free
    if free < nbytes * 1.05:
        raise SvdsparseError(f"{out} ({flag}): needs about {_size(nbytes)}, but its filesystem has {_size(free)} "
                             "free")


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def remove_stale_partials(parent: Path) -> list[Path]:
    """Removes the temporary output directories in `parent` left by processes of this host that no longer run
    (killed by SIGKILL or a power cut, which no handler sees); returns them. Only directories this user made
    through `atomic_directory` (they hold its mark, or are still empty) go: nothing of another user or program."""
    host, removed = socket.gethostname(), []
    for p in parent.glob(f".*{PARTIAL}*"):
        m = re.fullmatch(rf"\..+{re.escape(PARTIAL)}(.+)-(\d+)-[^-]+", p.name)
        if not m or m.group(1) != host or p.is_symlink() or not p.is_dir() or _alive(int(m.group(2))):
            continue
        mark = p / OWNER_MARK
        try:
            if p.stat().st_uid != os.getuid():
                continue
            if not mark.is_file() or mark.is_symlink():
                os.rmdir(p)  # killed before its mark was written: only an empty directory goes (rmdir refuses more)
                removed.append(p)
                continue
        except OSError:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# Files copied into an output with their own, narrower modes (a 0600 tokenizer file stays 0600): what
# `_normal_modes` leaves alone. Process state, like _WRITING.
_KEEP_MODE: set[Path] = set()


def copy_keeping_mode(source: Path, dest: Path) -> None:
    """Copies a file with its modes; `atomic_directory` keeps them (it never widens a copied file)."""
    shutil.copy2(source, dest)
    _KEEP_MODE.add(Path(dest).absolute())


def _normal_modes(root: Path) -> None:
    """Gives a finished output the modes a plain mkdir / open would (mkdtemp and some writers use 0700 / 0600
    for their temporary names only); files copied with `copy_keeping_mode` keep theirs, narrowed by the umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for parent, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(parent, d), 0o777 & ~mask)
        for f in files:
            path = Path(parent, f).absolute()
            if path in _KEEP_MODE:
                os.chmod(path, path.stat().st_mode & 0o777 & ~mask)
                _KEEP_MODE.discard(path)
            else:
                os.chmod(path, 0o666 & ~mask)


def _new_partial(out_dir: Path) -> Path:
    """Creates .NAME.partial-HOST-PID-XXXXXXXX beside out_dir, listed in _WRITING before it exists: a signal
    that lands between the two still finds it to remove (mkdtemp's name is known only once it is made)."""
    prefix = f".{out_dir.name}{PARTIAL}{socket.gethostname()}-{os.getpid()}-"
    while True:
        tmp = out_dir.parent / (prefix + secrets.token_hex(4))
        _WRITING.add(tmp)
        try:
            os.mkdir(tmp, 0o700)
            return tmp
        except FileExistsError:
            _WRITING.discard(tmp)
        except BaseException:
            _WRITING.discard(tmp)
            raise


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `out_dir`; when the block completes it is renamed to out_dir,
    when it raises it is removed (and on SIGINT, SIGTERM or SIGHUP, by the CLI's `exit_on_signal`). An
    existing out_dir is refused before anything is written, and partial directories of dead processes in the
    same parent are removed first."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() or out_dir.is_symlink():
        raise SvdsparseError(f"{out_dir}: already exists; remove it or choose another output directory")
    check_name_length(out_dir, "output")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir.parent)
    tmp = _new_partial(out_dir)
    try:
        (tmp / OWNER_MARK).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        yield tmp
        (tmp / OWNER_MARK).unlink()
        _normal_modes(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError as e:
            if out_dir.exists():  # another run finished the same output first
                raise SvdsparseError(f"{out_dir}: was written by another run meanwhile; this run's copy is "
                                     "discarded") from None
            raise SvdsparseError(f"{out_dir}: cannot move the finished output into place ({e.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _WRITING.discard(tmp)


def read_versioned_json(path: Path, versions: tuple[int, ...], what: str) -> dict:
    """Reads a JSON file whose "format" field must be one of `versions`; errors name the file and say what it
    is."""
    from svdsparse_jax.limits import read_json

    data = read_json(path, what)
    if not isinstance(data, dict) or data.get("format") not in versions:
        got = data.get("format") if isinstance(data, dict) else None
        raise SvdsparseError(f"{path}: {what} format {got!r}, expected one of {list(versions)}")
    return data
