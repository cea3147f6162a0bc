"""Which implementation runs: the Pallas kernels on GPU, the XLA reference elsewhere, with a switch to force
either (or the kernels in interpret mode, which is how the CPU tests run them).

The choice is made while a function is traced, so it is part of what a jitted program was compiled for:
`mode()` belongs in the cache key of anything that keeps compiled programs (the Generator does this).

  SVDSPARSE_KERNELS=auto|pallas|interpret|xla      (environment; default auto)
  with kernel_mode("interpret"): ...              (in code; overrides the environment)

The guarded FFN and the predictors' GEMVs follow the mode. The model's other decode projections (attention,
LM head) take the Pallas GEMV where `dense_gemv()` says so (SVDSPARSE_DENSE_GEMV=1|0, on by default); then the
q/k/v product also forms the attention's RMSNorm inside the kernel (`gemv.gemv_pallas`), so a decode step
loses XLA's norm launches before it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Iterator

import jax

MODES = ("auto", "pallas", "interpret", "xla")
_local = threading.local()

# jax 0.11 warns that Pallas' Triton lowering is deprecated in favour of Mosaic GPU on every pallas_call; the
# kernels keep a backend-neutral interface so a Mosaic GPU version can replace them, and the warning is noise.
warnings.filterwarnings("ignore", message=".*[Tt]riton.*deprecated.*")


def _check(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"kernel mode {mode!r}: expected one of {MODES} (SVDSPARSE_KERNELS or kernel_mode)")
    return mode


def requested_mode() -> str:
    """The mode asked for: the innermost `kernel_mode`, else SVDSPARSE_KERNELS, else 'auto'."""
    forced = getattr(_local, "stack", None)
    return forced[-1] if forced else _check(os.environ.get("SVDSPARSE_KERNELS", "auto"))


def mode() -> str:
    """The mode in effect: 'pallas' (compiled GPU kernels), 'interpret' (the kernels on any backend, slowly) or
    'xla' (the reference). 'auto' is 'pallas' on a GPU backend and 'xla' elsewhere."""
    asked = requested_mode()
    on_gpu = jax.default_backend() == "gpu"
    if asked == "auto":
        return "pallas" if on_gpu else "xla"
    if asked == "pallas" and not on_gpu:
        raise RuntimeError(f"kernel mode 'pallas' needs a GPU backend; this one is {jax.default_backend()!r} "
                           "(use 'interpret' to run the kernels on it, or 'xla')")
    return asked


def dense_gemv() -> bool:
    """Whether decode's dense projections use the Pallas GEMV (when the mode runs kernels at all). On by
    default: on the H100, LLaMA2-7B shape, dense decode ran 184.2 tok/s with it against 168.7 with XLA's products,
    sparse decode 312.3 against 311.8 (docs/BENCHMARKS.md, "Decode GEMVs"). SVDSPARSE_DENSE_GEMV=0 turns it off."""
    value = os.environ.get("SVDSPARSE_DENSE_GEMV", "1")
    if value not in ("0", "1"):
        raise ValueError(f"SVDSPARSE_DENSE_GEMV={value!r}: expected 0 or 1")
    return value == "1"


@contextlib.contextmanager
def kernel_mode(value: str) -> Iterator[None]:
    """Forces a mode for the functions traced inside the block."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(_check(value))
    try:
        yield
    finally:
        stack.pop()
