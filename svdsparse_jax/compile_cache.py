"""JAX's persistent compilation cache for the command-line tools: a second `svdsparse generate` (or eval, score,
lm-eval run, server start) loads the programs the first one compiled instead of compiling them again.

Where it lives is settled once, at the edge, by `enable` (the CLI's --compile-cache, else the environment):

  SVDSPARSE_COMPILE_CACHE=DIR|off   the cache directory, or off (default: $XDG_CACHE_HOME/svdsparse-jax/xla,
                                    else ~/.cache/svdsparse-jax/xla)

The Python API leaves JAX's own setting alone (a library should not write to a user's home unasked); call
`enable()` to opt in.
"""

from __future__ import annotations

import os
from pathlib import Path

from svdsparse_jax.errors import SvdsparseError

OFF = "off"
MIN_COMPILE_S = 0.0  # every program: a command compiles about 30 small ones besides its main one (4 s on a CPU)


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "svdsparse-jax" / "xla"


def enable(setting: str | None = None) -> Path | None:
    """Turns the persistent cache on in `setting` (a directory), or off for "off"; None: SVDSPARSE_COMPILE_CACHE,
    else `default_dir()`. Must run before the first compilation. Returns the directory (None when off). A
    directory that cannot be created or written is refused in one line."""
    import jax

    value = setting if setting is not None else os.environ.get("SVDSPARSE_COMPILE_CACHE") or str(default_dir())
    if value == OFF:
        return None
    path = Path(value).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SvdsparseError(f"{path} (compilation cache): cannot be created ({e.strerror}); choose another with "
                             f"--compile-cache DIR or turn it off with --compile-cache {OFF}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise SvdsparseError(f"{path} (compilation cache): not writable; choose another with --compile-cache DIR "
                             f"or turn it off with --compile-cache {OFF}")
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    return path
