"""The jitted threshold calibration against the reference's greedy loop (float64 NumPy)."""

import jax.numpy as jnp
import numpy as np
import pytest

from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.predictors.thresholds import (Target, calibrate_bias, greedy_reference, layer_target,
                                                 penalty)

GRID = 64


def _problem(rng, n=512, f=300, dead=0):
    z = rng.normal(size=(n, f))
    scores = z + 0.7 * rng.normal(size=(n, f))
    h = np.where(z > rng.uniform(0.8, 1.6, f), rng.normal(size=(n, f)), 0.0)
    h[:, :dead] = 0
    importance = np.abs(h) * rng.uniform(0.5, 2.0, f)
    # float32, as predictor scores are: the bias check below then compares like with like
    return scores.astype(np.float32), importance.astype(np.float32), h != 0


@pytest.mark.parametrize("target", [Target("sparsity", 0.5), Target("sparsity", 0.75), Target("recall", 0.97),
                                    Target("recall", 0.85), Target("sparsity", 0.999), Target("loss", 0.01),
                                    Target("loss", 0.1)])
def test_matches_the_greedy_loop(target, rng):
    scores, importance, active = _problem(rng)
    ref = greedy_reference(scores, importance, active, target, grid=GRID)
    bias, chosen = calibrate_bias(jnp.asarray(scores, jnp.float32), jnp.asarray(importance, jnp.float32),
                                  jnp.asarray(active), target, grid=GRID)
    chosen = np.asarray(chosen)
    p_ref, p_got = penalty(scores, importance, ref, GRID), penalty(scores, importance, chosen, GRID)
    assert p_got <= p_ref * (1 + 1e-6) + 1e-12
    n = scores.shape[0]
    k = (np.arange(GRID + 1) * n) // GRID
    sparsity = k[chosen].mean() / n
    predicted_active = scores + np.asarray(bias)[None, :] > 0
    # the biases realise the chosen grid points: neuron i is off on the k[chosen_i] tokens of lowest score, less
    # any that tie with the lowest score kept on (float32 scores can tie at the cut)
    col = np.sort(scores, axis=0)
    first_on = col[np.minimum(k[chosen], n - 1), np.arange(scores.shape[1])]
    expected_off = np.where(k[chosen] < n, (scores < first_on[None, :]).sum(0), n)
    np.testing.assert_array_equal((~predicted_active).sum(0), expected_off)
    assert (k[chosen] - expected_off).sum() <= 0.01 * k[chosen].sum()  # ties are rare: the plan is realised
    guard_hit = (chosen == GRID).sum() > 0.01 * scores.shape[1]
    if target.kind == "sparsity" and not guard_hit:
        assert sparsity >= target.value
    if target.kind == "recall":
        assert (predicted_active & active).sum() / active.sum() >= target.value
    if target.kind == "loss":  # the dropped pairs' m^2 within the budget, and one more step would break it
        i64 = importance.astype(np.float64) ** 2
        assert (i64 * ~predicted_active).sum() <= target.value * i64.sum() * (1 + 1e-5)
        if not guard_hit:  # the budget binds: the loop went most of the way
            assert p_ref / i64.sum() > 0.5 * target.value


def test_guard_stops_when_too_many_neurons_switch_off(rng):
    scores, importance, active = _problem(rng, dead=12)  # 4% of the neurons never fire: free to switch off
    target = Target("sparsity", 0.9)
    ref = greedy_reference(scores, importance, active, target, grid=GRID)
    _, chosen = calibrate_bias(jnp.asarray(scores, jnp.float32), jnp.asarray(importance, jnp.float32),
                               jnp.asarray(active), target, grid=GRID)
    np.testing.assert_array_equal(np.asarray(chosen), ref)
    assert (np.asarray(chosen) == GRID).sum() == int(0.01 * 300) + 1  # the crossing step is taken, then stop


def test_target_rules_and_errors():
    assert layer_target("s", 0.6, 0, 0.9) == Target("sparsity", 0.5 * 0.9)
    assert layer_target("s", 0.6, 2, 0.9) == Target("sparsity", 0.6 * 0.9)
    assert layer_target("recall", 0.95, 5, 0.9) == Target("recall", 0.95)
    assert layer_target("loss", 0.01, 5, 0.9) == Target("loss", 0.01)
    with pytest.raises(SvdsparseError):
        Target("sparsity", 1.5)
    with pytest.raises(SvdsparseError, match="calibration tokens"):
        calibrate_bias(jnp.zeros((10, 4)), jnp.zeros((10, 4)), jnp.zeros((10, 4), bool), Target("sparsity", 0.5))


@pytest.mark.parametrize("ties", ["few", "many"])
def test_the_host_sort_equals_the_device_sort(ties, rng):
    """calibrate_bias sorts on the host when its scores are on the CPU (NumPy's sort is faster there), with
    XLA elsewhere: both put tied scores in token order, the order of the float64 greedy loop."""
    from svdsparse_jax.predictors.thresholds import _sort_by_score, _sort_by_score_numpy
    scores, importance, active = _problem(rng)
    if ties == "few":  # copies of other tokens' scores, with other payloads
        n, f = scores.shape
        rows, src, cols = rng.integers(0, n, 200), rng.integers(0, n, 200), rng.integers(0, f, 200)
        scores[rows, cols] = scores[src, cols]
    else:  # integer-like scores (the signbit predictor's counts), among them -0.0 and 0.0, which tie
        scores = np.round(scores * 4).astype(np.float32)
    host = _sort_by_score_numpy(scores, importance, active)
    for a, b in zip(_sort_by_score(jnp.asarray(scores), jnp.asarray(importance), jnp.asarray(active)), host):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    order = np.argsort(scores, axis=0, kind="stable")
    np.testing.assert_array_equal(np.asarray(host[1]).T, np.take_along_axis(importance ** 2, order, axis=0))
    np.testing.assert_array_equal(np.asarray(host[2]).T, np.take_along_axis(active, order, axis=0))
