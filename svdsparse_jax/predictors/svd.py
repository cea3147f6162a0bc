"""Low-rank predictors from the SVD of the gate matrix: whitened (truncation-aware) and plain (the ablation).

Whitened SVD (the paper's truncation-aware SVD): with S = X^T X (+ ridge) = L L^T, truncating the SVD of W_g L minimises
the error of W_g x on the calibration inputs. With W_g L = U Sigma V^T:
    A = V_r^T L^{-1}  [r, d],   B = U_r Sigma_r = W_g L V_r  [d_ff, r],   B A x ~= W_g x.
Only V_r is needed, and it is the top-r eigenvectors of (W_g L)^T (W_g L) = L^T (W_g^T W_g) L, a d x d
symmetric matrix: one Gram product, two triangular products and a d x d `eigh` instead of a d_ff x d SVD
(an order of magnitude faster on a GPU; docs/design.md). Squaring the singular
values costs accuracy only for the smallest ones, which the truncation drops. Plain SVD is the same with L = I.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("rank",))
def whitened_svd(w_gate: jax.Array, gram: jax.Array | None, rank: int, ridge: float = 1e-3
                 ) -> tuple[jax.Array, jax.Array]:
    """Low-rank factors of the gate matrix.

    Args:
      w_gate: [d_ff, d] gate weights (any float dtype; computed in float32, or float64 if given).
      gram: [d, d] S = X^T X of the calibration FFN inputs (float32 or float64); None for plain SVD.
      rank: r.
      ridge: S + ridge * mean(diag(S)) * I keeps the Cholesky factor well defined.
    Returns:
      (A [r, d], B [d_ff, r]) in the compute dtype, so that B @ (A @ x) approximates w_gate @ x.
    """
    dtype = jnp.float64 if (gram is not None and gram.dtype == jnp.float64) or w_gate.dtype == jnp.float64 \
        else jnp.float32
    w = w_gate.astype(dtype)
    d = w.shape[1]
    gram_w = jnp.matmul(w.T, w, precision=HIGHEST)  # W_g^T W_g  [d, d]
    if gram is None:
        m = gram_w
    else:
        s = gram.astype(dtype)
        s = s + ridge * jnp.mean(jnp.diag(s)) * jnp.eye(d, dtype=dtype)
        chol = jnp.linalg.cholesky(s)  # lower, S = L L^T
        m = jnp.matmul(chol.T, jnp.matmul(gram_w, chol, precision=HIGHEST), precision=HIGHEST)
    m = (m + m.T) / 2
    _, vecs = jnp.linalg.eigh(m)  # ascending eigenvalues
    v_r = vecs[:, ::-1][:, :rank]  # [d, r], top-r
    if gram is None:
        a = v_r.T
        b = jnp.matmul(w, v_r, precision=HIGHEST)
    else:
        # A = V_r^T L^{-1}  <=>  L^T A^T = V_r ;  B = W_g L V_r
        a = jax.scipy.linalg.solve_triangular(chol.T, v_r, lower=False).T
        b = jnp.matmul(w, jnp.matmul(chol, v_r, precision=HIGHEST), precision=HIGHEST)
    return a, b
