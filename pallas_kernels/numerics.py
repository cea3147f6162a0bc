"""The elementwise numerics every path shares (the model, the XLA path in `reference`, the kernels): the FFN
activation as a static description kernels specialise on, and RMSNorm. A leaf module: jax only."""

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
