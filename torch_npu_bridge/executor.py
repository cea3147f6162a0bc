"""The predictor-guarded FFN in torch, shaped for CANN (Ascend NPUs through torch_npu) and equally runnable on
CUDA or CPU torch.

Decode step for x [B, 1, d] (the paper's sparse executor), with dense matmuls on gathered rows, which CANN runs well,
instead of per-row branching:
  scores = B (A x) + bias              the predictor (two small matmuls)
  C = neurons with a score > 0 for any sequence of the batch (one union, so one gather serves the batch)
  g = x W_gate[C]^T                    index_select of the candidate rows, one matmul
  a = act(g), zero where a sequence's own score was not > 0
  T = neurons of C with a != 0 for some sequence; u = x W_up[T]^T; h = a[T] * u (dReLU: relu(u))
  y = h W_down_t[T]                    down_proj stored transposed [d_ff, d], so T's rows are contiguous
Prefill (more than one token per sequence) runs dense with the same activation.

That path ("exact") finds C and T with `torch.nonzero` and boolean indexing, which wait for the device twice per
layer (the host needs the sizes). The "sync_free" path has static shapes and never waits, so CUDA graphs, NPU
graph mode and torch.compile can capture it: a fixed `capacity` of rows per layer,
  key = max over the batch of the scores          [d_ff] f32, > 0 exactly for the union's candidates
  idx = topk(key, capacity)                       [capacity] int64: every candidate when there are <= capacity
  g = x W_gate[idx]^T; a = act(g) * own[:, idx]  (a slot that holds no candidate has own False, so a = 0)
  u = x W_up[idx]^T; h = a * u (dReLU: relu(u)); y = h W_down_t[idx]
one gather of `capacity` rows per matrix instead of two compactions. With capacity >= the union's candidate count
it computes what the exact path computes (to f32 rounding: the sums include the zero terms of inactive rows);
beyond it, the lowest-scored candidates are dropped and `overflow` (a device counter, read after generation)
counts them. capacity == d_ff runs the three dense matmuls with the same masks (exact, no gather).

Two choices of the sync-free path (timed by scripts/bench/torch_bridge.py; the defaults: DEFAULT_SELECTION, _GATHER):
  selection "topk"    idx = topk(key, capacity), as above
            "prefix"  the candidates in row order, placed by a prefix sum (one scan and one scatter instead of a
                      selection; beyond the capacity the highest-numbered candidates are dropped, not the lowest-
                      scored; slots past the count are masked out)
  gather    "copy"    index_select the rows into a new matrix, then a matmul (what CANN runs well)
            "fused"   the products read the rows through the index, as sums of elementwise products, which
                      torch.compile's inductor fuses into one kernel per product with no copy of the rows (in
                      eager torch it forms the [N, capacity, d] products: for compiled graphs only)
"""

from __future__ import annotations

import importlib.util
import math

import torch

from svdsparse_jax.errors import SvdsparseError
from torch_npu_bridge.factors import LayerFactors


