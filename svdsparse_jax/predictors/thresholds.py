"""Per-neuron bias (threshold) calibration: the penalty-curve objective of the reference, solved exactly.

For neuron i, sort the calibration tokens by predictor score p ascending. Placing the threshold above the k
lowest scores predicts those k tokens inactive and costs the penalty P_i(k) = sum of m^2 over them, with
m = |h| * ||W_down[:, i]|| the damage of dropping the neuron on that token. P_i is sampled on a grid of G
quantile points k_j = floor(j n / G), j = 0..G. Each neuron starts at the largest grid point with zero penalty
(capped at `start_cap` of the grid); the reference then repeatedly advances by one grid step the neuron whose
next step adds the least penalty, until a budget is met (mean predicted sparsity, or recall), stopping early
once more than `guard` of the neurons have been switched off entirely (advanced to j = G; the step that
crosses the limit is taken, as in the reference's code).

That Python loop of argmins (hundreds of thousands of steps per layer) is replaced by one sort. Let a neuron's
step key be the running maximum of its marginal penalties from its start. The argmin loop takes steps in
ascending key order (ties: lower neuron index, then earlier step): a step cheaper than the neuron's current
head waits behind the head, and once the head is taken the cheaper steps behind it follow at once. So a
stable argsort of the keys (laid out neuron-major) gives the loop's exact order, and cumulative sums along it
give the stopping point. `greedy_reference` is the loop itself, in float64 NumPy, for tests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from svdsparse_jax.errors import SvdsparseError

GRID = 256
START_CAP = 0.95
GUARD = 0.01
NO_THRESHOLD = 3e38  # bias of a neuron whose threshold sits below every score: always predicted active


@dataclasses.dataclass(frozen=True)
class Target:
    """The budget of one layer. kind: 'sparsity' (stop once the mean predicted sparsity over the calibration
    tokens reaches `value`), 'recall' (take steps while the recall of truly active (token, neuron) pairs
    stays >= `value`) or 'loss' (take steps while the penalty of the dropped pairs, sum of m^2, stays <= `value`
    of the layer's total sum of m^2: a budget on the FFN output's squared error, summed over neurons)."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in ("sparsity", "recall", "loss"):
            raise SvdsparseError(f"target kind {self.kind!r}: expected 'sparsity', 'recall' or 'loss'")
        if not 0.0 <= self.value <= 1.0:
            raise SvdsparseError(f"target {self.kind} {self.value}: expected a value in [0, 1]")


def layer_target(rule: str, value: float, layer: int, true_sparsity: float) -> Target:
    """The reference's rules. 's': predicted sparsity = s x true sparsity (s - 0.1 on layers 0 and 1);
    'sparsity': an absolute predicted sparsity; 'recall': a minimum recall; 'loss': a maximum importance loss."""
    if rule == "s":
        s = value - 0.1 if layer < 2 else value
        return Target("sparsity", max(0.0, s) * true_sparsity)
    if rule == "sparsity":
        return Target("sparsity", value)
    if rule in ("recall", "loss"):
        return Target(rule, value)
    raise SvdsparseError(f"target rule {rule!r}: expected 's', 'sparsity', 'recall' or 'loss'")


def _grid(n: int, grid: int) -> np.ndarray:
    return (np.arange(grid + 1) * n) // grid


@jax.jit
def _sort_by_score(scores, importance, active):
    """Each neuron's tokens by ascending score, tied scores in token order (the stable order `greedy_reference`
    uses; rows of the transposes are contiguous): (sorted scores [n, f], m^2 [f, n], activity [f, n])."""
    dtype = scores.dtype
    sorted_scores, m2, act_sorted = jax.lax.sort(
        (scores.T, importance.T.astype(dtype) ** 2, active.T.astype(dtype)), dimension=1, num_keys=1,
        is_stable=True)
    return sorted_scores.T, m2, act_sorted


def _stable_argsort_rows(s: np.ndarray) -> np.ndarray:
    """np.argsort(s, axis=1, kind="stable") for s [f, n], 3x faster for float32 (finite scores): each score's
    bits made an unsigned integer of the same order, above its token index, so one SIMD sort of 64-bit keys
    orders ties by token as the stable sort does (zeros made +0 first: -0.0 and 0.0 tie, as in XLA's sort)."""
    n = s.shape[1]
    if s.dtype != np.float32:
        return np.argsort(s, axis=1, kind="stable")
    u = np.add(s, np.float32(0), order="C").view(np.uint32)
    u ^= (u.view(np.int32) >> 31).view(np.uint32) | np.uint32(1 << 31)  # negatives: every bit; others: the sign
    key = u.astype(np.uint64)
    key <<= np.uint64(32)
    key |= np.arange(n, dtype=np.uint64)
    key.sort(axis=1)
    key &= np.uint64(0xFFFFFFFF)
    return key.view(np.int64)


