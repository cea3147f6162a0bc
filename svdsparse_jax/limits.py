"""Bounds known before the work: how much memory a command may take, and how much of a file, a stream or a JSON
document it reads. Each check raises one `SvdsparseError` naming the file or flag, and for a count the largest
value that fits, before anything large is read or allocated."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from svdsparse_jax.errors import SvdsparseError

JSON_BYTES = 64 << 20  # a config, index or manifest larger than this is not one
PROMPT_BYTES = 16 << 20  # one prompt: far more than any model's context holds
MEMORY_SHARE = 0.9  # of what is free, the share a command plans to use (the rest: compiled programs, buffers)


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def available_memory(devices: int = 1) -> int:
    """Bytes free for arrays: on accelerators, the first device's limit less its use (jax's memory statistics),
    times `devices` (a mesh's devices each hold their shards); on the CPU, the host's available memory
    (/proc/meminfo's MemAvailable, else the physical memory), which host devices share, or less where the
    process's address-space limit (`ulimit -v`) or its cgroup's memory limit leaves less."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return devices * max(0, int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    meminfo = _proc_fields(Path("/proc/meminfo"))
    if "MemAvailable" in meminfo:
        free = meminfo["MemAvailable"]
    return min(v for v in (free, _address_space_free(), cgroup_free()) if v is not None)


def _proc_fields(path: Path) -> dict[str, int]:
    """'Name:  N kB' lines of a /proc file as bytes, by name ({} where it cannot be read)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return fields


def _address_space_free() -> int | None:
    """The soft RLIMIT_AS less the process's virtual size, or None without a limit."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(0, soft - _proc_fields(Path("/proc/self/status")).get("VmSize", 0))


def cgroup_free(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of the process's cgroup less its use (cgroup v2's memory.max and memory.current, or v1's
    memory/memory.limit_in_bytes and usage_in_bytes under root), or None without a limit."""
    for limit_file, use_file in (("memory.max", "memory.current"),
                                 ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = (root / limit_file).read_text().strip()
            use = int((root / use_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # v1 writes "no limit" as a huge number, v2 as "max"
            return max(0, int(limit) - use)
        return None
    return None


def check_memory(nbytes: float, what: str, available: int | None = None) -> None:
    """Refuses work that needs about `nbytes` of memory when less is free; `what` names it (a file, a flag)."""
    free = available_memory() if available is None else available
    if nbytes > MEMORY_SHARE * free:
        raise SvdsparseError(f"{what}: needs about {_size(nbytes)} of memory, more than the {_size(free)} free")


def check_count(flag: str, value: int, per_unit: float, fixed: float = 0.0, available: int | None = None) -> None:
    """Refuses a count (flag = value) whose memory, fixed + value * per_unit bytes, exceeds what is free, naming
    the largest value that fits."""
    free = MEMORY_SHARE * (available_memory() if available is None else available)
    need = fixed + value * per_unit
    if need > free:
        most = max(0, math.floor((free - fixed) / per_unit)) if per_unit > 0 else 0
        raise SvdsparseError(f"{flag} {value}: needs about {_size(need)} of memory, more than the "
                             f"{_size(free / MEMORY_SHARE)} free; at most {most:,} fits")


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """path, refused unless it names a regular file (a device such as /dev/zero or a pipe has no end a reader can
    plan for); `what` names the flag."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise SvdsparseError(f"{path} ({what}): cannot read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise SvdsparseError(f"{path} ({what}): not a regular file (devices, pipes and directories are refused)")
    return Path(path)


def read_bounded(f: BinaryIO, limit: int, what: str) -> bytes:
    """At most `limit` bytes of an open stream; more is refused (`what` names it) after reading limit + 1."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise SvdsparseError(f"{what}: more than {_size(limit)}; a prompt must fit the model's context")
    return data


def read_json(path: str | os.PathLike, what: str, limit: int = JSON_BYTES) -> Any:
    """A JSON file of at most `limit` bytes; an unreadable, oversized, invalid or too deeply nested one is refused
    naming the file and `what` it should be."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise SvdsparseError(f"{path}: cannot read {what} ({e.strerror})") from None
    if len(data) > limit:
        raise SvdsparseError(f"{path}: more than {_size(limit)}, too large for {what}")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SvdsparseError(f"{path}: {what} is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise SvdsparseError(f"{path}: {what} is not valid JSON ({e})") from None
    except RecursionError:
        raise SvdsparseError(f"{path}: {what} is nested too deeply to be one") from None
