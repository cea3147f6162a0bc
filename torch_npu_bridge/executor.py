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
"""

from __future__ import annotations

import importlib.util

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


class GuardedFFN(torch.nn.Module):
    """One layer's guarded FFN. w_gate, w_up [d_ff, d] and w_down_t [d_ff, d] (down_proj transposed), all on
    one device in the model's dtype; the predictor factors are kept in that dtype too. `record`, when a list,
    receives per decode call (candidate indices, active indices, scores [B, d_ff] f32, gate [B, d_ff] f32 with
    NaN outside the candidates): what a parity check needs to tell a real disagreement from a rounding tie."""

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor, factors: LayerFactors,
                 activation: str, threshold: float):
        super().__init__()
        dev, dt = w_gate.device, w_gate.dtype
        self.w_gate, self.w_up, self.w_down_t = w_gate, w_up, w_down_t
        to = lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float32).to(dev, dt)  # noqa: E731
        self.a, self.b, self.hidden_bias = to(factors.a), to(factors.b), to(factors.hidden_bias)
        self.bias = torch.as_tensor(factors.bias, dtype=torch.float32).to(dev)
        self.relu = factors.relu
        self.activation, self.threshold = activation, threshold
        self.record: list | None = None

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