def _sort_by_score_numpy(scores, importance, active):
    """`_sort_by_score` on the host, the same order: XLA's CPU sort took 7 s for 32,768 x 1,024 scores, this
    about 4 s."""
    s = np.asarray(scores)
    n, f = s.shape
    order = _stable_argsort_rows(s.T)  # [f, n]
    # one flat index for the three gathers, read straight from the [n, f] arrays: (i, j) -> (order[i, j], i)
    flat = order * f
    flat += np.arange(f)[:, None]
    flat = flat.ravel()
    take = lambda a: np.take(np.asarray(a).ravel(), flat).reshape(f, n)  # noqa: E731
    m2 = np.asarray(importance, s.dtype) ** 2
    return jnp.asarray(take(s).T), jnp.asarray(take(m2)), jnp.asarray(take(active).astype(s.dtype))


@functools.partial(jax.jit, static_argnames=("grid", "start_cap", "guard", "kind"))
def _calibrate(sorted_scores, m2, act_sorted, value, *, kind: str, grid: int, start_cap: float, guard: float):
    n, f = sorted_scores.shape
    dtype = sorted_scores.dtype
    k = jnp.asarray(_grid(n, grid))  # [G+1] tokens below threshold at each grid point
    zero = jnp.zeros((1, f), dtype)
    cum_pen = jnp.concatenate([zero, jnp.cumsum(m2.T, 0)])
    cum_act = jnp.concatenate([zero, jnp.cumsum(act_sorted.T, 0)])
    pen, act = cum_pen[k], cum_act[k]  # [G+1, f]
    j_idx = jnp.arange(grid + 1)[:, None]
    start = jnp.max(jnp.where(pen == 0, j_idx, 0), axis=0)
    start = jnp.minimum(start, int(start_cap * grid))  # [f]

    steps = jnp.arange(grid)[:, None]  # step j: grid point j -> j+1
    valid = steps >= start[None, :]
    delta = pen[1:] - pen[:-1]
    key = jax.lax.cummax(jnp.where(valid, delta, -jnp.inf), axis=0)
    key = jnp.where(valid, key, jnp.inf)
    flat_key = key.T.reshape(-1)  # neuron-major, then step: the argmin loop's tie order
    perm = jnp.argsort(flat_key, stable=True)
    neuron, step = perm // grid, perm % grid
    taken_ok = jnp.isfinite(flat_key[perm])

    tokens_step = (k[1:] - k[:-1]).astype(dtype)[step]
    if kind == "sparsity":
        base = jnp.sum(k[start]).astype(dtype)
        progress = (base + jnp.cumsum(tokens_step)) / (n * f)
        reached = progress >= value
        first_reach = jnp.argmax(reached)  # the step that reaches the target is taken, then the loop stops
        budget_end = jnp.where(base / (n * f) >= value, 0, jnp.where(jnp.any(reached), first_reach + 1, perm.size))
    else:  # recall or loss: a step is taken only if the layer stays within the target
        if kind == "recall":
            total, per_step = jnp.maximum(cum_act[-1].sum(), 1), act
        else:
            total, per_step = jnp.maximum(cum_pen[-1].sum(), jnp.finfo(dtype).tiny), pen
        lost0 = jnp.sum(per_step[start, jnp.arange(f)])
        lost = lost0 + jnp.cumsum((per_step[1:] - per_step[:-1]).T.reshape(-1)[perm])
        within = (lambda x: 1 - x / total >= value) if kind == "recall" else (lambda x: x / total <= value)
        ok = within(lost)
        budget_end = jnp.where(within(lost0), jnp.argmin(ok), 0)
        budget_end = jnp.where(jnp.all(ok), perm.size, budget_end)
    finishing = (step == grid - 1).astype(jnp.int32)
    over_guard = jnp.cumsum(finishing) > guard * f  # this step switches off one neuron too many: the last one
    guard_end = jnp.where(jnp.any(over_guard), jnp.argmax(over_guard) + 1, perm.size)
    end = jnp.minimum(jnp.minimum(budget_end, guard_end), jnp.sum(taken_ok))
    taken = jnp.arange(perm.size) < end
    chosen = start + jnp.zeros(f, jnp.int32).at[neuron].add(taken.astype(jnp.int32))
    kk = k[chosen]  # tokens predicted inactive
    last_off = jnp.take_along_axis(sorted_scores, jnp.maximum(kk - 1, 0)[None, :], axis=0)[0]
    first_on = jnp.take_along_axis(sorted_scores, jnp.minimum(kk, n - 1)[None, :], axis=0)[0]
    # a score tied across the cut cannot be split: the tied tokens all stay on, so ties never cost recall
    tau = jnp.where(kk < n, jnp.minimum(last_off, jnp.nextafter(first_on, -jnp.inf)), last_off)
    bias = jnp.where(kk > 0, -tau, NO_THRESHOLD).astype(dtype)
    return bias, chosen


