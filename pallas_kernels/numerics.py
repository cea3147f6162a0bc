"""The numerics every path shares (the model, the XLA path in `reference`, the kernels): the FFN activation as a
static description kernels specialise on, RMSNorm, and the einsum that accumulates in f32. A leaf module: jax
only."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

F32 = jnp.float32
ACTIVATIONS = ("relu", "fatrelu", "drelu", "silu")


@dataclasses.dataclass(frozen=True)
class Activation:
    """The FFN gate nonlinearity, static (hashable) so kernels specialise on it.

    relu: h = max(g, 0) * u; fatrelu: h = g * u where g >= threshold, else 0; drelu: h = max(g, 0) * max(u, 0);
    silu (dense models only; never sparse): h = silu(g) * u."""

    kind: str = "relu"
    threshold: float = 0.0

    def __post_init__(self):
        if self.kind not in ACTIVATIONS:
            raise ValueError(f"activation {self.kind!r}: expected one of {ACTIVATIONS}")

    def gate(self, g: jax.Array) -> jax.Array:
        """act(g), f32 -> f32. A neuron whose act(g) is zero needs neither its up nor its down row."""
        if self.kind == "fatrelu":
            return jnp.where(g >= self.threshold, g, 0.0)
        if self.kind == "silu":
            return jax.nn.silu(g)
        return jnp.maximum(g, 0.0)

    def up(self, u: jax.Array) -> jax.Array:
        """What multiplies act(g): u, or relu(u) for dReLU."""
        return jnp.maximum(u, 0.0) if self.kind == "drelu" else u

    def hidden(self, g: jax.Array, u: jax.Array) -> jax.Array:
        """h = act(g) * u (dReLU: relu(g) * relu(u)), f32 in, f32 out."""
        return self.gate(g) * self.up(u)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x [..., d] -> x * rsqrt(mean(x^2) + eps) * scale, computed in f32, in the scale's dtype."""
    xf = x.astype(F32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale.astype(F32)).astype(scale.dtype)


def einsum(spec: str, a: jax.Array, b: jax.Array, widen_batched: bool = False) -> jax.Array:
    """An einsum accumulating in f32. f32 operands get full f32 precision (GPUs would otherwise use TF32);
    bf16 / f16 operands run at their native rate. widen_batched: products with a label both operands keep
    (batched) are widened to f32 first, which is exact; XLA on the CPU cannot run some of them with an f32
    result ("Unsupported element type for DotThunk: BF16 x BF16 = F32")."""
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    batched = any(c.isalpha() and c in rhs and c in out for c in lhs)
    if widen_batched and batched and a.dtype != F32:
        a, b = a.astype(F32), b.astype(F32)
    precision = jax.lax.Precision.HIGHEST if a.dtype == F32 and b.dtype == F32 else None
    return jnp.einsum(spec, a, b, preferred_element_type=F32, precision=precision)
