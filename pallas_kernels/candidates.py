"""A predictor's candidate neurons, as the predictors give them and the compaction (`compaction`, and
`reference.compact`) reads them. A leaf module: jax only."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Candidates:
    """A predictor's candidate neurons for each token, as the compaction reads them: either `mask` (bool
    [..., d_ff]), or `scores` (f32 [..., d_ff]) with `bias` ([d_ff], any float dtype): neuron i is a candidate
    iff scores_i + bias_i > 0, compared where the list is built (inside the compaction programs on the GPU, which
    saves XLA's launch for the addition and comparison)."""

    mask: jax.Array | None = None
    scores: jax.Array | None = None
    bias: jax.Array | None = None

    def __post_init__(self):
        if (self.mask is None) == (self.scores is None) or (self.scores is None) != (self.bias is None):
            raise ValueError("Candidates: give either a mask, or scores and a bias")

    def as_mask(self) -> jax.Array:
        """bool [..., d_ff]: the candidate set."""
        if self.mask is not None:
            return self.mask
        return self.scores.astype(F32) + self.bias.astype(F32) > 0

    def reshape(self, *shape: int) -> "Candidates":
        """The same sets with the token axes reshaped (the neuron axis stays last)."""
        if self.mask is not None:
            return Candidates(mask=self.mask.reshape(*shape, self.mask.shape[-1]))
        return Candidates(scores=self.scores.reshape(*shape, self.scores.shape[-1]), bias=self.bias)