def npu_available() -> bool:
    """True when torch_npu imports and reports an NPU."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device asked for, or the best present: npu (torch_npu), then cuda, then cpu."""
    if device is not None:
        dev = torch.device(device)
        if dev.type == "npu" and not npu_available():
            raise SvdsparseError("device 'npu' asked for, but torch_npu is not installed or sees no NPU")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SvdsparseError("device 'cuda' asked for, but this torch has no CUDA device")
        return dev
    if npu_available():
        return torch.device("npu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def activate(kind: str, threshold: float, g: torch.Tensor) -> torch.Tensor:
    """act(g): relu / dReLU's gate half, or FATReLU (g kept where g >= threshold)."""
    if kind == "fatrelu":
        return torch.where(g >= threshold, g, torch.zeros_like(g))
    if kind in ("relu", "drelu"):
        return torch.relu(g)
    raise SvdsparseError(f"activation {kind!r}: the guarded FFN needs relu, fatrelu or drelu")


MODES = ("exact", "sync_free")
SELECTIONS = ("topk", "prefix")
GATHERS = ("copy", "fused")
# The sync-free path's defaults. H200, LLaMA2-7B bf16, static cache (CUDA graphs), 2026-12-03
# (docs/bench/torch_bridge_variants_e30fef6.json): unpatched 141.6 tok/s; topk:copy 102.6, prefix:copy 126.0,
# topk:fused 118.6, prefix:fused 140.7. Prefix wins with either gather; "fused" only under torch.compile (eager
# torch forms its [N, capacity, d] products), so the default gather stays "copy": pass "fused" when compiling.
DEFAULT_SELECTION, DEFAULT_GATHER = "prefix", "copy"


def select_rows(key: torch.Tensor, count: torch.Tensor, capacity: int, selection: str, rows: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows a sync-free layer reads: key f32 [d_ff] (> 0 for the union's candidates), count int64 [] of them,
    rows int64 [d_ff] (0..d_ff-1) -> (idx int64 [capacity], valid bool [capacity] or None when every slot of idx
    that holds no candidate holds a non-candidate, which its own mask already zeroes)."""
    if selection == "topk":
        return torch.topk(key, capacity, sorted=False).indices, None
    candidate = key > 0
    place = torch.cumsum(candidate, 0) - 1  # each candidate's place in row order
    place = torch.where(candidate & (place < capacity), place, capacity)  # the rest to a spare slot, dropped
    idx = torch.zeros(capacity + 1, dtype=torch.int64, device=key.device).scatter_(0, place, rows)[:capacity]
    return idx, torch.arange(capacity, device=key.device) < count  # past the count: row 0, masked out


def rows_product(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, gather: str) -> torch.Tensor:
    """x [N, d] @ w[idx]^T -> [N, capacity] f32, w [d_ff, d] (`gather`: copy the rows first, or read them
    through the index)."""
    if gather == "fused":
        return (x.float()[:, None, :] * w[idx].float()[None]).sum(-1)
    return (x @ w.index_select(0, idx).T).float()


def product_of_rows(h: torch.Tensor, w_t: torch.Tensor, idx: torch.Tensor, gather: str) -> torch.Tensor:
    """h [N, capacity] (the model's dtype) @ w_t[idx] -> [N, d] in h's dtype, w_t [d_ff, d]."""
    if gather == "fused":
        return (h.float()[:, :, None] * w_t[idx].float()[None]).sum(1).to(h.dtype)
    return h @ w_t.index_select(0, idx)


def round_capacity(fraction: float, d_ff: int, margin: float = 1.5, multiple: int = 64) -> int:
    """Rows a sync-free layer gathers for a measured mean candidate fraction of d_ff: fraction x margin x d_ff,
    rounded up to a multiple of `multiple`, at least `multiple`, at most d_ff."""
    rows = math.ceil(fraction * margin * d_ff / multiple) * multiple
    return int(min(d_ff, max(multiple, rows)))


def measured_capacities(union, batch: int, d_ff: int, margin: float = 1.5, multiple: int = 64) -> list[int]:
    """Per layer, `round_capacity` of the candidate union fraction a predictor set measured at `batch` sequences
    (`policy.UnionRows.at`); d_ff (exact) everywhere when nothing was measured at that batch size or above."""
    rows = None if union is None else union.at(batch)
    if rows is None:
        raise SvdsparseError(f"the predictor set has no measured candidate unions for batch {batch} (build the "
                             "predictors with this version, or give capacity as a number of rows)")
    return [round_capacity(f, d_ff, margin, multiple) for f in rows[0]]


class GuardedFFN(torch.nn.Module):
    """One layer's guarded FFN. w_gate, w_up [d_ff, d] and w_down_t [d_ff, d] (down_proj transposed), all on
    one device in the model's dtype; the predictor factors are kept in that dtype too. `mode` "exact" compacts
    with the host's help, "sync_free" gathers `capacity` rows (default d_ff) without host synchronisation (the
    module docstring). `overflow` (int64 [] on the device) sums, over sync-free decode calls, the candidates that
    did not fit in `capacity`; `max_candidates` (int64 []) is the largest union seen. `record`, when a list,
    receives per decode call (candidate indices, active indices, scores [B, d_ff] f32, gate [B, d_ff] f32 with
    NaN outside the candidates): what a parity check needs to tell a real disagreement from a rounding tie
    (recording copies to the host, so it synchronises in either mode)."""

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor, factors: LayerFactors,
                 activation: str, threshold: float, mode: str = "exact", capacity: int | None = None,
                 selection: str = DEFAULT_SELECTION, gather: str = DEFAULT_GATHER):
        super().__init__()
        dev, dt = w_gate.device, w_gate.dtype
        d_ff = w_gate.shape[0]
        if mode not in MODES:
            raise SvdsparseError(f"executor mode {mode!r}: expected one of {MODES}")
        if selection not in SELECTIONS or gather not in GATHERS:
            raise SvdsparseError(f"executor selection {selection!r}, gather {gather!r}: expected one of "
                                 f"{SELECTIONS} and one of {GATHERS}")
        self.selection, self.gather = selection, gather
        self.rows = torch.arange(d_ff, device=dev)
        capacity = d_ff if capacity is None else int(capacity)
        if not 1 <= capacity <= d_ff:
            raise SvdsparseError(f"capacity {capacity}: expected 1 to d_ff = {d_ff} rows")
        self.mode, self.capacity = mode, capacity
        self.overflow = torch.zeros((), dtype=torch.int64, device=dev)
        self.max_candidates = torch.zeros((), dtype=torch.int64, device=dev)
        self.w_gate, self.w_up, self.w_down_t = w_gate, w_up, w_down_t
        to = lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float32).to(dev, dt)  # noqa: E731
        self.a, self.b, self.hidden_bias = to(factors.a), to(factors.b), to(factors.hidden_bias)
        self.bias = torch.as_tensor(factors.bias, dtype=torch.float32).to(dev)
        self.relu = factors.relu
        self.activation, self.threshold = activation, threshold
        self.record: list | None = None
        # Plain tensor attributes, not parameters: under torch.compile's CUDA graphs (mode "reduce-overhead", what
        # transformers' static cache compiles with) an input not marked static is copied into the graph on every
        # replay, and an input mutated in place (the counters) stops the capture. Marked, they are used in place.
        for t in (self.w_gate, self.w_up, self.w_down_t, self.a, self.b, self.hidden_bias, self.bias, self.overflow,
                  self.max_candidates, self.rows):
            if t is not None:
                torch._dynamo.mark_static_address(t)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, d] -> [N, d_ff] float32 scores (candidates are > 0), rounding between the two products to the
        weights' dtype as the JAX predictor does."""
        z = (x @ self.a.T).float()
        if self.hidden_bias is not None:
            z = z + self.hidden_bias.float()
        if self.relu:
            z = torch.relu(z)
        return (z.to(self.b.dtype) @ self.b.T).float() + self.bias

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        g, u = (x @ self.w_gate.T).float(), (x @ self.w_up.T).float()
        h = activate(self.activation, self.threshold, g) * (torch.relu(u) if self.activation == "drelu" else u)
        return h.to(x.dtype) @ self.w_down_t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]: guarded when T == 1 (decode), dense otherwise (prefill)."""
        if x.shape[1] != 1:
            return self.dense(x)
        flat = x.reshape(-1, x.shape[-1])
        scores = self.scores(flat)
        if self.mode == "sync_free":
            return self.sync_free(flat, scores).reshape(x.shape)
        own = scores > 0  # [B, d_ff]
        cand = torch.nonzero(own.any(0)).squeeze(1)
        g = (flat @ torch.index_select(self.w_gate, 0, cand).T).float()
        a = activate(self.activation, self.threshold, g) * own[:, cand]
        keep = (a != 0).any(0)
        active = cand[keep]
        u = (flat @ torch.index_select(self.w_up, 0, active).T).float()
        h = a[:, keep] * (torch.relu(u) if self.activation == "drelu" else u)
        if self.activation == "drelu":  # relu(u) == 0 makes more neurons inactive; drop them from down too
            live = (h != 0).any(0)
            h, active = h[:, live], active[live]
        if self.record is not None:
            gate = torch.full_like(scores, float("nan"))
            gate[:, cand] = g
            self.record.append((cand.cpu(), active.cpu(), scores.cpu(), gate.cpu()))
        y = h.to(x.dtype) @ torch.index_select(self.w_down_t, 0, active)
        return y.reshape(x.shape)

    def sync_free(self, flat: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """flat [N, d] (model dtype), scores [N, d_ff] f32 -> y [N, d]: the guarded FFN on `capacity` gathered rows,
        with static shapes and no host synchronisation (no nonzero, no boolean indexing, no .item())."""
        own = scores > 0  # [N, d_ff] bool
        key = scores.amax(0)  # [d_ff] f32: > 0 iff some sequence's candidate
        count = (key > 0).sum()  # int64 [], stays on the device
        self.max_candidates.copy_(torch.maximum(self.max_candidates, count))
        self.overflow.add_((count - self.capacity).clamp_(min=0))
        if self.capacity == self.w_gate.shape[0]:  # every row: dense matmuls, the same masks
            idx, mask = None, own
            g, u = (flat @ self.w_gate.T).float(), (flat @ self.w_up.T).float()
        else:
            idx, valid = select_rows(key, count, self.capacity, self.selection, self.rows)  # [capacity]
            mask = own.index_select(1, idx)
            if valid is not None:
                mask = mask & valid
            g = rows_product(flat, self.w_gate, idx, self.gather)  # [N, capacity] f32
            u = rows_product(flat, self.w_up, idx, self.gather)
        a = activate(self.activation, self.threshold, g) * mask
        h = a * (torch.relu(u) if self.activation == "drelu" else u)
        if self.record is not None:
            self._record_sync_free(scores, idx, mask, g, h if self.activation == "drelu" else a)
        if idx is None:
            return h.to(flat.dtype) @ self.w_down_t
        return product_of_rows(h.to(flat.dtype), self.w_down_t, idx, self.gather)

    def _record_sync_free(self, scores: torch.Tensor, idx: torch.Tensor | None, mask: torch.Tensor, g: torch.Tensor,
                          live: torch.Tensor) -> None:
        """The exact path's record (ascending candidate and active ids, scores, gate) from a sync-free call; live
        [N, capacity]: a (h for dReLU), non-zero for the active rows."""
        if idx is None:
            idx = torch.arange(scores.shape[1], device=scores.device)
        held = mask.any(0)  # the slots that hold a candidate ("prefix" repeats row 0 in the others)
        cand, active = idx[held].sort().values, idx[(live != 0).any(0)].sort().values
        gate = torch.full_like(scores, float("nan"))
        gate[:, idx[held]] = g[:, held]
        self.record.append((cand.cpu(), active.cpu(), scores.cpu(), gate.cpu()))
