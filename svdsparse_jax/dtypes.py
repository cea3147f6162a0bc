"""The weight dtypes a model may load or convert to (`DTYPES`, the canonical names the CLI offers)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from svdsparse_jax.errors import SvdsparseError

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def parse_dtype(name: str) -> jnp.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise SvdsparseError(f"dtype {name!r} is not supported; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def weight_dtype(dtype: Any) -> jnp.dtype:
    """A weight dtype given by name or as a dtype, refused unless bfloat16, float16 or float32."""
    if isinstance(dtype, str):
        return parse_dtype(dtype)
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in DTYPES:
        raise SvdsparseError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
    return dt