def calibrate_bias(scores: jax.Array, importance: jax.Array, active: jax.Array, target: Target, *,
                   grid: int = GRID, start_cap: float = START_CAP, guard: float = GUARD
                   ) -> tuple[jax.Array, jax.Array]:
    """Per-neuron biases b such that neuron i is predicted active iff score_i + b_i > 0.

    Neuron i is off on the k[chosen_i] calibration tokens of lowest score, except where a score ties across
    that cut: then the tied tokens stay on, and the neuron is off on fewer.

    Args:
      scores: [n, d_ff] predictor scores of the calibration tokens WITHOUT bias (float32 or float64).
      importance: [n, d_ff] m = |h| * ||W_down[:, i]||.
      active: [n, d_ff] bool, the true activity (h != 0); used by the recall target.
      target: the layer's budget.
    Returns:
      (bias [d_ff], chosen grid index per neuron [d_ff] int32).
    """
    if scores.shape != importance.shape or scores.shape != active.shape or scores.ndim != 2:
        raise SvdsparseError(f"scores {scores.shape}, importance {importance.shape}, active {active.shape}: "
                             "expected three [n, d_ff] arrays")
    if scores.shape[0] < grid:
        raise SvdsparseError(f"{scores.shape[0]} calibration tokens for a grid of {grid}: need at least {grid}")
    on_cpu = isinstance(scores, np.ndarray) or all(d.platform == "cpu" for d in scores.devices())
    sorted_by_score = (_sort_by_score_numpy if on_cpu else _sort_by_score)(scores, importance, active)
    return _calibrate(*sorted_by_score, jnp.asarray(target.value, scores.dtype), kind=target.kind, grid=grid,
                      start_cap=start_cap, guard=guard)


def greedy_reference(scores: np.ndarray, importance: np.ndarray, active: np.ndarray, target: Target, *,
                     grid: int = GRID, start_cap: float = START_CAP, guard: float = GUARD) -> np.ndarray:
    """The reference's loop, one argmin per grid step, in float64 NumPy. Returns the chosen grid index per
    neuron. Slow by design: the test oracle for `calibrate_bias`."""
    scores, importance = np.asarray(scores, np.float64), np.asarray(importance, np.float64)
    n, f = scores.shape
    k = _grid(n, grid)
    order = np.argsort(scores, axis=0, kind="stable")
    pen = np.vstack([np.zeros(f), np.cumsum(np.take_along_axis(importance ** 2, order, 0), 0)])[k]
    act = np.vstack([np.zeros(f), np.cumsum(np.take_along_axis(np.asarray(active, np.float64), order, 0), 0)])[k]
    j = np.array([np.max(np.nonzero(pen[:, i] == 0)[0]) for i in range(f)])
    j = np.minimum(j, int(start_cap * grid))
    total_active = max(np.asarray(active).sum(), 1)
    total_penalty = max(float((importance ** 2).sum()), np.finfo(np.float64).tiny)
    off = 0
    while True:
        if target.kind == "sparsity" and k[j].sum() / (n * f) >= target.value:
            break
        nxt = np.where(j < grid, pen[np.minimum(j + 1, grid), np.arange(f)] - pen[j, np.arange(f)], np.inf)
        i = int(np.argmin(nxt))
        if not np.isfinite(nxt[i]):
            break
        if target.kind == "recall":
            lost = act[j, np.arange(f)].sum() + act[j[i] + 1, i] - act[j[i], i]
            if 1 - lost / total_active < target.value:
                break
        if target.kind == "loss" and (pen[j, np.arange(f)].sum() + nxt[i]) / total_penalty > target.value:
            break
        j[i] += 1
        off += int(j[i] == grid)
        if off > guard * f:  # as the reference: the step is taken, then the loop stops
            break
    return j


def penalty(scores: np.ndarray, importance: np.ndarray, chosen: np.ndarray, grid: int = GRID) -> float:
    """Total penalty sum_i P_i(k_{chosen_i}) in float64."""
    scores, importance = np.asarray(scores, np.float64), np.asarray(importance, np.float64)
    n, f = scores.shape
    order = np.argsort(scores, axis=0, kind="stable")
    pen = np.vstack([np.zeros(f), np.cumsum(np.take_along_axis(importance ** 2, order, 0), 0)])
    return float(pen[_grid(n, grid)[np.asarray(chosen)], np.arange(f)].sum())
