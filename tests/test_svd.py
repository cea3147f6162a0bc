"""Whitened and plain SVD predictors against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np

from svdsparse_jax.predictors.svd import whitened_svd


def _problem(rng, f=96, d=48, n=400):
    # a gate matrix with a decaying spectrum (as trained ones have) and correlated inputs
    u, _ = np.linalg.qr(rng.normal(size=(f, d)))
    v, _ = np.linalg.qr(rng.normal(size=(d, d)))
    w = (u * np.geomspace(10, 0.1, d)) @ v.T
    x = rng.normal(size=(n, d)) @ (rng.normal(size=(d, d)) * np.geomspace(3, 0.3, d))
    return w, x


def test_whitened_matches_float64_reference(rng):
    w, x = _problem(rng)
    gram = x.T @ x
    r, ridge = 12, 1e-3
    a, b = whitened_svd(jnp.asarray(w, jnp.float32), jnp.asarray(gram, jnp.float32), r, ridge)
    s = gram + ridge * np.mean(np.diag(gram)) * np.eye(len(gram))
    chol = np.linalg.cholesky(s)
    u, sig, vt = np.linalg.svd(w @ chol)
    a_ref = vt[:r] @ np.linalg.inv(chol)
    b_ref = u[:, :r] * sig[:r]
    ref = b_ref @ a_ref
    got = np.asarray(b, np.float64) @ np.asarray(a, np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-3
    # float64 inputs (where x64 is on) take the float64 path and agree to round-off
    with jax.enable_x64(True):
        a64, b64 = whitened_svd(jnp.asarray(w, jnp.float64), jnp.asarray(gram, jnp.float64), r, ridge)
        assert a64.dtype == jnp.float64
        got64 = np.asarray(b64) @ np.asarray(a64)
    assert np.linalg.norm(got64 - ref) / np.linalg.norm(ref) < 1e-8


def test_plain_is_the_truncated_svd(rng):
    w, _ = _problem(rng)
    a, b = whitened_svd(jnp.asarray(w, jnp.float32), None, 10)
    u, sig, vt = np.linalg.svd(w)
    ref = (u[:, :10] * sig[:10]) @ vt[:10]
    got = np.asarray(b, np.float64) @ np.asarray(a, np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4


def test_whitening_lowers_the_error_on_the_data(rng):
    """The point of whitening: at equal rank, B A x is closer to W x on inputs like the calibration ones."""
    w, x = _problem(rng, n=2000)
    gram = jnp.asarray(x[:1000].T @ x[:1000], jnp.float32)
    held = x[1000:]
    err = {}
    for name, g in (("whitened", gram), ("plain", None)):
        a, b = whitened_svd(jnp.asarray(w, jnp.float32), g, 8)
        approx = held @ np.asarray(a, np.float64).T @ np.asarray(b, np.float64).T
        err[name] = np.linalg.norm(approx - held @ w.T)
    assert err["whitened"] < err["plain"]


def test_lower_ranks_are_the_leading_factors(rng):
    """The rank search (`BuildConfig.rank_search`) cuts one SVD: the rank-r factors are the first r of a
    higher rank's, in float64, whitened and plain."""
    w, x = _problem(rng)
    with jax.enable_x64(True):
        for gram in (jnp.asarray(x.T @ x, jnp.float64), None):
            a16, b16 = whitened_svd(jnp.asarray(w, jnp.float64), gram, 16)
            for r in (4, 9):
                a, b = whitened_svd(jnp.asarray(w, jnp.float64), gram, r)
                np.testing.assert_allclose(np.asarray(a16[:r]), np.asarray(a), rtol=1e-9, atol=1e-12)
                np.testing.assert_allclose(np.asarray(b16[:, :r]), np.asarray(b), rtol=1e-9, atol=1e-12)
